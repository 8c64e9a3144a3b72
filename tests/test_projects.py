"""Projects: one quota over a group of namespaces, admitted together with each namespace's own quotas."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Cluster, Sampler, start_all_at_once, vm_manifest, wait_until

from vmquota.client import ClientError

PROJECTS = "/apis/vmquota.io/v1/projects"


def create_project(c: Cluster, name: str, hard: dict[str, str], default: dict[str, str] | None = None) -> Any:
    spec: dict[str, Any] = {"resourceQuota": {"hard": hard}}
    if default:
        spec["namespaceDefaultResourceQuota"] = {"hard": default}
    return c.client.post(PROJECTS, {"apiVersion": "vmquota.io/v1", "kind": "Project", "metadata": {"name": name},
                                    "spec": spec})


def project_used(c: Cluster, name: str) -> dict[str, str]:
    return dict(c.client.get(f"{PROJECTS}/{name}")["status"]["used"])


def join(c: Cluster, namespace: str, project: str | None) -> Any:
    return c.client.patch(f"/api/v1/namespaces/{namespace}", {"metadata": {"labels": {"vmquota.io/project": project}}})


@pytest.fixture
def team(cluster: Cluster) -> Cluster:
    create_project(cluster, f"team-{cluster.ns}", {"limits.cpu": "2500m", "limits.memory": "3000Mi"},
                   default={"limits.cpu": "2", "limits.memory": "2Gi"})
    join(cluster, cluster.ns, f"team-{cluster.ns}")
    return cluster


def test_joining_copies_the_default_quota(team: Cluster) -> None:
    default = team.quota("default")
    assert default["spec"]["hard"] == {"limits.cpu": "2", "limits.memory": "2Gi"}
    assert default["status"]["used"] == {"limits.cpu": "0", "limits.memory": "0"}


def test_an_existing_default_quota_is_kept(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "1"}, name="default")
    create_project(cluster, "p-keep", {"limits.cpu": "4"}, default={"limits.cpu": "2"})
    join(cluster, cluster.ns, "p-keep")
    assert cluster.quota("default")["spec"]["hard"] == {"limits.cpu": "1"}


def test_project_used_follows_start_stop_and_delete(team: Cluster) -> None:
    project = f"team-{team.ns}"
    team.create_vm(vm_manifest("vm", cores=2, memory="2Gi"))
    assert project_used(team, project) == {"limits.cpu": "0", "limits.memory": "0"}
    for _ in range(3):
        team.action("vm", "start")
        assert project_used(team, project) == {"limits.cpu": "2", "limits.memory": "2Gi"}
        team.wait_status("vm", "Running")
        team.action("vm", "stop")
        team.wait_status("vm", "Stopped")
        assert project_used(team, project) == {"limits.cpu": "0", "limits.memory": "0"}
    team.delete_vm("vm")
    assert project_used(team, project) == {"limits.cpu": "0", "limits.memory": "0"}


def test_a_start_over_the_project_is_refused_in_its_name_and_changes_nothing(team: Cluster) -> None:
    project = f"team-{team.ns}"
    other = f"{team.ns}-b"
    team.create_namespace(other, labels={"vmquota.io/project": project})
    team.client.patch(f"/api/v1/namespaces/{other}/resourcequotas/default",
                      {"spec": {"hard": {"limits.cpu": "2500m", "limits.memory": "3000Mi"}}})
    team.create_vm(vm_manifest("a", cores=2, memory="2Gi"))
    team.create_vm(vm_manifest("b", cores=1, memory="512Mi"), namespace=other)
    team.action("a", "start")
    team.settle()  # b's disks made, a running: only the refused start could change anything now
    before = (team.vm("b", other), team.quota("default", other), team.client.get(f"{PROJECTS}/{project}"))
    with pytest.raises(ClientError) as refused:
        team.action("b", "start", namespace=other)
    assert refused.value.code == 403
    assert f"exceeded quota: project/{project}, requested: limits.cpu=1, used: limits.cpu=2, " \
           f"limited: limits.cpu=2500m" in refused.value.message
    assert (team.vm("b", other), team.quota("default", other), team.client.get(f"{PROJECTS}/{project}")) == before
    team.delete_vm("b", other)


def test_the_namespace_quota_refuses_before_the_project(team: Cluster) -> None:
    team.create_vm(vm_manifest("a", cores=2, memory="2Gi"))
    team.create_vm(vm_manifest("b", cores=1, memory="256Mi"))
    team.action("a", "start")
    with pytest.raises(ClientError) as refused:
        team.action("b", "start")
    assert refused.value.message.endswith(
        "exceeded quota: default, requested: limits.cpu=1,limits.memory=256Mi, used: limits.cpu=2,limits.memory=2Gi, "
        "limited: limits.cpu=2,limits.memory=2Gi")  # every exceeded resource, as Kubernetes lists them


def test_moving_a_namespace_needs_room_in_the_target_project(cluster: Cluster) -> None:
    create_project(cluster, "small", {"limits.cpu": "1"})
    create_project(cluster, "big", {"limits.cpu": "8", "count/virtualmachines.kubevirt.io": "10"})
    cluster.create_vm(vm_manifest("a", cores=2))
    cluster.action("a", "start")
    cluster.wait_status("a", "Running")
    with pytest.raises(ClientError) as refused:
        join(cluster, cluster.ns, "small")
    assert refused.value.code == 403
    assert "cannot join project \"small\": exceeded quota: project/small, requested: limits.cpu=2, " \
           "used: limits.cpu=0, limited: limits.cpu=1" in refused.value.message
    assert "vmquota.io/project" not in (cluster.client.get(f"/api/v1/namespaces/{cluster.ns}")["metadata"]
                                        .get("labels") or {})
    join(cluster, cluster.ns, "big")
    assert project_used(cluster, "big") == {"limits.cpu": "2", "count/virtualmachines.kubevirt.io": "1"}
    assert project_used(cluster, "small") == {"limits.cpu": "0"}
    assert cluster.status("a") == "Running"  # never stopped by a move
    join(cluster, cluster.ns, None)  # leaving gives the room back
    assert project_used(cluster, "big") == {"limits.cpu": "0", "count/virtualmachines.kubevirt.io": "0"}


def test_a_namespace_quota_may_not_allow_more_than_its_project(team: Cluster) -> None:
    with pytest.raises(ClientError) as refused:
        team.create_quota({"limits.cpu": "3"}, name="greedy")
    assert refused.value.code == 422
    assert "above the limit of project/" in refused.value.message


def test_lowering_a_project_below_its_used_is_refused(team: Cluster) -> None:
    project = f"team-{team.ns}"
    team.create_vm(vm_manifest("a", cores=2, memory="1Gi"))
    team.action("a", "start")
    with pytest.raises(ClientError) as refused:
        team.client.patch(f"{PROJECTS}/{project}", {"spec": {"resourceQuota": {"hard": {"limits.cpu": "1"}},
                                                             "namespaceDefaultResourceQuota": None}})
    assert refused.value.code == 403
    assert "cannot be set below current usage: used: limits.cpu=2, limited: limits.cpu=1" in refused.value.message
    team.client.patch(f"{PROJECTS}/{project}", {"spec": {"resourceQuota": {"hard": {"limits.cpu": "2"}}}})
    assert team.status("a") in ("Starting", "Running")


def test_deleting_a_project_with_namespaces_is_refused_naming_them(team: Cluster) -> None:
    with pytest.raises(ClientError) as refused:
        team.client.delete(f"{PROJECTS}/team-{team.ns}")
    assert refused.value.code == 409 and team.ns in refused.value.message
    join(team, team.ns, None)
    team.client.delete(f"{PROJECTS}/team-{team.ns}")


def test_joining_a_missing_project_is_invalid(cluster: Cluster) -> None:
    with pytest.raises(ClientError) as refused:
        join(cluster, cluster.ns, "nope")
    assert refused.value.code == 422


@pytest.mark.parametrize(("resource", "limit", "vm_kwargs", "action"), [
    ("count/virtualmachines.kubevirt.io", "1", {"disk": "1Gi"}, "create"),
    ("requests.storage", "1Gi", {"disk": "1Gi"}, "create"),
    ("requests.instances/vmi", "1", {"cores": 1}, "start"),
    ("requests.memory", "1Gi", {"memory": "1Gi"}, "start"),
    ("requests.cpu", "200m", {"cores": 2}, "start"),
])
def test_every_quota_kind_works_at_project_level(cluster: Cluster, resource: str, limit: str,
                                                 vm_kwargs: dict[str, Any], action: str) -> None:
    project = f"kinds-{cluster.ns}"
    create_project(cluster, project, {resource: limit})
    join(cluster, cluster.ns, project)
    cluster.create_vm(vm_manifest("first", **vm_kwargs))
    if action == "start":
        cluster.action("first", "start")
        cluster.create_vm(vm_manifest("second", **vm_kwargs))
        with pytest.raises(ClientError) as refused:
            cluster.action("second", "start")
    else:
        with pytest.raises(ClientError) as refused:
            cluster.create_vm(vm_manifest("second", **vm_kwargs))
    assert f"exceeded quota: project/{project}" in refused.value.message
    assert project_used(cluster, project) == {resource: limit}


def test_describe_shows_usage_per_namespace_and_vm(team: Cluster) -> None:
    project = f"team-{team.ns}"
    team.create_vm(vm_manifest("a", cores=1, memory="1Gi"))
    team.action("a", "start")
    usage = team.client.get(f"{PROJECTS}/{project}/usage")
    assert usage["used"] == {"limits.cpu": "1", "limits.memory": "1Gi"}
    [ns] = usage["namespaces"]
    assert ns["namespace"] == team.ns and ns["used"] == {"limits.cpu": "1", "limits.memory": "1Gi"}
    assert ns["virtualMachines"] == [{"name": "a", "charge": {"limits.cpu": "1", "limits.memory": "1Gi"}}]


def test_concurrent_starts_across_namespaces_never_exceed_the_project(cluster: Cluster) -> None:
    project = f"race-{cluster.ns}"
    create_project(cluster, project, {"limits.cpu": "3"})
    namespaces = [f"{cluster.ns}-{i}" for i in range(3)]
    for ns in namespaces:
        cluster.create_namespace(ns, labels={"vmquota.io/project": project})
        for i in range(4):
            cluster.create_vm(vm_manifest(f"vm-{i}", cores=1, disk=None), namespace=ns)
    read_used = lambda client: client.get(f"{PROJECTS}/{project}")["status"]["used"]["limits.cpu"]  # noqa: E731
    with Sampler(cluster.app.url, read_used) as sampler:
        results = start_all_at_once(cluster.app.url, [(ns, f"vm-{i}") for ns in namespaces for i in range(4)])
        cluster.settle()
    samples = sampler.samples
    assert results == [202] * 3 + [403] * 9
    assert set(samples) <= {"0", "1", "2", "3"}
    wait_until(lambda: project_used(cluster, project) == {"limits.cpu": "3"}, what="used to settle")
