"""The handlers behind the filters: fixed paths, and Kubernetes' verbs on the served kinds.

`NON_RESOURCE` maps fixed paths (health, metrics, version, discovery, OpenAPI, the dashboard) to their handler.
Every other path is routed (`routing.py`) to a kind, and its verb runs one `Api` call: list, get, create, update,
patch, delete, and the subresources (a VM's start, stop and restart; vmquota's charge and usage views).

Here a request's options become the call's arguments: `dryRun`, `fieldManager` (else the User-Agent), `force`,
the patch type (`patch.py`) and the body's media type (JSON, YAML, or protobuf: `protobuf.py`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmquota import errors, fieldmanager, objects, schema
from vmquota.api import Api
from vmquota.apiserver import (
    bodies,
    dashboard,
    discovery,
    metrics,
    openapi,
    openapi_pb,
    paging,
    patch,
    protobuf,
    selectors,
    tables,
    upload,
    watch,
)
from vmquota.apiserver.request import Request, Response
from vmquota.apiserver.routing import Route, route
from vmquota.store import Where

NonResourceHandler = Callable[[Api, Request], Response]


def _healthz(api: Api, request: Request) -> Response:
    return Response(200, b"ok", "text/plain")


def _metrics(api: Api, request: Request) -> Response:
    return Response(200, metrics.scrape(api.store), metrics.CONTENT_TYPE)


def _fixed(body: bytes, content_type: str = "application/json") -> NonResourceHandler:
    return lambda api, request: Response(200, body, content_type)


def _discovery(legacy: bytes, aggregated: bytes) -> NonResourceHandler:
    """`/api` or `/apis`: aggregated discovery when the Accept header asks for it first, else the legacy list.
    Caches must keep the two apart (Vary)."""
    def handle(api: Api, request: Request) -> Response:
        if discovery.wants_aggregated(request.accept):
            return Response(200, aggregated, discovery.AGGREGATED_V2, {"Vary": "Accept"})
        return Response(200, legacy, headers={"Vary": "Accept"})
    return handle


def _openapi_v2(api: Api, request: Request) -> Response:
    """Swagger 2.0 in gnostic's protobuf when the Accept header asks for it (client-go always does), else JSON."""
    accept, etag = request.accept, {"Etag": f'"{openapi.V2.hash}"', "Vary": "Accept"}
    if openapi_pb.ACCEPT in accept:
        return Response(200, openapi.V2_PROTOBUF, openapi_pb.CONTENT_TYPE, etag)
    if accept and not any(t in accept for t in ("application/json", "*/*")):
        raise errors.NotAcceptable(f"/openapi/v2 is served as application/json or {openapi_pb.ACCEPT}, "
                                   f"not {accept[:100]}")
    return Response(200, openapi.V2.body, headers=etag)


def _openapi_v3(served: openapi.Served) -> NonResourceHandler:
    # The index names each document by its hash: a client may cache that URL for good.
    return lambda api, request: Response(200, served.body, headers={
        "Etag": f'"{served.hash}"', "Cache-Control": "public, immutable" if request.param("hash") else "no-cache"})


def _non_resource() -> dict[str, NonResourceHandler]:
    paths: dict[str, NonResourceHandler] = {
        "/healthz": _healthz,
        "/metrics": _metrics,
        "/openapi.json": _fixed(json.dumps(openapi.document()).encode()),
        "/version": _fixed(discovery.encoded(discovery.version_info())),
        "/api": _discovery(discovery.encoded(discovery.api_versions()),
                           discovery.encoded(discovery.aggregated(core=True))),
        "/apis": _discovery(discovery.encoded(discovery.api_group_list()),
                            discovery.encoded(discovery.aggregated(core=False))),
        "/openapi/v2": _openapi_v2,
        "/openapi/v3": _fixed(openapi.V3_INDEX.body),
    }
    for group, version in discovery.GROUP_VERSIONS:
        resources = discovery.api_resource_list(group, version)
        assert resources is not None
        paths[f"/apis/{group}/{version}" if group else f"/api/{version}"] = _fixed(discovery.encoded(resources))
        if group:
            paths[f"/apis/{group}"] = _fixed(discovery.encoded(discovery.api_group(group) or {}))
    for key, served in openapi.V3.items():
        paths[f"/openapi/v3/{key}"] = _openapi_v3(served)
    paths.update(dict.fromkeys(dashboard.PATHS, dashboard.serve))
    return paths


