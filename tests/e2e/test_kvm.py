"""End to end on real KVM: the issue's acceptance, through the CLI and HTTP API of a `vmquota serve` process.

Each test runs its own server and namespace (fixtures in e2e/conftest.py); it checks usage against what
libvirt really runs.
The guests have no operating system: QEMU boots into the BIOS and runs, which is all a quota needs.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from conftest import Sampler, start_all_at_once, wait_until
from kvm_harness import Kvm, apply_vm, quota_doc

from vmquota import quantity

pytestmark = pytest.mark.kvm


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
    kvm.wait_disks_ready("b")
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
    used_cpu = f"/api/v1/namespaces/{kvm.ns}/resourcequotas/compute"
    with Sampler(kvm.server.url, lambda c: quantity.parse(c.get(used_cpu)["status"]["used"]["limits.cpu"])) as sampler:
        results = start_all_at_once(kvm.server.url, [(kvm.ns, name) for name in names])
        wait_until(lambda: len(kvm.running_domains()) == 3, timeout=30, what="three domains to run")
        time.sleep(1)  # let anything wrongly admitted show up in libvirt, too
    samples = sampler.samples
    assert results == [202] * 3 + [403] * 5
    assert max(samples) <= 3
    assert len(kvm.running_domains()) == 3
    assert kvm.used() == {"limits.cpu": "3"}

