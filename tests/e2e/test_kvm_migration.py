"""Live migration end to end on real KVM (issue 13): `vmquota serve` runs its VMs on one extra libvirt host of this
machine, a second (or third) one is a Node, and `vmquota migrate` moves a running VM there through libvirt's
peer-to-peer migration. Throughout, the quota's `used` is sampled: it must never double and never drop.

Shared storage is the same disk file seen by both hosts; local disks are a private folder of the target's over
the data dir's disks folder, so the migration copies them. The system libvirtd is not involved: every domain
lives on this test's own hosts, which are stopped (and their domains with them) whatever happens.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest
from conftest import Sampler, vm_manifest, wait_until
from hosts_harness import ExtraHost, extra_host
from kvm_harness import Server

from vmquota.client import Client

pytestmark = pytest.mark.kvm

NODES = "/api/v1/nodes"


@dataclass
class Rig:
    server: Server
    client: Client
    source: ExtraHost
    data_dir: Path
    ns: str

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vmquota", "--server", self.server.url, *args],
                              capture_output=True, text=True, timeout=300, check=False)

    def add_node(self, name: str, host: ExtraHost, annotations: dict[str, str] | None = None) -> None:
        self.client.post(NODES, {"metadata": {"name": name, "annotations": annotations or {}},
                                 "spec": {"providerID": host.uri}})
        wait_until(lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in
                               self.client.get(f"{NODES}/{name}").get("status", {}).get("conditions", [])),
                   timeout=30, what=f"node {name} to be Ready")

    def vm(self, name: str) -> dict[str, Any]:
        return self.client.get(f"/apis/kubevirt.io/v1/namespaces/{self.ns}/virtualmachines/{name}")

    def used(self) -> dict[str, str]:
        return dict(self.client.get(f"/api/v1/namespaces/{self.ns}/resourcequotas/compute")["status"]["used"])


def host_logs(host: ExtraHost) -> str:
    """The host's libvirtd and QEMU logs, for a failure's message."""
    root = Path("/tmp/vmquota-hosts") / host.name / "log"
    return "".join(f"\n== {f}\n{f.read_text(errors='replace')[-3000:]}" for f in sorted(root.rglob("*.log")))


def runs_on(host: ExtraHost, domain: str) -> bool:
    conn = libvirt.open(host.uri)
    try:
        return any(d.name() == domain for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
    finally:
        conn.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    data_dir = tmp_path / "data"
    (data_dir / "disks").mkdir(parents=True)
    with extra_host("mig-src") as source:
        server = Server(data_dir, args=("--hypervisor", source.uri, "--node-status-update-frequency", "1"))
        server.start()
        client = Client(server.url)
        ns = f"mig-{uuid.uuid4().hex[:6]}"
        client.post("/api/v1/namespaces", {"metadata": {"name": ns}})
        r = Rig(server, client, source, data_dir, ns)
        try:
            yield r
        finally:
            for vm in client.get(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines")["items"]:
                r.cli("delete", "vm", vm["metadata"]["name"], "-n", ns)
            client.close()
            server.stop()


def start_web(r: Rig) -> None:
    r.client.post(f"/api/v1/namespaces/{r.ns}/resourcequotas", {"metadata": {"name": "compute"}, "spec": {
        "hard": {"limits.cpu": "1", "limits.memory": "64Mi", "requests.storage": "1Gi"}}})  # exactly full
    r.client.post(f"/apis/kubevirt.io/v1/namespaces/{r.ns}/virtualmachines",
                  vm_manifest("web", cores=1, memory="64Mi", disk="1Gi", strategy="Always"))
    wait_until(lambda: r.vm("web").get("status", {}).get("printableStatus") == "Running", timeout=60,
               what="web to run")


def migrate_and_sample(r: Rig, *args: str) -> tuple[subprocess.CompletedProcess[str], list[object]]:
    with Sampler(r.server.url, lambda c: c.get(
            f"/api/v1/namespaces/{r.ns}/resourcequotas/compute")["status"]["used"]) as sampler:
        done = r.cli("migrate", "web", "-n", r.ns, *args, "--wait", "--timeout", "120")
    return done, sampler.samples


@pytest.mark.parametrize("storage", ["shared", "local"])
def test_a_running_vm_moves_to_another_host_charged_exactly_once(rig: Rig, storage: str) -> None:
    start_web(rig)
    before = rig.used()
    domain = f"vmquota_{rig.ns}_web"
    private = (rig.data_dir / "disks",) if storage == "local" else ()
    with extra_host("mig-dst", private_dirs=private) as target:
        rig.add_node("dst", target, {"vmquota.io/local-storage": "true"} if storage == "local" else {})
        done, samples = migrate_and_sample(rig, "--to", "dst")
        assert done.returncode == 0, done.stderr + host_logs(target) + host_logs(rig.source)
        assert done.stdout == "VM web migrated to node dst\n"
        assert runs_on(target, domain) and not runs_on(rig.source, domain)
        vm = rig.vm("web")
        assert vm["status"]["nodeName"] == "dst" and vm["status"]["printableStatus"] == "Running"
        assert samples and all(s == before for s in samples), "used moved during the migration"
        assert rig.used() == before
        vmi = rig.client.get(f"/apis/kubevirt.io/v1/namespaces/{rig.ns}/virtualmachineinstances/web")
        assert vmi["status"]["nodeName"] == "dst"
        assert vmi["status"]["migrationState"]["sourceNode"] != "dst"
        rig.cli("delete", "vm", "web", "-n", rig.ns)  # while its host still runs
        wait_until(lambda: not runs_on(target, domain), timeout=60, what="the migrated domain to be removed")


def test_a_failed_migration_leaves_the_vm_running_on_its_host_with_its_charge(rig: Rig) -> None:
    start_web(rig)
    before = rig.used()
    domain = f"vmquota_{rig.ns}_web"
    # The target sees an empty disks folder but is not said to have local storage: its QEMU finds no disk.
    with extra_host("mig-bad", private_dirs=(rig.data_dir / "disks",)) as target:
        rig.add_node("bad", target)
        done, samples = migrate_and_sample(rig, "--to", "bad")
        assert done.returncode == 1 and "the migration of" in done.stderr and "failed" in done.stderr
        assert runs_on(rig.source, domain) and not runs_on(target, domain)
        vm = rig.vm("web")
        assert vm["status"]["nodeName"] != "bad" and vm["status"]["printableStatus"] == "Running"
        assert all(s == before for s in samples) and rig.used() == before
        placed = rig.cli("describe", "node", "bad").stdout
        assert "  cpu:    0 /" in placed and "  memory: 0 /" in placed, placed  # the target's reservation released