NON_RESOURCE: dict[str, NonResourceHandler] = _non_resource()


class Handlers:
    """The innermost handler of the chain, for one `Api`."""

    def __init__(self, api: Api, feed: watch.Feed) -> None:
        self.api = api
        self.feed = feed  # this process's follower of the change log, for watches

    def __call__(self, request: Request) -> Response:
        # Kubernetes serves its fixed paths with a trailing slash too (the official Python client asks /version/).
        fixed = NON_RESOURCE.get(request.path) or NON_RESOURCE.get(request.path.rstrip("/") or "/")
        if fixed is not None:
            if request.method != "GET":
                raise errors.MethodNotAllowed(f"only GET is supported on {request.path}")
            return fixed(self.api, request)
        request = watch.legacy(request)
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
            dry_run = _dry_run(request, "CreateOptions")
            return Response.json(201, self.api.create(kind, ns or "", _object_body(request, kind), dry_run=dry_run,
                                                      manager=_manager(request), warnings=request.warnings))
        raise errors.MethodNotAllowed(f"{request.method} is not supported on a list")

    def _item(self, request: Request, target: Route) -> Response:
        kind, namespace, name = target.kind, target.namespace or "", target.name
        assert kind is not None and name is not None
        if request.method == "GET":
            return self._get(request, kind, namespace, name)
        if request.method == "PUT":
            dry_run = _dry_run(request, "UpdateOptions")
            return Response.json(200, self.api.replace(kind, namespace, name, _object_body(request, kind),
                                                       dry_run=dry_run, manager=_manager(request),
                                                       warnings=request.warnings))
        if request.method == "PATCH":
            return self._patch(request, kind, namespace, name)
        if request.method == "DELETE":
            options = _body(request)
            dry_run = _dry_run(request, "DeleteOptions", options)
            return Response.json(200, self.api.delete(kind, namespace, name, dry_run=dry_run))
        raise errors.MethodNotAllowed(f"{request.method} is not supported here")

    def _list(self, request: Request, kind: objects.Kind, namespace: str | None) -> Response:
        """A list or a watch: selected by labelSelector and fieldSelector, as the List (or its events), a Table
        or a PartialObjectMetadataList, as the Accept header asks; paged with limit and continue."""
        selection = selectors.parse(kind, request.param("labelSelector"), request.param("fieldSelector"))
        if request.visible_namespaces is not None:
            selection = Visible(selection.labels, selection.fields, kind=kind, visible=request.visible_namespaces)
        target = tables.target(request.accept, listing=True)
        if request.flag("watch"):
            return self._watch(request, kind, namespace, selection, target)
        version = paging.list_version(request, watch.parse_resource_version)
        if version.exact is not None or request.param("limit") or request.param("continue"):
            return self._page(request, kind, namespace, selection, target, exact=version.exact)
        paging.check_not_older_than(self.api.store, version)
        keep = selection.matches if selection.needs_matching else None
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
        rv, parts = self.api.list_parts(kind, namespace, tables.store_parts(kind, options), where=selection.where)
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

    def _watch(self, request: Request, kind: objects.Kind, namespace: str | None, selection: selectors.Selection,
               target: tables.Target | None) -> Response:
        """A watch; with a Table asked for, each event's object is a one-row Table, its columns in the first
        one only (`kubectl get -w`)."""
        render: watch.Render | None = None
        if target is not None and target.kind == tables.TABLE:
            render = tables.event_renderer(kind, tables.options(request.param("includeObject"), target.version))
        elif target is not None:
            version = target.version
            render = lambda obj: tables.partial(obj, tables.Target(tables.PARTIAL, version))  # noqa: E731
        opts = watch.options(request, namespace, predicate=None if selection.empty else selection, render=render,
                             fields=(selection.exact("metadata.name"), selection.exact("metadata.namespace")))
        return watch.serve(self.feed, self.api.store, kind, opts)

    def _page(self, request: Request, kind: objects.Kind, namespace: str | None, selection: selectors.Selection,
              target: tables.Target | None, *, exact: int | None = None) -> Response:
        """One page of a consistent list (`kubectl get` asks for pages of 500), or the whole list as it was at
        the `exact` resourceVersion, in the form asked for."""
        page = paging.read_page(self.api.store, kind, namespace, paging.options(request),
                                predicate=None if selection.empty else selection, exact=exact)
        if target is None:
            return Response.json(200, paging.list_json(kind, page))
        if target.kind == tables.PARTIAL_LIST:
            metadata = [row[0] for row in self.api.parts_of(page.items, [tables.METADATA])]
            return Response(200, tables.partial_list(metadata, target, resource_version=page.resource_version,
                                                     continue_token=page.continue_token,
                                                     remaining=page.remaining), tables.CONTENT_TYPE)
        options = tables.options(request.param("includeObject"), target.version)
        rows = tables.rows_of_values(kind, self.api.parts_of(page.items, tables.store_parts(kind, options)), options)
        return Response(200, tables.table(kind, rows, options, resource_version=page.resource_version,
                                          continue_token=page.continue_token, remaining=page.remaining),
                        tables.CONTENT_TYPE)

    def _patch(self, request: Request, kind: objects.Kind, namespace: str, name: str) -> Response:
        media = patch.patch_type(kind, request.content_type)
        dry_run = _dry_run(request, "PatchOptions")
        manager = request.param("fieldManager")
        if media == patch.APPLY_PATCH:
            written = self.api.apply(kind, namespace, name, _checked_body(request, kind),
                                     manager=manager or "", force=request.flag("force"), dry_run=dry_run,
                                     warnings=request.warnings)
            return Response.json(201 if written.created else 200, written.obj)
        if request.param("force") is not None:
            raise errors.Invalid('PatchOptions.meta.k8s.io "" is invalid: force: Forbidden: may not be specified '
                                 "for non-apply patch")
        if media in (patch.MERGE_PATCH, patch.STRATEGIC_MERGE_PATCH):
            _checked_body(request, kind, merge_patch=True)  # fieldValidation on the fields the patch sends
        change = patch.change(kind, media, request.body)
        return Response.json(200, self.api.update_with(kind, namespace, name, change, dry_run=dry_run,
                                                       manager=_manager(request), warnings=request.warnings))

    def _subresource(self, request: Request, target: Route) -> Response:
        ns, name, sub = target.namespace, target.name, target.subresource
        if sub == "charges":
            _only(request, "GET")
            if name is not None:
                return Response.json(200, self.api.charge(ns or "", name))
            charges = self.api.charges(ns)
            if request.visible_namespaces is not None:  # a tenant's view across namespaces: only its own
                charges["items"] = [c for c in charges["items"] if c["namespace"] in request.visible_namespaces]
            return Response.json(200, charges)
        if sub == "usage":
            _only(request, "GET")
            return Response.json(200, _masked(self.api.project_usage(name or ""), request.visible_namespaces))
        if sub == "token":
            _only(request, "POST")
            return Response.json(201, self.api.create_token(ns or "", name or "", typed_body(request)))
        if sub == "upload":
            assert ns is not None and name is not None
            return upload.handle(self.api, request, ns, name, dry_run=_dry_run(request, "UploadOptions"))
        if sub == "history":
            _only(request, "GET")
            assert target.kind is not None and name is not None
            return Response.json(200, self.api.usage_history(target.kind, ns or "", name, request.param("since")))
        assert sub in (*objects.VM_ACTIONS, *objects.VMI_ACTIONS) and ns is not None and name is not None
        _only(request, "PUT")
        if sub in objects.VMI_ACTIONS:
            self.api.guest_action(ns, name, sub)
            return Response.success(202)
        body = _body(request)
        # KubeVirt's start, stop and restart options carry dryRun in the body; the query is taken too.
        dry_run = _dry_run(request, f"{sub.capitalize()}Options", body)
        if sub == "start":
            self.api.start(ns, name, dry_run=dry_run)
        elif sub == "stop":
            self.api.stop(ns, name, body, dry_run=dry_run)
        elif sub == "migrate":
            self.api.migrate(ns, name, body, dry_run=dry_run)
        else:
            self.api.restart(ns, name, dry_run=dry_run)
        return Response.success(202)


