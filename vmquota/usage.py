"""What a VM charges, and whether it charges compute at all: the accounting rules in one place.

Bottom layer, pure. `holds_runtime(phase)` is the single answer to "does this VM
count as running right now?"; `charge(...)` turns a VM's spec and phase into the
resource list it charges to every quota of its namespace and project. Admission
(`accounting.py`) compares charges; it never looks at a VM itself.
"""

from __future__ import annotations

import enum
from decimal import Decimal

from vmquota import resources as r
from vmquota.vmspec import VMSpec
from vmquota.vmstatus import Phase

MI = Decimal(2**20)


class OverheadModel(enum.StrEnum):
    NONE = "none"  # charge guest memory exactly
    KUBEVIRT = "kubevirt"  # KubeVirt's GetMemoryOverhead: what virt-launcher's pod would request on top


# Phases in which the VM holds a runtime: from an admitted start until the hypervisor confirms it is off.
_RUNTIME_PHASES = frozenset({Phase.STARTING, Phase.RUNNING, Phase.PAUSED, Phase.STOPPING, Phase.TERMINATING})


def holds_runtime(phase: Phase) -> bool:
    return phase in _RUNTIME_PHASES


def overhead_breakdown(spec: VMSpec, model: OverheadModel) -> list[tuple[str, Decimal]]:
    """The parts of the memory overhead, named, so `describe vm` can show where it comes from."""
    if model is OverheadModel.NONE:
        return []
    # KubeVirt's constants (pkg/virt-controller/services/renderresources.go, v1.x).
    parts = [
        ("page tables (guest memory / 512)", (spec.guest_memory / 512).to_integral_value(rounding="ROUND_CEILING")),
        ("virt-launcher-monitor", 25 * MI),
        ("virt-launcher", 100 * MI),
        ("virtlogd", 25 * MI),
        ("virtqemud", 40 * MI),
        ("qemu", 30 * MI),
        (f"vCPU tables (8Mi x {spec.vcpus})", 8 * MI * spec.vcpus),
        ("IOThread", 8 * MI),
    ]
    if spec.autoattach_graphics:
        parts.append(("video RAM", 32 * MI))
    return parts


def memory_overhead(spec: VMSpec, model: OverheadModel) -> Decimal:
    return sum((value for _, value in overhead_breakdown(spec, model)), Decimal(0))


def compute(spec: VMSpec, model: OverheadModel) -> r.ResourceList:
    """What a running VM charges on top of its persistent charge."""
    vcpus = Decimal(spec.vcpus)
    requests_cpu = spec.requests.get("cpu", vcpus / 10)
    overhead = memory_overhead(spec, model)
    requests_memory = spec.requests.get("memory", spec.guest_memory) + overhead
    return {
        r.LIMITS_CPU: spec.limits.get("cpu", vcpus),
        r.REQUESTS_CPU: requests_cpu,
        r.CPU: requests_cpu,
        r.LIMITS_MEMORY: spec.limits.get("memory", spec.guest_memory) + overhead,
        r.REQUESTS_MEMORY: requests_memory,
        r.MEMORY: requests_memory,
        r.RUNNING_VMS: Decimal(1),
        r.COUNT_VMIS: Decimal(1),
    }


def persistent(spec: VMSpec) -> r.ResourceList:
    """What every existing VM charges, whatever its state."""
    return {r.REQUESTS_STORAGE: spec.storage, r.COUNT_VMS: Decimal(1)}


def charge(spec: VMSpec, phase: Phase, model: OverheadModel) -> r.ResourceList:
    """The full charge of a VM in `phase`; compute resources are zero unless it holds a runtime."""
    running = compute(spec, model)
    if not holds_runtime(phase):
        running = r.zeros(running)
    return {**persistent(spec), **running}
