"""TLS on the server's connections, with client certificates asked for but judged later, as kube-apiserver does.

Used by `http.py`. kube-apiserver asks every client for a certificate and accepts the handshake whatever comes
(Go's `tls.RequestClientCert`); its x509 authenticator judges the certificate afterwards, so a certificate from
another CA gets a 401 Status, not a broken handshake. Python's `ssl` module cannot do that (with a CA loaded it
fails the handshake on an unknown certificate), so connections are pyOpenSSL's: OpenSSL verifies the chain
against vmquota's CA and its verdict is kept beside the connection for `authentication.py`.

`TLSSocket` makes a pyOpenSSL connection look enough like a socket for the standard library's HTTP server. Its
socket stays non-blocking and every wait has a timeout, so the handshake (done in the connection's own thread)
or a stalled client never holds a thread forever, nor the accept loop at all.
"""

from __future__ import annotations

import io
import select
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from OpenSSL import SSL

from vmquota.pki import ServingFiles

HANDSHAKE_TIMEOUT = 10.0


@dataclass
class PeerVerdict:
    """What OpenSSL said of the client's certificate chain during the handshake."""
    presented: bool = False
    trusted: bool = True  # false once any certificate of the chain failed verification
    errors: list[int] = field(default_factory=list)


def _record(connection: SSL.Connection, cert: Any, errnum: int, depth: int, ok: int) -> bool:
    verdict = connection.get_app_data()
    assert isinstance(verdict, PeerVerdict)
    verdict.presented = True
    if not ok:
        verdict.trusted = False
        verdict.errors.append(errnum)
    return True  # the handshake goes on; authentication refuses an untrusted certificate with a 401


def server_context(files: ServingFiles) -> SSL.Context:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.use_certificate_chain_file(str(files.cert_file))
    context.use_privatekey_file(str(files.key_file))
    context.check_privatekey()
    context.load_verify_locations(str(files.client_ca_file))
    context.load_client_ca(str(files.client_ca_file).encode())  # the CAs a client picks its certificate by
    context.set_verify(SSL.VERIFY_PEER, _record)
    # A resumed session skips verification: every connection presents its certificate again (keep-alive
    # makes handshakes rare anyway).
    context.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_alpn_select_callback(_http1_only)
    return context


def _http1_only(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    """Go clients offer h2 first; this server speaks HTTP/1.1 only."""
    return b"http/1.1" if b"http/1.1" in offered else SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]


