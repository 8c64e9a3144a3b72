"""A VM's lifecycle on the simulated host: usage follows every state change, whoever caused it."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest
from conftest import HOST, Cluster, events_path, vm_manifest, wait_until

from vmquota.client import ClientError
from vmquota.controller import bring_stop_nearer
from vmquota.objects import VIRTUAL_MACHINE

QUOTA = {"limits.cpu": "4", "limits.memory": "4Gi", "requests.storage": "20Gi",
         "count/virtualmachines.kubevirt.io": "3", "requests.instances/vmi": "2"}
ZERO_COMPUTE = {"limits.cpu": "0", "limits.memory": "0", "requests.instances/vmi": "0"}


def compute(used: dict[str, str]) -> dict[str, str]:
    return {k: used[k] for k in ("limits.cpu", "limits.memory", "requests.instances/vmi")}


@pytest.fixture
def quota(cluster: Cluster) -> Cluster:
    cluster.create_quota(QUOTA)
    return cluster


def test_start_charges_compute_and_stop_releases_it(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1"))
    assert compute(quota.used()) == ZERO_COMPUTE
    quota.action("web-1", "start")
    assert compute(quota.used()) == {"limits.cpu": "2", "limits.memory": "2Gi", "requests.instances/vmi": "1"}
    quota.wait_status("web-1", "Running")
    assert quota.vm("web-1")["status"]["ready"] is True
    quota.action("web-1", "stop")
    quota.wait_status("web-1", "Stopped")
    assert compute(quota.used()) == ZERO_COMPUTE
    assert quota.used()["requests.storage"] == "5Gi"


def test_start_turns_halted_into_always_and_stop_back(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1"))
    quota.action("web-1", "start")
    assert quota.vm("web-1")["spec"]["runStrategy"] == "Always"
    quota.wait_status("web-1", "Running")
    quota.action("web-1", "stop")
    assert quota.vm("web-1")["spec"]["runStrategy"] == "Halted"


def test_spec_running_is_flipped_by_start_and_stop(quota: Cluster) -> None:
    manifest = vm_manifest("web-1")
    del manifest["spec"]["runStrategy"]
    manifest["spec"]["running"] = False
    quota.create_vm(manifest)
    quota.action("web-1", "start")
    assert quota.vm("web-1")["spec"]["running"] is True
    quota.wait_status("web-1", "Running")
    quota.action("web-1", "stop")
    assert quota.vm("web-1")["spec"]["running"] is False


def test_starting_a_running_vm_is_a_conflict_and_charges_nothing_more(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1"))
    quota.action("web-1", "start")
    before = quota.used()
    with pytest.raises(ClientError) as refused:
        quota.action("web-1", "start")
    assert refused.value.code == 409 and "already running" in refused.value.message
    assert quota.used() == before


def test_stopping_a_stopped_vm_is_a_conflict(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1"))
    with pytest.raises(ClientError) as refused:
        quota.action("web-1", "stop")
    assert refused.value.code == 409 and "not running" in refused.value.message


def test_restart_keeps_the_charge_and_needs_no_room(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("a", cores=2, memory="2Gi"))
    quota.create_vm(vm_manifest("b", cores=2, memory="2Gi"))
    quota.action("a", "start")
    quota.action("b", "start")
    quota.wait_status("a", "Running")
    full = quota.used()
    assert full["limits.cpu"] == "4" and full["limits.memory"] == "4Gi"  # exactly full
    quota.action("a", "restart")
    quota.settle()
    quota.wait_status("a", "Running")
    assert quota.used() == full
    events = [e["reason"] for e in quota.client.get(f"/api/v1/namespaces/{quota.ns}/events")["items"]
              if e["involvedObject"]["name"] == "a"]
    assert "RestartRequested" in events and "FailedCreate" not in events


def test_restart_of_a_stopped_vm_is_a_conflict(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1"))
    with pytest.raises(ClientError) as refused:
        quota.action("web-1", "restart")
    assert refused.value.code == 409


def test_domain_destroyed_behind_vmquotas_back_is_released_at_once(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1", strategy="Manual"))
    quota.action("web-1", "start")
    quota.wait_status("web-1", "Running")
    quota.domain("web-1").destroy()
    wait_until(lambda: compute(quota.used()) == ZERO_COMPUTE, timeout=2, what="usage to drop")
    vm = quota.vm("web-1")
    assert vm["status"]["printableStatus"] == "Stopped"
    assert vm["status"]["lastExit"] == "Destroyed"


def test_always_restarts_a_killed_vm_and_admits_it_again(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1", strategy="Always"))
    quota.wait_status("web-1", "Running")
    quota.domain("web-1").destroy()
    wait_until(lambda: quota.domain("web-1").isActive(), timeout=5, what="the VM to run again")
    quota.wait_status("web-1", "Running")
    assert compute(quota.used())["limits.cpu"] == "2"


def test_rerun_on_failure_stays_off_after_a_guest_shutdown(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1", strategy="RerunOnFailure"))
    quota.wait_status("web-1", "Running")
    quota.domain("web-1").shutdown()  # the simulated guest powers itself off
    quota.wait_status("web-1", "Stopped")
    quota.settle()
    assert quota.status("web-1") == "Stopped"
    assert quota.vm("web-1")["status"]["lastExit"] == "GuestShutdown"
    assert compute(quota.used()) == ZERO_COMPUTE


def test_rerun_on_failure_restarts_after_a_failure(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1", strategy="RerunOnFailure"))
    quota.wait_status("web-1", "Running")
    quota.domain("web-1").destroy()
    wait_until(lambda: quota.domain("web-1").isActive(), timeout=5, what="the VM to run again")


def test_manual_never_restarts_by_itself(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1", strategy="Manual"))
    quota.settle()
    assert quota.status("web-1") == "Stopped"  # Manual does not start at creation
    quota.action("web-1", "start")
    quota.wait_status("web-1", "Running")
    quota.domain("web-1").destroy()
    quota.wait_status("web-1", "Stopped")
    quota.settle()
    assert quota.status("web-1") == "Stopped"
    assert quota.vm("web-1")["spec"]["runStrategy"] == "Manual"


def test_a_domain_off_again_before_vmquota_looks_is_an_exit_not_a_start_to_retry(
        quota: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest (or QEMU) that dies between libvirt's start and vmquota's first look ran: Manual leaves it off."""
    hypervisor = quota.app.controller.hypervisor
    starts: list[str] = []
    real_start = hypervisor.start

    def start_then_die(namespace: str, name: str, uid: str, xml: str) -> None:
        real_start(namespace, name, uid, xml)
        starts.append(name)
        quota.domain(name).destroy()  # gone before the controller's next call to libvirt

    monkeypatch.setattr(hypervisor, "start", start_then_die)
    quota.create_vm(vm_manifest("web-1", strategy="Manual"))
    quota.action("web-1", "start")
    quota.wait_status("web-1", "Stopped")
    quota.settle()
    assert starts == ["web-1"]
    assert quota.vm("web-1")["status"]["lastExit"] == "Destroyed"
    assert compute(quota.used()) == ZERO_COMPUTE
    assert {"Started", "Crashed"} <= {e["reason"] for e in quota.client.get(events_path(quota.ns))["items"]
                                      if e["involvedObject"]["name"] == "web-1"}


