"""Issue 12's hardening on real KVM: QEMU runs as libvirt-qemu:kvm under libvirt's DAC driver, with the qemu.conf
`scripts/libvirtd-up.sh` gives a fresh machine. The shared system libvirtd is never reconfigured: the test starts an
extra libvirt host (tests/hosts_harness.py, scripts/test-host.sh) whose qemu.conf is the system's as
`libvirtd-up.sh --write-qemu-conf` rewrites it, and runs `vmquota serve --hypervisor qemu+unix:///system?socket=...`
against it.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, vm_manifest, wait_until
from hosts_harness import extra_host

from vmquota import disks
from vmquota.client import Client, action_path

pytestmark = pytest.mark.kvm

LIBVIRTD_UP = Path(__file__).resolve().parents[2] / "scripts" / "libvirtd-up.sh"
NS = "ten-dac"
QEMU_IDS = (pwd.getpwnam("libvirt-qemu").pw_uid, grp.getgrnam("kvm").gr_gid)  # 64055:108 on Debian


@pytest.fixture
def unprivileged_conf(tmp_path: Path) -> Path:
    conf = tmp_path / "qemu.conf"
    shutil.copy("/etc/libvirt/qemu.conf", conf)
    done = subprocess.run(["bash", str(LIBVIRTD_UP), "--write-qemu-conf", str(conf)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    settings = dict(line.split(" = ", 1) for line in conf.read_text().splitlines() if " = " in line
                    and not line.startswith("#"))
    assert (settings["user"], settings["group"], settings["dynamic_ownership"]) == ('"libvirt-qemu"', '"kvm"', "1")
    return conf


class Served:
    def __init__(self, uri: str, data_dir: Path) -> None:
        self.port = free_port()
        self.log = data_dir.parent / "server.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vmquota", "serve", "--hypervisor", uri, "--data-dir", str(data_dir),
                 "--listen", f"127.0.0.1:{self.port}", "--plain-http", "--anonymous-auth", "--authorization-mode",
                 "AlwaysAllow", "--api-processes", "1"], stdout=out, stderr=subprocess.STDOUT)
        self.client = Client(f"http://127.0.0.1:{self.port}")
        wait_until(lambda: b"vmquota serving on" in self.log.read_bytes() or self.process.poll() is not None,
                   timeout=30, what="the server to serve")
        assert self.process.poll() is None, self.log.read_text()

    def status(self, name: str) -> str:
        vm: dict[str, Any] = self.client.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/{name}")
        return str((vm.get("status") or {}).get("printableStatus"))

    def close(self) -> None:
        for vm in self.client.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines")["items"]:
            self.client.delete(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/{vm['metadata']['name']}")
        wait_until(lambda: not self.client.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines")["items"],
                   timeout=60, what="the VMs to be deleted")
        self.client.close()
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def host(unprivileged_conf: Path) -> Iterator[str]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm")
    with extra_host("ten-dac", qemu_conf=unprivileged_conf) as h:
        yield h.uri


def qemu_of(name: str) -> int:
    """The pid of the QEMU of VM `name` of this suite's namespace (no other daemon runs a domain of that name)."""
    wanted = f"guest=vmquota_{NS}_{name},".encode()
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if args and b"qemu-system" in args[0] and any(arg.startswith(wanted) for arg in args):
            return int(entry.name)
    raise AssertionError(f"no QEMU runs {name}")


def status_ids(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


def test_a_kvm_vm_runs_with_qemu_as_libvirt_qemu_and_its_disk_is_handed_back(host: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    disks.make_traversable(data_dir)  # pytest's /tmp/pytest-of-root is 0700
    server = Served(host, data_dir)
    try:
        server.client.post("/api/v1/namespaces", {"metadata": {"name": NS}})
        server.client.post(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines",
                           vm_manifest("web-1", cores=1, memory="128Mi", disk="1Gi"))
        server.client.put(action_path(NS, "web-1", "start"))
        wait_until(lambda: server.status("web-1") == "Running", timeout=60, what="web-1 to run")
        pid = qemu_of("web-1")
        assert status_ids(pid) == QEMU_IDS
        assert Path(f"/proc/{pid}/fd").exists() and any(os.readlink(fd) == "anon_inode:kvm-vm"
                                                        for fd in Path(f"/proc/{pid}/fd").iterdir())
        disk = next((data_dir / "disks" / NS).rglob("web-1-root.qcow2"))
        assert (disk.stat().st_uid, disk.stat().st_gid) == QEMU_IDS  # the DAC driver's chown
        server.client.put(action_path(NS, "web-1", "stop"))
        wait_until(lambda: server.status("web-1") == "Stopped", timeout=60, what="web-1 to stop")
        assert (disk.stat().st_uid, disk.stat().st_gid) == (0, 0)  # given back to root (remember_owner = 0)
    finally:
        server.close()


def test_a_data_dir_qemu_cannot_reach_fails_the_start_with_libvirts_reason(host: str, tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir()
    private.chmod(0o700)  # as pytest's and tempfile's own folders are
    disks.make_traversable(tmp_path)
    server = Served(host, private / "data")
    try:
        server.client.post("/api/v1/namespaces", {"metadata": {"name": NS}})
        server.client.post(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines",
                           vm_manifest("web-2", cores=1, memory="128Mi", disk="1Gi"))
        server.client.put(action_path(NS, "web-2", "start"))
        events = f"/api/v1/namespaces/{NS}/events"
        refused = wait_until(lambda: [e["message"] for e in server.client.get(events)["items"]
                                      if e["reason"] == "FailedCreate"], timeout=60, what="the start to fail")
        assert f"(as uid:{QEMU_IDS[0]}, gid:{QEMU_IDS[1]}): Permission denied" in refused[0], refused
        disks.make_traversable(private / "data")
        # The next try comes after the start's back-off (5 s, then longer after each failure).
        try:
            wait_until(lambda: server.status("web-2") == "Running", timeout=120, what="web-2 to run once reachable")
        except TimeoutError as e:
            raise AssertionError([(ev["reason"], ev["message"]) for ev in server.client.get(events)["items"]]) from e
    finally:
        server.close()
