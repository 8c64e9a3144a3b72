"""The VM controller: turns requests and hypervisor events into domain actions and charges.

Middle layer, between the API (`api.py`, above) and the store, hypervisor and disks
(below). Two halves:

* Requests (`admit_new`, `request_start`, `request_stop`, `request_restart`,
  `request_delete`, `admit_update`) run inside the caller's store transaction. They
  decide the new phase, change the charge through `accounting.set_charge` (admitted
  when it rises) and queue the VM. A refused request raises and changes nothing.
* `reconcile(key)` runs on worker threads, one VM at a time, level-triggered: it
  compares the VM's phase with what the hypervisor reports and acts (create disks,
  start or stop the domain, release the charge once the domain is confirmed off,
  restart by the run strategy). libvirt lifecycle events and the periodic `resync`
  only queue VMs; all decisions are made here.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from vmquota import accounting, domainxml, errors, history, imports, objects, seeds, telemetry, usage, vmspec, vmstatus
from vmquota.disks import Disks
from vmquota.hypervisor import ABSENT, DomainState, ExitCause, GuestStream, Hypervisor, Observed
from vmquota.objects import VIRTUAL_MACHINE as VM
from vmquota.objects import Obj
from vmquota.store import Store, Transaction
from vmquota.usage import OverheadModel
from vmquota.vmspec import RunStrategy, VMSpec
from vmquota.vmstatus import Phase
from vmquota.workqueue import WorkQueue

log = logging.getLogger(__name__)

Key = tuple[str, str]

CLONE_SOURCE_ANNOTATION = "vmquota.io/clone-source"  # "<namespace>/<name>/<uid>" of the VM whose disks to copy
CLONE_DISKS_ANNOTATION = "vmquota.io/clone-disks"  # "target-disk=source-disk,...": which disk each copy is of
UNSCHEDULABLE_RETRY_SECONDS = 5.0  # how soon a refused automatic start is tried again
BACKOFF_BASE_SECONDS = 5.0  # the first back-off of a crash loop; it doubles with each failure
CRASH_RESET_SECONDS = 60.0  # a VM that ran this long before failing starts a fresh back-off
MAX_BACKOFF_SECONDS = 300.0
LIVE_COPY_TIMEOUT_SECONDS = 3600.0
# While a VM is Stopping: the gracePeriod its stop request gave (instead of the spec's), and once the guest has
# been asked to shut down, when it is forced off (seconds since the epoch, as status.runningSince). They live in
# the VM, not in the controller's memory, so a stop made through any API process, or before a restart, is kept.
STOP_GRACE = "stopGracePeriodSeconds"
STOP_DEADLINE = "stopDeadline"
# A pause, unpause or soft reboot asked for and not yet done: KubeVirt's VMI subresources, acted on by reconcile.
GUEST_REQUEST = "guestRequest"
GUEST_ADDRESS = "10.0.2.15"  # what QEMU's user-mode DHCP gives the guest: the first address of 10.0.2.0/24


def subject(name: str) -> str:
    """How refusals name the VM: `virtualmachines.kubevirt.io "web-1"`."""
    return f'{VM.resource} "{name}"'


def runtime_phase(vm: Obj) -> Phase:
    """The phase the controller acts on (printableStatus may say Terminating instead)."""
    return Phase((vm.get("status") or {}).get("phase", Phase.STOPPED.value))


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


class Controller:
    def __init__(self, *, store: Store, hypervisor: Hypervisor, disks: Disks,
                 overhead: OverheadModel = OverheadModel.NONE, resync_interval: float = 30.0,
                 workers: int = 4, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.hypervisor = hypervisor
        self.disks = disks
        self.overhead = overhead
        self.resync_interval = resync_interval
        self.clock = clock
        self.queue: WorkQueue[Key] = WorkQueue(clock=time.monotonic)
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._unreachable: set[Key] = set()  # VMs told that their work waits for the hypervisor
        # How soon refused and failed automatic starts are tried again (tests shorten these).
        self.unschedulable_retry_seconds = UNSCHEDULABLE_RETRY_SECONDS
        self.backoff_base_seconds = BACKOFF_BASE_SECONDS
        self.imports = imports.Runner(disks, report=self._import_progress,
                                      finished=lambda job: self.queue.add((job.namespace, job.name)))

    # -- life of the controller -----------------------------------------------------------------

    def run(self) -> None:
        """Connect to the hypervisor's events, recount once, then work until `shutdown`."""
        self.hypervisor.connect(on_event=lambda ns, name: self.queue.add((ns, name)),
                                on_reconnect=self.resync)
        for i in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"reconcile-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.resync()
        resync = threading.Thread(target=self._resync_loop, name="resync", daemon=True)
        resync.start()
        self._threads.append(resync)

    def shutdown(self) -> None:
        self._stopping.set()
        self.queue.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def _work(self) -> None:
        while (key := self.queue.get()) is not None:
            try:
                if key in self._unreachable:
                    # Say the outage is over before the work it held up, so no one sees that work done first.
                    self.hypervisor.ensure_reachable()
                    self._unreachable.discard(key)
                    self._update(key, self._hypervisor_back)
                self.reconcile(key)
            except errors.HypervisorUnavailable as e:
                telemetry.HYPERVISOR_UP.labels(self.hypervisor.uri).set(0)
                log.warning("%s/%s: %s; trying again later", *key, e)
                self._update(key, functools.partial(self._hypervisor_away, message=str(e)))
                self.queue.add(key, after=2.0)
            except Exception:
                log.exception("reconciling %s/%s", *key)
                self.queue.add(key, after=5.0)
            finally:
                self.queue.done(key)

    def _hypervisor_away(self, txn: Transaction, vm: Obj, message: str) -> None:
        """Say on a VM whose work waits for the hypervisor why it waits: a condition, and one event per outage."""
        key = _key(vm)
        conditions = vm.setdefault("status", {}).setdefault("conditions", [])
        if not any(c.get("reason") == "HypervisorUnavailable" for c in conditions):
            conditions.append({"type": "Failure", "status": "True", "lastTransitionTime": objects.now(),
                               "reason": "HypervisorUnavailable", "message": f"{message}; trying again"})
        if key not in self._unreachable:
            self._unreachable.add(key)
            self.record(txn, vm, "Warning", "HypervisorUnavailable", f"{message}; trying again")

    def _hypervisor_back(self, txn: Transaction, vm: Obj) -> None:
        status = vm.setdefault("status", {})
        status["conditions"] = [c for c in status.get("conditions") or [] if c.get("reason") != "HypervisorUnavailable"]
        self.record(txn, vm, "Normal", "HypervisorAvailable", "the hypervisor answers again")

    def _resync_loop(self) -> None:
        while not self._stopping.wait(self.resync_interval):
            try:
                self.resync()
            except errors.HypervisorUnavailable as e:
                telemetry.HYPERVISOR_UP.labels(self.hypervisor.uri).set(0)
                log.warning("recount postponed: %s", e)
            except Exception:
                log.exception("recount failed")

    # -- requests: run inside the caller's transaction ------------------------------------------

    def admit_new(self, txn: Transaction, vm: Obj) -> None:
        """A new VM: charge count and storage, and compute too when its strategy starts it."""
        spec = vmspec.read(vm)
        phase = Phase.STARTING if wants_running(spec.run_strategy, last_exit(vm)) else Phase.STOPPED
        self._transition(txn, vm, phase, spec=spec, enforce=True)
        first = {vmspec.SourceKind.BLANK: imports.Phase.PENDING, vmspec.SourceKind.HTTP: imports.Phase.IMPORT_SCHEDULED,
                 vmspec.SourceKind.PVC: imports.Phase.CLONE_SCHEDULED}
        for disk in spec.disks:
            set_volume_status(vm, disk.name, imports.Progress(first[disk.source.kind]))

    def admit_update(self, txn: Transaction, old: Obj, new: Obj) -> None:
        """A changed spec: charge only the difference, admitted when it rises (a resize)."""
        old_disks = {d.name: d.size for d in vmspec.read(old).disks}
        spec = vmspec.read(new)
        for disk in spec.disks:
            if disk.name in old_disks and disk.size < old_disks[disk.name]:
                raise errors.Invalid(f'{VM.qualified_kind} "{new["metadata"]["name"]}" is invalid: '
                                     f"spec.dataVolumeTemplates: Forbidden: disk {disk.name} cannot shrink")
        missing = sorted(set(old_disks) - {d.name for d in spec.disks})
        if missing:
            raise errors.Invalid(f'{VM.qualified_kind} "{new["metadata"]["name"]}" is invalid: '
                                 f"spec.dataVolumeTemplates: Forbidden: disks cannot be removed: {', '.join(missing)}")
        ns, name = _key(new)
        accounting.set_charge(txn, ns, name, usage.charge(spec, runtime_phase(old), self.overhead),
                              enforce=True, subject=subject(name))
        txn.after_commit(lambda: self.queue.add((ns, name)))  # a strategy change may start or stop it

    def request_start(self, txn: Transaction, vm: Obj) -> None:
        phase = runtime_phase(vm)
        if deleting(vm):
            raise errors.Conflict("VM is being deleted")
        if usage.holds_runtime(phase):
            raise errors.Conflict("VM is already running")
        spec = vmspec.read(vm)
        self._set_strategy(vm, spec, running=True)
        status = vm.setdefault("status", {})
        status.pop("lastExit", None)
        status.pop("startFailure", None)
        # `spec` is still right for the charge (only the strategy changed): no second read of the spec.
        self._transition(txn, vm, Phase.STARTING, spec=spec, enforce=True)
        self.record(txn, vm, "Normal", "StartRequested", "start admitted")

    def request_stop(self, txn: Transaction, vm: Obj, grace_seconds: int | None = None) -> None:
        phase = runtime_phase(vm)
        spec = vmspec.read(vm)
        waiting = phase in (Phase.UNSCHEDULABLE, Phase.CRASH_LOOP)  # not running, but would be: stop it
        if not usage.holds_runtime(phase) and not waiting and not wants_running(spec.run_strategy, last_exit(vm)):
            raise errors.Conflict("VM is not running")
        self._set_strategy(vm, spec, running=False)
        status = vm.setdefault("status", {})
        status.pop("stateChangeRequests", None)
        status.pop("startFailure", None)
        next_phase = Phase.STOPPING if usage.holds_runtime(phase) else Phase.STOPPED
        self._transition(txn, vm, next_phase, spec=spec, enforce=False)  # as in request_start
        if grace_seconds is not None and next_phase is Phase.STOPPING:
            bring_stop_nearer(status, grace_seconds, now=self.clock())
        self.record(txn, vm, "Normal", "StopRequested", "stop requested")

    def request_restart(self, txn: Transaction, vm: Obj) -> None:
        if not usage.holds_runtime(runtime_phase(vm)) or deleting(vm):
            raise errors.Conflict("VM is not running")
        # The charge is kept from stop to start: a VM never counts against itself.
        vm.setdefault("status", {})["stateChangeRequests"] = [{"action": "Stop"}, {"action": "Start"}]
        self._transition(txn, vm, Phase.STOPPING, enforce=False)
        self.record(txn, vm, "Normal", "RestartRequested", "restart requested")

    def request_guest(self, txn: Transaction, vm: Obj, action: str) -> None:
        """Pause, Unpause or SoftReboot (KubeVirt's VMI subresources); the reconcile does it. A paused VM
        still holds its runtime, so its charge does not change."""
        phase = runtime_phase(vm)
        if deleting(vm) or phase not in (Phase.RUNNING, Phase.PAUSED):
            raise errors.Conflict("VMI is not running")
        if action == "Pause" and phase is Phase.PAUSED:
            raise errors.Conflict("VMI is already paused")
        if action == "Unpause" and phase is not Phase.PAUSED:
            raise errors.Conflict("VMI is not paused")
        if action == "SoftReboot" and phase is Phase.PAUSED:
            raise errors.Conflict("VMI is paused")
        vm.setdefault("status", {})[GUEST_REQUEST] = action
        key = _key(vm)
        txn.after_commit(lambda: self.queue.add(key))
        self.record(txn, vm, "Normal", f"{action}Requested", f"{action.lower()} requested")

    def request_delete(self, txn: Transaction, vm: Obj) -> None:
        """Mark for deletion; the worker stops the domain, removes it and the disks, then the object."""
        if not deleting(vm):
            vm["metadata"]["deletionTimestamp"] = objects.now()
            phase = runtime_phase(vm)
            vm.setdefault("status", {}).pop("stateChangeRequests", None)
            self._transition(txn, vm, Phase.STOPPING if usage.holds_runtime(phase) else phase, enforce=False)
            self.record(txn, vm, "Normal", "Deleting", "deletion requested")

    def _set_strategy(self, vm: Obj, spec: VMSpec, *, running: bool) -> None:
        """start/stop change the strategy as KubeVirt's subresources do; Manual stays Manual."""
        if spec.uses_running_field:
            vm["spec"]["running"] = running
        elif running and spec.run_strategy is RunStrategy.HALTED:
            vm["spec"]["runStrategy"] = RunStrategy.ALWAYS.value
        elif not running and spec.run_strategy in (RunStrategy.ALWAYS, RunStrategy.RERUN_ON_FAILURE, RunStrategy.ONCE):
            vm["spec"]["runStrategy"] = RunStrategy.HALTED.value

    # -- the one place a VM changes phase --------------------------------------------------------

    def _transition(self, txn: Transaction, vm: Obj, phase: Phase, *, spec: VMSpec | None = None,
                    enforce: bool, reason: str = "", message: str = "") -> None:
        """Set the phase, charge what that phase costs (admitted if `enforce` and it rises), queue the VM.

        The caller writes the VM, in the same transaction.
        """
        ns, name = _key(vm)
        spec = spec or vmspec.read(vm)
        accounting.set_charge(txn, ns, name, usage.charge(spec, phase, self.overhead),
                              enforce=enforce, subject=subject(name))
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

    def record(self, txn: Transaction, vm: Obj, type_: str, reason: str, message: str) -> None:
        """A Kubernetes Event about `vm`, in the same transaction as the change it reports."""
        ns, name = _key(vm)
        stamp = objects.now()
        txn.create(objects.EVENT, {
            "metadata": {"name": f"{name}.{objects.new_uid()[:13].replace('-', '')}", "namespace": ns},
            "involvedObject": {"apiVersion": VM.api_version, "kind": VM.kind, "namespace": ns, "name": name,
                               "uid": vm["metadata"].get("uid", "")},
            "reason": reason, "message": message, "type": type_, "count": 1,
            "firstTimestamp": stamp, "lastTimestamp": stamp,
            "source": {"component": "vmquota"}, "reportingComponent": "vmquota",
        })

    # -- reconcile: worker threads ---------------------------------------------------------------

    def reconcile(self, key: Key) -> None:
        ns, name = key
        vm = self.store.reader().get(VM, ns, name)
        if vm is None:
            return
        uid = vm["metadata"]["uid"]
        observed = self.hypervisor.observe(ns, name)
        up = observed.up and observed.uid == uid
        phase = runtime_phase(vm)
        spec = vmspec.read(vm)

        if phase is Phase.STOPPING or (deleting(vm) and up):
            self._reconcile_stopping(key, vm, spec, up)
        elif deleting(vm):
            self._finalize(key, vm)
        elif phase is Phase.STARTING:
            self._reconcile_starting(key, vm, spec, observed, up)
        elif phase in (Phase.RUNNING, Phase.PAUSED):
            self._reconcile_running(key, vm, spec, observed, up)
        else:
            self._reconcile_stopped(key, vm, spec, observed, up)

    def _reconcile_starting(self, key: Key, vm: Obj, spec: VMSpec, observed: Observed, up: bool) -> None:
        if not up:
            try:
                if not self._ensure_disks(vm, spec):
                    return  # a start waits for its disks: the import queues the VM when it ends
                self._write_seed(vm, spec)
                self.hypervisor.start(*key, vm["metadata"]["uid"], self._domain_xml(vm, spec))
            except errors.HypervisorUnavailable:
                raise
            except errors.HypervisorError as e:
                message = str(e)
                self._update(key, lambda txn, vm: self._start_failed(txn, vm, message))
                return
            observed = self.hypervisor.observe(*key)
            if not observed.up and observed.cause is ExitCause.NONE:
                self.queue.add(key, after=0.5)  # the event will come; look again soon in case it does not
                return
        if observed.up:
            paused = observed.state is DomainState.PAUSED
            self._update(key, lambda txn, vm: self._started(txn, vm, Phase.PAUSED if paused else Phase.RUNNING)
                         if runtime_phase(vm) is Phase.STARTING else None)
        else:  # it ran, and went off before vmquota could look: an exit like any other, not a start to try again
            self._update(key, lambda txn, vm: self._started_then_off(txn, vm, observed.cause))

    def _started(self, txn: Transaction, vm: Obj, phase: Phase) -> None:
        self._transition(txn, vm, phase, enforce=False)
        self.record(txn, vm, "Normal", "Started", "the domain is running")

    def _started_then_off(self, txn: Transaction, vm: Obj, cause: ExitCause) -> None:
        if runtime_phase(vm) is Phase.STARTING:
            self._started(txn, vm, Phase.RUNNING)
            self._went_off(txn, vm, cause)

    def _start_failed(self, txn: Transaction, vm: Obj, message: str) -> None:
        if runtime_phase(vm) is not Phase.STARTING:
            return
        self.record(txn, vm, "Warning", "FailedCreate", message)
        self._after_failure(txn, vm, reason="FailedCreate", message=message, retry_at_once=False)

    def _after_failure(self, txn: Transaction, vm: Obj, *, reason: str, message: str, retry_at_once: bool) -> None:
        """Stopped by a failure: restart if the strategy says so, backing off when it keeps failing."""
        status = vm.setdefault("status", {})
        if not wants_running(vmspec.run_strategy(vm), last_exit(vm)):
            self._transition(txn, vm, Phase.STOPPED, enforce=False, reason=reason, message=message)
            return
        ran_for = self.clock() - float(status.get("runningSince", 0) or 0)
        failures = status.get("startFailure", {}).get("consecutiveFailCount", 0)
        failures = 1 if retry_at_once and ran_for >= CRASH_RESET_SECONDS else failures + 1
        if retry_at_once and failures == 1:
            status["startFailure"] = {"consecutiveFailCount": failures, "retryAfterTimestamp": 0}
            self._transition(txn, vm, Phase.STOPPED, enforce=False)
            self._try_start(txn, vm)
            return
        backoff = min(MAX_BACKOFF_SECONDS, self.backoff_base_seconds * 2 ** (failures - (2 if retry_at_once else 1)))
        status["startFailure"] = {"consecutiveFailCount": failures, "retryAfterTimestamp": self.clock() + backoff}
        self._transition(txn, vm, Phase.CRASH_LOOP, enforce=False, reason=reason,
                         message=f"{message} (failed {failures} times; next try in {backoff:.0f}s)")
        key = _key(vm)
        txn.after_commit(lambda: self.queue.add(key, after=backoff))

    def _reconcile_stopping(self, key: Key, vm: Obj, spec: VMSpec, up: bool) -> None:
        uid = vm["metadata"]["uid"]
        if up:
            status = vm.get("status") or {}
            now = self.clock()
            deadline = status.get(STOP_DEADLINE)
            if deadline is None:  # the guest has not been asked yet
                grace = status.get(STOP_GRACE, spec.grace_seconds)
                if grace > 0:
                    self.hypervisor.shutdown(*key, uid)
                    self._update(key, lambda txn, vm: self._asked_to_shut_down(txn, vm, now, grace), expect_uid=uid)
                    self.queue.add(key, after=grace)  # or sooner: a later stop with a shorter grace queues it
                    return
                deadline = now
            if now < deadline:
                self.queue.add(key, after=deadline - now)
                return
            # destroy returns once the domain is off: confirmed here, not when (or if) its event comes
            self.hypervisor.destroy(*key, uid)

        def confirm_off(txn: Transaction, vm: Obj) -> None:
            if runtime_phase(vm) is not Phase.STOPPING:
                return
            status = vm.setdefault("status", {})
            restart = {"action": "Start"} in status.pop("stateChangeRequests", []) and not deleting(vm)
            if restart:
                self._transition(txn, vm, Phase.STARTING, enforce=True)  # same charge unless the spec grew
            else:
                self._transition(txn, vm, Phase.STOPPED, enforce=False)
                self.record(txn, vm, "Normal", "Stopped", "the domain is off")

        self._update(key, confirm_off)

    def _asked_to_shut_down(self, txn: Transaction, vm: Obj, asked_at: float, grace: int) -> None:
        """Write down when the guest is forced off: the deadline is the VM's, so every process and restart sees it."""
        status = vm.setdefault("status", {})
        if runtime_phase(vm) is not Phase.STOPPING or STOP_DEADLINE in status:
            return
        # A stop with a shorter gracePeriod may have come since this reconcile read the VM.
        grace = min(grace, status.pop(STOP_GRACE, grace))
        status[STOP_DEADLINE] = asked_at + grace
        self.record(txn, vm, "Normal", "ShuttingDown",
                    f"the guest was asked to shut down; it is forced off if it is still running in {grace} s")

    def _reconcile_running(self, key: Key, vm: Obj, spec: VMSpec, observed: Observed, up: bool) -> None:
        request = (vm.get("status") or {}).get(GUEST_REQUEST)
        if up and request:
            self._guest_request(key, vm, request)
            observed = self.hypervisor.observe(*key)
        if up:
            phase = Phase.PAUSED if observed.state is DomainState.PAUSED else Phase.RUNNING
            if phase is not runtime_phase(vm):
                self._update(key, lambda txn, vm: self._transition(txn, vm, phase, enforce=False))
            elif spec.run_strategy is RunStrategy.HALTED:  # strategy edited to Halted: stop it
                self._update(key, lambda txn, vm: self._transition(txn, vm, Phase.STOPPING, enforce=False))
            return
        cause = observed.cause if observed.uid == vm["metadata"]["uid"] else ExitCause.DESTROYED
        self._update(key, lambda txn, vm: self._went_off(txn, vm, cause))

    def _guest_request(self, key: Key, vm: Obj, request: str) -> None:
        uid = vm["metadata"]["uid"]
        act = {"Pause": self.hypervisor.suspend, "Unpause": self.hypervisor.resume,
               "SoftReboot": self.hypervisor.reboot}[request]
        try:
            act(*key, uid)
            reason = {"Pause": "Paused", "Unpause": "Unpaused", "SoftReboot": "SoftRebooted"}[request]
            message, type_ = f"{request.lower()} done", "Normal"
        except errors.HypervisorUnavailable:
            raise
        except errors.HypervisorError as e:
            reason, message, type_ = f"{request}Failed", str(e), "Warning"

        def done(txn: Transaction, vm: Obj) -> None:
            if vm.setdefault("status", {}).pop(GUEST_REQUEST, None) == request:
                self.record(txn, vm, type_, reason, message)

        self._update(key, done, expect_uid=uid)

    # -- streams to a running guest: for the console and portforward subresources ------------------

    def _running_vm(self, namespace: str, name: str) -> Obj:
        vm = self.store.reader().get(VM, namespace, name)
        if vm is None:
            raise errors.NotFound(f'virtualmachineinstances.kubevirt.io "{name}" not found')
        if runtime_phase(vm) not in (Phase.RUNNING, Phase.PAUSED):
            raise errors.Conflict(f'virtualmachineinstances.kubevirt.io "{name}": VMI is not running')
        return vm

    def open_console(self, namespace: str, name: str) -> GuestStream:
        """The serial console of a running VM, as a stream (`recv`, `sendall`, `close`)."""
        vm = self._running_vm(namespace, name)
        return self.hypervisor.open_console(namespace, name, vm["metadata"]["uid"])

    def open_port(self, namespace: str, name: str, port: int) -> socket.socket:
        """A TCP connection to `port` of a running VM's guest, through its masquerade interface."""
        vm = self._running_vm(namespace, name)
        spec = vmspec.read(vm)
        if not spec.interfaces:
            raise errors.BadRequest(f'virtualmachineinstances.kubevirt.io "{name}" has no network interface')
        allowed = spec.interfaces[0].ports
        if allowed and port not in allowed:
            raise errors.BadRequest(f"port {port} is not among the ports of interface {spec.interfaces[0].name}: "
                                    + ", ".join(map(str, allowed)))
        return self.hypervisor.open_port(namespace, name, vm["metadata"]["uid"], port)

    def _went_off(self, txn: Transaction, vm: Obj, cause: ExitCause) -> None:
        """A running VM whose domain is off with no stop asked: record why, then restart it if its strategy says."""
        if runtime_phase(vm) not in (Phase.RUNNING, Phase.PAUSED):
            return
        exit_reason = cause if cause is not ExitCause.NONE else ExitCause.FAILED
        vm.setdefault("status", {})["lastExit"] = exit_reason.value
        failure = exit_reason is not ExitCause.GUEST_SHUTDOWN
        message = f"the domain went off without a stop request ({exit_reason.value})"
        self.record(txn, vm, "Warning" if failure else "Normal", "Crashed" if failure else "Stopped", message)
        if failure:
            self._after_failure(txn, vm, reason=exit_reason.value, message=message, retry_at_once=True)
        else:
            self._transition(txn, vm, Phase.STOPPED, enforce=False)
            if wants_running(vmspec.run_strategy(vm), last_exit(vm)):
                self._try_start(txn, vm)

    def _reconcile_stopped(self, key: Key, vm: Obj, spec: VMSpec, observed: Observed, up: bool) -> None:
        try:
            if not volumes_ready(vm):  # made once; a resized disk is grown when the VM next starts
                self._ensure_disks(vm, spec)
        except errors.HypervisorUnavailable:
            raise
        except errors.HypervisorError as e:
            message = str(e)
            self._update(key, lambda txn, vm: self._disks_failed(txn, vm, message))
            self.queue.add(key, after=self.unschedulable_retry_seconds * 6)
            return
        if up:  # started behind vmquota's back: it runs, so it charges, whatever the quota says
            def found_running(txn: Transaction, vm: Obj) -> None:
                self._transition(txn, vm, Phase.RUNNING, enforce=False)
                self.record(txn, vm, "Warning", "StartedOutsideVmquota",
                            "the domain was found running; charged as it is")
            self._update(key, found_running)
            return
        if not wants_running(spec.run_strategy, last_exit(vm)):
            return
        retry_at = float((vm.get("status") or {}).get("startFailure", {}).get("retryAfterTimestamp", 0) or 0)
        if retry_at > self.clock():
            self.queue.add(key, after=retry_at - self.clock())
            return
        self._update(key, self._try_start)

    def _disks_failed(self, txn: Transaction, vm: Obj, message: str) -> None:
        """Say why the disks cannot be made on the VM itself (DataVolumesReady False), and in an event."""
        set_volumes_condition(vm, ready=False, reason="DiskError", message=message)
        self.record(txn, vm, "Warning", "DiskError", message)

    def _try_start(self, txn: Transaction, vm: Obj) -> None:
        """An automatic start (run strategy): admitted like any other; refused, it waits and retries."""
        try:
            self._transition(txn, vm, Phase.STARTING, enforce=True)  # a refusal raises before any write
        except errors.QuotaExceeded as e:
            conditions = vm.setdefault("status", {}).get("conditions") or []
            # Refused again for the same reason: nothing to write, so retries do not churn the VM and its events.
            same = runtime_phase(vm) is Phase.UNSCHEDULABLE and any(c.get("message") == e.message for c in conditions)
            if not same:
                self._transition(txn, vm, Phase.UNSCHEDULABLE, enforce=False, reason="QuotaExceeded",
                                 message=e.message)
                self.record(txn, vm, "Warning", "FailedCreate", e.message)
                accounting.record_refusal(txn, e)  # once per reason, as the event: not on every retry
            key = _key(vm)
            txn.after_commit(lambda: self.queue.add(key, after=self.unschedulable_retry_seconds))

    def _finalize(self, key: Key, vm: Obj) -> None:
        uid = vm["metadata"]["uid"]
        if not self.imports.cancel(uid):  # an import still in qemu-img: remove its files once it has ended
            self.queue.add(key, after=5.0)
            return
        self.hypervisor.undefine(*key, uid)
        if self._clones_to_copy(key[0], key[1], uid):  # they copy their disks from ours: keep (or make) ours
            self._ensure_disks(vm, vmspec.read(vm))
            self.queue.add(key, after=1.0)
            return
        self.disks.remove_vm(key[0], uid)

        def remove(txn: Transaction, vm: Obj) -> None:
            accounting.set_charge(txn, *key, None, enforce=False, subject=subject(key[1]))
            txn.delete(VM, *key)
            self.record(txn, vm, "Normal", "Deleted", "the VM, its domain and its disks are gone")

        self._update(key, remove, expect_uid=uid)

    def _clones_to_copy(self, namespace: str, name: str, uid: str) -> list[str]:
        """The clones of this VM whose disks are not copied yet, found through the VirtualMachineClones of its
        namespace (far fewer than its VMs). A clone being deleted still counts: it may be the source of clones of
        its own, and goes soon otherwise."""
        reader = self.store.reader()
        targets = {c["spec"]["target"]["name"] for c in reader.list(objects.VIRTUAL_MACHINE_CLONE, namespace)
                   if c["spec"]["source"]["name"] == name}
        clones = [reader.get(VM, namespace, target) for target in sorted(targets)]
        return [vm["metadata"]["name"] for vm in clones if vm is not None and not volumes_ready(vm)
                and objects.meta(vm).get("annotations", {}).get(CLONE_SOURCE_ANNOTATION) == f"{namespace}/{name}/{uid}"]

    def _update(self, key: Key, change: Callable[[Transaction, Obj], None], *, expect_uid: str | None = None) -> None:
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

    # -- disks and domains ---------------------------------------------------------------------

    def _ensure_disks(self, vm: Obj, spec: VMSpec) -> bool:
        """Create missing disks (copying them for a clone, from their source otherwise), grow resized ones,
        then say DataVolumesReady. False while an import still runs (it queues the VM when it ends); a failed
        import raises its error."""
        ns, name, uid = vm["metadata"]["namespace"], vm["metadata"]["name"], vm["metadata"]["uid"]
        source = objects.meta(vm).get("annotations", {}).get(CLONE_SOURCE_ANNOTATION)
        missing = [d for d in spec.disks if not self.disks.path(ns, uid, d.name).exists()]
        if missing and source:
            self._copy_from_source(vm, source, missing)
        importing = False
        for disk in spec.disks:
            path = self.disks.path(ns, uid, disk.name)
            if not path.exists() and disk.source.kind is vmspec.SourceKind.HTTP:
                failed = self.imports.ensure(imports.Job(ns, name, uid, disk, path))
                if failed is not None:
                    raise errors.HypervisorError(f"disk {disk.name}: {failed.message}")
                importing = True
                continue
            if not path.exists() and disk.source.kind is vmspec.SourceKind.PVC:
                self._clone_pvc(vm, disk, path)
            self.disks.ensure(path, disk.size)
        if importing:
            return False
        if not volumes_ready(vm):
            self._update(_key(vm), _volumes_ready, expect_uid=uid)
            for clone in self._clones_to_copy(ns, vm["metadata"]["name"], uid):  # they may have found no disk to copy
                self.queue.add((ns, clone))
        return True

    def _clone_pvc(self, vm: Obj, disk: vmspec.Disk, target: Path) -> None:
        """A disk whose source is another VM's disk of the namespace (CDI's pvc source): a copy of it, live
        (point in time) if that VM runs."""
        ns, uid = vm["metadata"]["namespace"], vm["metadata"]["uid"]
        owner = data_volume_owner(self.store.reader().list(VM, ns), disk.source.pvc, exclude_uid=uid)
        if owner is None:
            raise errors.HypervisorError(f"disk {disk.name}: the source data volume {disk.source.pvc} does not exist")
        src_name, src_uid = owner["metadata"]["name"], owner["metadata"]["uid"]
        source_path = self.disks.path(ns, src_uid, disk.source.pvc)
        if not source_path.exists():
            raise errors.HypervisorError(f"disk {disk.name}: the source data volume {disk.source.pvc} is not "
                                         f"made yet; trying again")
        if self.hypervisor.observe(ns, src_name).up:
            self._copy_live(ns, src_name, src_uid, vmspec.read(owner), {disk.source.pvc: target})
        if not target.exists():
            self.disks.copy(source_path, target)

    def _import_progress(self, job: imports.Job, progress: imports.Progress) -> None:
        """An import's phase and percentage in the VM's status, as a DataVolume's status shows them."""
        def write(txn: Transaction, vm: Obj) -> None:
            set_volume_status(vm, job.disk.name, progress)
            if progress.phase is imports.Phase.FAILED:
                self._disks_failed(txn, vm, f"disk {job.disk.name}: {progress.message}")
            elif not volumes_ready(vm):
                set_volumes_condition(vm, ready=False, reason=progress.phase.value,
                                      message=f"disk {job.disk.name}: {progress.phase.value} {progress.progress}")

        self._update((job.namespace, job.name), write, expect_uid=job.uid)

    def _copy_from_source(self, vm: Obj, source: str, missing: list[vmspec.Disk]) -> None:
        """Copy a clone's disks from its source VM: live (point in time) if the source runs."""
        src_ns, src_name, src_uid = source.split("/")
        from_disk = clone_disks(vm)
        ns, uid = vm["metadata"]["namespace"], vm["metadata"]["uid"]
        copies = {from_disk[d.name]: self.disks.path(ns, uid, d.name) for d in missing if d.name in from_disk}
        if not copies:
            return
        source_vm = self.store.reader().get(VM, src_ns, src_name)
        if source_vm is None or source_vm["metadata"]["uid"] != src_uid:
            raise errors.HypervisorError(f"the clone source {src_ns}/{src_name} is gone")
        if self.hypervisor.observe(src_ns, src_name).up:
            self._copy_live(src_ns, src_name, src_uid, vmspec.read(source_vm), copies)
        for src_disk, target in copies.items():
            if not target.exists():  # a stopped source, or a disk the running guest does not attach
                self.disks.copy(self.disks.path(src_ns, src_uid, src_disk), target)

    def _copy_live(self, ns: str, name: str, uid: str, spec: VMSpec, copies: dict[str, Path]) -> None:
        """libvirt's backup job: QEMU copies the attached disks as they are at one instant (crash-consistent)."""
        devices = self._attached_targets(spec)
        partial = {devices[disk]: target.with_suffix(".partial") for disk, target in copies.items() if disk in devices}
        for path in partial.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
        if not partial or not self.hypervisor.live_disk_copy(ns, name, uid, partial):
            return  # the simulated host has no backup jobs; its files are not in use, a plain copy is safe
        deadline = time.monotonic() + LIVE_COPY_TIMEOUT_SECONDS
        while self.hypervisor.job_active(ns, name):
            if time.monotonic() > deadline:
                raise errors.HypervisorError(f"copying the disks of {ns}/{name} timed out")
            time.sleep(0.1)
        for path in partial.values():
            path.rename(path.with_suffix(".qcow2"))

    @staticmethod
    def _attached_targets(spec: VMSpec) -> dict[str, str]:
        return dict(zip(spec.attached, domainxml.disk_targets(len(spec.attached)), strict=True))

    def _seed_path(self, vm: Obj) -> Path:
        # A fixed name: the volume's name, like everything else the user wrote, stays out of paths.
        return self.disks.vm_dir(vm["metadata"]["namespace"], vm["metadata"]["uid"]) / "cloudinit.iso"

    def _write_seed(self, vm: Obj, spec: VMSpec) -> None:
        """The cloud-init seed, written afresh at every start: user data edited while stopped takes effect."""
        if spec.cloud_init is not None:
            seeds.write(spec.cloud_init, self._seed_path(vm), uid=vm["metadata"]["uid"],
                        hostname=vm["metadata"]["name"])

    def _domain_xml(self, vm: Obj, spec: VMSpec) -> str:
        ns, name, uid = vm["metadata"]["namespace"], vm["metadata"]["name"], vm["metadata"]["uid"]
        disks = [domainxml.DomainDisk(self.disks.path(ns, uid, disk), target)
                 for disk, target in self._attached_targets(spec).items()]
        seed = None if spec.cloud_init is None else domainxml.Seed(self._seed_path(vm), spec.cloud_init.cdrom)
        nics = tuple(domainxml.Nic(vmspec.mac_address(i, uid), i.model) for i in spec.interfaces)
        vm_dir = self.disks.vm_dir(ns, uid)
        vm_dir.mkdir(parents=True, exist_ok=True)  # a VM without disks has no folder yet, and QEMU opens its log there
        return domainxml.build(namespace=ns, name=name, uid=uid, instance=self.store.instance_id, spec=spec,
                               disks=disks, domain_type=self.hypervisor.domain_type, seed=seed, nics=nics,
                               console_log=vm_dir / "console.log")

    # -- the periodic recount --------------------------------------------------------------------

    def resync(self) -> list[str]:
        """Compare every VM with the hypervisor's truth, queue those that differ, collect garbage, recount.

        Returns the quotas whose used had drifted from the ledger (normally none).
        """
        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="resync") as pool:
            # The ledger is summed while libvirt lists the domains and the disk folders are listed: those
            # two wait mostly outside Python's lock, so the three take little more than the longest.
            domains, folders = pool.submit(self.hypervisor.observe_all), pool.submit(self.disks.vm_dirs)
            started = time.perf_counter()
            with self.store.transaction() as txn:
                drifted = accounting.recount(txn)
                history.roll_up(txn, now=self.clock())  # the usage history stays bounded: one commit for both
            # Look at the hypervisor and the disks before the VMs: anything made after this look belongs to
            # a VM the list below already holds, so garbage collection never takes a new VM's domain or disks.
            observed, disk_dirs = domains.result(), folders.result()
        known: dict[Key, str] = {}  # every VM's uid
        for row in self.store.reader().vm_states():  # only the fields the comparison needs, streamed
            vm = StoredVM.from_row(row)
            key = (vm.namespace, vm.name)
            known[key] = vm.uid
            if needs_reconcile(vm, observed.get(key, ABSENT)):
                self.queue.add(key)
        self._collect_garbage(known, observed, disk_dirs)
        telemetry.RECOUNT_SECONDS.observe(time.perf_counter() - started)
        telemetry.RECOUNT_CORRECTIONS.inc(len(drifted))
        telemetry.HYPERVISOR_UP.labels(self.hypervisor.uri).set(1)
        for quota in drifted:
            log.warning("recount corrected the used of %s", quota)
        return drifted

    def _collect_garbage(self, known: dict[Key, str], observed: dict[Key, Observed],
                         disk_dirs: list[tuple[str, str]]) -> None:
        """Remove the domains and disk folders vmquota made for VMs that no longer exist."""
        for key, seen in observed.items():
            uid = known.get(key)
            # A domain without a VM, or a running one made for an earlier VM of the same name. (An off domain
            # of an earlier VM is replaced when the new VM starts, or removed with it.)
            if uid is not None and (seen.uid is None or seen.uid == uid):
                continue
            owner = self.hypervisor.owner(*key)
            if owner is None or owner == uid:
                continue
            log.warning("removing domain %s/%s: vmquota made it for a VM that no longer exists", *key)
            self.hypervisor.remove_orphan(*key, owner)
        uids = set(known.values())
        for ns, uid in disk_dirs:
            if uid not in uids:
                log.warning("removing the disks of a deleted VM: %s/%s", ns, uid)
                self.disks.remove_vm(ns, uid)


