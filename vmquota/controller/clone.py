"""Copying disks: a VirtualMachineClone's from its source VM, and a CDI `pvc` source's from the VM that owns it.

A running source is copied live, at one instant (libvirt's backup job), a stopped one with a plain file copy. The
clone's own charge was admitted when the API created it (`api.py`); nothing here changes a charge.
"""

from __future__ import annotations

import time
from pathlib import Path

from vmquota import domainxml, errors, objects, vmspec
from vmquota.controller.context import Context
from vmquota.controller.state import deleting, volumes_ready
from vmquota.objects import VIRTUAL_MACHINE as VM
from vmquota.objects import Obj

CLONE_SOURCE_ANNOTATION = "vmquota.io/clone-source"  # "<namespace>/<name>/<uid>" of the VM whose disks to copy
CLONE_DISKS_ANNOTATION = "vmquota.io/clone-disks"  # "target-disk=source-disk,...": which disk each copy is of
LIVE_COPY_TIMEOUT_SECONDS = 3600.0


class Clones:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def clones_to_copy(self, namespace: str, name: str, uid: str) -> list[str]:
        """The clones of this VM whose disks are not copied yet, found through the VirtualMachineClones of its
        namespace (far fewer than its VMs). A clone being deleted still counts: it may be the source of clones of
        its own, and goes soon otherwise."""
        reader = self.ctx.store.reader()
        targets = {c["spec"]["target"]["name"] for c in reader.list(objects.VIRTUAL_MACHINE_CLONE, namespace)
                   if c["spec"]["source"]["name"] == name}
        clones = [reader.get(VM, namespace, target) for target in sorted(targets)]
        return [vm["metadata"]["name"] for vm in clones if vm is not None and not volumes_ready(vm)
                and objects.meta(vm).get("annotations", {}).get(CLONE_SOURCE_ANNOTATION) == f"{namespace}/{name}/{uid}"]

    def copy_from_source(self, vm: Obj, source: str, missing: list[vmspec.Disk]) -> None:
        """Copy a clone's disks from its source VM: live (point in time) if the source runs."""
        disks = self.ctx.disks
        src_ns, src_name, src_uid = source.split("/")
        from_disk = clone_disks(vm)
        ns, uid = vm["metadata"]["namespace"], vm["metadata"]["uid"]
        copies = {from_disk[d.name]: disks.path(ns, uid, d.name) for d in missing if d.name in from_disk}
        if not copies:
            return
        source_vm = self.ctx.store.reader().get(VM, src_ns, src_name)
        if source_vm is None or source_vm["metadata"]["uid"] != src_uid:
            raise errors.HypervisorError(f"the clone source {src_ns}/{src_name} is gone")
        if self.ctx.host_of(source_vm).observe(src_ns, src_name).up:
            self.copy_live(source_vm, copies)
        for src_disk, target in copies.items():
            if not target.exists():  # a stopped source, or a disk the running guest does not attach
                disks.copy(disks.path(src_ns, src_uid, src_disk), target)

    def copy_data_volume(self, vm: Obj, disk: vmspec.Disk, target: Path) -> None:
        """A disk whose source is another VM's disk of the namespace (CDI's pvc source): a copy of it, live
        (point in time) if that VM runs."""
        ns, uid = vm["metadata"]["namespace"], vm["metadata"]["uid"]
        owner = data_volume_owner(self.ctx.store.reader().list(VM, ns), disk.source.pvc, exclude_uid=uid)
        if owner is None:
            raise errors.HypervisorError(f"disk {disk.name}: the source data volume {disk.source.pvc} does not exist")
        src_name, src_uid = owner["metadata"]["name"], owner["metadata"]["uid"]
        source_path = self.ctx.disks.path(ns, src_uid, disk.source.pvc)
        if not source_path.exists():
            raise errors.HypervisorError(f"disk {disk.name}: the source data volume {disk.source.pvc} is not "
                                         f"made yet; trying again")
        if self.ctx.host_of(owner).observe(ns, src_name).up:
            self.copy_live(owner, {disk.source.pvc: target})
        if not target.exists():
            self.ctx.disks.copy(source_path, target)

    def copy_live(self, source: Obj, copies: dict[str, Path]) -> None:
        """libvirt's backup job: QEMU copies the attached disks as they are at one instant (crash-consistent)."""
        ns, name, uid = source["metadata"]["namespace"], source["metadata"]["name"], source["metadata"]["uid"]
        hypervisor = self.ctx.host_of(source)
        devices = domainxml.attached_targets(vmspec.read(source))
        partial = {devices[disk]: target.with_suffix(".partial") for disk, target in copies.items() if disk in devices}
        for path in partial.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
        if not partial or not hypervisor.live_disk_copy(ns, name, uid, partial):
            return  # the simulated host has no backup jobs; its files are not in use, a plain copy is safe
        deadline = time.monotonic() + LIVE_COPY_TIMEOUT_SECONDS
        while hypervisor.job_active(ns, name):
            if time.monotonic() > deadline:
                raise errors.HypervisorError(f"copying the disks of {ns}/{name} timed out")
            time.sleep(0.1)
        for path in partial.values():
            path.rename(path.with_suffix(".qcow2"))


def clone_disks(vm: Obj) -> dict[str, str]:
    """For a clone: target disk name -> the source disk it is copied from."""
    text = (objects.meta(vm).get("annotations") or {}).get(CLONE_DISKS_ANNOTATION, "")
    return dict(pair.split("=", 1) for pair in text.split(",") if "=" in pair)


def data_volume_owner(vms: list[Obj], data_volume: str, *, exclude_uid: str | None = None) -> Obj | None:
    """The VM of a namespace whose dataVolumeTemplates make the data volume (disk) of this name."""
    for vm in vms:
        if vm["metadata"].get("uid") == exclude_uid or deleting(vm):
            continue
        templates = (vm.get("spec") or {}).get("dataVolumeTemplates") or []
        if any((t.get("metadata") or {}).get("name") == data_volume for t in templates if isinstance(t, dict)):
            return vm
    return None
