"""Section 3: start and stop requests over HTTP against a real server, with 1, 10 and 50 concurrent clients.

The server is `vmquota serve --hypervisor test:///default` in its own process, so the clients' interpreter
never competes with the server's for its GIL (both still share the machine's cores, as on a real host).
The clients are closed-loop: each sends its next request as soon as the previous answer is read, over
one kept-alive connection, from one asyncio loop (a thread per client would add the client's own GIL
waits to every latency). Each client owns VMs and toggles them: start a VM, stop it, start the next one.
The VMs have no disks: a start costs the controller no qemu-img run, and the figure is the API's.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BIG_HARD,
    Row,
    SectionResult,
    ServerProcess,
    fmt_ms,
    percentile,
    progress,
    vm_manifest,
)
from vmquota import workers
from vmquota.client import Client, action_path
from vmquota.waiting import wait_until

NS = "bench-http"
# A VM comes back to its client after 60 requests, so its stop is confirmed by then even when the controller
# runs behind a burst (with 8, a tenth of the 50-client level's starts met a VM still Stopping: 409).
VMS_PER_CLIENT = 30
TARGET_P99_S = 0.050


def _request(path: str) -> bytes:
    return f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode()


async def _client(port: int, requests: list[bytes], latencies: list[float], codes: Counter[int],
                  go: asyncio.Event, tls: ssl.SSLContext | None = None) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls,
                                                   server_hostname="127.0.0.1" if tls else None)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await go.wait()
    try:
        for request in requests:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            codes[int(head[9:12])] += 1
    finally:
        writer.close()
        await writer.wait_closed()


async def _load(port: int, plans: list[list[bytes]],
                tls: ssl.SSLContext | None = None) -> tuple[list[float], Counter[int], float]:
    latencies: list[float] = []
    codes: Counter[int] = Counter()
    go = asyncio.Event()
    tasks = [asyncio.create_task(_client(port, plan, latencies, codes, go, tls)) for plan in plans]
    await asyncio.sleep(0.2)  # every connection is open before the first request
    t0 = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    return latencies, codes, time.perf_counter() - t0


def _plans(clients: int, per_client: int) -> list[list[bytes]]:
    """Client c: start vm c-0, stop it, start c-1, stop it, ... round its own VMs."""
    plans = []
    for c in range(clients):
        plan = []
        for j in range(per_client):
            vm = f"c{c}-{(j // 2) % VMS_PER_CLIENT}"
            plan.append(_request(action_path(NS, vm, "start" if j % 2 == 0 else "stop")))
        plans.append(plan)
    return plans


def _settle(client: Client) -> None:
    """Until every VM is Stopped: the next level starts from the same state."""
    def settled() -> bool:
        items = client.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines")["items"]
        return all((vm.get("status") or {}).get("printableStatus") == "Stopped" for vm in items)
    wait_until(settled, timeout=120, what="every VM to be Stopped", interval=0.1)


def _measure(api_processes: int, levels: list[int], requests: int) -> dict[str, dict[str, Any]]:
    """`requests` per level against a fresh server with `api_processes`, spread over the level's clients (an
    even number each: starts and stops). The figures of each level, by its number of clients."""
    figures: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="vmquota-bench-http-") as tmp:
        server = ServerProcess(Path(tmp) / "data", "test:///default", api_processes=api_processes)
        server.start()
        client = Client(server.url)
        try:
            client.post("/apis/vmquota.io/v1/projects", {"metadata": {"name": NS},
                                                        "spec": {"resourceQuota": {"hard": dict(BIG_HARD)}}})
            client.post("/api/v1/namespaces", {"metadata": {"name": NS, "labels": {"vmquota.io/project": NS}}})
            client.post(f"/api/v1/namespaces/{NS}/resourcequotas",
                        {"metadata": {"name": "compute"}, "spec": {"hard": dict(BIG_HARD)}})
            for c in range(max(levels)):
                for v in range(VMS_PER_CLIENT):
                    client.post(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines",
                                vm_manifest(f"c{c}-{v}", cores=1, memory="1Gi", disk=None))
            for clients in levels:
                per_client = max(2, requests // clients // 2 * 2)
                asyncio.run(_load(server.port, _plans(clients, 2 * VMS_PER_CLIENT)))  # warm-up, untimed
                _settle(client)
                cpu0 = server.cpu_seconds()
                latencies, codes, elapsed = asyncio.run(_load(server.port, _plans(clients, per_client)))
                cpu = server.cpu_seconds() - cpu0
                t0 = time.perf_counter()
                _settle(client)
                catch_up = time.perf_counter() - t0
                total = len(latencies)
                p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
                progress(f"http, {api_processes} API process{'es' if api_processes > 1 else ''}: {clients} clients: "
                         f"{total / elapsed:,.0f} req/s, p50 {fmt_ms(p50)}, p99 {fmt_ms(p99)}, codes {dict(codes)}, "
                         f"every VM Stopped {catch_up:.1f}s after the last")
                figures[str(clients)] = {
                    "requests": total, "seconds": elapsed, "requests_per_s": total / elapsed,
                    "p50_ms": p50 * 1000, "p90_ms": percentile(latencies, 90) * 1000, "p99_ms": p99 * 1000,
                    "max_ms": max(latencies) * 1000, "status_codes": dict(codes),
                    "refused": sum(n for c, n in codes.items() if c >= 300),
                    "server_cpu_ms_per_request": cpu / total * 1000,
                    "controller_caught_up_after_s": catch_up}
        finally:
            client.close()
            server.stop()
    return figures


def _shown(level: dict[str, Any]) -> str:
    return f"{level['requests_per_s']:,.0f}/s; {fmt_ms(level['p50_ms'] / 1000)}; {fmt_ms(level['p99_ms'] / 1000)}"


def http_load(levels: list[int], requests: int) -> SectionResult:
    """Every level against a server as `vmquota serve` starts by default (an API process per core), then the
    busiest level against one API process: the baseline, in the same run, for what the other processes add."""
    processes = workers.default_count()
    measured = _measure(processes, levels, requests)
    top = str(max(levels))
    details: dict[str, Any] = {"vms_per_client": VMS_PER_CLIENT, "api_processes": processes, "levels": measured}
    rows: list[Row] = []
    for clients in levels:
        level = measured[str(clients)]
        last = clients == max(levels)
        rows.append(Row("3", f"HTTP start/stop, {clients} client{'s' if clients > 1 else ''}, {processes} API "
                             f"process{'es' if processes > 1 else ''}: req/s; p50; p99", _shown(level),
                        baseline=f"{level['refused']} non-2xx", target="p99 < 50 ms" if last else "",
                        met=level["p99_ms"] < TARGET_P99_S * 1000 if last else None))
    if processes == 1:  # a one-core machine: the default is the baseline
        return SectionResult(rows, details)
    single = details["one_api_process"] = _measure(1, [max(levels)], requests)[top]
    rows.append(Row("3", f"HTTP start/stop, {top} clients, 1 API process: req/s; p50; p99", _shown(single),
                    baseline=f"{single['refused']} non-2xx"))
    rows.append(Row("3", f"req/s at {top} clients, {processes} API processes against 1",
                    f"{measured[top]['requests_per_s']:,.0f}/s", baseline=f"{single['requests_per_s']:,.0f}/s",
                    ratio=f"{measured[top]['requests_per_s'] / single['requests_per_s']:.2f}"))
    return SectionResult(rows, details)
