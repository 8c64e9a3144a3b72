"""A VM's lifecycle: admission of creates, starts, stops, restarts and deletes, and the reconcile of each phase.

Two halves, as in all of the controller:

* Requests (`admit_new`, `admit_update`, `request_start`, `request_stop`, `request_restart`, `request_delete`) run
  inside the caller's store transaction. They decide the new phase and change the charge through
  `Context.transition` (admitted when it rises). A refused request raises and changes nothing.
* `reconcile_*` run on the controller's worker threads, one VM at a time, level-triggered: each compares the
  phase with what the hypervisor reports and acts (make the disks, start or stop the domain, release the charge
  once the domain is confirmed off, restart by the run strategy, back off a crash loop).
"""

from __future__ import annotations

import logging

from vmquota import accounting, errors, objects, usage, vmspec
from vmquota.controller import placement, volumes
from vmquota.controller.context import Context
from vmquota.controller.state import (
    STOP_DEADLINE,
    STOP_GRACE,
    Key,
    bring_stop_nearer,
    deleting,
    key_of,
    last_exit,
    migrating,
    node_of,
    runtime_phase,
    volumes_ready,
    wants_running,
)
from vmquota.controller.volumes import Volumes
from vmquota.hypervisor import DomainState, ExitCause, Observed
from vmquota.objects import VIRTUAL_MACHINE as VM
from vmquota.objects import Obj
from vmquota.store import Transaction
from vmquota.vmspec import RunStrategy, VMSpec
from vmquota.vmstatus import Phase

log = logging.getLogger(__name__)

UNSCHEDULABLE_RETRY_SECONDS = 5.0  # how soon a refused automatic start is tried again
BACKOFF_BASE_SECONDS = 5.0  # the first back-off of a crash loop; it doubles with each failure
CRASH_RESET_SECONDS = 60.0  # a VM that ran this long before failing starts a fresh back-off
MAX_BACKOFF_SECONDS = 300.0


