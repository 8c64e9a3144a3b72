"""The VirtualMachineInstance of each VM that holds a runtime, as KubeVirt's virt-controller keeps it.

Written by `Context.transition` in the transaction that changes the VM's phase: made when a start is admitted,
kept in step while the VM runs, pauses and stops, removed when the domain is confirmed off. Users only read it
(`kubectl get vmi -o wide`): its `status.nodeName` says which host runs the VM.
"""

from __future__ import annotations

from typing import Any

from vmquota import objects, usage
from vmquota.objects import VIRTUAL_MACHINE as VM
from vmquota.objects import VIRTUAL_MACHINE_INSTANCE as VMI
from vmquota.objects import Obj
from vmquota.store import Transaction
from vmquota.vmstatus import Phase

# vmquota's phase of a VM -> KubeVirt's phase of its VMI.
VMI_PHASE = {Phase.STARTING: "Scheduled", Phase.RUNNING: "Running", Phase.PAUSED: "Running",
             Phase.STOPPING: "Running"}


def sync(txn: Transaction, vm: Obj, phase: Phase, node_name: str) -> None:
    """Make, update or remove the VM's VMI so that it shows `phase` on `node_name`."""
    ns, name = vm["metadata"]["namespace"], vm["metadata"]["name"]
    current = txn.get(VMI, ns, name)
    if not usage.holds_runtime(phase):
        if current is not None:
            txn.delete(VMI, ns, name)
        return
    wanted = instance_of(vm, phase, node_name)
    if current is None:
        txn.create(VMI, wanted)
        return
    if current.get("spec") != wanted["spec"] or current.get("status") != wanted["status"] or \
            objects.labels(current) != objects.labels(wanted):
        current.update(spec=wanted["spec"], status=wanted["status"])
        current["metadata"]["labels"] = wanted["metadata"]["labels"]
        txn.update(VMI, current)


def instance_of(vm: Obj, phase: Phase, node_name: str) -> Obj:
    """The VMI of a running VM: the template's spec, owned by the VM, with its phase, node and interfaces."""
    meta = vm["metadata"]
    template = (vm.get("spec") or {}).get("template") or {}
    labels = dict((template.get("metadata") or {}).get("labels") or {})
    labels["kubevirt.io/nodeName"] = node_name
    vm_status = vm.get("status") or {}
    paused = phase is Phase.PAUSED
    conditions: list[dict[str, Any]] = [
        {"type": "Ready", "status": "True" if phase is Phase.RUNNING else "False",
         "lastProbeTime": None, "lastTransitionTime": None},
        {"type": "LiveMigratable", "status": "True", "lastProbeTime": None, "lastTransitionTime": None}]
    if paused:
        conditions.append({"type": "Paused", "status": "True", "reason": "PausedByUser",
                           "message": "VMI was paused by user", "lastProbeTime": None, "lastTransitionTime": None})
    status: dict[str, Any] = {"phase": VMI_PHASE[phase], "nodeName": node_name, "conditions": conditions}
    if vm_status.get("interfaces"):
        status["interfaces"] = vm_status["interfaces"]
    if vm_status.get("migrationState"):
        status["migrationState"] = vm_status["migrationState"]
    return {
        "apiVersion": VMI.api_version, "kind": VMI.kind,
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "labels": labels,
                     "ownerReferences": [{"apiVersion": VM.api_version, "kind": VM.kind, "name": meta["name"],
                                          "uid": meta.get("uid", ""), "controller": True,
                                          "blockOwnerDeletion": True}]},
        "spec": template.get("spec") or {},
        "status": status,
    }
