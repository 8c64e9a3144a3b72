"""Usage history: exact at every change (starts, stops, SIGKILL and restart), rolled up and bounded, served with
its peak, time at the limit and refusals per day."""

from __future__ import annotations

import json
import os
import signal
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import Cluster, vm_manifest, vmquota_serve, wait_until

from vmquota import accounting, history, objects
from vmquota.client import Client, ClientError
from vmquota.store import Store


def quota_history(client: Client, ns: str, name: str = "compute", since: str = "24h") -> dict:
    return dict(client.get(f"/apis/vmquota.io/v1/namespaces/{ns}/resourcequotas/{name}/history?since={since}"))


def changes(found: dict, resource: str) -> list[str]:
    """The used of `resource` at each change, oldest first."""
    return [p["used"].get(resource, "0") for p in found["series"] if p["resolution"] == "change"]


def test_every_start_and_stop_is_a_point_of_the_history(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "4"})
    for name in ("a", "b"):
        cluster.create_vm(vm_manifest(name, cores=2, disk=None))
    cluster.action("a", "start")
    cluster.action("b", "start")
    cluster.wait_status("b", "Running")
    cluster.action("a", "stop")
    cluster.wait_status("a", "Stopped")
    found = quota_history(cluster.client, cluster.ns)
    assert found["kind"] == "UsageHistory" and found["used"] == cluster.used()
    assert changes(found, "limits.cpu") == ["0", "2", "4", "2"]  # created empty, two starts, a stop
    assert found["peak"] == {"limits.cpu": "4"}
    assert found["secondsAtLimit"]["limits.cpu"] > 0  # both ran together for a while
    assert found["enforcement"] == "enforce"


def test_refusals_per_day_and_the_project_history(cluster: Cluster) -> None:
    project = f"p-{cluster.ns}"
    cluster.client.post("/apis/vmquota.io/v1/projects", {"metadata": {"name": project}, "spec": {
        "resourceQuota": {"hard": {"limits.cpu": "2"}}}})
    ns = f"{cluster.ns}-a"
    cluster.create_namespace(ns, {objects.PROJECT_LABEL: project})
    for name in ("a", "b"):
        cluster.create_vm(vm_manifest(name, cores=2, disk=None), namespace=ns)
    cluster.action("a", "start", namespace=ns)
    for _ in range(2):
        with pytest.raises(ClientError):
            cluster.action("b", "start", namespace=ns)
    found = dict(cluster.client.get(f"/apis/vmquota.io/v1/projects/{project}/history"))
    assert changes(found, "limits.cpu") == ["0", "2"]
    [day] = found["refusalsPerDay"]
    assert (day["refused"], day["audited"], day["byResource"]) == (2, 0, {"limits.cpu": 2})
    events = cluster.client.get(f"/api/v1/namespaces/{ns}/events")["items"]
    reported = [e for e in events if e["reason"] == "QuotaExceeded"]
    assert len(reported) == 2 and reported[0]["involvedObject"] == {"apiVersion": "vmquota.io/v1", "kind": "Project",
                                                                     "name": project}


def test_a_bad_since_is_a_400_and_a_missing_quota_a_404(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "4"})
    with pytest.raises(ClientError) as bad:
        quota_history(cluster.client, cluster.ns, since="yesterday")
    assert bad.value.code == 400
    with pytest.raises(ClientError) as missing:
        quota_history(cluster.client, cluster.ns, name="nope")
    assert missing.value.code == 404


def test_the_history_is_exact_across_sigkill_and_restart(tmp_path: Path) -> None:
    """Each point is written in the transaction of its change: a change the API acknowledged is in the history,
    however soon the server is killed after it."""
    with vmquota_serve(tmp_path) as served:
        client = Client(served.url)
        client.post("/api/v1/namespaces", {"metadata": {"name": "dev"}})
        client.post("/api/v1/namespaces/dev/resourcequotas", {"metadata": {"name": "compute"},
                                                              "spec": {"hard": {"limits.cpu": "8"}}})
        for name in ("a", "b", "c"):
            client.post("/apis/kubevirt.io/v1/namespaces/dev/virtualmachines", vm_manifest(name, cores=1, disk=None))
        for name in ("a", "b"):
            client.put(f"/apis/subresources.kubevirt.io/v1/namespaces/dev/virtualmachines/{name}/start")
        before = quota_history(client, "dev")
        client.close()
        os.kill(served.process.pid, signal.SIGKILL)
        served.process.wait(timeout=30)
    assert changes(before, "limits.cpu") == ["0", "1", "2"]
    with vmquota_serve(tmp_path) as served:  # the same data directory
        client = Client(served.url)
        wait_until(lambda: quota_history(client, "dev")["used"] == {"limits.cpu": "2"}, what="the restart's recount")
        client.put("/apis/subresources.kubevirt.io/v1/namespaces/dev/virtualmachines/c/start")
        after = quota_history(client, "dev")
        client.close()
    assert changes(after, "limits.cpu")[:3] == ["0", "1", "2"]  # nothing acknowledged before the kill is lost
    assert changes(after, "limits.cpu")[-1] == "3"
    # The domains the simulated host kept running outside vmquota are its own process's; none outlive this test.


