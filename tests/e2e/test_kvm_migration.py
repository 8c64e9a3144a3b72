"""Live migration end to end on real KVM (issue 13): `vmquota serve` runs its VMs on one extra libvirt host of this
machine, a second (or third) one is a Node, and `vmquota migrate` moves a running VM there through libvirt's
peer-to-peer migration. Throughout, the quota's `used` is sampled: it must never double and never drop.

Shared storage is the same disk file seen by both hosts; local disks are a private folder of the target's over
the data dir's disks folder, so the migration copies them. The system libvirtd is not involved: every domain
lives on this test's own hosts, which are stopped (and their domains with them) whatever happens. Each test's hosts
are named after a tag of its own, as the driver tests' are: a fixed name would be one host for two pytest sessions,
and the first to end would stop the other's source under its running VM.
"""

from __future__ import annotations

import contextlib
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
    tag: str  # in the names of this test's hosts

    def host(self, role: str, private_dirs: tuple[Path, ...] = ()) -> contextlib.AbstractContextManager[ExtraHost]:
        return extra_host(f"mig-{self.tag}-{role}", private_dirs=private_dirs)

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


def vanished(r: Rig) -> str:
    """Why a migration failed when the test's own folders went away under it. A second pytest session given the
    same --basetemp removes that folder as it starts; the VM's disks and console log go with it, and the migration
    then fails on the target ("Failed to create file '.../console.log'", or the source's "bdrv_inactivate_all()
    failed" if it happens mid-way), which reads like a vmquota fault."""
    folder = r.data_dir / "disks" / r.ns
    if folder.is_dir():
        return ""
    return (f"\nNOTE: {folder} vanished during the test: was this session's --basetemp ({r.data_dir.parent.parent}) "
            f"used by another pytest session at the same time?")


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
    tag = uuid.uuid4().hex[:6]
    with extra_host(f"mig-{tag}-src") as source:
        server = Server(data_dir, args=("--hypervisor", source.uri, "--node-status-update-frequency", "1",
                                        "--node-monitor-grace-period", "3"))
        server.start()
        client = Client(server.url)
        ns = f"mig-{tag}"
        client.post("/api/v1/namespaces", {"metadata": {"name": ns}})
        r = Rig(server, client, source, data_dir, ns, tag)
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
    with rig.host("dst", private_dirs=private) as target:
        rig.add_node("dst", target, {"vmquota.io/local-storage": "true"} if storage == "local" else {})
        done, samples = migrate_and_sample(rig, "--to", "dst")
        assert done.returncode == 0, done.stderr + vanished(rig) + host_logs(target) + host_logs(rig.source)
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
    # The target sees an empty disks folder but is not said to have local storage: it does not see the VM's files,
    # which is said before libvirt is asked (libvirt's own words would be about the serial console's log file).
    with rig.host("bad", private_dirs=(rig.data_dir / "disks",)) as target:
        rig.add_node("bad", target)
        done, samples = migrate_and_sample(rig, "--to", "bad")
        assert done.returncode == 1 and "the migration of" in done.stderr and "failed" in done.stderr, vanished(rig)
        assert f"that host does not see the folder {rig.data_dir / 'disks' / rig.ns}/" in done.stderr, done.stderr
        assert "the hosts do not share this storage" in done.stderr
        assert runs_on(rig.source, domain) and not runs_on(target, domain)
        vm = rig.vm("web")
        assert vm["status"]["nodeName"] != "bad" and vm["status"]["printableStatus"] == "Running"
        assert all(s == before for s in samples) and rig.used() == before
        placed = rig.cli("describe", "node", "bad").stdout
        assert "  cpu:    0 /" in placed and "  memory: 0 /" in placed, placed  # the target's reservation released


