"""The OpenAPI documents the server serves, all rendered from `vmquota.schema` and the kind registry.

    /openapi/v2                      swagger 2.0, as JSON or in gnostic's protobuf (`openapi_pb.py`), which
                                     client-go asks for: kubectl's client-side validation, explain v2
    /openapi/v3                      the index: one document per group-version, by `serverRelativeURL`
    /openapi/v3/api/v1, /openapi/v3/apis/{group}/{version}   OpenAPI 3.0 per group-version (kubectl explain,
                                     apply's patch types, and its test for server-side field validation)
    /openapi.json                    vmquota's own OpenAPI 3 document of every route (the schemathesis fuzz)

kubectl decides that the server validates fields itself (so `kubectl apply --validate=strict` sends
`fieldValidation=Strict` instead of validating on the client) when the PATCH operation of a kind, found by its
`x-kubernetes-group-version-kind`, lists a `fieldValidation` query parameter (cli-runtime's QueryParamVerifierV3,
or QueryParamVerifier on /openapi/v2). Apply uses strategic merge patch for a kind only when the v3 PATCH
operation accepts `application/strategic-merge-patch+json`: the built-in kinds, never the KubeVirt ones.

Pure: every document is built once, at import, from the registry; `handlers.py` serves the bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vmquota import objects, schema
from vmquota.apiserver import openapi_pb
from vmquota.objects import Kind, Subresource
from vmquota.schema import Schema

K8S_VERSION = "v1.32.0"

# -- the operations, once, for every rendering ----------------------------------------------------------------

_QUERY: dict[str, tuple[str, str]] = {  # name: (JSON type, description), in Kubernetes' words
    "pretty": ("string", "If 'true', then the output is pretty printed."),
    "allowWatchBookmarks": ("boolean", "allowWatchBookmarks requests watch events with type \"BOOKMARK\". Servers "
                                       "that do not implement bookmarks may ignore this flag."),
    "continue": ("string", "The continue option should be set when retrieving more results from the server, with "
                           "the value of metadata.continue of the previous page."),
    "fieldSelector": ("string", "A selector to restrict the list of returned objects by their fields: "
                                "metadata.name, metadata.namespace, and involvedObject.* for events."),
    "labelSelector": ("string", "A selector to restrict the list of returned objects by their labels "
                                "(=, ==, !=, in, notin, exists, !key)."),
    "limit": ("integer", "limit is a maximum number of responses to return for a list call; metadata.continue "
                         "then names the next page."),
    "resourceVersion": ("string", "resourceVersion sets a constraint on what resource versions a request may be "
                                  "served from; a watch starts after it."),
    "resourceVersionMatch": ("string", "resourceVersionMatch determines how resourceVersion is applied to list "
                                       "calls."),
    "sendInitialEvents": ("boolean", "`sendInitialEvents=true` may be set together with `watch=true`: the watch "
                                     "then starts with synthetic events of the current state."),
    "timeoutSeconds": ("integer", "Timeout for the list/watch call. This limits the duration of the call, "
                                  "regardless of any activity or inactivity."),
    "watch": ("boolean", "Watch for changes to the described resources and return them as a stream of add, "
                         "update, and remove notifications."),
    "since": ("string", "How far back the history goes: a duration (90m, 24h, 7d) or an RFC 3339 time; 24h by "
                        "default."),
    "dryRun": ("string", "When present, indicates that modifications should not be persisted: every validation "
                         "and every quota admission runs, nothing changes. Valid values are: - All"),
    "fieldManager": ("string", "fieldManager is a name associated with the actor or entity that is making these "
                               "changes."),
    "fieldValidation": ("string", "fieldValidation instructs the server on how to handle objects in the request "
                                  "(POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - "
                                  "Ignore: This will ignore any unknown fields that are silently dropped from the "
                                  "object, and will ignore all but the last duplicate field that the decoder "
                                  "encounters. - Warn: This will send a warning via the standard warning response "
                                  "header for each unknown field and for each duplicate field that is "
                                  "encountered. This is the default. - Strict: This will fail the request with a "
                                  "BadRequest error if any unknown fields would be dropped from the object, or if "
                                  "any duplicate fields are present."),
    "force": ("boolean", "Force is going to \"force\" Apply requests. It means user will re-acquire conflicting "
                         "fields owned by other people. Force flag must be unset for non-apply patch requests."),
    "gracePeriodSeconds": ("integer", "The duration in seconds before the object should be deleted."),
    "propagationPolicy": ("string", "Whether and how garbage collection will be performed: Orphan, Background or "
                                    "Foreground."),
}
_LIST_QUERY = ("allowWatchBookmarks", "continue", "fieldSelector", "labelSelector", "limit", "resourceVersion",
               "resourceVersionMatch", "sendInitialEvents", "timeoutSeconds", "watch")
_WRITE_QUERY = ("dryRun", "fieldManager", "fieldValidation")

_PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml")
_STRATEGIC = "application/strategic-merge-patch+json"
PATCH = "io.k8s.apimachinery.pkg.apis.meta.v1.Patch"
DELETE_OPTIONS = "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions"


@dataclass(frozen=True)
class Operation:
    method: str  # get, post, put, patch, delete
    operation_id: str
    action: str  # x-kubernetes-action: list, get, post, put, patch, delete
    description: str
    query: tuple[str, ...]
    response: str  # the definition it answers with
    code: int = 200
    body: str = ""  # the definition it takes; "" for none
    body_types: tuple[str, ...] = ("*/*",)
    body_required: bool = True
    gvk: Kind | None = None


@dataclass(frozen=True)
class PathItem:
    path: str
    path_params: tuple[str, ...]  # namespace, name
    operations: tuple[Operation, ...]
    group: str
    version: str


def _base(group: str, version: str) -> str:
    return f"/apis/{group}/{version}" if group else f"/api/{version}"


def _camel(kind: Kind) -> str:
    """The group-version part of Kubernetes' operation ids: CoreV1, KubevirtIoV1, CloneKubevirtIoV1beta1."""
    group = "".join(part.capitalize() for part in kind.group.split(".")) if kind.group else "Core"
    return group + kind.version.capitalize()


