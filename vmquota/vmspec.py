"""The parts of a KubeVirt VirtualMachine that vmquota acts on, read into one frozen value.

Bottom layer, pure. `read(vm)` checks the fields that matter (sizes, run strategy,
disks) and raises `FieldError` naming the field; every other field of the object
is kept as the user wrote it and ignored here. `usage.py` charges from a `VMSpec`,
`domainxml.py` builds the libvirt domain from one.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import re
from dataclasses import dataclass, field
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
MAX_URL_LENGTH = 2048
MAX_CLOUD_INIT_BYTES = 64 * 1024  # each of user data and network data, decoded: the VM's body holds them
MAC_ADDRESS = re.compile(r"^[0-9a-f][02468ace](:[0-9a-f]{2}){5}$")  # unicast
NIC_MODELS = ("virtio", "e1000", "e1000e", "rtl8139")
# A Linux interface name (at most 15 bytes, IFNAMSIZ less its NUL) of the characters bridges are named with:
# no '/', space, ':' or quote, so it names one device and nothing else on its way to libvirt.
BRIDGE_NAME = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")


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


class SourceKind(enum.StrEnum):
    BLANK = "blank"  # an empty disk
    HTTP = "http"  # imported from a URL (CDI's http source)
    PVC = "pvc"  # a copy of another VM's disk in the same namespace (CDI's pvc source: a clone)
    UPLOAD = "upload"  # sent by a client (`vmquota image-upload`, CDI's upload source); no disk until then


@dataclass(frozen=True)
class DiskSource:
    """Where a disk's first bytes come from: CDI's `dataVolumeTemplates[].spec.source`."""

    kind: SourceKind = SourceKind.BLANK
    url: str = ""  # HTTP: http:// or https://
    checksum: str | None = None  # HTTP: "<algorithm>:<hex digest>" of the file as served
    pvc: str = ""  # PVC: the name of the data volume (a disk of another VM of the namespace)


@dataclass(frozen=True)
class Disk:
    """A persistent disk made from one of spec.dataVolumeTemplates."""

    name: str
    size: Decimal
    source: DiskSource = field(default_factory=DiskSource)


class SeedKind(enum.StrEnum):
    NO_CLOUD = "cloudInitNoCloud"  # an ISO labelled cidata: user-data, meta-data, network-config
    CONFIG_DRIVE = "cloudInitConfigDrive"  # an ISO labelled config-2: openstack/latest/user_data, ...


@dataclass(frozen=True)
class CloudInit:
    """A cloud-init volume: what reaches the guest as a seed ISO (never the domain XML or a path)."""

    volume: str
    kind: SeedKind
    user_data: bytes
    network_data: bytes | None
    cdrom: bool  # devices.disks names it a cdrom; otherwise a virtio disk, KubeVirt's default


class Binding(enum.StrEnum):
    """How a NIC reaches a network: KubeVirt's interface bindings that vmquota provides."""

    MASQUERADE = "masquerade"  # the pod network: QEMU's user-mode network, NAT inside QEMU, no host change
    BRIDGE = "bridge"  # a multus network: a tap device on an existing host bridge (`BRIDGE_NAME`)


@dataclass(frozen=True)
class Interface:
    """A NIC: on QEMU's user-mode network (masquerade, the pod network) or on a host bridge (bridge, multus)."""

    name: str
    mac: str | None  # macAddress; None: derived from the VM's uid
    ports: tuple[int, ...]  # the guest ports that may be forwarded to; empty: any (masquerade only)
    model: str
    binding: Binding = Binding.MASQUERADE
    bridge: str | None = None  # BRIDGE: the host bridge, as the multus network's networkName names it


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
    cloud_init: CloudInit | None = None
    interfaces: tuple[Interface, ...] = ()
    node_selector: dict[str, str] = field(default_factory=dict)  # which nodes it may run on

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

    namespace = _mapping(vm.get("metadata"), "metadata").get("namespace")
    disks = _disks(spec.get("dataVolumeTemplates"), namespace)
    attached = _attached(template.get("volumes"), {d.name for d in disks})
    grace = template.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
    if isinstance(grace, bool) or not isinstance(grace, int) or not 0 <= grace <= MAX_GRACE_SECONDS:
        raise FieldError("spec.template.spec.terminationGracePeriodSeconds",
                         f"Invalid value: {grace!r}: must be a whole number of seconds from 0 to {MAX_GRACE_SECONDS}")
    devices = _mapping(domain.get("devices"), "spec.template.spec.domain.devices")
    graphics = devices.get("autoattachGraphicsDevice", True)
    cloud_init = _cloud_init(template.get("volumes"), devices.get("disks"))
    interfaces = _interfaces(devices.get("interfaces"), template.get("networks"))
    node_selector = _node_selector(template.get("nodeSelector"))
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
        cloud_init=cloud_init,
        interfaces=interfaces,
        node_selector=node_selector,
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


