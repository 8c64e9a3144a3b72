"""The guest side of a VM on libvirt's simulated host: cloud-init, interfaces and the VMI's pause, unpause and
softreboot, and the refusals of what vmquota cannot give."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Cluster, wait_until
from guest_harness import guest_vm

from vmquota.client import ClientError


def vmi_action(cluster: Cluster, name: str, action: str) -> None:
    cluster.client.put(f"/apis/subresources.kubevirt.io/v1/namespaces/{cluster.ns}/virtualmachineinstances/"
                       f"{name}/{action}")


def with_spec(name: str, change: Any) -> dict[str, Any]:
    manifest = guest_vm(name, disk="64Mi", memory="64Mi", user_data="#!/bin/sh\necho hi\n", ports=[80])
    change(manifest["spec"]["template"]["spec"])  # type: ignore[index]
    return manifest


@pytest.mark.parametrize(("change", "field", "why"), [
    (lambda t: t["domain"]["devices"]["interfaces"][0].update(masquerade=None, bridge={}) or
     t["domain"]["devices"]["interfaces"][0].pop("masquerade"),
     "spec.template.spec.domain.devices.interfaces[0].bridge", "vmquota has no pod to bridge"),
    (lambda t: t["networks"][0].update(pod=None, multus={"networkName": "x"}) or t["networks"][0].pop("pod"),
     "spec.template.spec.domain.devices.interfaces[0].masquerade", "masquerade is for the pod network"),
    (lambda t: t["domain"]["devices"]["interfaces"][0].update(macAddress="01:00:5e:00:00:01"),
     "spec.template.spec.domain.devices.interfaces[0].macAddress", "a unicast MAC address"),
    (lambda t: t["volumes"][1]["cloudInitNoCloud"].update(userData="x" * (64 * 1024 + 1)),
     "spec.template.spec.volumes[1].cloudInitNoCloud.userData", "Too long"),
    (lambda t: t["volumes"][1]["cloudInitNoCloud"].update(userDataBase64="aGk="),
     "spec.template.spec.volumes[1].cloudInitNoCloud.userData", "mutually exclusive"),
    (lambda t: t["volumes"][1]["cloudInitNoCloud"].update(userDataSecretRef={"name": "s"}),
     "spec.template.spec.volumes[1].cloudInitNoCloud.userDataSecretRef", "vmquota has no Secrets"),
])
def test_what_vmquota_cannot_give_a_guest_is_refused_naming_the_field(cluster: Cluster, change: Any, field: str,
                                                                      why: str) -> None:
    with pytest.raises(ClientError) as refused:
        cluster.create_vm(with_spec("web", change))
    assert refused.value.code == 422
    assert f"{field}: " in refused.value.message and why in refused.value.message


@pytest.mark.parametrize(("source", "field"), [
    ({"http": {"url": "ftp://127.0.0.1/disk.img"}}, "http.url"),
    ({"http": {"url": "http://127.0.0.1/d.img", "checksum": "sha256:abc"}}, "http.checksum"),
    ({"registry": {"url": "docker://x"}}, "registry"),
    ({"pvc": {"namespace": "elsewhere", "name": "disk"}}, "pvc.namespace"),
])
def test_a_disk_source_is_checked(cluster: Cluster, source: dict[str, Any], field: str) -> None:
    manifest = guest_vm("web", disk="64Mi", memory="64Mi", source=source)
    with pytest.raises(ClientError) as refused:
        cluster.create_vm(manifest)
    assert f"spec.dataVolumeTemplates[0].spec.source.{field}: " in refused.value.message


def test_a_running_guest_lists_its_interface_and_gets_its_seed_never_in_the_domain_xml(cluster: Cluster) -> None:
    manifest = with_spec("web", lambda t: t["domain"]["devices"]["interfaces"][0].update(
        macAddress="02:00:00:aa:bb:cc"))
    cluster.create_vm(manifest)
    cluster.action("web", "start")
    cluster.wait_status("web", "Running")
    [interface] = cluster.vm("web")["status"]["interfaces"]
    assert interface == {"name": "default", "mac": "02:00:00:aa:bb:cc", "ipAddress": "10.0.2.15",
                         "ipAddresses": ["10.0.2.15"], "infoSource": "domain"}
    xml = cluster.domain("web").XMLDesc()
    assert "<interface type='user'>" in xml and "02:00:00:aa:bb:cc" in xml
    assert "cloudinit.iso" in xml and "echo hi" not in xml
    uid = cluster.vm("web")["metadata"]["uid"]
    assert (cluster.app.controller.disks.vm_dir(cluster.ns, uid) / "cloudinit.iso").read_bytes().count(b"echo hi")
    cluster.action("web", "stop")
    cluster.wait_status("web", "Stopped")
    assert "interfaces" not in cluster.vm("web")["status"]


def test_a_mac_derived_from_the_uid_stays_the_same_across_restarts(cluster: Cluster) -> None:
    cluster.create_vm(with_spec("web", lambda t: None))
    macs = []
    for _ in range(2):
        cluster.action("web", "start")
        cluster.wait_status("web", "Running")
        macs.append(cluster.vm("web")["status"]["interfaces"][0]["mac"])
        cluster.action("web", "stop")
        cluster.wait_status("web", "Stopped")
    assert macs[0] == macs[1] and macs[0].startswith("52:54:00:")


def test_pause_and_unpause_keep_the_charge(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "2"})
    cluster.create_vm(with_spec("web", lambda t: None))
    with pytest.raises(ClientError, match="VMI is not running"):
        vmi_action(cluster, "web", "pause")
    cluster.action("web", "start")
    cluster.wait_status("web", "Running")
    vmi_action(cluster, "web", "pause")
    cluster.wait_status("web", "Paused")
    assert cluster.used() == {"limits.cpu": "1"}
    with pytest.raises(ClientError, match="VMI is already paused"):
        vmi_action(cluster, "web", "pause")
    vmi_action(cluster, "web", "unpause")
    cluster.wait_status("web", "Running")
    vmi_action(cluster, "web", "softreboot")
    wait_until(lambda: "guestRequest" not in cluster.vm("web")["status"], what="the soft reboot to be done")
    assert cluster.used() == {"limits.cpu": "1"}
