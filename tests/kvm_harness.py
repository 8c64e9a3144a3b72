"""Real-KVM fixtures (a pytest plugin, see conftest.py): a `vmquota serve` subprocess on qemu:///system,
and a namespace to work in.

Each test runs its own server (a loopback port, its own data directory) and its own namespace; the
fixtures check that no domain and no disk file outlives the test.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import libvirt
import pytest
import yaml
from conftest import free_port, vm_manifest, wait_until

from vmquota import disks, quantity
from vmquota.client import Client, ClientError, action_path

URI = "qemu:///system"


class Server:
    """A `vmquota serve` process that can be killed and started again on the same data directory."""

    def __init__(self, data_dir: Path, *, args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        disks.make_traversable(data_dir)  # QEMU may run as libvirt-qemu, which must reach the disks below it
        self.args = args  # more `vmquota serve` options, such as --use-emulation
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / "server.log"

    def start(self) -> None:
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vmquota", "serve", "--hypervisor", URI, "--data-dir", str(self.data_dir),
                 "--listen", f"127.0.0.1:{self.port}", "--resync-interval", "2",
                 # plain HTTP, everyone allowed, as these tests predate tenants (kube-apiserver's own switches)
                 "--plain-http", "--anonymous-auth", "--authorization-mode", "AlwaysAllow", *self.args],
                stdout=log, stderr=subprocess.STDOUT)
        client = Client(self.url)
        try:
            wait_until(lambda: self._exited() or _answers(client), timeout=30, what="the server to answer")
        finally:
            client.close()
        if self._exited():
            raise RuntimeError(f"vmquota serve exited with {self.process.returncode}; its log ends with:\n"
                               + "\n".join(self.log.read_text(errors="replace").splitlines()[-10:]))

    def _exited(self) -> bool:
        """The server ended (it refuses to serve when, say, libvirtd does not answer)."""
        return self.process is not None and self.process.poll() is not None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def _answers(client: Client) -> bool:
    try:
        client.get("/api/v1/namespaces")
        return True
    except Exception:
        client.close()
        return False


class Kvm:
    def __init__(self, server: Server, namespace: str) -> None:
        self.server = server
        self.ns = namespace
        self.client = Client(server.url)
        self.conn = libvirt.open(URI)

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vmquota", "--server", self.server.url, *args],
                              capture_output=True, text=True, input=input, timeout=300, check=False)

    def ok(self, *args: str, input: str | None = None) -> str:
        done = self.cli(*args, input=input)
        assert done.returncode == 0, f"vmquota {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def used(self, quota: str = "compute") -> dict[str, str]:
        return dict(self.client.get(f"/api/v1/namespaces/{self.ns}/resourcequotas/{quota}")["status"]["used"])

    def domain(self, name: str) -> Any:
        return self.conn.lookupByName(f"vmquota_{self.ns}_{name}")

    def wait_disks_ready(self, name: str, namespace: str | None = None) -> None:
        """Until the controller's first look at a new VM has made its disks: after that the VM stands still."""
        path = f"/apis/kubevirt.io/v1/namespaces/{namespace or self.ns}/virtualmachines/{name}"
        wait_until(lambda: any(c["type"] == "DataVolumesReady" and c["status"] == "True"
                               for c in self.client.get(path).get("status", {}).get("conditions", [])),
                   timeout=30, what=f"{name}'s disks to be made")

    def running_domains(self) -> list[Any]:
        prefix = f"vmquota_{self.ns}_"
        return [d for d in self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                if d.name().startswith(prefix)]

    def truth(self) -> dict[str, Decimal]:
        """What the namespace's quota must show, computed from libvirt and the VM list alone."""
        cpus = sum(Decimal(d.info()[3]) for d in self.running_domains())
        memory = sum(Decimal(d.info()[1]) * 1024 for d in self.running_domains())
        vms = self.client.get(f"/apis/kubevirt.io/v1/namespaces/{self.ns}/virtualmachines")["items"]
        storage = sum(quantity.parse(t["spec"]["storage"]["resources"]["requests"]["storage"])
                      for vm in vms for t in vm["spec"].get("dataVolumeTemplates", []))
        return {"limits.cpu": cpus, "limits.memory": memory, "requests.storage": Decimal(storage),
                "count/virtualmachines.kubevirt.io": Decimal(len(vms))}

    def assert_used_is_truth(self) -> None:
        used = {k: quantity.parse(v) for k, v in self.used().items()}
        assert used == {k: v for k, v in self.truth().items() if k in used}

    def close(self) -> None:
        for vm in self.client.get(f"/apis/kubevirt.io/v1/namespaces/{self.ns}/virtualmachines")["items"]:
            name = vm["metadata"]["name"]
            with contextlib.suppress(ClientError):  # 409 when not running: nothing to force off
                # Forced off first: a guest that ignores ACPI would hold its delete for its whole grace period.
                self.client.put(action_path(self.ns, name, "stop"), {"gracePeriod": 0})
            self.cli("delete", "vm", name, "-n", self.ns)
        wait_until(lambda: not self.running_domains(), timeout=60, what="every domain to be gone")
        leftovers = [d.name() for d in self.conn.listAllDomains() if d.name().startswith(f"vmquota_{self.ns}_")]
        assert leftovers == []
        self.client.close()
        self.conn.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "data")
    s.start()
    try:
        yield s
    finally:
        s.stop()
        disks = tmp_path / "data" / "disks"
        assert not disks.exists() or not any(disks.rglob("*.qcow2")), "disk files left behind"


@contextlib.contextmanager
def namespace_on(server: Server, prefix: str) -> Iterator[Kvm]:
    """A fresh namespace on `server`; every VM left in it is forced off and deleted afterwards."""
    k = Kvm(server, f"{prefix}-{uuid.uuid4().hex[:8]}")
    k.ok("apply", "-f", "-", input=yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace",
                                                   "metadata": {"name": k.ns}}))
    try:
        yield k
    finally:
        k.close()


@pytest.fixture
def kvm(server: Server) -> Iterator[Kvm]:
    with namespace_on(server, "kvm") as k:
        yield k


def quota_doc(ns: str, hard: dict[str, str]) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "ResourceQuota",
                           "metadata": {"name": "compute", "namespace": ns}, "spec": {"hard": hard}})


def apply_vm(kvm: Kvm, name: str, **kwargs: Any) -> None:
    manifest = vm_manifest(name, **kwargs)
    manifest["metadata"]["namespace"] = kvm.ns
    kvm.ok("apply", "-f", "-", input=yaml.safe_dump(manifest))
