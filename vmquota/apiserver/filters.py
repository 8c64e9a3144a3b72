"""The chain every request passes before a handler, in the spirit of k8s.io/apiserver's filters.

Each filter is a function of the request and the rest of the chain: it answers itself (with a Status) or
passes the request on. Audit, authentication, per-user limits and authorization (`security.py` builds them for
each server) stand here, in that order, before the handlers, so that no handler checks permissions by itself
and none can forget to. The outermost filter turns errors into Kubernetes Status objects and never lets a
traceback reach a client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from vmquota import errors
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


FILTERS: tuple[Filter, ...] = (errors_as_status,)


def with_security(security_filters: Sequence[Filter]) -> tuple[Filter, ...]:
    """The chain with a server's security filters (`security.py`: audit, authentication, limits,
    authorization, self reviews) right inside the error filter, before any other."""
    rest = tuple(f for f in FILTERS if f is not errors_as_status)
    return (errors_as_status, *security_filters, *rest)
