"""Sections 1 and 2: admitted starts through accounting and the real store, with no hypervisor involved.

An admitted start here is exactly what `PUT .../start` does inside its transaction (`Api._vm_action`): read
the VM, `Controller.request_start` (run strategy, admission against the namespace's quota and its project,
the new charge, the event), write the VM back, commit. The hypervisor is a stand-in that reports every
domain off; the timed starts never call it. Between timed starts a VM is put back to Stopped the way a
confirmed stop does it (`request_stop`, then `reconcile`), untimed.
"""

from __future__ import annotations

import fcntl
import random
import sqlite3
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import Row, SectionResult, fill, fmt_ms, median, new_store, percentile, progress, recount
from vmquota import objects
from vmquota.controller import Controller
from vmquota.disks import Disks
from vmquota.hypervisor import ABSENT, Observed
from vmquota.store import _COVERING, Store, _connect, dumps, encode_resources
from vmquota.vmstatus import Phase

NS = "bench"
WRITERS = 8  # concurrent writers for the group-commit figure of section 2
PROJECT = "bench-project"


class OffHypervisor:
    """A hypervisor on which every domain is off; it counts calls so a timed start can prove it made none."""

    domain_type = "test"

    def __init__(self) -> None:
        self.calls = 0

    def observe(self, namespace: str, name: str) -> Observed:
        self.calls += 1
        return ABSENT

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the admission benchmark must not reach the hypervisor ({name})")


class Bed:
    """A store holding one namespace (in a project) with `size` stopped VMs, and a controller on it."""

    def __init__(self, root: Path, size: int) -> None:
        self.size = size
        self.store: Store = new_store(root)
        self.hypervisor = OffHypervisor()
        self.controller = Controller(store=self.store, hypervisor=self.hypervisor,  # type: ignore[arg-type]
                                     disks=Disks(root / "disks"))
        self.names = [f"vm-{i}" for i in range(size)]
        with self.store.transaction() as txn:
            txn.create(objects.PROJECT, {"metadata": {"name": PROJECT},
                                         "spec": {"resourceQuota": {"hard": {"limits.cpu": "10000000",
                                                                             "limits.memory": "1Ei"}}}})
            fill(txn, NS, self.names, phase_of=lambda _: Phase.STOPPED, project=PROJECT)
        recount(self.store)

    def start(self, name: str) -> None:
        """One admitted start, as `PUT .../start` runs it."""
        with self.store.transaction() as txn:
            vm = txn.get(objects.VIRTUAL_MACHINE, NS, name)
            assert vm is not None
            self.controller.request_start(txn, vm)
            txn.update(objects.VIRTUAL_MACHINE, vm)

    def reset(self, name: str) -> None:
        """Back to Stopped, charge released, the way a stop the hypervisor confirmed does it."""
        with self.store.transaction() as txn:
            vm = txn.get(objects.VIRTUAL_MACHINE, NS, name)
            assert vm is not None
            self.controller.request_stop(txn, vm)
            txn.update(objects.VIRTUAL_MACHINE, vm)
        self.controller.reconcile((NS, name))

    def close(self) -> None:
        self.store.close()


def _timed_starts(bed: Bed, names: list[str]) -> list[float]:
    times = []
    calls = bed.hypervisor.calls
    for name in names:
        t0 = time.perf_counter()
        bed.start(name)
        times.append(time.perf_counter() - t0)
    assert bed.hypervisor.calls == calls, "a timed start reached the hypervisor"
    for name in names:
        bed.reset(name)
    return times


def admission_vs_size(sizes: list[int], starts: int) -> SectionResult:
    """Section 1: time per admitted start with `sizes` VMs in the namespace, measured interleaved."""
    rng = random.Random(5)
    with tempfile.TemporaryDirectory(prefix="vmquota-bench-admission-") as tmp:
        beds = []
        for size in sizes:
            t0 = time.perf_counter()
            beds.append(Bed(Path(tmp) / f"n{size}", size))
            progress(f"admission: {size} VMs inserted in {time.perf_counter() - t0:.1f}s")
        batch = min(10, *sizes)
        times: dict[int, list[float]] = {size: [] for size in sizes}
        for bed in beds:  # warm-up: first connections, caches, the first event rows
            _timed_starts(bed, rng.sample(bed.names, batch))
        while len(times[sizes[0]]) < starts:  # rounds over every size, so drift hits them alike
            for bed in beds:
                times[bed.size] += _timed_starts(bed, rng.sample(bed.names, batch))
        for bed in beds:
            bed.close()
    small, large = sizes[0], sizes[-1]
    ratio = median(times[large]) / median(times[small])
    rows = [Row("1", f"admitted start, {size:,} VMs in the namespace (median; p99)",
                f"{fmt_ms(median(times[size]))}; {fmt_ms(percentile(times[size], 99))}",
                baseline=f"{small:,} VMs" if size != small else "",
                ratio=f"{median(times[size]) / median(times[small]):.2f}" if size != small else "",
                target="<= 1.5" if size == large else "", met=ratio <= 1.5 if size == large else None)
            for size in sizes]
    details = {str(size): {"median_ms": median(t) * 1000, "mean_ms": sum(t) / len(t) * 1000,
                           "p99_ms": percentile(t, 99) * 1000, "n": len(t)} for size, t in times.items()}
    return SectionResult(rows, {"per_size": details, "ratio_largest_over_smallest": ratio, "target": 1.5})


