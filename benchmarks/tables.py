"""Section "tables": a meta.k8s.io Table of 10,000 VMs against the plain list of the same VMs, in the same run.

A `vmquota serve` process (one API process, `test:///default`) over a store filled with 10,000 stopped VMs in
10 namespaces, a tenth of them labelled `app=web`, written by a store that keeps the Table parts as the server
does (`Store.keep`: the printer's fields and each row's metadata, in a side table written with each body).
Each round asks, on one kept-alive connection, for the plain VirtualMachineList and for the Table kubectl 1.32
asks for (its own Accept header), alternating which comes first; each figure is the median time to the
response's last byte. The first Table a fresh server process makes is measured apart, over several starts of
the server, alternating whether the plain list or the Table is asked first. Two more figures, without
targets: a list selected by label (SQLite evaluates the selector) and a Table of one name, against the same
plain list; and the whole Table read in pages of 500 as kubectl 1.32 reads it (`--chunk-size` 500), against
the plain list read the same way (a page is cut out of the bodies it read, `Reader.cut`). Last, what keeping
the parts costs a write: updates of the VMs (1,000 to a transaction, no fsync in between) in a store that
keeps them against one that does not, alternating.
"""

from __future__ import annotations

import http.client
import json
import tempfile
import time
import urllib.parse
from pathlib import Path

from benchmarks.common import Row, SectionResult, ServerProcess, fill, fmt_ms, median, new_store, progress, recount
from vmquota.apiserver import tables as printers
from vmquota.objects import VIRTUAL_MACHINE
from vmquota.store import Store
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


def _keeping(store: Store) -> Store:
    for kind, parts in printers.kept_parts().items():
        store.keep(kind, parts)
    return store


def _first_lists(data_dir: Path, starts: int) -> tuple[list[float], list[float]]:
    """(first plain lists, first Tables) of fresh server processes, one of each a start, alternating which
    is asked first: nothing is in the process yet, and the other one's reads warm only the OS page cache."""
    first_plain: list[float] = []
    first_table: list[float] = []
    for start in range(starts):
        server = ServerProcess(data_dir, "test:///default", api_processes=1)
        server.start()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        try:
            order = [(first_plain, "application/json"), (first_table, KUBECTL_ACCEPT)]
            for figures, accept in order if start % 2 == 0 else reversed(order):
                figures.append(_timed_get(conn, VMS_PATH, accept)[0])
        finally:
            conn.close()
            server.stop()
    return first_plain, first_table


def _write_cost(folder: Path, vms: int, batches: int) -> tuple[list[float], list[float]]:
    """Seconds per VM update (in transactions of 1,000) with the Table parts kept, and without."""
    stores = {"kept": _keeping(new_store(folder / "kept")), "plain": new_store(folder / "plain")}
    made = {}
    for name, store in stores.items():
        with store.transaction() as txn:
            made[name] = fill(txn, "ns", (f"vm-{i}" for i in range(vms)), phase_of=lambda i: Phase.STOPPED)
    seconds: dict[str, list[float]] = {"kept": [], "plain": []}
    for batch in range(batches):
        for name in ("kept", "plain") if batch % 2 == 0 else ("plain", "kept"):
            started = time.perf_counter()
            with stores[name].transaction() as txn:
                for vm in made[name]:
                    vm["status"]["printableStatus"] = "Stopped" if batch % 2 else "Starting"
                    txn.update(VIRTUAL_MACHINE, vm)
            seconds[name].append((time.perf_counter() - started) / vms)
    for store in stores.values():
        store.close()
    return seconds["kept"], seconds["plain"]


def tables_section(vms: int = 10_000, rounds: int = 15, namespaces: int = 10, first_starts: int = 4) -> SectionResult:
    with tempfile.TemporaryDirectory(prefix="vmquota-bench-tables-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        progress(f"filling a store with {vms:,} VMs in {namespaces} namespaces")
        store = _keeping(new_store(data_dir))
        per = vms // namespaces
        with store.transaction() as txn:
            for n in range(namespaces):
                made = fill(txn, f"ns-{n}", (f"vm-{i}" for i in range(per)), phase_of=lambda i: Phase.STOPPED)
                for vm in made[::10]:  # a tenth of them web servers, for the selected list
                    vm["metadata"]["labels"] = {"app": "web"}
                    txn.update(VIRTUAL_MACHINE, vm)
        recount(store)
        store.close()

        progress(f"the first plain list and the first Table of {first_starts} fresh server processes")
        first_plain, first_table = _first_lists(data_dir, first_starts)
        server = ServerProcess(data_dir, "test:///default", api_processes=1)
        server.start()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        try:
            progress("warming up")
            _timed_get(conn, VMS_PATH, "application/json")
            _timed_get(conn, VMS_PATH, KUBECTL_ACCEPT)
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
        progress("what keeping the Table parts costs a VM update")
        write_kept, write_plain = _write_cost(Path(tmp), min(vms, 1_000), 7)

    base, ratio = median(plain), median(table) / median(plain)
    first = median(first_table)
    rows = [
        Row("tables", f"Table of {vms:,} VMs (kubectl's Accept) vs the plain list", fmt_ms(median(table)),
            f"{fmt_ms(base)} plain list", f"{ratio:.2f}", f"<= {TARGET_RATIO}", ratio <= TARGET_RATIO),
        Row("tables", f"first Table of {vms:,} VMs of a fresh server process (median of {first_starts} starts)",
            fmt_ms(first), f"{fmt_ms(base)} plain list", f"{first / base:.2f}", f"<= {TARGET_RATIO}",
            first / base <= TARGET_RATIO),
        Row("tables", "the same, against the first plain list of a fresh process", fmt_ms(first),
            f"{fmt_ms(median(first_plain))} first plain list", f"{first / median(first_plain):.2f}"),
        Row("tables", f"Table of {vms:,} VMs in pages of 500, as kubectl reads it (all pages)",
            fmt_ms(median(paged)), f"{fmt_ms(median(paged_plain))} plain pages",
            f"{median(paged) / median(paged_plain):.2f}"),
        Row("tables", f"list selected by label (1 in 10 of {vms:,}) vs the plain list", fmt_ms(median(selected)),
            f"{fmt_ms(base)} plain list", f"{median(selected) / base:.2f}"),
        Row("tables", f"Table of one name (fieldSelector) among {vms:,}", fmt_ms(median(one)),
            f"{fmt_ms(base)} plain list", f"{median(one) / base:.3f}"),
        Row("tables", "a VM update with the Table parts kept (in transactions of 1,000)",
            f"{median(write_kept) * 1e6:.0f} us", f"{median(write_plain) * 1e6:.0f} us not kept",
            f"{median(write_kept) / median(write_plain):.2f}"),
    ]
    details = {"vms": vms, "rounds": rounds, "bytes": sizes, "first_table_ms": [s * 1000 for s in first_table],
               "first_plain_ms": [s * 1000 for s in first_plain],
               "plain_ms": [s * 1000 for s in plain], "table_ms": [s * 1000 for s in table],
               "selected_ms": [s * 1000 for s in selected],
               "paged_ms": [s * 1000 for s in paged],
               "paged_plain_ms": [s * 1000 for s in paged_plain], "one_name_ms": [s * 1000 for s in one],
               "update_kept_us": [s * 1e6 for s in write_kept], "update_plain_us": [s * 1e6 for s in write_plain]}
    return SectionResult(rows, details)