class Lifecycle:
    def __init__(self, ctx: Context, volumes: Volumes) -> None:
        self.ctx = ctx
        self.volumes = volumes
        # How soon refused and failed automatic starts are tried again (tests shorten these).
        self.unschedulable_retry_seconds = UNSCHEDULABLE_RETRY_SECONDS
        self.backoff_base_seconds = BACKOFF_BASE_SECONDS

    def admit_new(self, txn: Transaction, vm: Obj) -> None:
        """A new VM: charge count and storage, and compute too when its strategy starts it."""
        spec = vmspec.read(vm)
        phase = Phase.STARTING if wants_running(spec.run_strategy, last_exit(vm)) else Phase.STOPPED
        try:
            self.ctx.transition(txn, vm, phase, spec=spec, enforce=True)
        except placement.Unschedulable as e:  # its count and disks are admitted; it waits for a node's room
            self.ctx.transition(txn, vm, Phase.STOPPED, spec=spec, enforce=True)
            self._unschedulable(txn, vm, str(e))
        volumes.set_initial_status(vm, spec)

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
        ns, name = key_of(new)
        self.ctx.charge(txn, ns, name, spec, runtime_phase(old), enforce=True)
        txn.after_commit(lambda: self.ctx.queue.add((ns, name)))  # a strategy change may start or stop it

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
        try:
            self.ctx.transition(txn, vm, Phase.STARTING, spec=spec, enforce=True)
        except placement.Unschedulable as e:  # admitted by its quotas, but no node has room: it waits for one
            self._unschedulable(txn, vm, str(e))
            return
        self.ctx.record(txn, vm, "Normal", "StartRequested", "start admitted")

    def _unschedulable(self, txn: Transaction, vm: Obj, message: str) -> None:
        """No node fits: ErrorUnschedulable with the scheduler's words, charging nothing; placement is tried
        again every unschedulable_retry_seconds (once more words change, one event per reason)."""
        conditions = vm.setdefault("status", {}).get("conditions") or []
        if not (runtime_phase(vm) is Phase.UNSCHEDULABLE and any(c.get("message") == message for c in conditions)):
            self.ctx.transition(txn, vm, Phase.UNSCHEDULABLE, enforce=False, reason="Unschedulable", message=message)
            self.ctx.record(txn, vm, "Warning", "FailedScheduling", message)
        key = key_of(vm)
        txn.after_commit(lambda: self.ctx.queue.add(key, after=self.unschedulable_retry_seconds))

    def request_stop(self, txn: Transaction, vm: Obj, grace_seconds: int | None = None) -> None:
        refuse_while_migrating(vm)
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
        self.ctx.transition(txn, vm, next_phase, spec=spec, enforce=False)  # as in request_start
        if grace_seconds is not None and next_phase is Phase.STOPPING:
            bring_stop_nearer(status, grace_seconds, now=self.ctx.clock())
        self.ctx.record(txn, vm, "Normal", "StopRequested", "stop requested")

    def request_restart(self, txn: Transaction, vm: Obj) -> None:
        refuse_while_migrating(vm)
        if not usage.holds_runtime(runtime_phase(vm)) or deleting(vm):
            raise errors.Conflict("VM is not running")
        # The charge is kept from stop to start: a VM never counts against itself.
        vm.setdefault("status", {})["stateChangeRequests"] = [{"action": "Stop"}, {"action": "Start"}]
        self.ctx.transition(txn, vm, Phase.STOPPING, enforce=False)
        self.ctx.record(txn, vm, "Normal", "RestartRequested", "restart requested")

    def request_delete(self, txn: Transaction, vm: Obj) -> None:
        """Mark for deletion; the worker stops the domain, removes it and the disks, then the object."""
        if not deleting(vm):
            vm["metadata"]["deletionTimestamp"] = objects.now()
            phase = runtime_phase(vm)
            vm.setdefault("status", {}).pop("stateChangeRequests", None)
            self.ctx.transition(txn, vm, Phase.STOPPING if usage.holds_runtime(phase) else phase, enforce=False)
            self.ctx.record(txn, vm, "Normal", "Deleting", "deletion requested")

    def _set_strategy(self, vm: Obj, spec: VMSpec, *, running: bool) -> None:
        """start/stop change the strategy as KubeVirt's subresources do; Manual stays Manual."""
        if spec.uses_running_field:
            vm["spec"]["running"] = running
        elif running and spec.run_strategy is RunStrategy.HALTED:
            vm["spec"]["runStrategy"] = RunStrategy.ALWAYS.value
        elif not running and spec.run_strategy in (RunStrategy.ALWAYS, RunStrategy.RERUN_ON_FAILURE, RunStrategy.ONCE):
            vm["spec"]["runStrategy"] = RunStrategy.HALTED.value

    def reconcile_starting(self, key: Key, vm: Obj, spec: VMSpec, observed: Observed, up: bool) -> None:
        if not up:
            try:
                if not self.volumes.ensure_disks(vm, spec):
                    return  # a start waits for its disks: the import queues the VM when it ends
                self.volumes.write_seed(vm, spec)
                self.ctx.host_of(vm).start(*key, vm["metadata"]["uid"], self.volumes.domain_xml(vm, spec))
            except errors.HypervisorUnavailable:
                raise
            except errors.HypervisorError as e:
                message = str(e)
                self.ctx.update(key, lambda txn, vm: self._start_failed(txn, vm, message))
                return
            observed = self.ctx.host_of(vm).observe(*key)
            if not observed.up and observed.cause is ExitCause.NONE:
                self.ctx.queue.add(key, after=0.5)  # the event will come; look again soon in case it does not
                return
        if observed.up:
            paused = observed.state is DomainState.PAUSED
            self.ctx.update(key, lambda txn, vm: self._started(txn, vm, Phase.PAUSED if paused else Phase.RUNNING)
                         if runtime_phase(vm) is Phase.STARTING else None)
        else:  # it ran, and went off before vmquota could look: an exit like any other, not a start to try again
            self.ctx.update(key, lambda txn, vm: self._started_then_off(txn, vm, observed.cause))

    def _started(self, txn: Transaction, vm: Obj, phase: Phase) -> None:
        self.ctx.transition(txn, vm, phase, enforce=False)
        self.ctx.record(txn, vm, "Normal", "Started", "the domain is running")

    def _started_then_off(self, txn: Transaction, vm: Obj, cause: ExitCause) -> None:
        if runtime_phase(vm) is Phase.STARTING:
            self._started(txn, vm, Phase.RUNNING)
            self._went_off(txn, vm, cause)

    def _start_failed(self, txn: Transaction, vm: Obj, message: str) -> None:
        if runtime_phase(vm) is not Phase.STARTING:
            return
        self.ctx.record(txn, vm, "Warning", "FailedCreate", message)
        self._after_failure(txn, vm, reason="FailedCreate", message=message, retry_at_once=False)

    def _after_failure(self, txn: Transaction, vm: Obj, *, reason: str, message: str, retry_at_once: bool) -> None:
        """Stopped by a failure: restart if the strategy says so, backing off when it keeps failing."""
        status = vm.setdefault("status", {})
        if not wants_running(vmspec.run_strategy(vm), last_exit(vm)):
            self.ctx.transition(txn, vm, Phase.STOPPED, enforce=False, reason=reason, message=message)
            return
        ran_for = self.ctx.clock() - float(status.get("runningSince", 0) or 0)
        failures = status.get("startFailure", {}).get("consecutiveFailCount", 0)
        failures = 1 if retry_at_once and ran_for >= CRASH_RESET_SECONDS else failures + 1
        if retry_at_once and failures == 1:
            status["startFailure"] = {"consecutiveFailCount": failures, "retryAfterTimestamp": 0}
            self.ctx.transition(txn, vm, Phase.STOPPED, enforce=False)
            self.try_start(txn, vm)
            return
        backoff = min(MAX_BACKOFF_SECONDS, self.backoff_base_seconds * 2 ** (failures - (2 if retry_at_once else 1)))
        status["startFailure"] = {"consecutiveFailCount": failures, "retryAfterTimestamp": self.ctx.clock() + backoff}
        self.ctx.transition(txn, vm, Phase.CRASH_LOOP, enforce=False, reason=reason,
                         message=f"{message} (failed {failures} times; next try in {backoff:.0f}s)")
        key = key_of(vm)
        txn.after_commit(lambda: self.ctx.queue.add(key, after=backoff))

    def host_lost(self, txn: Transaction, vm: Obj, *, node: str) -> None:
        """An admin confirmed that the host of `node` is off: the VM no longer runs, so it is released now, and
        started again elsewhere if its strategy says so. Never on a timeout alone: a host that only stopped
        answering may still run it, and a second copy would write to the same disks."""
        if node_of(vm) != node:
            return
        phase = runtime_phase(vm)
        message = f"node {node} was confirmed down (out-of-service): the VM no longer runs there"
        if phase in (Phase.RUNNING, Phase.PAUSED):
            self.ctx.record(txn, vm, "Warning", "NodeLost", message)
            self._went_off(txn, vm, ExitCause.FAILED)
        elif phase is Phase.STARTING:
            self._start_failed(txn, vm, message)
        elif usage.holds_runtime(phase):  # stopping or terminating: what was asked has happened
            self.ctx.record(txn, vm, "Normal", "NodeLost", message)
            self.ctx.transition(txn, vm, Phase.STOPPED, enforce=False)

    def reconcile_stopping(self, key: Key, vm: Obj, spec: VMSpec, up: bool) -> None:
        uid = vm["metadata"]["uid"]
        if up:
            status = vm.get("status") or {}
            now = self.ctx.clock()
            deadline = status.get(STOP_DEADLINE)
            if deadline is None:  # the guest has not been asked yet
                grace = status.get(STOP_GRACE, spec.grace_seconds)
                if grace > 0:
                    self.ctx.host_of(vm).shutdown(*key, uid)
                    self.ctx.update(key, lambda txn, vm: self._asked_to_shut_down(txn, vm, now, grace), expect_uid=uid)
                    self.ctx.queue.add(key, after=grace)  # or sooner: a later stop with a shorter grace queues it
                    return
                deadline = now
            if now < deadline:
                self.ctx.queue.add(key, after=deadline - now)
                return
            # destroy returns once the domain is off: confirmed here, not when (or if) its event comes
            self.ctx.host_of(vm).destroy(*key, uid)

        def confirm_off(txn: Transaction, vm: Obj) -> None:
            if runtime_phase(vm) is not Phase.STOPPING:
                return
            status = vm.setdefault("status", {})
            restart = {"action": "Start"} in status.pop("stateChangeRequests", []) and not deleting(vm)
            if restart:
                self.ctx.transition(txn, vm, Phase.STARTING, enforce=True)  # same charge unless the spec grew
            else:
                self.ctx.transition(txn, vm, Phase.STOPPED, enforce=False)
                self.ctx.record(txn, vm, "Normal", "Stopped", "the domain is off")

        self.ctx.update(key, confirm_off)

    def _asked_to_shut_down(self, txn: Transaction, vm: Obj, asked_at: float, grace: int) -> None:
        """Write down when the guest is forced off: the deadline is the VM's, so every process and restart sees it."""
        status = vm.setdefault("status", {})
        if runtime_phase(vm) is not Phase.STOPPING or STOP_DEADLINE in status:
            return
        # A stop with a shorter gracePeriod may have come since this reconcile read the VM.
        grace = min(grace, status.pop(STOP_GRACE, grace))
        status[STOP_DEADLINE] = asked_at + grace
        self.ctx.record(txn, vm, "Normal", "ShuttingDown",
                    f"the guest was asked to shut down; it is forced off if it is still running in {grace} s")

    def reconcile_running(self, key: Key, vm: Obj, spec: VMSpec, observed: Observed, up: bool) -> None:
        if up:
            phase = Phase.PAUSED if observed.state is DomainState.PAUSED else Phase.RUNNING
            if phase is not runtime_phase(vm):
                self.ctx.update(key, lambda txn, vm: self.ctx.transition(txn, vm, phase, enforce=False))
            elif spec.run_strategy is RunStrategy.HALTED:  # strategy edited to Halted: stop it
                self.ctx.update(key, lambda txn, vm: self.ctx.transition(txn, vm, Phase.STOPPING, enforce=False))
            return
        cause = observed.cause if observed.uid == vm["metadata"]["uid"] else ExitCause.DESTROYED
        self.ctx.update(key, lambda txn, vm: self._went_off(txn, vm, cause))

    def _went_off(self, txn: Transaction, vm: Obj, cause: ExitCause) -> None:
        """A running VM whose domain is off with no stop asked: record why, then restart it if its strategy says."""
        if runtime_phase(vm) not in (Phase.RUNNING, Phase.PAUSED):
            return
        exit_reason = cause if cause is not ExitCause.NONE else ExitCause.FAILED
        vm.setdefault("status", {})["lastExit"] = exit_reason.value
        failure = exit_reason is not ExitCause.GUEST_SHUTDOWN
        message = f"the domain went off without a stop request ({exit_reason.value})"
        self.ctx.record(txn, vm, "Warning" if failure else "Normal", "Crashed" if failure else "Stopped", message)
        if failure:
            self._after_failure(txn, vm, reason=exit_reason.value, message=message, retry_at_once=True)
        else:
            self.ctx.transition(txn, vm, Phase.STOPPED, enforce=False)
            if wants_running(vmspec.run_strategy(vm), last_exit(vm)):
                self.try_start(txn, vm)

    def reconcile_stopped(self, key: Key, vm: Obj, spec: VMSpec, observed: Observed, up: bool) -> None:
        try:
            if not volumes_ready(vm):  # made once; a resized disk is grown when the VM next starts
                self.volumes.ensure_disks(vm, spec)
        except errors.HypervisorUnavailable:
            raise
        except errors.HypervisorError as e:
            message = str(e)
            self.ctx.update(key, lambda txn, vm: self.volumes.disks_failed(txn, vm, message))
            self.ctx.queue.add(key, after=self.unschedulable_retry_seconds * 6)
            return
        if up:  # started behind vmquota's back: it runs, so it charges, whatever the quota says
            def found_running(txn: Transaction, vm: Obj) -> None:
                self.ctx.transition(txn, vm, Phase.RUNNING, enforce=False, node=self.ctx.hosts.first_name(txn))
                self.ctx.record(txn, vm, "Warning", "StartedOutsideVmquota",
                            "the domain was found running; charged as it is")
            self.ctx.update(key, found_running)
            return
        # A Manual VM's start that waits for a node was admitted: it is tried again like an automatic one.
        waits_for_node = runtime_phase(vm) is Phase.UNSCHEDULABLE and spec.run_strategy is RunStrategy.MANUAL
        if not wants_running(spec.run_strategy, last_exit(vm)) and not waits_for_node:
            return
        retry_at = float((vm.get("status") or {}).get("startFailure", {}).get("retryAfterTimestamp", 0) or 0)
        if retry_at > self.ctx.clock():
            self.ctx.queue.add(key, after=retry_at - self.ctx.clock())
            return
        self.ctx.update(key, self.try_start)

    def try_start(self, txn: Transaction, vm: Obj) -> None:
        """An automatic start (run strategy): admitted like any other; refused, it waits and retries."""
        try:
            self.ctx.transition(txn, vm, Phase.STARTING, enforce=True)  # a refusal raises before any write
        except errors.QuotaExceeded as e:
            conditions = vm.setdefault("status", {}).get("conditions") or []
            # Refused again for the same reason: nothing to write, so retries do not churn the VM and its events.
            same = runtime_phase(vm) is Phase.UNSCHEDULABLE and any(c.get("message") == e.message for c in conditions)
            if not same:
                self.ctx.transition(txn, vm, Phase.UNSCHEDULABLE, enforce=False, reason="QuotaExceeded",
                                 message=e.message)
                self.ctx.record(txn, vm, "Warning", "FailedCreate", e.message)
                accounting.record_refusal(txn, e)  # once per reason, as the event: not on every retry
            key = key_of(vm)
            txn.after_commit(lambda: self.ctx.queue.add(key, after=self.unschedulable_retry_seconds))
        except placement.Unschedulable as e:
            self._unschedulable(txn, vm, str(e))

    def finalize(self, key: Key, vm: Obj) -> None:
        uid = vm["metadata"]["uid"]
        if not self.volumes.imports.cancel(uid):  # an import still in qemu-img: remove its files once it has ended
            self.ctx.queue.add(key, after=5.0)
            return
        self.ctx.hosts.first.undefine(*key, uid)
        for _node, host in self.ctx.hosts.nodes():  # it may have run on any of them
            if host is not self.ctx.hosts.first:
                try:
                    host.undefine(*key, uid)
                except errors.HypervisorError as e:  # an away host's leftover is the recount's garbage
                    log.warning("leaving the domain of %s/%s on %s to the recount: %s", *key, host.uri, e)
        if self.volumes.clones.clones_to_copy(key[0], key[1], uid):  # they copy their disks from ours: keep ours
            self.volumes.ensure_disks(vm, vmspec.read(vm))
            self.ctx.queue.add(key, after=1.0)
            return
        self.ctx.disks.remove_vm(key[0], uid)

        def remove(txn: Transaction, vm: Obj) -> None:
            self.ctx.release(txn, *key)
            txn.delete(VM, *key)
            self.ctx.record(txn, vm, "Normal", "Deleted", "the VM, its domain and its disks are gone")

        self.ctx.update(key, remove, expect_uid=uid)


def refuse_while_migrating(vm: Obj) -> None:
    """A stop or restart waits for the migration to end (or for its cancel: delete the migration object)."""
    if migrating(vm):
        raise errors.Conflict("VM is migrating: stop or restart it once the migration has ended, or cancel the "
                              "migration by deleting its VirtualMachineInstanceMigration")
