"""Section 6: a full recount from scratch, `Controller.resync()`, of 100,000 VMs in 1,000 namespaces.

Runs in a child process of its own, so its memory figures are its own. The child fills a store (1,000
namespaces, each with a ResourceQuota; groups of 10 in 100 projects; half of the VMs running, with their
charges) and defines a real simulated domain for every VM on `test:///default`, in the same process as
libvirt's test driver lives there, started for the running half: the hypervisor side of the recount lists
100,000 real domains through getAllDomainStats. Every VM also has its (empty) disk folder, which the
recount's garbage collection walks. Then it times `resync()` on a fresh controller: list every VM, compare
with every domain, queue what differs (nothing here), collect garbage, rebuild every quota's used from the
ledger.

Memory: the resident set before the recount, and its peak during it (Linux's peak counter is reset just
before); the difference is what the recount itself needs. The simulated host's own memory (its 100,000
domains) is in the baseline, as libvirtd's would be in another process on a real host. A second,
untimed recount under tracemalloc gives the peak of Python's own allocations.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from benchmarks.common import Row, SectionResult, fmt_ms, median, progress

PER_PROJECT = 10  # namespaces in each project
TARGET_S = 2.0
TARGET_MB = 500


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Make VmHWM start again from the current resident set (Linux's clear_refs, value 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build(root: Path, vms: int, namespaces: int) -> tuple[Any, Any, Any, Any, dict[str, float]]:
    """The store, a connected hypervisor, the disks and our own connection to the simulated host, filled."""
    import libvirt

    from benchmarks.common import BIG_HARD, fill, new_store, recount, vm_manifest
    from vmquota import domainxml, vmspec
    from vmquota.disks import Disks
    from vmquota.hypervisor import Hypervisor
    from vmquota.objects import PROJECT
    from vmquota.vmstatus import Phase

    per_ns = vms // namespaces
    seconds = {}
    store = new_store(root)
    t0 = time.perf_counter()
    made = []
    with store.transaction() as txn:
        for p in range(namespaces // PER_PROJECT):
            txn.create(PROJECT, {"metadata": {"name": f"p{p}"}, "spec": {"resourceQuota": {"hard": dict(BIG_HARD)}}})
        for n in range(namespaces):
            made += fill(txn, f"ns{n}", (f"vm{i}" for i in range(per_ns)),
                         phase_of=lambda i: Phase.RUNNING if i % 2 else Phase.STOPPED, project=f"p{n // PER_PROJECT}")
    recount(store)
    seconds["store"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    hypervisor = Hypervisor("test:///default", instance=store.instance_id)
    hypervisor.connect()
    host = libvirt.open("test:///default")
    spec = vmspec.read(vm_manifest("vm0"))
    for vm in made:
        meta = vm["metadata"]
        xml = domainxml.build(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"],
                              instance=store.instance_id, spec=spec, disks=[], domain_type="test")
        dom = host.defineXML(xml)
        if vm["status"]["phase"] == Phase.RUNNING.value:
            dom.create()
    seconds["domains"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    disks = Disks(root / "disks")
    for vm in made:
        disks.vm_dir(vm["metadata"]["namespace"], vm["metadata"]["uid"]).mkdir(parents=True)
    seconds["disk_dirs"] = time.perf_counter() - t0
    return store, hypervisor, disks, host, seconds


def child(vms: int, namespaces: int, repeats: int, profile: bool = False) -> dict[str, Any]:
    from vmquota.controller import Controller

    with tempfile.TemporaryDirectory(prefix="vmquota-bench-recount-") as tmp:
        store, hypervisor, disks, host, setup = build(Path(tmp), vms, namespaces)
        controller = Controller(store=store, hypervisor=hypervisor, disks=disks)
        gc.collect()
        rss_before = _status_kb("VmRSS")
        peak_reset = _reset_peak()
        t0 = time.perf_counter()
        drifted = controller.resync()
        first = time.perf_counter() - t0
        peak = _status_kb("VmHWM")
        assert drifted == [], drifted
        queued = len(controller.queue._queued)
        again = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            controller.resync()
            again.append(time.perf_counter() - t0)
        if profile:  # where a recount's time goes, on stderr
            import cProfile
            import pstats
            profiler = cProfile.Profile()
            profiler.runcall(controller.resync)
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
        tracemalloc.start()
        controller.resync()
        traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        domains = host.listAllDomains()
        return {"vms": vms // namespaces * namespaces, "namespaces": namespaces, "projects": namespaces // PER_PROJECT,
                "domains": len(domains), "running": sum(1 for d in domains if d.isActive()),
                "setup_seconds": setup, "first_resync_s": first, "later_resync_s": again,
                "queued_after_resync": queued, "rss_before_mb": rss_before / 1024, "peak_rss_mb": peak / 1024,
                "peak_reset": peak_reset, "recount_peak_mb": (peak - rss_before) / 1024 if peak_reset else None,
                "tracemalloc_peak_mb": traced_peak / 2**20}


def recount_section(vms: int, namespaces: int, repeats: int = 3) -> SectionResult:
    progress(f"recount: filling {vms:,} VMs and defining as many simulated domains (a child process)")
    done = subprocess.run([sys.executable, "-m", "benchmarks.recount", "--vms", str(vms),
                           "--namespaces", str(namespaces), "--repeats", str(repeats)],
                          capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the recount child failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    s = result["setup_seconds"]
    progress(f"recount: setup: store {s['store']:.1f}s, domains {s['domains']:.1f}s, "
             f"disk folders {s['disk_dirs']:.1f}s")
    first, mem = result["first_resync_s"], result["recount_peak_mb"]
    what = f"{result['vms']:,} VMs, {namespaces:,} namespaces, {result['domains'] - 1:,} domains"
    rows = [Row("6", f"full recount (resync) of {what}: time", fmt_ms(first),
                baseline=f"later runs: {fmt_ms(median(result['later_resync_s']))}", target="< 2 s",
                met=first < TARGET_S),
            Row("6", "  peak memory of that recount (resident set, above the process before it)",
                f"{mem:.0f} MB" if mem is not None else "n/a",
                baseline=f"whole process {result['peak_rss_mb']:.0f} MB; "
                         f"Python heap {result['tracemalloc_peak_mb']:.0f} MB",
                target="< 500 MB", met=mem is not None and mem < TARGET_MB)]
    return SectionResult(rows, result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, required=True)
    parser.add_argument("--namespaces", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print a profile of one more recount on stderr")
    args = parser.parse_args()
    print(json.dumps(child(args.vms, args.namespaces, args.repeats, args.profile)))
