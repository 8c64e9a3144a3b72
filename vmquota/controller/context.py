"""What every part of the controller shares, and `transition`: the one place a VM changes phase and charge.

The store, the hosts, the disks, the work queue and the clock, handed to each part (lifecycle, volumes, clone,
guest, recount, nodes, migration) at construction. `transition` asks `usage.charge` what the new phase costs and
`accounting.set_charge` to charge it, admitted when it rises; it also keeps the VM's placement (the capacity it
reserves on its node, `placement`) and its VirtualMachineInstance (`instances`). `charge` and `release` are the
only calls of `set_charge` in the controller: a spec change (`lifecycle.admit_update`) and a deletion use them
directly. A migration moves the placement, never the charge.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from vmquota import accounting, objects, usage, vmspec, vmstatus
from vmquota.controller import instances, placement
from vmquota.controller.hosts import Hosts
from vmquota.controller.state import (
    GUEST_ADDRESS,
    GUEST_REQUEST,
    NODE_NAME,
    STOP_DEADLINE,
    STOP_GRACE,
    Key,
    deleting,
    key_of,
    node_of,
    runtime_phase,
    subject,
)
from vmquota.disks import Disks
from vmquota.hypervisor import Hypervisor
from vmquota.objects import VIRTUAL_MACHINE as VM
from vmquota.objects import Obj
from vmquota.store import Reader, Store, Transaction
from vmquota.usage import OverheadModel
from vmquota.vmspec import VMSpec
from vmquota.vmstatus import Phase
from vmquota.workqueue import WorkQueue


class Context:
    def __init__(self, *, store: Store, hypervisor: Hypervisor, disks: Disks, overhead: OverheadModel,
                 clock: Callable[[], float], policy: placement.Policy = placement.Policy.SPREAD) -> None:
        self.store = store
        self.hypervisor = hypervisor
        self.disks = disks
        self.overhead = overhead
        self.clock = clock
        self.queue: WorkQueue[Key] = WorkQueue(clock=time.monotonic)
        self.hosts = Hosts(hypervisor, store)
        self.policy = policy
        self.candidates = placement.Candidates()
        # The VMs whose live migration this process drives: the rest of the controller leaves them alone until
        # it ends (their domains' events are the migration's). Guarded by `lock`.
        self.migrating: set[Key] = set()
        self.lock = threading.Lock()

    def host_of(self, vm: Obj, reader: Reader | None = None) -> Hypervisor:
        """The libvirt host the VM is placed on (the first node's when it is placed nowhere)."""
        return self.hosts.of(node_of(vm), reader)

    def update(self, key: Key, change: Callable[[Transaction, Obj], None], *, expect_uid: str | None = None) -> None:
        """Re-read the VM inside a transaction and apply `change`, so decisions use the latest state.

        The VM is written back only if `change` altered it and did not delete it.
        """
        with self.store.transaction() as txn:
            vm = txn.get(VM, *key)
            if vm is None or (expect_uid and vm["metadata"]["uid"] != expect_uid):
                return
            before = txn.get(VM, *key)  # a second parse: five times cheaper than copy.deepcopy of the VM
            change(txn, vm)
            if vm != before and txn.exists(VM, *key):
                txn.update(VM, vm)

    def record(self, txn: Transaction, vm: Obj, type_: str, reason: str, message: str) -> None:
        """A Kubernetes Event about `vm`, in the same transaction as the change it reports."""
        ns, name = key_of(vm)
        stamp = objects.now()
        txn.create(objects.EVENT, {
            "metadata": {"name": f"{name}.{objects.new_uid()[:13].replace('-', '')}", "namespace": ns},
            "involvedObject": {"apiVersion": VM.api_version, "kind": VM.kind, "namespace": ns, "name": name,
                               "uid": vm["metadata"].get("uid", "")},
            "reason": reason, "message": message, "type": type_, "count": 1,
            "firstTimestamp": stamp, "lastTimestamp": stamp,
            "source": {"component": "vmquota"}, "reportingComponent": "vmquota",
        })

    def charge(self, txn: Transaction, namespace: str, name: str, spec: VMSpec, phase: Phase, *,
               enforce: bool) -> None:
        """Charge the VM what `spec` costs in `phase` (admitted against every covering quota if `enforce` and it
        rises): usage.charge decides the amounts, accounting.set_charge the ledger and the quotas' used."""
        accounting.set_charge(txn, namespace, name, usage.charge(spec, phase, self.overhead),
                              enforce=enforce, subject=subject(name))

    def release(self, txn: Transaction, namespace: str, name: str) -> None:
        """The VM is gone: it charges nothing any more."""
        accounting.set_charge(txn, namespace, name, None, enforce=False, subject=subject(name))

    def transition(self, txn: Transaction, vm: Obj, phase: Phase, *, spec: VMSpec | None = None,
                   enforce: bool, reason: str = "", message: str = "", node: str | None = None) -> None:
        """Set the phase, charge what that phase costs (admitted if `enforce` and it rises), reserve its node's
        capacity, keep its VMI, queue the VM. The caller writes the VM, in the same transaction.

        A phase that holds a runtime needs a node: `node` (where it was found running), else the one it is on,
        else (coming from a phase without a runtime) one that placement chooses now: Unschedulable when none
        fits, and nothing is written then. Quota first, as Kubernetes admits a pod before it schedules it: a
        start refused by both is refused by its quota.
        """
        ns, name = key_of(vm)
        spec = spec or vmspec.read(vm)
        if usage.holds_runtime(phase):
            # A VM that held a runtime before it had a node (an older data dir) runs on the first node.
            held = usage.holds_runtime(runtime_phase(vm))
            node = node or node_of(vm) or (self.hosts.first_name(txn) if held else
                                           self._choose_node(txn, vm, spec, phase, enforce=enforce))
        self.charge(txn, ns, name, spec, phase, enforce=enforce)
        self._reserve(txn, vm, spec, phase, node)
        status = vm.setdefault("status", {})
        previous = status.get("phase")
        status["phase"] = phase.value
        kept = [c for c in status.get("conditions") or [] if c.get("type") == "DataVolumesReady"]
        status.update(vmstatus.render(phase, reason=reason, message=message, timestamp=objects.now()))
        status["conditions"] += kept
        if deleting(vm):
            status["printableStatus"] = "Terminating"
        if phase is not Phase.STOPPING:  # a stop's gracePeriod and deadline end with it
            status.pop(STOP_GRACE, None)
            status.pop(STOP_DEADLINE, None)
        if phase is Phase.RUNNING and previous != Phase.RUNNING.value:
            status["runningSince"] = self.clock()
        if phase in (Phase.RUNNING, Phase.PAUSED) and spec.interfaces:
            uid = vm["metadata"].get("uid", "")
            status["interfaces"] = [_interface_status(i, uid) for i in spec.interfaces]
        else:
            status.pop("interfaces", None)
        if phase not in (Phase.RUNNING, Phase.PAUSED):  # a pause or reboot ends with the runtime
            status.pop(GUEST_REQUEST, None)
        instances.sync(txn, vm, phase, node_of(vm) or self.hosts.first_name(txn))
        txn.after_commit(lambda: self.queue.add((ns, name)))

    def _choose_node(self, txn: Transaction, vm: Obj, spec: VMSpec, phase: Phase, *, enforce: bool) -> str:
        """The node a VM starting now goes on; "" (the server's own host, unchecked) while no node is registered."""
        ns, name = key_of(vm)
        charge = usage.charge(spec, phase, self.overhead)
        if enforce:
            accounting.check_charge(txn, ns, name, charge, subject=subject(name))
        candidates = self.candidates(txn)
        if not candidates:
            return ""
        return placement.choose(placement.need_of(spec, charge), candidates, self.policy)

    def _reserve(self, txn: Transaction, vm: Obj, spec: VMSpec, phase: Phase, node: str | None) -> None:
        """The VM's reservation of its node's capacity: its requests while it holds a runtime, nothing after."""
        ns, name = key_of(vm)
        status = vm.setdefault("status", {})
        if not usage.holds_runtime(phase):
            if status.pop(NODE_NAME, None) is not None or txn.placements_of(ns, name):
                txn.unplace(ns, name)
            return
        if not node:
            return  # no node registered yet: nothing to reserve on
        cpu, memory = placement.reservation(usage.charge(spec, phase, self.overhead))
        status[NODE_NAME] = node
        placed = txn.placements_of(ns, name)
        for other, role, *_ in placed:
            if role == placement.RUNS and other != node:  # found running elsewhere: it is no longer there
                txn.unplace(ns, name, other)
        if (node, placement.RUNS, cpu, memory) not in placed:
            txn.place(ns, name, node, placement.RUNS, cpu, memory)


def _interface_status(interface: vmspec.Interface, uid: str) -> dict[str, Any]:
    """KubeVirt's status.interfaces entry: the user network's one guest address is known; a bridged guest's is
    the bridge's network's to give (no guest agent tells it), so it lists name and MAC only."""
    entry: dict[str, Any] = {"name": interface.name, "mac": vmspec.mac_address(interface, uid), "infoSource": "domain"}
    if interface.binding is vmspec.Binding.MASQUERADE:
        entry.update(ipAddress=GUEST_ADDRESS, ipAddresses=[GUEST_ADDRESS])
    return entry