def _kind_paths(kind: Kind) -> Iterator[PathItem]:
    base, gv, defn = _base(kind.group, kind.version), _camel(kind), schema.definition_name(kind)
    scope = "Namespaced" if kind.namespaced else ""
    collection = (f"{base}/namespaces/{{namespace}}/{kind.plural}" if kind.namespaced else f"{base}/{kind.plural}")
    params = ("namespace",) if kind.namespaced else ()
    patch_types = (*_PATCH_TYPES[:2], _STRATEGIC, _PATCH_TYPES[2]) if not kind.group else _PATCH_TYPES
    ops: list[Operation] = []
    if "list" in kind.verbs:
        ops.append(Operation("get", f"list{gv}{scope}{kind.kind}", "list", f"list or watch objects of kind "
                             f"{kind.kind}", _LIST_QUERY, schema.list_definition_name(kind), gvk=kind))
    if "create" in kind.verbs:
        ops.append(Operation("post", f"create{gv}{scope}{kind.kind}", "post", f"create a {kind.kind}", _WRITE_QUERY,
                             defn, 201, body=defn, gvk=kind))
    yield PathItem(collection, params, tuple(ops), kind.group, kind.version)

    ops = [Operation("get", f"read{gv}{scope}{kind.kind}", "get", f"read the specified {kind.kind}", (), defn,
                     gvk=kind)]
    if "update" in kind.verbs:
        ops.append(Operation("put", f"replace{gv}{scope}{kind.kind}", "put", f"replace the specified {kind.kind}",
                             _WRITE_QUERY, defn, body=defn, gvk=kind))
    # Every kind has a PATCH operation, even one vmquota refuses to patch (405): kubectl finds out whether the
    # server validates fields by looking at the PATCH operation of the kind, and without one it falls back to
    # /openapi/v2 in protobuf and fails `kubectl create -f` itself.
    patchable = "patch" in kind.verbs
    ops.append(Operation("patch", f"patch{gv}{scope}{kind.kind}", "patch",
                         f"partially update the specified {kind.kind}" if patchable else
                         f"{kind.plural} are not patched: answered 405 MethodNotAllowed", (*_WRITE_QUERY, "force"),
                         defn, body=PATCH, body_types=patch_types, gvk=kind))
    if "delete" in kind.verbs:
        ops.append(Operation("delete", f"delete{gv}{scope}{kind.kind}", "delete", f"delete a {kind.kind}",
                             ("dryRun", "gracePeriodSeconds", "propagationPolicy"), defn, body=DELETE_OPTIONS,
                             body_required=False, gvk=kind))
    yield PathItem(f"{collection}/{{name}}", (*params, "name"), tuple(ops), kind.group, kind.version)

    if kind.namespaced and "list" in kind.verbs:
        yield PathItem(f"{base}/{kind.plural}", (), (Operation(
            "get", f"list{gv}{kind.kind}ForAllNamespaces", "list", f"list or watch objects of kind {kind.kind}",
            _LIST_QUERY, schema.list_definition_name(kind), gvk=kind),), kind.group, kind.version)


