"""The HTTP server: Kubernetes paths to `Api` calls, JSON (or YAML) in, JSON out, Status on errors.

Top layer. One thread per connection (the standard library's ThreadingHTTPServer,
HTTP/1.1 keep-alive); every handler is short because admission only takes the
store's write lock for one small transaction. Nothing but `Status` objects leaves
on an error: no traceback ever reaches a client.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import yaml

from vmquota import errors, objects, openapi
from vmquota.api import Api
from vmquota.objects import Kind

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_DISCARD_BYTES = 64 << 20  # beyond this a refused body is not read: the connection is just closed
DISCARD_TIMEOUT = 5.0
MAX_DEPTH = 100  # objects nest about a dozen levels; far deeper bodies only exhaust recursive code
MAX_VALUES = MAX_BODY_BYTES  # more than a JSON body of MAX_BODY_BYTES can hold: only YAML aliases expand past it
_SEGMENT = re.compile(r"^[A-Za-z0-9.\-_]{1,253}$")
_BY_GROUP_PLURAL = {(k.group, k.version, k.plural): k for k in objects.KINDS}
SUBRESOURCES_GROUP = ("subresources.kubevirt.io", "v1")
VMQUOTA_GROUP = ("vmquota.io", "v1")


@dataclass(frozen=True)
class Route:
    kind: Kind | None
    namespace: str | None  # None: all namespaces (lists) or a cluster-scoped kind
    name: str | None
    extra: str | None = None  # start/stop/restart, usage, charges


def route(path: str) -> Route:
    """Map a path to what it names; NotFound for anything else."""
    segments = [s for s in path.split("/") if s]
    for segment in segments:
        if not _SEGMENT.match(segment):
            raise errors.NotFound("the server could not find the requested resource")
    if segments[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", segments[2:]
    elif len(segments) >= 3 and segments[0] == "apis":
        group, version, rest = segments[1], segments[2], segments[3:]
    else:
        raise errors.NotFound("the server could not find the requested resource")

    if (group, version) == SUBRESOURCES_GROUP:
        if len(rest) == 5 and rest[0] == "namespaces" and rest[2] == "virtualmachines" and \
                rest[4] in ("start", "stop", "restart"):
            return Route(objects.VIRTUAL_MACHINE, rest[1], rest[3], rest[4])
        raise errors.NotFound("the server could not find the requested resource")
    if (group, version) == VMQUOTA_GROUP:
        # vmquota's own read-only views: who is charged how much.
        if rest == ["charges"]:
            return Route(None, None, None, "charges")
        if len(rest) in (3, 4) and rest[0] == "namespaces" and rest[2] == "charges":
            return Route(None, rest[1], rest[3] if len(rest) == 4 else None, "charges")
        if len(rest) == 3 and rest[0] == "projects" and rest[2] == "usage":
            return Route(objects.PROJECT, None, rest[1], "usage")

    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and (group, version, rest[2]) in _BY_GROUP_PLURAL:
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 2 or (group, version, rest[0]) not in _BY_GROUP_PLURAL:
        raise errors.NotFound("the server could not find the requested resource")
    kind = _BY_GROUP_PLURAL[(group, version, rest[0])]
    if kind.namespaced and namespace is None and len(rest) == 2:
        raise errors.NotFound("the server could not find the requested resource")
    if not kind.namespaced and namespace is not None:
        raise errors.NotFound("the server could not find the requested resource")
    name = rest[1] if len(rest) == 2 else None
    if name is not None and kind is not objects.EVENT and objects.name_problem(name):
        raise errors.NotFound(f'{kind.resource} "{name[:80]}" not found')
    if namespace is not None and objects.name_problem(namespace):
        raise errors.NotFound(f'namespaces "{namespace}" not found')
    return Route(kind, namespace, name)


def dispatch(api: Api, method: str, target: Route, body: Any) -> tuple[int, Any]:
    kind, ns, name = target.kind, target.namespace, target.name
    if target.extra == "charges":
        _only(method, "GET")
        if name is not None:
            return 200, api.charge(ns or "", name)
        return 200, api.charges(ns)
    if target.extra == "usage":
        _only(method, "GET")
        return 200, api.project_usage(name or "")
    if target.extra in ("start", "stop", "restart"):
        _only(method, "PUT")
        assert ns is not None and name is not None
        if target.extra == "start":
            api.start(ns, name)
        elif target.extra == "stop":
            api.stop(ns, name, body)
        else:
            api.restart(ns, name)
        return 202, None
    assert kind is not None
    if kind is objects.EVENT and method != "GET":
        # Refused before the body is read: an event's dotted name would otherwise fail validation first.
        raise errors.MethodNotAllowed("events are written by vmquota only")
    namespace = ns or ""
    if name is None:
        if method == "GET":
            return 200, api.list_json(kind, ns)
        if method == "POST":
            if kind.namespaced and ns is None:
                raise errors.MethodNotAllowed("create namespaced objects under /namespaces/{namespace}/")
            return 201, api.create(kind, namespace, body)
        raise errors.MethodNotAllowed(f"{method} is not supported on a list")
    if method == "GET":
        return 200, api.get(kind, namespace, name)
    if method == "PUT":
        return 200, api.replace(kind, namespace, name, body)
    if method == "PATCH":
        return 200, api.patch(kind, namespace, name, body)
    if method == "DELETE":
        return 200, api.delete(kind, namespace, name)
    raise errors.MethodNotAllowed(f"{method} is not supported here")


def _only(method: str, allowed: str) -> None:
    if method != allowed:
        raise errors.MethodNotAllowed(f"only {allowed} is supported here")


def parse_body(raw: bytes, content_type: str) -> Any:
    if not raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.BadRequest("the body is not UTF-8") from e
    try:
        if "yaml" in content_type:
            body = yaml.safe_load(text)
        else:
            body = json.loads(text, parse_constant=_not_json)
    except RecursionError as e:
        raise errors.BadRequest("the body is nested too deeply") from e
    except (ValueError, yaml.YAMLError) as e:
        raise errors.BadRequest(f"the body is not valid {'YAML' if 'yaml' in content_type else 'JSON'}: "
                                f"{str(e).splitlines()[0][:200]}") from e
    _check_plain(body)
    return body


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


def _check_plain(body: Any) -> None:
    """Refuse what parsed but is no plain JSON document, before any code relies on it being one: YAML dates,
    binary, sets and non-string keys, NaN and infinities, strings that are not Unicode, nesting deeper than
    MAX_DEPTH, and YAML aliases that expand to more than MAX_VALUES values (a "billion laughs")."""
    stack, count = [(body, 1)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES or depth > MAX_DEPTH:
            raise errors.BadRequest(f"the body holds more than {MAX_VALUES} values" if count > MAX_VALUES
                                    else f"the body is nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise errors.BadRequest(f"object keys must be strings, not {type(key).__name__} "
                                            f"{str(key)[:40]!r}: quote it")
                stack += [(key, depth + 1), (item, depth + 1)]
        elif isinstance(value, list):
            stack += [(item, depth + 1) for item in value]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise errors.BadRequest("strings must be valid Unicode (no lone surrogates)") from e
        elif isinstance(value, float) and not math.isfinite(value):
            raise errors.BadRequest(f"{value} is not a JSON value")
        elif value is not None and not isinstance(value, bool | int | float):
            raise errors.BadRequest(f"the body holds a {type(value).__name__} value, which JSON cannot represent: "
                                    f"quote it")


def make_handler(api: Api) -> type[BaseHTTPRequestHandler]:
    spec_json = json.dumps(openapi.document()).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "vmquota"
        # Headers and body go out in two writes: with Nagle on, the body waits for the client's delayed ACK
        # (40 ms on Linux) on every request.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, code: int, payload: bytes, content_type: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            if self.close_connection:
                self.send_header("Connection", "close")  # so that the client closes too, ending a discard
            self.end_headers()
            self.wfile.write(payload)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """The base class's own errors (unknown method, malformed request line or headers) as a Status
            too, instead of its HTML page."""
            self.close_connection = True
            if code == HTTPStatus.NOT_IMPLEMENTED:  # a method no handler has: the client's error, as in Kubernetes
                code = HTTPStatus.METHOD_NOT_ALLOWED
            status = HTTPStatus(code)
            payload = json.dumps(_status(code, status.name.title().replace("_", ""), message or status.phrase))
            self._send(code, b"" if self.command == "HEAD" else payload.encode())

        def _handle(self, method: str) -> None:
            if "Transfer-Encoding" in self.headers:
                # Bodies are read by Content-Length only: a chunked body left unread would be parsed as the
                # next request on this connection.
                self.close_connection = True
                self._send(411, json.dumps(_status(411, "LengthRequired", "the body must be sent with a "
                                                   "Content-Length, not chunked")).encode())
                self._discard(MAX_DISCARD_BYTES)
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY_BYTES:
                self.close_connection = True
                if length < 0:
                    self._send(400, json.dumps(_status(400, "BadRequest", "the Content-Length is not valid")).encode())
                    return
                self._send(413, json.dumps(_status(413, "RequestEntityTooLarge", f"the body must be at most "
                                                   f"{MAX_BODY_BYTES} bytes, got {length}")).encode())
                self._discard(length)
                return
            raw = self.rfile.read(length) if length else b""
            path = urlsplit(self.path).path
            try:
                if path == "/healthz" and method == "GET":
                    self._send(200, b"ok", "text/plain")
                    return
                if path == "/openapi.json" and method == "GET":
                    self._send(200, spec_json)
                    return
                body = parse_body(raw, self.headers.get("Content-Type", ""))
                code, result = dispatch(api, method, route(path), body)
                if result is None:
                    payload = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Success",
                                          "code": code}).encode()
                else:  # bytes: JSON already (a list, made of its items' stored JSON)
                    payload = result if isinstance(result, bytes) else json.dumps(result).encode()
                self._send(code, payload)
            except errors.ApiError as e:
                self._send(e.code, json.dumps(e.status()).encode())
            except errors.HypervisorUnavailable as e:
                self._send(503, json.dumps(_status(503, "ServiceUnavailable", str(e))).encode())
            except Exception:
                log.exception("%s %s", method, path)
                failure = _status(500, "InternalError", "internal error; see the server log")
                self._send(500, json.dumps(failure).encode())

        def _discard(self, length: int) -> None:
            """Read and drop a refused body: closing with it unread resets the connection, and a client that
            sends its whole body before reading (most do) would see a broken pipe instead of the 413."""
            left = min(length, MAX_DISCARD_BYTES)
            try:
                self.connection.settimeout(DISCARD_TIMEOUT)
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        return
                    left -= len(chunk)
            except OSError:
                pass  # the client gave up or stalled; the connection is closed anyway

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_PUT(self) -> None:
            self._handle("PUT")

        def do_PATCH(self) -> None:
            self._handle("PATCH")

        def do_DELETE(self) -> None:
            self._handle("DELETE")

    return Handler


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def serve(api: Api, host: str, port: int) -> Server:
    """A bound server; the caller runs `serve_forever()` (tests do it on a thread)."""
    return Server((host, port), make_handler(api))


def serve_on(api: Api, listening: socket.socket) -> Server:
    """A server accepting on a socket another process has bound and listens on (`workers.py`)."""
    server = Server(listening.getsockname()[:2], make_handler(api), bind_and_activate=False)
    server.socket.close()
    server.socket = listening
    return server
