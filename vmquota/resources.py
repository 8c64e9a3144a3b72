"""Resource lists ({"limits.cpu": Decimal("2"), ...}) and the arithmetic admission is built from.

Bottom layer, pure: no I/O, no knowledge of VMs or quotas. Like Kubernetes'
pkg/quota/v1 helpers, every function returns a new list and leaves its inputs alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal

from vmquota import quantity

ResourceList = dict[str, Decimal]

# The resource names vmquota charges; a quota may limit any of them and nothing else.
REQUESTS_CPU = "requests.cpu"
LIMITS_CPU = "limits.cpu"
REQUESTS_MEMORY = "requests.memory"
LIMITS_MEMORY = "limits.memory"
CPU = "cpu"  # alias of requests.cpu, as in Kubernetes
MEMORY = "memory"  # alias of requests.memory
REQUESTS_STORAGE = "requests.storage"
COUNT_VMS = "count/virtualmachines.kubevirt.io"
RUNNING_VMS = "requests.instances/vmi"
COUNT_VMIS = "count/virtualmachineinstances.kubevirt.io"  # the same count under its Kubernetes name

COMPUTE = frozenset({REQUESTS_CPU, LIMITS_CPU, REQUESTS_MEMORY, LIMITS_MEMORY, CPU, MEMORY, RUNNING_VMS, COUNT_VMIS})
ALWAYS_CHARGED = frozenset({REQUESTS_STORAGE, COUNT_VMS})
SUPPORTED = COMPUTE | ALWAYS_CHARGED


def add(a: Mapping[str, Decimal], b: Mapping[str, Decimal]) -> ResourceList:
    result = dict(a)
    for name, value in b.items():
        result[name] = result.get(name, Decimal(0)) + value
    return result


def subtract(a: Mapping[str, Decimal], b: Mapping[str, Decimal]) -> ResourceList:
    result = dict(a)
    for name, value in b.items():
        result[name] = result.get(name, Decimal(0)) - value
    return result


def mask(resources: Mapping[str, Decimal], names: Iterable[str]) -> ResourceList:
    """Only the named resources; a name missing from `resources` is left out, not zeroed."""
    return {name: resources[name] for name in names if name in resources}


def zeros(names: Iterable[str]) -> ResourceList:
    return {name: Decimal(0) for name in names}


def increased(delta: Mapping[str, Decimal]) -> list[str]:
    """The names whose value goes up: only these can break a limit."""
    return sorted(name for name, value in delta.items() if value > 0)


def less_than_or_equal(a: Mapping[str, Decimal], b: Mapping[str, Decimal]) -> tuple[bool, list[str]]:
    """Whether every resource of `a` that `b` limits is within it, and the names that are not."""
    exceeded = sorted(name for name, value in a.items() if name in b and value > b[name])
    return not exceeded, exceeded


def is_zero(resources: Mapping[str, Decimal]) -> bool:
    return all(value == 0 for value in resources.values())


def parse(raw: Mapping[str, object], *, field: str) -> ResourceList:
    """Parse {"limits.cpu": "2"} into decimals; the error names the field and the input."""
    parsed: ResourceList = {}
    for name, text in raw.items():
        try:
            parsed[str(name)] = quantity.parse(text)  # type: ignore[arg-type]
        except quantity.QuantityError as e:
            raise quantity.QuantityError(f"{field}[{name}]: {e}") from e
    return parsed


def render(resources: Mapping[str, Decimal]) -> dict[str, str]:
    """Kubernetes' wire form: sorted names, quantity strings."""
    return {name: quantity.format(resources[name]) for name in sorted(resources)}


def describe(resources: Mapping[str, Decimal], names: Iterable[str]) -> str:
    """"limits.cpu=2,limits.memory=4Gi": the way Kubernetes' quota errors list resources."""
    return ",".join(f"{name}={quantity.format(resources.get(name, Decimal(0)))}" for name in names)
