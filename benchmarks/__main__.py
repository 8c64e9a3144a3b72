"""`python -m benchmarks [--quick] [--only SECTION,...] [--out FILE]`: run, print the table, write the JSON."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sqlite3
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from benchmarks.common import Row, SectionResult

SECTIONS = ("admission", "durable", "history", "http", "import", "kvm", "metrics", "realtime", "recount", "tables",
            "watch", "tenants", "migration", "dashboard", "nodes")


def plan(quick: bool, wanted: list[str]) -> list[tuple[str, Callable[[], SectionResult]]]:
    """The sections to run with their sizes; --quick keeps their shape and shrinks the counts."""
    from benchmarks import (
        admission,
        dashboard,
        http_load,
        imports,
        kvm,
        metrics,
        migration,
        nodes,
        recount,
        tables,
        tenants,
        watch,
    )

    steps: list[tuple[str, Callable[[], SectionResult]]] = []
    if "admission" in wanted:
        steps.append(("admission", lambda: admission.admission_vs_size(
            [10, 100, 1_000] if quick else [10, 1_000, 100_000], starts=200 if quick else 3_000)))
    if "durable" in wanted:
        steps.append(("durable", lambda: admission.durable_admission(vms=200 if quick else 1_000,
                                                                     batches=3 if quick else 7)))
    if "http" in wanted:
        steps.append(("http", lambda: http_load.http_load([1, 10, 50], requests=300 if quick else 3_000)))
    if "import" in wanted:
        steps.append(("import", lambda: imports.import_section(runs=2 if quick else 7)))
    kvm_wanted: set[str] = {s for s in ("kvm", "realtime") if s in wanted}
    if kvm_wanted:  # one server on qemu:///system serves both
        steps.append(("+".join(sorted(kvm_wanted)), lambda: kvm.kvm_sections(
            kvm_wanted, runs=3 if quick else 15, realtime_runs=5 if quick else 30)))
    if "metrics" in wanted:
        steps.append(("metrics", lambda: metrics.scrape_section(vms=5_000 if quick else 100_000,
                                                                namespaces=50 if quick else 1_000)))
    if "history" in wanted:
        steps.append(("history", lambda: metrics.history_section(starts=500 if quick else 2_000)))
    if "recount" in wanted:
        steps.append(("recount", lambda: recount.recount_section(vms=5_000 if quick else 100_000,
                                                                 namespaces=50 if quick else 1_000)))
    if "tables" in wanted:
        steps.append(("tables", lambda: tables.tables_section(vms=2_000 if quick else 10_000,
                                                               rounds=5 if quick else 15)))
    if "watch" in wanted:
        steps.append(("watch", lambda: watch.watch_section(changes=50 if quick else 300,
                                                           idle_watchers=200 if quick else 1_000,
                                                           hold=3.0 if quick else 10.0,
                                                           requests=300 if quick else 3_000)))
    if "tenants" in wanted:
        steps.append(("tenants", lambda: tenants.tenants_section(requests=600 if quick else 3_000,
                                                                 rounds=1 if quick else 3,
                                                                 decisions=2_000 if quick else 20_000)))
    if "migration" in wanted:
        steps.append(("migration", lambda: migration.migration_section(runs=3 if quick else 15)))
    if "nodes" in wanted:
        steps.append(("nodes", lambda: nodes.nodes_section(quick=quick)))
    if "dashboard" in wanted:
        steps.append(("dashboard", lambda: dashboard.dashboard_section(vms=1_000, rounds=3 if quick else 9)))
    return steps


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "sqlite": sqlite3.sqlite_version, "libvirt": libvirt.getVersion(), "machine": platform.machine()}


def table(rows: list[Row]) -> str:
    headers = ("#", "figure", "value", "baseline", "ratio", "target", "met")
    cells = [(r.section, r.figure, r.value, r.baseline, r.ratio, r.target,
              "" if r.met is None else "yes" if r.met else "NO") for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every section")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections among {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--out", default="bench-results/bench.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections: {', '.join(unknown)}")

    rows: list[Row] = []
    results: dict[str, Any] = {}
    failed = False
    started = time.time()
    for name, run in plan(args.quick, wanted):
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            result = run()
        except Exception as e:  # one broken section must not lose the others' figures
            traceback.print_exc()
            rows.append(Row(name, f"FAILED: {e}", ""))
            results[name] = {"error": repr(e)}
            failed = True
            continue
        rows += result.rows
        results[name] = {**result.details, "seconds": round(time.perf_counter() - t0, 1)}

    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"started": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(timespec="seconds"),
                "quick": args.quick, "machine": machine(), "rows": [r.as_dict() for r in rows], "sections": results}
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwritten: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
