"""`GET /` and `GET /ui/...`: the web dashboard's page and its files (`vmquota/dashboard/static/`).

Top layer, beside the handlers. The files are read once at import into a fixed table of paths, so no part of a
request's path ever reaches the file system. They hold no data: the page fetches everything from the API with
the browser user's own credentials (a bearer token it keeps in sessionStorage, or the browser's client
certificate), so authentication lets anyone load them (`PATHS` are public, as /healthz is) and every number the
page shows passes the same authorization as kubectl's requests.

Every answer carries a Content-Security-Policy that allows scripts, styles and connections to this origin only
and no inline script, so nothing loads from elsewhere and injected markup cannot run.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from vmquota.api import Api
from vmquota.apiserver.request import Request, Response

CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png"}
# Served path -> file under static/. Adding a file to the page adds a line here.
_FILES = {
    "/": "index.html",
    "/ui/app.js": "app.js",
    "/ui/quantity.js": "quantity.js",
    "/ui/app.css": "app.css",
    "/ui/vendor/uPlot.iife.min.js": "vendor/uPlot.iife.min.js",
    "/ui/vendor/uPlot.min.css": "vendor/uPlot.min.css",
}
PATHS = frozenset(_FILES)


def _headers(body: bytes) -> dict[str, str]:
    return {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        # Revalidated on every load (an upgrade changes the files), but a 304 saves sending them again.
        "Cache-Control": "no-cache",
        "ETag": f'"{hashlib.sha256(body).hexdigest()[:32]}"',
    }


def _load() -> dict[str, Response]:
    static = resources.files("vmquota.dashboard") / "static"
    served: dict[str, Response] = {}
    for path, name in _FILES.items():
        body = (static / name).read_bytes()
        served[path] = Response(200, body, _TYPES[name[name.rindex("."):]], _headers(body))
    return served


_SERVED = _load()


def serve(api: Api, request: Request) -> Response:
    """One of the dashboard's files, or 304 when the browser holds it already."""
    found = _SERVED.get(request.path) or _SERVED[request.path.rstrip("/") or "/"]
    if request.headers.get("If-None-Match") == found.headers["ETag"]:
        return Response(304, b"", found.content_type, found.headers)
    return found
