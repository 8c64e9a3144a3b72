"""A VM's disks and what its domain is made of: imports, blank and cloned disks, the cloud-init seed, the XML.

`ensure_disks` makes what is missing before a start (a start waits for its disks) and reports each disk as CDI
reports a DataVolume, in `status.dataVolumes` and the DataVolumesReady condition. Copies of other VMs' disks are
`clone.py`'s; imports run in `imports.Runner`'s threads and queue the VM when they end.
"""

from __future__ import annotations

from pathlib import Path

from vmquota import domainxml, errors, imports, objects, seeds, vmspec
from vmquota.controller.clone import CLONE_SOURCE_ANNOTATION, Clones
from vmquota.controller.context import Context
from vmquota.controller.state import key_of, volumes_ready
from vmquota.objects import Obj
from vmquota.store import Transaction
from vmquota.vmspec import VMSpec

FIRST_PHASE = {vmspec.SourceKind.BLANK: imports.Phase.PENDING, vmspec.SourceKind.HTTP: imports.Phase.IMPORT_SCHEDULED,
               vmspec.SourceKind.PVC: imports.Phase.CLONE_SCHEDULED,
               vmspec.SourceKind.UPLOAD: imports.Phase.UPLOAD_READY}


class Volumes:
    def __init__(self, ctx: Context, clones: Clones) -> None:
        self.ctx = ctx
        self.clones = clones
        self.imports = imports.Runner(ctx.disks, report=self._import_progress,
                                      finished=lambda job: ctx.queue.add((job.namespace, job.name)))

    def ensure_disks(self, vm: Obj, spec: VMSpec) -> bool:
        """Create missing disks (copying them for a clone, from their source otherwise), grow resized ones,
        then say DataVolumesReady. False while an import still runs (it queues the VM when it ends) or an upload
        has not come yet (`uploads.py` writes the disk, and the API queues the VM); a failed import raises its
        error."""
        disks = self.ctx.disks
        ns, name, uid = vm["metadata"]["namespace"], vm["metadata"]["name"], vm["metadata"]["uid"]
        source = objects.meta(vm).get("annotations", {}).get(CLONE_SOURCE_ANNOTATION)
        missing = [d for d in spec.disks if not disks.path(ns, uid, d.name).exists()]
        if missing and source:
            self.clones.copy_from_source(vm, source, missing)
        importing = False
        for disk in spec.disks:
            path = disks.path(ns, uid, disk.name)
            if not path.exists() and disk.source.kind is vmspec.SourceKind.HTTP:
                failed = self.imports.ensure(imports.Job(ns, name, uid, disk, path))
                if failed is not None:
                    raise errors.HypervisorError(f"disk {disk.name}: {failed.message}")
                importing = True
                continue
            if not path.exists() and disk.source.kind is vmspec.SourceKind.UPLOAD:
                importing = True  # never a blank disk in its place: the upload would then be refused
                continue
            if not path.exists() and disk.source.kind is vmspec.SourceKind.PVC:
                self.clones.copy_data_volume(vm, disk, path)
            disks.ensure(path, disk.size)
        if importing:
            return False
        if not volumes_ready(vm):
            self.ctx.update(key_of(vm), _all_ready, expect_uid=uid)
            for clone in self.clones.clones_to_copy(ns, name, uid):  # they may have found no disk to copy
                self.ctx.queue.add((ns, clone))
        return True

    def disks_failed(self, txn: Transaction, vm: Obj, message: str) -> None:
        """Say why the disks cannot be made on the VM itself (DataVolumesReady False), and in an event."""
        set_volumes_condition(vm, ready=False, reason="DiskError", message=message)
        self.ctx.record(txn, vm, "Warning", "DiskError", message)

    def _import_progress(self, job: imports.Job, progress: imports.Progress) -> None:
        """An import's phase and percentage in the VM's status, as a DataVolume's status shows them."""
        def write(txn: Transaction, vm: Obj) -> None:
            set_volume_status(vm, job.disk.name, progress)
            if progress.phase is imports.Phase.FAILED:
                self.disks_failed(txn, vm, f"disk {job.disk.name}: {progress.message}")
            elif not volumes_ready(vm):
                set_volumes_condition(vm, ready=False, reason=progress.phase.value,
                                      message=f"disk {job.disk.name}: {progress.phase.value} {progress.progress}")

        self.ctx.update((job.namespace, job.name), write, expect_uid=job.uid)

    def seed_path(self, vm: Obj) -> Path:
        # A fixed name: the volume's name, like everything else the user wrote, stays out of paths.
        return self.ctx.disks.vm_dir(vm["metadata"]["namespace"], vm["metadata"]["uid"]) / "cloudinit.iso"

    def write_seed(self, vm: Obj, spec: VMSpec) -> None:
        """The cloud-init seed, written afresh at every start: user data edited while stopped takes effect."""
        if spec.cloud_init is not None:
            seeds.write(spec.cloud_init, self.seed_path(vm), uid=vm["metadata"]["uid"],
                        hostname=vm["metadata"]["name"])

    def domain_xml(self, vm: Obj, spec: VMSpec) -> str:
        disks = self.ctx.disks
        ns, name, uid = vm["metadata"]["namespace"], vm["metadata"]["name"], vm["metadata"]["uid"]
        attached = [domainxml.DomainDisk(disks.path(ns, uid, disk), target)
                    for disk, target in domainxml.attached_targets(spec).items()]
        seed = None if spec.cloud_init is None else domainxml.Seed(self.seed_path(vm), spec.cloud_init.cdrom)
        nics = tuple(domainxml.Nic(vmspec.mac_address(i, uid), i.model, i.bridge) for i in spec.interfaces)
        vm_dir = disks.vm_dir(ns, uid)
        vm_dir.mkdir(parents=True, exist_ok=True)  # a VM without disks has no folder yet, and QEMU opens its log there
        return domainxml.build(namespace=ns, name=name, uid=uid, instance=self.ctx.store.instance_id, spec=spec,
                               disks=attached, domain_type=self.ctx.host_of(vm).domain_type, seed=seed, nics=nics,
                               console_log=vm_dir / "console.log")


