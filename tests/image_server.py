"""A loopback HTTP server of disk images for import tests: Range requests (so imports can resume), 404s, and
an optional pace so a test can catch an import midway."""

from __future__ import annotations

import http.server
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ImageServer:
    def __init__(self, root: Path) -> None:
        self.root = root  # the files it serves, by name
        self.bytes_per_second: int | None = None  # None: as fast as it can
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header) of every GET
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                path = server.root / self.path.lstrip("/")
                if "/" in self.path.lstrip("/") or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start, end = 0, len(data) - 1
                ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if ranged:
                    start = int(ranged.group(1))
                    end = min(int(ranged.group(2) or end), len(data) - 1)
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                self._send(data[start:end + 1])

            def _send(self, body: bytes) -> None:
                step = 65536
                for offset in range(0, len(body), step):
                    try:
                        self.wfile.write(body[offset:offset + step])
                    except OSError:
                        return  # the importer went away (killed, cancelled)
                    if server.bytes_per_second:
                        time.sleep(step / server.bytes_per_second)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    @contextmanager
    def running(self) -> Iterator[ImageServer]:
        thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._httpd.shutdown()
            self._httpd.server_close()
