"""The real Linux guest under `vmquota serve --use-emulation`: it boots, and its console is read from libvirt."""

from __future__ import annotations

import subprocess
from pathlib import Path

import libvirt
import pytest
from guest_harness import Console, apply, guest_vm
from kvm_harness import Kvm

pytestmark = pytest.mark.kvm


def test_the_test_guest_boots_under_emulation_and_prints_on_its_serial_console(guests: Kvm,
                                                                               guest_image: Path) -> None:
    apply(guests, guest_vm("boot", disk="64Mi"))
    guests.wait_disks_ready("boot")
    [disk] = guests.server.data_dir.rglob("boot-root.qcow2")
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(guest_image), str(disk)],
                   check=True, capture_output=True)
    guests.ok("start", "boot", "-n", guests.ns, "--wait")
    domain = guests.domain("boot")
    assert domain.XMLDesc().startswith("<domain type='qemu'")  # emulated, not kvm
    stream = guests.conn.newStream(0)
    domain.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
    console = Console(stream.recv, stream.send)
    console.wait_for("vmquota-guest: ready")
