"""Section 5: watches against a real `vmquota serve` (its default API processes, on test:///default).

- One change seen by 100 watchers: the time from sending a PATCH to each watcher reading its event, p99 over
  every (change, watcher); the baseline is the same with 1 watcher, in the same run. Watchers and writer are
  one asyncio loop in this process, so the figure includes a cross-process hop whenever the write and the
  watch land on different API processes (the feed's poll).
- 1,000 idle watch connections: the server's memory (RSS of all its processes) and CPU over an idle span,
  against the same server with none.
- HTTP start/stop (`http_load`'s closed loop, 10 clients) with 100 watchers of VMs and quotas connected and
  reading every event, against none: p99 ratio, and the server's CPU per request (steadier than a p99 on a
  shared machine). The watchers run in a child process of their own at nice 19 (see DRAIN), so that reading
  their events slows neither the load's own loop nor, as far as the scheduler allows, the server; the figure
  checks that they read every event.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import http_load
from benchmarks.common import Row, SectionResult, ServerProcess, fmt_ms, percentile, progress
from vmquota.client import Client

NS = "bench-watch"
TARGET_P99_S = 0.050
TARGET_HTTP_RATIO = 1.2


async def _open_watch(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"a watch was refused: {head[:200]!r}")
    return reader, writer


async def _events(reader: asyncio.StreamReader) -> Any:
    """The watch events of a chunked stream (the server writes whole lines to a chunk: one event or a burst)."""
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        if size == 0:
            return
        chunk = await reader.readexactly(size + 2)
        for line in chunk[:-2].splitlines():
            yield json.loads(line)


def _watch_path(kind_path: str, version: str) -> str:
    return f"{kind_path}?watch=true&resourceVersion={version}"


async def _fan_out(port: int, watchers: int, changes: int) -> list[float]:
    """Latencies of `changes` label patches of one namespace, seen by each of `watchers` namespace watches."""
    client = Client(f"http://127.0.0.1:{port}")
    version = client.get("/api/v1/namespaces")["metadata"]["resourceVersion"]
    streams = [await _open_watch(port, _watch_path("/api/v1/namespaces", version)) for _ in range(watchers)]
    arrivals: dict[int, list[float]] = {}  # resourceVersion -> arrival times

    async def follow(reader: asyncio.StreamReader) -> None:
        async for event in _events(reader):
            arrivals.setdefault(int(event["object"]["metadata"]["resourceVersion"]), []).append(time.perf_counter())

    tasks = [asyncio.create_task(follow(reader)) for reader, _ in streams]
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    for i in range(changes):
        t0 = time.perf_counter()
        patched = await loop.run_in_executor(None, client.patch, f"/api/v1/namespaces/{NS}",
                                             {"metadata": {"labels": {"n": str(i)}}})
        rv = int(patched["metadata"]["resourceVersion"])
        while len(arrivals.get(rv, [])) < watchers:
            await asyncio.sleep(0.0005)
        latencies += [t - t0 for t in arrivals.pop(rv)]
    for task in tasks:
        task.cancel()
    for _, writer in streams:
        writer.close()
    client.close()
    return latencies


async def _idle(port: int, watchers: int, hold: float, server: ServerProcess) -> dict[str, float]:
    """Memory and CPU of the server while `watchers` watches are open and nothing changes."""
    client = Client(f"http://127.0.0.1:{port}")
    version = client.get(f"/api/v1/namespaces/{NS}/resourcequotas")["metadata"]["resourceVersion"]
    client.close()
    streams = []
    for _ in range(watchers):
        streams.append(await _open_watch(port, _watch_path(f"/api/v1/namespaces/{NS}/resourcequotas", version)))
    await asyncio.sleep(1.0)  # every handler thread has started and settled
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    await asyncio.sleep(hold)
    cpu, elapsed = server.cpu_seconds() - cpu0, time.perf_counter() - t0
    rss = _rss_mb(server)
    for _, writer in streams:
        writer.close()
    return {"rss_mb": rss, "cpu_percent": cpu / elapsed * 100}


def _rss_mb(server: ServerProcess) -> float:
    total = 0
    for pid in server.pids():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


# The watchers of the HTTP figure: one asyncio loop in a child process, one protocol per stream (no stream reader
# and no task per chunk), that parses every event line with json.loads and keeps, per stream, how many it read,
# the newest resourceVersion and whether the stream ended; each line on its stdin asks for that as one JSON line.
# It runs at the lowest priority (nice 19): on this 2-core machine it would otherwise take as much CPU as the
# server itself, where real watchers run on machines of their own. It still reads everything: the figure checks
# that each watcher read up to the newest change of what it watches, and that the server ended none.
DRAIN = """
import asyncio, json, os, sys

