"""The libvirt domain XML for a VM, built with ElementTree so nothing a user wrote can become markup.

Bottom layer, pure. Only validated values reach the document: DNS-1123 names, the
VM's uid, whole numbers, checked MAC addresses and NIC models, and file paths that
`disks.py` has already placed inside the data directory. Labels, annotations and
cloud-init data never go into the domain (the seed is a file, `seeds.py`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from vmquota.vmspec import VMSpec

METADATA_URI = "https://vmquota.io/xmlns/domain/1"
METADATA_KEY = "vmquota"
DOMAIN_PREFIX = "vmquota_"


def domain_name(namespace: str, name: str) -> str:
    """`vmquota_<ns>_<name>`: '_' never occurs in a DNS-1123 label, so the parts cannot run together."""
    return f"{DOMAIN_PREFIX}{namespace}_{name}"


def parse_domain_name(domain: str) -> tuple[str, str] | None:
    """(namespace, name) for a name `domain_name` could have made; None otherwise."""
    if not domain.startswith(DOMAIN_PREFIX):
        return None
    namespace, _, name = domain[len(DOMAIN_PREFIX):].partition("_")
    if not namespace or not name or "_" in name:
        return None
    return namespace, name


@dataclass(frozen=True)
class DomainDisk:
    path: Path
    target: str  # vda, vdb, ...


@dataclass(frozen=True)
class Seed:
    """The cloud-init seed ISO: read-only, as a CD-ROM on SATA or as one more virtio disk."""

    path: Path
    cdrom: bool


@dataclass(frozen=True)
class Nic:
    """A NIC on QEMU's user-mode network (NAT inside QEMU, no host interface, bridge or firewall rule), or, with
    `bridge`, a tap device on that host bridge (a name `vmspec.BRIDGE_NAME` has checked)."""

    mac: str
    model: str
    bridge: str | None = None


def build(*, namespace: str, name: str, uid: str, instance: str, spec: VMSpec, disks: list[DomainDisk],
          domain_type: str, seed: Seed | None = None, nics: tuple[Nic, ...] = (),
          console_log: Path | None = None) -> str:
    """The domain of one VM; `instance` names the vmquota installation that owns it."""
    domain = ET.Element("domain", {"type": domain_type})
    ET.SubElement(domain, "name").text = domain_name(namespace, name)
    ET.SubElement(domain, "uuid").text = uid
    ET.SubElement(domain, "title").text = f"{namespace}/{name}"
    metadata = ET.SubElement(domain, "metadata")
    ET.SubElement(metadata, f"{{{METADATA_URI}}}vm",
                  {"namespace": namespace, "name": name, "uid": uid, "instance": instance})
    memory_kib = str(int(spec.guest_memory) // 1024)
    ET.SubElement(domain, "memory", {"unit": "KiB"}).text = memory_kib
    ET.SubElement(domain, "currentMemory", {"unit": "KiB"}).text = memory_kib
    ET.SubElement(domain, "vcpu").text = str(spec.vcpus)
    # libvirt's default CPU model: host-passthrough fails on nested hosts that hide some MSRs.
    cpu = ET.SubElement(domain, "cpu")
    ET.SubElement(cpu, "topology", {"sockets": str(spec.sockets), "dies": "1", "cores": str(spec.cores),
                                    "threads": str(spec.threads)})
    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", {"arch": "x86_64"} if domain_type != "test" else {}).text = "hvm"
    ET.SubElement(os_element, "boot", {"dev": "hd"})
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")  # lets a stop ask the guest to shut down before forcing it off
    ET.SubElement(domain, "on_poweroff").text = "destroy"
    ET.SubElement(domain, "on_reboot").text = "restart"
    ET.SubElement(domain, "on_crash").text = "destroy"
    devices = ET.SubElement(domain, "devices")
    for disk in disks:
        element = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
        ET.SubElement(element, "driver", {"name": "qemu", "type": "qcow2"})
        ET.SubElement(element, "source", {"file": str(disk.path)})
        ET.SubElement(element, "target", {"dev": disk.target, "bus": "virtio"})
    if seed is not None:
        element = ET.SubElement(devices, "disk", {"type": "file", "device": "cdrom" if seed.cdrom else "disk"})
        ET.SubElement(element, "driver", {"name": "qemu", "type": "raw"})
        ET.SubElement(element, "source", {"file": str(seed.path)})
        target = "sda" if seed.cdrom else disk_targets(len(disks) + 1)[-1]
        ET.SubElement(element, "target", {"dev": target, "bus": "sata" if seed.cdrom else "virtio"})
        ET.SubElement(element, "readonly")
    for nic in nics:
        element = ET.SubElement(devices, "interface", {"type": "user" if nic.bridge is None else "bridge"})
        if nic.bridge is not None:
            ET.SubElement(element, "source", {"bridge": nic.bridge})
        ET.SubElement(element, "mac", {"address": nic.mac})
        ET.SubElement(element, "model", {"type": nic.model})
    if domain_type != "test":
        serial = ET.SubElement(devices, "serial", {"type": "pty"})
        if console_log is not None:  # virtlogd keeps what the console printed, for whoever opens it late
            ET.SubElement(serial, "log", {"file": str(console_log), "append": "off"})
        ET.SubElement(devices, "memballoon", {"model": "none"})
    ET.register_namespace(METADATA_KEY, METADATA_URI)
    return ET.tostring(domain, encoding="unicode")


def disk_targets(count: int) -> list[str]:
    """vda, vdb, ... vdz: virtio names for the attached disks, in volume order."""
    if count > 26:
        raise ValueError("at most 26 disks can be attached")
    return [f"vd{chr(ord('a') + i)}" for i in range(count)]


def attached_targets(spec: VMSpec) -> dict[str, str]:
    """Each attached disk's name -> the target device it gets in the domain (vda, vdb, ...)."""
    return dict(zip(spec.attached, disk_targets(len(spec.attached)), strict=True))
