"""The store: a second object of a name is refused, its `vm_states` index (what the recount reads of every VM
always equals what the VM's body says), a quota's status kept apart from its body, and its group commit
(writers that wait for each other share one commit, and fail or succeed as they should), also between
processes."""

from __future__ import annotations

import copy
import json
import multiprocessing
import sqlite3
import stat
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import vm_manifest, vm_state_row, wait_until

from vmquota import accounting, errors, objects
from vmquota.objects import VIRTUAL_MACHINE as VM
from vmquota.store import EVENTS_KEPT_PER_NAMESPACE, PRUNE_EVERY, Store


def states(store: Store) -> list[tuple[Any, ...]]:
    return list(store.reader().vm_states())


def bodies(store: Store) -> list[tuple[Any, ...]]:
    return [vm_state_row(vm) for vm in store.reader().list(VM)]


def new_vm(store: Store, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    manifest = vm_manifest(name)
    manifest["metadata"]["namespace"] = namespace
    manifest["spec"].pop("runStrategy", None)
    manifest["spec"].update(spec)
    with store.transaction() as txn:
        return txn.create(VM, manifest)


def update(store: Store, vm: dict[str, Any], change: Any) -> dict[str, Any]:
    vm = copy.deepcopy(vm)
    change(vm)
    with store.transaction() as txn:
        return txn.update(VM, vm)


def test_a_second_object_of_the_same_name_is_refused_and_the_first_kept(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    first = new_vm(store, "ns", "web")
    with pytest.raises(errors.AlreadyExists) as refused:
        new_vm(store, "ns", "web")
    assert str(refused.value) == 'virtualmachines.kubevirt.io "web" already exists'
    assert store.reader().get(VM, "ns", "web") == first
    assert states(store) == bodies(store)
    new_vm(store, "other", "web")  # the same name in another namespace is another object
    assert len(bodies(store)) == 2
    store.close()


def test_a_namespace_keeps_its_newest_events_whatever_else_each_transaction_writes(tmp_path: Path) -> None:
    """Events are pruned to the newest EVENTS_KEPT_PER_NAMESPACE (plus what accrues between two prunes).

    Each transaction here writes an event and a VM, as a start or a stop does. Pruning once keyed on the
    event's resourceVersion being a multiple of 64, which such a steady pattern can miss for ever.
    """
    store = Store(tmp_path / "db")
    vm = new_vm(store, "ns", "web")
    if store.revision % 2:  # so that every event gets an odd resourceVersion: never a multiple of 64
        vm = update(store, vm, lambda v: v["metadata"].setdefault("labels", {}).update(pad="1"))
    written = 3 * EVENTS_KEPT_PER_NAMESPACE
    for i in range(written):
        with store.transaction() as txn:
            txn.create(objects.EVENT, {"metadata": {"name": f"web.{i:05d}", "namespace": "ns"}, "reason": "Tick"})
            vm = txn.update(VM, vm)
    kept = sorted(event["metadata"]["name"] for event in store.reader().list(objects.EVENT, "ns"))
    assert EVENTS_KEPT_PER_NAMESPACE <= len(kept) <= EVENTS_KEPT_PER_NAMESPACE + PRUNE_EVERY
    assert kept[-1] == f"web.{written - 1:05d}"  # the newest are the ones kept
    assert kept == [f"web.{i:05d}" for i in range(written - len(kept), written)]
    store.close()


def test_vm_states_follow_every_write_of_a_vm(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.db")
    a = new_vm(store, "ns1", "a", runStrategy="Always")
    b = new_vm(store, "ns1", "b", running=True)
    c = new_vm(store, "ns2", "c", running=False)
    with store.transaction() as txn:  # other kinds never appear in the index
        txn.create(objects.NAMESPACE, {"metadata": {"name": "ns1"}})
        txn.create(objects.EVENT, {"metadata": {"name": "e", "namespace": "ns1"}})
    uids = [vm["metadata"]["uid"] for vm in (a, b, c)]
    assert [row[:3] for row in states(store)] == [("ns1", "a", uids[0]), ("ns1", "b", uids[1]), ("ns2", "c", uids[2])]
    assert states(store) == bodies(store)

    a = update(store, a, lambda vm: vm.setdefault("status", {}).update(
        phase="Running", lastExit="Crashed",
        conditions=[{"type": "Ready", "status": "True"}, {"type": "DataVolumesReady", "status": "True"}]))
    b = update(store, b, lambda vm: vm["metadata"].update(deletionTimestamp="2026-11-27T10:00:00Z"))
    c = update(store, c, lambda vm: vm.update(status={"phase": "Stopped", "conditions": [
        {"type": "Ready", "status": "True"}, {"type": "DataVolumesReady", "status": "False"}]}))
    assert states(store)[0][3:] == ("Running", 0, "Always", None, "Crashed", 1)
    assert states(store)[1][4] == 1  # being deleted
    assert states(store)[2][8] == 0  # only DataVolumesReady counts, and only when True
    assert states(store) == bodies(store)

    with store.transaction() as txn:
        txn.delete(VM, "ns1", "b")
    assert [row[1] for row in states(store)] == ["a", "c"]
    assert states(store) == bodies(store)


def test_a_rolled_back_write_leaves_vm_states_as_they_were(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.db")
    vm = new_vm(store, "ns1", "a", runStrategy="Halted")
    before = states(store)
    try:
        with store.transaction() as txn:
            txn.update(VM, dict(vm, status={"phase": "Starting"}))
            raise RuntimeError("refused")
    except RuntimeError:
        pass
    assert states(store) == before == bodies(store)


def test_opening_a_store_made_before_vm_states_builds_them(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = Store(path)
    new_vm(store, "ns1", "a", runStrategy="Always")
    new_vm(store, "ns1", "b", running=False)
    expected = bodies(store)
    store.close()
    with sqlite3.connect(path) as conn:  # what an earlier vmquota left: no index, no triggers, version 0
        conn.executescript("DROP TRIGGER vm_states_insert; DROP TRIGGER vm_states_update; "
                           "DROP TRIGGER vm_states_delete; DROP TABLE vm_states; PRAGMA user_version=0;")
    store = Store(path)
    assert states(store) == expected
    new_vm(store, "ns2", "c", runStrategy="Manual")  # and it is kept from then on
    assert states(store) == bodies(store)
    store.close()


def quota_rows(store: Store) -> list[tuple[Any, ...]]:
    return store.reader()._conn.execute("SELECT kind, namespace, name, body FROM objects "
                                         "WHERE kind IN ('ResourceQuota', 'Project') ORDER BY kind, name").fetchall()


def test_a_quotas_status_is_kept_apart_from_its_body_and_read_back_into_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.db")
    with store.transaction() as txn:
        quota = txn.create(objects.RESOURCE_QUOTA, {"metadata": {"name": "q", "namespace": "ns"},
                                                    "spec": {"hard": {"cpu": "4"}}})
        accounting.refresh(txn, objects.RESOURCE_QUOTA, quota)
        # "r" is written without the accounting (no refresh): it has no status to read back
        txn.create(objects.RESOURCE_QUOTA, {"metadata": {"name": "r", "namespace": "ns"}, "spec": {"hard": {}}})
        accounting.set_charge(txn, "ns", "vm", {"cpu": Decimal(1)}, enforce=True, subject="vm")
    status = {"hard": {"cpu": "4"}, "used": {"cpu": "1"}}
    assert store.reader().get(objects.RESOURCE_QUOTA, "ns", "q")["status"] == status
    assert [obj.get("status") for obj in store.reader().list(objects.RESOURCE_QUOTA, "ns")] == [status, None]
    assert all('"status"' not in body for *_, body in quota_rows(store))
    with store.transaction() as txn:  # a body written with a status (an old copy) does not overwrite it
        stale = txn.get(objects.RESOURCE_QUOTA, "ns", "q")
        stale["status"]["used"] = {"cpu": "0"}
        txn.update(objects.RESOURCE_QUOTA, stale)
    assert store.reader().get(objects.RESOURCE_QUOTA, "ns", "q")["status"] == status
    with store.transaction() as txn:
        txn.delete(objects.RESOURCE_QUOTA, "ns", "q")
    assert store.reader().quota_statuses() == {}  # gone with its quota: a new "q" starts afresh
    store.close()


def test_opening_a_store_made_before_quota_status_moves_each_status_out_of_its_body(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = Store(path)
    with store.transaction() as txn:
        txn.create(objects.NAMESPACE, {"metadata": {"name": "ns", "labels": {objects.PROJECT_LABEL: "p"}}})
        txn.create(objects.PROJECT, {"metadata": {"name": "p"}, "spec": {"resourceQuota": {"hard": {"cpu": "8"}}}})
        txn.create(objects.RESOURCE_QUOTA, {"metadata": {"name": "q", "namespace": "ns"},
                                            "spec": {"hard": {"cpu": "4"}}})
    store.close()
    old = {"hard": {"cpu": "4"}, "used": {"cpu": "3"}}
    with sqlite3.connect(path) as conn:  # what vmquota wrote before: the status in the body, version 1
        conn.execute("UPDATE objects SET body = json_set(body, '$.status', json(?)) WHERE kind IN "
                     "('ResourceQuota', 'Project')", (json.dumps(old),))
        conn.executescript("DROP TRIGGER quota_status_delete; DROP TABLE quota_status; PRAGMA user_version=1;")
    store = Store(path)
    assert store.reader().get(objects.RESOURCE_QUOTA, "ns", "q")["status"] == old
    assert all('"status"' not in body for *_, body in quota_rows(store))
    assert [q.display for q in accounting.covering(store.reader(), "ns")] == ["q", "project/p"]
    with store.transaction() as txn:  # the recount a server makes when it starts corrects the used
        assert accounting.recount(txn) == ["ns/q", "project/p"]
    assert store.reader().get(objects.PROJECT, "", "p")["status"] == {"hard": {"cpu": "8"}, "used": {"cpu": "0"}}
    store.close()


class Group:
    """Two writers that land in one group commit: `first` ends its transaction while `second` waits for the
    write lock, so the group stays open for `second`, which commits both (or fails both)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.results: dict[str, BaseException | None] = {}

    def run(self, first: Any, second: Any) -> dict[str, BaseException | None]:
        inside = threading.Event()

        def one() -> None:
            with self.store.transaction() as txn:
                inside.set()
                wait_until(lambda: self.store._waiting == 1, timeout=5, what="the second writer to wait")
                first(txn)

        def two() -> None:
            inside.wait(5)
            with self.store.transaction() as txn:
                second(txn)

        threads = [threading.Thread(target=self._record, args=(name, fn)) for name, fn in (("one", one), ("two", two))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        return self.results

    def _record(self, name: str, fn: Any) -> None:
        try:
            fn()
            self.results[name] = None
        except BaseException as e:  # the test looks at what each writer saw
            self.results[name] = e


def create_namespace(name: str) -> Any:
    return lambda txn: txn.create(objects.NAMESPACE, {"metadata": {"name": name}})


def namespaces(store: Store) -> list[str]:
    return [name for _, name in store.reader().names(objects.NAMESPACE)]


def test_writers_that_wait_for_each_other_commit_together_and_each_sees_its_writes_durable(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.db")
    writer = store._writer = WatchedWriter(store._writer)  # type: ignore[assignment]
    results = Group(store).run(create_namespace("a"), create_namespace("b"))
    assert results == {"one": None, "two": None}
    assert writer.commits == 1  # one fsync for both
    assert namespaces(store) == ["a", "b"]  # a fresh reader sees both: each returned after the commit
    store.close()
    assert namespaces(Store(tmp_path / "store.db")) == ["a", "b"]


def test_a_failed_writer_in_a_group_undoes_only_its_own_writes(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.db")
    revision = store.revision

    def fails(txn: Any) -> None:
        create_namespace("b")(txn)
        raise RuntimeError("refused")

    results = Group(store).run(create_namespace("a"), fails)
    assert results["one"] is None and isinstance(results["two"], RuntimeError)
    assert namespaces(store) == ["a"]
    assert store.revision == revision + 1  # b's resourceVersion was handed back


class WatchedWriter:
    """The writer connection, counting its COMMITs; with `fail`, the first one fails, as on a full disk."""

    def __init__(self, conn: sqlite3.Connection, *, fail: bool = False) -> None:
        self.conn, self.fail, self.commits = conn, fail, 0

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            self.commits += 1
            if self.fail and self.commits == 1:
                raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_a_commit_that_fails_fails_every_writer_of_the_group_and_keeps_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.db")
    revision = store.revision
    store._writer = WatchedWriter(store._writer, fail=True)  # type: ignore[assignment]
    results = Group(store).run(create_namespace("a"), create_namespace("b"))
    assert all(isinstance(e, errors.StoreError) and "disk is full" in str(e) for e in results.values()), results
    assert namespaces(store) == [] and store.revision == revision
    with store.transaction() as txn:  # and the store goes on
        create_namespace("c")(txn)
    assert namespaces(store) == ["c"]


def _admit_from_another_process(path: Path, names: list[str], ready: Any, results: Any) -> None:
    """One process of a server: its own Store on the file, four threads admitting at once."""
    store = Store(path)
    admitted: list[str] = []
    ready.wait()  # every process has started: they admit at the same time

    def admit(name: str) -> None:
        try:
            with store.transaction() as txn:
                accounting.set_charge(txn, "ns", name, {"cpu": Decimal(1)}, enforce=True, subject=name)
                txn.create(objects.EVENT, {"metadata": {"name": f"admitted.{name}", "namespace": "ns"}})
            admitted.append(name)
        except errors.QuotaExceeded:
            pass

    threads = [threading.Thread(target=lambda chunk=names[i::4]: [admit(n) for n in chunk]) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    results.put(admitted)


def test_processes_sharing_a_store_never_admit_past_a_quota_nor_reuse_a_resource_version(tmp_path: Path) -> None:
    """The write lock holds between processes (an flock) and each reads the resourceVersion counter afresh."""
    path = tmp_path / "store.db"
    store = Store(path)
    with store.transaction() as txn:
        txn.create(objects.NAMESPACE, {"metadata": {"name": "ns"}})
        quota = txn.create(objects.RESOURCE_QUOTA, {"metadata": {"name": "q", "namespace": "ns"},
                                                    "spec": {"hard": {"cpu": "100"}}})
        accounting.refresh(txn, objects.RESOURCE_QUOTA, quota)  # as the API creates it
    spawn = multiprocessing.get_context("spawn")
    ready, results = spawn.Barrier(2), spawn.Queue()
    names = [f"vm{i}" for i in range(240)]
    children = [spawn.Process(target=_admit_from_another_process, args=(path, names[i::2], ready, results))
                for i in range(2)]
    for child in children:
        child.start()
    admitted = [name for _ in children for name in results.get(timeout=60)]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    reader = store.reader()
    assert len(admitted) == 100  # exactly the quota: no two processes read the same `used`
    assert reader.get(objects.RESOURCE_QUOTA, "ns", "q")["status"]["used"] == {"cpu": "100"}
    assert sorted(name for _, name, _ in reader.charges("ns")) == sorted(admitted)
    versions = [int(obj["metadata"]["resourceVersion"]) for kind in (objects.EVENT, objects.NAMESPACE)
                for obj in reader.list(kind)]
    quota_version = int(reader.get(objects.RESOURCE_QUOTA, "ns", "q")["metadata"]["resourceVersion"])
    near_limit = [e for e in reader.list(objects.EVENT) if e.get("reason") == "QuotaNearLimit"]
    assert len(near_limit) == 1  # the rise that crossed 80 % of hard is reported once, by whichever process made it
    assert len(versions) == len(set(versions)) == 102  # every object written got its own resourceVersion
    assert reader.revision() == max([*versions, quota_version])
    store.close()


def test_the_database_and_its_wal_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    """The data dir is traversable by QEMU's unprivileged user (to reach the disks): the store must not be
    readable through it. An older store, made 0644, is put right when opened."""
    path = tmp_path / "vmquota.db"
    store = Store(path)
    with store.transaction() as txn:
        txn.create(objects.NAMESPACE, {"metadata": {"name": "dev"}})
    for part in (path, tmp_path / "vmquota.db-wal", tmp_path / "vmquota.db-shm"):
        assert stat.S_IMODE(part.stat().st_mode) == 0o600, part
    store.close()
    path.chmod(0o644)
    Store(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
