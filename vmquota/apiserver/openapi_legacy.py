"""The OpenAPI 3 description of the HTTP API, served as /openapi.json, built from the kind table so it cannot
drift from the routes.

Bottom layer, pure. Schemas describe the fields vmquota reads; every object also
keeps whatever other fields the user sends (`additionalProperties`).
"""

from __future__ import annotations

from typing import Any

from vmquota import objects, resources
from vmquota.objects import Kind

_NAME = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_QUANTITY = {"oneOf": [{"type": "string", "example": "2Gi"}, {"type": "number"}]}
_HARD = {"type": "object", "properties": {name: _QUANTITY for name in sorted(resources.SUPPORTED)},
         "additionalProperties": False}
_METADATA = {"type": "object", "properties": {
    "name": _NAME, "namespace": _NAME, "uid": {"type": "string"}, "resourceVersion": {"type": "string"},
    "creationTimestamp": {"type": "string"}, "deletionTimestamp": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
}, "required": ["name"]}

_SPECS: dict[str, dict[str, Any]] = {
    "Project": {"type": "object", "properties": {
        "resourceQuota": {"type": "object", "properties": {"hard": _HARD}},
        "namespaceDefaultResourceQuota": {"type": "object", "properties": {"hard": _HARD}}}},
    "Namespace": {"type": "object"},
    "ResourceQuota": {"type": "object", "properties": {"hard": _HARD}},
    "VirtualMachine": {"type": "object", "properties": {
        "runStrategy": {"type": "string", "enum": ["Always", "RerunOnFailure", "Manual", "Halted", "Once"]},
        "running": {"type": "boolean"},
        "dataVolumeTemplates": {"type": "array", "items": {"type": "object", "properties": {
            "metadata": {"type": "object", "properties": {"name": _NAME}},
            "spec": {"type": "object", "properties": {"storage": {"type": "object", "properties": {
                "resources": {"type": "object", "properties": {"requests": {"type": "object", "properties": {
                    "storage": _QUANTITY}}}}}}}}}}},
        "template": {"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
            "domain": {"type": "object", "properties": {
                "cpu": {"type": "object", "properties": {
                    "cores": {"type": "integer", "minimum": 1}, "sockets": {"type": "integer", "minimum": 1},
                    "threads": {"type": "integer", "minimum": 1}}},
                "memory": {"type": "object", "properties": {"guest": _QUANTITY}},
                "resources": {"type": "object", "properties": {
                    "requests": {"type": "object", "properties": {"cpu": _QUANTITY, "memory": _QUANTITY}},
                    "limits": {"type": "object", "properties": {"cpu": _QUANTITY, "memory": _QUANTITY}}}}}},
            "volumes": {"type": "array", "items": {"type": "object"}}}}}}}},
    "VirtualMachineClone": {"type": "object", "properties": {
        "source": {"type": "object", "properties": {"kind": {"type": "string"}, "name": _NAME}},
        "target": {"type": "object", "properties": {"kind": {"type": "string"}, "name": _NAME}}},
        "required": ["source", "target"]},
    "Event": {"type": "object"},
    "ServiceAccount": {"type": "object"},
    "Role": {"type": "object"},
    "ClusterRole": {"type": "object"},
    "RoleBinding": {"type": "object"},
    "ClusterRoleBinding": {"type": "object"},
}

_STATUS = {"type": "object", "properties": {
    "kind": {"type": "string"}, "apiVersion": {"type": "string"}, "status": {"type": "string"},
    "message": {"type": "string"}, "reason": {"type": "string"}, "code": {"type": "integer"}}}


def _schema(kind: Kind) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": True, "required": ["metadata"], "properties": {
        "apiVersion": {"type": "string", "enum": [kind.api_version]},
        "kind": {"type": "string", "enum": [kind.kind]},
        "metadata": _METADATA, "spec": _SPECS[kind.kind], "status": {"type": "object"}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _responses(ok: int, schema: dict[str, Any]) -> dict[str, Any]:
    errors = {str(code): {"description": text, "content": {"application/json": {"schema": _ref("Status")}}}
              for code, text in ((400, "bad request"), (403, "refused by quota"), (404, "not found"),
                                 (409, "conflict"), (422, "invalid"))}
    return {str(ok): {"description": "OK", "content": {"application/json": {"schema": schema}}}, **errors}


