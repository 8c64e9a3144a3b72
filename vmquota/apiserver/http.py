"""The wire: HTTP/1.1 requests in, through the filter chain, responses out.

One thread per connection (the standard library's ThreadingHTTPServer, keep-alive). This module knows bytes,
headers and sockets only: it reads a body by its length or in chunks, builds a `Request`, runs the chain
(`filters.py`, then `handlers.py`) and writes the `Response`, streaming an iterator body with chunked transfer
encoding, lending the connection as a `Wire` to a body that writes itself (a watch: `request.Stream`), or handing
it over whole after a 101 (a websocket: `request.Takeover`).
Nothing but `Status` objects leaves on an error.
"""

from __future__ import annotations

import json
import logging
import select
import socket
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from vmquota.api import Api
from vmquota.apiserver import filters, tls, upload, watch
from vmquota.apiserver.bodies import MAX_BODY_BYTES
from vmquota.apiserver.handlers import Handlers
from vmquota.apiserver.request import Request, Response, Stream, Takeover, status
from vmquota.apiserver.security import Security

log = logging.getLogger(__name__)

SMALL_BODY = 64 << 10  # a body up to this size goes out with its headers in one write; a larger one after them
MAX_DISCARD_BYTES = 64 << 20  # beyond this a refused body is not read: the connection is just closed
DISCARD_TIMEOUT = 5.0
MAX_CHUNK_LINE = 4096  # a chunk's size line with its extensions, or one trailer line
MAX_TRAILERS = 64
UPLOAD_STALL_SECONDS = 60.0  # an upload whose client sends nothing for this long ends there


