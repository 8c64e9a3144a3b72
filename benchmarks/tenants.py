"""Section "tenants": what security costs.

1. HTTP start/stop at 50 clients, each on one kept-alive connection, as a tenant (alice, `edit` in her namespace
   through a RoleBinding, authenticated by a client certificate) against `vmquota serve` with its defaults: TLS,
   authentication, RBAC, audit. The baseline, in the same run and on the same machine: the same load against a
   server with plain HTTP and no authentication (`--plain-http --anonymous-auth --authorization-mode
   AlwaysAllow`). The figure is the ratio of the p99 latencies. The clients do their side of TLS in the same
   asyncio loop, on the same two cores.
2. One authorization decision (`Authorizer.authorize`, with the check that the policy is current) for a user
   bound in one namespace, with 10,000 RoleBindings in the store against 10: the policy indexes bindings by
   subject, so the ratio should stay near 1.
"""

from __future__ import annotations

import asyncio
import ssl
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BIG_HARD,
    Row,
    SectionResult,
    ServerProcess,
    fmt_ms,
    median,
    percentile,
    progress,
    vm_manifest,
)
from benchmarks.http_load import NS, VMS_PER_CLIENT, _load, _plans
from vmquota import identity, kubeconfig, objects, pki, rbac
from vmquota.apiserver.authorization import Authorizer
from vmquota.client import Client
from vmquota.kubeconfig import Connection
from vmquota.store import Store
from vmquota.waiting import wait_until

CLIENTS = 50
TARGET_HTTP_RATIO = 1.3
TARGET_RBAC_RATIO = 1.5


def _tls_for(data_dir: Path, tmp: Path) -> tuple[ssl.SSLContext, Connection]:
    """Alice's TLS context (her certificate from the server's CA) and the admin's connection."""
    ca = pki.Authority.load(data_dir)
    pair = ca.issue_client("alice", ["team-a"])
    cert, key = tmp / "alice.crt", tmp / "alice.key"
    pki.write_private(cert, pair.cert_pem)
    pki.write_private(key, pair.key_pem)
    context = ssl.create_default_context(cadata=ca.cert_pem)
    context.load_cert_chain(cert, key)
    return context, kubeconfig.load([kubeconfig.admin_path(data_dir)])


def _setup(client: Client) -> None:
    client.post("/apis/vmquota.io/v1/projects", {"metadata": {"name": NS}, "spec": {"resourceQuota": {
        "hard": dict(BIG_HARD)}}})
    client.post("/api/v1/namespaces", {"metadata": {"name": NS, "labels": {"vmquota.io/project": NS}}})
    client.post(f"/api/v1/namespaces/{NS}/resourcequotas", {"metadata": {"name": "compute"},
                                                            "spec": {"hard": dict(BIG_HARD)}})
    client.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings", {
        "metadata": {"name": "alice-edit"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"kind": "User", "name": "alice"}]})
    for c in range(CLIENTS):
        for v in range(VMS_PER_CLIENT):
            client.post(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines",
                        vm_manifest(f"c{c}-{v}", cores=1, memory="1Gi", disk=None))


def _settle(client: Client) -> None:
    states: Counter[str] = Counter()

    def settled() -> bool:
        items = client.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines")["items"]
        states.clear()
        states.update(str((vm.get("status") or {}).get("printableStatus")) for vm in items)
        return set(states) == {"Stopped"}
    try:
        wait_until(settled, timeout=120, what="every VM to be Stopped", interval=0.1)
    except TimeoutError as e:  # say which states the VMs were left in
        raise TimeoutError(f"{e}: {dict(states)}") from e


