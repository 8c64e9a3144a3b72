"""A small HTTP client for the vmquota API, used by the CLI and the tests.

Top layer. Errors come back as `ClientError` carrying the server's Status
(message, reason, code), or as `Unreachable` when no server answers.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import select
import ssl
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from vmquota import __version__
from vmquota.kubeconfig import Connection

DEFAULT_SERVER = "http://127.0.0.1:8686"


class ClientError(Exception):
    def __init__(self, status: dict[str, Any]) -> None:
        super().__init__(status.get("message", "request failed"))
        self.status = status
        self.code = int(status.get("code", 0) or 0)
        self.reason = str(status.get("reason", ""))
        self.message = str(status.get("message", ""))


class Unreachable(Exception):
    pass


def server_url(explicit: str | None = None) -> str:
    return explicit or os.environ.get("VMQUOTA_SERVER") or DEFAULT_SERVER


class Client:
    """Requests to one server, on one kept-alive connection, with the credentials of a kubeconfig."""

    def __init__(self, target: str | Connection | None = None, *, timeout: float = 60.0) -> None:
        connection = target if isinstance(target, Connection) else Connection(server=server_url(target))
        self.url = connection.server
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Unreachable(f"the server URL must look like https://HOST:PORT or http://HOST:PORT, got {self.url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = _tls_context(connection) if parts.scheme == "https" else None
        # A token goes over TLS only, as kubectl sends it: on plain HTTP anyone on the path could take it.
        # The User-Agent names the writer in managedFields (`vmquota`), as kubectl's names kubectl.
        self._headers = {"User-Agent": f"vmquota/{__version__}"}
        if connection.token and self._tls:
            self._headers["Authorization"] = f"Bearer {connection.token}"
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None, *,
                content_type: str = "application/json") -> Any:
        payload = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):  # a kept-alive connection the server closed is retried once
            if self._conn is None:
                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                                         context=self._tls) if self._tls else \
                    http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            try:
                headers = {**self._headers, "Content-Type": content_type} if payload is not None else self._headers
                self._conn.request(method, path, body=payload, headers=headers)
                response = self._conn.getresponse()
                data = response.read()
                break
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                self.close()
                if attempt == 2 or isinstance(e, ConnectionRefusedError | TimeoutError):
                    raise Unreachable(f"cannot reach the vmquota server at {self.url}: {e}") from e
        try:
            decoded = json.loads(data) if data else None
        except ValueError:
            decoded = data.decode(errors="replace")
        if response.status >= 400:
            if isinstance(decoded, dict) and decoded.get("kind") == "Status":
                raise ClientError(decoded)
            raise ClientError({"code": response.status, "message": str(decoded), "reason": response.reason})
        return decoded

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def put(self, path: str, body: Any = None) -> Any:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def upload(self, path: str, image: BinaryIO, length: int, *,
               progress: Callable[[int], None] = lambda done: None, chunk_size: int = 1 << 20) -> Any:
        """POST `length` bytes of `image` as the body, streamed, on a connection of its own.

        It asks `Expect: 100-continue` and sends the body only once the server says so: a refusal (403, 404,
        413) comes back before a byte of the image has left, instead of a broken pipe halfway through it.
        """
        conn = self._connect(timeout=max(self._timeout, 600.0))
        try:
            conn.putrequest("POST", path, skip_accept_encoding=True)
            for name, value in {**self._headers, "Content-Type": "application/octet-stream",
                                "Content-Length": str(length), "Expect": "100-continue"}.items():
                conn.putheader(name, value)
            conn.endheaders()
            early = _interim_or_final(conn)
            if early is None:  # 100 Continue, or no word within the wait: send it (RFC 9110, 10.1.1)
                done = 0
                while done < length and (chunk := image.read(min(chunk_size, length - done))):
                    try:
                        conn.send(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        break  # refused midway: its answer is on the connection
                    done += len(chunk)
                    progress(done)
                response = conn.getresponse()
            else:
                response = early
            return _decoded(response.status, response.reason, response.read())
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise Unreachable(f"uploading to the vmquota server at {self.url}: {e}") from e
        finally:
            conn.close()

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._tls:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._tls)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


CONTINUE_WAIT_SECONDS = 30.0


def _interim_or_final(conn: http.client.HTTPConnection) -> http.client.HTTPResponse | None:
    """After the headers of an `Expect: 100-continue` request: None on `100 Continue` (or silence), else the
    server's final answer, a refusal sent before the body."""
    sock = conn.sock
    readable, _, _ = select.select([sock], [], [], CONTINUE_WAIT_SECONDS)
    if not readable and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
        return None
    head = b""
    while not head.endswith(b"\r\n\r\n") and len(head) < 65536:  # byte by byte: nothing after it is taken
        byte = sock.recv(1)
        if not byte:
            break
        head += byte
    if head.split(b" ", 2)[1:2] == [b"100"]:
        return None
    response = http.client.HTTPResponse(_Replay(head, sock), method="POST")  # type: ignore[arg-type]
    response.begin()
    return response


class _Replay:
    """A socket whose first bytes were read already: `HTTPResponse` reads them again, then the rest."""

    def __init__(self, head: bytes, sock: Any) -> None:
        self._head, self._sock = head, sock

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_ReplayRaw(self._head, self._sock))


class _ReplayRaw(io.RawIOBase):
    def __init__(self, head: bytes, sock: Any) -> None:
        self._head, self._sock = head, sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        return int(self._sock.recv_into(buffer))


def _decoded(status: int, reason: str, data: bytes) -> Any:
    """An answer's JSON; a Status of a failure raises `ClientError`."""
    try:
        decoded = json.loads(data) if data else None
    except ValueError:
        decoded = data.decode(errors="replace")
    if status >= 400:
        if isinstance(decoded, dict) and decoded.get("kind") == "Status":
            raise ClientError(decoded)
        raise ClientError({"code": status, "message": str(decoded), "reason": reason})
    return decoded


def _tls_context(connection: Connection) -> ssl.SSLContext:
    """Verify the server against the kubeconfig's CA (else the system's); present its client certificate."""
    context = ssl.create_default_context(cadata=connection.ca_pem) if connection.ca_pem else \
        ssl.create_default_context()
    if connection.client_cert_pem and connection.client_key_pem:
        # The ssl module loads a certificate chain from files only: a private folder, removed at once.
        with tempfile.TemporaryDirectory() as folder:
            cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
            for path, text in ((cert, connection.client_cert_pem), (key, connection.client_key_pem)):
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                    f.write(text)
            context.load_cert_chain(cert, key)
    return context


def collection_path(kind: Any, namespace: str | None) -> str:
    base = f"/apis/{kind.group}/{kind.version}" if kind.group else "/api/v1"
    if kind.namespaced and namespace is not None:
        return f"{base}/namespaces/{namespace}/{kind.plural}"
    return f"{base}/{kind.plural}"


def object_path(kind: Any, namespace: str | None, name: str) -> str:
    return f"{collection_path(kind, namespace)}/{name}"


def upload_path(namespace: str, data_volume: str) -> str:
    return f"/apis/upload.cdi.kubevirt.io/v1beta1/namespaces/{namespace}/datavolumes/{data_volume}/upload"


def action_path(namespace: str, name: str, action: str) -> str:
    return f"/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachines/{name}/{action}"
