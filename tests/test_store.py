"""The store's `vm_states` index: what the recount reads of every VM must always equal what the VM's body says."""

from __future__ import annotations

import copy
import sqlite3
from pathlib import Path
from typing import Any

from conftest import vm_manifest, vm_state_row

from vmquota import objects
from vmquota.objects import VIRTUAL_MACHINE as VM
from vmquota.store import Store


def states(store: Store) -> list[tuple[Any, ...]]:
    return list(store.reader().vm_states())


def bodies(store: Store) -> list[tuple[Any, ...]]:
    return [vm_state_row(vm) for vm in store.reader().each(VM)]


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
