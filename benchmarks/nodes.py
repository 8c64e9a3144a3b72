"""The nodes section (issue 13): admission with placement across 100 simulated nodes against one, and a full
recount over 100 simulated nodes holding 100,000 VMs.

Every node is a libvirt test-driver host of its own (`test:///<file>`, one file per node, with its CPUs and
memory), so placement reads 100 real Node objects and the recount asks 100 real (simulated) hosts for their
domains, in parallel, as it asks real hosts.

1. An admitted start is exactly what `PUT .../start` does in its transaction: quota admission, placement (every
   node's allocatable, what is placed on it, its labels and taints, read by one statement), the reservation.
   The same starts run in turn on a store with 1 node and one with 100; the ratio is of the medians.
2. The recount runs in a child process: 100,000 VMs in 1,000 namespaces, half of them running, spread over the
   100 nodes (each running VM's domain defined and started on its node's simulated host, through the same
   connection the controller uses: a test-driver host's state belongs to its connection).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Row, SectionResult, fill, fmt_ms, median, new_store, percentile, progress, recount
from vmquota import objects
from vmquota.hypervisor import ABSENT, Observed
from vmquota.vmstatus import Phase

NS = "bench"
PER_PROJECT = 10
RECOUNT_TARGET_S = 3.0
ADMISSION_TARGET = 1.5


def host_file(root: Path, index: int, *, cpus: int = 64, memory_gib: int = 512) -> str:
    path = root / f"node-{index}.xml"
    path.write_text(f"<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>{cpus}</cores><threads>1</threads>"
                    f"<active>{cpus}</active><mhz>2000</mhz><model>x86_64</model></cpu>"
                    f"<memory>{memory_gib * 1024 * 1024}</memory></node>")
    return f"test://{path}"


def node_object(name: str, uri: str) -> objects.Obj:
    """A Node as the heartbeat leaves it: Ready, with its allocatable."""
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}, "spec": {"providerID": uri},
            "status": {"capacity": {"cpu": "64", "memory": "512Gi"}, "allocatable": {"cpu": "64", "memory": "512Gi"},
                       "conditions": [{"type": "Ready", "status": "True", "reason": "HypervisorReady"}]}}


class FirstHost:
    """The server's own host in this benchmark: no domain on it, and no node either (every node is simulated)."""

    uri = "test:///bench-first-host"
    domain_type = "test"
    use_emulation = False

    def __init__(self, instance: str) -> None:
        self.instance = instance

    def observe(self, namespace: str, name: str) -> Observed:
        return ABSENT

    def close(self) -> None:
        pass


class Bed:
    """A store with `nodes` simulated nodes, one namespace of stopped VMs, and a controller on it."""

    def __init__(self, root: Path, nodes: int, vms: int) -> None:
        from vmquota.controller import Controller
        from vmquota.disks import Disks

        root.mkdir(parents=True)
        self.store = new_store(root)
        self.controller = Controller(store=self.store, hypervisor=FirstHost(self.store.instance_id),  # type: ignore[arg-type]
                                     disks=Disks(root / "disks"))
        self.nodes = nodes
        self.names = [f"vm-{i}" for i in range(vms)]
        with self.store.transaction() as txn:
            for i in range(nodes):
                txn.create(objects.NODE, node_object(f"node-{i}", host_file(root, i)))
            fill(txn, NS, self.names, phase_of=lambda _: Phase.STOPPED)
        recount(self.store)

    def start(self, name: str) -> str:
        with self.store.transaction() as txn:
            vm = txn.get(objects.VIRTUAL_MACHINE, NS, name)
            assert vm is not None
            self.controller.request_start(txn, vm)
            txn.update(objects.VIRTUAL_MACHINE, vm)
        return str(vm["status"]["nodeName"])

    def reset(self, name: str) -> None:
        with self.store.transaction() as txn:
            vm = txn.get(objects.VIRTUAL_MACHINE, NS, name)
            assert vm is not None
            self.controller.request_stop(txn, vm)
            txn.update(objects.VIRTUAL_MACHINE, vm)
        self.controller.reconcile((NS, name))  # the node's simulated host shows it off: confirmed

    def close(self) -> None:
        self.controller.shutdown()
        self.store.close()


def _round(bed: Bed, names: list[str]) -> list[float]:
    times = []
    for name in names:
        t0 = time.perf_counter()
        bed.start(name)
        times.append(time.perf_counter() - t0)
    for name in names:
        bed.reset(name)
    return times