# -- section 2 -------------------------------------------------------------------------------------------

def _raw_commits(conn: sqlite3.Connection, count: int) -> float:
    """Seconds for `count` one-row UPDATE transactions, committed one by one."""
    t0 = time.perf_counter()
    for _ in range(count):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE bench SET value = value + 1 WHERE id = 1")
        conn.execute("COMMIT")
    return time.perf_counter() - t0


def _start_sql(store: Store, names: list[str], count: int) -> float:
    """Seconds for `count` transactions making exactly the statements of an admitted start, without vmquota.

    The same reads and writes, in the same order, of rows of the same sizes (the current bodies written
    back unchanged, one new event row each, in a namespace of its own that is removed after): what the
    store alone costs per start. vmquota's Python on top cannot make a start faster than this.
    """
    reader = store.reader()
    vm_bodies = {name: dumps(reader.get(objects.VIRTUAL_MACHINE, NS, name)) for name in names}
    charges = {name: encode_resources(reader.charge(NS, name) or {}) for name in names}
    statuses = reader.covering_statuses(NS)
    event_body = dumps(reader.list(objects.EVENT, NS)[-1])
    conn = _connect(store.path)
    lock = open(store.lock_path, "a")  # noqa: SIM115 - the store's lock between processes, taken as it does
    rv = store.revision  # written back as it is: the store's counter stays right
    get = "SELECT body FROM objects WHERE kind=? AND namespace=? AND name=?"
    update = "UPDATE objects SET rv=?, body=? WHERE kind=? AND namespace=? AND name=?"
    t0 = time.perf_counter()
    for i in range(count):
        name = names[i % len(names)]
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("SELECT value FROM counters WHERE name='rv'").fetchone()
        conn.execute("SAVEPOINT txn")  # the store's transactions are savepoints, for its group commit
        conn.execute(get, ("VirtualMachine", NS, name)).fetchone()
        conn.execute("SELECT resources FROM charges WHERE namespace=? AND name=?", (NS, name)).fetchone()
        conn.execute(_COVERING, {"namespace": NS}).fetchall()
        for kind, namespace, quota, _, used in statuses:  # the quota's and the project's used, as they are
            conn.execute("UPDATE quota_status SET used=? WHERE kind=? AND namespace=? AND name=?",
                         (used, kind, namespace, quota))
        conn.execute("INSERT OR REPLACE INTO charges(namespace, name, resources) VALUES (?,?,?)",
                     (NS, name, charges[name]))
        conn.execute("INSERT INTO objects(kind, namespace, name, uid, rv, body) VALUES (?,?,?,?,?,?)",
                     ("Event", "bench-sql", f"e{i}", "-", rv, event_body))
        conn.execute(update, (rv, vm_bodies[name], "VirtualMachine", NS, name))
        conn.execute("RELEASE txn")
        conn.execute("INSERT OR REPLACE INTO counters(name, value) VALUES ('rv', ?)", (rv,))
        conn.execute("COMMIT")
        fcntl.flock(lock, fcntl.LOCK_UN)
    elapsed = time.perf_counter() - t0
    conn.execute("DELETE FROM objects WHERE kind='Event' AND namespace='bench-sql'")
    conn.close()
    lock.close()
    return elapsed


def _concurrent_starts(bed: Bed, names: list[str], writers: int) -> float:
    """Admitted starts per second with `writers` threads starting distinct VMs at once, as a server's
    request threads do; the store's group commit lets a commit carry the starts that waited for it."""
    def start_all(chunk: list[str]) -> None:
        for name in chunk:
            bed.start(name)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(start_all, [names[i::writers] for i in range(writers)]))
    rate = len(names) / (time.perf_counter() - t0)
    for name in names:
        bed.reset(name)
    return rate


def _one_row_table(folder: Path) -> sqlite3.Connection:
    """A file with one row to update, opened with the store's own connection settings (WAL, synchronous=FULL)."""
    raw = _connect(folder / "raw.db")
    raw.execute("CREATE TABLE bench (id INTEGER PRIMARY KEY, value INTEGER NOT NULL)")
    raw.execute("INSERT INTO bench VALUES (1, 0)")
    return raw


