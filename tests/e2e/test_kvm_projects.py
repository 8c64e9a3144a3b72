"""Projects end to end on real KVM: one limit over several namespaces, admitted with each namespace's quota."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from conftest import start_all_at_once, wait_until
from kvm_harness import Kvm, apply_vm

pytestmark = pytest.mark.kvm
PROJECTS = "/apis/vmquota.io/v1/projects"


def apply(kvm: Kvm, *docs: dict[str, Any]) -> None:
    kvm.ok("apply", "-f", "-", input=yaml.safe_dump_all(docs))


def project_doc(name: str, hard: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "vmquota.io/v1", "kind": "Project", "metadata": {"name": name},
            "spec": {"resourceQuota": {"hard": hard}}}


def namespace_doc(name: str, project: str | None) -> dict[str, Any]:
    labels = {"vmquota.io/project": project} if project else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def used(kvm: Kvm, project: str) -> dict[str, str]:
    return dict(kvm.client.get(f"{PROJECTS}/{project}")["status"]["used"])


@pytest.fixture
def project(kvm: Kvm) -> Any:
    name = f"p-{kvm.ns}"
    apply(kvm, project_doc(name, {"limits.cpu": "2500m", "limits.memory": "3000Mi"}), namespace_doc(kvm.ns, name))
    yield name
    for vm in kvm.client.get("/apis/kubevirt.io/v1/virtualmachines")["items"]:
        if vm["metadata"]["namespace"].startswith(kvm.ns):
            kvm.cli("delete", "vm", vm["metadata"]["name"], "-n", vm["metadata"]["namespace"])
    for ns in kvm.client.get("/api/v1/namespaces")["items"]:
        if ns["metadata"]["name"].startswith(f"{kvm.ns}-"):
            kvm.client.delete(f"/api/v1/namespaces/{ns['metadata']['name']}")
    kvm.client.patch(f"/api/v1/namespaces/{kvm.ns}", {"metadata": {"labels": {"vmquota.io/project": None}}})
    kvm.client.delete(f"{PROJECTS}/{name}")


def test_project_used_follows_the_vm_through_every_operation(kvm: Kvm, project: str) -> None:
    apply_vm(kvm, "vm", cores=2, memory="2Gi", disk="1Gi")
    assert used(kvm, project) == {"limits.cpu": "0", "limits.memory": "0"}
    for round_ in range(3):
        kvm.ok("start", "vm", "-n", kvm.ns, "--wait")  # always starts when the project has room
        assert used(kvm, project) == {"limits.cpu": "2", "limits.memory": "2Gi"}
        kvm.ok("clone", "vm", f"copy-{round_}", "-n", kvm.ns, "--wait")
        assert used(kvm, project) == {"limits.cpu": "2", "limits.memory": "2Gi"}  # a stopped clone: no compute
        kvm.ok("stop", "vm", "-n", kvm.ns, "--wait")
        assert used(kvm, project) == {"limits.cpu": "0", "limits.memory": "0"}
        kvm.ok("start", f"copy-{round_}", "-n", kvm.ns, "--wait")
        assert used(kvm, project) == {"limits.cpu": "2", "limits.memory": "2Gi"}
        kvm.ok("delete", "vm", f"copy-{round_}", "-n", kvm.ns)
        assert used(kvm, project) == {"limits.cpu": "0", "limits.memory": "0"}
    kvm.ok("delete", "vm", "vm", "-n", kvm.ns)
    assert used(kvm, project) == {"limits.cpu": "0", "limits.memory": "0"}


def test_a_second_namespace_with_room_is_still_held_by_the_project(kvm: Kvm, project: str) -> None:
    other = f"{kvm.ns}-b"
    apply(kvm, namespace_doc(other, project), {
        "apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "own", "namespace": other},
        "spec": {"hard": {"limits.cpu": "2", "limits.memory": "2Gi"}}})
    apply_vm(kvm, "a", cores=2, memory="2Gi", disk=None)
    kvm.ok("start", "a", "-n", kvm.ns, "--wait")
    manifest = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "b", "namespace": other},
                "spec": {"runStrategy": "Halted", "template": {"spec": {"terminationGracePeriodSeconds": 0, "domain": {
                    "cpu": {"cores": 1}, "memory": {"guest": "512Mi"}}}}}}
    apply(kvm, manifest)
    b = f"/apis/kubevirt.io/v1/namespaces/{other}/virtualmachines/b"
    kvm.wait_disks_ready("b", other)
    before = kvm.client.get(b)
    refused = kvm.cli("start", "b", "-n", other)
    assert refused.returncode == 1
    assert (f"exceeded quota: project/{project}, requested: limits.cpu=1, used: limits.cpu=2, limited: "
            f"limits.cpu=2500m" in refused.stderr)
    assert kvm.client.get(b) == before
    assert used(kvm, project) == {"limits.cpu": "2", "limits.memory": "2Gi"}
    assert [d.name() for d in kvm.running_domains()] == [f"vmquota_{kvm.ns}_a"]


def test_moving_a_namespace_with_running_vms_needs_room(kvm: Kvm, project: str) -> None:
    mover = f"{kvm.ns}-m"
    apply(kvm, namespace_doc(mover, None), project_doc(f"tight-{kvm.ns}", {"limits.cpu": "1"}))
    vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "m", "namespace": mover},
          "spec": {"runStrategy": "Halted", "template": {"spec": {"terminationGracePeriodSeconds": 0, "domain": {
              "cpu": {"cores": 2}, "memory": {"guest": "512Mi"}}}}}}
    apply(kvm, vm)
    kvm.ok("start", "m", "-n", mover, "--wait")
    refused = kvm.cli("apply", "-f", "-", input=yaml.safe_dump(namespace_doc(mover, f"tight-{kvm.ns}")))
    assert refused.returncode == 1 and f"exceeded quota: project/tight-{kvm.ns}" in refused.stderr
    assert used(kvm, project) == {"limits.cpu": "0", "limits.memory": "0"}
    apply(kvm, namespace_doc(mover, project))  # room enough: used grows by exactly the namespace's usage
    assert used(kvm, project) == {"limits.cpu": "2", "limits.memory": "512Mi"}
    assert "Running" in kvm.ok("get", "vm", "m", "-n", mover)
    kvm.ok("delete", "vm", "m", "-n", mover)
    kvm.client.delete(f"/api/v1/namespaces/{mover}")
    kvm.client.delete(f"{PROJECTS}/tight-{kvm.ns}")


def test_concurrent_starts_across_two_namespaces_never_exceed_the_project(kvm: Kvm, project: str) -> None:
    other = f"{kvm.ns}-c"
    apply(kvm, namespace_doc(other, project))
    targets = []
    for ns in (kvm.ns, other):
        for i in range(3):
            apply(kvm, {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                        "metadata": {"name": f"r{i}", "namespace": ns},
                        "spec": {"runStrategy": "Halted", "template": {"spec": {
                            "terminationGracePeriodSeconds": 0,
                            "domain": {"cpu": {"cores": 1}, "memory": {"guest": "128Mi"}}}}}})
            targets.append((ns, f"r{i}"))
    results = start_all_at_once(kvm.server.url, targets)
    assert results == [202] * 2 + [403] * 4  # 2500m of cpu: two 1-vCPU VMs fit, a third does not

    def running() -> list[str]:  # this test's domains in both namespaces, and no other VM on the host
        return [d.name() for d in kvm.conn.listAllDomains(1) if d.name().startswith(f"vmquota_{kvm.ns}")]

    wait_until(lambda: len(running()) >= 2 and used(kvm, project)["limits.cpu"] == "2",
               timeout=30, what="two VMs to run")
    assert len(running()) == 2