def test_once_runs_once(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("job", strategy="Once"))
    quota.wait_status("job", "Running")
    quota.domain("job").shutdown()
    quota.wait_status("job", "Stopped")
    quota.settle()
    assert quota.status("job") == "Stopped"


def test_a_crash_loop_backs_off(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("flaky", strategy="Always"))
    quota.wait_status("flaky", "Running")
    quota.domain("flaky").destroy()  # first failure: restarted at once
    wait_until(lambda: quota.domain("flaky").isActive() and quota.status("flaky") == "Running", timeout=5,
               what="the first restart")
    quota.domain("flaky").destroy()  # fails again within a minute: back-off
    quota.wait_status("flaky", "CrashLoopBackOff")
    vm = quota.vm("flaky")
    assert vm["status"]["startFailure"]["consecutiveFailCount"] == 2
    assert compute(quota.used()) == ZERO_COMPUTE  # waiting to restart holds no runtime


def test_domain_started_behind_vmquotas_back_is_charged(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1", strategy="Manual"))
    quota.action("web-1", "start")
    quota.wait_status("web-1", "Running")
    quota.action("web-1", "stop")
    quota.wait_status("web-1", "Stopped")
    quota.domain("web-1").create()  # someone starts the defined domain with virsh
    wait_until(lambda: compute(quota.used())["limits.cpu"] == "2", timeout=2, what="usage to rise")
    assert quota.status("web-1") == "Running"
    reasons = [e["reason"] for e in quota.client.get(f"/api/v1/namespaces/{quota.ns}/events")["items"]]
    assert "StartedOutsideVmquota" in reasons


def test_delete_stops_the_vm_and_removes_domain_and_disks(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1"))
    quota.action("web-1", "start")
    quota.wait_status("web-1", "Running")
    uid = quota.vm("web-1")["metadata"]["uid"]
    disk_dir = quota.app.controller.disks.vm_dir(quota.ns, uid)
    assert (disk_dir / "web-1-root.qcow2").exists()
    quota.delete_vm("web-1")
    assert quota.used() == {k: "0" for k in QUOTA}
    assert not disk_dir.exists()
    with pytest.raises(libvirt.libvirtError):
        quota.domain("web-1")


def test_stop_waits_for_the_guest_then_forces_it_off(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1", grace=30))
    quota.action("web-1", "start")
    quota.wait_status("web-1", "Running")
    quota.action("web-1", "stop")  # the simulated guest honours the ACPI shutdown at once
    quota.wait_status("web-1", "Stopped")
    assert quota.vm("web-1")["status"].get("lastExit") is None  # asked for: not an unexpected exit
    assert compute(quota.used()) == ZERO_COMPUTE


def test_a_grace_period_sent_with_a_stop_holds_for_that_stop_only(quota: Cluster,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`stop {"gracePeriod": 0}` of a VM with no domain to stop must not make its next plain stop a forced one."""
    foreign = HOST.defineXML(f"<domain type='test'><name>vmquota_{quota.ns}_web-1</name><memory>65536</memory>"
                             "<vcpu>1</vcpu><os><type>hvm</type></os></domain>")
    foreign.create()
    try:
        quota.create_vm(vm_manifest("web-1", grace=30))
        quota.action("web-1", "start")
        quota.wait_status("web-1", "CrashLoopBackOff")  # a domain vmquota did not make holds its name
        quota.action("web-1", "stop", body={"gracePeriod": 0})
        quota.wait_status("web-1", "Stopped")
    finally:
        foreign.destroy()
        foreign.undefine()
    hypervisor = quota.app.controller.hypervisor
    asked: list[str] = []
    real_shutdown = hypervisor.shutdown

    def shutdown(namespace: str, name: str, uid: str) -> None:
        asked.append(name)
        real_shutdown(namespace, name, uid)

    monkeypatch.setattr(hypervisor, "shutdown", shutdown)
    quota.action("web-1", "start")
    quota.wait_status("web-1", "Running")
    quota.action("web-1", "stop")
    quota.wait_status("web-1", "Stopped")
    assert asked == ["web-1"]  # the guest was asked to shut down, as its 30 s grace period says: not forced


def test_a_stop_keeps_its_deadline_in_the_vm_and_a_forced_stop_brings_it_nearer(
        quota: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline is the VM's (any API process, or a restarted server, sees it); a later `gracePeriod: 0`
    forces off a guest that ignores the first stop's request, without waiting out its grace."""
    quota.create_vm(vm_manifest("web-1", grace=600))
    quota.action("web-1", "start")
    quota.wait_status("web-1", "Running")
    monkeypatch.setattr(quota.app.controller.hypervisor, "shutdown", lambda namespace, name, uid: None)  # deaf guest
    asked_at = time.time()
    quota.action("web-1", "stop")
    wait_until(lambda: "stopDeadline" in quota.vm("web-1")["status"], timeout=10, what="the guest to be asked")
    status = quota.vm("web-1")["status"]
    assert status["printableStatus"] == "Stopping"
    assert asked_at + 600 <= status["stopDeadline"] <= time.time() + 600
    assert compute(quota.used()) != ZERO_COMPUTE  # still charged: the hypervisor has not confirmed it off
    quota.action("web-1", "stop", body={"gracePeriod": 0})
    quota.wait_status("web-1", "Stopped")
    status = quota.vm("web-1")["status"]
    assert "stopDeadline" not in status and "stopGracePeriodSeconds" not in status
    assert compute(quota.used()) == ZERO_COMPUTE


def test_a_forced_stop_is_confirmed_without_waiting_for_libvirts_event(quota: Cluster,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirt's destroy returns once the domain is off, so the charge ends then, even if the event is lost."""
    quota.create_vm(vm_manifest("web-1", grace=0))
    quota.action("web-1", "start")
    quota.wait_status("web-1", "Running")
    monkeypatch.setattr(quota.app.controller.hypervisor, "_on_event", None)  # lifecycle events are lost from now
    quota.action("web-1", "stop")
    quota.wait_status("web-1", "Stopped")  # the recount, the other way to find out, runs only hourly here
    assert compute(quota.used()) == ZERO_COMPUTE


def test_a_stop_never_moves_its_end_further() -> None:
    status: dict[str, Any] = {}
    bring_stop_nearer(status, 30, now=1000.0)
    bring_stop_nearer(status, 600, now=1001.0)
    assert status == {"stopGracePeriodSeconds": 30}  # not asked yet: the shortest grace wins
    status = {"stopDeadline": 1030.0}
    bring_stop_nearer(status, 600, now=1010.0)
    assert status == {"stopDeadline": 1030.0}
    bring_stop_nearer(status, 0, now=1010.0)
    assert status == {"stopDeadline": 1010.0}


def test_foreign_domains_are_never_touched(quota: Cluster) -> None:
    conn = HOST
    foreign_xml = (f"<domain type='test'><name>vmquota_{quota.ns}_intruder</name><memory>65536</memory>"
                   "<vcpu>1</vcpu><os><type>hvm</type></os></domain>")
    foreign = conn.defineXML(foreign_xml)
    foreign.create()
    try:
        quota.create_vm(vm_manifest("intruder"))
        quota.action("intruder", "start")
        quota.wait_status("intruder", "CrashLoopBackOff")  # Always: retried later, with a back-off
        failure = [c for c in quota.vm("intruder")["status"]["conditions"] if c["type"] == "Failure"]
        assert failure[0]["reason"] == "FailedCreate"
        assert "vmquota did not create" in failure[0]["message"]
        assert compute(quota.used()) == ZERO_COMPUTE
        quota.app.controller.resync()
        quota.delete_vm("intruder")
        assert foreign.isActive()  # still running, still defined
        assert conn.lookupByName("test").isActive()  # libvirt's own sample domain, untouched
    finally:
        foreign.destroy()
        foreign.undefine()


def queued_by_a_recount(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The VMs one full recount queues for the controller to look at."""
    queued: list[tuple[str, str]] = []
    add = cluster.app.controller.queue.add
    with monkeypatch.context() as patch:
        patch.setattr(cluster.app.controller.queue, "add", lambda key, **kw: (queued.append(key), add(key, **kw)))
        assert cluster.app.controller.resync() == []
    return queued


def test_a_recount_of_settled_vms_queues_nothing(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster.create_vm(vm_manifest("web-1", strategy="Always"))
    cluster.create_vm(vm_manifest("web-2", strategy="Manual"))
    cluster.create_vm(vm_manifest("job", strategy="RerunOnFailure"))
    cluster.action("web-2", "start")
    for name in ("web-1", "web-2", "job"):
        cluster.wait_status(name, "Running")
    cluster.action("web-2", "stop")
    cluster.domain("job").shutdown()  # a guest shutdown: RerunOnFailure leaves it off
    cluster.wait_status("web-2", "Stopped")
    cluster.wait_status("job", "Stopped")
    cluster.settle()
    assert queued_by_a_recount(cluster, monkeypatch) == []
    with monkeypatch.context() as patch:  # started behind vmquota's back, and libvirt's event is lost
        patch.setattr(cluster.app.controller.hypervisor, "_on_event", None)
        cluster.domain("web-2").create()
        assert cluster.status("web-2") == "Stopped"
        assert queued_by_a_recount(cluster, monkeypatch) == [(cluster.ns, "web-2")]  # the recount notices
    cluster.wait_status("web-2", "Running")


def test_a_recount_removes_what_vmquota_made_for_vms_that_are_gone(quota: Cluster) -> None:
    for name in ("up", "off"):
        quota.create_vm(vm_manifest(name, strategy="Manual"))
        quota.action(name, "start")
        quota.wait_status(name, "Running")
    quota.action("off", "stop")
    quota.wait_status("off", "Stopped")
    disks = {name: quota.app.controller.disks.vm_dir(quota.ns, quota.vm(name)["metadata"]["uid"])
             for name in ("up", "off")}
    assert all(folder.exists() for folder in disks.values())
    with quota.app.store.transaction() as txn:  # both VMs vanish from the store, as if lost behind vmquota's back
        for name in ("up", "off"):
            txn.delete(VIRTUAL_MACHINE, quota.ns, name)
            txn.set_charge(quota.ns, name, None)
    foreign = HOST.defineXML(f"<domain type='test'><name>vmquota_{quota.ns}_stranger</name><memory>65536</memory>"
                             "<vcpu>1</vcpu><os><type>hvm</type></os></domain>")
    try:
        quota.app.controller.resync()
        names = {d.name() for d in HOST.listAllDomains()}
        assert f"vmquota_{quota.ns}_up" not in names and f"vmquota_{quota.ns}_off" not in names
        assert not any(folder.exists() for folder in disks.values())
        assert f"vmquota_{quota.ns}_stranger" in names  # a domain vmquota did not make is never touched
    finally:
        foreign.undefine()


def test_a_recount_does_not_fail_when_a_namespace_folder_vanishes_while_it_looks(
        quota: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleting a namespace's last VM removes its disk folder; the recount lists the folders meanwhile."""
    quota.create_vm(vm_manifest("web-1"))
    disks = quota.app.controller.disks
    namespace_folder = disks.vm_dir(quota.ns, quota.vm("web-1")["metadata"]["uid"]).parent
    real_scandir = os.scandir

    def scandir_after_a_delete(path: str) -> Iterator[os.DirEntry[str]]:
        if path == str(namespace_folder):
            shutil.rmtree(namespace_folder)  # the delete wins the race: the folder was listed, now it is gone
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_after_a_delete)
    assert disks.vm_dirs() == []