class TLSSocket:
    """A server-side TLS connection with the parts of the socket API that `socketserver` and `http.server` use."""

    def __init__(self, raw: socket.socket, context: SSL.Context) -> None:
        raw.setblocking(False)
        self.raw = raw
        self.verdict = PeerVerdict()
        self._tls = SSL.Connection(context, raw)
        self._tls.set_app_data(self.verdict)
        self._tls.set_accept_state()
        self._timeout: float | None = None
        self._peer: x509.Certificate | bool | None = False  # False: not read yet (it never changes: no renegotiation)
        # A live watch is written by the feed's thread (`send`) while its own thread peeks for a closed client
        # (`recv`); one OpenSSL connection must not be used by two threads at once.
        self._io_lock = threading.Lock()

    def handshake(self, timeout: float | None = None) -> None:
        """Complete the handshake within `timeout` seconds (HANDSHAKE_TIMEOUT); OSError (TimeoutError) otherwise."""
        saved, self._timeout = self._timeout, HANDSHAKE_TIMEOUT if timeout is None else timeout
        try:
            self._retry(self._tls.do_handshake)
        finally:
            self._timeout = saved

    def peer_certificate(self) -> x509.Certificate | None:
        """The client's certificate, read once per connection (every request of a kept-alive one asks)."""
        if self._peer is False:
            cert = self._tls.get_peer_certificate(as_cryptography=True)
            self._peer = cert if isinstance(cert, x509.Certificate) else None
        return self._peer if isinstance(self._peer, x509.Certificate) else None

    def _wait(self, for_write: bool) -> None:
        readable, writable, _ = select.select([] if for_write else [self.raw], [self.raw] if for_write else [], [],
                                              self._timeout)
        if not readable and not writable:
            raise TimeoutError("the TLS peer stalled")

    def _retry(self, operation: Any, *args: Any) -> Any:
        while True:
            try:
                return operation(*args)
            except SSL.WantReadError:
                self._wait(for_write=False)
            except SSL.WantWriteError:
                self._wait(for_write=True)
            except SSL.ZeroReturnError:
                return 0  # the peer closed TLS cleanly
            except SSL.SysCallError as e:
                if e.args and e.args[0] == -1:
                    return 0  # the peer closed TCP without closing TLS: end of stream, as ssl's suppress_ragged_eofs
                raise ConnectionResetError(str(e)) from e
            except SSL.Error as e:
                raise ConnectionError(f"TLS error: {e}") from e

    # -- what socketserver and http.server call ------------------------------------------------------

    def recv_into(self, buffer: memoryview, nbytes: int = 0) -> int:
        return int(self._retry(self._tls.recv_into, buffer, nbytes or len(buffer)))

    def send(self, data: bytes | memoryview, flags: int = 0) -> int:
        """One write that never waits, for the watch feed (`http._Wire.send_now`, with MSG_DONTWAIT): the bytes
        OpenSSL took, or BlockingIOError as a non-blocking socket says it. After that, the same bytes must be
        offered again (the feed keeps them), as OpenSSL requires; pyOpenSSL allows them from another buffer."""
        with self._io_lock:
            try:
                return int(self._tls.send(bytes(data)))
            except (SSL.WantWriteError, SSL.WantReadError):
                raise BlockingIOError("the TLS connection cannot take more now") from None
            except SSL.SysCallError as e:
                raise ConnectionResetError(str(e)) from e
            except SSL.Error as e:
                raise ConnectionError(f"TLS error: {e}") from e

    def recv(self, size: int, flags: int = 0) -> bytes:
        """A read that never waits, as `http._client_gone` peeks (MSG_PEEK): b"" once the peer closed, else what
        a complete record holds; BlockingIOError while none is complete yet."""
        with self._io_lock:
            try:
                return bytes(self._tls.recv(size, flags or None))
            except SSL.WantReadError:
                raise BlockingIOError("no complete TLS record yet") from None
            except SSL.ZeroReturnError:
                return b""
            except SSL.SysCallError as e:
                if e.args and e.args[0] == -1:
                    return b""
                raise ConnectionResetError(str(e)) from e
            except SSL.Error as e:
                raise ConnectionError(f"TLS error: {e}") from e

    def sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            sent = self._retry(self._tls.send, view[:1 << 16])
            if not sent:
                raise BrokenPipeError("the TLS peer closed the connection")
            view = view[sent:]

    def makefile(self, mode: str = "rb", buffering: int = -1) -> io.BufferedIOBase:
        raw = _RawTLS(self)
        size = io.DEFAULT_BUFFER_SIZE if buffering in (-1, 0) else buffering
        return io.BufferedReader(raw, size) if "r" in mode else io.BufferedWriter(raw, size)

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def gettimeout(self) -> float | None:
        return self._timeout

    def setsockopt(self, *args: Any) -> None:
        self.raw.setsockopt(*args)

    def getpeername(self) -> Any:
        return self.raw.getpeername()

    def getsockname(self) -> Any:
        return self.raw.getsockname()

    def fileno(self) -> int:
        return self.raw.fileno()

    def shutdown(self, how: int) -> None:
        try:
            self._timeout = min(self._timeout or 1.0, 1.0)
            self._tls.shutdown()  # close_notify; the peer's answer is not awaited
        except (SSL.Error, OSError):
            pass
        try:
            self.raw.shutdown(how)
        except OSError:
            pass

    def close(self) -> None:
        self.raw.close()


class _RawTLS(io.RawIOBase):
    def __init__(self, tls: TLSSocket) -> None:
        self._tls = tls

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._tls.recv_into(memoryview(buffer).cast("B"))

    def write(self, data: Any) -> int:
        self._tls.sendall(data)
        return len(memoryview(data))
