"""The handlers behind the filters: fixed paths, and Kubernetes' verbs on the served kinds.

`NON_RESOURCE` maps fixed paths (health, version, discovery, OpenAPI) to their handler. Every other path is
routed (`routing.py`) to a kind, and its verb runs one `Api` call: list, get, create, update, patch, delete,
and the subresources (a VM's start, stop and restart; vmquota's charge and usage views).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from vmquota import errors, objects
from vmquota.api import Api
from vmquota.apiserver import bodies, openapi_legacy
from vmquota.apiserver.request import Request, Response
from vmquota.apiserver.routing import Route, route

NonResourceHandler = Callable[[Api, Request], Response]


def _healthz(api: Api, request: Request) -> Response:
    return Response(200, b"ok", "text/plain")


_OPENAPI_JSON = json.dumps(openapi_legacy.document()).encode()


def _openapi_json(api: Api, request: Request) -> Response:
    return Response(200, _OPENAPI_JSON)


NON_RESOURCE: dict[str, NonResourceHandler] = {
    "/healthz": _healthz,
    "/openapi.json": _openapi_json,
}


class Handlers:
    """The innermost handler of the chain, for one `Api`."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def __call__(self, request: Request) -> Response:
        fixed = NON_RESOURCE.get(request.path)
        if fixed is not None:
            if request.method != "GET":
                raise errors.MethodNotAllowed(f"only GET is supported on {request.path}")
            return fixed(self.api, request)
        target = route(request.path)
        if target.subresource is not None:
            return self._subresource(request, target)
        assert target.kind is not None
        if not target.kind.writable and request.method != "GET":
            # Refused before the body is read: an event's dotted name would otherwise fail validation first.
            raise errors.MethodNotAllowed(f"{target.kind.plural} are written by vmquota only")
        if target.name is None:
            return self._collection(request, target)
        return self._item(request, target)

    def _collection(self, request: Request, target: Route) -> Response:
        kind, ns = target.kind, target.namespace
        assert kind is not None
        if request.method == "GET":
            return Response.json(200, self.api.list_json(kind, ns, only=request.visible_namespaces))
        if request.method == "POST":
            if kind.namespaced and ns is None:
                raise errors.MethodNotAllowed("create namespaced objects under /namespaces/{namespace}/")
            return Response.json(201, self.api.create(kind, ns or "", _body(request)))
        raise errors.MethodNotAllowed(f"{request.method} is not supported on a list")

    def _item(self, request: Request, target: Route) -> Response:
        kind, namespace, name = target.kind, target.namespace or "", target.name
        assert kind is not None and name is not None
        if request.method == "GET":
            return Response.json(200, self.api.get(kind, namespace, name))
        if request.method == "PUT":
            return Response.json(200, self.api.replace(kind, namespace, name, _body(request)))
        if request.method == "PATCH":
            return Response.json(200, self.api.patch(kind, namespace, name, _body(request)))
        if request.method == "DELETE":
            return Response.json(200, self.api.delete(kind, namespace, name))
        raise errors.MethodNotAllowed(f"{request.method} is not supported here")

    def _subresource(self, request: Request, target: Route) -> Response:
        ns, name, sub = target.namespace, target.name, target.subresource
        if sub == "charges":
            _only(request, "GET")
            if name is not None:
                return Response.json(200, self.api.charge(ns or "", name))
            return Response.json(200, self.api.charges(ns))
        if sub == "usage":
            _only(request, "GET")
            return Response.json(200, _masked(self.api.project_usage(name or ""), request.visible_namespaces))
        if sub == "token":
            _only(request, "POST")
            return Response.json(201, self.api.create_token(ns or "", name or "", _body(request)))
        assert sub in objects.VM_ACTIONS and ns is not None and name is not None
        _only(request, "PUT")
        if sub == "start":
            self.api.start(ns, name)
        elif sub == "stop":
            self.api.stop(ns, name, _body(request))
        else:
            self.api.restart(ns, name)
        return Response.success(202)


def _masked(usage: dict[str, Any], visible: frozenset[str] | None) -> dict[str, Any]:
    """A project's usage for a member: every namespace's total, but only the VMs of the namespaces it may see."""
    if visible is None:
        return usage
    for entry in usage.get("namespaces", []):
        if entry.get("namespace") not in visible:
            entry["virtualMachines"] = []
    return usage


def _only(request: Request, allowed: str) -> None:
    if request.method != allowed:
        raise errors.MethodNotAllowed(f"only {allowed} is supported here")


def _body(request: Request) -> object:
    return bodies.parse_body(request.body, request.content_type)
