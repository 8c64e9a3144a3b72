"""A host that fails (issue 13): its VMs stay charged and are never started twice until an admin confirms the host
is off; then they are released, restarted elsewhere if their strategy says so, and a stale copy found when the
host comes back is forced off.

The hosts are simulated (`test:///<file>`); a host "fails" when every call of the server's connection to it
raises HypervisorUnavailable, which is what the controller sees of a libvirtd that does not answer.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, SimulatedPool, events_path, vm_manifest, wait_until

from vmquota import cli, errors
from vmquota.app import NodeSettings
from vmquota.client import ClientError

NODES = "/api/v1/nodes"


CALLS = ("host_info", "observe", "observe_all", "start", "destroy", "shutdown")


class Pool(SimulatedPool):
    def fail(self, node: str) -> None:
        host = self.host(node)

        def away(*_args: Any, **_kwargs: Any) -> Any:
            raise errors.HypervisorUnavailable(f"cannot reach libvirt at {host.uri}")
        for call in CALLS:
            setattr(host, call, away)

    def lose(self, node: str) -> None:
        """The node's host stops answering, until its node is NotReady."""
        self.fail(node)
        wait_until(lambda: self.ready(node) == "False", what=f"node {node} to turn NotReady")

    def heal(self, node: str) -> None:
        host = self.host(node)
        for call in CALLS:
            delattr(host, call)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = Pool(tmp_path, "lost", NodeSettings(heartbeat_seconds=0.1, grace_seconds=0.5))
    for name in ("a", "b"):
        p.add_node(name, labels={"rack": name})
    try:
        yield p
    finally:
        p.close()