def _subresource_path(sub: Subresource) -> PathItem:
    parent = sub.parent
    prefix = f"{_base(sub.group, sub.version)}/namespaces/{{namespace}}" if parent.namespaced \
        else _base(sub.group, sub.version)
    params = ("namespace", "name") if parent.namespaced else ("name",)
    method = "put" if "update" in sub.verbs else "post" if "create" in sub.verbs else "get"
    query = ("dryRun",) if sub.name in ("start", "restart") else ("since",) if sub.name == "history" else ()
    body = "io.kubevirt.v1.StopOptions" if sub.name == "stop" else ""
    name = sub.name.capitalize()
    answer = {"Status": schema.STATUS, "TokenRequest": TOKEN_REQUEST}.get(sub.kind, f"io.vmquota.v1.{sub.kind}")
    operation_id = f"v1{name}" if sub.group == "subresources.kubevirt.io" else \
        f"read{_camel(parent)}{parent.kind}{name}"
    if sub.name == "portforward":  # KubeVirt's ids: the VM's and the VMI's port forwards are two operations
        operation_id = f"v1{'vm' if parent.kind == 'VirtualMachine' else 'vmi'}-PortForward"
    operation = Operation(method, operation_id, method,
                          f"{sub.name} the {parent.kind}" if method == "put" else f"create a {sub.name} of a "
                          f"{parent.kind}" if method == "post" else f"read the {sub.name} of a {parent.kind}",
                          query, answer, {"put": 202, "post": 201}.get(method, 200),
                          body=TOKEN_REQUEST if method == "post" else body, body_required=method == "post")
    extra = "".join(f"/{{{p}}}" for p in sub.path_parameters)
    return PathItem(f"{prefix}/{parent.plural}/{{name}}/{sub.name}{extra}", (*params, *sub.path_parameters),
                    (operation,), sub.group, sub.version)


PROJECT_USAGE = "io.vmquota.v1.ProjectUsage"
USAGE_HISTORY = "io.vmquota.v1.UsageHistory"
TOKEN_REQUEST = "io.k8s.api.authentication.v1.TokenRequest"
_EXTRA_DEFINITIONS: dict[str, Schema] = {
    PATCH: schema.obj("Patch is provided to give a concrete name and type to the Kubernetes PATCH request body.",
                      {}, preserve_unknown=True),
    DELETE_OPTIONS: schema.obj("DeleteOptions may be provided when deleting an API object.", {
        "apiVersion": schema.string(""), "kind": schema.string(""),
        "dryRun": schema.array(schema.string(""), "When present, indicates that modifications should not be "
                                                  "persisted. Valid values are: - All"),
        "gracePeriodSeconds": schema.integer("The duration in seconds before the object should be deleted.",
                                             fmt="int64"),
        "propagationPolicy": schema.string("Whether and how garbage collection will be performed."),
        "preconditions": schema.preserved("Must be fulfilled before a deletion is carried out."),
        "orphanDependents": schema.boolean("Deprecated: please use the PropagationPolicy."),
    }),
    "io.kubevirt.v1.StopOptions": schema.obj("StopOptions may be provided when deleting an API object.", {
        "gracePeriod": schema.integer("this updates the VMIs terminationGracePeriodSeconds during shutdown",
                                      minimum=0, fmt="int64"),
        "dryRun": schema.array(schema.string(""), "When present, indicates that modifications should not be "
                                                  "persisted."),
    }),
    TOKEN_REQUEST: schema.preserved("TokenRequest requests a token for a given service account: spec.audiences, "
                                    "spec.expirationSeconds; the answer's status.token and "
                                    "status.expirationTimestamp."),
    PROJECT_USAGE: schema.preserved("What each namespace of a project uses, and the project's sum."),
    USAGE_HISTORY: schema.preserved("A quota's or project's used over time (every recent change, then per minute "
                                    "and per hour buckets with their peak), its peak, the seconds it spent at each "
                                    "limit, and its refusals per day."),
}

