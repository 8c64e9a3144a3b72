"""What guests do on real KVM: power off from inside, crash, ignore a shutdown request.

The "guest" that powers itself off is a 512-byte boot sector written into the VM's disk: it asks the
emulated ACPI power-management device to switch the machine off, as an operating system's `poweroff`
does. QEMU and libvirt then report a guest-initiated shutdown, exactly as for a real guest.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import Sampler, wait_until
from kvm_harness import Kvm, apply_vm, quota_doc

from vmquota.client import action_path

pytestmark = pytest.mark.kvm

# mov dx,0x604; mov ax,0x2000; out dx,ax   -- PIIX4 PM1a control: SLP_EN, sleep type 0 (soft off)
# mov dx,0xb004; mov ax,0x2000; out dx,ax  -- the same register where older firmware places it
# hlt; jmp $
POWEROFF_CODE = bytes([0xBA, 0x04, 0x06, 0xB8, 0x00, 0x20, 0xEF,
                       0xBA, 0x04, 0xB0, 0xB8, 0x00, 0x20, 0xEF, 0xF4, 0xEB, 0xFE])
BOOT_SECTOR = POWEROFF_CODE + bytes(510 - len(POWEROFF_CODE)) + b"\x55\xaa"


def vm_path(kvm: Kvm, name: str) -> str:
    return f"/apis/kubevirt.io/v1/namespaces/{kvm.ns}/virtualmachines/{name}"


def status(kvm: Kvm, name: str) -> dict:
    return dict(kvm.client.get(vm_path(kvm, name)).get("status", {}))


def event_reasons(kvm: Kvm, name: str) -> list[str]:
    events = kvm.client.get(f"/api/v1/namespaces/{kvm.ns}/events")["items"]
    return [e["reason"] for e in events if e["involvedObject"]["name"] == name]


def install_poweroff_guest(kvm: Kvm, name: str, tmp_path: Path) -> None:
    """Write the boot sector into the VM's (stopped) root disk."""
    kvm.wait_disks_ready(name)
    [disk] = kvm.server.data_dir.rglob(f"{name}-root.qcow2")
    sector = tmp_path / "boot.bin"
    sector.write_bytes(BOOT_SECTOR)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {sector} 0 512", str(disk)],
                   check=True, capture_output=True)


def qemu_pid(kvm: Kvm, name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/vmquota_{kvm.ns}_{name}.pid").read_text())


def test_a_shutdown_from_inside_the_guest_releases_the_charge(kvm: Kvm, tmp_path: Path) -> None:
    kvm.ok("apply", "-f", "-", input=quota_doc(kvm.ns, {"limits.cpu": "2", "limits.memory": "1Gi"}))
    apply_vm(kvm, "guest", cores=1, memory="256Mi", disk="64Mi")
    install_poweroff_guest(kvm, "guest", tmp_path)
    quota = f"/api/v1/namespaces/{kvm.ns}/resourcequotas/compute"
    # Sampled on threads: the guest runs only as long as its firmware takes to boot, which one poll could miss.
    with Sampler(kvm.server.url, lambda c: c.get(vm_path(kvm, "guest"))["status"]["printableStatus"]) as phases, \
            Sampler(kvm.server.url, lambda c: c.get(quota)["status"]["used"]) as used:
        # RerunOnFailure: runs now, restarted after a crash, but not after the guest's own shutdown.
        kvm.client.patch(vm_path(kvm, "guest"), {"spec": {"runStrategy": "RerunOnFailure"}})
        wait_until(lambda: "Running" in phases.samples, timeout=30, what="Running")
        wait_until(lambda: phases.samples[-1] == "Stopped", timeout=60, what="the guest to power itself off")
    assert {"limits.cpu": "1", "limits.memory": "256Mi"} in used.samples  # charged while it ran
    assert status(kvm, "guest")["lastExit"] == "GuestShutdown"
    assert kvm.used() == {"limits.cpu": "0", "limits.memory": "0"}
    assert kvm.running_domains() == []


def test_a_crash_restarts_the_vm_only_where_its_strategy_says(kvm: Kvm) -> None:
    apply_vm(kvm, "rerun", cores=1, memory="256Mi", disk=None, strategy="RerunOnFailure")
    apply_vm(kvm, "manual", cores=1, memory="256Mi", disk=None, strategy="Manual")
    kvm.ok("start", "manual", "-n", kvm.ns, "--wait")
    wait_until(lambda: status(kvm, "rerun").get("printableStatus") == "Running", timeout=30, what="Running")
    first = kvm.domain("rerun").ID()
    for name in ("rerun", "manual"):
        os.kill(qemu_pid(kvm, name), signal.SIGKILL)  # QEMU dies: the guest crashed, as far as anyone knows
    wait_until(lambda: status(kvm, "manual").get("printableStatus") == "Stopped", timeout=10, what="manual off")
    assert status(kvm, "manual")["lastExit"] in ("Crashed", "Failed", "Destroyed")
    wait_until(lambda: kvm.domain("rerun").isActive() and kvm.domain("rerun").ID() != first, timeout=30,
               what="RerunOnFailure to start the VM again")
    assert [d.name() for d in kvm.running_domains()] == [f"vmquota_{kvm.ns}_rerun"]


def test_stop_gives_the_guest_its_grace_period_then_forces_it_off(kvm: Kvm) -> None:
    kvm.ok("apply", "-f", "-", input=quota_doc(kvm.ns, {"limits.cpu": "2"}))
    apply_vm(kvm, "deaf", cores=1, memory="256Mi", disk=None, grace=4)  # no OS: ignores the ACPI request
    kvm.ok("start", "deaf", "-n", kvm.ns, "--wait")
    kvm.client.put(action_path(kvm.ns, "deaf", "stop"))
    wait_until(lambda: status(kvm, "deaf").get("printableStatus") == "Stopping", timeout=2, what="Stopping")
    assert kvm.domain("deaf").isActive()  # waiting for the guest...
    assert kvm.used() == {"limits.cpu": "1"}  # ...and, until it is off, still charged
    wait_until(lambda: status(kvm, "deaf").get("printableStatus") == "Stopped", timeout=30, what="forced off")
    assert kvm.used() == {"limits.cpu": "0"}
    assert not kvm.domain("deaf").isActive()


def test_a_stop_with_grace_period_0_forces_off_a_guest_still_given_its_grace(kvm: Kvm) -> None:
    """As `virtctl stop --force --grace-period=0`: a second stop need not wait out the first one's grace."""
    kvm.ok("apply", "-f", "-", input=quota_doc(kvm.ns, {"limits.cpu": "2"}))
    apply_vm(kvm, "deaf", cores=1, memory="256Mi", disk=None, grace=600)  # no OS: ignores the ACPI request
    kvm.ok("start", "deaf", "-n", kvm.ns, "--wait")
    kvm.client.put(action_path(kvm.ns, "deaf", "stop"))
    wait_until(lambda: "ShuttingDown" in event_reasons(kvm, "deaf"), timeout=10, what="the guest to be asked")
    assert status(kvm, "deaf").get("printableStatus") == "Stopping"
    assert kvm.domain("deaf").isActive()  # its 600 s have begun
    kvm.client.put(action_path(kvm.ns, "deaf", "stop"), {"gracePeriod": 0})
    wait_until(lambda: status(kvm, "deaf").get("printableStatus") == "Stopped", timeout=30, what="forced off")
    assert kvm.used() == {"limits.cpu": "0"}
    assert not kvm.domain("deaf").isActive()