def _base(kind: Kind) -> str:
    return f"/apis/{kind.group}/{kind.version}" if kind.group else "/api/v1"


def document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {"Status": _STATUS}
    ns_param = {"name": "namespace", "in": "path", "required": True, "schema": _NAME}
    name_param = {"name": "name", "in": "path", "required": True, "schema": _NAME}
    for kind in objects.KINDS:
        schemas[kind.kind] = _schema(kind)
        list_schema = {"type": "object", "properties": {"kind": {"type": "string"}, "items": {
            "type": "array", "items": _ref(kind.kind)}}}
        body = {"required": True, "content": {"application/json": {"schema": _ref(kind.kind)}}}
        patch = {"required": True, "content": {"application/merge-patch+json": {"schema": {"type": "object"}}}}
        writable = kind is not objects.EVENT
        prefix = f"{_base(kind)}/namespaces/{{namespace}}/{kind.plural}" if kind.namespaced \
            else f"{_base(kind)}/{kind.plural}"
        params = [ns_param] if kind.namespaced else []
        collection: dict[str, Any] = {"get": {"operationId": f"list{kind.kind}", "parameters": params,
                                              "responses": _responses(200, list_schema)}}
        if writable:
            collection["post"] = {"operationId": f"create{kind.kind}", "parameters": params, "requestBody": body,
                                  "responses": _responses(201, _ref(kind.kind))}
        paths[prefix] = collection
        item: dict[str, Any] = {"get": {"operationId": f"read{kind.kind}", "parameters": [*params, name_param],
                                        "responses": _responses(200, _ref(kind.kind))}}
        if writable and kind is not objects.VIRTUAL_MACHINE_CLONE:
            item["put"] = {"operationId": f"replace{kind.kind}", "parameters": [*params, name_param],
                           "requestBody": body, "responses": _responses(200, _ref(kind.kind))}
            item["patch"] = {"operationId": f"patch{kind.kind}", "parameters": [*params, name_param],
                             "requestBody": patch, "responses": _responses(200, _ref(kind.kind))}
        if writable:
            item["delete"] = {"operationId": f"delete{kind.kind}", "parameters": [*params, name_param],
                              "responses": _responses(200, _ref(kind.kind))}
        paths[f"{prefix}/{{name}}"] = item
        if kind.namespaced:
            paths[f"{_base(kind)}/{kind.plural}"] = {"get": {
                "operationId": f"list{kind.kind}AllNamespaces", "responses": _responses(200, list_schema)}}
    for action in ("start", "stop", "restart"):
        paths[f"/apis/subresources.kubevirt.io/v1/namespaces/{{namespace}}/virtualmachines/{{name}}/{action}"] = {
            "put": {"operationId": f"{action}VirtualMachine", "parameters": [ns_param, name_param],
                    "requestBody": {"required": False, "content": {"application/json": {"schema": {
                        "type": "object", "properties": {"gracePeriod": {"type": "integer", "minimum": 0}}}}}},
                    "responses": _responses(202, _ref("Status"))}}
    paths["/apis/vmquota.io/v1/namespaces/{namespace}/charges"] = {"get": {
        "operationId": "listCharges", "parameters": [ns_param], "responses": _responses(200, {"type": "object"})}}
    paths["/apis/vmquota.io/v1/namespaces/{namespace}/charges/{name}"] = {"get": {
        "operationId": "readCharge", "parameters": [ns_param, name_param],
        "responses": _responses(200, {"type": "object"})}}
    paths["/apis/vmquota.io/v1/projects/{name}/usage"] = {"get": {
        "operationId": "readProjectUsage", "parameters": [name_param],
        "responses": _responses(200, {"type": "object"})}}
    paths["/openapi.json"] = {"get": {"operationId": "openapi", "responses": {
        "200": {"description": "this document", "content": {"application/json": {}}}}}}
    paths["/healthz"] = {"get": {"operationId": "health", "responses": {"200": {"description": "serving",
                                                                                "content": {"text/plain": {}}}}}}
    return {"openapi": "3.0.3", "info": {"title": "vmquota", "version": "1"}, "paths": paths,
            "components": {"schemas": schemas}}