def _point(store: Store, at: float, used: str, hard: str = "4") -> None:
    with store.transaction() as txn:
        txn.add_usage_point(objects.RESOURCE_QUOTA, "ns", "q", at, json.dumps({"limits.cpu": hard}),
                            json.dumps({"limits.cpu": used}))


def test_points_roll_up_exactly_into_minutes_then_hours_and_the_oldest_are_forgotten(tmp_path: Path) -> None:
    store = Store(tmp_path / "vmquota.db")
    day = 86400.0
    t0 = 1_700_000_000.0 // 3600 * 3600  # on the hour
    # At the limit for 120 s from t0 + 10 (a spell counts in the minute where it began), then 2 of 4 until
    # t0 + 400, then 3 of 4 (still holding).
    _point(store, t0 + 10, "4")
    _point(store, t0 + 100, "4")
    _point(store, t0 + 130, "2")
    _point(store, t0 + 400, "3")
    with store.transaction() as txn:
        history.roll_up(txn, now=t0 + 1000)
    reader = store.reader()
    assert [p[1] for p in reader.usage_points("ResourceQuota", "ns", "q")] == [t0 + 400]  # the newest still holds
    minutes = reader.usage_rollups("ResourceQuota", "ns", "q", history.MINUTE)
    assert [(b - t0, json.loads(last), json.loads(peak), json.loads(at)) for b, _h, last, peak, at in minutes] == [
        (0, {"limits.cpu": "4"}, {"limits.cpu": "4"}, {"limits.cpu": 90.0}),
        (60, {"limits.cpu": "4"}, {"limits.cpu": "4"}, {"limits.cpu": 30.0}),
        (120, {"limits.cpu": "2"}, {"limits.cpu": "2"}, {})]
    found = history.usage(reader, "ResourceQuota", "ns", "q", "q", since=t0, now=t0 + 1000)
    assert found["peak"] == {"limits.cpu": "4"} and found["secondsAtLimit"] == {"limits.cpu": 120.0}
    # Two days on, the minutes become an hour; a year on, the hour is forgotten.
    with store.transaction() as txn:
        history.roll_up(txn, now=t0 + 3 * day)
    assert reader.usage_rollups("ResourceQuota", "ns", "q", history.MINUTE) == []
    [(hour, _h, last, peak, at)] = reader.usage_rollups("ResourceQuota", "ns", "q", history.HOUR)
    assert (hour, json.loads(last), json.loads(peak), json.loads(at)) == (
        t0, {"limits.cpu": "2"}, {"limits.cpu": "4"}, {"limits.cpu": 120.0})
    with store.transaction() as txn:
        history.roll_up(txn, now=t0 + 400 * day)
    assert reader.usage_rollups("ResourceQuota", "ns", "q", history.HOUR) == []
    store.close()


def test_a_point_is_written_in_the_transaction_of_its_change_or_not_at_all(tmp_path: Path) -> None:
    store = Store(tmp_path / "vmquota.db")
    with store.transaction() as txn:
        txn.create(objects.NAMESPACE, {"metadata": {"name": "ns"}})
        quota = txn.create(objects.RESOURCE_QUOTA, {"metadata": {"name": "q", "namespace": "ns"},
                                                    "spec": {"hard": {"cpu": "1"}}})
        accounting.refresh(txn, objects.RESOURCE_QUOTA, quota)
    with pytest.raises(RuntimeError), store.transaction() as txn:
        accounting.set_charge(txn, "ns", "vm", {"cpu": Decimal(1)}, enforce=True, subject="vm")
        raise RuntimeError("the rest of the request failed")
    assert [json.loads(p[3]) for p in store.reader().usage_points("ResourceQuota", "ns", "q")] == [{"cpu": "0"}]
    store.close()