@dataclass(frozen=True)
class Visible(selectors.Selection):
    """A tenant's view of a list across namespaces (`authorization.py`): what the request's selectors select,
    of the namespaces (or, for a cluster-scoped kind, the names) it may see. SQLite checks it with the rest."""
    kind: objects.Kind = objects.VIRTUAL_MACHINE
    visible: frozenset[str] = frozenset()

    @property
    def _path(self) -> tuple[str, str]:
        return ("metadata", "namespace" if self.kind.namespaced else "name")

    @property
    def empty(self) -> bool:
        return False

    def matches(self, obj: dict[str, Any]) -> bool:
        return (obj.get("metadata") or {}).get(self._path[1]) in self.visible and super().matches(obj)

    __call__ = matches

    @property
    def where(self) -> tuple[Where, ...]:
        return (Where(self._path, "in", tuple(sorted(self.visible))), *super().where)


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


def typed_body(request: Request) -> object:
    """A body that names its own kind (a TokenRequest, a review): JSON, YAML, or protobuf as kubectl sends it."""
    if request.content_type.split(";")[0].strip().lower() == protobuf.MEDIA_TYPE:
        return protobuf.decode(request.body)
    return _body(request)


def _object_body(request: Request, kind: objects.Kind) -> object:
    """A created or replaced object: JSON, YAML, or protobuf for the kinds kubectl sends that way."""
    if request.content_type.split(";")[0].strip().lower() == protobuf.MEDIA_TYPE:
        if not protobuf.takes(kind.api_version, kind.kind):
            raise errors.UnsupportedMediaType(["application/json", "application/yaml"])
        return protobuf.decode(request.body)
    return _checked_body(request, kind)