def clone_disks(vm: Obj) -> dict[str, str]:
    """For a clone: target disk name -> the source disk it is copied from."""
    text = (objects.meta(vm).get("annotations") or {}).get(CLONE_DISKS_ANNOTATION, "")
    return dict(pair.split("=", 1) for pair in text.split(",") if "=" in pair)


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


def bring_stop_nearer(status: dict[str, Any], grace: int, *, now: float) -> None:
    """A later stop's gracePeriod (`virtctl stop --force --grace-period=0`) can end a stop sooner, never later."""
    if STOP_DEADLINE in status:  # the guest has been asked to shut down already
        status[STOP_DEADLINE] = min(status[STOP_DEADLINE], now + grace)
    else:
        status[STOP_GRACE] = min(status.get(STOP_GRACE, grace), grace)


def volumes_ready(vm: Obj) -> bool:
    conditions = (vm.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "DataVolumesReady" and c.get("status") == "True" for c in conditions)


def set_volumes_condition(vm: Obj, *, ready: bool, reason: str, message: str) -> None:
    """KubeVirt's DataVolumesReady condition: whether every disk of the VM exists, and why not."""
    conditions = vm.setdefault("status", {}).setdefault("conditions", [])
    conditions[:] = [c for c in conditions if c.get("type") != "DataVolumesReady"]
    conditions.append({"type": "DataVolumesReady", "status": "True" if ready else "False",
                       "lastTransitionTime": objects.now(), "reason": reason, "message": message})


def _volumes_ready(txn: Transaction, vm: Obj) -> None:
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


def data_volume_owner(vms: list[Obj], data_volume: str, *, exclude_uid: str | None = None) -> Obj | None:
    """The VM of a namespace whose dataVolumeTemplates make the data volume (disk) of this name."""
    for vm in vms:
        if vm["metadata"].get("uid") == exclude_uid or deleting(vm):
            continue
        templates = (vm.get("spec") or {}).get("dataVolumeTemplates") or []
        if any((t.get("metadata") or {}).get("name") == data_volume for t in templates if isinstance(t, dict)):
            return vm
    return None


def _key(vm: Obj) -> Key:
    return vm["metadata"]["namespace"], vm["metadata"]["name"]
