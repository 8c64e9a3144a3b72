"""GET /metrics: names, labels and values as kube-state-metrics and KubeVirt export them, checked against the API.

The exposition is parsed with prometheus_client's own parser, the way Prometheus reads it.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, vm_manifest, vmquota_serve
from prometheus_client.parser import text_string_to_metric_families

from vmquota import objects, quantity
from vmquota.client import Client, ClientError


def exposition(client: Client) -> str:
    with urllib.request.urlopen(f"{client.url}/metrics", timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return str(response.read().decode())


def scrape(client: Client) -> dict[str, Any]:
    """Every family by name."""
    return {family.name: family for family in text_string_to_metric_families(exposition(client))}


def samples(families: dict[str, Any], name: str, family: str | None = None) -> dict[tuple[tuple[str, str], ...], float]:
    found = families.get(family or name)
    if found is None:
        return {}
    return {tuple(sorted(s.labels.items())): s.value for s in found.samples if s.name == name}


def base_units(text: str) -> float:
    return float(quantity.parse(text))


def quota_series(families: dict[str, Any], namespace: str, quota: str) -> dict[tuple[str, str], float]:
    return {(dict(labels)["resource"], dict(labels)["type"]): value
            for labels, value in samples(families, "kube_resourcequota").items()
            if dict(labels)["namespace"] == namespace and dict(labels)["resourcequota"] == quota}


def expected_series(quota: dict[str, Any]) -> dict[tuple[str, str], float]:
    status = quota["status"]
    return {**{(name, "hard"): base_units(v) for name, v in status["hard"].items()},
            **{(name, "used"): base_units(v) for name, v in status["used"].items()}}


def test_kube_resourcequota_is_named_labelled_and_valued_as_kube_state_metrics(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "4", "requests.cpu": "500m", "limits.memory": "8Gi",
                          "requests.storage": "20Gi", "count/virtualmachines.kubevirt.io": "5"})
    cluster.create_vm(vm_manifest("a", cores=2, memory="2Gi"))
    cluster.action("a", "start")
    cluster.wait_status("a", "Running")
    families = scrape(cluster.client)
    assert families["kube_resourcequota"].type == "gauge"
    assert families["kube_resourcequota"].documentation == "Information about resource quota."
    assert families["kube_resourcequota_created"].documentation == "Unix creation timestamp"
    quota = cluster.quota()
    assert quota_series(families, cluster.ns, "compute") == expected_series(quota)
    assert quota_series(families, cluster.ns, "compute")[("requests.cpu", "used")] == 0.2  # 200m: cores
    assert quota_series(families, cluster.ns, "compute")[("limits.memory", "used")] == 2 * 2**30  # bytes
    created = samples(families, "kube_resourcequota_created")
    assert created[(("namespace", cluster.ns), ("resourcequota", "compute"))] > 1.7e9


def test_the_metrics_follow_a_stop_and_a_recount_that_corrects_drift(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "4"})
    cluster.create_vm(vm_manifest("a", cores=2))
    cluster.action("a", "start")
    cluster.wait_status("a", "Running")
    assert quota_series(scrape(cluster.client), cluster.ns, "compute")[("limits.cpu", "used")] == 2
    with cluster.app.store.transaction() as txn:  # corrupt the stored used, as a bug or a torn write might
        txn.set_quota_status(objects.RESOURCE_QUOTA, cluster.ns, "compute", '{"limits.cpu":"4"}',
                             '{"limits.cpu":"3"}')
    assert quota_series(scrape(cluster.client), cluster.ns, "compute")[("limits.cpu", "used")] == 3  # as the API
    assert cluster.used() == {"limits.cpu": "3"}
    assert cluster.app.controller.resync() == [f"{cluster.ns}/compute"]
    families = scrape(cluster.client)
    assert quota_series(families, cluster.ns, "compute") == expected_series(cluster.quota())
    assert quota_series(families, cluster.ns, "compute")[("limits.cpu", "used")] == 2
    assert samples(families, "vmquota_recount_corrections_total", "vmquota_recount_corrections")[()] >= 1
    assert samples(families, "vmquota_recount_duration_seconds_count", "vmquota_recount_duration_seconds")[()] >= 1
    cluster.action("a", "stop")
    cluster.wait_status("a", "Stopped")
    assert quota_series(scrape(cluster.client), cluster.ns, "compute")[("limits.cpu", "used")] == 0


def test_project_gauges_match_the_projects_status(cluster: Cluster) -> None:
    project = f"p-{cluster.ns}"
    cluster.client.post("/apis/vmquota.io/v1/projects", {"metadata": {"name": project}, "spec": {
        "resourceQuota": {"hard": {"limits.cpu": "8", "limits.memory": "16Gi"}}}})
    cluster.create_namespace(f"{cluster.ns}-a", {objects.PROJECT_LABEL: project})
    cluster.create_vm(vm_manifest("a", cores=3, memory="1Gi", strategy="Always"), namespace=f"{cluster.ns}-a")
    cluster.wait_status("a", "Running", namespace=f"{cluster.ns}-a")
    status = cluster.client.get(f"/apis/vmquota.io/v1/projects/{project}")["status"]
    series = {(dict(labels)["resource"], dict(labels)["type"]): value
              for labels, value in samples(scrape(cluster.client), "vmquota_project_quota").items()
              if dict(labels)["project"] == project}
    assert series == expected_series({"status": status})
    assert series[("limits.cpu", "used")] == 3


def test_refusals_are_counted_per_namespace_quota_and_resource(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "2", "limits.memory": "8Gi"})
    cluster.create_vm(vm_manifest("a", cores=2))
    cluster.create_vm(vm_manifest("b", cores=2))
    cluster.action("a", "start")
    for _ in range(3):
        with pytest.raises(ClientError):
            cluster.action("b", "start")
    refusals = samples(scrape(cluster.client), "vmquota_admission_refusals_total", "vmquota_admission_refusals")
    assert refusals == {(("namespace", cluster.ns), ("quota", "compute"), ("resource", "limits.cpu")): 3.0}
    enforcement = samples(scrape(cluster.client), "vmquota_quota_enforcement")
    assert enforcement[(("mode", "enforce"), ("namespace", cluster.ns), ("quota", "compute"))] == 1.0


def vm_labels(families: dict[str, Any], family: str, name: str, namespace: str) -> list[dict[str, str]]:
    return [dict(labels) for labels in samples(families, family)
            if dict(labels)["name"] == name and dict(labels)["namespace"] == namespace]


def test_per_vm_metrics_have_kubevirts_names_labels_and_values(cluster: Cluster) -> None:
    manifest = vm_manifest("a", cores=2, memory="3Gi")
    manifest["spec"]["template"]["spec"]["domain"]["resources"] = {"requests": {"memory": "1Gi", "cpu": "250m"},
                                                                  "limits": {"cpu": "2"}}
    cluster.create_vm(manifest)
    cluster.create_vm(vm_manifest("b", cores=1, memory="1Gi"))
    cluster.action("a", "start")
    cluster.wait_status("a", "Running")
    families = scrape(cluster.client)
    info = vm_labels(families, "kubevirt_vm_info", "a", cluster.ns)
    assert info == [{"name": "a", "namespace": cluster.ns, "os": "<none>", "workload": "<none>", "flavor": "<none>",
                     "machine_type": "<none>", "instance_type": "<none>", "preference": "<none>",
                     "status": "running", "status_group": "running"}]
    assert vm_labels(families, "kubevirt_vm_info", "b", cluster.ns)[0]["status_group"] == "non_running"
    requests = {(s.labels["resource"], s.labels["unit"], s.labels["source"]): s.value
                for s in families["kubevirt_vm_resource_requests"].samples
                if s.labels["name"] == "a" and s.labels["namespace"] == cluster.ns}
    assert requests == {("memory", "bytes", "domain"): 2**30, ("memory", "bytes", "guest"): 3 * 2**30,
                        ("cpu", "cores", "domain"): 2.0, ("cpu", "cores", "requests"): 0.25}
    limits = {(s.labels["resource"], s.labels["unit"]): s.value for s in families["kubevirt_vm_resource_limits"].samples
              if s.labels["name"] == "a" and s.labels["namespace"] == cluster.ns}
    assert limits == {("cpu", "cores"): 2.0}
    created = cluster.vm("a")["metadata"]["creationTimestamp"]
    stamps = {s.labels["name"]: s.value for s in families["kubevirt_vm_create_date_timestamp_seconds"].samples
              if s.labels["namespace"] == cluster.ns}
    assert stamps["a"] == datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()


def test_requests_are_timed_and_the_hypervisor_is_reported_up(cluster: Cluster) -> None:
    cluster.client.get(f"/apis/kubevirt.io/v1/namespaces/{cluster.ns}/virtualmachines")
    families = scrape(cluster.client)
    counts = samples(families, "apiserver_request_duration_seconds_count", "apiserver_request_duration_seconds")
    key = (("group", "kubevirt.io"), ("resource", "virtualmachines"), ("scope", "namespace"), ("subresource", ""),
           ("verb", "LIST"))
    assert counts[key] >= 1
    assert samples(families, "vmquota_hypervisor_up")[(("uri", "test:///default"),)] == 1.0


def _metric_value(client: Client, name: str, family: str, **labels: str) -> float:
    found = samples(scrape(client), name, family)
    return sum(v for k, v in found.items() if all(dict(k).get(a) == b for a, b in labels.items()))


def test_every_api_process_answers_a_scrape_with_the_same_store_counts_and_summed_latencies(tmp_path: Path) -> None:
    """A scrape reaches any one of the API processes: refusals come from the store, request counts from every
    process's shared values, so no scrape sees a count go back."""
    with vmquota_serve(tmp_path, processes=3) as served:
        client = Client(served.url)
        client.post("/api/v1/namespaces", {"metadata": {"name": "dev"}})
        client.post("/api/v1/namespaces/dev/resourcequotas", {"metadata": {"name": "compute"},
                                                              "spec": {"hard": {"limits.cpu": "1"}}})
        client.post("/apis/kubevirt.io/v1/namespaces/dev/virtualmachines", vm_manifest("a", cores=2, disk=None))
        for _ in range(4):
            fresh = Client(served.url)
            with pytest.raises(ClientError):
                fresh.put("/apis/subresources.kubevirt.io/v1/namespaces/dev/virtualmachines/a/start")
            fresh.close()
        seen_refusals, seen_requests = [], []
        for _ in range(12):  # new connections: each may land on another process
            fresh = Client(served.url)
            seen_refusals.append(_metric_value(fresh, "vmquota_admission_refusals_total", "vmquota_admission_refusals",
                                               namespace="dev", quota="compute"))
            seen_requests.append(_metric_value(fresh, "apiserver_request_total", "apiserver_request",
                                               verb="PUT", subresource="start", code="403"))
            fresh.close()
        assert set(seen_refusals) == {4.0}
        assert set(seen_requests) == {4.0}
        client.close()


def iter_lines(text: str) -> Iterator[str]:
    yield from (line for line in text.splitlines() if line and not line.startswith("#"))


def test_every_sample_value_is_a_plain_number(cluster: Cluster) -> None:
    cluster.create_quota({"requests.cpu": "1500m"})
    text = exposition(cluster.client)
    for line in iter_lines(text):
        Decimal(line.rsplit(" ", 1)[1])  # raises on anything Prometheus would not parse as a value
