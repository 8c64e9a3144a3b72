"""Live migration through the API (issue 13), on simulated hosts: the objects, the admission, the target's
reservation, and the charge that never moves. (libvirt's test driver cannot migrate; its hosts move the domain
by defining it on the target and removing it from the source, so what is checked here is vmquota's side. The
real migrations, with shared and with copied storage, run on KVM in tests/e2e.)
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, events_path, open_app, simulated_host, vm_manifest, wait_until

from vmquota import cli
from vmquota.app import NodeSettings
from vmquota.client import ClientError
from vmquota.objects import VIRTUAL_MACHINE_INSTANCE_MIGRATION as VMIM

NODES = "/api/v1/nodes"
GIB = 1024 * 1024  # KiB


def migrations(ns: str) -> str:
    return f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachineinstancemigrations"


def migrate_path(ns: str, name: str) -> str:
    return f"/apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachines/{name}/migrate"


class Pool:
    def __init__(self, c: Cluster, uris: dict[str, str]) -> None:
        self.c = c
        self.uris = uris

    def runs_on(self, node: str, vm: str) -> bool:
        return bool(self.c.app.controller.ctx.hosts.for_uri(self.uris[node]).observe(self.c.ns, vm).up)

    def allocated(self) -> dict[str, tuple[int, int]]:
        """What the store holds placed on each node (cpu millicores, memory bytes)."""
        reader = self.c.app.store.reader()
        return {row[0]: (row[-2], row[-1]) for row in reader.node_candidates()}


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    app = open_app(tmp_path / "data", node_settings=NodeSettings(heartbeat_seconds=0.2, grace_seconds=5.0))
    c = Cluster(app, "move")
    c.create_namespace("move")
    first = next(n["metadata"]["name"] for n in c.client.get(NODES)["items"])
    c.client.patch(f"{NODES}/{first}", {"spec": {"unschedulable": True}})
    uris = {}
    for name, memory in (("a", 8), ("b", 8), ("c", 2)):
        uris[name] = simulated_host(tmp_path / f"{name}.xml", cpus=8, memory_kib=memory * GIB)
        c.client.post(NODES, {"metadata": {"name": name}, "spec": {"providerID": uris[name]}})
        wait_until(lambda n=name: c.client.get(f"{NODES}/{n}").get("status", {}).get("allocatable"),
                   what=f"{name}'s heartbeat")
    try:
        yield Pool(c, uris)
    finally:
        for vm in c.client.get("/apis/kubevirt.io/v1/virtualmachines")["items"]:
            c.delete_vm(vm["metadata"]["name"], vm["metadata"]["namespace"])
        c.client.close()
        app.close()


def running_on_a(p: Pool, name: str = "web", memory: str = "4Gi") -> None:
    p.c.create_vm(vm_manifest(name, cores=1, memory=memory, disk=None, strategy="Always"))
    p.c.wait_status(name, "Running")
    assert p.c.vm(name)["status"]["nodeName"] == "a"


def ended(p: Pool, name: str) -> dict[str, Any]:
    return wait_until(lambda: (m := p.c.client.get(f"{migrations(p.c.ns)}/{name}"))["status"]["phase"] in
                      ("Succeeded", "Failed") and m, what=f"migration {name} to end")


def test_a_migration_moves_the_vm_and_charges_it_exactly_once(pool: Pool) -> None:
    c = pool.c
    c.create_quota({"limits.memory": "4Gi", "limits.cpu": "1"})  # exactly full: a second charge would not fit
    running_on_a(pool)
    used = c.used()
    vmim = c.client.post(migrations(c.ns), {"metadata": {"name": "m1"}, "spec": {"vmiName": "web"}})
    assert vmim["status"]["phase"] == "Scheduled"
    assert vmim["status"]["migrationState"]["sourceNode"] == "a"
    assert vmim["status"]["migrationState"]["targetNode"] == "b"  # never the source; c is too small
    done = ended(pool, "m1")
    assert done["status"]["phase"] == "Succeeded"
    assert [p["phase"] for p in done["status"]["phaseTransitionTimestamps"]] == ["Scheduled", "Running", "Succeeded"]
    c.wait_status("web", "Running")
    vm = c.vm("web")
    assert vm["status"]["nodeName"] == "b"
    assert pool.runs_on("b", "web") and not pool.runs_on("a", "web")
    vmi = c.client.get(f"/apis/kubevirt.io/v1/namespaces/{c.ns}/virtualmachineinstances/web")
    assert vmi["status"]["nodeName"] == "b" and vmi["status"]["migrationState"]["completed"] is True
    assert c.used() == used  # the charge never moved; spec.hard neither
    assert c.quota()["spec"]["hard"] == {"limits.memory": "4Gi", "limits.cpu": "1"}
    allocated = pool.allocated()
    assert allocated["a"] == (0, 0) and allocated["b"] == (100, 4 * 1024 ** 3)  # the source released


def test_the_migrate_subresource_makes_a_migration_as_virtctl_does(pool: Pool) -> None:
    c = pool.c
    running_on_a(pool)
    c.client.put(migrate_path(c.ns, "web"), {})
    items = c.client.get(migrations(c.ns))["items"]
    assert len(items) == 1 and items[0]["metadata"]["name"].startswith("kubevirt-migrate-vm-")
    assert items[0]["spec"] == {"vmiName": "web"}
    assert ended(pool, items[0]["metadata"]["name"])["status"]["phase"] == "Succeeded"
    assert "Migrated" in [e["reason"] for e in c.client.get(events_path(c.ns))["items"]]


def test_an_added_node_selector_picks_the_target(pool: Pool) -> None:
    c = pool.c
    c.client.patch(f"{NODES}/c", {"metadata": {"labels": {"zone": "z2"}}})
    running_on_a(pool, memory="1Gi")
    c.client.put(migrate_path(c.ns, "web"), {"addedNodeSelector": {"zone": "z2"}})
    wait_until(lambda: c.vm("web")["status"].get("nodeName") == "c" and c.status("web") == "Running",
               what="web to run on c")


def test_no_node_with_room_fails_the_migration_and_the_vm_runs_on_unchanged(pool: Pool) -> None:
    c = pool.c
    running_on_a(pool, memory="7Gi")
    c.client.patch(f"{NODES}/b", {"spec": {"unschedulable": True}})
    vmim = c.client.post(migrations(c.ns), {"metadata": {"name": "m1"}, "spec": {"vmiName": "web"}})
    assert vmim["status"]["phase"] == "Failed"
    assert vmim["status"]["migrationState"]["failureReason"] == (
        "0/3 nodes are available: 2 node(s) were unschedulable, 1 Insufficient memory.")  # a is the source
    assert c.status("web") == "Running" and c.vm("web")["status"]["nodeName"] == "a"
    assert pool.allocated()["b"] == (0, 0) and pool.allocated()["c"] == (0, 0)


@pytest.mark.parametrize(("body", "code", "words"), [
    ({"spec": {}}, 422, "spec.vmiName: Required value"),
    ({"spec": {"vmiName": "nope"}}, 422, "does not exist or is not running"),
    ({"spec": {"vmiName": "web", "addedNodeSelector": {"a": 1}}}, 422, "spec.addedNodeSelector"),
])
def test_a_bad_migration_is_refused_and_changes_nothing(pool: Pool, body: dict[str, Any], code: int,
                                                         words: str) -> None:
    running_on_a(pool)
    with pytest.raises(ClientError) as refused:
        pool.c.client.post(migrations(pool.c.ns), {"metadata": {"name": "bad"}, **body})
    assert refused.value.code == code and words in refused.value.message
    assert pool.c.client.get(migrations(pool.c.ns))["items"] == []
    assert pool.allocated()["b"] == (0, 0)


def test_a_stopped_vm_cannot_be_migrated(pool: Pool) -> None:
    pool.c.create_vm(vm_manifest("off", cores=1, memory="1Gi", disk=None))
    with pytest.raises(ClientError) as refused:
        pool.c.client.put(migrate_path(pool.c.ns, "off"), {})
    assert refused.value.code == 422 and "not running" in refused.value.message


def test_the_migration_kind_is_served_like_kubevirts(pool: Pool) -> None:
    resources = pool.c.client.get("/apis/kubevirt.io/v1")["resources"]
    found = next(r for r in resources if r["name"] == VMIM.plural)
    assert found["kind"] == "VirtualMachineInstanceMigration" and set(found["shortNames"]) == {"vmim", "vmims"}
    subresources = pool.c.client.get("/apis/subresources.kubevirt.io/v1")["resources"]
    assert "virtualmachines/migrate" in [r["name"] for r in subresources]


def vmquota(url: str, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.run([*args, "--server", url])
    return code, out.getvalue(), err.getvalue()


def test_the_cli_migrates_to_a_chosen_node_and_waits(pool: Pool) -> None:
    c = pool.c
    running_on_a(pool, memory="1Gi")
    assert vmquota(c.app.url, "migrate", "web", "-n", c.ns, "--to", "c", "--wait") == (
        0, "VM web migrated to node c\n", "")
    assert pool.runs_on("c", "web")
    code, _out, err = vmquota(c.app.url, "migrate", "web", "-n", c.ns, "--to", "c", "--wait")
    assert code == 1 and "didn't match Pod's node affinity/selector" in err  # c is its own node now


def test_drain_cordons_the_node_and_moves_every_vm_off_it(pool: Pool) -> None:
    c = pool.c
    c.create_quota({"limits.memory": "3Gi"})
    for node in ("b", "c"):  # every VM starts on a
        c.client.patch(f"{NODES}/{node}", {"spec": {"unschedulable": True}})
    for name, strategy in (("x", "LiveMigrate"), ("y", "LiveMigrate"), ("z", None)):
        template = {"spec": {"domain": {"cpu": {"cores": 1}, "memory": {"guest": "1Gi"}, "devices": {"disks": []}},
                             "volumes": [], **({"evictionStrategy": strategy} if strategy else {})}}
        c.create_vm(vm_manifest(name, cores=1, memory="1Gi", disk=None, strategy="Always", template=template))
        c.wait_status(name, "Running")
        assert c.vm(name)["status"]["nodeName"] == "a"
    for node in ("b", "c"):
        c.client.patch(f"{NODES}/{node}", {"spec": {"unschedulable": None}})
    used = c.used()

    code, _out, err = vmquota(c.app.url, "drain", "a")
    assert code == 1 and "cannot be live-migrated" in err and f"{c.ns}/z" in err
    assert all(c.vm(n)["status"]["nodeName"] == "a" for n in ("x", "y", "z"))  # nothing moved or stopped

    code, out, _err = vmquota(c.app.url, "drain", "a", "--force")
    assert code == 0 and out.splitlines()[0] == "node/a cordoned" and out.splitlines()[-1] == "node/a drained"
    assert f"stopping vm {c.ns}/z" in out
    assert c.client.get(f"{NODES}/a")["spec"]["unschedulable"] is True
    assert all(c.vm(n)["status"]["nodeName"] != "a" and c.status(n) == "Running" for n in ("x", "y"))
    assert not any(pool.runs_on("a", n) for n in ("x", "y", "z"))
    c.wait_status("z", "Stopped")
    assert c.used()["limits.memory"] == "2Gi" and used["limits.memory"] == "3Gi"  # z's stop only


def test_a_drain_fails_clearly_when_the_other_nodes_are_full(pool: Pool) -> None:
    c = pool.c
    template = {"spec": {"domain": {"cpu": {"cores": 1}, "memory": {"guest": "7Gi"}, "devices": {"disks": []}},
                         "volumes": [], "evictionStrategy": "LiveMigrate"}}
    c.create_vm(vm_manifest("big", cores=1, memory="7Gi", disk=None, strategy="Always", template=template))
    c.wait_status("big", "Running")
    source = c.vm("big")["status"]["nodeName"]
    other = "b" if source == "a" else "a"
    c.client.patch(f"{NODES}/{other}", {"spec": {"unschedulable": True}})
    code, _out, err = vmquota(c.app.url, "drain", source)
    assert code == 1 and "Insufficient memory" in err and f"node/{source} not drained" in err
    assert c.vm("big")["status"]["nodeName"] == source and c.status("big") == "Running"