def _http(secure: bool, requests: int, rounds: int) -> dict[str, Any]:
    """p99 and throughput of `rounds` timed runs at CLIENTS clients against one fresh server."""
    with tempfile.TemporaryDirectory(prefix="vmquota-bench-tenants-") as folder:
        tmp = Path(folder)
        server = ServerProcess(tmp / "data", "test:///default", secure=secure)
        server.start()
        tls, admin_connection = _tls_for(server.data_dir, tmp) if secure else (None, Connection(server.url))
        client = Client(admin_connection)
        try:
            _setup(client)
            per_client = max(2, requests // CLIENTS // 2 * 2)
            asyncio.run(_load(server.port, _plans(CLIENTS, 2 * VMS_PER_CLIENT), tls))  # warm-up, untimed
            latencies: list[float] = []
            seconds = 0.0
            codes: dict[int, int] = {}
            _settle(client)
            cpu_before = server.cpu_seconds()
            for round_ in range(rounds):
                if round_:
                    _settle(client)
                measured, counted, elapsed = asyncio.run(_load(server.port, _plans(CLIENTS, per_client), tls))
                latencies += measured
                seconds += elapsed
                for code, n in counted.items():
                    codes[code] = codes.get(code, 0) + n
            _settle(client)
            # The steadier figure on a shared machine: the server's CPU (API processes and controller) per request.
            cpu_ms = (server.cpu_seconds() - cpu_before) / len(latencies) * 1000
        finally:
            client.close()
            server.stop()
    return {"p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000,
            "requests_per_s": len(latencies) / seconds, "status_codes": codes, "server_cpu_ms_per_request": cpu_ms}


def _decider(bindings: int, folder: Path) -> tuple[Store, Callable[[], object]]:
    """A store with `bindings` RoleBindings (in 100 namespaces) and one decision for the last one's user."""
    store = Store(folder / f"rbac-{bindings}.db")
    with store.transaction() as txn:
        txn.create(objects.CLUSTER_ROLE, {"metadata": {"name": "edit"}, "rules": [
            {"apiGroups": ["subresources.kubevirt.io"], "resources": ["virtualmachines/start"], "verbs": ["update"]}]})
        for index in range(bindings):
            txn.create(objects.ROLE_BINDING, {
                "metadata": {"name": f"b{index}", "namespace": f"ns{index % 100}"},
                "roleRef": {"apiGroup": rbac.GROUP, "kind": "ClusterRole", "name": "edit"},
                "subjects": [{"kind": "User", "name": f"user{index}"}]})
    authorizer = Authorizer(store)
    user = identity.authenticated(f"user{bindings - 1}", ("team",))
    allowed = rbac.Attributes(user, "update", True, "subresources.kubevirt.io", "virtualmachines", "start",
                              f"ns{(bindings - 1) % 100}", "web-1")
    assert authorizer.authorize(allowed).allowed  # builds the policy once, untimed
    return store, lambda: authorizer.authorize(allowed)


def _decisions(decisions: int, folder: Path) -> tuple[float, float]:
    """Median seconds per decision with 10 and with 10,000 RoleBindings, timed in alternating batches so that
    the machine's other load weighs on both alike."""
    stores: list[Store] = []
    try:
        timings: dict[int, list[float]] = {10: [], 10_000: []}
        deciders = {}
        for size in timings:
            store, decide = _decider(size, folder)
            stores.append(store)
            deciders[size] = decide
        for _ in range(9):
            for size, decide in deciders.items():
                t0 = time.perf_counter()
                for _ in range(decisions):
                    decide()
                timings[size].append((time.perf_counter() - t0) / decisions)
        return median(timings[10]), median(timings[10_000])
    finally:
        for store in stores:
            store.close()


def tenants_section(requests: int, rounds: int, decisions: int) -> SectionResult:
    plain = _http(False, requests, rounds)
    progress(f"tenants: plain HTTP, no auth, {CLIENTS} clients: p99 {fmt_ms(plain['p99_ms'] / 1000)}, "
             f"{plain['requests_per_s']:,.0f} req/s, server CPU {plain['server_cpu_ms_per_request']:.2f} ms/request, "
             f"codes {plain['status_codes']}")
    secure = _http(True, requests, rounds)
    progress(f"tenants: TLS, RBAC, audit, as alice, {CLIENTS} clients: p99 {fmt_ms(secure['p99_ms'] / 1000)}, "
             f"{secure['requests_per_s']:,.0f} req/s, server CPU {secure['server_cpu_ms_per_request']:.2f} "
             f"ms/request, codes {secure['status_codes']}")
    with tempfile.TemporaryDirectory(prefix="vmquota-bench-rbac-") as folder:
        few, many = _decisions(decisions, Path(folder))
    progress(f"tenants: an authorization decision: {few * 1e6:.1f} us with 10 RoleBindings, {many * 1e6:.1f} us "
             f"with 10,000")
    http_ratio = secure["p99_ms"] / plain["p99_ms"]
    rbac_ratio = many / few
    rows = [
        Row("7", f"HTTP start/stop p99, {CLIENTS} clients, keep-alive: TLS + RBAC + audit vs plain HTTP, no auth",
            f"{fmt_ms(secure['p99_ms'] / 1000)} ({secure['requests_per_s']:,.0f}/s)",
            baseline=f"{fmt_ms(plain['p99_ms'] / 1000)} ({plain['requests_per_s']:,.0f}/s)",
            ratio=f"{http_ratio:.2f}", target=f"<= {TARGET_HTTP_RATIO}", met=http_ratio <= TARGET_HTTP_RATIO),
        Row("7", "server CPU per start/stop (API processes and controller): TLS + RBAC + audit vs plain",
            f"{secure['server_cpu_ms_per_request']:.2f} ms", baseline=f"{plain['server_cpu_ms_per_request']:.2f} ms",
            ratio=f"{secure['server_cpu_ms_per_request'] / plain['server_cpu_ms_per_request']:.2f}"),
        Row("7", "authorization decision, 10,000 RoleBindings vs 10", f"{many * 1e6:.1f} us",
            baseline=f"{few * 1e6:.1f} us", ratio=f"{rbac_ratio:.2f}", target=f"<= {TARGET_RBAC_RATIO}",
            met=rbac_ratio <= TARGET_RBAC_RATIO),
    ]
    return SectionResult(rows, {"plain": plain, "secure": secure, "decision_us": {"10": few * 1e6,
                                                                                  "10000": many * 1e6}})