class Watcher(asyncio.Protocol):
    def __init__(self, path, head):
        self.path, self.head, self.buffer = path, head, b""
        self.events, self.newest, self.ended = 0, 0, False

    def connection_made(self, transport):
        transport.write(f"GET {self.path} HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n".encode())

    def data_received(self, data):
        buffer = self.buffer + data
        if not self.head.done():
            end = buffer.find(b"\\r\\n\\r\\n")
            if end < 0:
                self.buffer = buffer
                return
            self.head.set_result(buffer[:12])
            buffer = buffer[end + 4:]
        at = 0
        while (eol := buffer.find(b"\\r\\n", at)) >= 0:
            size = int(buffer[at:eol], 16)
            if size == 0:
                self.ended = True
                break
            end = eol + 2 + size
            if len(buffer) < end + 2:
                break
            for line in buffer[eol + 2:end].splitlines():
                version = int(json.loads(line)["object"]["metadata"]["resourceVersion"])
                self.events += 1
                self.newest = max(self.newest, version)
            at = end + 2
        self.buffer = buffer[at:]

    def connection_lost(self, exc):
        self.ended = True

async def main(port, count, paths):
    loop = asyncio.get_running_loop()
    watchers = []
    for i in range(count):
        head = loop.create_future()
        _, watcher = await loop.create_connection(lambda: Watcher(paths[i % len(paths)], head), "127.0.0.1", port)
        if await head != b"HTTP/1.1 200":
            raise RuntimeError(f"a watch was refused: {head.result()!r}")
        watchers.append(watcher)
    os.nice(19)
    print("ready", flush=True)
    while await loop.run_in_executor(None, sys.stdin.readline):
        print(json.dumps([[w.events, w.newest, w.ended] for w in watchers]), flush=True)

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]))
"""


def _drainers(port: int, count: int, paths: list[str]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-c", DRAIN, str(port), str(count), *paths], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE)
    assert process.stdout is not None
    if process.stdout.readline() != b"ready\n":
        raise RuntimeError("the watchers did not start")
    return process


def _seen(drainers: subprocess.Popen[bytes]) -> list[tuple[int, int, bool]]:
    """(events read, newest resourceVersion, ended) of each of the watchers' streams."""
    assert drainers.stdin is not None and drainers.stdout is not None
    drainers.stdin.write(b"report\n")
    drainers.stdin.flush()
    return [tuple(stream) for stream in json.loads(drainers.stdout.readline())]  # type: ignore[misc]


def _newest(client: Client, path: str) -> int:
    return max(int(item["metadata"]["resourceVersion"]) for item in client.get(path)["items"])


def _check_every_event_read(client: Client, drainers: subprocess.Popen[bytes], paths: list[str]) -> int:
    """Wait until each watcher has read up to the newest change of what it watches, and none was ended (a
    watcher the server ends as too slow would flatter the figure); the number of events they read."""
    newest = [_newest(client, path.split("?")[0]) for path in paths]
    deadline = time.monotonic() + 60
    while True:
        seen = _seen(drainers)
        if any(ended for _, _, ended in seen):
            raise RuntimeError(f"{sum(ended for _, _, ended in seen)} of the watchers' streams ended early")
        if all(rv >= newest[i % len(paths)] for i, (_, rv, _) in enumerate(seen)):
            return sum(events for events, _, _ in seen)
        if time.monotonic() > deadline:
            raise RuntimeError("the watchers did not read every event within 60 s of the load's end")
        time.sleep(0.2)