def _node_selector(value: Any) -> dict[str, str]:
    selector = _mapping(value, "spec.template.spec.nodeSelector")
    for key, label in selector.items():
        if not isinstance(label, str) or not isinstance(key, str):
            raise FieldError(f"spec.template.spec.nodeSelector[{key}]", "Invalid value: must be a string")
    return dict(selector)


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


def _disks(raw: Any, namespace: str | None) -> tuple[Disk, ...]:
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
        size = _size(requests["storage"], size_path, MIN_DISK, MAX_DISK)
        disks.append(Disk(name=name, size=size, source=_source(dv_spec.get("source"), f"{path}.spec.source",
                                                               namespace)))
    return tuple(disks)


def _source(raw: Any, path: str, namespace: str | None) -> DiskSource:
    """CDI's source of a DataVolume: exactly one of http, blank, pvc, upload; none is blank."""
    source = _mapping(raw, path)
    if not source:
        return DiskSource()
    if len(source) != 1:
        raise FieldError(path, "Invalid value: exactly one of http, blank, pvc, upload")
    [(kind, value)] = source.items()
    value = _mapping(value, f"{path}.{kind}")
    if kind == "blank":
        return DiskSource()
    if kind == "upload":
        if value:
            raise FieldError(f"{path}.upload.{sorted(value)[0]}", "Unsupported value: the upload source takes no "
                                                                  "fields")
        return DiskSource(SourceKind.UPLOAD)
    if kind == "http":
        unknown = sorted(set(value) - {"url", "checksum"})
        if unknown:
            raise FieldError(f"{path}.http.{unknown[0]}", "Unsupported value: vmquota's http source takes url "
                                                          "and checksum")
        url = value.get("url")
        if not isinstance(url, str) or not re.match(r"^https?://[^/?#\s]+", url) or len(url) > MAX_URL_LENGTH \
                or any(c.isspace() or ord(c) < 32 for c in url):
            raise FieldError(f"{path}.http.url", f"Invalid value: {objects.quote(url)}: an http:// or https:// "
                                                 f"URL of at most {MAX_URL_LENGTH} characters")
        checksum = value.get("checksum")
        if checksum is not None:
            problem = _checksum_problem(checksum)
            if problem:
                raise FieldError(f"{path}.http.checksum", f"Invalid value: {objects.quote(checksum)}: {problem}")
        return DiskSource(SourceKind.HTTP, url=url, checksum=checksum)
    if kind == "pvc":
        name = value.get("name")
        problem = objects.name_problem(name)
        if problem:
            raise FieldError(f"{path}.pvc.name", f"Invalid value: {objects.quote(name)}: {problem}")
        if value.get("namespace", namespace) != namespace:
            raise FieldError(f"{path}.pvc.namespace", f"Forbidden: {objects.quote(value.get('namespace'))}: only "
                                                      "a disk of the VM's own namespace can be cloned")
        assert isinstance(name, str)
        return DiskSource(SourceKind.PVC, pvc=name)
    raise FieldError(f"{path}.{kind}", 'Unsupported value: supported sources: "http", "blank", "pvc", "upload"')


def _checksum_problem(value: Any) -> str | None:
    algorithms = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
    if not isinstance(value, str):
        return "must be a string"
    algorithm, _, digest = value.partition(":")
    if algorithm not in algorithms:
        return "must be <algorithm>:<hex digest> with md5, sha1, sha256 or sha512"
    if len(digest) != algorithms[algorithm] or not re.fullmatch(r"[0-9a-fA-F]+", digest):
        return f"a {algorithm} digest is {algorithms[algorithm]} hexadecimal digits"
    return None


