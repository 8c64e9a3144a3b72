"""Placement (issue 13): which node a start puts a VM on, and what a start gets when no node fits.

Three simulated hosts of known size (libvirt's test driver, one `test:///<file>` each) are Nodes; the server's
own `test:///default` node is cordoned, so every VM must go to one of them. What each test checks is what a
user sees through the API: the VM's `status.nodeName`, its VMI's, its printableStatus, its events and the
quota's `used`, never the controller's insides.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, events_path, open_app, simulated_host, vm_manifest, wait_until

from vmquota.app import NodeSettings
from vmquota.client import ClientError
from vmquota.controller.placement import Policy

NODES = "/api/v1/nodes"
GIB = 1024 * 1024  # KiB


def add_node(c: Cluster, tmp_path: Path, name: str, *, cpus: int, memory_gib: int,
             labels: dict[str, str] | None = None) -> None:
    uri = simulated_host(tmp_path / f"{name}.xml", cpus=cpus, memory_kib=memory_gib * GIB)
    c.client.post(NODES, {"metadata": {"name": name, "labels": labels or {}}, "spec": {"providerID": uri}})
    wait_until(lambda: c.client.get(f"{NODES}/{name}").get("status", {}).get("allocatable"),
               what=f"{name}'s first heartbeat")


def open_pool(tmp_path: Path, policy: Policy) -> Cluster:
    app = open_app(tmp_path / "data", node_settings=NodeSettings(heartbeat_seconds=0.2, grace_seconds=5.0,
                                                                 placement=policy))
    c = Cluster(app, "place")
    c.create_namespace("place")
    first = next(n["metadata"]["name"] for n in c.client.get(NODES)["items"])
    c.client.patch(f"{NODES}/{first}", {"spec": {"unschedulable": True}})  # room without end: kept out
    add_node(c, tmp_path, "small", cpus=4, memory_gib=4, labels={"disk": "ssd"})
    add_node(c, tmp_path, "big", cpus=4, memory_gib=8)
    return c


def close_pool(c: Cluster) -> None:
    for vm in c.client.get("/apis/kubevirt.io/v1/virtualmachines")["items"]:
        c.delete_vm(vm["metadata"]["name"], vm["metadata"]["namespace"])
    c.client.close()
    c.app.close()


@pytest.fixture
def spread(tmp_path: Path) -> Iterator[Cluster]:
    c = open_pool(tmp_path, Policy.SPREAD)
    try:
        yield c
    finally:
        close_pool(c)


@pytest.fixture
def pack(tmp_path: Path) -> Iterator[Cluster]:
    c = open_pool(tmp_path, Policy.PACK)
    try:
        yield c
    finally:
        close_pool(c)


def start(c: Cluster, name: str, memory: str, **extra: Any) -> None:
    c.create_vm(vm_manifest(name, cores=1, memory=memory, disk=None, **extra))
    c.action(name, "start")


def node_of(c: Cluster, name: str) -> str:
    c.wait_status(name, "Running")
    node = c.vm(name)["status"]["nodeName"]
    vmi = c.client.get(f"/apis/kubevirt.io/v1/namespaces/{c.ns}/virtualmachineinstances/{name}")
    assert vmi["status"]["nodeName"] == node
    return str(node)


def test_spread_puts_each_start_on_the_node_with_the_most_memory_left(spread: Cluster) -> None:
    placed = []
    for i in range(4):
        start(spread, f"vm-{i}", "2Gi")
        placed.append(node_of(spread, f"vm-{i}"))
    # big 8 -> 6 left; big 6 vs small 4 -> big (4 left); big 4 = small 4 -> by name: big; then small
    assert placed == ["big", "big", "big", "small"]


def test_pack_fills_the_fullest_node_that_still_fits(pack: Cluster) -> None:
    placed = []
    for i in range(3):
        start(pack, f"vm-{i}", "3Gi")
        placed.append(node_of(pack, f"vm-{i}"))
    assert placed == ["small", "big", "big"]  # small 4 -> 1 left, too little for 3Gi: big takes the next two


def test_a_node_selector_is_honoured(spread: Cluster) -> None:
    start(spread, "fast", "1Gi", template={"spec": {"nodeSelector": {"disk": "ssd"}, "domain": {
        "cpu": {"cores": 1}, "memory": {"guest": "1Gi"}, "devices": {"disks": []}}, "volumes": []}})
    assert node_of(spread, "fast") == "small"  # spread alone would have chosen big


def test_no_node_fits_the_vm_waits_unschedulable_with_the_schedulers_words_and_charges_nothing(
        spread: Cluster) -> None:
    spread.create_quota({"limits.memory": "64Gi", "limits.cpu": "64"})
    start(spread, "huge", "9Gi")
    spread.wait_status("huge", "ErrorUnschedulable")
    vm = spread.vm("huge")
    message = "0/3 nodes are available: 2 Insufficient memory, 1 node(s) were unschedulable."
    assert any(c.get("message") == message for c in vm["status"]["conditions"])
    assert "nodeName" not in vm["status"]
    assert spread.used()["limits.memory"] == "0"
    events = spread.client.get(events_path(spread.ns))["items"]
    assert [e["message"] for e in events if e["reason"] == "FailedScheduling"] == [message]


def test_an_unschedulable_vm_starts_once_a_node_has_room(spread: Cluster, tmp_path: Path) -> None:
    start(spread, "huge", "9Gi")
    spread.wait_status("huge", "ErrorUnschedulable")
    add_node(spread, tmp_path, "huge-host", cpus=8, memory_gib=16)
    wait_until(lambda: spread.status("huge") == "Running", timeout=20, what="the retry to place huge")
    assert node_of(spread, "huge") == "huge-host"


def test_a_stop_frees_the_node_for_the_next_start(spread: Cluster) -> None:
    for name, memory in (("a", "7Gi"), ("b", "3Gi")):
        start(spread, name, memory)
    assert (node_of(spread, "a"), node_of(spread, "b")) == ("big", "small")
    start(spread, "c", "4Gi")
    spread.wait_status("c", "ErrorUnschedulable")
    spread.action("a", "stop")
    spread.wait_status("a", "Stopped")
    wait_until(lambda: spread.status("c") == "Running", timeout=20, what="c to take a's place")
    assert node_of(spread, "c") == "big"


def test_a_quota_refusal_is_the_quotas_and_never_mentions_nodes(spread: Cluster) -> None:
    spread.create_quota({"limits.memory": "1Gi"})
    spread.create_vm(vm_manifest("web", cores=1, memory="2Gi", disk=None))
    with pytest.raises(ClientError) as refused:
        spread.action("web", "start")
    assert refused.value.code == 403 and "exceeded quota: compute" in refused.value.message
    assert "node" not in refused.value.message
