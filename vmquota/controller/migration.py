"""Live migration: a running VM moves to another node, and is charged exactly once throughout.

A VirtualMachineInstanceMigration (made by `PUT .../virtualmachines/{name}/migrate`, by `vmquota migrate` or
directly) is admitted in the transaction that creates it: the VM must run and have no other migration in
flight, and placement chooses a target node (never the source) whose capacity is reserved at once, as a second
placement row of role MIGRATION_TARGET. Nothing here calls `Context.charge` or `transition`: the VM's phase stays
Running, so its quota charge cannot move, and `spec.hard` is never read or written.

A thread per migration then drives libvirt's peer-to-peer live migration (`Hypervisor.migrate`) and watches
for a cancel (the migration object deleted). At the end, in one transaction:
- success: the target's reservation becomes the VM's placement and the source's is released;
- failure or cancel: the target's reservation is released; the VM runs on the source as before.

While a VM migrates the rest of the controller leaves it alone (`Context.migrating`): the source's "stopped"
and the target's "started" events are the migration's, not a guest's. A server that restarts mid-migration
finds the migration where libvirt left it (`recover`): libvirt's peer-to-peer job runs on without vmquota.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import threading
import time
from typing import Any

from vmquota import errors, objects, usage, vmspec
from vmquota.controller import instances, nodes, placement
from vmquota.controller.context import Context
from vmquota.controller.state import NODE_NAME, Key, node_of, runtime_phase
from vmquota.hypervisor import Hypervisor
from vmquota.objects import NODE, Obj
from vmquota.objects import VIRTUAL_MACHINE as VM
from vmquota.objects import VIRTUAL_MACHINE_INSTANCE_MIGRATION as VMIM
from vmquota.store import Transaction
from vmquota.vmstatus import Phase

log = logging.getLogger(__name__)

ACTIVE = ("Pending", "Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running")
MIGRATING = "Migrating"  # KubeVirt's printableStatus of a VM whose VMI migrates
LOCAL_STORAGE = "vmquota.io/local-storage"  # "true" on a node whose disks other nodes cannot see: they are copied
CANCEL_POLL_SECONDS = 0.2
MIGRATION_PORTS = range(49152, 49216)  # libvirt's default migration_port_min..max


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def active(vmim: Obj) -> bool:
    return (vmim.get("status") or {}).get("phase", "Pending") in ACTIVE


def in_flight(txn: Transaction, namespace: str, vm_name: str) -> Obj | None:
    """The VM's migration that has not ended, if any."""
    for vmim in txn.list(VMIM, namespace):
        if (vmim.get("spec") or {}).get("vmiName") == vm_name and active(vmim):
            return vmim
    return None


def _phase(vmim: Obj, phase: str, **state: Any) -> None:
    status = vmim.setdefault("status", {})
    status["phase"] = phase
    status.setdefault("phaseTransitionTimestamps", []).append(
        {"phase": phase, "phaseTransitionTimestamp": objects.now()})
    status.setdefault("migrationState", {}).update(state)


