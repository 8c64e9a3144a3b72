"""Crash safety on real KVM: `vmquota serve` is SIGKILLed at random moments while clients start, stop, restart,
clone, create and delete VMs, round after round.

After each kill, libvirt is left to finish whatever vmquota had asked of it; the store as it was committed at the
kill is read straight from its SQLite file; then the server starts again on the same data directory. Once it has
settled:

* usage equals libvirt's truth (the recount at start-up is the one recount allowed) and no used exceeds hard;
* no VM is lost: every VM the store had committed, and every create a client was told succeeded, still exists;
* none is started twice: a domain that ran for a VM that was to keep running has the same domain ID as before
  (the two `keep-*` VMs, never touched by the clients, keep theirs across all rounds);
* no domain and no disk file is leaked, and no half-written disk is left;
* no admitted-but-never-started charge is left behind: no VM stays in Starting (or any transient phase).
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import libvirt
import pytest
from conftest import vm_manifest, wait_until
from kvm_harness import URI, Server
from reliability import profile
from reliability.invariants import (
    NAMESPACES,
    PROJECT_LABEL,
    PROJECTS,
    TRANSIENT,
    clones_path,
    events_path,
    look,
    quotas_path,
    violations,
    vms_path,
)

from vmquota.client import Client, ClientError, Unreachable, action_path

pytestmark = pytest.mark.kvm

CHURN = [f"w-{i}" for i in range(6)]
OPERATIONS = ["start"] * 4 + ["stop"] * 3 + ["restart"] * 2 + ["clone"] * 2 + ["create"] * 2 + ["delete"]


def small_vm(name: str, rng: random.Random, strategy: str | None = None) -> dict[str, Any]:
    return vm_manifest(name, cores=1, memory=rng.choice(["64Mi", "128Mi"]), disk=rng.choice([None, "64Mi"]),
                       strategy=strategy or rng.choice(["Halted", "Manual", "Always"]), grace=0)


class Workload:
    """Clients doing random operations until told to stop; each remembers what it was told and what was in flight."""

    def __init__(self, url: str, ns: str, seed: int) -> None:
        self.url, self.ns, self.rng = url, ns, random.Random(seed)
        self.stop = threading.Event()
        self.created: set[str] = set()  # creates (and clones) a client was told succeeded
        self.deleted: set[str] = set()  # deletes a client was told were accepted
        self.in_flight: set[str] = set()  # VMs an unanswered request was about when the server died
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def run(self, clients: int = 2) -> list[threading.Thread]:
        """Each client works on its own share of the names, so what it was told about a name is in order."""
        threads = [threading.Thread(target=self._loop, args=(self.rng.getrandbits(32), CHURN[i::clients]))
                   for i in range(clients)]
        for thread in threads:
            thread.start()
        return threads

    def _loop(self, seed: int, names: list[str]) -> None:
        rng = random.Random(seed)
        client = Client(self.url, timeout=30)
        try:
            while not self.stop.wait(rng.uniform(0, 0.03)):  # a little think time: VMs get to run between calls
                op, name, target = rng.choice(OPERATIONS), rng.choice(names), rng.choice(names)
                touched = {name, target} if op == "clone" else {name}
                with self.lock:
                    self.in_flight |= touched
                try:
                    self._do(client, rng, op, name, target)
                    result = "admitted"
                    with self.lock:
                        if op in ("create", "clone"):
                            created = target if op == "clone" else name
                            self.created.add(created)
                            self.deleted.discard(created)
                        elif op == "delete":
                            self.deleted.add(name)
                            self.created.discard(name)
                except ClientError as e:
                    result = str(e.code)
                    if e.code not in (403, 404, 409, 422):
                        self.failures.append(f"{op} {name}: {e.code} {e.message}")
                except Unreachable:
                    return  # the server was killed: this request's outcome is unknown, its VMs stay in flight
                with self.lock:
                    self.in_flight -= touched
                    self.outcomes[f"{op}: {result}"] += 1
        finally:
            client.close()

    def _do(self, client: Client, rng: random.Random, op: str, name: str, target: str) -> None:
        if op in ("start", "stop", "restart"):
            client.put(action_path(self.ns, name, op))
        elif op == "create":
            client.post(vms_path(self.ns), small_vm(name, rng))
        elif op == "delete":
            client.delete(f"{vms_path(self.ns)}/{name}")
        else:
            client.post(clones_path(self.ns), {"metadata": {"name": f"c-{uuid.uuid4().hex[:10]}"},
                                               "spec": {"source": {"name": name}, "target": {"name": target}}})


def domain_ids(conn: Any, ns: str) -> dict[str, tuple[str, int]]:
    """name -> (UUID, domain ID) of the running domains of the namespace."""
    found = {}
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        if dom.name().startswith(f"vmquota_{ns}_"):
            found[dom.name().split("_", 2)[2]] = (dom.UUIDString(), dom.ID())
    return found


def quiet_libvirt(conn: Any, ns: str) -> dict[str, tuple[str, int]]:
    """The running domains once libvirt has finished what the dead server had asked (two equal looks in a row)."""
    last = domain_ids(conn, ns)
    for _ in range(40):
        time.sleep(0.5)
        now = domain_ids(conn, ns)
        if now == last:
            return now
        last = now
    raise AssertionError(f"libvirt never settled after the kill: {last}")


def committed_vms(data_dir: Path) -> dict[str, dict[str, Any]]:
    """The VMs as the store had committed them when the server died, read from its SQLite file."""
    conn = sqlite3.connect(data_dir / "vmquota.db")
    try:
        rows = conn.execute("SELECT name, body FROM objects WHERE kind='VirtualMachine'").fetchall()
    finally:
        conn.close()
    return {name: json.loads(body) for name, body in rows}


def unsettled(client: Client, ns: str) -> list[str]:
    """VMs between two phases, being deleted, or whose disks are not made yet (no DataVolumesReady), in words."""
    found = []
    for vm in client.get(vms_path(ns))["items"]:
        status = vm.get("status", {})
        ready = any(c["type"] == "DataVolumesReady" and c["status"] == "True" for c in status.get("conditions", []))
        if status.get("printableStatus") in TRANSIENT or vm["metadata"].get("deletionTimestamp") or not ready:
            events = [f"{e['reason']}: {e['message']}" for e in client.get(events_path(ns))["items"]
                      if e["involvedObject"]["name"] == vm["metadata"]["name"]][-3:]
            found.append(f"{vm['metadata']['name']}: {status.get('printableStatus')}, deleting: "
                         f"{bool(vm['metadata'].get('deletionTimestamp'))}, disks ready: {ready}, "
                         f"conditions: {status.get('conditions')}, last events: {events}")
    return found


def wait_settled(client: Client, ns: str, what: str) -> None:
    deadline = time.monotonic() + 120
    while problems := unsettled(client, ns):
        assert time.monotonic() < deadline, f"{what}: never settled:\n" + "\n".join(problems)
        time.sleep(0.1)


def keeps_running(vm: dict[str, Any]) -> bool:
    """Whether the committed VM was to go on running as it was (not stopping, restarting or being deleted)."""
    status = vm.get("status") or {}
    return (status.get("phase") in ("Running", "Starting", "Paused") and not vm["metadata"].get("deletionTimestamp")
            and not status.get("stateChangeRequests"))


@pytest.mark.timeout(3600 if profile.LONG else 400)
def test_sigkill_at_random_moments_loses_nothing_and_starts_nothing_twice(tmp_path: Path) -> None:
    seed = int(os.environ.get("VMQUOTA_SEED", random.randrange(2**32)))
    print(f"\nseed {seed} (VMQUOTA_SEED={seed} replays the same kill moments and operations)")
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    server = Server(data_dir)
    server.start()
    conn = libvirt.open(URI)
    ns, project = f"crash-{uuid.uuid4().hex[:8]}", f"crash-{uuid.uuid4().hex[:8]}"
    client = Client(server.url)
    figures: Counter[str] = Counter()
    try:
        client.post(PROJECTS, {"metadata": {"name": project}, "spec": {"resourceQuota": {"hard": {
            "limits.cpu": "7", "limits.memory": "1Gi"}}}})
        client.post(NAMESPACES, {"metadata": {"name": ns, "labels": {PROJECT_LABEL: project}}})
        client.post(quotas_path(ns), {"metadata": {"name": "compute"}, "spec": {"hard": {
            "limits.cpu": "6", "requests.storage": "1Gi", "count/virtualmachines.kubevirt.io": "8"}}})
        client.post(vms_path(ns), small_vm("keep-a", rng, strategy="Always"))
        client.post(vms_path(ns), small_vm("keep-b", rng, strategy="Manual"))
        client.put(action_path(ns, "keep-b", "start"))
        wait_until(lambda: {"keep-a", "keep-b"} <= set(domain_ids(conn, ns)), timeout=60,
                   what="the two VMs that are never touched to run")
        wait_settled(client, ns, "the two VMs that are never touched")
        keep = {name: ident for name, ident in domain_ids(conn, ns).items() if name.startswith("keep-")}

        for round_no in range(profile.KILL_ROUNDS):
            workload = Workload(server.url, ns, rng.getrandbits(32))
            threads = workload.run()
            time.sleep(rng.uniform(0.2, 3.0))
            server.kill()
            figures["kills"] += 1
            workload.stop.set()
            for thread in threads:
                thread.join(timeout=60)
            figures.update(workload.outcomes)
            assert workload.failures == [], f"round {round_no}"

            before = quiet_libvirt(conn, ns)
            committed = committed_vms(data_dir)
            server.start()
            client.close()
            wait_settled(client, ns, f"round {round_no} (seed {seed}), after the restart")
            after = domain_ids(conn, ns)
            world = look(client, conn, [ns], [project])
            problems = violations(world, disks_root=data_dir / "disks")
            names = {key[1] for key in world.vms}
            problems += [f"VM {name} was committed before the kill and is gone" for name, vm in committed.items()
                         if name not in names and not vm["metadata"].get("deletionTimestamp")]
            problems += [f"VM {name} was created (the client was told so) and is gone"
                         for name in workload.created - names - workload.in_flight]
            problems += [f"VM {name} ran as domain {before[name]} and was started again as {after.get(name)}"
                         for name, vm in committed.items() if name in before and keeps_running(vm)
                         and name not in workload.in_flight and after.get(name) != before[name]]
            problems += [f"{name} was never touched and its domain changed: {keep[name]} -> {after.get(name)}"
                         for name in keep if after.get(name) != keep[name]]
            assert problems == [], f"round {round_no} (seed {seed}):\n" + "\n".join(problems)
            figures["rounds checked"] += 1
    finally:
        _clean_up(server, client, conn, ns, project, data_dir)
    profile.record("crash-safety", seed=seed, **dict(sorted(figures.items())))
    print(dict(sorted(figures.items())))


def _clean_up(server: Server, client: Client, conn: Any, ns: str, project: str, data_dir: Path) -> None:
    """Delete every VM through the (restarted if need be) server; then nothing of the namespace may remain."""
    try:
        if server.process is None or server.process.poll() is not None:
            server.start()
        for vm in client.get(vms_path(ns))["items"]:
            client.delete(f"{vms_path(ns)}/{vm['metadata']['name']}")
        wait_until(lambda: client.get(vms_path(ns))["items"] == [], timeout=120, what="every VM to be deleted")
        client.delete(f"{NAMESPACES}/{ns}")
        client.delete(f"{PROJECTS}/{project}")
    finally:
        client.close()
        server.stop()
        leftovers = [d for d in conn.listAllDomains() if d.name().startswith(f"vmquota_{ns}_")]
        for dom in leftovers:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        conn.close()
    assert leftovers == [], "domains left behind"
    assert not any((data_dir / "disks").rglob("*.qcow2")), "disk files left behind"
