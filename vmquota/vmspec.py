"""The parts of a KubeVirt VirtualMachine that vmquota acts on, read into one frozen value.

Bottom layer, pure. `read(vm)` checks the fields that matter (sizes, run strategy,
disks) and raises `FieldError` naming the field; every other field of the object
is kept as the user wrote it and ignored here. `usage.py` charges from a `VMSpec`,
`domainxml.py` builds the libvirt domain from one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from vmquota import objects, quantity

# Bounds beyond which a size is a typo, not a VM this host could ever run.
MAX_VCPUS = 256
MIN_MEMORY = Decimal(2**20)  # 1Mi
MAX_MEMORY = Decimal(2**42)  # 4Ti
MIN_DISK = Decimal(2**20)  # 1Mi
MAX_DISK = Decimal(2**46)  # 64Ti
MAX_GRACE_SECONDS = 86400
DEFAULT_GRACE_SECONDS = 180  # KubeVirt's default for VirtualMachines


class RunStrategy(enum.StrEnum):
    ALWAYS = "Always"  # keep it running: restart after any stop that vmquota did not ask for
    RERUN_ON_FAILURE = "RerunOnFailure"  # restart after a crash, not after a shutdown from inside the guest
    MANUAL = "Manual"  # run only on start requests; never restart by itself
    HALTED = "Halted"  # keep it stopped
    ONCE = "Once"  # start once; never restart


class FieldError(ValueError):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class Disk:
    """A persistent disk made from one of spec.dataVolumeTemplates."""

    name: str
    size: Decimal


@dataclass(frozen=True)
class VMSpec:
    run_strategy: RunStrategy
    uses_running_field: bool  # spec.running instead of spec.runStrategy: start/stop flip that field
    sockets: int
    cores: int
    threads: int
    guest_memory: Decimal
    requests: dict[str, Decimal]  # resources.requests: "cpu", "memory" as written
    limits: dict[str, Decimal]
    disks: tuple[Disk, ...]  # every dataVolumeTemplate, charged whether attached or not
    attached: tuple[str, ...]  # dataVolume names in volume order, as the guest sees them
    grace_seconds: int
    autoattach_graphics: bool

    @property
    def vcpus(self) -> int:
        return self.sockets * self.cores * self.threads

    @property
    def storage(self) -> Decimal:
        return sum((d.size for d in self.disks), Decimal(0))


def read(vm: objects.Obj) -> VMSpec:
    spec = _mapping(vm.get("spec"), "spec")
    run_strategy, uses_running = _run_strategy(spec)
    template = _mapping(_mapping(spec.get("template"), "spec.template").get("spec"), "spec.template.spec")
    domain = _mapping(template.get("domain"), "spec.template.spec.domain")
    cpu = _mapping(domain.get("cpu"), "spec.template.spec.domain.cpu")
    topology = {part: _count(cpu.get(part, 1), f"spec.template.spec.domain.cpu.{part}") for part in
                ("sockets", "cores", "threads")}
    vcpus = topology["sockets"] * topology["cores"] * topology["threads"]
    if vcpus > MAX_VCPUS:
        raise FieldError("spec.template.spec.domain.cpu", f"Invalid value: {vcpus} vCPUs: must be at most {MAX_VCPUS}")

    res_path = "spec.template.spec.domain.resources"
    resources = _mapping(domain.get("resources"), res_path)
    requests = _compute(resources.get("requests"), f"{res_path}.requests")
    limits = _compute(resources.get("limits"), f"{res_path}.limits")
    for name in ("cpu", "memory"):
        if name in requests and name in limits and requests[name] > limits[name]:
            raise FieldError(f"{res_path}.requests.{name}",
                             f"Invalid value: {quantity.format(requests[name])!r}: must be less than or equal "
                             f"to {name} limit of {quantity.format(limits[name])}")

    memory = _mapping(domain.get("memory"), "spec.template.spec.domain.memory")
    if "guest" in memory:
        guest = _size(memory["guest"], "spec.template.spec.domain.memory.guest", MIN_MEMORY, MAX_MEMORY)
    elif "memory" in requests:
        guest = requests["memory"]
    elif "memory" in limits:
        guest = limits["memory"]
    else:
        raise FieldError("spec.template.spec.domain.memory.guest",
                         "Required value: set memory.guest or resources.requests.memory")

    disks = _disks(spec.get("dataVolumeTemplates"))
    attached = _attached(template.get("volumes"), {d.name for d in disks})
    grace = template.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
    if isinstance(grace, bool) or not isinstance(grace, int) or not 0 <= grace <= MAX_GRACE_SECONDS:
        raise FieldError("spec.template.spec.terminationGracePeriodSeconds",
                         f"Invalid value: {grace!r}: must be a whole number of seconds from 0 to {MAX_GRACE_SECONDS}")
    devices = _mapping(domain.get("devices"), "spec.template.spec.domain.devices")
    graphics = devices.get("autoattachGraphicsDevice", True)
    return VMSpec(
        run_strategy=run_strategy,
        uses_running_field=uses_running,
        sockets=topology["sockets"],
        cores=topology["cores"],
        threads=topology["threads"],
        guest_memory=guest,
        requests=requests,
        limits=limits,
        disks=disks,
        attached=attached,
        grace_seconds=grace,
        autoattach_graphics=graphics is not False,
    )


def run_strategy(vm: objects.Obj) -> RunStrategy:
    """Just the run strategy of a stored (so already valid) VM: reading the whole spec costs twenty times more."""
    spec = vm["spec"]
    return stored_run_strategy(spec.get("runStrategy"), spec.get("running"))


def stored_run_strategy(run_strategy: str | None, running: bool | int | None) -> RunStrategy:
    """The run strategy of a stored VM from its `spec.runStrategy` and `spec.running` (at most one is set)."""
    if running is not None:
        return RunStrategy.ALWAYS if running else RunStrategy.HALTED
    return RunStrategy(run_strategy or RunStrategy.HALTED.value)


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FieldError(path, f"Invalid value: must be an object, got {type(value).__name__}")
    return value


def _run_strategy(spec: dict[str, Any]) -> tuple[RunStrategy, bool]:
    has_strategy, has_running = "runStrategy" in spec, "running" in spec
    if has_strategy and has_running:
        raise FieldError("spec.running", "Invalid value: running and runStrategy are mutually exclusive")
    if has_running:
        running = spec["running"]
        if not isinstance(running, bool):
            raise FieldError("spec.running", f"Invalid value: {running!r}: must be true or false")
        return (RunStrategy.ALWAYS if running else RunStrategy.HALTED), True
    value = spec.get("runStrategy", RunStrategy.HALTED.value)
    try:
        return RunStrategy(value), False
    except ValueError:
        supported = ", ".join(f'"{s.value}"' for s in RunStrategy)
        raise FieldError("spec.runStrategy",
                         f"Unsupported value: {objects.quote(value)}: supported values: {supported}") from None


def _count(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VCPUS:
        raise FieldError(path, f"Invalid value: {value!r}: must be a whole number from 1 to {MAX_VCPUS}")
    return value


def _quantity(value: Any, path: str) -> Decimal:
    try:
        return quantity.parse(value)
    except quantity.QuantityError as e:
        raise FieldError(path, f"Invalid value: {e}") from e


def _size(value: Any, path: str, low: Decimal, high: Decimal) -> Decimal:
    size = _quantity(value, path)
    if size != size.to_integral_value():
        raise FieldError(path, f"Invalid value: {objects.quote(value)}: must be a whole number of bytes")
    if not low <= size <= high:
        raise FieldError(path, f"Invalid value: {objects.quote(value)}: must be between "
                               f"{quantity.format(low)} and {quantity.format(high)}")
    return size


def _compute(raw: Any, path: str) -> dict[str, Decimal]:
    parsed: dict[str, Decimal] = {}
    for name, value in _mapping(raw, path).items():
        if name == "cpu":
            cpu = _quantity(value, f"{path}.cpu")
            if not Decimal("0.001") <= cpu <= MAX_VCPUS:
                raise FieldError(f"{path}.cpu",
                                 f"Invalid value: {objects.quote(value)}: must be between 1m and {MAX_VCPUS}")
            parsed["cpu"] = cpu
        elif name == "memory":
            parsed["memory"] = _size(value, f"{path}.memory", MIN_MEMORY, MAX_MEMORY)
        # Other resources (devices, hugepages) are kept in the object but not charged.
    return parsed


def _disks(raw: Any) -> tuple[Disk, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise FieldError("spec.dataVolumeTemplates", "Invalid value: must be a list")
    disks: list[Disk] = []
    for i, template in enumerate(raw):
        path = f"spec.dataVolumeTemplates[{i}]"
        template = _mapping(template, path)
        name = _mapping(template.get("metadata"), f"{path}.metadata").get("name")
        problem = objects.name_problem(name)
        if problem:
            raise FieldError(f"{path}.metadata.name", f"Invalid value: {objects.quote(name)}: {problem}")
        assert isinstance(name, str)
        if any(d.name == name for d in disks):
            raise FieldError(f"{path}.metadata.name", f"Duplicate value: {objects.quote(name)}")
        dv_spec = _mapping(template.get("spec"), f"{path}.spec")
        # KubeVirt accepts the size under spec.storage (preferred) or spec.pvc.
        source = "storage" if "storage" in dv_spec else "pvc"
        size_path = f"{path}.spec.{source}.resources.requests.storage"
        claim = _mapping(dv_spec.get(source), f"{path}.spec.{source}")
        requests = _mapping(_mapping(claim.get("resources"), f"{path}.spec.{source}.resources").get("requests"),
                            f"{path}.spec.{source}.resources.requests")
        if "storage" not in requests:
            raise FieldError(size_path, "Required value: the disk size")
        disks.append(Disk(name=name, size=_size(requests["storage"], size_path, MIN_DISK, MAX_DISK)))
    return tuple(disks)


def _attached(raw: Any, templates: set[str]) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise FieldError("spec.template.spec.volumes", "Invalid value: must be a list")
    attached: list[str] = []
    for i, volume in enumerate(raw):
        volume = _mapping(volume, f"spec.template.spec.volumes[{i}]")
        if "dataVolume" not in volume:
            continue  # containerDisk, cloudInit...: kept, not provided by vmquota
        path = f"spec.template.spec.volumes[{i}].dataVolume.name"
        name = _mapping(volume["dataVolume"], f"spec.template.spec.volumes[{i}].dataVolume").get("name")
        if not isinstance(name, str) or name not in templates:  # a list or object here is not a name either
            raise FieldError(path, f"Not found: {objects.quote(name)}: no dataVolumeTemplate has this name")
        if name in attached:
            raise FieldError(path, f"Duplicate value: {objects.quote(name)}")
        attached.append(name)
    return tuple(attached)