def vmquota(url: str, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.run([*args, "--server", url])
    return code, out.getvalue(), err.getvalue()


def start_on_a(p: Pool, name: str, strategy: str = "Always") -> None:
    manifest = vm_manifest(name, cores=1, memory="1Gi", disk=None, strategy=strategy)
    p.c.create_vm(manifest)
    if strategy != "Always":
        p.c.action(name, "start")
    p.c.wait_status(name, "Running")
    assert p.c.vm(name)["status"]["nodeName"] == "a"  # spread, equal nodes: the first by name


def reasons(c: Cluster) -> list[str]:
    return [e["reason"] for e in c.client.get(events_path(c.ns))["items"]]


def test_a_silent_node_leaves_its_vms_charged_and_unknown_and_starts_no_second_copy(pool: Pool) -> None:
    c = pool.c
    c.create_quota({"limits.memory": "8Gi"})
    start_on_a(pool, "web")
    used = c.used()
    pool.lose("a")
    c.wait_status("web", "Unknown")
    ready = next(x for x in c.vm("web")["status"]["conditions"] if x["type"] == "Ready")
    assert ready["status"] == "Unknown" and ready["reason"] == "NodeUnreachable"
    for _ in range(5):  # a few more heartbeats and a recount: nothing moves on a timeout
        c.app.controller.resync()
    assert c.status("web") == "Unknown" and c.vm("web")["status"]["nodeName"] == "a"
    assert c.used() == used  # still charged: it may still run
    assert not pool.runs_on("b", "web")
    pool.heal("a")
    c.wait_status("web", "Running")
    assert c.vm("web")["status"]["ready"] is True
    assert c.used() == used


def test_confirm_down_releases_the_vms_restarts_them_elsewhere_and_removes_the_stale_copy(pool: Pool) -> None:
    c = pool.c
    c.create_quota({"limits.memory": "8Gi"})
    start_on_a(pool, "web")
    used = c.used()
    code, _out, err = vmquota(c.app.url, "node", "confirm-down", "a")
    assert code == 1 and "node/a is Ready" in err  # its host answers: refused, and nothing changed
    assert "taints" not in c.client.get(f"{NODES}/a")["spec"]

    pool.lose("a")
    assert vmquota(c.app.url, "node", "confirm-down", "a")[:2] == (0, "node/a confirmed down: its VMs are released\n")
    wait_until(lambda: c.vm("web")["status"].get("nodeName") == "b" and c.status("web") == "Running",
               what="web to run again on node b")
    assert pool.runs_on("b", "web")
    assert c.used() == used  # charged once, not twice
    assert "NodeLost" in reasons(c)

    pool.heal("a")  # the host was not off after all: its copy still runs, and is forced off
    assert pool.runs_on("a", "web")
    c.app.controller.resync()
    wait_until(lambda: not pool.runs_on("a", "web"), what="the stale copy on node a to be forced off")
    assert pool.runs_on("b", "web") and c.vm("web")["status"]["nodeName"] == "b"
    assert "StaleCopyRemoved" in reasons(c)
    assert c.used() == used


def test_a_manual_vm_on_a_node_confirmed_down_is_stopped_and_charges_nothing(pool: Pool) -> None:
    c = pool.c
    c.create_quota({"limits.memory": "8Gi"})
    start_on_a(pool, "db", strategy="Manual")
    pool.lose("a")
    vmquota(c.app.url, "node", "confirm-down", "a")
    c.wait_status("db", "Stopped")
    assert c.used()["limits.memory"] == "0"
    assert not pool.runs_on("b", "db")


def test_a_new_vm_is_not_placed_on_a_node_confirmed_down(pool: Pool) -> None:
    c = pool.c
    pool.lose("a")
    vmquota(c.app.url, "node", "confirm-down", "a")
    pool.heal("a")
    wait_until(lambda: pool.ready("a") == "True", what="node a to answer again")
    c.create_vm(vm_manifest("pinned", cores=1, memory="1Gi", disk=None, strategy="Always",
                            template={"spec": {"nodeSelector": {"rack": "a"}, "domain": {
                                "cpu": {"cores": 1}, "memory": {"guest": "1Gi"}, "devices": {"disks": []}},
                                "volumes": []}}))
    c.wait_status("pinned", "ErrorUnschedulable")
    message = next(x["message"] for x in c.vm("pinned")["status"]["conditions"] if x["type"] == "Failure")
    assert message == ("0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 1 node(s) "
                       "had untolerated taint {node.kubernetes.io/out-of-service: nodeshutdown}, 1 node(s) were "
                       "unschedulable.")


def test_a_bad_taint_is_refused_and_changes_nothing(pool: Pool) -> None:
    before = pool.c.client.get(f"{NODES}/a")
    with pytest.raises(ClientError) as refused:
        pool.c.client.patch(f"{NODES}/a", {"spec": {"taints": [{"key": "x", "effect": "Sometimes"}]}})
    assert refused.value.code == 422
    assert 'spec.taints[0].effect: Unsupported value: "Sometimes"' in refused.value.message
    assert pool.c.client.get(f"{NODES}/a")["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def copy_to(p: Pool, vm: str, node: str) -> None:
    """Behind vmquota's back: the VM's domain, as it runs on a, defined and started on `node` too."""
    source = p.host("a")._connection().lookupByName(f"vmquota_{p.c.ns}_{vm}")
    p.host(node)._connection().defineXML(source.XMLDesc(0)).create()


def test_a_domain_found_on_another_node_is_adopted_there_and_charged_once(pool: Pool) -> None:
    c = pool.c
    c.create_quota({"limits.memory": "8Gi"})
    start_on_a(pool, "web")
    used = c.used()
    copy_to(pool, "web", "b")
    pool.fail("a")  # moved while its own node could not be asked: the recount finds it on b alone
    pool.host("a")._connection().lookupByName(f"vmquota_{c.ns}_web").destroy()
    c.app.controller.resync()
    wait_until(lambda: c.vm("web")["status"].get("nodeName") == "b", what="web to be adopted on b")
    assert c.status("web") == "Running" and c.used() == used
    assert "FoundOnUnexpectedNode" in reasons(c)
    vmi = c.client.get(f"/apis/kubevirt.io/v1/namespaces/{c.ns}/virtualmachineinstances/web")
    assert vmi["status"]["nodeName"] == "b"
    pool.heal("a")


def test_a_second_copy_on_another_node_is_reported_and_charged_once(pool: Pool) -> None:
    c = pool.c
    c.create_quota({"limits.memory": "8Gi"})
    start_on_a(pool, "web")
    used = c.used()
    copy_to(pool, "web", "b")
    c.app.controller.resync()
    wait_until(lambda: "RunningTwice" in reasons(c), what="the second copy to be reported")
    c.app.controller.resync()  # reported once, not on every recount
    assert reasons(c).count("RunningTwice") == 1
    assert c.vm("web")["status"]["nodeName"] == "a" and c.used() == used
    pool.host("b")._connection().lookupByName(f"vmquota_{c.ns}_web").destroy()


def test_a_node_that_answers_again_without_its_vm_has_it_restarted_through_admission(pool: Pool) -> None:
    c = pool.c
    c.create_quota({"limits.memory": "8Gi"})
    start_on_a(pool, "web")
    used = c.used()
    pool.lose("a")
    c.wait_status("web", "Unknown")
    pool.host("a")._connection().lookupByName(f"vmquota_{c.ns}_web").destroy()  # it died while a was away
    pool.heal("a")
    wait_until(lambda: c.status("web") == "Running" and pool.runs_on(c.vm("web")["status"]["nodeName"], "web"),
               timeout=15, what="web to run again")
    assert sum(pool.runs_on(node, "web") for node in ("a", "b")) == 1
    assert c.used() == used
    assert "Crashed" in reasons(c)