def make_handler(api: Api, feed: watch.Feed, security: Security | None = None) -> type[BaseHTTPRequestHandler]:
    chain = filters.with_security(security.filters) if security is not None else filters.FILTERS
    serve_request = filters.chain(Handlers(api, feed), chain)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "vmquota"
        # Headers and body go out in two writes: with Nagle on, the body waits for the client's delayed ACK
        # (40 ms on Linux) on every request.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, response: Response) -> None:
            if isinstance(response.body, Takeover):
                self._take_over(response, response.body)
                return
            self.send_response(response.code)
            self.send_header("Content-Type", response.content_type)
            for name, value in response.headers.items():
                self.send_header(name, value)
            if isinstance(response.body, bytes):
                self.send_header("Content-Length", str(len(response.body)))
                if self.close_connection:
                    self.send_header("Connection", "close")  # so that the client closes too, ending a discard
                self._write_with_headers(response.body)
            else:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if isinstance(response.body, Stream):
                    self._run(response.body)
                else:
                    self._stream(response.body)

        def _take_over(self, response: Response, takeover: Takeover) -> None:
            """Switch protocols (a websocket): the headers, then the connection is the takeover's until it ends.
            Nothing the client sent after the request can be in `rfile`'s buffer: a websocket client waits for
            the 101 before it sends a frame."""
            self.close_connection = True
            try:
                self.send_response(response.code)
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.end_headers()
            except OSError:
                takeover.abandon()
                return
            takeover.run(self.connection)

        def _write_with_headers(self, body: bytes) -> None:
            """The header block and a small body in one write (end_headers' own steps): one send, and over TLS
            one record and one pyOpenSSL call fewer, each of which lets go of the interpreter lock and must take
            it back among every connection's thread."""
            if len(body) > SMALL_BODY or self.request_version == "HTTP/0.9":
                self.end_headers()
                self.wfile.write(body)
                return
            headers: list[bytes] = vars(self)["_headers_buffer"]  # http.server's own, as end_headers uses it
            headers.append(b"\r\n")
            self.wfile.write(b"".join(headers) + body)
            headers.clear()

        def _run(self, stream: Stream) -> None:
            wire = _Wire(self.connection)
            try:
                if stream.run(wire):
                    wire.send(b"0\r\n\r\n")
                    return
            except OSError:
                pass  # the client went away mid-stream
            self.close_connection = True

        def _stream(self, chunks: Iterator[bytes]) -> None:
            try:
                for chunk in chunks:
                    if chunk:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    elif self._client_gone():  # an empty chunk: the stream is idle, a moment to look
                        self.close_connection = True
                        return
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                self.close_connection = True  # the client went away mid-stream
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()  # a generator's own clean-up (a watcher unsubscribes) runs now, not at collection

        def _client_gone(self) -> bool:
            return _client_gone(self.connection)

        def _fail(self, code: int, reason: str, message: str) -> None:
            self._send(Response.json(code, status(code, reason, message)))

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """The base class's own errors (unknown method, malformed request line or headers) as a Status
            too, instead of its HTML page."""
            self.close_connection = True
            if code == HTTPStatus.NOT_IMPLEMENTED:  # a method no handler has: the client's error, as in Kubernetes
                code = HTTPStatus.METHOD_NOT_ALLOWED
            phrase = HTTPStatus(code)
            payload = json.dumps(status(code, phrase.name.title().replace("_", ""), message or phrase.phrase))
            self._send(Response(code, b"" if self.command == "HEAD" else payload.encode()))

        def _read_body(self) -> bytes | None:
            """The body, or None when a refusal has been sent already."""
            if "Transfer-Encoding" in self.headers:
                return self._read_chunked()
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                self.close_connection = True
                self._fail(400, "BadRequest", "the Content-Length is not valid")
                return None
            if length > MAX_BODY_BYTES:
                self.close_connection = True
                self._fail(413, "RequestEntityTooLarge", f"the body must be at most {MAX_BODY_BYTES} bytes, "
                                                         f"got {length}")
                self._discard(length)
                return None
            return self.rfile.read(length) if length else b""

        def _read_chunked(self) -> bytes | None:
            """A `Transfer-Encoding: chunked` body (`kubectl replace --raw` sends one), held to the limit of a
            Content-Length body. Whatever cannot be read to its end closes the connection after the refusal:
            its rest would otherwise be parsed as the next request."""
            refusal = self._chunked_problem()
            if refusal is not None:
                self.close_connection = True
                self._fail(*refusal)
                self._discard(MAX_DISCARD_BYTES)
                return None
            body = bytearray()
            while True:
                size = self._chunk_size()
                if size is None:
                    self._malformed_chunks()
                    return None
                if size == 0:
                    break
                if len(body) + size > MAX_BODY_BYTES:
                    self.close_connection = True
                    self._fail(413, "RequestEntityTooLarge", f"the body must be at most {MAX_BODY_BYTES} bytes")
                    self._discard(MAX_DISCARD_BYTES)
                    return None
                chunk = self.rfile.read(size)
                if len(chunk) != size or self.rfile.read(2) != b"\r\n":
                    self._malformed_chunks()
                    return None
                body += chunk
            for _ in range(MAX_TRAILERS + 1):  # trailers, ignored, up to the blank line
                line = self.rfile.readline(MAX_CHUNK_LINE + 1)
                if line in (b"\r\n", b"\n"):
                    return bytes(body)
                if not line.endswith(b"\n"):
                    break
            self._malformed_chunks()
            return None

        def _chunked_problem(self) -> tuple[int, str, str] | None:
            encoding = (self.headers.get("Transfer-Encoding") or "").strip().lower()
            if encoding != "chunked":
                return 400, "BadRequest", f"transfer encoding {encoding[:40]!r} is not supported: send chunked"
            if "Content-Length" in self.headers:  # two lengths: a request smuggling trick, not a client's mistake
                return 400, "BadRequest", "a body cannot have both a Content-Length and a Transfer-Encoding"
            return None

        def _chunk_size(self) -> int | None:
            line = self.rfile.readline(MAX_CHUNK_LINE + 1)
            if not line.endswith(b"\n"):
                return None
            digits = line.split(b";")[0].strip()
            if not digits or len(digits) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in digits):
                return None
            return int(digits, 16)

        def _malformed_chunks(self) -> None:
            self.close_connection = True
            self._fail(400, "BadRequest", "the chunked body is malformed")

        def handle_expect_100(self) -> bool:
            """`Expect: 100-continue` on an upload is answered only once the handler reads the body, so that a
            refusal comes before the client sends it; on any other path at once, as the base class does."""
            if upload.streams(self.command, urlsplit(self.path).path):
                self._continue_on_read = True
                return True
            self._continue_on_read = False
            return super().handle_expect_100()

        def _handle(self, method: str) -> None:
            target = urlsplit(self.path)
            if upload.streams(method, target.path):
                self._handle_streamed(method)
                return
            body = self._read_body()
            if body is None:
                return
            self._serve(method, body)

        def _handle_streamed(self, method: str) -> None:
            """An upload: the filters and the handler run with the body still on the connection, so nothing is
            read before the request is authorized and admitted, and the image is never held in memory."""
            if "Transfer-Encoding" in self.headers or "Content-Length" not in self.headers:
                self.close_connection = True
                self._fail(411, "LengthRequired", "an upload needs a Content-Length (and no Transfer-Encoding)")
                self._discard(MAX_DISCARD_BYTES)
                return
            try:
                length = int(self.headers["Content-Length"])
            except ValueError:
                length = -1
            if length < 0:
                self.close_connection = True
                self._fail(400, "BadRequest", "the Content-Length is not valid")
                return
            waiting = getattr(self, "_continue_on_read", False)
            self._continue_on_read = False
            stream = _BodyStream(self.rfile, length, self._send_continue if waiting else None)
            saved = self.connection.gettimeout()
            self.connection.settimeout(UPLOAD_STALL_SECONDS)  # a stalled client must not hold the volume's lock
            try:
                self._serve(method, b"", stream)
            finally:
                self.connection.settimeout(saved)
            if stream.cut_short:
                self.close_connection = True
            elif stream.left:
                self.close_connection = True
                if not waiting or stream.continued:  # sent, or being sent: drop it so the client reads the answer
                    self._discard(stream.left)

        def _send_continue(self) -> None:
            self.send_response_only(HTTPStatus.CONTINUE)
            self.end_headers()

        def _serve(self, method: str, body: bytes, stream: _BodyStream | None = None) -> None:
            target = urlsplit(self.path)
            query: dict[str, str] = {}
            for name, value in parse_qsl(target.query, keep_blank_values=True):
                query.setdefault(name, value)  # the first value counts, as in Kubernetes
            request = Request(method, target.path, query, self.headers, body, body_stream=stream,
                              remote_address=str(self.client_address[0]) if self.client_address else "")
            if isinstance(self.connection, tls.TLSSocket):
                request.client_certificate = self.connection.peer_certificate()
                request.client_certificate_trusted = self.connection.verdict.trusted
            response = serve_request(request)
            if request.warnings:
                response.headers["Warning"] = ", ".join(_warning_value(w) for w in request.warnings)
            self._send(response)

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


