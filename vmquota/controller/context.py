"""What every part of the controller shares, and `transition`: the one place a VM changes phase and charge.

The store, the hypervisor, the disks, the work queue and the clock, handed to each part (lifecycle, volumes,
clone, guest, recount) at construction. `transition` asks `usage.charge` what the new phase costs and
`accounting.set_charge` to charge it, admitted when it rises. `charge` and `release` are the only calls of
`set_charge` in the controller: a spec change (`lifecycle.admit_update`) and a deletion use them directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vmquota import accounting, objects, usage, vmspec, vmstatus
from vmquota.controller.state import (
    GUEST_ADDRESS,
    GUEST_REQUEST,
    STOP_DEADLINE,
    STOP_GRACE,
    Key,
    deleting,
    key_of,
    subject,
)
from vmquota.disks import Disks
from vmquota.hypervisor import Hypervisor
from vmquota.objects import VIRTUAL_MACHINE as VM
from vmquota.objects import Obj
from vmquota.store import Store, Transaction
from vmquota.usage import OverheadModel
from vmquota.vmspec import VMSpec
from vmquota.vmstatus import Phase
from vmquota.workqueue import WorkQueue


class Context:
    def __init__(self, *, store: Store, hypervisor: Hypervisor, disks: Disks, overhead: OverheadModel,
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.hypervisor = hypervisor
        self.disks = disks
        self.overhead = overhead
        self.clock = clock
        self.queue: WorkQueue[Key] = WorkQueue(clock=time.monotonic)

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
                   enforce: bool, reason: str = "", message: str = "") -> None:
        """Set the phase, charge what that phase costs (admitted if `enforce` and it rises), queue the VM.

        The caller writes the VM, in the same transaction.
        """
        ns, name = key_of(vm)
        spec = spec or vmspec.read(vm)
        self.charge(txn, ns, name, spec, phase, enforce=enforce)
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
            status["interfaces"] = [{"name": i.name, "mac": vmspec.mac_address(i, uid), "ipAddress": GUEST_ADDRESS,
                                     "ipAddresses": [GUEST_ADDRESS], "infoSource": "domain"} for i in spec.interfaces]
        else:
            status.pop("interfaces", None)
        if phase not in (Phase.RUNNING, Phase.PAUSED):  # a pause or reboot ends with the runtime
            status.pop(GUEST_REQUEST, None)
        txn.after_commit(lambda: self.queue.add((ns, name)))
