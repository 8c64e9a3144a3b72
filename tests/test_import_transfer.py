"""How an import's bytes arrive (`imports.download`): spliced from the socket when the body is plain HTTP with a
length, read through Python otherwise (chunked), and in both cases whole, resumable and bounded. Each server
here is a few lines on a loopback socket, so that it can misbehave exactly as a test needs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from vmquota import imports

PAYLOAD = bytes(range(256)) * 40_000  # about 10 MB that are not all zeros


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[socket.socket, bytes], None]], str]]:
    """A one-connection-at-a-time server answering each request with `answer(connection, request)`."""
    listeners: list[socket.socket] = []

    def start(answer: Callable[[socket.socket, bytes], None]) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def loop() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    request = conn.recv(65536)
                    try:
                        answer(conn, request)
                    except OSError:
                        pass

        threading.Thread(target=loop, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}/image"

    yield start
    for listener in listeners:
        listener.close()


def fetch(url: str, dest: Path, limit: int = 1 << 30) -> list[int]:
    seen: list[int] = []
    imports.download(url, dest, limit=Decimal(limit), cancel=threading.Event(),
                     progress=lambda done, total: seen.append(done))
    return seen


def with_length(conn: socket.socket, request: bytes) -> None:
    start = 0
    for line in request.split(b"\r\n"):
        if line.lower().startswith(b"range: bytes="):
            start = int(line.split(b"=")[1].split(b"-")[0])
    body = PAYLOAD[start:]
    status = b"206 Partial Content" if start else b"200 OK"
    extra = b"Content-Range: bytes %d-%d/%d\r\n" % (start, len(PAYLOAD) - 1, len(PAYLOAD)) if start else b""
    conn.sendall(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n" % (status, len(body), extra) + body)


def chunked(conn: socket.socket, request: bytes) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for offset in range(0, len(PAYLOAD), 1 << 20):
        part = PAYLOAD[offset:offset + (1 << 20)]
        conn.sendall(b"%x\r\n%s\r\n" % (len(part), part))
    conn.sendall(b"0\r\n\r\n")


@pytest.mark.parametrize(("answer", "spliced"), [(with_length, True), (chunked, False)], ids=["spliced", "chunked"])
def test_the_body_arrives_whole_with_progress(serve: Any, tmp_path: Path, answer: Any, spliced: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    splices: list[bool] = []
    real = imports._splice_body
    monkeypatch.setattr(imports, "_splice_body", lambda *args: splices.append(real(*args)) or splices[-1])
    dest = tmp_path / "image.download"
    seen = fetch(serve(answer), dest)
    assert dest.read_bytes() == PAYLOAD
    assert seen and seen[-1] == len(PAYLOAD) and seen == sorted(seen)
    assert splices == [spliced]


def test_a_spliced_download_resumes_from_what_it_has(serve: Any, tmp_path: Path) -> None:
    dest = tmp_path / "image.download"
    dest.write_bytes(PAYLOAD[:3_000_001])
    fetch(serve(with_length), dest)
    assert dest.read_bytes() == PAYLOAD


def test_a_body_that_ends_early_fails_for_a_retry_and_keeps_what_came(serve: Any, tmp_path: Path) -> None:
    def short(conn: socket.socket, request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(PAYLOAD) + PAYLOAD[:2_000_000])

    dest = tmp_path / "image.download"
    with pytest.raises(imports.ImportFailed) as failed:
        fetch(serve(short), dest)
    assert not failed.value.permanent
    assert dest.read_bytes() == PAYLOAD[:2_000_000]


def test_a_server_that_stalls_times_out(serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imports, "TIMEOUT_SECONDS", 1.0)

    def stall(conn: socket.socket, request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(PAYLOAD) + PAYLOAD[:1_000_000])
        time.sleep(3)

    started = time.monotonic()
    with pytest.raises(imports.ImportFailed) as failed:
        fetch(serve(stall), tmp_path / "image.download")
    assert "no data for 1 s" in str(failed.value) and not failed.value.permanent
    assert time.monotonic() - started < 2.5


def test_a_body_larger_than_its_limit_is_refused(serve: Any, tmp_path: Path) -> None:
    with pytest.raises(imports.ImportFailed) as failed:
        fetch(serve(with_length), tmp_path / "image.download", limit=len(PAYLOAD) - 1)
    assert failed.value.permanent and "larger than the requested storage" in str(failed.value)
