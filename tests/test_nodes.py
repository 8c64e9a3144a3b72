"""Nodes and VirtualMachineInstances (issue 13): the libvirt hosts as `v1` Nodes with their capacity and Ready
condition from a heartbeat, and a read-only VMI for each VM that holds a runtime, naming its node.

Simulated hosts: `test:///default` (the server's own) and `test:///<file>` hosts whose CPUs and memory the file
says, so the capacity each Node shows is checked against what the test itself wrote.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from conftest import Cluster, open_app, simulated_host, vm_manifest, wait_until

from vmquota import cli
from vmquota.app import NodeSettings
from vmquota.client import Client, ClientError
from vmquota.controller import nodes
from vmquota.objects import VIRTUAL_MACHINE as VM

NODES = "/api/v1/nodes"


def vmis(ns: str) -> str:
    return f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachineinstances"


def ready(node: dict[str, Any]) -> str | None:
    return next((c["status"] for c in node.get("status", {}).get("conditions", []) if c["type"] == "Ready"), None)


@pytest.fixture
def fast(tmp_path: Path) -> Iterator[Cluster]:
    """A server whose heartbeat looks at the nodes every 0.2 s and calls a silent one NotReady after 1 s."""
    app = open_app(tmp_path / "data", node_settings=NodeSettings(heartbeat_seconds=0.2, grace_seconds=1.0))
    c = Cluster(app, "nodes")
    c.create_namespace("nodes")
    try:
        yield c
    finally:
        for vm in c.client.get("/apis/kubevirt.io/v1/virtualmachines")["items"]:
            c.delete_vm(vm["metadata"]["name"], vm["metadata"]["namespace"])
        c.client.close()
        app.close()


def first_node(c: Cluster) -> dict[str, Any]:
    items = c.client.get(NODES)["items"]
    return next(n for n in items if n["spec"]["providerID"] == "test:///default")


def test_the_servers_hypervisor_is_the_first_node_with_the_hosts_capacity(cluster: Cluster) -> None:
    conn = libvirt.open("test:///default")
    try:
        _model, memory_mib, cpus, *_ = conn.getInfo()
        hostname = conn.getHostname()
    finally:
        conn.close()
    node = first_node(cluster)
    assert node["metadata"]["name"] == hostname.split(".")[0].lower()
    assert node["metadata"]["labels"]["kubernetes.io/hostname"] == node["metadata"]["name"]
    assert node["status"]["capacity"] == {"cpu": str(cpus), "memory": f"{memory_mib // 1024}Gi"}
    # the test driver's capacity is a fiction that one-host use never had to fit: its node overcommits without end
    assert node["metadata"]["annotations"] == {"vmquota.io/cpu-overcommit": "1000000",
                                               "vmquota.io/memory-overcommit": "1000000"}
    assert node["status"]["allocatable"] == {"cpu": f"{cpus}M", "memory": f"{memory_mib // 1024 * 1000000}Gi"}
    assert ready(node) == "True"
    assert node["status"]["nodeInfo"]["kubeletVersion"].startswith("v")


def node_uids(tmp_path: Path) -> list[str]:
    app = open_app(tmp_path / "data")
    client = Client(app.url)
    try:
        return [n["metadata"]["uid"] for n in client.get(NODES)["items"]]
    finally:
        client.close()
        app.close()


def test_a_restarted_server_keeps_its_first_node(tmp_path: Path) -> None:
    first = node_uids(tmp_path)
    assert len(first) == 1 and node_uids(tmp_path) == first


def test_a_running_vm_has_a_read_only_vmi_on_its_node_until_it_is_off(cluster: Cluster) -> None:
    node = first_node(cluster)["metadata"]["name"]
    vm = cluster.create_vm(vm_manifest("web", disk=None, memory="64Mi"))
    assert cluster.client.get(vmis(cluster.ns))["items"] == []  # stopped: no instance
    cluster.action("web", "start")
    cluster.wait_status("web", "Running")
    vmi = cluster.client.get(f"{vmis(cluster.ns)}/web")
    assert vmi["status"]["phase"] == "Running" and vmi["status"]["nodeName"] == node
    assert vmi["metadata"]["ownerReferences"] == [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                                   "name": "web", "uid": vm["metadata"]["uid"],
                                                   "controller": True, "blockOwnerDeletion": True}]
    assert vmi["spec"] == vm["spec"]["template"]["spec"]
    for method in ("DELETE", "PUT"):
        with pytest.raises(ClientError) as refused:
            cluster.client.request(method, f"{vmis(cluster.ns)}/web", vmi)
        assert refused.value.code == 405
    cluster.action("web", "stop")
    cluster.wait_status("web", "Stopped")
    assert cluster.client.get(vmis(cluster.ns))["items"] == []


def test_a_vm_created_running_names_its_own_uid_in_its_vmi(cluster: Cluster) -> None:
    vm = cluster.create_vm(vm_manifest("always", disk=None, memory="64Mi", strategy="Always"))
    cluster.wait_status("always", "Running")
    vmi = cluster.client.get(f"{vmis(cluster.ns)}/always")
    assert vmi["metadata"]["ownerReferences"][0]["uid"] == vm["metadata"]["uid"]


def test_a_node_added_by_the_admin_shows_its_hosts_capacity_with_overcommit_and_reservation(
        fast: Cluster, tmp_path: Path) -> None:
    uri = simulated_host(tmp_path / "host-b.xml", cpus=4, memory_kib=8 * 1024 * 1024)
    fast.client.post(NODES, {"metadata": {"name": "host-b", "annotations": {
        "vmquota.io/cpu-overcommit": "2", "vmquota.io/reserved-memory": "1Gi"}},
        "spec": {"providerID": uri}, "status": {"capacity": {"cpu": "999"}}})  # a status sent is not kept
    node = wait_until(lambda: (n := fast.client.get(f"{NODES}/host-b")).get("status", {}).get("capacity") and n,
                      what="host-b's first heartbeat")
    assert node["status"]["capacity"] == {"cpu": "4", "memory": "8Gi"}
    assert node["status"]["allocatable"] == {"cpu": "8", "memory": "7Gi"}
    assert ready(node) == "True"


def test_a_node_whose_libvirt_does_not_answer_turns_not_ready_after_the_grace_period(
        fast: Cluster, tmp_path: Path) -> None:
    fast.client.post(NODES, {"metadata": {"name": "away"},
                             "spec": {"providerID": f"qemu+unix:///system?socket={tmp_path}/no-such-sock"}})
    node = wait_until(lambda: ready(n := fast.client.get(f"{NODES}/away")) == "False" and n, timeout=15,
                      what="the node to turn NotReady")
    condition = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert condition["reason"] == "HypervisorUnreachable"
    assert "no-such-sock" in condition["message"]
    assert ready(first_node(fast)) == "True"  # one silent host does not stall the others' heartbeat


@pytest.mark.parametrize(("spec", "annotations", "words"), [
    ({"providerID": "http://host/system"}, {}, "spec.providerID: the scheme must be one of"),
    ({}, {}, "spec.providerID: Required value"),
    ({"providerID": "qemu:///system\nx"}, {}, "without spaces or control characters"),
    ({"providerID": "test:///default"}, {}, "Duplicate value: node"),
    ({"providerID": "qemu+ssh://b/system", "unschedulable": "yes"}, {}, "spec.unschedulable: must be true or false"),
    ({"providerID": "qemu+ssh://b/system"}, {"vmquota.io/cpu-overcommit": "0"}, "must be positive"),
    ({"providerID": "qemu+ssh://b/system"}, {"vmquota.io/reserved-memory": "lots"}, "must be a quantity"),
    ({"providerID": "qemu+ssh://b/system"}, {"vmquota.io/migration-bandwidth": "512Ki"}, "of at least 1Mi"),
    ({"providerID": "qemu+ssh://b/system"}, {"vmquota.io/migration-bandwidth": "fast"}, "must be a quantity of"),
])
def test_a_bad_node_is_refused_with_the_field_and_changes_nothing(cluster: Cluster, spec: dict[str, Any],
                                                                   annotations: dict[str, str], words: str) -> None:
    before = cluster.client.get(NODES)["items"]
    with pytest.raises(ClientError) as refused:
        cluster.client.post(NODES, {"metadata": {"name": "bad", "annotations": annotations}, "spec": spec})
    assert refused.value.code == 422 and words in refused.value.message
    assert cluster.client.get(NODES)["items"] == before


def test_a_nodes_host_cannot_be_changed(cluster: Cluster) -> None:
    name = first_node(cluster)["metadata"]["name"]
    with pytest.raises(ClientError) as refused:
        cluster.client.patch(f"{NODES}/{name}", {"spec": {"providerID": "qemu+ssh://elsewhere/system"}})
    assert refused.value.code == 422 and "the host of a node cannot change" in refused.value.message


def vmquota(url: str, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.run([*args, "--server", url])
    return code, out.getvalue()


def test_the_cli_lists_describes_cordons_and_uncordons_nodes(cluster: Cluster) -> None:
    name = first_node(cluster)["metadata"]["name"]
    cluster.create_vm(vm_manifest("web", disk=None, memory="64Mi", strategy="Always"))
    cluster.wait_status("web", "Running")
    assert vmquota(cluster.app.url, "get", "nodes")[1].splitlines()[1].split()[:2] == [name, "Ready"]
    code, text = vmquota(cluster.app.url, "describe", "node", name)
    rows = [line.split() for line in text.splitlines() if " web " in line]
    assert code == 0 and rows == [[cluster.ns, "web", "Running", "200m", "64Mi"]]  # 2 vCPUs: 2/10 requested
    assert "  cpu:    200m / 16M" in text and "  memory: 64Mi / 3000000Gi" in text
    assert vmquota(cluster.app.url, "cordon", name) == (0, f"node/{name} cordoned\n")
    assert cluster.client.get(f"{NODES}/{name}")["spec"]["unschedulable"] is True
    assert "Ready,SchedulingDisabled" in vmquota(cluster.app.url, "get", "nodes")[1]
    assert vmquota(cluster.app.url, "cordon", name) == (0, f"node/{name} already cordoned\n")
    assert vmquota(cluster.app.url, "uncordon", name) == (0, f"node/{name} uncordoned\n")
    assert "unschedulable" not in cluster.client.get(f"{NODES}/{name}")["spec"]
    code, text = vmquota(cluster.app.url, "get", "vmis", "-n", cluster.ns)
    assert code == 0 and text.splitlines()[1].split()[2:] == ["Running", name]


@pytest.mark.parametrize(("value", "mib"), [(None, 0), ("1Mi", 1), ("64Mi", 64), ("1.5Mi", 1), ("1G", 953)])
def test_a_nodes_migration_bandwidth_is_in_whole_mib_a_second_as_libvirt_takes_it(value: str | None,
                                                                                   mib: int) -> None:
    annotations = {} if value is None else {nodes.MIGRATION_BANDWIDTH: value}
    assert nodes.migration_bandwidth_mib({"metadata": {"name": "n", "annotations": annotations}}) == mib


def test_a_vm_left_unknown_by_an_earlier_server_shows_its_phase_once_its_node_answers(tmp_path: Path) -> None:
    app = open_app(tmp_path / "data")
    c = Cluster(app, "again")
    c.create_namespace("again")
    c.create_vm(vm_manifest("web", disk=None, memory="64Mi", strategy="Always"))
    c.wait_status("web", "Running")
    with app.store.transaction() as txn:  # what a server that saw the node NotReady, then stopped, left behind
        vm = txn.get(VM, "again", "web")
        assert vm is not None
        vm["status"]["printableStatus"] = "Unknown"
        txn.update(VM, vm)
    c.client.close()
    app.close()
    app = open_app(tmp_path / "data")
    c = Cluster(app, "again")
    try:
        c.wait_status("web", "Running")
        assert c.vm("web")["status"]["ready"] is True
    finally:
        c.delete_vm("web")
        c.client.close()
        app.close()