PATHS: tuple[PathItem, ...] = (
    *(item for kind in objects.KINDS for item in _kind_paths(kind)),
    *(_subresource_path(sub) for sub in objects.SUBRESOURCES),
)


def _definitions() -> dict[str, Schema]:
    found = {**schema.DEFINITIONS, **_EXTRA_DEFINITIONS}
    for kind in objects.KINDS:
        found[schema.definition_name(kind)] = schema.kind_schema(kind)
        found[schema.list_definition_name(kind)] = schema.list_schema(kind)
    return found


DEFINITIONS = _definitions()
_GVK_OF = {schema.definition_name(k): k for k in objects.KINDS} | \
          {schema.list_definition_name(k): k for k in objects.KINDS}


def _gvk(kind: Kind, *, list_kind: bool = False) -> dict[str, str]:
    return {"group": kind.group, "kind": kind.kind + ("List" if list_kind else ""), "version": kind.version}


# -- rendering one schema node --------------------------------------------------------------------------------

def render(node: Schema, refs: str, *, v3: bool) -> dict[str, Any]:
    """A schema node as OpenAPI: v3 (`allOf` around a described reference, `oneOf` for a quantity) or v2."""
    if node.ref:
        target = {"$ref": refs + node.ref}
        if not node.description:
            return target
        return {"allOf": [target], "description": node.description} if v3 else \
            {**target, "description": node.description}
    out: dict[str, Any] = {}
    if node.description:
        out["description"] = node.description
    if node.alternatives and v3:
        out["oneOf"] = [{"type": t} for t in node.alternatives]
    elif node.type:
        out["type"] = node.type
    for key, value in (("format", node.format), ("pattern", node.pattern), ("maxLength", node.max_length),
                       ("minimum", node.minimum)):
        if value not in ("", None):
            out[key] = value
    if node.enum:
        out["enum"] = list(node.enum)
    # In v2, a subtree that keeps unknown fields has no properties, as kube-apiserver publishes CRDs: kubectl's
    # client-side validation (v2 only) would otherwise refuse the fields vmquota keeps there.
    if node.properties and not (node.preserve_unknown and not v3):
        out["properties"] = {name: render(child, refs, v3=v3) for name, child in node.properties.items()}
    if node.required:
        out["required"] = list(node.required)
    if node.items is not None:
        out["items"] = render(node.items, refs, v3=v3)
    if node.values is not None:
        out["additionalProperties"] = render(node.values, refs, v3=v3)
    if node.preserve_unknown:
        out["x-kubernetes-preserve-unknown-fields"] = True
    out.update(node.extensions)
    return out


def _definition(name: str, node: Schema, refs: str, *, v3: bool) -> dict[str, Any]:
    out = render(node, refs, v3=v3)
    kind = _GVK_OF.get(name)
    if kind is not None:
        out["x-kubernetes-group-version-kind"] = [_gvk(kind, list_kind=name.endswith("List"))]
    return out


def _referenced(names: set[str]) -> set[str]:
    """`names` and every definition they reach, for a per-group-version document that holds only what it uses."""
    found, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        todo.extend(_refs(DEFINITIONS[name]))
    return found


def _refs(node: Schema) -> Iterator[str]:
    if node.ref:
        yield node.ref
    for child in (*node.properties.values(), node.items, node.values):
        if child is not None:
            yield from _refs(child)


# -- OpenAPI v2 -----------------------------------------------------------------------------------------------