DRY_RUN_ALL = "All"


def _dry_run(request: Request, options_kind: str, options: object = None) -> bool:
    """Kubernetes' dryRun: absent, or `All`; from the query, or from an options body (DeleteOptions, KubeVirt's
    StartOptions). Any other value is refused as kube-apiserver refuses it, before anything is done."""
    values: list[object] = []
    if request.param("dryRun") is not None:
        values.append(request.param("dryRun"))
    if isinstance(options, dict) and options.get("dryRun") is not None:
        body_values = options["dryRun"]
        values += body_values if isinstance(body_values, list) else [body_values]
    unsupported = [value for value in values if value != DRY_RUN_ALL]
    if unsupported:
        shown = ", ".join(json.dumps(value) for value in unsupported)
        raise errors.Invalid(f'{options_kind}.meta.k8s.io "" is invalid: dryRun: Unsupported value: '
                             f'[]string{{{shown}}}: supported values: "{DRY_RUN_ALL}"')
    return bool(values)


def _manager(request: Request) -> str:
    """Who makes this write, for managedFields: `fieldManager`, else the User-Agent as Kubernetes reads it."""
    manager = request.param("fieldManager")
    if manager is None:
        return fieldmanager.manager_from_user_agent(request.headers.get("User-Agent")) or "unknown"
    fieldmanager.check_manager(manager)
    return manager


def _checked_body(request: Request, kind: objects.Kind, *, merge_patch: bool = False) -> object:
    """The body of a write, after `fieldValidation` (Strict, Warn or Ignore) has looked at its fields. A merge
    patch has the object's own shape, so the fields it sends are checked the same way (a JSON patch, a list of
    operations, is not); fields already stored are not the request's doing."""
    body = _body(request)
    if isinstance(body, dict):
        schema.check_fields(kind, body, request.param("fieldValidation"), request.warnings, raw=request.body,
                            content_type=request.content_type,
                            merge_patch=merge_patch and "apply-patch" not in request.content_type)
    return body
