"""Warnings before the wall, refusals reported, and audit mode: through kubectl 1.32 (which prints a Warning
header on stderr), the API, /metrics and the CLI's describe and top."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import Served, vm_manifest, vmquota_serve, wait_until
from test_cli import vmquota
from test_kubectl import KUBECTL, Kubectl
from test_metrics import samples, scrape

from vmquota.client import Client, ClientError

_counter = iter(range(1_000_000))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    assert KUBECTL.exists()
    with vmquota_serve(tmp_path_factory.mktemp("warnings"), processes=2) as server:
        yield server


@pytest.fixture
def ns(served: Served) -> Iterator[str]:
    name = f"w{next(_counter)}-{os.getpid() % 1000}"
    client = Client(served.url)
    client.post("/api/v1/namespaces", {"metadata": {"name": name}})
    yield name
    client.close()


@pytest.fixture
def kubectl(served: Served, tmp_path: Path) -> Kubectl:
    return Kubectl(served, tmp_path / "kube-cache")


def quota(ns: str, hard: dict[str, str], **annotations: str) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {
        "name": "compute", "namespace": ns, "annotations": annotations}, "spec": {"hard": hard}})


def running_vm(ns: str, name: str, cores: int) -> str:
    vm = vm_manifest(name, cores=cores, disk=None, strategy="Always")
    vm["metadata"]["namespace"] = ns
    return yaml.safe_dump(vm)


def warnings_of(stderr: str) -> list[str]:
    return [line.removeprefix("Warning: ") for line in stderr.splitlines() if line.startswith("Warning: ")]


def test_kubectl_prints_the_warning_when_a_request_leaves_a_quota_above_80_percent(
        kubectl: Kubectl, ns: str, served: Served) -> None:
    kubectl.ok("apply", "-f", "-", stdin=quota(ns, {"limits.cpu": "10"}))
    quiet = kubectl.run("create", "-f", "-", stdin=running_vm(ns, "a", 6))  # 60 %: no warning
    assert quiet.returncode == 0 and warnings_of(quiet.stderr) == []
    loud = kubectl.run("create", "-f", "-", stdin=running_vm(ns, "b", 3))  # 90 %
    assert loud.returncode == 0, loud.stderr
    assert warnings_of(loud.stderr) == [
        'resourcequota "compute" is above its warning threshold of 80%: limits.cpu=9 of 10 (90%)']
    client = Client(served.url)
    events = client.get(f"/api/v1/namespaces/{ns}/events")["items"]
    near = [e for e in events if e["reason"] == "QuotaNearLimit"]
    assert [(e["type"], e["involvedObject"]["kind"], e["involvedObject"]["name"]) for e in near] == [
        ("Warning", "ResourceQuota", "compute")]
    client.close()


def test_a_quota_sets_its_own_threshold_and_a_bad_one_is_refused(kubectl: Kubectl, ns: str) -> None:
    kubectl.ok("apply", "-f", "-", stdin=quota(ns, {"limits.cpu": "10"}, **{"vmquota.io/warning-threshold": "95"}))
    quiet = kubectl.run("create", "-f", "-", stdin=running_vm(ns, "a", 9))
    assert quiet.returncode == 0 and warnings_of(quiet.stderr) == []
    bad = kubectl.run("apply", "-f", "-", stdin=quota(ns, {"limits.cpu": "10"},
                                                      **{"vmquota.io/warning-threshold": "ninety"}))
    assert bad.returncode != 0
    assert "metadata.annotations[vmquota.io/warning-threshold]" in bad.stderr


def test_audit_mode_admits_past_hard_records_warns_and_shows_everywhere(kubectl: Kubectl, ns: str,
                                                                        served: Served) -> None:
    kubectl.ok("apply", "-f", "-", stdin=quota(ns, {"limits.cpu": "2"}, **{"vmquota.io/enforcement": "audit"}))
    created = kubectl.run("create", "-f", "-", stdin=running_vm(ns, "big", 4))
    assert created.returncode == 0, created.stderr  # enforcing would refuse it
    [audit_warning, *_] = [w for w in warnings_of(created.stderr) if "audit mode" in w]
    assert audit_warning.startswith('resourcequota "compute" is in audit mode and admitted '
                                    'virtualmachines.kubevirt.io "big" past its hard limit: exceeded quota: compute')
    status = json.loads(kubectl.ok("get", "quota", "compute", "-n", ns, "-o", "json"))["status"]
    assert status == {"hard": {"limits.cpu": "2"}, "used": {"limits.cpu": "4"}, "enforcement": "audit"}
    client = Client(served.url)
    families = scrape(client)
    assert samples(families, "vmquota_quota_enforcement")[(("mode", "audit"), ("namespace", ns),
                                                           ("quota", "compute"))] == 1.0
    assert samples(families, "vmquota_admission_audited_total", "vmquota_admission_audited") == {
        (("namespace", ns), ("quota", "compute"), ("resource", "limits.cpu")): 1.0}
    assert not samples(families, "vmquota_admission_refusals_total", "vmquota_admission_refusals").get(
        (("namespace", ns), ("quota", "compute"), ("resource", "limits.cpu")))
    events = client.get(f"/api/v1/namespaces/{ns}/events")["items"]
    assert any(e["reason"] == "QuotaExceeded" and "audit mode" in e["message"] for e in events)
    [day] = client.get(f"/apis/vmquota.io/v1/namespaces/{ns}/resourcequotas/compute/history")["refusalsPerDay"]
    assert (day["refused"], day["audited"]) == (0, 1)
    described = vmquota(None, "describe", "quota", "compute", "-n", ns, server=served.url)
    assert described.returncode == 0 and "Enforcement:  audit" in described.stdout
    top = vmquota(None, "top", "quotas", "-n", ns, server=served.url)
    assert top.stdout.splitlines()[1].split() == [ns, "compute", "limits.cpu", "4", "2", "200%", "audit"]
    # Back to enforcing: the next rise past hard is refused again, and counted as a refusal.
    kubectl.ok("annotate", "quota", "compute", "-n", ns, "vmquota.io/enforcement=enforce", "--overwrite")
    with pytest.raises(ClientError) as refused:
        client.post(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines", yaml.safe_load(running_vm(ns, "c", 1)))
    assert refused.value.code == 403
    client.close()


def test_top_puts_the_fullest_quotas_and_the_biggest_vms_first(served: Served, ns: str) -> None:
    client = Client(served.url)
    for name, hard in (("small", {"limits.cpu": "100"}), ("tight", {"limits.cpu": "4"})):
        client.post(f"/api/v1/namespaces/{ns}/resourcequotas", {"metadata": {"name": name}, "spec": {"hard": hard}})
    for name, cores in (("a", 1), ("b", 2)):
        client.post(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines",
                    yaml.safe_load(running_vm(ns, name, cores)))
    client.close()
    quotas = vmquota(None, "top", "quotas", "-n", ns, server=served.url).stdout.splitlines()
    assert quotas[0].split() == ["NAMESPACE", "NAME", "RESOURCE", "USED", "HARD", "USE", "MODE"]
    assert [line.split()[1] for line in quotas[1:]] == ["tight", "small"]
    assert quotas[1].split()[5] == "75%"
    vms = vmquota(None, "top", "vms", "-n", ns, server=served.url).stdout.splitlines()
    assert [line.split()[1] for line in vms[1:]] == ["b", "a"]


def test_an_automatic_start_refused_is_counted_once_per_reason_not_on_every_retry(served: Served, ns: str) -> None:
    client = Client(served.url)
    client.post(f"/api/v1/namespaces/{ns}/resourcequotas", {"metadata": {"name": "compute"},
                                                            "spec": {"hard": {"limits.cpu": "1"}}})
    client.post(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines",
                yaml.safe_load(running_vm(ns, "a", 1)))
    vm = yaml.safe_load(running_vm(ns, "b", 1))
    vm["spec"]["runStrategy"] = "Halted"
    client.post(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines", vm)
    client.patch(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines/b", {"spec": {"runStrategy": "Always"}})
    wait_until(lambda: client.get(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines/b")["status"].get(
        "printableStatus") == "ErrorUnschedulable", what="b to wait for room")
    refusals = samples(scrape(client), "vmquota_admission_refusals_total", "vmquota_admission_refusals")
    assert refusals[(("namespace", ns), ("quota", "compute"), ("resource", "limits.cpu"))] == 1.0
    client.close()