_V2_REFS = "#/definitions/"
_PRODUCES = ["application/json", "application/yaml"]


_PATH_PARAMETERS = {"namespace": "name of the Namespace", "port": "the guest's port (1-65535), as a websocket"}


def _v2_param(name: str, where: str = "query") -> dict[str, Any]:
    if where == "path":
        return {"name": name, "in": "path", "required": True, "type": "string", "uniqueItems": True,
                "description": _PATH_PARAMETERS.get(name, "name of the object")}
    kind, text = _QUERY[name]
    return {"name": name, "in": "query", "type": kind, "uniqueItems": True, "description": text}


def _v2_operation(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {"description": op.description, "operationId": op.operation_id, "schemes": ["https"],
                           "produces": [*_PRODUCES, *(["application/json;stream=watch"] if op.action == "list"
                                                      else [])]}
    params = [_v2_param(name) for name in op.query]
    if op.body:
        out["consumes"] = list(op.body_types) if op.body_types != ("*/*",) else ["*/*"]
        params.insert(0, {"name": "body", "in": "body", "required": op.body_required,
                          "schema": {"$ref": _V2_REFS + op.body}})
    else:
        out["consumes"] = ["*/*"]
    out["parameters"] = params
    out["responses"] = {str(op.code): {"description": "OK", "schema": {"$ref": _V2_REFS + op.response}},
                        "401": {"description": "Unauthorized"}}
    out["x-kubernetes-action"] = op.action
    if op.gvk is not None:
        out["x-kubernetes-group-version-kind"] = _gvk(op.gvk)
    return out


def _v2_path(item: PathItem) -> dict[str, Any]:
    out: dict[str, Any] = {op.method: _v2_operation(op) for op in item.operations}
    out["parameters"] = [*(_v2_param(name, "path") for name in item.path_params), _v2_param("pretty")]
    return out


def v2_document() -> dict[str, Any]:
    return {
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": K8S_VERSION},
        "paths": {item.path: _v2_path(item) for item in PATHS},
        "definitions": {name: _definition(name, node, _V2_REFS, v3=False)
                        for name, node in sorted(DEFINITIONS.items())},
        "securityDefinitions": {"BearerToken": {"type": "apiKey", "name": "authorization", "in": "header",
                                                "description": "Bearer Token authentication"}},
        "security": [{"BearerToken": []}],
    }


# -- OpenAPI v3 -----------------------------------------------------------------------------------------------

_V3_REFS = "#/components/schemas/"


def _v3_param(name: str, where: str = "query") -> dict[str, Any]:
    if where == "path":
        return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "uniqueItems": True},
                "description": _PATH_PARAMETERS.get(name, "name of the object")}
    kind, text = _QUERY[name]
    return {"name": name, "in": "query", "schema": {"type": kind, "uniqueItems": True}, "description": text}


def _v3_operation(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {"description": op.description, "operationId": op.operation_id}
    if op.query:
        out["parameters"] = [_v3_param(name) for name in op.query]
    if op.body:
        out["requestBody"] = {"content": {t: {"schema": {"$ref": _V3_REFS + op.body}} for t in op.body_types},
                              "required": op.body_required}
    answer = {"schema": {"$ref": _V3_REFS + op.response}}
    content = {t: answer for t in (*_PRODUCES, *(["application/json;stream=watch"] if op.action == "list"
                                                 else []))}
    out["responses"] = {str(op.code): {"description": "OK", "content": content},
                        "401": {"description": "Unauthorized"}}
    out["x-kubernetes-action"] = op.action
    if op.gvk is not None:
        out["x-kubernetes-group-version-kind"] = _gvk(op.gvk)
    return out


def _v3_path(item: PathItem) -> dict[str, Any]:
    out: dict[str, Any] = {op.method: _v3_operation(op) for op in item.operations}
    out["parameters"] = [*(_v3_param(name, "path") for name in item.path_params), _v3_param("pretty")]
    return out


def group_versions() -> list[tuple[str, str]]:
    """Every group-version a document is served for, the core group first."""
    found = {(item.group, item.version) for item in PATHS}
    return sorted(found, key=lambda gv: (gv[0] != "", gv))


def gv_key(group: str, version: str) -> str:
    """The key of a group-version in the v3 index, as kube-apiserver spells it: `api/v1`, `apis/kubevirt.io/v1`."""
    return f"apis/{group}/{version}" if group else f"api/{version}"


def v3_document(group: str, version: str) -> dict[str, Any]:
    items = [item for item in PATHS if (item.group, item.version) == (group, version)]
    used = {name for item in items for op in item.operations for name in (op.response, op.body) if name}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": K8S_VERSION},
        "paths": {item.path: _v3_path(item) for item in items},
        "components": {
            "schemas": {name: _definition(name, DEFINITIONS[name], _V3_REFS, v3=True)
                        for name in sorted(_referenced(used))},
            "securitySchemes": {"BearerToken": {"type": "apiKey", "name": "authorization", "in": "header",
                                                "description": "Bearer Token authentication"}},
        },
        "security": [{"BearerToken": []}],
    }


