"""A scrape of GET /metrics at 100,000 VMs (1,000 namespaces, each with a quota; 100 projects), and the cost
the usage history adds to an admitted start.

Scrape: the store is filled as the recount benchmark fills it (half the VMs running, with their charges), and
`metrics.scrape` runs as the handler runs it; the figure is its median over a few runs, with the size of the
exposition. Target: under 1 s.

History: `accounting.set_charge` of a start and a stop against two covering quotas (a ResourceQuota and the
project), each in its own transaction, with the usage points written (as served) and with them left out
(the store's `add_usage_point` made a no-op); the figure is the ratio of the medians. Target: at most 1.1.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import BIG_HARD, Row, SectionResult, fill, fmt_ms, median, new_store, progress, recount

PER_PROJECT = 10


def scrape_section(vms: int = 100_000, namespaces: int = 1_000, runs: int = 5) -> SectionResult:
    from vmquota.apiserver import metrics
    from vmquota.objects import PROJECT
    from vmquota.vmstatus import Phase

    with tempfile.TemporaryDirectory() as root:
        store = new_store(Path(root))
        progress(f"filling a store with {vms} VMs in {namespaces} namespaces")
        per_ns = vms // namespaces
        with store.transaction() as txn:
            for p in range(max(1, namespaces // PER_PROJECT)):
                txn.create(PROJECT, {"metadata": {"name": f"p{p}"},
                                     "spec": {"resourceQuota": {"hard": dict(BIG_HARD)}}})
            for n in range(namespaces):
                fill(txn, f"ns{n}", (f"vm{i}" for i in range(per_ns)),
                     phase_of=lambda i: Phase.RUNNING if i % 2 else Phase.STOPPED, project=f"p{n // PER_PROJECT}")
        recount(store)
        seconds, cpu, size = [], [], 0
        for _ in range(runs):
            t0, c0 = time.perf_counter(), time.process_time()
            size = len(metrics.scrape(store))
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        store.close()
    scrape_s, cpu_s = median(seconds), median(cpu)
    # The CPU time is reported beside the wall time: on a machine shared with other work the wall time of a
    # scrape grows with the load, its CPU time much less.
    return SectionResult(
        rows=[Row("metrics", f"scrape at {vms} VMs (median of {runs})", fmt_ms(scrape_s), target="< 1000 ms",
                  met=scrape_s < 1.0),
              Row("metrics", "its CPU time (median)", fmt_ms(cpu_s)),
              Row("metrics", "exposition size", f"{size / 1e6:.1f} MB")],
        details={"vms": vms, "namespaces": namespaces, "seconds": seconds, "cpu_seconds": cpu, "bytes": size})


def history_section(starts: int = 2_000) -> SectionResult:
    from decimal import Decimal

    from vmquota import accounting, objects
    from vmquota.store import Transaction

    def run(with_history: bool) -> float:
        with tempfile.TemporaryDirectory() as root:
            store = new_store(Path(root))
            with store.transaction() as txn:
                txn.create(objects.PROJECT, {"metadata": {"name": "p"},
                                             "spec": {"resourceQuota": {"hard": dict(BIG_HARD)}}})
                fill(txn, "ns", [], phase_of=lambda i: None, project="p")  # type: ignore[arg-type, return-value]
            recount(store)
            original = Transaction.add_usage_point
            if not with_history:
                Transaction.add_usage_point = lambda *args, **kwargs: None  # type: ignore[method-assign]
            try:
                charge = {"limits.cpu": Decimal(2), "limits.memory": Decimal(2**31)}
                times = []
                for i in range(starts):
                    t0 = time.perf_counter()
                    with store.transaction() as txn:
                        accounting.set_charge(txn, "ns", f"vm{i % 50}", charge if i % 2 == 0 else {}, enforce=True,
                                              subject="vm")
                    times.append(time.perf_counter() - t0)
            finally:
                Transaction.add_usage_point = original  # type: ignore[method-assign]
                store.close()
        return median(times)

    progress(f"{starts} starts and stops with and without the usage history, alternating rounds")
    with_h, without_h = [], []
    for _ in range(3):  # alternate, so a slow moment of the machine falls on both
        without_h.append(run(False))
        with_h.append(run(True))
    ratio = median(with_h) / median(without_h)
    return SectionResult(
        rows=[Row("history", "start/stop with history (median)", fmt_ms(median(with_h)),
                  baseline=fmt_ms(median(without_h)), ratio=f"{ratio:.3f}", target="<= 1.1", met=ratio <= 1.1)],
        details={"with_ms": [s * 1000 for s in with_h], "without_ms": [s * 1000 for s in without_h]})