def _http_with_watchers(server: ServerProcess, watchers: int, requests: int, clients: int) -> dict[str, Any]:
    client = Client(server.url)
    version = client.get(f"/apis/kubevirt.io/v1/namespaces/{http_load.NS}/virtualmachines")["metadata"][
        "resourceVersion"]
    paths = [_watch_path(f"/apis/kubevirt.io/v1/namespaces/{http_load.NS}/virtualmachines", version),
             _watch_path(f"/api/v1/namespaces/{http_load.NS}/resourcequotas", version)]
    drainers = _drainers(server.port, watchers, paths) if watchers else None
    events = 0
    try:
        per_client = max(2, requests // clients // 2 * 2)
        asyncio.run(http_load._load(server.port, http_load._plans(clients, 2 * http_load.VMS_PER_CLIENT)))  # warm
        http_load._settle(client)
        cpu0 = server.cpu_seconds()
        watchers_cpu0 = _cpu_seconds(drainers.pid) if drainers else 0.0
        latencies, codes, elapsed = asyncio.run(http_load._load(server.port, http_load._plans(clients, per_client)))
        cpu = server.cpu_seconds() - cpu0
        watchers_cpu = _cpu_seconds(drainers.pid) - watchers_cpu0 if drainers else 0.0
        http_load._settle(client)
        if drainers is not None:
            events = _check_every_event_read(client, drainers, paths)
    finally:
        client.close()
        if drainers is not None:
            drainers.kill()
            drainers.wait()
    return {"p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000,
            "requests_per_s": len(latencies) / elapsed, "status_codes": dict(codes),
            "server_cpu_ms_per_request": cpu / len(latencies) * 1000,
            "watchers_cpu_ms_per_request": watchers_cpu / len(latencies) * 1000, "events_read": events}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def watch_section(*, changes: int, idle_watchers: int, hold: float, requests: int) -> SectionResult:
    details: dict[str, Any] = {}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="vmquota-bench-watch-") as tmp:
        server = ServerProcess(Path(tmp) / "data", "test:///default")
        server.start()
        try:
            client = Client(server.url)
            client.post("/api/v1/namespaces", {"metadata": {"name": NS}})
            client.close()
            one = asyncio.run(_fan_out(server.port, 1, changes))
            hundred = asyncio.run(_fan_out(server.port, 100, changes))
            p99_one, p99 = percentile(one, 99), percentile(hundred, 99)
            progress(f"watch fan-out: 100 watchers p50 {fmt_ms(percentile(hundred, 50))}, p99 {fmt_ms(p99)}; "
                     f"1 watcher p99 {fmt_ms(p99_one)}")
            details["fan_out"] = {"changes": changes, "p50_ms_100": percentile(hundred, 50) * 1000,
                                  "p99_ms_100": p99 * 1000, "p99_ms_1": p99_one * 1000}
            rows.append(Row("5", "one change seen by 100 watchers: p99 from the write to each watcher",
                            fmt_ms(p99), baseline=f"1 watcher: {fmt_ms(p99_one)}", ratio=f"{p99 / p99_one:.2f}",
                            target="p99 < 50 ms", met=p99 < TARGET_P99_S))
            none = asyncio.run(_idle(server.port, 0, hold, server))
            idle = asyncio.run(_idle(server.port, idle_watchers, hold, server))
            details["idle"] = {"watchers": idle_watchers, "seconds": hold, "without": none, "with": idle}
            progress(f"watch idle: {idle_watchers} watches {idle['rss_mb']:.0f} MB, {idle['cpu_percent']:.1f}% CPU; "
                     f"none {none['rss_mb']:.0f} MB, {none['cpu_percent']:.1f}% CPU")
            per_watch_kb = (idle["rss_mb"] - none["rss_mb"]) * 1024 / idle_watchers
            rows.append(Row("5", f"{idle_watchers:,} idle watch connections: server memory; CPU",
                            f"{idle['rss_mb']:.0f} MB; {idle['cpu_percent']:.1f}% of a core",
                            baseline=f"none: {none['rss_mb']:.0f} MB; {none['cpu_percent']:.1f}%",
                            ratio=f"{per_watch_kb:.0f} KB per watch"))
        finally:
            server.stop()
    # The HTTP load on a server of its own, set up as http_load sets up its own.
    with tempfile.TemporaryDirectory(prefix="vmquota-bench-watch-http-") as tmp:
        server = ServerProcess(Path(tmp) / "data", "test:///default")
        server.start()
        try:
            http_load_setup(server)
            without = _http_with_watchers(server, 0, requests, clients=10)
            with_watchers = _http_with_watchers(server, 100, requests, clients=10)
        finally:
            server.stop()
    ratio = with_watchers["p99_ms"] / without["p99_ms"]
    progress(f"watch http: p99 {with_watchers['p99_ms']:.2f} ms with 100 watchers, {without['p99_ms']:.2f} ms without")
    details["http"] = {"without": without, "with_100_watchers": with_watchers}
    rows.append(Row("5", "HTTP start/stop p99, 10 clients, 100 watchers connected", f"{with_watchers['p99_ms']:.2f} ms",
                    baseline=f"none: {without['p99_ms']:.2f} ms", ratio=f"{ratio:.2f}",
                    target=f"ratio <= {TARGET_HTTP_RATIO}", met=ratio <= TARGET_HTTP_RATIO))
    cpu_with, cpu_without = with_watchers["server_cpu_ms_per_request"], without["server_cpu_ms_per_request"]
    rows.append(Row("5", "the same: server CPU per request; the watchers' own (they read "
                         f"{with_watchers['events_read']:,} events)",
                    f"{cpu_with:.2f} ms; {with_watchers['watchers_cpu_ms_per_request']:.2f} ms",
                    baseline=f"none: {cpu_without:.2f} ms", ratio=f"{cpu_with / cpu_without:.2f}"))
    return SectionResult(rows, details)


def http_load_setup(server: ServerProcess) -> None:
    """The project, namespace, quota and VMs of http_load's level of 10 clients."""
    from benchmarks.common import BIG_HARD, vm_manifest
    client = Client(server.url)
    ns = http_load.NS
    client.post("/apis/vmquota.io/v1/projects", {"metadata": {"name": ns},
                                                "spec": {"resourceQuota": {"hard": dict(BIG_HARD)}}})
    client.post("/api/v1/namespaces", {"metadata": {"name": ns, "labels": {"vmquota.io/project": ns}}})
    client.post(f"/api/v1/namespaces/{ns}/resourcequotas", {"metadata": {"name": "compute"},
                                                            "spec": {"hard": dict(BIG_HARD)}})
    for c in range(10):
        for v in range(http_load.VMS_PER_CLIENT):
            client.post(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines",
                        vm_manifest(f"c{c}-{v}", cores=1, memory="1Gi", disk=None))
    client.close()