@dataclass(frozen=True)
class Served:
    """One document as bytes, and the hash its URL carries so that clients may cache it for good."""
    body: bytes
    hash: str


def _served(document: dict[str, Any]) -> Served:
    body = json.dumps(document, sort_keys=False).encode()
    return Served(body, hashlib.sha512(body).hexdigest().upper())


V2 = _served(v2_document())
V2_PROTOBUF = openapi_pb.document(json.loads(V2.body))
V3: dict[str, Served] = {gv_key(*gv): _served(v3_document(*gv)) for gv in group_versions()}
V3_INDEX = _served({"paths": {key: {"serverRelativeURL": f"/openapi/v3/{key}?hash={served.hash}"}
                              for key, served in V3.items()}})


# -- /openapi.json: vmquota's own OpenAPI 3 document of every route ------------------------------------------

_LEGACY_REFS = "#/components/schemas/"
_NAME = {"type": "string", "pattern": schema.NAME_PATTERN, "maxLength": 63}
_QUANTITY = {"oneOf": [{"type": "string", "example": "2Gi"}, {"type": "number"}]}


def _inline(node: Schema) -> dict[str, Any]:
    """A node with every reference resolved in place, as `/openapi.json` has always been: one self-contained
    schema per kind. A map vmquota accepts only some keys in (a quota's resources) lists them, so that the fuzzer
    generates names the server accepts."""
    if node.ref == schema.QUANTITY:
        return dict(_QUANTITY)
    if node.ref:
        return _inline(schema.resolve(node))
    out: dict[str, Any] = {}
    if node.alternatives:
        out["oneOf"] = [{"type": t} for t in node.alternatives]
    elif node.type:
        out["type"] = node.type
    if node.type == "integer":
        out.pop("format", None)
    for key, value in (("pattern", node.pattern), ("maxLength", node.max_length), ("minimum", node.minimum)):
        if value not in ("", None):
            out[key] = value
    if node.enum:
        out["enum"] = list(node.enum)
    if node.keys and node.values is not None:
        out["properties"] = {key: _inline(node.values) for key in node.keys}
        out["additionalProperties"] = False
    elif node.values is not None:
        out["additionalProperties"] = _inline(node.values)
    if node.properties:
        out["properties"] = {name: _inline(child) for name, child in node.properties.items()}
    if node.items is not None:
        out["items"] = _inline(node.items)
    return out


def _legacy_schema(kind: Kind) -> dict[str, Any]:
    out = _inline(schema.kind_schema(kind))
    out["properties"]["apiVersion"] = {"type": "string", "enum": [kind.api_version]}
    out["properties"]["kind"] = {"type": "string", "enum": [kind.kind]}
    out["properties"]["metadata"]["required"] = ["name"]
    out["properties"]["status"] = {"type": "object"}  # the server's to write
    out["required"] = ["metadata", *(r for r in out.get("required", ()) if r != "metadata")]
    out["additionalProperties"] = True
    return out


