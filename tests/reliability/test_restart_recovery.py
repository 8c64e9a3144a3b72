"""Work a server had committed but not done when it died is done by the next one, on libvirt's simulated host.

The SIGKILL rounds on real KVM (test_crash_safety.py) hit these windows by chance; here they are made on purpose:
the controller's workers are stopped, so a request commits and nothing acts on it, and a new server opens the
same data directory, as after a crash.
"""

from __future__ import annotations

from pathlib import Path

from conftest import HOST, Cluster, open_app, vm_manifest, wait_until
from reliability.invariants import look, violations

from vmquota.app import App


def crash_after_commit(tmp_path: Path, ns: str) -> tuple[App, Cluster]:
    """A server whose workers are gone: requests commit, nothing is done about them."""
    app = open_app(tmp_path / "data")
    cluster = Cluster(app, ns)
    cluster.create_namespace(ns)
    return app, cluster


def reopen(app: App, tmp_path: Path, ns: str) -> tuple[App, Cluster]:
    app.close()
    app = open_app(tmp_path / "data")
    return app, Cluster(app, ns)


def disks_ready(cluster: Cluster, name: str) -> bool:
    return any(c["type"] == "DataVolumesReady" and c["status"] == "True"
               for c in cluster.vm(name)["status"].get("conditions", []))


def test_vms_and_clones_committed_just_before_a_crash_get_their_disks_from_the_next_server(tmp_path: Path) -> None:
    app, cluster = crash_after_commit(tmp_path, "recover")
    cluster.create_vm(vm_manifest("source", disk="1Gi"))
    cluster.settle()
    app.controller.shutdown()  # the process "dies" here: what follows commits, and nothing acts on it
    cluster.create_vm(vm_manifest("fresh", disk="1Gi"))
    cluster.client.post("/apis/clone.kubevirt.io/v1beta1/namespaces/recover/virtualmachineclones", {
        "metadata": {"name": "copy"}, "spec": {"source": {"name": "source"}, "target": {"name": "copy"}}})
    cluster.client.delete("/apis/kubevirt.io/v1/namespaces/recover/virtualmachines/source")
    cluster.client.close()
    app, cluster = reopen(app, tmp_path, "recover")
    try:
        wait_until(lambda: disks_ready(cluster, "fresh") and disks_ready(cluster, "copy"),
                   what="the new server to make the disks the old one never made")
        wait_until(lambda: [v["metadata"]["name"] for v in cluster.client.get(
            "/apis/kubevirt.io/v1/namespaces/recover/virtualmachines")["items"]] == ["copy", "fresh"],
            what="the source to be deleted once its clone has its copy")
        cluster.settle()
        world = look(cluster.client, HOST, ["recover"])
        assert violations(world, disks_root=app.controller.disks.root) == []
    finally:
        for name in ("copy", "fresh"):
            cluster.delete_vm(name)
        cluster.client.close()
        app.close()


def test_a_source_deleted_before_its_disks_were_made_still_gives_its_clone_a_copy(tmp_path: Path) -> None:
    """The source never got its disks, its clone waits for a copy, and the source is being deleted: the source
    makes its (empty) disks so the clone can copy them, then goes; nobody waits on anybody for ever."""
    app, cluster = crash_after_commit(tmp_path, "chain")
    app.controller.shutdown()
    cluster.create_vm(vm_manifest("source", disk="1Gi"))
    cluster.client.post("/apis/clone.kubevirt.io/v1beta1/namespaces/chain/virtualmachineclones", {
        "metadata": {"name": "copy"}, "spec": {"source": {"name": "source"}, "target": {"name": "copy"}}})
    cluster.client.delete("/apis/kubevirt.io/v1/namespaces/chain/virtualmachines/source")
    cluster.client.close()
    app, cluster = reopen(app, tmp_path, "chain")
    try:
        wait_until(lambda: [v["metadata"]["name"] for v in cluster.client.get(
            "/apis/kubevirt.io/v1/namespaces/chain/virtualmachines")["items"]] == ["copy"] and disks_ready(
            cluster, "copy"), what="the clone to get its copy and the source to go")
        cluster.settle()
        world = look(cluster.client, HOST, ["chain"])
        assert violations(world, disks_root=app.controller.disks.root) == []
    finally:
        cluster.delete_vm("copy")
        cluster.client.close()
        app.close()
