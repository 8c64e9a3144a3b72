"""Tunnels: the bytes of a stream carried over a websocket, both ways, as KubeVirt's console and port forwards are.

I/O layer, beside the hypervisor. The API server's end (`apiserver/streams.py`) joins a websocket to a guest's
console or port; the CLI's end (`client.py`, `cli.py`) joins one to a terminal or a local TCP connection. Both run
`pump`. KubeVirt's `plain.kubevirt.io` subprotocol has no framing of its own: every binary message carries the next
bytes of the stream, and a close frame (or the end of either side) ends it. The websocket protocol itself is
wsproto's (sans-IO: frames, masking, pings, the closing handshake); this module only moves its bytes.

One thread owns the websocket's connection and does every read and write on it, because a TLS connection
(pyOpenSSL's on the server, Python's `ssl` in the client) must not be read and written from two threads at once.
The other end is read by a thread of its own (a libvirt stream has no file descriptor to wait on), which hands what
it reads over through a small bounded queue: a slow websocket peer slows that reader down instead of filling memory.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import ssl
import threading
from typing import Protocol

from wsproto import WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, TextMessage
from wsproto.utilities import ProtocolError

PLAIN_PROTOCOL = "plain.kubevirt.io"  # KubeVirt's subprotocol: raw bytes in binary messages
CHUNK = 32 << 10  # what one read of the other end takes, and so the largest message sent
QUEUE_DEPTH = 16  # chunks read from the other end and not yet sent: 512 KiB at most
SEND_TIMEOUT = 30.0  # a websocket peer that takes nothing for this long is gone
CLOSE_TIMEOUT = 2.0  # how long the closing handshake waits for the peer's close frame
NORMAL_CLOSURE = 1000

WebSocket = Connection | WSConnection  # the server's side (after a handshake made elsewhere) or the client's
# What a read without waiting raises when nothing is there: a plain socket, pyOpenSSL's `TLSSocket`, Python's ssl.
_WOULD_BLOCK = (BlockingIOError, TimeoutError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Wire(Protocol):
    """The websocket's connection: a socket, or a TLS connection with a socket's calls."""

    def fileno(self) -> int: ...

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int: ...

    def sendall(self, data: bytes, /) -> None: ...

    def settimeout(self, timeout: float | None, /) -> None: ...


class End(Protocol):
    """The other end: a guest's console (`hypervisor.GuestStream`), a TCP connection, a terminal."""

    def recv(self, size: int, /) -> bytes:
        """Up to `size` bytes, waiting for them; b"" at the end."""

    def sendall(self, data: bytes, /) -> None: ...

    def close(self) -> None:
        """End it; a `recv` waiting in another thread returns (or raises) then."""


class SocketEnd:
    """A TCP connection as a tunnel's end (the guest's port on the server, an accepted local connection in the CLI):
    closing it shuts the socket down first, which wakes a `recv` waiting on another thread."""

    def __init__(self, connection: socket.socket) -> None:
        self._connection = connection

    def recv(self, size: int) -> bytes:
        return self._connection.recv(size)

    def sendall(self, data: bytes) -> None:
        self._connection.sendall(data)

    def close(self) -> None:
        try:
            self._connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more
        self._connection.close()


def pump(wire: Wire, ws: WebSocket, end: End) -> None:
    """Carry bytes between the websocket on `wire` and `end` until either ends; then close both (not `wire`,
    which its owner closes)."""
    _Pump(wire, ws, end).run()


