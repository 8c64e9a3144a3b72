"""What acts on a running guest without changing its runtime: pause, unpause, soft reboot, console, port forward.

KubeVirt's VMI subresources. A paused VM still holds its runtime, so nothing here changes a charge. Requests are
written into the VM (`status.guestRequest`) inside the caller's transaction and done by the reconcile, so one made
through any API process is done once by the controller.
"""

from __future__ import annotations

import socket

from vmquota import errors, vmspec
from vmquota.controller.context import Context
from vmquota.controller.state import GUEST_REQUEST, Key, deleting, key_of, runtime_phase
from vmquota.hypervisor import GuestStream
from vmquota.objects import VIRTUAL_MACHINE as VM
from vmquota.objects import Obj
from vmquota.store import Transaction
from vmquota.vmstatus import Phase

DONE_REASON = {"Pause": "Paused", "Unpause": "Unpaused", "SoftReboot": "SoftRebooted"}


class Guests:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def request(self, txn: Transaction, vm: Obj, action: str) -> None:
        """Pause, Unpause or SoftReboot, refused as KubeVirt refuses them when the VMI is not in a state for it."""
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
        key = key_of(vm)
        txn.after_commit(lambda: self.ctx.queue.add(key))
        self.ctx.record(txn, vm, "Normal", f"{action}Requested", f"{action.lower()} requested")

    def act(self, key: Key, vm: Obj, request: str) -> None:
        """Do a request written in the VM, then clear it with an event saying how it went."""
        hypervisor = self.ctx.host_of(vm)
        uid = vm["metadata"]["uid"]
        act = {"Pause": hypervisor.suspend, "Unpause": hypervisor.resume, "SoftReboot": hypervisor.reboot}[request]
        try:
            act(*key, uid)
            reason, message, type_ = DONE_REASON[request], f"{request.lower()} done", "Normal"
        except errors.HypervisorUnavailable:
            raise
        except errors.HypervisorError as e:
            reason, message, type_ = f"{request}Failed", str(e), "Warning"

        def done(txn: Transaction, vm: Obj) -> None:
            if vm.setdefault("status", {}).pop(GUEST_REQUEST, None) == request:
                self.ctx.record(txn, vm, type_, reason, message)

        self.ctx.update(key, done, expect_uid=uid)

    def _running_vm(self, namespace: str, name: str) -> Obj:
        vm = self.ctx.store.reader().get(VM, namespace, name)
        if vm is None:
            raise errors.NotFound(f'virtualmachineinstances.kubevirt.io "{name}" not found')
        if runtime_phase(vm) not in (Phase.RUNNING, Phase.PAUSED):
            raise errors.Conflict(f'virtualmachineinstances.kubevirt.io "{name}": VMI is not running')
        return vm

    def open_console(self, namespace: str, name: str) -> GuestStream:
        """The serial console of a running VM, as a stream (`recv`, `sendall`, `close`)."""
        vm = self._running_vm(namespace, name)
        return self.ctx.host_of(vm).open_console(namespace, name, vm["metadata"]["uid"])

    def open_port(self, namespace: str, name: str, port: int) -> socket.socket:
        """A TCP connection to `port` of a running VM's guest, through its masquerade interface."""
        vm = self._running_vm(namespace, name)
        spec = vmspec.read(vm)
        if not spec.interfaces or spec.interfaces[0].binding is not vmspec.Binding.MASQUERADE:
            raise errors.BadRequest(f'virtualmachineinstances.kubevirt.io "{name}" has no masquerade interface to '
                                    "forward a port through")
        allowed = spec.interfaces[0].ports
        if allowed and port not in allowed:
            raise errors.BadRequest(f"port {port} is not among the ports of interface {spec.interfaces[0].name}: "
                                    + ", ".join(map(str, allowed)))
        return self.ctx.host_of(vm).open_port(namespace, name, vm["metadata"]["uid"], port)
