"""A bridged NIC on real KVM: the guest's tap device joins a real host bridge.

The bridge is a throwaway one, `vmqtestbr0`, made for the test with `ip link add` and deleted afterwards. It has
no other port and no address, so nothing leaves the host: it only shows that libvirt puts the guest's tap device
on the bridge that the VM's multus network names.
"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import vm_manifest, wait_until
from kvm_harness import Kvm, Server, namespace_on

pytestmark = pytest.mark.kvm

BRIDGE = "vmqtestbr0"


@pytest.fixture
def bridge() -> Iterator[str]:
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        pytest.fail(f"{BRIDGE} exists already: a bridge left by another run, or not ours to use")
    made = subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], capture_output=True, text=True,
                          check=False)
    if made.returncode != 0:
        pytest.skip(f"this machine does not let the test make a bridge: {made.stderr.strip()}")
    try:
        yield BRIDGE
    finally:
        subprocess.run(["ip", "link", "del", BRIDGE], check=True)


@pytest.fixture
def upl(server: Server) -> Iterator[Kvm]:
    with namespace_on(server, "upl") as k:
        yield k


def test_a_bridge_interface_puts_the_guests_tap_device_on_the_host_bridge(upl: Kvm, bridge: str) -> None:
    upl.client.patch(f"/api/v1/namespaces/{upl.ns}", {"metadata": {"annotations": {"vmquota.io/bridges": bridge}}})
    manifest = vm_manifest("uplbr", cores=1, memory="64Mi", disk="16Mi")
    manifest["metadata"]["namespace"] = upl.ns
    template = manifest["spec"]["template"]["spec"]
    template["domain"]["devices"]["interfaces"] = [{"name": "lan", "bridge": {}, "macAddress": "02:00:00:0a:0b:0c"}]
    template["networks"] = [{"name": "lan", "multus": {"networkName": bridge}}]
    upl.ok("apply", "-f", "-", input=yaml.safe_dump(manifest))
    upl.ok("start", "uplbr", "-n", upl.ns, "--wait")

    [nic] = ET.fromstring(upl.domain("uplbr").XMLDesc()).findall("devices/interface")
    assert nic.get("type") == "bridge"
    assert nic.find("source").get("bridge") == bridge  # type: ignore[union-attr]
    assert nic.find("mac").get("address") == "02:00:00:0a:0b:0c"  # type: ignore[union-attr]
    tap = nic.find("target").get("dev")  # type: ignore[union-attr]
    assert (Path(f"/sys/class/net/{bridge}/brif") / str(tap)).exists()
    vmi = upl.client.get(f"/apis/kubevirt.io/v1/namespaces/{upl.ns}/virtualmachineinstances/uplbr")
    assert vmi["status"]["interfaces"] == [{"name": "lan", "mac": "02:00:00:0a:0b:0c", "infoSource": "domain"}]

    upl.ok("stop", "uplbr", "-n", upl.ns, "--wait")
    wait_until(lambda: not any(Path(f"/sys/class/net/{bridge}/brif").iterdir()), what="the tap device to go")