class _Pump:
    def __init__(self, wire: Wire, ws: WebSocket, end: End) -> None:
        self.wire, self.ws, self.end = wire, ws, end
        self._from_end: queue.Queue[bytes | None] = queue.Queue(QUEUE_DEPTH)  # None: the end has ended
        self._wake_reader, self._wake_writer = socket.socketpair()  # the end's reader wakes the loop with a byte
        self._wake_writer.setblocking(False)
        self._stopping = threading.Event()
        self._buffer = bytearray(CHUNK)

    def run(self) -> None:
        reader = threading.Thread(target=self._read_end, name="tunnel-end", daemon=True)
        reader.start()
        try:
            self._loop()
        except (OSError, ProtocolError):
            pass  # the websocket's connection broke, or its peer broke the protocol: nothing to tell anyone
        finally:
            self._stopping.set()
            try:
                self.end.close()
            finally:
                reader.join(timeout=5)
                self._wake_reader.close()
                self._wake_writer.close()

    # -- the other end, on its own thread -------------------------------------------------------------

    def _read_end(self) -> None:
        try:
            while not self._stopping.is_set():
                data = self.end.recv(CHUNK)
                if not data:
                    break
                self._hand_over(data)
        except Exception:  # whatever the end raises, it has ended
            pass
        finally:
            self._hand_over(None)

    def _hand_over(self, item: bytes | None) -> None:
        while not self._stopping.is_set():
            try:
                self._from_end.put(item, timeout=0.5)
            except queue.Full:
                continue
            try:
                self._wake_writer.send(b"\0")
            except OSError:
                pass  # a wake-up byte is there already, or the loop has ended
            return

    # -- the websocket, on the calling thread -----------------------------------------------------------

    def _loop(self) -> None:
        self.wire.settimeout(0)
        watched = [self.wire.fileno(), self._wake_reader.fileno()]
        while True:
            readable, _, _ = select.select(watched, [], [])
            if self._wake_reader.fileno() in readable:
                with contextlib.suppress(BlockingIOError):
                    self._wake_reader.recv(4096, socket.MSG_DONTWAIT)
                if not self._send_from_end():
                    self._close()
                    return
            if self.wire.fileno() in readable and not self._receive():
                return

    def _send_from_end(self) -> bool:
        """Send what the end has handed over; False once it has ended."""
        while True:
            try:
                item = self._from_end.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            self._send(BytesMessage(data=item))

    def _receive(self) -> bool:
        """Read what the peer sent and act on it; False once the websocket has ended."""
        data = self._read_wire()
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, BytesMessage | TextMessage):  # text is not KubeVirt's, but a browser's terminal's
                if not self._to_end(event.data if isinstance(event.data, str) else bytes(event.data)):
                    self._close()
                    return False
            elif isinstance(event, Ping):
                self._send(event.response())
            elif isinstance(event, CloseConnection):
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    self._send(event.response())
                return False
        return data is not None

    def _to_end(self, data: bytes | str) -> bool:
        try:
            self.end.sendall(data.encode() if isinstance(data, str) else data)
            return True
        except Exception:  # whatever the end raises (a libvirt error, a reset), it has ended
            return False

    def _read_wire(self) -> bytes | None:
        """Everything the connection holds now (a TLS connection may hold more than its socket shows); None at its
        end."""
        received = bytearray()
        view = memoryview(self._buffer)
        while True:
            try:
                count = self.wire.recv_into(view, len(view))
            except _WOULD_BLOCK:
                return bytes(received)
            if not count:
                return bytes(received) if received else None
            received += view[:count]

    def _send(self, event: Event) -> None:
        data = self.ws.send(event)
        self.wire.settimeout(SEND_TIMEOUT)
        try:
            self.wire.sendall(data)
        finally:
            self.wire.settimeout(0)

    def _close(self) -> None:
        """The closing handshake from this side: a close frame, then the peer's, briefly awaited, so that the peer
        sees a clean close rather than a reset connection."""
        if self.ws.state is not ConnectionState.OPEN:
            return
        self._send(CloseConnection(code=NORMAL_CLOSURE))
        fd = self.wire.fileno()
        while True:  # until the peer's close frame, the end of its connection, or the timeout
            readable, _, _ = select.select([fd], [], [], CLOSE_TIMEOUT)
            if not readable:
                return
            data = self._read_wire()
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, CloseConnection):
                    return
            if data is None:
                return
