"""What one HTTP request is to the API server, and what it answers: plain data, no I/O.

`http.py` makes a `Request` from the wire and writes the `Response` back; the filters (`filters.py`) and the
handlers (`handlers.py`) only see these two. A handler adds to `Request.warnings`; each becomes a
`Warning: 299` header, as kube-apiserver writes them.

A body is bytes, an iterator of chunks (streamed, each flushed at once), or a `Stream`: a body that writes
itself to the connection's `Wire`, from the request's thread and from others (a watch, `watch.py`, whose
process-wide feed thread writes each watcher's events itself rather than wake a thread per watcher).
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmquota import errors
from vmquota.identity import UserInfo


class BodyStream(Protocol):
    """A request body left on the connection for the handler to read (an upload: `upload.py`), `length` bytes
    at most; `read` returns b"" at its end."""

    length: int

    def read(self, size: int = -1, /) -> bytes: ...


class Headers(Protocol):
    """Request headers, looked up without regard to case (the standard library's `email.message.Message`)."""

    def get(self, name: str, /) -> str | None: ...

    def __contains__(self, name: str, /) -> bool: ...


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]  # the first value of each parameter, as Kubernetes reads them
    headers: Headers
    body: bytes = b""
    body_stream: BodyStream | None = None  # instead of `body`, for the few paths that stream it
    warnings: list[str] = field(default_factory=list)
    remote_address: str = ""  # the client's IP address, for the audit log
    client_certificate: Any = None  # the TLS client's certificate (cryptography's x509.Certificate), if any
    client_certificate_trusted: bool = False  # OpenSSL verified its chain against vmquota's CA
    user: UserInfo | None = None  # set by authentication
    # Set by authorization on a list across namespaces that the user may list in some namespaces only: the
    # list shows those (None: no restriction).
    visible_namespaces: frozenset[str] | None = None

    def param(self, name: str) -> str | None:
        return self.query.get(name)

    def flag(self, name: str) -> bool:
        """A boolean query parameter (`watch=true`, `watch=1`); anything else but false/0/absent is a 400."""
        value = self.query.get(name)
        if value in (None, "", "false", "0"):
            return False
        if value in ("true", "1"):
            return True
        raise errors.BadRequest(f"{name}: invalid value {value!r}: must be true or false")

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type") or ""

    @property
    def accept(self) -> str:
        return self.headers.get("Accept") or ""


class Wire(Protocol):
    """The connection under a streamed response, as `http.py` lends it to a `Stream`: chunks of the chunked
    transfer encoding, sent whole or in part. One writer at a time; the `Stream` sees to that."""

    def frame(self, data: bytes) -> bytes:
        """`data` as one chunk on the wire."""

    def send_now(self, framed: bytes) -> int:
        """As much of `framed` as the connection takes without waiting; OSError once the client is gone."""

    def send(self, framed: bytes) -> None:
        """All of `framed`, waiting for the client as long as it takes; OSError once the client is gone."""

    def client_gone(self) -> bool:
        """Whether the client has closed its end (a look, without waiting)."""


class Stream(abc.ABC):
    """A streamed body that writes itself: `http.py` sends the headers, calls `run`, then ends the stream."""

    @abc.abstractmethod
    def run(self, wire: Wire) -> bool:
        """Write every chunk; False when the connection is broken (the client went away, or a chunk was left
        half sent): it is then closed instead of ended."""


@dataclass
class Response:
    code: int
    body: bytes | Iterator[bytes] | Stream  # an iterator is streamed, chunk by chunk, each flushed at once
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, code: int, obj: Any) -> Response:
        return cls(code, obj if isinstance(obj, bytes) else json.dumps(obj).encode())

    @classmethod
    def success(cls, code: int) -> Response:
        return cls.json(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                               "code": code})


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A Kubernetes `Status` of a failure."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