class Migrations:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._threads: dict[Key, threading.Thread] = {}

    # -- admission: in the API's transaction ---------------------------------------------------

    def admit(self, txn: Transaction, vmim: Obj) -> None:
        """Check the migration and reserve its target, or fail it with the scheduler's words."""
        ns = vmim["metadata"]["namespace"]
        vm_name = vmim["spec"]["vmiName"]
        vm = txn.get(VM, ns, vm_name)
        if vm is None or not usage.holds_runtime(runtime_phase(vm)):
            raise errors.Invalid(f'{VMIM.qualified_kind} "{vmim["metadata"]["name"]}" is invalid: spec.vmiName: '
                                 f"Invalid value: {vm_name!r}: the VMI {ns}/{vm_name} does not exist or is not "
                                 f"running: only a running VMI can be migrated")
        if runtime_phase(vm) is not Phase.RUNNING:
            raise errors.Conflict(f"the VMI {ns}/{vm_name} is {runtime_phase(vm).value}: only a running VMI can "
                                  f"be migrated")
        other = in_flight(txn, ns, vm_name)
        if other is not None:
            raise errors.Conflict(f"in-flight migration detected. Active migration job "
                                  f"({other['metadata']['name']}) is currently already in progress for VMI {vm_name}.")
        source = node_of(vm) or self.ctx.hosts.first_name(txn)
        spec = vmspec.read(vm)
        charge = usage.charge(spec, Phase.RUNNING, self.ctx.overhead)
        selector = {**spec.node_selector, **((vmim.get("spec") or {}).get("addedNodeSelector") or {})}
        need = dataclasses.replace(placement.need_of(spec, charge, exclude=source), node_selector=selector)
        vmim["metadata"].setdefault("uid", objects.new_uid())
        try:
            target = placement.choose(need, self.ctx.candidates(txn), self.ctx.policy)
        except placement.Unschedulable as e:
            _phase(vmim, "Failed", sourceNode=source, failed=True, failureReason=str(e),
                   migrationUid=vmim["metadata"]["uid"])
            vmim["status"]["conditions"] = [{"type": "Failed", "status": "True", "reason": "Unschedulable",
                                             "message": str(e), "lastTransitionTime": objects.now()}]
            self.ctx.record(txn, vm, "Warning", "FailedMigration", f"no node to migrate to: {e}")
            return
        cpu, memory = placement.reservation(charge)
        txn.place(ns, vm_name, target, placement.MIGRATION_TARGET, cpu, memory)
        _phase(vmim, "Scheduled", sourceNode=source, targetNode=target, migrationUid=vmim["metadata"]["uid"])
        self._show(txn, vm, vmim["status"]["migrationState"], migrating=True)
        self.ctx.record(txn, vm, "Normal", "Migrating", f"migrating from node {source} to node {target}")
        # The key reaches the controller's process, whichever API process this is: the migration begins there.
        txn.after_commit(lambda: self.ctx.queue.add((ns, vm_name)))

    def _show(self, txn: Transaction, vm: Obj, state: dict[str, Any], *, migrating: bool) -> None:
        """The VM (and its VMI) show the migration: Migrating while it runs, Running again after."""
        status = vm.setdefault("status", {})
        status["migrationState"] = dict(state)
        status["printableStatus"] = MIGRATING if migrating else runtime_phase(vm).value
        txn.update(VM, vm)
        instances.sync(txn, vm, runtime_phase(vm), status.get(NODE_NAME) or self.ctx.hosts.first_name(txn))

    # -- the migration itself: a thread each, in the controller's process ------------------------

    def reconcile(self, key: Key) -> None:
        """A VM that shows a migration in flight which this process does not drive yet: drive it (Scheduled),
        settle it (Running, from before a restart), or end it (its object was deleted before it began)."""
        with self.ctx.store.transaction() as txn:
            vmim = in_flight(txn, *key)
        if vmim is None:
            self._end(key, "", succeeded=False)
        elif vmim["status"]["phase"] == "Scheduled":
            self.begin(key, vmim["metadata"]["name"])
        else:
            self._recover(vmim)

    def begin(self, key: Key, vmim_name: str) -> None:
        with self.ctx.lock:
            if key in self.ctx.migrating:
                return
            self.ctx.migrating.add(key)
        thread = threading.Thread(target=self._run, args=(key, vmim_name), name=f"migrate-{key[0]}/{key[1]}",
                                  daemon=True)
        self._threads[key] = thread
        thread.start()

    def _run(self, key: Key, vmim_name: str) -> None:
        ns, name = key
        try:
            reader = self.ctx.store.reader()
            vm, vmim = reader.get(VM, ns, name), reader.get(VMIM, ns, vmim_name)
            if vm is None or vmim is None:
                self._end(key, vmim_name, succeeded=False, reason="the VM or its migration is gone")
                return
            state = vmim["status"]["migrationState"]
            source, target = self.ctx.hosts.of(state["sourceNode"]), self.ctx.hosts.of(state["targetNode"])
            self._set_phase(key, vmim_name, "Running", startTimestamp=objects.now(), mode="PreCopy")
            cancel = threading.Event()
            watcher = threading.Thread(target=self._watch_cancel, args=(key, vmim_name, source, cancel),
                                       daemon=True)
            watcher.start()
            try:
                # Without a copy the target must see the same disk files; libvirt trusts that only of a cluster
                # file system unless vouched for. A target that cannot open them fails the migration cleanly.
                copy = self._copy_storage(state["sourceNode"], state["targetNode"])
                log.info("%s/%s: migrating from node %s to node %s%s", ns, name, state["sourceNode"],
                         state["targetNode"], ", copying its disks" if copy else "")
                source.migrate(ns, name, vm["metadata"]["uid"], target,
                               migrate_uri=self._migrate_uri(state["targetNode"]), copy_storage=copy,
                               trust_shared_storage=True)
            finally:
                cancel.set()
            self._end(key, vmim_name, succeeded=True)
        except errors.HypervisorError as e:
            self._end(key, vmim_name, succeeded=False, reason=str(e))
        except Exception as e:
            log.exception("migrating %s/%s", ns, name)
            self._end(key, vmim_name, succeeded=False, reason=f"internal error: {e}")

    def _watch_cancel(self, key: Key, vmim_name: str, source: Hypervisor, done: threading.Event) -> None:
        """Deleting the migration object cancels it: the job on the source is aborted."""
        while not done.wait(CANCEL_POLL_SECONDS):
            if self.ctx.store.reader().get(VMIM, key[0], vmim_name) is None:
                log.info("%s/%s: migration %s deleted: aborting it", *key, vmim_name)
                try:
                    vm = self.ctx.store.reader().get(VM, *key)
                    source.abort_migration(*key, (vm or {}).get("metadata", {}).get("uid", ""))
                except errors.HypervisorError as e:
                    log.warning("%s/%s: aborting the migration: %s", *key, e)
                return

    def _migrate_uri(self, target_node: str) -> str:
        """Where the target's QEMU listens for the guest's memory. Hosts of this very machine (a loopback
        address) would each pick the first port of libvirt's range, so a free one is chosen here for them;
        a remote host's libvirtd picks its own."""
        node = self.ctx.store.reader().get(NODE, "", target_node) or {}
        address = nodes.migration_address(node)
        if not _is_loopback(address):
            return f"tcp://{address}"
        for port in MIGRATION_PORTS:
            with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
                try:
                    probe.bind((address, port))
                except OSError:
                    continue
                return f"tcp://[{address}]:{port}" if ":" in address else f"tcp://{address}:{port}"
        raise errors.HypervisorError(f"no free migration port on {address} in {MIGRATION_PORTS.start}-"
                                     f"{MIGRATION_PORTS.stop - 1}")

    def _copy_storage(self, source_node: str, target_node: str) -> bool:
        """Copy the disks unless both nodes see the same files (the default: a shared disk path)."""
        reader = self.ctx.store.reader()
        return any(((reader.get(NODE, "", n) or {}).get("metadata", {}).get("annotations") or {})
                   .get(LOCAL_STORAGE) == "true" for n in (source_node, target_node))

    def _set_phase(self, key: Key, vmim_name: str, phase: str, **state: Any) -> None:
        with self.ctx.store.transaction() as txn:
            vmim = txn.get(VMIM, key[0], vmim_name)
            if vmim is not None:
                _phase(vmim, phase, **state)
                txn.update(VMIM, vmim)

    def _end(self, key: Key, vmim_name: str, *, succeeded: bool, reason: str = "") -> None:
        """The outcome, in one transaction: the VM's placement, the migration's phase, the VM's status."""
        ns, name = key
        try:
            with self.ctx.store.transaction() as txn:
                placed = {role: node for node, role, *_ in txn.placements_of(ns, name)}
                source, target = placed.get(placement.RUNS), placed.get(placement.MIGRATION_TARGET)
                vm, vmim = txn.get(VM, ns, name), txn.get(VMIM, ns, vmim_name)
                cancelled = vmim is None and not succeeded
                if succeeded and target is not None and vm is not None:
                    if source:
                        txn.unplace(ns, name, source)
                    txn.unplace(ns, name, target)
                    cpu, memory = placement.reservation(usage.charge(vmspec.read(vm), Phase.RUNNING,
                                                                     self.ctx.overhead))
                    txn.place(ns, name, target, placement.RUNS, cpu, memory)
                    vm.setdefault("status", {})[NODE_NAME] = target
                elif target is not None:
                    txn.unplace(ns, name, target)
                state = {"endTimestamp": objects.now(), "completed": succeeded, "failed": not succeeded}
                if reason:
                    state["failureReason"] = reason
                if vmim is not None:
                    _phase(vmim, "Succeeded" if succeeded else "Failed", **state)
                    txn.update(VMIM, vmim)
                if vm is not None:
                    shown = {**(vm.get("status") or {}).get("migrationState", {}), **state}
                    if cancelled:
                        shown["abortStatus"] = "Succeeded"
                    self._show(txn, vm, shown, migrating=False)
                    words = (f"migrated to node {target}" if succeeded else
                             "migration cancelled: the VM runs on as before" if cancelled else
                             f"migration failed, the VM runs on as before: {reason}")
                    self.ctx.record(txn, vm, "Normal" if succeeded or cancelled else "Warning",
                                    "Migrated" if succeeded else "MigrationCancelled" if cancelled else
                                    "FailedMigration", words)
        finally:
            with self.ctx.lock:
                self.ctx.migrating.discard(key)
            self._threads.pop(key, None)
            self.ctx.queue.add(key)

    # -- a server that restarts mid-migration ---------------------------------------------------

    def recover(self) -> None:
        """Pick up the migrations that were in flight when the server stopped: each ends as libvirt ended it."""
        for vmim in self.ctx.store.reader().list(VMIM):
            if active(vmim):
                self._recover(vmim)

    def _recover(self, vmim: Obj) -> None:
        key = (vmim["metadata"]["namespace"], vmim["spec"]["vmiName"])
        state = (vmim.get("status") or {}).get("migrationState") or {}
        if not state.get("targetNode"):
            self._end(key, vmim["metadata"]["name"], succeeded=False, reason="the server restarted")
            return
        if state.get("startTimestamp") is None:  # admitted, never begun: begin now
            self.begin(key, vmim["metadata"]["name"])
            return
        with self.ctx.lock:
            if key in self.ctx.migrating:
                return
            self.ctx.migrating.add(key)
        threading.Thread(target=self._settle, args=(key, vmim["metadata"]["name"], state), daemon=True,
                         name=f"migrate-recover-{key[0]}/{key[1]}").start()

    def _settle(self, key: Key, vmim_name: str, state: dict[str, Any]) -> None:
        """Wait for the source's job to end, then the domain's place says how the migration ended."""
        source, target = self.ctx.hosts.of(state["sourceNode"]), self.ctx.hosts.of(state["targetNode"])
        try:
            while source.job_active(*key):
                time.sleep(CANCEL_POLL_SECONDS)
            vm = self.ctx.store.reader().get(VM, *key)
            uid = (vm or {}).get("metadata", {}).get("uid")
            there, here = target.observe(*key), source.observe(*key)
            moved = there.up and there.uid == uid and not (here.up and here.uid == uid)
            self._end(key, vmim_name, succeeded=moved, reason="" if moved else "the server restarted during "
                                                                                "the migration, which did not finish")
        except errors.HypervisorError as e:
            self._end(key, vmim_name, succeeded=False, reason=f"the server restarted during the migration: {e}")

