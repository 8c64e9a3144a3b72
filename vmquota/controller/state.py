"""What a stored VM's status says about its runtime: pure helpers that every part of the controller reads.

No I/O here: these look at a VM object (or a row of the recount) and answer questions such as "which phase does the
controller act on" and "does its run strategy want it running". The rest of the package builds on them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from vmquota import objects, usage, vmspec, vmstatus
from vmquota.hypervisor import DomainState, ExitCause, Observed
from vmquota.objects import VIRTUAL_MACHINE as VM
from vmquota.objects import Obj
from vmquota.vmspec import RunStrategy
from vmquota.vmstatus import Phase

Key = tuple[str, str]  # (namespace, name) of a VM: what the work queue holds

# While a VM is Stopping: the gracePeriod its stop request gave (instead of the spec's), and once the guest has
# been asked to shut down, when it is forced off (seconds since the epoch, as status.runningSince). They live in
# the VM, not in the controller's memory, so a stop made through any API process, or before a restart, is kept.
STOP_GRACE = "stopGracePeriodSeconds"
STOP_DEADLINE = "stopDeadline"
# A pause, unpause or soft reboot asked for and not yet done: KubeVirt's VMI subresources, acted on by reconcile.
GUEST_REQUEST = "guestRequest"
# The node the VM's runtime is placed on (vmquota's bookkeeping beside KubeVirt's fields; its VMI shows it as
# status.nodeName). Absent while it holds no runtime, and on VMs that ran before there were nodes: the first node.
NODE_NAME = "nodeName"
GUEST_ADDRESS = "10.0.2.15"  # what QEMU's user-mode DHCP gives the guest: the first address of 10.0.2.0/24


def key_of(vm: Obj) -> Key:
    return vm["metadata"]["namespace"], vm["metadata"]["name"]


def subject(name: str) -> str:
    """How refusals name the VM: `virtualmachines.kubevirt.io "web-1"`."""
    return f'{VM.resource} "{name}"'


def runtime_phase(vm: Obj) -> Phase:
    """The phase the controller acts on (printableStatus may say Terminating instead)."""
    return Phase((vm.get("status") or {}).get("phase", Phase.STOPPED.value))


def node_of(vm: Obj) -> str | None:
    return (vm.get("status") or {}).get(NODE_NAME) or None


def deleting(vm: Obj) -> bool:
    return bool(objects.meta(vm).get("deletionTimestamp"))


def last_exit(vm: Obj) -> str | None:
    return (vm.get("status") or {}).get("lastExit")


def wants_running(strategy: RunStrategy, exit_reason: str | None) -> bool:
    """Whether the run strategy asks for a runtime now (KubeVirt's meaning of each strategy), given how
    the VM last went off (`status.lastExit`)."""
    match strategy:
        case RunStrategy.ALWAYS:
            return True
        case RunStrategy.RERUN_ON_FAILURE:
            return exit_reason != ExitCause.GUEST_SHUTDOWN.value
        case RunStrategy.ONCE:
            return exit_reason is None
        case _:
            return False


def bring_stop_nearer(status: dict[str, Any], grace: int, *, now: float) -> None:
    """A later stop's gracePeriod (`virtctl stop --force --grace-period=0`) can end a stop sooner, never later."""
    if STOP_DEADLINE in status:  # the guest has been asked to shut down already
        status[STOP_DEADLINE] = min(status[STOP_DEADLINE], now + grace)
    else:
        status[STOP_GRACE] = min(status.get(STOP_GRACE, grace), grace)


def volumes_ready(vm: Obj) -> bool:
    conditions = (vm.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "DataVolumesReady" and c.get("status") == "True" for c in conditions)


class StoredVM(NamedTuple):
    """What the recount compares with the hypervisor for one VM: a row of `Reader.vm_states`."""

    namespace: str
    name: str
    uid: str
    phase: Phase  # status.phase, the phase the controller acts on
    deleting: bool  # metadata.deletionTimestamp is set
    volumes_ready: bool  # the DataVolumesReady condition is True
    run_strategy: str | None  # spec.runStrategy
    running: int | None  # spec.running, 1 or 0 when set
    last_exit: str | None  # status.lastExit

    @staticmethod
    def from_row(row: tuple[str, str, str, str | None, int, str | None, int | None, str | None, int]) -> StoredVM:
        namespace, name, uid, phase, deleting, run_strategy, running, exit_reason, volumes_ready = row
        return StoredVM(namespace, name, uid, _PHASES[phase or Phase.STOPPED.value], bool(deleting),
                        bool(volumes_ready), run_strategy, running, exit_reason)


_PHASES = {phase.value: phase for phase in Phase}


def needs_reconcile(vm: StoredVM, seen: Observed) -> bool:
    """Whether a VM's phase disagrees with what the hypervisor shows, or still has somewhere to go."""
    if vm.deleting or vm.phase in (Phase.STARTING, Phase.STOPPING, Phase.UNSCHEDULABLE, Phase.CRASH_LOOP):
        return True  # in flight, or waiting for a retry whose timer a restarted server no longer has
    if not vm.volumes_ready:
        return True  # its disks are not made yet: the server may have died between the create and the disks
    up = seen.up and seen.uid == vm.uid
    if up != usage.holds_runtime(vm.phase):
        return True
    if up:
        return (seen.state is DomainState.PAUSED) != (vm.phase is Phase.PAUSED)
    return wants_running(vmspec.stored_run_strategy(vm.run_strategy, vm.running), vm.last_exit)


UNKNOWN = "Unknown"  # KubeVirt's printableStatus of a VM whose host cannot be reached
NODE_UNREACHABLE = "NodeUnreachable"


def is_ready(node: Obj | None) -> bool:
    return node is not None and any(c.get("type") == "Ready" and c.get("status") == "True"
                                    for c in (node.get("status") or {}).get("conditions") or [])


def show_node_readiness(_txn: object, vm: Obj, *, node: str, ready: bool) -> None:
    """A VM on a NotReady node shows Unknown, as KubeVirt's do: nobody can tell whether it still runs, so it
    stays charged. Once the node answers again, the VM shows its phase again."""
    status = vm.setdefault("status", {})
    if status.get(NODE_NAME) != node:
        return
    shown = status.get("printableStatus") == UNKNOWN
    if ready == (not shown):
        return
    others = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"]
    if ready:
        phase = runtime_phase(vm)
        rendered = vmstatus.render(phase, timestamp=objects.now())
        status["printableStatus"] = "Terminating" if deleting(vm) else phase.value
        status["ready"] = rendered["ready"]
        status["conditions"] = [rendered["conditions"][0], *others]
        return
    status["printableStatus"] = UNKNOWN
    status["ready"] = False
    status["conditions"] = [{"type": "Ready", "status": "Unknown", "lastTransitionTime": objects.now(),
                             "reason": NODE_UNREACHABLE, "message": f"node {node} does not answer: the VM may "
                                                                    f"still run there, and stays charged"}, *others]


def migrating(vm: Obj) -> bool:
    """Is a live migration of the VM in flight (admitted, not ended)? Every API process can tell, from the VM."""
    state = (vm.get("status") or {}).get("migrationState") or {}
    return bool(state.get("targetNode")) and not state.get("endTimestamp")
