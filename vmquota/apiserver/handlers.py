"""The handlers behind the filters: fixed paths, and Kubernetes' verbs on the served kinds.

`NON_RESOURCE` maps fixed paths (health, version, discovery, OpenAPI) to their handler. Every other path is
routed (`routing.py`) to a kind, and its verb runs one `Api` call: list, get, create, update, patch, delete,
and the subresources (a VM's start, stop and restart; vmquota's charge and usage views).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from vmquota import errors, objects
from vmquota.api import Api, PartsCache
from vmquota.apiserver import bodies, openapi_legacy, selectors, tables
from vmquota.apiserver.request import Request, Response
from vmquota.apiserver.routing import Route, route

NonResourceHandler = Callable[[Api, Request], Response]
TABLE_CACHE_OBJECTS = 20_000


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
        # What Tables need of each object version this process has listed: a repeated `kubectl get` of
        # 10,000 VMs then parses no body (about 600 bytes an object).
        self.table_parts = PartsCache(TABLE_CACHE_OBJECTS)

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
            return self._list(request, kind, ns)
        if request.method == "POST":
            if kind.namespaced and ns is None:
                raise errors.MethodNotAllowed("create namespaced objects under /namespaces/{namespace}/")
            return Response.json(201, self.api.create(kind, ns or "", _body(request)))
        raise errors.MethodNotAllowed(f"{request.method} is not supported on a list")

    def _item(self, request: Request, target: Route) -> Response:
        kind, namespace, name = target.kind, target.namespace or "", target.name
        assert kind is not None and name is not None
        if request.method == "GET":
            return self._get(request, kind, namespace, name)
        if request.method == "PUT":
            return Response.json(200, self.api.replace(kind, namespace, name, _body(request)))
        if request.method == "PATCH":
            return Response.json(200, self.api.patch(kind, namespace, name, _body(request)))
        if request.method == "DELETE":
            return Response.json(200, self.api.delete(kind, namespace, name))
        raise errors.MethodNotAllowed(f"{request.method} is not supported here")

    def _list(self, request: Request, kind: objects.Kind, namespace: str | None) -> Response:
        """A list: selected by labelSelector and fieldSelector, as the List, a Table or a
        PartialObjectMetadataList, as the Accept header asks."""
        selection = selectors.parse(kind, request.param("labelSelector"), request.param("fieldSelector"))
        keep = selection.matches if selection.needs_matching else None
        target = tables.target(request.accept, listing=True)
        if target is None:
            return Response.json(200, self.api.list_json(kind, namespace, where=selection.where, keep=keep))
        if target.kind == tables.PARTIAL_LIST:
            if keep is not None:
                rv, found = self.api.list_objects(kind, namespace, where=selection.where, keep=keep)
                metadata = [json.dumps(objects.meta(obj)) for obj in found]
            else:
                rv, parts = self.api.list_parts(kind, namespace, [tables.METADATA], where=selection.where)
                metadata = [part[0] for part in parts]
            return Response(200, tables.partial_list(metadata, target, resource_version=rv), tables.CONTENT_TYPE)
        options = tables.options(request.param("includeObject"), target.version)
        if keep is not None:
            rv, found = self.api.list_objects(kind, namespace, where=selection.where, keep=keep)
            return Response(200, tables.to_table(kind, found, options, resource_version=rv), tables.CONTENT_TYPE)
        rv, parts = self.api.list_parts(kind, namespace, tables.store_parts(kind, options), where=selection.where,
                                        cache=self.table_parts)
        rows = tables.rows_of_values(kind, parts, options)
        return Response(200, tables.table(kind, rows, options, resource_version=rv), tables.CONTENT_TYPE)

    def _get(self, request: Request, kind: objects.Kind, namespace: str, name: str) -> Response:
        """One object, or its Table (`kubectl get vm web-1`) or PartialObjectMetadata."""
        target = tables.target(request.accept, listing=False)
        obj = self.api.get(kind, namespace, name)
        if target is None:
            return Response.json(200, obj)
        if target.kind == tables.PARTIAL:
            return Response.json(200, tables.partial(obj, target))
        options = tables.options(request.param("includeObject"), target.version)
        rv = str(objects.meta(obj).get("resourceVersion", ""))
        return Response(200, tables.to_table(kind, [obj], options, resource_version=rv), tables.CONTENT_TYPE)

    def _subresource(self, request: Request, target: Route) -> Response:
        ns, name, sub = target.namespace, target.name, target.subresource
        if sub == "charges":
            _only(request, "GET")
            if name is not None:
                return Response.json(200, self.api.charge(ns or "", name))
            return Response.json(200, self.api.charges(ns))
        if sub == "usage":
            _only(request, "GET")
            return Response.json(200, self.api.project_usage(name or ""))
        assert sub in objects.VM_ACTIONS and ns is not None and name is not None
        _only(request, "PUT")
        if sub == "start":
            self.api.start(ns, name)
        elif sub == "stop":
            self.api.stop(ns, name, _body(request))
        else:
            self.api.restart(ns, name)
        return Response.success(202)


def _only(request: Request, allowed: str) -> None:
    if request.method != allowed:
        raise errors.MethodNotAllowed(f"only {allowed} is supported here")


def _body(request: Request) -> object:
    return bodies.parse_body(request.body, request.content_type)
