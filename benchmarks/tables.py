"""Section "tables": a meta.k8s.io Table of 10,000 VMs against the plain list of the same VMs, in the same run.

A `vmquota serve` process (one API process, `test:///default`) over a store filled with 10,000 stopped VMs in
10 namespaces, a tenth of them labelled `app=web`. Each round asks, on one kept-alive connection, for the plain
VirtualMachineList and for the Table kubectl 1.32 asks for (its own Accept header), alternating which comes
first; each figure is the median time to the response's last byte. A Table's cells and metadata are cut out
of the bodies by SQLite (`Reader.extract`) and kept per object version in the API process (`PartsCache`), so
the rounds measure a repeated `kubectl get` (SQLite reads the key columns only); the first Table, made
before anything was kept, is reported apart, from one run. Two more figures, without targets: a list
selected by label (SQLite evaluates the selector) and a Table of one name, against the same plain list; and
the whole Table read in pages of 500 as kubectl 1.32 reads it (`--chunk-size` 500), against the plain list
read the same way (a page is cut out of the bodies it read, `Reader.cut`, not kept).
"""

from __future__ import annotations

import http.client
import json
import tempfile
import time
import urllib.parse
from pathlib import Path

from benchmarks.common import Row, SectionResult, ServerProcess, fill, fmt_ms, median, new_store, progress, recount
from vmquota.objects import VIRTUAL_MACHINE
from vmquota.vmstatus import Phase

TARGET_RATIO = 1.5
KUBECTL_ACCEPT = ("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,"
                  "application/json")
VMS_PATH = "/apis/kubevirt.io/v1/virtualmachines"


def _timed_get(conn: http.client.HTTPConnection, path: str, accept: str) -> tuple[float, int]:
    """Seconds to the last byte of one GET, and the body's size."""
    started = time.perf_counter()
    conn.request("GET", path, headers={"Accept": accept})
    response = conn.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"GET {path} answered {response.status}: {body[:200]!r}")
    return elapsed, len(body)


def _timed_pages(conn: http.client.HTTPConnection, path: str, limit: int, accept: str) -> float:
    """Seconds to read a whole list in pages of `limit`, following continue tokens, as kubectl does."""
    started, token = time.perf_counter(), ""
    while True:
        query = f"?limit={limit}" + (f"&continue={urllib.parse.quote(token)}" if token else "")
        conn.request("GET", path + query, headers={"Accept": accept})
        response = conn.getresponse()
        page = json.loads(response.read())
        token = page["metadata"].get("continue", "")
        if not token:
            return time.perf_counter() - started


def tables_section(vms: int = 10_000, rounds: int = 15, namespaces: int = 10) -> SectionResult:
    with tempfile.TemporaryDirectory(prefix="vmquota-bench-tables-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        progress(f"filling a store with {vms:,} VMs in {namespaces} namespaces")
        store = new_store(data_dir)
        per = vms // namespaces
        with store.transaction() as txn:
            for n in range(namespaces):
                made = fill(txn, f"ns-{n}", (f"vm-{i}" for i in range(per)), phase_of=lambda i: Phase.STOPPED)
                for vm in made[::10]:  # a tenth of them web servers, for the selected list
                    vm["metadata"]["labels"] = {"app": "web"}
                    txn.update(VIRTUAL_MACHINE, vm)
        recount(store)
        store.close()

        server = ServerProcess(data_dir, "test:///default")
        server.start()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        try:
            progress("warming up; the first Table is made with nothing kept yet")
            _timed_get(conn, VMS_PATH, "application/json")
            first_table, _ = _timed_get(conn, VMS_PATH, KUBECTL_ACCEPT)
            plain: list[float] = []
            table: list[float] = []
            selected: list[float] = []
            one: list[float] = []
            paged: list[float] = []
            paged_plain: list[float] = []
            sizes: dict[str, int] = {}
            progress(f"{rounds} rounds of plain list, Table, selected list and one-name Table")
            for r in range(rounds):
                order = [("plain", "application/json"), ("table", KUBECTL_ACCEPT)]
                for name, accept in order if r % 2 == 0 else reversed(order):
                    seconds, size = _timed_get(conn, VMS_PATH, accept)
                    (plain if name == "plain" else table).append(seconds)
                    sizes[name] = size
                seconds, sizes["selected"] = _timed_get(conn, VMS_PATH + "?labelSelector=app%3Dweb", "application/json")
                selected.append(seconds)
                seconds, sizes["one"] = _timed_get(conn, VMS_PATH + "?fieldSelector=metadata.name%3Dvm-5",
                                                   KUBECTL_ACCEPT)
                one.append(seconds)
                if r < 3:  # slow (each page is read at the first page's resourceVersion): a few runs say enough
                    paged_plain.append(_timed_pages(conn, VMS_PATH, 500, "application/json"))
                    paged.append(_timed_pages(conn, VMS_PATH, 500, KUBECTL_ACCEPT))
        finally:
            conn.close()
            server.stop()

    base, ratio = median(plain), median(table) / median(plain)
    rows = [
        Row("tables", f"Table of {vms:,} VMs (kubectl's Accept) vs the plain list", fmt_ms(median(table)),
            f"{fmt_ms(base)} plain list", f"{ratio:.2f}", f"<= {TARGET_RATIO}", ratio <= TARGET_RATIO),
        Row("tables", f"first Table of {vms:,} VMs, nothing kept yet (one run)", fmt_ms(first_table),
            f"{fmt_ms(base)} plain list", f"{first_table / base:.2f}"),
        Row("tables", f"Table of {vms:,} VMs in pages of 500, as kubectl reads it (all pages)",
            fmt_ms(median(paged)), f"{fmt_ms(median(paged_plain))} plain pages",
            f"{median(paged) / median(paged_plain):.2f}"),
        Row("tables", f"list selected by label (1 in 10 of {vms:,}) vs the plain list", fmt_ms(median(selected)),
            f"{fmt_ms(base)} plain list", f"{median(selected) / base:.2f}"),
        Row("tables", f"Table of one name (fieldSelector) among {vms:,}", fmt_ms(median(one)),
            f"{fmt_ms(base)} plain list", f"{median(one) / base:.3f}"),
    ]
    details = {"vms": vms, "rounds": rounds, "bytes": sizes, "first_table_ms": first_table * 1000,
               "plain_ms": [s * 1000 for s in plain], "table_ms": [s * 1000 for s in table],
               "selected_ms": [s * 1000 for s in selected],
               "paged_ms": [s * 1000 for s in paged],
               "paged_plain_ms": [s * 1000 for s in paged_plain], "one_name_ms": [s * 1000 for s in one]}
    return SectionResult(rows, details)

