"""Issue 15's acceptance on the real Linux guest, through `vmquota serve --use-emulation`, the CLI and the API:
a disk imported over loopback HTTP, cloud-init user data, the serial console, a port forward, the guest's IP,
pause, a `poweroff` from inside that frees the compute charge, and a stop that is an ACPI shutdown.

The console and the port are opened with the hypervisor functions the server's subresources use
(`Hypervisor.open_console`, `Hypervisor.open_port`), from this process, as the server's installation.
"""

from __future__ import annotations

import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
import yaml
from conftest import Sampler, wait_until
from guest_harness import BOOT_TIMEOUT, Console, apply, guest_vm
from image_server import ImageServer
from kvm_harness import URI, Kvm, quota_doc

from vmquota import domainxml
from vmquota.hypervisor import Hypervisor

pytestmark = pytest.mark.kvm

MARKER = "vmquota-h5-marker-7f3a"
USER_DATA = f"""#!/bin/sh
echo "{MARKER} from user-data"
echo "{MARKER}" > /var/www/marker
"""


@pytest.fixture
def images(tmp_path: Path, guest_image: Path) -> Iterator[ImageServer]:
    root = tmp_path / "images"
    root.mkdir()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(guest_image), str(root / "guest.qcow2")],
                   check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(root / "huge.qcow2"), "4G"], check=True)
    with ImageServer(root).running() as server:
        yield server


def vm_path(kvm: Kvm, name: str) -> str:
    return f"/apis/kubevirt.io/v1/namespaces/{kvm.ns}/virtualmachines/{name}"


def vmi_action(kvm: Kvm, name: str, action: str) -> None:
    kvm.client.put(f"/apis/subresources.kubevirt.io/v1/namespaces/{kvm.ns}/virtualmachineinstances/{name}/{action}")


def status(kvm: Kvm, name: str) -> dict:
    return dict(kvm.client.get(vm_path(kvm, name)).get("status", {}))


def as_the_server(kvm: Kvm, name: str) -> tuple[Hypervisor, str]:
    """A hypervisor connection that acts as the server's installation (the instance its domains name)."""
    dom = kvm.domain(name)
    meta = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domainxml.METADATA_URI))
    hypervisor = Hypervisor(URI, instance=str(meta.get("instance")))
    hypervisor.connect()
    return hypervisor, str(meta.get("uid"))


def open_console(hypervisor: Hypervisor, kvm: Kvm, name: str, uid: str) -> Console:
    stream = hypervisor.open_console(kvm.ns, name, uid)
    return Console(stream.recv, stream.sendall)


def http_get(hypervisor: Hypervisor, kvm: Kvm, name: str, uid: str, path: str) -> str:
    with hypervisor.open_port(kvm.ns, name, uid, 80) as connection:
        connection.sendall(f"GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n".encode())
        reply = b""
        while chunk := connection.recv(4096):
            reply += chunk
    return reply.decode(errors="replace")


@pytest.mark.timeout(420)
def test_an_imported_guest_boots_runs_its_user_data_serves_and_shuts_down(guests: Kvm, images: ImageServer) -> None:
    guests.ok("apply", "-f", "-", input=quota_doc(guests.ns, {"limits.cpu": "2", "limits.memory": "1Gi",
                                                              "requests.storage": "2Gi"}))
    # Refused at once, charging nothing: an image larger than its disk, and a URL that answers 404.
    for url in (images.url("huge.qcow2"), images.url("nowhere.qcow2")):
        refused = guests.cli("apply", "-f", "-", input=yaml.safe_dump(
            {**guest_vm("nope", source={"http": {"url": url}}), "metadata": {"name": "nope", "namespace": guests.ns}}))
        assert refused.returncode == 1, refused.stderr
        assert "exceeds the requested storage 1Gi" in refused.stderr or "HTTP 404" in refused.stderr
    assert guests.used()["requests.storage"] == "0"

    images.bytes_per_second = 8 << 20  # slow enough for the import's progress to be seen
    with Sampler(guests.server.url, lambda c: c.get(vm_path(guests, "web")).get("status", {}).get(
            "dataVolumes", [{}])[0].get("phase") if _exists(c, vm_path(guests, "web")) else None) as phases:
        apply(guests, guest_vm("web", source={"http": {"url": images.url("guest.qcow2")}}, strategy="Manual",
                               grace=60, user_data=USER_DATA, ports=[80]))
        assert guests.used()["requests.storage"] == "1Gi"  # admitted against storage before the import
        wait_until(lambda: status(guests, "web").get("dataVolumes", [{}])[0].get("phase") == "Succeeded",
                   timeout=60, what="the import")
    assert "ImportInProgress" in phases.samples

    guests.ok("start", "web", "-n", guests.ns, "--wait")
    hypervisor, uid = as_the_server(guests, "web")
    try:
        console = open_console(hypervisor, guests, "web", uid)
        console.wait_for(f"{MARKER} from user-data")
        console.wait_for("vmquota-guest: ready")
        assert MARKER in http_get(hypervisor, guests, "web", uid, "/marker")
        [interface] = status(guests, "web")["interfaces"]
        assert interface["ipAddress"] == "10.0.2.15" and interface["name"] == "default"
        assert interface["mac"] in guests.domain("web").XMLDesc()
        assert "ip 10.0.2.15/24" in console.text  # what the guest itself got by DHCP

        vmi_action(guests, "web", "pause")
        wait_until(lambda: status(guests, "web")["printableStatus"] == "Paused", timeout=10, what="Paused")
        assert guests.used()["limits.cpu"] == "1"  # a paused VM still charges
        vmi_action(guests, "web", "unpause")
        wait_until(lambda: status(guests, "web")["printableStatus"] == "Running", timeout=10, what="unpaused")

        console.type("poweroff")  # from inside: a guest shutdown, and Manual does not start it again
        wait_until(lambda: status(guests, "web")["printableStatus"] == "Stopped", timeout=BOOT_TIMEOUT,
                   what="the guest to power itself off")
        assert status(guests, "web")["lastExit"] == "GuestShutdown"
        assert guests.used()["limits.cpu"] == "0" and guests.used()["limits.memory"] == "0"

        guests.ok("start", "web", "-n", guests.ns, "--wait")
        console = open_console(hypervisor, guests, "web", uid)
        console.wait_for("vmquota-guest: ready")
        asked = time.monotonic()
        guests.ok("stop", "web", "-n", guests.ns, "--grace-period", "60", "--wait")
        assert time.monotonic() - asked < 60  # the guest shut down by itself, not at the deadline
        console.wait_for("vmquota-guest: power button", timeout=5)  # ACPI's power button, seen by the guest
        assert guests.used()["limits.cpu"] == "0"
    finally:
        hypervisor.close()


def _exists(client: object, path: str) -> bool:
    try:
        client.get(path)  # type: ignore[attr-defined]
        return True
    except Exception:
        return False
