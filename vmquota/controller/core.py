"""The Controller: the parts of the controller wired together, its worker threads, and the reconcile's dispatch.

Middle layer, between the API (`api.py`, above) and the store, hypervisor and disks (below). The API calls the
request methods inside its transaction; libvirt's lifecycle events and the periodic recount only queue VMs; the
worker threads take them from the queue and `reconcile` each by its phase. All decisions are the parts':
`lifecycle` (phases and run strategies), `volumes` and `clone` (disks), `guest` (pause, console, port forward),
`recount` (drift and garbage), and `Context.transition`, the one place a VM's phase and charge change.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Callable

from vmquota import errors, objects, telemetry, vmspec
from vmquota.controller.clone import Clones
from vmquota.controller.context import Context
from vmquota.controller.guest import Guests
from vmquota.controller.lifecycle import Lifecycle
from vmquota.controller.migration import Migrations
from vmquota.controller.nodes import HEARTBEAT_SECONDS, NODE_GRACE_SECONDS, NodeHealth
from vmquota.controller.placement import Policy
from vmquota.controller.recount import Recount
from vmquota.controller.state import GUEST_REQUEST, Key, deleting, key_of, migrating, runtime_phase
from vmquota.controller.volumes import Volumes
from vmquota.disks import Disks
from vmquota.hypervisor import GuestStream, Hypervisor
from vmquota.objects import VIRTUAL_MACHINE as VM
from vmquota.objects import Obj
from vmquota.store import Store, Transaction
from vmquota.usage import OverheadModel
from vmquota.vmstatus import Phase
from vmquota.workqueue import WorkQueue

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, *, store: Store, hypervisor: Hypervisor, disks: Disks,
                 overhead: OverheadModel = OverheadModel.NONE, resync_interval: float = 30.0,
                 workers: int = 4, clock: Callable[[], float] = time.time,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS, node_grace_seconds: float = NODE_GRACE_SECONDS,
                 placement: Policy = Policy.SPREAD) -> None:
        self.ctx = Context(store=store, hypervisor=hypervisor, disks=disks, overhead=overhead, clock=clock,
                           policy=placement)
        self.clones = Clones(self.ctx)
        self.volumes = Volumes(self.ctx, self.clones)
        self.lifecycle = Lifecycle(self.ctx, self.volumes)
        self.guests = Guests(self.ctx)
        self.recount = Recount(self.ctx)
        self.migrations = Migrations(self.ctx)
        self.nodes = NodeHealth(self.ctx, host_lost=self.lifecycle.host_lost, heartbeat_seconds=heartbeat_seconds,
                                grace_seconds=node_grace_seconds)
        self.resync_interval = resync_interval
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._unreachable: set[Key] = set()  # VMs told that their work waits for the hypervisor
        # What the API, the app and the tests reach through the controller: the parts' own objects.
        self.store, self.hypervisor, self.disks = store, hypervisor, disks
        self.overhead, self.clock = overhead, clock
        self.imports = self.volumes.imports

    @property
    def queue(self) -> WorkQueue[Key]:
        return self.ctx.queue

    @queue.setter
    def queue(self, queue: WorkQueue[Key]) -> None:
        """An API process hands its keys to the controller's process (workers.KeysToController): every part
        queues through the Context, so that is where the replacement must go."""
        self.ctx.queue = queue

    @property
    def unschedulable_retry_seconds(self) -> float:
        return self.lifecycle.unschedulable_retry_seconds

    @unschedulable_retry_seconds.setter
    def unschedulable_retry_seconds(self, seconds: float) -> None:
        self.lifecycle.unschedulable_retry_seconds = seconds

    @property
    def backoff_base_seconds(self) -> float:
        return self.lifecycle.backoff_base_seconds

    @backoff_base_seconds.setter
    def backoff_base_seconds(self, seconds: float) -> None:
        self.lifecycle.backoff_base_seconds = seconds

    # -- life of the controller -----------------------------------------------------------------

    def run(self) -> None:
        """Connect to the hypervisor's events, recount once, then work until `shutdown`."""
        self.hypervisor.connect(on_event=lambda ns, name: self.queue.add((ns, name)),
                                on_reconnect=self.resync)
        self.ctx.hosts.listen(on_event=lambda ns, name: self.queue.add((ns, name)), on_reconnect=self.resync)
        for i in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"reconcile-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.nodes.register_first()
        self.migrations.recover()
        self.resync()
        for loop, name in ((self._resync_loop, "resync"), (self._heartbeat_loop, "heartbeat")):
            thread = threading.Thread(target=loop, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def shutdown(self) -> None:
        self._stopping.set()
        self.queue.close()
        for thread in self._threads:
            thread.join(timeout=10)
        self.ctx.hosts.close()

    def _work(self) -> None:
        while (key := self.queue.get()) is not None:
            try:
                if key in self._unreachable:
                    # Say the outage is over before the work it held up, so no one sees that work done first.
                    self._host_of(key).ensure_reachable()
                    self._unreachable.discard(key)
                    self.ctx.update(key, self._hypervisor_back)
                self.reconcile(key)
            except errors.HypervisorUnavailable as e:
                telemetry.HYPERVISOR_UP.labels(self._host_of(key).uri).set(0)
                log.warning("%s/%s: %s; trying again later", *key, e)
                self.ctx.update(key, functools.partial(self._hypervisor_away, message=str(e)))
                self.queue.add(key, after=2.0)
            except Exception:
                log.exception("reconciling %s/%s", *key)
                self.queue.add(key, after=5.0)
            finally:
                self.queue.done(key)

    def _host_of(self, key: Key) -> Hypervisor:
        vm = self.store.reader().get(VM, *key)
        return self.ctx.hosts.first if vm is None else self.ctx.host_of(vm)

    def _hypervisor_away(self, txn: Transaction, vm: Obj, message: str) -> None:
        """Say on a VM whose work waits for the hypervisor why it waits: a condition, and one event per outage."""
        key = key_of(vm)
        conditions = vm.setdefault("status", {}).setdefault("conditions", [])
        if not any(c.get("reason") == "HypervisorUnavailable" for c in conditions):
            conditions.append({"type": "Failure", "status": "True", "lastTransitionTime": objects.now(),
                               "reason": "HypervisorUnavailable", "message": f"{message}; trying again"})
        if key not in self._unreachable:
            self._unreachable.add(key)
            self.ctx.record(txn, vm, "Warning", "HypervisorUnavailable", f"{message}; trying again")

    def _hypervisor_back(self, txn: Transaction, vm: Obj) -> None:
        status = vm.setdefault("status", {})
        status["conditions"] = [c for c in status.get("conditions") or [] if c.get("reason") != "HypervisorUnavailable"]
        self.ctx.record(txn, vm, "Normal", "HypervisorAvailable", "the hypervisor answers again")

    def _resync_loop(self) -> None:
        while not self._stopping.wait(self.resync_interval):
            try:
                self.resync()
            except errors.HypervisorUnavailable as e:
                telemetry.HYPERVISOR_UP.labels(self.hypervisor.uri).set(0)
                log.warning("recount postponed: %s", e)
            except Exception:
                log.exception("recount failed")

    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(self.nodes.heartbeat_seconds):
            try:
                self.nodes.heartbeat()
            except Exception:
                log.exception("node heartbeat failed")

    # -- requests: run inside the caller's transaction ------------------------------------------

    def admit_new(self, txn: Transaction, vm: Obj) -> None:
        self.lifecycle.admit_new(txn, vm)

    def admit_update(self, txn: Transaction, old: Obj, new: Obj) -> None:
        self.lifecycle.admit_update(txn, old, new)

    def request_start(self, txn: Transaction, vm: Obj) -> None:
        self.lifecycle.request_start(txn, vm)

    def request_stop(self, txn: Transaction, vm: Obj, grace_seconds: int | None = None) -> None:
        self.lifecycle.request_stop(txn, vm, grace_seconds)

    def request_migration(self, txn: Transaction, vmim: Obj) -> None:
        self.migrations.admit(txn, vmim)

    def request_restart(self, txn: Transaction, vm: Obj) -> None:
        self.lifecycle.request_restart(txn, vm)

    def request_delete(self, txn: Transaction, vm: Obj) -> None:
        self.lifecycle.request_delete(txn, vm)

    def request_guest(self, txn: Transaction, vm: Obj, action: str) -> None:
        self.guests.request(txn, vm, action)

    def record(self, txn: Transaction, vm: Obj, type_: str, reason: str, message: str) -> None:
        self.ctx.record(txn, vm, type_, reason, message)

    def open_console(self, namespace: str, name: str) -> GuestStream:
        return self.guests.open_console(namespace, name)

    def open_port(self, namespace: str, name: str, port: int) -> socket.socket:
        return self.guests.open_port(namespace, name, port)

    def resync(self) -> list[str]:
        return self.recount.resync()

    # -- reconcile: worker threads ---------------------------------------------------------------

    def reconcile(self, key: Key) -> None:
        ns, name = key
        vm = self.store.reader().get(VM, ns, name)
        if vm is None or key in self.ctx.migrating:  # a migration's end queues it again
            return
        if migrating(vm):
            self.migrations.reconcile(key)
            return
        host = self.ctx.host_of(vm)
        observed = host.observe(ns, name)
        up = observed.up and observed.uid == vm["metadata"]["uid"]
        phase = runtime_phase(vm)
        spec = vmspec.read(vm)
        lifecycle = self.lifecycle
        if phase is Phase.STOPPING or (deleting(vm) and up):
            lifecycle.reconcile_stopping(key, vm, spec, up)
        elif deleting(vm):
            lifecycle.finalize(key, vm)
        elif phase is Phase.STARTING:
            lifecycle.reconcile_starting(key, vm, spec, observed, up)
        elif phase in (Phase.RUNNING, Phase.PAUSED):
            request = (vm.get("status") or {}).get(GUEST_REQUEST)
            if up and request:
                self.guests.act(key, vm, request)
                observed = host.observe(*key)
            lifecycle.reconcile_running(key, vm, spec, observed, up)
        else:
            lifecycle.reconcile_stopped(key, vm, spec, observed, up)
