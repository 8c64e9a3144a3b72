"""The store's kept parts (`Store.keep`): what a Table list reads of each object, written by triggers with the
body in the same transaction. Read from the side table, every part equals what SQLite cuts out of the body
(the path used without it), for odd bodies too; it follows creates, updates, deletes and rollbacks, and it is
rebuilt when a server starts with other parts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from conftest import vm_manifest

from vmquota import errors, objects
from vmquota.apiserver import tables
from vmquota.objects import VIRTUAL_MACHINE as VM
from vmquota.store import Part, Store, Where

TABLE_PARTS = tables.store_parts(VM, tables.options(None, "v1"))  # the printer's fields and the metadata
ALL_ASKED = [*TABLE_PARTS, Part.BODY, Part(("metadata", "resourceVersion"))]


def kept_store(path: Path) -> Store:
    store = Store(path)
    for kind, parts in tables.kept_parts().items():
        store.keep(kind, parts)
    return store


def odd_vms() -> list[dict[str, Any]]:
    """VMs whose printed fields are missing, of other types, or not where a JSONPath filter expects them."""
    def vm(name: str, status: Any, **metadata: Any) -> dict[str, Any]:
        manifest = vm_manifest(name)
        manifest["metadata"] = {**manifest["metadata"], "namespace": "ns", **metadata}
        if status is not None:
            manifest["status"] = status
        return manifest
    return [
        vm("plain", None),
        vm("ready", {"printableStatus": "Running", "conditions": [
            {"type": "Paused", "status": "False"}, {"type": "Ready", "status": "True"},
            {"type": "Ready", "status": "Unknown"}]}),  # the first match counts
        vm("bool-ready", {"printableStatus": True, "conditions": [{"type": "Ready", "status": False}]}),
        vm("number", {"printableStatus": 1.5, "conditions": [{"type": "Ready", "status": {"deep": [1, "x"]}}]}),
        # (A string among the conditions is refused by the store's older `vm_states` trigger, "malformed JSON":
        # only the server writes a VM's status, and never one.)
        vm("not-objects", {"printableStatus": None, "conditions": [3, None, ["Ready"], {"type": "Ready"}]}),
        vm("conditions-object", {"conditions": {"first": {"type": "Ready", "status": "True"}}}),  # no array
        vm("status-string", "Running"),
        vm("unicode", {"printableStatus": "Stopp\u00e9 \u2603 \"q\" \\"},
           labels={"app": "w\u00e9b", "quote": "a\"b"}, annotations={"note": "line\nbreak"}),
    ]


def parts_of(store: Store, parts: list[Part], namespace: str | None = "ns",
             where: tuple[Where, ...] = ()) -> list[tuple[Any, ...]]:
    return list(store.reader().extract(VM, namespace, parts, where))


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Store, Store]:
    """The same file opened by a server's process (it keeps the Table parts) and by one that does not (it cuts
    them out of the bodies)."""
    kept = kept_store(tmp_path / "vmquota.db")
    with kept.transaction() as txn:
        for vm in odd_vms():
            txn.create(VM, vm)
    return kept, Store(tmp_path / "vmquota.db")


def test_every_kept_part_equals_what_the_body_says(stores: tuple[Store, Store]) -> None:
    kept, cut = stores
    assert VM.kind in kept.kept and not cut.kept
    for parts in (TABLE_PARTS, ALL_ASKED, tables.store_parts(VM, tables.options("None", "v1")),
                  tables.store_parts(VM, tables.options("Object", "v1")), [tables.METADATA],
                  list(reversed(ALL_ASKED))):
        assert parts_of(kept, parts) == parts_of(cut, parts)
        assert len(parts_of(kept, parts)) == len(odd_vms())
    ready = {row[0]: row[3] for row in parts_of(kept, TABLE_PARTS)}
    assert ready == {"plain": None, "ready": "True", "bool-ready": 0, "number": '{"deep":[1,"x"]}',
                     "not-objects": None, "conditions-object": None,
                     "status-string": None, "unicode": None}


def test_a_selected_or_scoped_read_of_kept_parts_equals_the_cut_one(stores: tuple[Store, Store]) -> None:
    kept, cut = stores
    with kept.transaction() as txn:
        txn.create(VM, {**vm_manifest("elsewhere"), "metadata": {"name": "elsewhere", "namespace": "other"}})
    for where in ((Where(("metadata", "labels", "app"), "in", ("w\u00e9b",)),),
                  (Where(("metadata", "name"), "in", ("ready", "plain")),),
                  (Where(("status", "printableStatus"), "notin", ("Running",)),)):
        for namespace in ("ns", None, "other"):
            assert parts_of(kept, TABLE_PARTS, namespace, where) == parts_of(cut, TABLE_PARTS, namespace, where)
    assert [row[0] for row in parts_of(kept, TABLE_PARTS, None)] == [*sorted(v["metadata"]["name"]
                                                                            for v in odd_vms()), "elsewhere"]
    assert [row[0] for row in parts_of(kept, TABLE_PARTS, "other")] == ["elsewhere"]


def test_kept_parts_follow_updates_deletes_and_rollbacks(stores: tuple[Store, Store]) -> None:
    kept, cut = stores
    vm = kept.reader().get(VM, "ns", "plain")
    assert vm is not None
    changed = copy.deepcopy(vm)
    changed["status"] = {"printableStatus": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    changed["metadata"]["labels"] = {"app": "db"}
    with kept.transaction() as txn:
        txn.update(VM, changed)
        txn.delete(VM, "ns", "number")
    with pytest.raises(errors.Conflict), kept.transaction() as txn:  # undone: its rows with it
        txn.update(VM, {**changed, "status": {"printableStatus": "Gone"}})
        txn.delete(VM, "ns", "ready")
        raise errors.Conflict("changed my mind")
    with cut.transaction() as txn:  # a process that keeps nothing writes through the same triggers
        txn.create(VM, {**vm_manifest("late"), "metadata": {"name": "late", "namespace": "ns"}})
    assert parts_of(kept, ALL_ASKED) == parts_of(cut, ALL_ASKED)
    rows = {row[0]: row for row in parts_of(kept, TABLE_PARTS)}
    assert "number" not in rows and "ready" in rows and "late" in rows
    assert rows["plain"][2:4] == ("Running", "True")
    assert '"labels":{"app":"db"}' in rows["plain"][4]


def test_a_start_with_other_parts_rebuilds_the_table_from_the_bodies(tmp_path: Path) -> None:
    path = tmp_path / "vmquota.db"
    first = Store(path)
    first.keep(VM, [Part(("status", "printableStatus"))])
    with first.transaction() as txn:
        for vm in odd_vms():
            txn.create(VM, vm)
    first.close()
    again = kept_store(path)  # a newer printer: its fields are made from what is stored
    assert parts_of(again, ALL_ASKED) == parts_of(Store(path), ALL_ASKED)
    same = kept_store(path)  # the same parts: nothing to rebuild, the rows stay
    assert parts_of(same, TABLE_PARTS) == parts_of(again, TABLE_PARTS)


def test_parts_not_kept_are_cut_out_of_the_bodies(stores: tuple[Store, Store]) -> None:
    kept, cut = stores
    other = [Part(("spec", "runStrategy")), Part(("metadata", "labels"), as_json=True)]
    assert parts_of(kept, other) == parts_of(cut, other)
    assert {row[0] for row in parts_of(kept, other)} == {"Halted"}


def test_quotas_and_projects_keep_their_status_apart_and_are_not_kept(tmp_path: Path) -> None:
    kept = kept_store(tmp_path / "vmquota.db")
    assert objects.RESOURCE_QUOTA.kind not in kept.kept and objects.PROJECT.kind not in kept.kept
    with pytest.raises(ValueError, match="cannot be kept"):
        kept.keep(objects.RESOURCE_QUOTA, [Part(("status", "used"), as_json=True)])