def set_initial_status(vm: Obj, spec: VMSpec) -> None:
    """A new VM's status.dataVolumes: each disk in the first phase of its kind of source."""
    for disk in spec.disks:
        set_volume_status(vm, disk.name, imports.Progress(FIRST_PHASE[disk.source.kind]))


def set_volumes_condition(vm: Obj, *, ready: bool, reason: str, message: str) -> None:
    """KubeVirt's DataVolumesReady condition: whether every disk of the VM exists, and why not."""
    conditions = vm.setdefault("status", {}).setdefault("conditions", [])
    conditions[:] = [c for c in conditions if c.get("type") != "DataVolumesReady"]
    conditions.append({"type": "DataVolumesReady", "status": "True" if ready else "False",
                       "lastTransitionTime": objects.now(), "reason": reason, "message": message})


def _all_ready(txn: Transaction, vm: Obj) -> None:
    set_volumes_condition(vm, ready=True, reason="AllDVsReady", message="all of the VM's disks exist")
    for entry in (vm.get("status") or {}).get("dataVolumes") or []:
        entry.update({"phase": imports.Phase.SUCCEEDED.value, "progress": "100.0%"})
        entry.pop("message", None)


def set_volume_status(vm: Obj, disk: str, progress: imports.Progress) -> None:
    """One disk's entry of status.dataVolumes: CDI's phase and progress of the DataVolume it stands for."""
    entries = vm.setdefault("status", {}).setdefault("dataVolumes", [])
    entry = {"name": disk, "phase": progress.phase.value, "progress": progress.progress}
    if progress.message:
        entry["message"] = progress.message
    entries[:] = [e for e in entries if e.get("name") != disk] + [entry]
    entries.sort(key=lambda e: e.get("name", ""))
