"""End to end on real KVM: the issue's acceptance, through the CLI and HTTP API of a `vmquota serve` process.

Each test runs its own server (a subprocess on a loopback port, qemu:///system, its own data directory)
and its own namespace; it checks usage against what libvirt really runs, and removes every VM it made.
The guests have no operating system: QEMU boots into the BIOS and runs, which is all a quota needs.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import libvirt
import pytest
import yaml

from vmquota import quantity
from vmquota.client import Client, ClientError, action_path

from conftest import vm_manifest, wait_until

pytestmark = pytest.mark.kvm
URI = "qemu:///system"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A `vmquota serve` process that can be killed and started again on the same data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / "server.log"

    def start(self) -> None:
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vmquota", "serve", "--hypervisor", URI, "--data-dir", str(self.data_dir),
                 "--listen", f"127.0.0.1:{self.port}", "--resync-interval", "2"],
                stdout=log, stderr=subprocess.STDOUT)
        client = Client(self.url)
        try:
            wait_until(lambda: _answers(client), timeout=30, what="the server to answer")
        finally:
            client.close()

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
            self.cli("delete", "vm", vm["metadata"]["name"], "-n", self.ns)
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


@pytest.fixture
def kvm(server: Server) -> Iterator[Kvm]:
    k = Kvm(server, f"kvm-{uuid.uuid4().hex[:8]}")
    k.ok("apply", "-f", "-", input=yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace",
                                                   "metadata": {"name": k.ns}}))
    try:
        yield k
    finally:
        k.close()


def quota_doc(ns: str, hard: dict[str, str]) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "ResourceQuota",
                           "metadata": {"name": "compute", "namespace": ns}, "spec": {"hard": hard}})


def apply_vm(kvm: Kvm, name: str, **kwargs: Any) -> None:
    manifest = vm_manifest(name, **kwargs)
    manifest["metadata"]["namespace"] = kvm.ns
    kvm.ok("apply", "-f", "-", input=yaml.safe_dump(manifest))


def test_acceptance_cycle_usage_follows_what_libvirt_runs(kvm: Kvm) -> None:
    kvm.ok("apply", "-f", "-", input=quota_doc(kvm.ns, {
        "limits.cpu": "4", "limits.memory": "4Gi", "requests.storage": "20Gi",
        "count/virtualmachines.kubevirt.io": "3"}))
    apply_vm(kvm, "web", cores=2, memory="2Gi", disk="5Gi")
    assert kvm.used() == {"limits.cpu": "0", "limits.memory": "0", "requests.storage": "5Gi",
                          "count/virtualmachines.kubevirt.io": "1"}
    kvm.assert_used_is_truth()
    for _ in range(3):
        kvm.ok("start", "web", "-n", kvm.ns, "--wait")
        assert kvm.used()["limits.cpu"] == "2" and kvm.used()["limits.memory"] == "2Gi"
        kvm.assert_used_is_truth()
        kvm.ok("stop", "web", "-n", kvm.ns, "--wait")
        assert kvm.used()["limits.cpu"] == "0" and kvm.used()["limits.memory"] == "0"
        kvm.assert_used_is_truth()
        kvm.ok("start", "web", "-n", kvm.ns, "--wait")
        kvm.ok("clone", "web", "web-copy", "-n", kvm.ns, "--wait")  # a live, crash-consistent copy
        assert kvm.used() == {"limits.cpu": "2", "limits.memory": "2Gi", "requests.storage": "10Gi",
                              "count/virtualmachines.kubevirt.io": "2"}
        kvm.assert_used_is_truth()
        kvm.ok("delete", "vm", "web-copy", "-n", kvm.ns)
        kvm.assert_used_is_truth()
        kvm.ok("stop", "web", "-n", kvm.ns, "--wait")
    kvm.ok("delete", "vm", "web", "-n", kvm.ns)
    assert kvm.used() == {"limits.cpu": "0", "limits.memory": "0", "requests.storage": "0",
                          "count/virtualmachines.kubevirt.io": "0"}


def test_a_clone_boots_from_its_own_copy(kvm: Kvm) -> None:
    apply_vm(kvm, "src", cores=1, memory="256Mi", disk="1Gi")
    kvm.ok("start", "src", "-n", kvm.ns, "--wait")
    kvm.ok("clone", "src", "dst", "-n", kvm.ns, "--start", "--wait")
    xml = kvm.domain("dst").XMLDesc()
    src_uid = kvm.client.get(f"/apis/kubevirt.io/v1/namespaces/{kvm.ns}/virtualmachines/src")["metadata"]["uid"]
    assert src_uid not in xml and "dst-root.qcow2" in xml
    disk = next(kvm.server.data_dir.rglob("dst-root.qcow2"))
    info = subprocess.run(["qemu-img", "check", "-U", str(disk)], capture_output=True, text=True, check=False)
    assert info.returncode == 0, info.stdout + info.stderr


def test_a_start_over_quota_is_refused_in_kubernetes_words_and_changes_nothing(kvm: Kvm) -> None:
    kvm.ok("apply", "-f", "-", input=quota_doc(kvm.ns, {"limits.cpu": "2", "limits.memory": "4Gi"}))
    apply_vm(kvm, "a", cores=2, memory="1Gi", disk="1Gi")
    apply_vm(kvm, "b", cores=1, memory="1Gi", disk="1Gi")
    kvm.ok("start", "a", "-n", kvm.ns, "--wait")
    before = kvm.client.get(f"/apis/kubevirt.io/v1/namespaces/{kvm.ns}/virtualmachines/b")
    refused = kvm.cli("start", "b", "-n", kvm.ns, "--wait")
    assert refused.returncode == 1
    assert ('exceeded quota: compute, requested: limits.cpu=1, used: limits.cpu=2, limited: limits.cpu=2'
            in refused.stderr)
    assert kvm.client.get(f"/apis/kubevirt.io/v1/namespaces/{kvm.ns}/virtualmachines/b") == before
    assert [d.name() for d in kvm.running_domains()] == [f"vmquota_{kvm.ns}_a"]
    kvm.assert_used_is_truth()


def test_restart_with_the_quota_exactly_full_succeeds(kvm: Kvm) -> None:
    kvm.ok("apply", "-f", "-", input=quota_doc(kvm.ns, {"limits.cpu": "2", "limits.memory": "1Gi"}))
    apply_vm(kvm, "a", cores=2, memory="1Gi", disk="1Gi")
    kvm.ok("start", "a", "-n", kvm.ns, "--wait")
    first = kvm.domain("a").ID()
    kvm.ok("restart", "a", "-n", kvm.ns, "--wait")
    assert kvm.domain("a").ID() != first  # a new QEMU process
    assert kvm.used() == {"limits.cpu": "2", "limits.memory": "1Gi"}


def test_a_domain_destroyed_behind_vmquotas_back_shows_in_usage_within_two_seconds(kvm: Kvm) -> None:
    kvm.ok("apply", "-f", "-", input=quota_doc(kvm.ns, {"limits.cpu": "4"}))
    apply_vm(kvm, "a", cores=2, memory="512Mi", disk=None, strategy="Manual")
    kvm.ok("start", "a", "-n", kvm.ns, "--wait")
    kvm.domain("a").destroy()
    wait_until(lambda: kvm.used() == {"limits.cpu": "0"}, timeout=2, what="usage to drop")


def test_sigkill_and_restart_lose_nothing_and_start_nothing_twice(kvm: Kvm) -> None:
    kvm.ok("apply", "-f", "-", input=quota_doc(kvm.ns, {"limits.cpu": "4", "limits.memory": "4Gi"}))
    apply_vm(kvm, "keep", cores=1, memory="512Mi", disk="1Gi", strategy="Always")
    apply_vm(kvm, "lost", cores=1, memory="512Mi", disk="1Gi", strategy="Manual")
    kvm.ok("start", "lost", "-n", kvm.ns, "--wait")
    wait_until(lambda: "Running" in kvm.ok("get", "vm", "keep", "-n", kvm.ns), timeout=30, what="keep to run")
    keep_id = kvm.domain("keep").ID()
    kvm.server.kill()
    kvm.domain("lost").destroy()  # dies while vmquota is down
    kvm.server.start()
    wait_until(lambda: kvm.used() == {"limits.cpu": "1", "limits.memory": "512Mi"}, timeout=10,
               what="the recount to release the lost VM")
    assert kvm.domain("keep").ID() == keep_id  # the same QEMU: not started twice
    assert len(kvm.running_domains()) == 1
    kvm.assert_used_is_truth()
    assert "Stopped" in kvm.ok("get", "vm", "lost", "-n", kvm.ns)


def test_concurrent_starts_for_the_last_bit_of_quota_never_exceed_hard(kvm: Kvm) -> None:
    kvm.ok("apply", "-f", "-", input=quota_doc(kvm.ns, {"limits.cpu": "3"}))
    names = [f"c{i}" for i in range(8)]
    for name in names:
        apply_vm(kvm, name, cores=1, memory="128Mi", disk=None)
    samples: list[Decimal] = []
    done = threading.Event()

    def sample() -> None:
        client = Client(kvm.server.url)
        while not done.is_set():
            samples.append(quantity.parse(client.get(
                f"/api/v1/namespaces/{kvm.ns}/resourcequotas/compute")["status"]["used"]["limits.cpu"]))
        client.close()

    results: list[int] = []
    barrier = threading.Barrier(len(names))

    def start(name: str) -> None:
        client = Client(kvm.server.url)
        barrier.wait()
        try:
            client.put(action_path(kvm.ns, name, "start"))
            results.append(202)
        except ClientError as e:
            results.append(e.code)
        finally:
            client.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=start, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_until(lambda: len(kvm.running_domains()) == 3, timeout=30, what="three domains to run")
    time.sleep(1)  # let anything wrongly admitted show up in libvirt, too
    done.set()
    sampler.join()
    assert sorted(results) == [202] * 3 + [403] * 5
    assert max(samples) <= 3
    assert len(kvm.running_domains()) == 3
    assert kvm.used() == {"limits.cpu": "3"}