def admission_with_nodes(starts: int, nodes: int = 100, vms: int = 1_000) -> SectionResult:
    rng = random.Random(13)
    with tempfile.TemporaryDirectory(prefix="vmquota-bench-nodes-") as tmp:
        one, many = Bed(Path(tmp) / "one", 1, vms), Bed(Path(tmp) / "many", nodes, vms)
        placed: set[str] = set()
        try:
            times: dict[int, list[float]] = {1: [], nodes: []}
            for bed in (one, many):
                _round(bed, rng.sample(bed.names, 10))  # warm-up
            while len(times[1]) < starts:
                for bed in (one, many):
                    batch = rng.sample(bed.names, 10)
                    times[bed.nodes] += _round(bed, batch)
            for name in rng.sample(many.names, 20):  # spread really spreads: the starts land on many nodes
                placed.add(many.start(name))
        finally:
            one.close()
            many.close()
    ratio = median(times[nodes]) / median(times[1])
    rows = [Row("13", "admitted start with placement, 1 node (median; p99)",
                f"{fmt_ms(median(times[1]))}; {fmt_ms(percentile(times[1], 99))}"),
            Row("13", f"the same, {nodes} simulated nodes (median; p99)",
                f"{fmt_ms(median(times[nodes]))}; {fmt_ms(percentile(times[nodes], 99))}", baseline="1 node",
                ratio=f"{ratio:.2f}", target=f"<= {ADMISSION_TARGET}", met=ratio <= ADMISSION_TARGET)]
    return SectionResult(rows, {"median_ms": {str(k): median(v) * 1000 for k, v in times.items()},
                                "n": len(times[1]), "ratio": ratio, "nodes_used_by_20_starts": len(placed)})


# -- the recount over 100 nodes: a child process -----------------------------------------------------------

def build_pool(root: Path, vms: int, namespaces: int, nodes: int) -> tuple[Any, Any, dict[str, float]]:
    from vmquota import domainxml, vmspec
    from vmquota.controller import Controller
    from vmquota.controller.placement import RUNS, reservation
    from vmquota.disks import Disks
    from vmquota.usage import OverheadModel, charge

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    store = new_store(root)
    controller = Controller(store=store, hypervisor=FirstHost(store.instance_id),  # type: ignore[arg-type]
                            disks=Disks(root / "disks"))
    uris = [host_file(root, i) for i in range(nodes)]
    made = []
    with store.transaction() as txn:
        for i, uri in enumerate(uris):
            txn.create(objects.NODE, node_object(f"node-{i}", uri))
        for p in range(namespaces // PER_PROJECT):
            txn.create(objects.PROJECT, {"metadata": {"name": f"p{p}"}, "spec": {}})
        per_ns = vms // namespaces
        for n in range(namespaces):
            made += fill(txn, f"ns{n}", (f"vm{i}" for i in range(per_ns)),
                         phase_of=lambda i: Phase.RUNNING if i % 2 else Phase.STOPPED, project=f"p{n // PER_PROJECT}")
        for index, vm in enumerate(made):
            if vm["status"]["phase"] == Phase.RUNNING.value:
                cpu, memory = reservation(charge(vmspec.read(vm), Phase.RUNNING, OverheadModel.NONE))
                txn.place(vm["metadata"]["namespace"], vm["metadata"]["name"], f"node-{index % nodes}", RUNS,
                          cpu, memory)
    recount(store)
    seconds["store"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    spec = vmspec.read(made[0])
    for index, vm in enumerate(made):
        if vm["status"]["phase"] != Phase.RUNNING.value:
            continue
        meta = vm["metadata"]
        conn = controller.ctx.hosts.for_uri(uris[index % nodes])._connection()  # the controller's own
        xml = domainxml.build(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"],
                              instance=store.instance_id, spec=spec, disks=[], domain_type="test")
        conn.defineXML(xml).create()
    seconds["domains"] = time.perf_counter() - t0
    return store, controller, seconds


def child(vms: int, namespaces: int, nodes: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vmquota-bench-nodes-recount-") as tmp:
        store, controller, setup = build_pool(Path(tmp), vms, namespaces, nodes)
        t0 = time.perf_counter()
        drifted = controller.resync()
        first = time.perf_counter() - t0
        assert drifted == [], drifted
        queued = len(controller.queue._queued)
        later = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            controller.resync()
            later.append(time.perf_counter() - t0)
        controller.shutdown()
        store.close()
    return {"vms": vms, "namespaces": namespaces, "nodes": nodes, "setup_seconds": setup, "first_resync_s": first,
            "later_resync_s": later, "queued_after_resync": queued}


def recount_over_nodes(vms: int, namespaces: int, nodes: int = 100, repeats: int = 3) -> SectionResult:
    progress(f"nodes: filling {vms:,} VMs over {nodes} simulated nodes (a child process)")
    done = subprocess.run([sys.executable, "-m", "benchmarks.nodes", "--vms", str(vms), "--namespaces",
                           str(namespaces), "--nodes", str(nodes), "--repeats", str(repeats)],
                          capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the nodes recount child failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    first = result["first_resync_s"]
    rows = [Row("13", f"full recount of {vms:,} VMs over {nodes} simulated nodes", fmt_ms(first),
                baseline=f"later runs: {fmt_ms(median(result['later_resync_s']))}",
                target=f"< {RECOUNT_TARGET_S:g} s", met=first < RECOUNT_TARGET_S)]
    return SectionResult(rows, result)


def nodes_section(*, quick: bool) -> SectionResult:
    admission = admission_with_nodes(starts=200 if quick else 2_000)
    counted = recount_over_nodes(vms=5_000 if quick else 100_000, namespaces=100 if quick else 1_000)
    return SectionResult(admission.rows + counted.rows, {"admission": admission.details,
                                                         "recount": counted.details})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, required=True)
    parser.add_argument("--namespaces", type=int, required=True)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(child(args.vms, args.namespaces, args.nodes, args.repeats)))