def _starts_per_s(bed: Bed) -> float:
    """Every VM of the bed started back to back, one transaction each (timed), then put back (untimed)."""
    t0 = time.perf_counter()
    for name in bed.names:
        bed.start(name)
    rate = len(bed.names) / (time.perf_counter() - t0)
    for name in bed.names:
        bed.reset(name)
    return rate


def _memory_folder() -> Path | None:
    """/dev/shm when it is a tmpfs (memory: an fsync there returns at once), else None."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    return Path("/dev/shm") if any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in mounts) else None


def _in_memory(folder: Path, vms: int, batches: int) -> tuple[float, float]:
    """Admitted starts/s and one-row commits/s (medians) with both files on tmpfs: the same code and
    settings, with the disk's wait taken away. What is left is CPU alone."""
    with tempfile.TemporaryDirectory(prefix="vmquota-bench-durable-", dir=folder) as tmp:
        bed, raw = Bed(Path(tmp) / "store", vms), _one_row_table(Path(tmp))
        _timed_starts(bed, bed.names[:50])
        admitted, commits = [], []
        for _ in range(batches):
            admitted.append(_starts_per_s(bed))
            commits.append(vms / _raw_commits(raw, vms))
        raw.close()
        bed.close()
    return median(admitted), median(commits)


def durable_admission(vms: int, batches: int) -> SectionResult:
    """Section 2: admitted starts per second vs one-row commits per second, on the same settings and disk.

    A third figure, the SQL of a start replayed without vmquota, shows how much of the gap is the store's.
    """
    with tempfile.TemporaryDirectory(prefix="vmquota-bench-durable-") as tmp:
        bed, raw = Bed(Path(tmp) / "store", vms), _one_row_table(Path(tmp))
        settings = {p: raw.execute(f"PRAGMA {p}").fetchone()[0] for p in ("journal_mode", "synchronous")}
        _raw_commits(raw, 1000)
        _timed_starts(bed, bed.names[:50])
        _start_sql(bed.store, bed.names, 200)
        admitted, commits, sql, concurrent = [], [], [], []
        for _ in range(batches):  # alternate, so all four see the same machine
            admitted.append(_starts_per_s(bed))
            commits.append(vms / _raw_commits(raw, vms))
            sql.append(vms / _start_sql(bed.store, bed.names, vms))
            concurrent.append(_concurrent_starts(bed, bed.names, WRITERS))
        raw.close()
        bed.close()
    rate, limit, floor, together = median(admitted), median(commits), median(sql), median(concurrent)
    ratio = rate / limit
    rows = [Row("2", "admitted starts/s through the store (median of batches)", f"{rate:,.0f}/s",
                baseline=f"{limit:,.0f}/s one-row UPDATE commits", ratio=f"{ratio:.2f}", target=">= 0.3",
                met=ratio >= 0.3),
            Row("2", "  the SQL of one start replayed, without vmquota's Python", f"{floor:,.0f}/s",
                baseline=f"{limit:,.0f}/s one-row UPDATE commits", ratio=f"{floor / limit:.2f}"),
            Row("2", "  admitted starts/s against that replay", f"{rate:,.0f}/s",
                baseline=f"{floor:,.0f}/s start SQL replayed", ratio=f"{rate / floor:.2f}"),
            Row("2", f"  admitted starts/s, {WRITERS} writers at once (group commit)", f"{together:,.0f}/s",
                baseline=f"{limit:,.0f}/s one-row UPDATE commits", ratio=f"{together / limit:.2f}")]
    # The same two figures with the files in memory show what the ratio measures: with no wait for the
    # disk it falls to a few hundredths, so on a disk it is mostly the disk's fsync against the CPU.
    folder = _memory_folder()
    in_memory = _in_memory(folder, vms, batches) if folder else None
    if in_memory:
        rows.append(Row("2", "  admitted starts/s with both files on tmpfs (an fsync costs nothing)",
                        f"{in_memory[0]:,.0f}/s", baseline=f"{in_memory[1]:,.0f}/s one-row commits on tmpfs",
                        ratio=f"{in_memory[0] / in_memory[1]:.2f}"))
    return SectionResult(rows, {"on_tmpfs": {"admitted_per_s": in_memory[0], "raw_commits_per_s": in_memory[1],
                                             "ratio": in_memory[0] / in_memory[1]} if in_memory else None,
                                "admitted_per_s": admitted, "raw_commits_per_s": commits,
                                f"admitted_per_s_{WRITERS}_writers": concurrent,
                                "ratio_concurrent": together / limit,
                                "start_sql_replayed_per_s": sql, "ratio": ratio,
                                "ratio_start_sql_over_raw": floor / limit,
                                "ratio_admitted_over_start_sql": rate / floor,
                                "sqlite_settings": settings, "sqlite_version": sqlite3.sqlite_version,
                                "batch": vms, "target": 0.3})
