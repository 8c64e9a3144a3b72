"""Admission: every rise of a charge is checked against every quota at once, exactly, and races cannot pass it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Cluster, Sampler, open_app, start_all_at_once, vm_manifest, wait_until

from vmquota import quantity
from vmquota.client import ClientError


def test_a_refused_start_says_what_was_asked_used_and_allowed_and_changes_nothing(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "4", "limits.memory": "3Gi"})
    cluster.create_vm(vm_manifest("a", cores=1, memory="2Gi"))
    cluster.create_vm(vm_manifest("b", cores=1, memory="2Gi"))
    cluster.action("a", "start")
    cluster.settle()  # b's disks made, a running: only the refused start could change anything now
    before_vm, before_quota = cluster.vm("b"), cluster.quota()
    events_before = len(cluster.client.get(f"/api/v1/namespaces/{cluster.ns}/events")["items"])
    with pytest.raises(ClientError) as refused:
        cluster.action("b", "start")
    assert refused.value.code == 403
    assert refused.value.reason == "Forbidden"
    assert refused.value.message == (
        'virtualmachines.kubevirt.io "b" is forbidden: exceeded quota: compute, '
        "requested: limits.memory=2Gi, used: limits.memory=2Gi, limited: limits.memory=3Gi")
    assert cluster.vm("b") == before_vm  # runStrategy, status and resourceVersion untouched
    assert cluster.quota() == before_quota
    # The one trace a refusal leaves is what reports it: a QuotaExceeded event on the quota (issue 14).
    events = cluster.client.get(f"/api/v1/namespaces/{cluster.ns}/events")["items"]
    assert len(events) == events_before + 1
    assert [(e["reason"], e["involvedObject"]["kind"], e["involvedObject"]["name"], e["message"])
            for e in events if e["reason"] == "QuotaExceeded"] == [
        ("QuotaExceeded", "ResourceQuota", "compute", refused.value.message)]


def test_a_start_changes_a_quotas_used_and_its_resource_version(cluster: Cluster) -> None:
    """Usage is status like any other, as in Kubernetes (whose quota controller's every status update bumps the
    quota's resourceVersion): a watcher sees it change, so a PUT of the quota read before a VM started is
    refused (409) as stale, while a merge patch, which carries no resourceVersion, still applies."""
    cluster.create_quota({"limits.cpu": "4"})
    cluster.create_vm(vm_manifest("a", cores=2))
    read = cluster.quota()
    cluster.action("a", "start")
    cluster.wait_status("a", "Running")
    assert cluster.used() == {"limits.cpu": "2"}
    assert int(cluster.quota()["metadata"]["resourceVersion"]) > int(read["metadata"]["resourceVersion"])
    read["spec"]["hard"]["limits.cpu"] = "6"
    path = f"/api/v1/namespaces/{cluster.ns}/resourcequotas/compute"
    with pytest.raises(ClientError) as stale:
        cluster.client.put(path, read)
    assert stale.value.code == 409 and stale.value.reason == "Conflict"
    assert cluster.quota()["spec"]["hard"] == {"limits.cpu": "4"}
    patched = cluster.client.patch(path, {"spec": {"hard": {"limits.cpu": "6"}}})
    assert patched["status"] == {"hard": {"limits.cpu": "6"}, "used": {"limits.cpu": "2"}}
    assert cluster.quota() == patched


def test_every_quota_of_the_namespace_is_checked(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "8"}, name="cpu")
    cluster.create_quota({"requests.instances/vmi": "1"}, name="instances")
    cluster.create_vm(vm_manifest("a", cores=1))
    cluster.create_vm(vm_manifest("b", cores=1))
    cluster.action("a", "start")
    with pytest.raises(ClientError) as refused:
        cluster.action("b", "start")
    assert "exceeded quota: instances, requested: requests.instances/vmi=1" in refused.value.message
    assert cluster.used("cpu") == {"limits.cpu": "1"}


def test_create_is_admitted_for_count_and_storage(cluster: Cluster) -> None:
    cluster.create_quota({"requests.storage": "8Gi", "count/virtualmachines.kubevirt.io": "5"})
    cluster.create_vm(vm_manifest("a", disk="5Gi"))
    with pytest.raises(ClientError) as refused:
        cluster.create_vm(vm_manifest("b", disk="5Gi"))
    assert "requested: requests.storage=5Gi, used: requests.storage=5Gi, limited: requests.storage=8Gi" in \
        refused.value.message
    names = [v["metadata"]["name"] for v in cluster.client.get(
        f"/apis/kubevirt.io/v1/namespaces/{cluster.ns}/virtualmachines")["items"]]
    assert names == ["a"]


def test_creating_an_always_vm_admits_its_compute_too(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "1"})
    with pytest.raises(ClientError) as refused:
        cluster.create_vm(vm_manifest("big", cores=2, strategy="Always"))
    assert refused.value.code == 403
    assert cluster.client.get(f"/apis/kubevirt.io/v1/namespaces/{cluster.ns}/virtualmachines")["items"] == []


def test_lowering_hard_below_used_is_refused_and_running_vms_keep_running(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "4"})
    cluster.create_vm(vm_manifest("a", cores=2))
    cluster.action("a", "start")
    cluster.wait_status("a", "Running")
    path = f"/api/v1/namespaces/{cluster.ns}/resourcequotas/compute"
    with pytest.raises(ClientError) as refused:
        cluster.client.patch(path, {"spec": {"hard": {"limits.cpu": "1"}}})
    assert refused.value.code == 403
    assert "cannot be set below current usage: used: limits.cpu=2, limited: limits.cpu=1" in refused.value.message
    assert cluster.quota()["spec"]["hard"] == {"limits.cpu": "4"}
    cluster.client.patch(path, {"spec": {"hard": {"limits.cpu": "2"}}})  # down to exactly used is fine
    assert cluster.status("a") == "Running"


def test_a_new_limit_counts_what_already_exists(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "4"})
    cluster.create_vm(vm_manifest("a", cores=2, disk="3Gi"))
    cluster.action("a", "start")
    cluster.client.patch(f"/api/v1/namespaces/{cluster.ns}/resourcequotas/compute",
                         {"spec": {"hard": {"limits.cpu": "4", "requests.storage": "10Gi"}}})
    assert cluster.used() == {"limits.cpu": "2", "requests.storage": "3Gi"}


def test_resizing_a_running_vm_charges_only_the_difference(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "4", "limits.memory": "4Gi", "requests.storage": "20Gi"})
    cluster.create_vm(vm_manifest("a", cores=2, memory="2Gi", disk="5Gi"))
    cluster.action("a", "start")
    path = f"/apis/kubevirt.io/v1/namespaces/{cluster.ns}/virtualmachines/a"
    cluster.client.patch(path, {"spec": {"template": {"spec": {"domain": {"memory": {"guest": "3Gi"}}}}}})
    assert cluster.used()["limits.memory"] == "3Gi"
    with pytest.raises(ClientError) as refused:
        cluster.client.patch(path, {"spec": {"template": {"spec": {"domain": {"memory": {"guest": "5Gi"}}}}}})
    assert "requested: limits.memory=2Gi, used: limits.memory=3Gi, limited: limits.memory=4Gi" in refused.value.message
    assert cluster.vm("a")["spec"]["template"]["spec"]["domain"]["memory"]["guest"] == "3Gi"
    grown = cluster.vm("a")["spec"]["dataVolumeTemplates"]
    grown[0]["spec"]["storage"]["resources"]["requests"]["storage"] = "8Gi"
    cluster.client.patch(path, {"spec": {"dataVolumeTemplates": grown}})
    assert cluster.used()["requests.storage"] == "8Gi"


def test_disks_cannot_shrink_or_disappear(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("a", disk="5Gi"))
    path = f"/apis/kubevirt.io/v1/namespaces/{cluster.ns}/virtualmachines/a"
    templates = cluster.vm("a")["spec"]["dataVolumeTemplates"]
    templates[0]["spec"]["storage"]["resources"]["requests"]["storage"] = "1Gi"
    with pytest.raises(ClientError) as refused:
        cluster.client.patch(path, {"spec": {"dataVolumeTemplates": templates}})
    assert refused.value.code == 422 and "cannot shrink" in refused.value.message


def test_a_disk_grown_while_stopped_is_grown_on_disk_before_the_next_start(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("a", disk="1Gi"))
    cluster.settle()
    uid = cluster.vm("a")["metadata"]["uid"]
    disk = cluster.app.controller.disks.path(cluster.ns, uid, "a-root")
    assert cluster.app.controller.disks.virtual_size(disk) == 2**30
    templates = cluster.vm("a")["spec"]["dataVolumeTemplates"]
    templates[0]["spec"]["storage"]["resources"]["requests"]["storage"] = "2Gi"
    cluster.client.patch(f"/apis/kubevirt.io/v1/namespaces/{cluster.ns}/virtualmachines/a",
                         {"spec": {"dataVolumeTemplates": templates}})
    cluster.action("a", "start")
    cluster.wait_status("a", "Running")
    assert cluster.app.controller.disks.virtual_size(disk) == 2 * 2**30


def test_an_automatic_restart_without_room_waits_then_starts_when_room_frees(cluster: Cluster) -> None:
    # The back-off must outlast the test's seeing CrashLoopBackOff and starting `other`, even on a loaded machine.
    cluster.app.controller.backoff_base_seconds = 3.0
    cluster.app.controller.unschedulable_retry_seconds = 0.2
    cluster.create_quota({"limits.cpu": "2"})
    cluster.create_vm(vm_manifest("auto", cores=2, strategy="Always"))
    cluster.create_vm(vm_manifest("other", cores=2, strategy="Manual"))
    cluster.wait_status("auto", "Running")
    cluster.domain("auto").destroy()  # restarted at once: the room it released is still there
    wait_until(lambda: cluster.domain("auto").isActive() and cluster.status("auto") == "Running", what="restart")
    cluster.domain("auto").destroy()  # failing again: a back-off, during which it holds nothing...
    cluster.wait_status("auto", "CrashLoopBackOff")
    cluster.action("other", "start")  # ...so another VM may take the room
    cluster.wait_status("auto", "ErrorUnschedulable")
    failure = next(c for c in cluster.vm("auto")["status"]["conditions"] if c["type"] == "Failure")
    assert failure["reason"] == "QuotaExceeded"
    assert "exceeded quota: compute, requested: limits.cpu=2, used: limits.cpu=2, limited: limits.cpu=2" in \
        failure["message"]
    assert cluster.used() == {"limits.cpu": "2"}
    cluster.action("other", "stop")
    cluster.wait_status("auto", "Running")
    assert cluster.used() == {"limits.cpu": "2"}


def test_concurrent_starts_never_push_used_above_hard(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "3", "requests.instances/vmi": "3"})
    names = [f"vm-{i}" for i in range(16)]
    for name in names:
        cluster.create_vm(vm_manifest(name, cores=1, disk=None))
    used_cpu = f"/api/v1/namespaces/{cluster.ns}/resourcequotas/compute"
    with Sampler(cluster.app.url, lambda c: quantity.parse(c.get(used_cpu)["status"]["used"]["limits.cpu"])) as sampler:
        outcomes = start_all_at_once(cluster.app.url, [(cluster.ns, name) for name in names])
        cluster.settle()
    samples = sampler.samples
    assert outcomes == [202] * 3 + [403] * 13
    assert max(samples) <= 3
    assert cluster.used() == {"limits.cpu": "3", "requests.instances/vmi": "3"}
    running = [n for n in names if cluster.status(n) == "Running"]
    assert len(running) == 3


def test_recount_corrects_a_drifted_used(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "4"})
    cluster.create_vm(vm_manifest("a", cores=2))
    cluster.action("a", "start")
    cluster.wait_status("a", "Running")
    from vmquota import objects
    with cluster.app.store.transaction() as txn:  # corrupt the stored used, as a bug or a torn write might
        txn.set_quota_status(objects.RESOURCE_QUOTA, cluster.ns, "compute", '{"limits.cpu":"4"}',
                             '{"limits.cpu":"3"}')
    drifted = cluster.app.controller.resync()
    assert drifted == [f"{cluster.ns}/compute"]
    assert cluster.used() == {"limits.cpu": "2"}


def test_a_restarted_server_loses_nothing_and_starts_nothing_twice(tmp_path: Path) -> None:
    app = open_app(tmp_path / "data")
    c = Cluster(app, "restart")
    c.create_namespace("restart")
    c.create_quota({"limits.cpu": "4"})
    c.create_vm(vm_manifest("up", cores=2))
    c.create_vm(vm_manifest("down", cores=1))
    c.action("up", "start")
    c.wait_status("up", "Running")
    dom_id = c.domain("up").ID()
    c.client.close()
    app.close()
    app = open_app(tmp_path / "data")
    c2 = Cluster(app, "restart")
    try:
        c2.settle()
        assert c2.status("up") == "Running"
        assert c2.domain("up").ID() == dom_id  # the same running domain, not a second start
        assert c2.used() == {"limits.cpu": "2"}
        assert c2.status("down") == "Stopped"
    finally:
        for name in ("up", "down"):
            c2.delete_vm(name)
        c2.client.close()
        app.close()


def test_a_vm_killed_while_the_server_was_down_is_released_at_startup(tmp_path: Path) -> None:
    app = open_app(tmp_path / "data")
    c = Cluster(app, "downtime")
    c.create_namespace("downtime")
    c.create_quota({"limits.cpu": "4"})
    c.create_vm(vm_manifest("a", cores=2, strategy="Manual"))
    c.action("a", "start")
    c.wait_status("a", "Running")
    c.client.close()
    app.close()
    c.domain("a").destroy()  # while nobody watches
    app = open_app(tmp_path / "data")
    c2 = Cluster(app, "downtime")
    try:
        wait_until(lambda: c2.used() == {"limits.cpu": "0"}, what="the startup recount to release the charge")
        assert c2.status("a") == "Stopped"
    finally:
        c2.delete_vm("a")
        c2.client.close()
        app.close()
