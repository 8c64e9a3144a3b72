"""`vmquota console` and `vmquota port-forward` on the real Linux guest, through `vmquota serve --use-emulation`:
the console, driven through a pty as a person's terminal, shows the guest's cloud-init marker and takes typed
commands, and a second console takes the first one's place; a port forward reaches the HTTP server in the guest,
one tunnel per connection.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from guest_harness import BOOT_TIMEOUT, apply, guest_vm
from kvm_harness import Kvm, namespace_on

pytestmark = pytest.mark.kvm

MARKER = "vmquota-cons-marker-5d21"
USER_DATA = f"""#!/bin/sh
echo "{MARKER} from user-data"
echo "{MARKER}" > /var/www/marker
"""


@pytest.fixture
def consoles(emulated_server: object) -> Iterator[Kvm]:
    with namespace_on(emulated_server, "cons") as k:  # type: ignore[arg-type]
        yield k


class PtyConsole:
    """`vmquota console` on a pseudo-terminal of its own, as a person runs it: what it prints is read on a thread."""

    def __init__(self, kvm: Kvm, name: str) -> None:
        self.master, self.slave = pty.openpty()
        self.before = termios.tcgetattr(self.slave)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vmquota", "--server", kvm.server.url, "console", name, "-n", kvm.ns],
            stdin=self.slave, stdout=self.slave, stderr=subprocess.PIPE)
        self._text = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return  # the pty was closed
            if not data:
                return
            if b"\x1b[6n" in data:  # busybox's shell asks where the cursor is; a terminal answers, so does this
                os.write(self.master, b"\x1b[1;1R")
            with self._lock:
                self._text += data

    @property
    def text(self) -> str:
        with self._lock:
            return self._text.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            assert self.process.poll() is None, f"vmquota console ended: {self.process.stderr.read()!r}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"{needle!r} never showed; the console shows:\n{self.text[-2000:]}"
            time.sleep(0.2)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()
        os.close(self.master)
        os.close(self.slave)


@pytest.mark.timeout(300)
def test_vmquota_console_and_port_forward_reach_the_real_guest(consoles: Kvm, guest_image: Path) -> None:
    apply(consoles, guest_vm("con", disk="64Mi", user_data=USER_DATA, ports=[80]))
    consoles.wait_disks_ready("con")
    [disk] = consoles.server.data_dir.rglob("con-root.qcow2")
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(guest_image), str(disk)],
                   check=True, capture_output=True)
    consoles.ok("start", "con", "-n", consoles.ns)  # no --wait: the console waits for the VM to run, as virtctl's

    console = PtyConsole(consoles, "con")
    try:
        console.wait_for(f"{MARKER} from user-data")
        console.wait_for("vmquota-guest: ready")
        assert termios.tcgetattr(console.slave)[3] & termios.ICANON == 0  # raw: every key goes to the guest
        console.type("echo cons-$((6*7))-ok\r")
        console.wait_for("cons-42-ok", timeout=30)  # typed into the guest's shell, answered by it
        console.type("\x1d")  # Ctrl+]
        assert console.process.wait(timeout=15) == 0
        assert termios.tcgetattr(console.slave) == console.before  # the terminal is given back as it was
    finally:
        console.close()

    # A second console takes the first one's place, as virtctl's does: the first ends, the second types.
    first, second = PtyConsole(consoles, "con"), None
    try:
        first.type("\x03")  # a fresh prompt: whatever the shell was in when the last console left is dropped
        time.sleep(1)
        first.type("echo first-$((1+1))\r")
        first.wait_for("first-2", timeout=30)
        second = PtyConsole(consoles, "con")
        assert first.process.wait(timeout=15) == 0
        second.type("echo second-$((2+3))\r")
        second.wait_for("second-5", timeout=30)
    finally:
        first.close()
        if second is not None:
            second.close()

    local = free_port()
    forward = subprocess.Popen([sys.executable, "-m", "vmquota", "--server", consoles.server.url, "port-forward",
                                "vm/con", f"{local}:80", "-n", consoles.ns],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert forward.stdout is not None
        assert select.select([forward.stdout], [], [], 30)[0], "port-forward never said it listens"
        assert forward.stdout.readline().decode().strip() == f"Forwarding from 127.0.0.1:{local} -> 80"
        for _ in range(2):  # each connection gets a tunnel of its own
            with urllib.request.urlopen(f"http://127.0.0.1:{local}/marker", timeout=30) as answer:
                assert answer.read().decode().strip() == MARKER
        forward.send_signal(signal.SIGINT)
        assert forward.wait(timeout=15) == 0
    finally:
        if forward.poll() is None:
            forward.kill()
        forward.communicate()