_STATUS = {"type": "object", "properties": {
    "kind": {"type": "string"}, "apiVersion": {"type": "string"}, "status": {"type": "string"},
    "message": {"type": "string"}, "reason": {"type": "string"}, "code": {"type": "integer"}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _LEGACY_REFS + name}


def _responses(ok: int, body: dict[str, Any]) -> dict[str, Any]:
    errors = {str(code): {"description": text, "content": {"application/json": {"schema": _ref("Status")}}}
              for code, text in ((400, "bad request"), (403, "refused by quota"), (404, "not found"),
                                 (409, "conflict"), (422, "invalid"))}
    return {str(ok): {"description": "OK", "content": {"application/json": {"schema": body}}}, **errors}


def document() -> dict[str, Any]:
    """`/openapi.json`: every route vmquota serves, with operation ids by kind (listVirtualMachine, ...)."""
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {"Status": _STATUS}
    ns_param = {"name": "namespace", "in": "path", "required": True, "schema": _NAME}
    name_param = {"name": "name", "in": "path", "required": True, "schema": _NAME}
    for kind in objects.KINDS:
        schemas[kind.kind] = _legacy_schema(kind)
        list_schema = {"type": "object", "properties": {"kind": {"type": "string"}, "items": {
            "type": "array", "items": _ref(kind.kind)}}}
        body = {"required": True, "content": {"application/json": {"schema": _ref(kind.kind)}}}
        patch = {"required": True, "content": {"application/merge-patch+json": {"schema": {"type": "object"}}}}
        base = _base(kind.group, kind.version)
        prefix = f"{base}/namespaces/{{namespace}}/{kind.plural}" if kind.namespaced else f"{base}/{kind.plural}"
        params = [ns_param] if kind.namespaced else []
        collection: dict[str, Any] = {"get": {"operationId": f"list{kind.kind}", "parameters": params,
                                              "responses": _responses(200, list_schema)}}
        if "create" in kind.verbs:
            collection["post"] = {"operationId": f"create{kind.kind}", "parameters": params, "requestBody": body,
                                  "responses": _responses(201, _ref(kind.kind))}
        paths[prefix] = collection
        item: dict[str, Any] = {"get": {"operationId": f"read{kind.kind}", "parameters": [*params, name_param],
                                        "responses": _responses(200, _ref(kind.kind))}}
        if "update" in kind.verbs:
            item["put"] = {"operationId": f"replace{kind.kind}", "parameters": [*params, name_param],
                           "requestBody": body, "responses": _responses(200, _ref(kind.kind))}
        if "patch" in kind.verbs:
            item["patch"] = {"operationId": f"patch{kind.kind}", "parameters": [*params, name_param],
                             "requestBody": patch, "responses": _responses(200, _ref(kind.kind))}
        if "delete" in kind.verbs:
            item["delete"] = {"operationId": f"delete{kind.kind}", "parameters": [*params, name_param],
                              "responses": _responses(200, _ref(kind.kind))}
        paths[f"{prefix}/{{name}}"] = item
        if kind.namespaced:
            paths[f"{base}/{kind.plural}"] = {"get": {
                "operationId": f"list{kind.kind}AllNamespaces", "responses": _responses(200, list_schema)}}
    for action in objects.VM_ACTIONS:
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
    since_param = {"name": "since", "in": "query", "schema": {"type": "string"},
                   "description": "how far back: a duration (90m, 24h, 7d) or an RFC 3339 time; default 24h"}
    paths["/apis/vmquota.io/v1/projects/{name}/history"] = {"get": {
        "operationId": "readProjectHistory", "parameters": [name_param, since_param],
        "responses": _responses(200, {"type": "object"})}}
    paths["/apis/vmquota.io/v1/namespaces/{namespace}/resourcequotas/{name}/history"] = {"get": {
        "operationId": "readResourceQuotaHistory", "parameters": [ns_param, name_param, since_param],
        "responses": _responses(200, {"type": "object"})}}
    paths["/openapi.json"] = {"get": {"operationId": "openapi", "responses": {
        "200": {"description": "this document", "content": {"application/json": {}}}}}}
    paths["/healthz"] = {"get": {"operationId": "health", "responses": {"200": {"description": "serving",
                                                                                "content": {"text/plain": {}}}}}}
    return {"openapi": "3.0.3", "info": {"title": "vmquota", "version": "1"}, "paths": paths,
            "components": {"schemas": schemas}}