def _cloud_init(volumes: Any, disks: Any) -> CloudInit | None:
    """The VM's one cloudInitNoCloud or cloudInitConfigDrive volume, its data decoded and bounded."""
    found: CloudInit | None = None
    cdroms = {d.get("name") for d in disks or [] if isinstance(d, dict) and "cdrom" in d}
    for i, volume in enumerate(volumes if isinstance(volumes, list) else []):
        for kind in SeedKind:
            if not isinstance(volume, dict) or kind.value not in volume:
                continue
            path = f"spec.template.spec.volumes[{i}].{kind.value}"
            name = volume.get("name")
            problem = objects.name_problem(name)
            if problem:
                raise FieldError(f"spec.template.spec.volumes[{i}].name", f"Invalid value: {objects.quote(name)}: "
                                                                          f"{problem}")
            if found is not None:
                raise FieldError(path, "Invalid value: a VM has at most one cloud-init volume")
            source = _mapping(volume[kind.value], path)
            for ref in ("secretRef", "userDataSecretRef", "networkDataSecretRef"):
                if ref in source:
                    raise FieldError(f"{path}.{ref}", "Unsupported value: vmquota has no Secrets; give userData "
                                                      "or userDataBase64")
            user_data = _seed_data(source, "userData", path)
            network_data = _seed_data(source, "networkData", path)
            assert isinstance(name, str)
            found = CloudInit(name, kind, user_data or b"", network_data, cdrom=name in cdroms)
    return found


def _seed_data(source: dict[str, Any], field_name: str, path: str) -> bytes | None:
    plain, encoded = source.get(field_name), source.get(f"{field_name}Base64")
    if plain is not None and encoded is not None:
        raise FieldError(f"{path}.{field_name}", f"Invalid value: {field_name} and {field_name}Base64 are mutually "
                                                 "exclusive")
    if plain is not None:
        if not isinstance(plain, str):
            raise FieldError(f"{path}.{field_name}", "Invalid value: must be a string")
        data = plain.encode()
    elif encoded is not None:
        try:
            data = base64.b64decode(encoded if isinstance(encoded, str) else "-", validate=True)
        except (binascii.Error, ValueError):
            raise FieldError(f"{path}.{field_name}Base64", "Invalid value: must be base64") from None
    else:
        return None
    if len(data) > MAX_CLOUD_INIT_BYTES:
        raise FieldError(f"{path}.{field_name}", f"Too long: must have at most {MAX_CLOUD_INIT_BYTES} bytes")
    return data


def _interfaces(raw: Any, networks: Any) -> tuple[Interface, ...]:
    """NICs: masquerade onto the pod network (QEMU's user-mode network) or bridge onto a multus network, which
    names a host bridge. The masquerade NIC, if any, comes first: port forwards go through the first NIC."""
    if raw is None and networks is None:
        return ()
    if not isinstance(raw, list) or not isinstance(networks, list | None):
        raise FieldError("spec.template.spec.domain.devices.interfaces", "Invalid value: must be a list")
    kinds = _networks(networks or [])
    interfaces: list[Interface] = []
    for i, iface in enumerate(raw):
        path = f"spec.template.spec.domain.devices.interfaces[{i}]"
        iface = _mapping(iface, path)
        name = iface.get("name")
        problem = objects.name_problem(name)
        if problem:
            raise FieldError(f"{path}.name", f"Invalid value: {objects.quote(name)}: {problem}")
        assert isinstance(name, str)
        if name not in kinds:
            raise FieldError(f"{path}.name", f"Not found: {objects.quote(name)}: no network has this name")
        if any(existing.name == name for existing in interfaces):
            raise FieldError(f"{path}.name", f"Duplicate value: {objects.quote(name)}")
        binding, bridge = _binding(iface, path, kinds[name])
        if binding is Binding.MASQUERADE and interfaces:
            raise FieldError(path, "Invalid value: the masquerade interface must be the first interface")
        mac = iface.get("macAddress")
        if mac is not None and (not isinstance(mac, str) or not MAC_ADDRESS.match(mac.lower())):
            raise FieldError(f"{path}.macAddress", f"Invalid value: {objects.quote(mac)}: a unicast MAC address, "
                                                   "as 02:00:00:00:00:01")
        model = iface.get("model", "virtio")
        if model not in NIC_MODELS:
            raise FieldError(f"{path}.model", f"Unsupported value: {objects.quote(model)}: supported values: "
                                              + ", ".join(f'"{m}"' for m in NIC_MODELS))
        ports = _ports(iface.get("ports"), path)
        if ports and binding is Binding.BRIDGE:
            raise FieldError(f"{path}.ports", "Invalid value: ports are forwarded on a masquerade interface only; "
                                              "a bridged guest is reached on the bridge's own network")
        interfaces.append(Interface(name, mac.lower() if mac else None, ports, model, binding, bridge))
    return tuple(interfaces)


