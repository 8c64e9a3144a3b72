"""Fixtures for the real Linux guest (a pytest plugin, see conftest.py): its disk image, a `vmquota serve
--use-emulation` process on qemu:///system, and a reader of a guest's serial console.

The image is built by scripts/build-test-guest.sh from Debian's packages and cached outside the repository.
Under plain emulation it boots in about ten seconds; under this host's nested KVM a Debian kernel crawls, so
these tests run their guests emulated (the accounting tests keep KVM).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from kvm_harness import Kvm, Server, namespace_on

REPO = Path(__file__).resolve().parent.parent
BOOT_TIMEOUT = 90  # seconds from a start to the guest's "ready" line: ten under emulation, more on a busy host


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """The cached raw image of the test guest, built on first use (about ten seconds)."""
    done = subprocess.run(["bash", str(REPO / "scripts" / "build-test-guest.sh")], capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, f"building the test guest failed:\n{done.stderr}"
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def emulated_server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "data", args=("--use-emulation",))
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def guests(emulated_server: Server) -> Iterator[Kvm]:
    """A namespace on an emulating server; every VM left in it is forced off and deleted afterwards."""
    with namespace_on(emulated_server, "guest") as k:
        yield k


class Console:
    """What a guest's serial console has printed, read on a thread from a stream's `recv`; and typing into it."""

    def __init__(self, recv: Callable[[int], bytes], send: Callable[[bytes], object]) -> None:
        self._recv, self._send = recv, send
        self._text = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self._recv(4096)
            except Exception:
                return  # the stream ended with the domain
            if not data:
                return
            with self._lock:
                self._text += data

    @property
    def text(self) -> str:
        with self._lock:
            return self._text.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} never showed on the console; it shows:\n{self.text[-2000:]}")
            time.sleep(0.2)

    def type(self, line: str) -> None:
        self._send(line.encode() + b"\r")


def guest_vm(name: str, *, disk: str = "1Gi", source: dict[str, object] | None = None, memory: str = "256Mi",
             strategy: str = "Halted", grace: int = 0, user_data: str | None = None,
             ports: list[int] | None = None) -> dict[str, object]:
    """A KubeVirt VirtualMachine as a user of the real guest writes it."""
    volumes: list[dict[str, object]] = [{"name": "root", "dataVolume": {"name": f"{name}-root"}}]
    disks: list[dict[str, object]] = [{"name": "root", "disk": {"bus": "virtio"}}]
    if user_data is not None:
        volumes.append({"name": "cloudinitdisk", "cloudInitNoCloud": {"userData": user_data}})
        disks.append({"name": "cloudinitdisk", "cdrom": {"bus": "sata"}})
    interfaces = [{"name": "default", "masquerade": {}, "ports": [{"port": p} for p in ports or []]}]
    template = {"metadata": {"name": f"{name}-root"},
                "spec": {"storage": {"resources": {"requests": {"storage": disk}}}}}
    if source is not None:
        template["spec"]["source"] = source  # type: ignore[index]
    return {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name},
        "spec": {
            "runStrategy": strategy,
            "dataVolumeTemplates": [template],
            "template": {"spec": {
                "terminationGracePeriodSeconds": grace,
                "domain": {"cpu": {"cores": 1}, "memory": {"guest": memory},
                           "devices": {"disks": disks, "interfaces": interfaces}},
                "networks": [{"name": "default", "pod": {}}],
                "volumes": volumes,
            }},
        },
    }


def apply(kvm: Kvm, manifest: dict[str, object]) -> None:
    """`vmquota apply` of one manifest into the test's namespace."""
    manifest["metadata"]["namespace"] = kvm.ns  # type: ignore[index]
    kvm.ok("apply", "-f", "-", input=yaml.safe_dump(manifest))