def test_a_cancelled_migration_leaves_the_vm_running_on_its_host_with_its_charge(rig: Rig) -> None:
    """Deleting a VirtualMachineInstanceMigration mid-way cancels it (KubeVirt's cancel). The target node's
    bandwidth limit (1 MiB/s) makes the copy of 24 MiB of disk data take about 24 s, so the cancel comes while
    libvirt copies, not after."""
    rig.client.post(f"/api/v1/namespaces/{rig.ns}/resourcequotas", {"metadata": {"name": "compute"}, "spec": {
        "hard": {"limits.cpu": "1", "limits.memory": "64Mi", "requests.storage": "1Gi"}}})
    vm = rig.client.post(f"/apis/kubevirt.io/v1/namespaces/{rig.ns}/virtualmachines",
                         vm_manifest("web", cores=1, memory="64Mi", disk="1Gi", strategy="Halted"))
    disk = rig.data_dir / "disks" / rig.ns / vm["metadata"]["uid"] / "web-root.qcow2"
    wait_until(disk.exists, timeout=30, what="web's disk to be made")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 24M", str(disk)], check=True,
                   capture_output=True, timeout=60)  # data a storage copy must move (zeros it would skip)
    assert rig.cli("start", "web", "-n", rig.ns, "--wait").returncode == 0
    before = rig.used()
    domain = f"vmquota_{rig.ns}_web"
    source_node = rig.vm("web")["status"]["nodeName"]
    with rig.host("dst", private_dirs=(rig.data_dir / "disks",)) as target:
        rig.add_node("dst", target, {"vmquota.io/local-storage": "true", "vmquota.io/migration-bandwidth": "1Mi"})
        migrations = f"/apis/kubevirt.io/v1/namespaces/{rig.ns}/virtualmachineinstancemigrations"
        with Sampler(rig.server.url, lambda c: c.get(
                f"/api/v1/namespaces/{rig.ns}/resourcequotas/compute")["status"]["used"]) as sampler:
            rig.client.post(migrations, {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                                         "metadata": {"name": "move-web"}, "spec": {"vmiName": "web"}})
            # The incoming domain on the target: libvirt is copying now.
            wait_until(lambda: runs_on(target, domain), timeout=30, what="the incoming domain on the target")
            assert rig.vm("web")["status"]["printableStatus"] == "Migrating"
            rig.client.delete(f"{migrations}/move-web")
            wait_until(lambda: rig.vm("web")["status"]["printableStatus"] == "Running", timeout=30,
                       what="the cancelled migration to end")
        vm = rig.vm("web")
        assert vm["status"]["migrationState"]["abortStatus"] == "Succeeded", vm["status"]["migrationState"]
        assert vm["status"]["nodeName"] == source_node != "dst"
        assert runs_on(rig.source, domain) and not runs_on(target, domain)
        assert samples_unchanged(sampler.samples, before) and rig.used() == before
        placed = rig.cli("describe", "node", "dst").stdout
        assert "  cpu:    0 /" in placed and "  memory: 0 /" in placed, placed  # the target's reservation released
        half_copied = Path("/tmp/vmquota-hosts") / target.name / "private" / "0" / disk.relative_to(
            rig.data_dir / "disks")
        assert not half_copied.exists()  # the disk the copy began on the target was removed
        reasons = [e["reason"] for e in rig.client.get(f"/api/v1/namespaces/{rig.ns}/events")["items"]]
        assert "MigrationCancelled" in reasons and "Migrated" not in reasons
        assert rig.cli("stop", "web", "-n", rig.ns, "--wait").returncode == 0  # and it still obeys its owner


def samples_unchanged(samples: list[object], before: dict[str, str]) -> bool:
    return bool(samples) and all(s == before for s in samples)


def test_a_host_that_goes_down_keeps_its_vm_charged_until_confirmed_then_it_runs_once_elsewhere(rig: Rig) -> None:
    first = rig.client.get(NODES)["items"][0]["metadata"]["name"]
    rig.client.patch(f"{NODES}/{first}", {"spec": {"unschedulable": True}})  # the VM must go to "down"
    domain = f"vmquota_{rig.ns}_web"
    with rig.host("down") as down, rig.host("spare") as spare:
        rig.add_node("down", down)
        rig.add_node("spare", spare)
        rig.client.patch(f"{NODES}/spare", {"spec": {"unschedulable": True}})
        start_web(rig)
        assert rig.vm("web")["status"]["nodeName"] == "down"
        rig.client.patch(f"{NODES}/spare", {"spec": {"unschedulable": None}})
        before = rig.used()

        down.stop()  # the host goes away, its guest with it; vmquota cannot tell which
        wait_until(lambda: rig.vm("web")["status"].get("printableStatus") == "Unknown", timeout=30,
                   what="web to show Unknown once its node is NotReady")
        assert rig.used() == before  # still charged: it might run
        assert not runs_on(spare, domain)  # and never started a second time on a timeout
        refused = rig.cli("node", "confirm-down", "spare")
        assert refused.returncode == 1 and "is Ready" in refused.stderr

        done = rig.cli("node", "confirm-down", "down")
        assert done.returncode == 0, done.stderr
        wait_until(lambda: rig.vm("web")["status"].get("nodeName") == "spare" and
                   rig.vm("web")["status"].get("printableStatus") == "Running", timeout=60,
                   what="web to run again on the spare node")
        assert runs_on(spare, domain) and rig.used() == before  # once, and charged once
        rig.cli("delete", "vm", "web", "-n", rig.ns)
        wait_until(lambda: not runs_on(spare, domain), timeout=60, what="web's domain to be removed")