def _networks(networks: list[Any]) -> dict[str, str | None]:
    """Each network's name -> None for the pod network, else the host bridge its multus networkName names."""
    kinds: dict[str, str | None] = {}
    for i, network in enumerate(networks):
        path = f"spec.template.spec.networks[{i}]"
        network = _mapping(network, path)
        name = network.get("name")
        problem = objects.name_problem(name)
        if problem:
            raise FieldError(f"{path}.name", f"Invalid value: {objects.quote(name)}: {problem}")
        assert isinstance(name, str)
        if name in kinds:
            raise FieldError(f"{path}.name", f"Duplicate value: {objects.quote(name)}")
        if "pod" in network:
            if None in kinds.values():
                raise FieldError("spec.template.spec.networks", "Invalid value: at most one pod network")
            kinds[name] = None
        elif "multus" in network:
            kinds[name] = _bridge_name(_mapping(network["multus"], f"{path}.multus"), f"{path}.multus")
        else:
            raise FieldError(path, 'Unsupported value: vmquota networks are "pod" (QEMU\'s user-mode network) or '
                                   '"multus" naming a host bridge')
    return kinds


def _bridge_name(multus: dict[str, Any], path: str) -> str:
    """vmquota has no NetworkAttachmentDefinitions: a multus network's networkName is the host bridge itself."""
    bridge = multus.get("networkName")
    if not isinstance(bridge, str) or not BRIDGE_NAME.match(bridge):
        hint = " (a host bridge's name, not a NetworkAttachmentDefinition's namespace/name)" \
            if isinstance(bridge, str) and re.fullmatch(r"[a-z0-9.-]+/[a-z0-9.-]+", bridge) else ""
        raise FieldError(f"{path}.networkName", f"Invalid value: {objects.quote(bridge)}: a host bridge, 1 to 15 "
                                                f"letters, digits, '_', '.' or '-'{hint}")
    return bridge


def _binding(iface: dict[str, Any], path: str, bridge: str | None) -> tuple[Binding, str | None]:
    """masquerade onto the pod network, or bridge onto a multus network; nothing else."""
    if "masquerade" in iface:
        if bridge is not None:
            raise FieldError(f"{path}.masquerade", "Invalid value: masquerade is for the pod network; a multus "
                                                   "network takes the bridge binding")
        return Binding.MASQUERADE, None
    if "bridge" in iface:
        if bridge is None:
            raise FieldError(f"{path}.bridge", "Invalid value: vmquota has no pod to bridge: the pod network takes "
                                               "masquerade, a bridge binding takes a multus network naming a host "
                                               "bridge")
        return Binding.BRIDGE, bridge
    other = next((b for b in ("sriov", "slirp", "passt", "binding") if b in iface), "masquerade")
    raise FieldError(f"{path}.{other}", 'Unsupported value: vmquota\'s interfaces use the "masquerade" or '
                                        '"bridge" binding')


def _ports(raw: Any, path: str) -> tuple[int, ...]:
    ports: list[int] = []
    for j, port in enumerate(raw or []):
        number = _mapping(port, f"{path}.ports[{j}]").get("port")
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
            raise FieldError(f"{path}.ports[{j}].port", f"Invalid value: {number!r}: must be from 1 to 65535")
        ports.append(number)
    return tuple(ports)


def mac_address(interface: Interface, uid: str) -> str:
    """The interface's MAC: its macAddress, else one derived from the VM's uid (stable across restarts)."""
    if interface.mac:
        return interface.mac
    digest = hashlib.sha256(f"{uid}/{interface.name}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])  # QEMU's own prefix, as libvirt's


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
