"""The contract's accounting rules, one by one, on the pure functions that implement them."""

from decimal import Decimal
from typing import Any

import pytest
from conftest import vm_manifest

from vmquota import accounting, objects, usage, vmspec
from vmquota import resources as r
from vmquota.usage import OverheadModel
from vmquota.vmstatus import Phase

GI = Decimal(2**30)
MI = Decimal(2**20)


def spec_of(**kwargs: Any) -> vmspec.VMSpec:
    return vmspec.read(vm_manifest("vm", **kwargs))


def test_limits_cpu_is_the_vcpu_count_without_resources() -> None:
    spec = spec_of(cores=2)
    running = usage.charge(spec, Phase.RUNNING, OverheadModel.NONE)
    assert running[r.LIMITS_CPU] == 2
    assert running[r.REQUESTS_CPU] == Decimal("0.2")  # vCPUs / 10
    assert running[r.CPU] == running[r.REQUESTS_CPU]


def test_vcpus_are_sockets_times_cores_times_threads() -> None:
    manifest = vm_manifest("vm")
    manifest["spec"]["template"]["spec"]["domain"]["cpu"] = {"sockets": 2, "cores": 3, "threads": 2}
    assert usage.compute(vmspec.read(manifest), OverheadModel.NONE)[r.LIMITS_CPU] == 12


def test_resources_override_vcpus_and_guest_memory() -> None:
    manifest = vm_manifest("vm", cores=4, memory="2Gi")
    manifest["spec"]["template"]["spec"]["domain"]["resources"] = {
        "requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "3", "memory": "3Gi"}}
    running = usage.compute(vmspec.read(manifest), OverheadModel.NONE)
    assert running[r.REQUESTS_CPU] == Decimal("0.5")
    assert running[r.LIMITS_CPU] == 3
    assert running[r.REQUESTS_MEMORY] == GI
    assert running[r.MEMORY] == GI
    assert running[r.LIMITS_MEMORY] == 3 * GI


def test_guest_memory_is_charged_exactly_without_overhead() -> None:
    running = usage.compute(spec_of(memory="2Gi"), OverheadModel.NONE)
    assert running[r.REQUESTS_MEMORY] == running[r.LIMITS_MEMORY] == 2 * GI


def test_kubevirt_overhead_adds_kubevirts_formula() -> None:
    spec = spec_of(cores=2, memory="2Gi")
    # page tables 2Gi/512 = 4Mi, launcher and daemons 220Mi, 2 vCPUs x 8Mi, IOThread 8Mi, video 32Mi
    expected = 4 * MI + 220 * MI + 16 * MI + 8 * MI + 32 * MI
    assert usage.memory_overhead(spec, OverheadModel.KUBEVIRT) == expected
    running = usage.compute(spec, OverheadModel.KUBEVIRT)
    assert running[r.REQUESTS_MEMORY] == running[r.LIMITS_MEMORY] == 2 * GI + expected
    assert sum(v for _, v in usage.overhead_breakdown(spec, OverheadModel.KUBEVIRT)) == expected


def test_no_graphics_device_no_video_overhead() -> None:
    manifest = vm_manifest("vm")
    manifest["spec"]["template"]["spec"]["domain"]["devices"]["autoattachGraphicsDevice"] = False
    with_video = usage.memory_overhead(spec_of(), OverheadModel.KUBEVIRT)
    assert usage.memory_overhead(vmspec.read(manifest), OverheadModel.KUBEVIRT) == with_video - 32 * MI


@pytest.mark.parametrize("phase", [Phase.STOPPED, Phase.CRASH_LOOP, Phase.UNSCHEDULABLE])
def test_a_vm_without_a_runtime_charges_no_compute(phase: Phase) -> None:
    charge = usage.charge(spec_of(), phase, OverheadModel.NONE)
    assert all(charge[name] == 0 for name in r.COMPUTE)


@pytest.mark.parametrize("phase", [Phase.STARTING, Phase.RUNNING, Phase.PAUSED, Phase.STOPPING])
def test_a_vm_holding_a_runtime_charges_compute(phase: Phase) -> None:
    charge = usage.charge(spec_of(cores=2, memory="2Gi"), phase, OverheadModel.NONE)
    assert charge[r.LIMITS_CPU] == 2 and charge[r.LIMITS_MEMORY] == 2 * GI and charge[r.RUNNING_VMS] == 1


@pytest.mark.parametrize("phase", list(Phase))
def test_storage_and_count_are_charged_in_every_phase(phase: Phase) -> None:
    manifest = vm_manifest("vm", disk="5Gi")
    manifest["spec"]["dataVolumeTemplates"].append(
        {"metadata": {"name": "data"}, "spec": {"pvc": {"resources": {"requests": {"storage": "1Gi"}}}}})
    charge = usage.charge(vmspec.read(manifest), phase, OverheadModel.NONE)
    assert charge[r.REQUESTS_STORAGE] == 6 * GI
    assert charge[r.COUNT_VMS] == 1


def quota(hard: dict[str, str], used: dict[str, str], name: str = "compute") -> accounting.Quota:
    return accounting.Quota(display=name, kind=objects.RESOURCE_QUOTA, namespace="ns", name=name,
                            hard=r.parse(hard, field="hard"), used=r.parse(used, field="used"))


def test_refusal_reads_like_kubernetes() -> None:
    q = quota({"limits.memory": "8Gi", "limits.cpu": "8"}, {"limits.memory": "6Gi", "limits.cpu": "1"})
    message = accounting.refusal(q, {r.LIMITS_MEMORY: 4 * GI, r.LIMITS_CPU: Decimal(2)})
    assert message == ("exceeded quota: compute, requested: limits.memory=4Gi, used: limits.memory=6Gi, "
                       "limited: limits.memory=8Gi")


def test_a_charge_that_exactly_fills_the_quota_fits() -> None:
    q = quota({"limits.cpu": "4"}, {"limits.cpu": "2"})
    assert accounting.refusal(q, {r.LIMITS_CPU: Decimal(2)}) is None


def test_decreases_always_fit_even_above_hard() -> None:
    q = quota({"limits.cpu": "4"}, {"limits.cpu": "6"})  # drift: a VM started behind vmquota's back
    assert accounting.refusal(q, {r.LIMITS_CPU: Decimal(-2), r.COUNT_VMS: Decimal(1)}) is None


def test_resources_a_quota_does_not_limit_never_refuse() -> None:
    q = quota({"requests.storage": "1Gi"}, {"requests.storage": "0"})
    assert accounting.refusal(q, {r.LIMITS_CPU: Decimal(100)}) is None


def test_project_refusals_name_the_project() -> None:
    q = quota({"limits.cpu": "2500m"}, {"limits.cpu": "2"}, name="project/team-a")
    assert accounting.refusal(q, {r.LIMITS_CPU: Decimal(2)}) == (
        "exceeded quota: project/team-a, requested: limits.cpu=2, used: limits.cpu=2, limited: limits.cpu=2500m")


def test_resource_arithmetic() -> None:
    a = {"x": Decimal(1), "y": Decimal(2)}
    b = {"y": Decimal(5), "z": Decimal(1)}
    assert r.add(a, b) == {"x": 1, "y": 7, "z": 1}
    assert r.subtract(a, b) == {"x": 1, "y": -3, "z": -1}
    assert r.mask(a, ["y", "w"]) == {"y": 2}
    assert r.less_than_or_equal({"x": Decimal(3), "y": Decimal(1)}, {"x": Decimal(2)}) == (False, ["x"])
    assert r.increased({"x": Decimal(1), "y": Decimal(-1), "z": Decimal(0)}) == ["x"]