class _BodyStream:
    """The rest of a request body on the connection, `length` bytes and not one more (`request.BodyStream`)."""

    def __init__(self, rfile: Any, length: int, send_continue: Callable[[], None] | None = None) -> None:
        self._rfile = rfile
        self.length = length
        self.left = length
        self._send_continue = send_continue  # the client waits for `100 Continue` before it sends the body
        self.continued = False
        self.cut_short = False  # the client hung up or stalled before the end: the connection cannot go on

    def read(self, size: int = -1, /) -> bytes:
        if self._send_continue is not None and not self.continued:
            self.continued = True
            self._send_continue()
        size = self.left if size < 0 else min(size, self.left)
        try:
            data = self._rfile.read(size) if size else b""
        except TimeoutError:  # stalled: the body ends here, as if cut short (the upload says after how many bytes)
            data = b""
        if size and not data:
            self.cut_short, self.left = True, 0  # nothing more to drop: it will not come
        else:
            self.left -= len(data)
        return data


def _client_gone(connection: socket.socket) -> bool:
    """Whether the client closed its end: an idle watch would otherwise notice only at its next event."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:  # TLS: part of a record came, nothing to read yet; the client is still there
        return False
    except (OSError, ValueError):
        return True


class _Wire:
    """A connection lent to a `Stream` (`request.Wire`). The handler's `wfile` writes straight to the socket
    (it has no buffer), so these writes and the headers before them go out in order."""

    def __init__(self, connection: socket.socket) -> None:
        self._connection = connection

    def frame(self, data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    def send_now(self, framed: bytes) -> int:
        try:
            return self._connection.send(framed, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0

    def send(self, framed: bytes) -> None:
        self._connection.sendall(framed)

    def client_gone(self) -> bool:
        return _client_gone(self._connection)


def _warning_value(text: str) -> str:
    """Kubernetes' form of a warning: code 299, agent "-", the text quoted (RFC 7234). Headers are Latin-1 on
    the wire, so anything else is escaped rather than allowed to fail the response."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    safe = escaped.encode("ascii", "backslashreplace").decode("ascii")
    return f'299 - "{safe}"'


class Server(ThreadingHTTPServer):
    """The HTTP server of one process, with the feed that its watches follow (`watch.py`)."""
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    tls_context: Any = None  # pyOpenSSL's SSL.Context when serving TLS

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's own thread: the TLS handshake (with a timeout, so a client that stalls in it
        holds only its own thread, and only for a while), then HTTP."""
        if self.tls_context is not None:
            connection = tls.TLSSocket(request, self.tls_context)
            try:
                connection.handshake()
            except OSError as e:
                log.debug("TLS handshake with %s failed: %s", client_address, e)
                return  # the raw socket is closed by the caller
            request = connection
        self.RequestHandlerClass(request, client_address, self)  # type: ignore[arg-type]

    def __init__(self, address: tuple[str, int], api: Api, *, bind_and_activate: bool = True,
                 security: Security | None = None) -> None:
        self.feed = watch.Feed(api.store)
        self.tls_context = security.tls_context if security is not None else None
        super().__init__(address, make_handler(api, self.feed, security), bind_and_activate)

    def server_close(self) -> None:
        self.feed.close()  # every watch stream ends cleanly, as when kube-apiserver shuts down
        super().server_close()


def serve(api: Api, host: str, port: int, security: Security | None = None) -> Server:
    """A bound server; the caller runs `serve_forever()` (tests do it on a thread)."""
    return Server((host, port), api, security=security)


def serve_on(api: Api, listening: socket.socket, security: Security | None = None) -> Server:
    """A server accepting on a socket another process has bound and listens on (`workers.py`)."""
    server = Server(listening.getsockname()[:2], api, bind_and_activate=False, security=security)
    server.socket.close()
    server.socket = listening
    return server
