"""qemu-img failing: the disk folder is a tiny tmpfs that is filled up, so every `qemu-img create` and `convert`
fails with "No space left on device" until room is made again.

vmquota must keep serving, say what is wrong on the VM itself (a condition) and in events, charge exactly what
exists and runs meanwhile, and finish the work once the disk has room again. The simulated host stands in for KVM
(the disks are real qcow2 files made by the real qemu-img either way). Mounting needs root, as does the rest of
the suite (libvirtd).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HOST, Cluster, _cleanup, open_app, vm_manifest, wait_until
from reliability import profile
from reliability.invariants import events_path, look, violations

from vmquota.client import ClientError


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Cluster]:
    """A server whose disk folder is a 2 MiB tmpfs, retrying failed disk work and starts within a second."""
    disks = tmp_path / "data" / "disks"
    disks.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(disks)], check=True)
    try:
        app = open_app(tmp_path / "data")
        app.controller.unschedulable_retry_seconds = 0.1  # disk work is retried after 6x this
        app.controller.backoff_base_seconds = 0.2
        cluster = Cluster(app, f"full-{int(time.time() * 1000) % 10**6}")
        cluster.create_namespace(cluster.ns)
        try:
            yield cluster
        finally:
            _cleanup(cluster)
            cluster.client.close()
            app.close()
    finally:
        subprocess.run(["umount", str(disks)], check=True)


def fill(folder: Path) -> Path:
    """Take every byte left on the file system of `folder`."""
    filler = folder / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True, check=False)
    return filler


def condition(vm: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in vm["status"].get("conditions", []) if c["type"] == type_), {})


def reasons(cluster: Cluster, name: str) -> list[str]:
    return [e["reason"] for e in cluster.client.get(events_path(cluster.ns))["items"]
            if e["involvedObject"]["name"] == name]


def assert_truth(cluster: Cluster) -> None:
    world = look(cluster.client, HOST, [cluster.ns])
    assert violations(world, disks_root=cluster.app.controller.disks.root) == []


def test_a_full_disk_is_reported_on_the_vm_and_the_work_finishes_once_there_is_room(small_disk: Cluster) -> None:
    c = small_disk
    c.create_quota({"limits.cpu": "4", "requests.storage": "10Gi", "count/virtualmachines.kubevirt.io": "4"})
    c.create_vm(vm_manifest("first", cores=1, disk="1Gi"))
    c.settle()
    filler = fill(c.app.controller.disks.root)

    c.create_vm(vm_manifest("second", cores=2, disk="1Gi"))  # admitted: the quota has room, the disk has not
    wait_until(lambda: condition(c.vm("second"), "DataVolumesReady").get("status") == "False",
               what="the disk failure to show on the VM")
    failed = condition(c.vm("second"), "DataVolumesReady")
    assert failed["reason"] == "DiskError" and "No space left on device" in failed["message"]
    assert "DiskError" in reasons(c, "second")
    assert c.used() == {"limits.cpu": "0", "requests.storage": "2Gi", "count/virtualmachines.kubevirt.io": "2"}

    c.action("second", "start")  # admitted; the start fails on the disk and is retried with a back-off
    wait_until(lambda: "FailedCreate" in reasons(c, "second"), what="the failed start to be reported")
    assert c.client.get("/healthz") == "ok"
    c.action("first", "start")  # a VM whose disk exists runs meanwhile, and is charged
    c.wait_status("first", "Running")
    wait_until(lambda: c.status("second") == "CrashLoopBackOff", what="second to wait for its next try")
    assert c.used()["limits.cpu"] == "1"  # second holds no runtime while it cannot start
    assert_truth_without_missing_disk(c, "second")

    filler.unlink()
    c.wait_status("second", "Running", timeout=30)
    assert condition(c.vm("second"), "DataVolumesReady")["status"] == "True"
    assert c.used() == {"limits.cpu": "3", "requests.storage": "2Gi", "count/virtualmachines.kubevirt.io": "2"}
    c.settle()
    assert_truth(c)
    profile.record("disk-faults", faults=["disk full during create", "disk full during start"])


def assert_truth_without_missing_disk(cluster: Cluster, name: str) -> None:
    """Every invariant but the one the fault breaks on purpose: `name`'s disk is not there yet.

    Its disk is tried again every fraction of a second, so its `.partial` may exist at the moment of looking:
    that is a disk being made, not one left half-written.
    """
    world = look(cluster.client, HOST, [cluster.ns])
    vm_dir = Path(cluster.ns) / cluster.vm(name)["metadata"]["uid"]
    being_made = f"half-written disk file left: {vm_dir / f'{name}-root.partial'}"
    problems = [p for p in violations(world, disks_root=cluster.app.controller.disks.root, settled=False)
                if p != being_made]
    assert problems == [f"VM {cluster.ns}/{name}: disk {name}-root is missing on disk"]


def test_a_clone_source_deleted_before_its_copy_is_kept_until_the_copy_is_made(small_disk: Cluster) -> None:
    c = small_disk
    c.create_vm(vm_manifest("source", disk="1Gi"))
    c.settle()
    source_uid = c.vm("source")["metadata"]["uid"]
    filler = fill(c.app.controller.disks.root)
    c.client.post(f"/apis/clone.kubevirt.io/v1beta1/namespaces/{c.ns}/virtualmachineclones", {
        "metadata": {"name": "copy"}, "spec": {"source": {"kind": "VirtualMachine", "name": "source"},
                                               "target": {"kind": "VirtualMachine", "name": "target"}}})
    wait_until(lambda: "DiskError" in reasons(c, "target"), what="the copy to fail for want of room")
    c.delete_vm("source", wait=False)  # while its clone still needs its disk
    c.settle()
    assert c.status("source") == "Terminating"
    assert c.app.controller.disks.vm_dir(c.ns, source_uid).exists()
    with pytest.raises(ClientError) as refused:  # nor can a new VM take the name meanwhile
        c.create_vm(vm_manifest("source", disk="1Gi"))
    assert refused.value.code == 409

    filler.unlink()
    wait_until(lambda: condition(c.vm("target"), "DataVolumesReady").get("status") == "True", timeout=30,
               what="the clone's copy once there is room")
    wait_until(lambda: "source" not in [v["metadata"]["name"] for v in c.client.get(
        f"/apis/kubevirt.io/v1/namespaces/{c.ns}/virtualmachines")["items"]], what="the source to be deleted")
    target = c.app.controller.disks.path(c.ns, c.vm("target")["metadata"]["uid"], "target-root")
    check = subprocess.run(["qemu-img", "check", str(target)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not c.app.controller.disks.vm_dir(c.ns, source_uid).exists()
    c.settle()
    assert_truth(c)
    profile.record("disk-faults", faults=["disk full during a clone's copy, source deleted meanwhile"])
