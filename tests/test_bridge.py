"""Bridge networking: `bridge: {}` interfaces on `multus` networks whose networkName is a host bridge, on
libvirt's simulated host (which has no bridge, so a start is refused plainly) and in the domain XML. A bridge
joins the host's network, so a namespace's VMs may only join those its annotation `vmquota.io/bridges` lists,
and the name is held to a Linux interface name before it goes anywhere. `tests/e2e/test_kvm_bridge.py` attaches
a real guest to a real, throwaway bridge."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest
from conftest import Cluster, events_path, vm_manifest, wait_until

from vmquota import domainxml, vmspec
from vmquota.client import ClientError

BRIDGE = "vmqtestbr0"


def bridged_vm(name: str, bridge: str = BRIDGE, *, masquerade: bool = False, **iface: Any) -> dict[str, Any]:
    """A VM with a bridged NIC on a multus network (after a masquerade NIC on the pod network, if asked)."""
    manifest = vm_manifest(name, cores=1, memory="64Mi", disk="64Mi")
    template = manifest["spec"]["template"]["spec"]
    interfaces = [{"name": "lan", "bridge": {}, **iface}]
    networks: list[dict[str, Any]] = [{"name": "lan", "multus": {"networkName": bridge}}]
    if masquerade:
        interfaces.insert(0, {"name": "default", "masquerade": {}})
        networks.insert(0, {"name": "default", "pod": {}})
    template["domain"]["devices"]["interfaces"] = interfaces
    template["networks"] = networks
    return manifest


def allow_bridges(cluster: Cluster, bridges: str) -> None:
    cluster.client.patch(f"/api/v1/namespaces/{cluster.ns}", {"metadata": {"annotations": {
        "vmquota.io/bridges": bridges}}})


def refusal(cluster: Cluster, manifest: dict[str, Any]) -> ClientError:
    with pytest.raises(ClientError) as refused:
        cluster.create_vm(manifest)
    assert refused.value.code == 422
    return refused.value


@pytest.mark.parametrize("name", [
    "br0'/><interface type='ethernet", "../../etc/x", "a b", "", ".", "..", "br0;reboot", "x" * 16, "-br", "br:0",
])
def test_a_bridge_name_that_is_no_linux_interface_name_is_refused(cluster: Cluster, name: str) -> None:
    allow_bridges(cluster, name or "x")
    error = refusal(cluster, bridged_vm("web", name))
    assert "spec.template.spec.networks[0].multus.networkName: Invalid value" in error.message
    assert cluster.client.get(f"/apis/kubevirt.io/v1/namespaces/{cluster.ns}/virtualmachines")["items"] == []


def test_a_network_attachment_definition_name_gets_a_hint(cluster: Cluster) -> None:
    error = refusal(cluster, bridged_vm("web", "default/lan"))
    assert "not a NetworkAttachmentDefinition's namespace/name" in error.message


def test_a_bridge_the_namespace_is_not_allowed_is_forbidden(cluster: Cluster) -> None:
    error = refusal(cluster, bridged_vm("web"))
    assert (f"spec.template.spec.networks[0].multus.networkName: Forbidden: host bridge \"{BRIDGE}\" is not "
            f"allowed in namespace {cluster.ns}") in error.message
    allow_bridges(cluster, "br1, br2")
    assert "Forbidden" in refusal(cluster, bridged_vm("web")).message
    allow_bridges(cluster, f"br1, {BRIDGE}")
    assert cluster.create_vm(bridged_vm("web"))["metadata"]["name"] == "web"


@pytest.mark.parametrize(("change", "field", "why"), [
    (lambda m: m["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"][1].update(ports=[{"port": 80}]),
     "interfaces[1].ports", "ports are forwarded on a masquerade interface only"),
    (lambda m: m["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"].reverse(),
     "interfaces[1]", "the masquerade interface must be the first interface"),
    (lambda m: m["spec"]["template"]["spec"]["networks"].append({"name": "lan", "pod": {}}),
     "networks[2].name", "Duplicate value"),
])
def test_bridged_interfaces_are_checked(cluster: Cluster, change: Any, field: str, why: str) -> None:
    allow_bridges(cluster, BRIDGE)
    manifest = bridged_vm("web", masquerade=True)
    change(manifest)
    error = refusal(cluster, manifest)
    assert f"{field}: " in error.message and why in error.message


@pytest.mark.parametrize(("bridge", "words"), [
    (BRIDGE, f"host bridge {BRIDGE} does not exist on test:///default"),
    ("eth1", "host interface eth1 on test:///default is not a bridge (its type is ethernet)"),  # the test host's
])
def test_a_bridge_missing_on_the_host_is_a_clear_error_at_start(cluster: Cluster, bridge: str, words: str) -> None:
    allow_bridges(cluster, bridge)
    cluster.create_vm(bridged_vm("web", bridge))
    cluster.action("web", "start")
    wait_until(lambda: any(words in e["message"] for e in cluster.client.get(events_path(cluster.ns))["items"]),
               what="the start's failure")
    assert cluster.status("web") != "Running"
    assert cluster.app.hypervisor.observe(cluster.ns, "web").up is False  # no domain was started


def test_the_domain_has_a_bridge_interface_on_the_named_bridge_with_a_stable_mac() -> None:
    manifest = bridged_vm("web", masquerade=True, macAddress="02:00:00:00:00:aa")
    manifest["metadata"].update(namespace="dev", uid="8d3c2a8e-3f0e-4c3e-9a55-0c6f1f7d9b11")
    spec = vmspec.read(manifest)
    uid = manifest["metadata"]["uid"]
    nics = tuple(domainxml.Nic(vmspec.mac_address(i, uid), i.model, i.bridge) for i in spec.interfaces)
    xml = domainxml.build(namespace="dev", name="web", uid=uid, instance="i", spec=spec, disks=[],
                          domain_type="kvm", nics=nics)
    user, bridge = ET.fromstring(xml).findall("devices/interface")
    assert user.get("type") == "user" and user.find("source") is None
    assert bridge.get("type") == "bridge"
    assert bridge.find("source").attrib == {"bridge": BRIDGE}  # type: ignore[union-attr]
    assert bridge.find("mac").attrib == {"address": "02:00:00:00:00:aa"}  # type: ignore[union-attr]
    assert bridge.find("model").attrib == {"type": "virtio"}  # type: ignore[union-attr]
    assert [i.binding for i in spec.interfaces] == [vmspec.Binding.MASQUERADE, vmspec.Binding.BRIDGE]
