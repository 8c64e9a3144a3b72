"""The chain every request passes before a handler, in the spirit of k8s.io/apiserver's filters.

Each filter is a function of the request and the rest of the chain: it answers itself (with a Status) or
passes the request on. Audit, authentication, per-user limits and authorization (`security.py` builds them for
each server) stand here, in that order, before the handlers, so that no handler checks permissions by itself
and none can forget to. Around them the chain measures each request (`apiserver_request_duration_seconds`, as
kube-apiserver names it) and turns errors into Kubernetes Status objects, never letting a traceback reach a
client; inside them it gives code below the handlers a recorder for warnings to the client (`vmquota.warning`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from vmquota import errors, telemetry, warning
from vmquota.apiserver import routing
from vmquota.apiserver.request import Request, Response, status

log = logging.getLogger(__name__)

Handler = Callable[[Request], Response]
Filter = Callable[[Request, Handler], Response]


def chain(handler: Handler, filters: Sequence[Filter]) -> Handler:
    """`handler` behind `filters`, the first of them outermost."""
    for outer in reversed(filters):
        handler = _bind(outer, handler)
    return handler


def _bind(outer: Filter, inner: Handler) -> Handler:
    return lambda request: outer(request, inner)


def errors_as_status(request: Request, handler: Handler) -> Response:
    """Refusals become their Status; anything unexpected is logged and becomes a bare 500."""
    try:
        return handler(request)
    except errors.ApiError as e:
        return Response.json(e.code, e.status())
    except errors.HypervisorUnavailable as e:
        return Response.json(503, status(503, "ServiceUnavailable", str(e)))
    except Exception:
        log.exception("%s %s", request.method, request.path)
        return Response.json(500, status(500, "InternalError", "internal error; see the server log"))


def record_warnings(request: Request, handler: Handler) -> Response:
    """Whatever warns the client below here (admission's warning threshold, audit mode) reaches its header."""
    with warning.recording(request.warnings):
        return handler(request)


_VERBS = {"POST": "POST", "PUT": "PUT", "PATCH": "PATCH", "DELETE": "DELETE"}


def _labels(request: Request) -> tuple[str, str, str, str, str]:
    """(verb, group, resource, subresource, scope) as kube-apiserver labels its request metrics; paths that name
    no resource (discovery, /metrics) have an empty resource, so their labels stay few."""
    try:
        target = routing.route(request.path)
    except errors.ApiError:
        return request.method, "", "", "", ""
    kind = target.kind
    if request.method == "GET":
        verb = "WATCH" if request.query.get("watch") in ("true", "1") else "LIST" if target.name is None else "GET"
    else:
        verb = _VERBS.get(request.method, request.method)
    scope = "resource" if target.name is not None else "namespace" if target.namespace is not None else "cluster"
    return (verb, kind.group if kind else "vmquota.io", kind.plural if kind else "", target.subresource or "",
            scope)


def measure(request: Request, handler: Handler) -> Response:
    """Time every request and count it by its answer's code."""
    started = time.perf_counter()
    response = handler(request)
    verb, group, resource, subresource, scope = _labels(request)
    telemetry.REQUEST_SECONDS.labels(verb, group, resource, subresource, scope).observe(time.perf_counter() - started)
    telemetry.REQUESTS.labels(verb, group, resource, subresource, scope, str(response.code)).inc()
    return response


FILTERS: tuple[Filter, ...] = (measure, errors_as_status, record_warnings)


def with_security(security_filters: Sequence[Filter]) -> tuple[Filter, ...]:
    """The chain with a server's security filters (`security.py`: audit, authentication, limits,
    authorization, self reviews) right inside the error filter, before any other."""
    chained: list[Filter] = []
    for f in FILTERS:
        chained.append(f)
        if f is errors_as_status:
            chained.extend(security_filters)
    return tuple(chained)
