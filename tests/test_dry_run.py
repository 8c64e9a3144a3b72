"""`dryRun=All` on every write: the answer is the real one (the object as it would be, or the exact refusal),
and nothing changes: no object, no charge, no event, no queued controller work, no resourceVersion taken.

Through HTTP, the `vmquota` CLI, and the real kubectl 1.32 (`--dry-run=server`).
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import Cluster, clones_path, events_path, quotas_path, vm_manifest, vms_path

from vmquota import objects
from vmquota.client import ClientError, action_path
from vmquota.store import Store

KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.1.32"
DRY = "?dryRun=All"


def request(cluster: Cluster, method: str, path: str, body: Any = None,
            content_type: str = "application/json") -> tuple[int, Any]:
    parts = urlsplit(cluster.app.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        payload = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(method, path, body=payload, headers={"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def state(cluster: Cluster) -> dict[str, Any]:
    """Everything a dry run must leave as it was."""
    reader = cluster.app.store.reader()
    return {
        "revision": cluster.app.store.revision,
        "vms": cluster.client.get(vms_path(cluster.ns))["items"],
        "quotas": cluster.client.get(quotas_path(cluster.ns))["items"],
        "events": cluster.client.get(events_path(cluster.ns))["items"],
        "clones": cluster.client.get(clones_path(cluster.ns))["items"],
        "namespaces": cluster.client.get("/api/v1/namespaces")["items"],
        "charges": sorted(reader.charges(cluster.ns)),
    }


def unchanged(cluster: Cluster, before: dict[str, Any]) -> None:
    assert cluster.app.controller.queue.idle(), "a dry run queued controller work"
    assert state(cluster) == before
    assert cluster.app.store.reader().changes(before["revision"]) == [], "a watcher would see a dry run"


def test_a_dry_run_transaction_sees_its_own_writes_then_keeps_none(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.db")
    with store.transaction() as txn:
        txn.create(objects.NAMESPACE, {"metadata": {"name": "dev"}})
    revision, called = store.revision, []
    with store.transaction(dry_run=True) as txn:
        txn.create(objects.NAMESPACE, {"metadata": {"name": "dry"}})
        txn.set_charge("dev", "web-1", {})
        txn.after_commit(lambda: called.append("callback"))
        assert txn.exists(objects.NAMESPACE, "", "dry")
        with store.transaction() as nested:  # joins the dry run, and is undone with it
            nested.delete(objects.NAMESPACE, "", "dev")
    reader = store.reader()
    assert [n for _, n in reader.names(objects.NAMESPACE)] == ["dev"]
    assert list(reader.charges()) == [] and called == [] and store.revision == revision
    with store.transaction() as txn:  # the next real write takes the next resourceVersion
        assert txn.create(objects.NAMESPACE, {"metadata": {"name": "b"}})["metadata"]["resourceVersion"] == \
            str(revision + 1)
        with pytest.raises(RuntimeError), store.transaction(dry_run=True):  # it would be committed with it
            pass
    store.close()


@pytest.fixture
def quota(cluster: Cluster) -> Cluster:
    cluster.create_quota({"limits.cpu": "4", "limits.memory": "4Gi", "requests.storage": "20Gi",
                          "count/virtualmachines.kubevirt.io": "3"})
    return cluster


def test_dry_run_create_answers_the_object_and_keeps_nothing(quota: Cluster) -> None:
    quota.settle()
    before = state(quota)
    code, vm = request(quota, "POST", vms_path(quota.ns) + DRY, vm_manifest("web-1"))
    assert code == 201
    assert vm["metadata"]["name"] == "web-1" and vm["metadata"]["uid"]
    assert "resourceVersion" not in vm["metadata"]  # none was taken
    assert vm["status"]["printableStatus"] == "Stopped"
    unchanged(quota, before)
    # The name is still free: the real create succeeds, after the resourceVersion the dry run left.
    created = quota.create_vm(vm_manifest("web-1"))
    assert int(created["metadata"]["resourceVersion"]) == before["revision"] + 1 + len(before["quotas"])


def test_dry_run_create_is_refused_exactly_as_the_real_one(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("big", cores=4, memory="4Gi", strategy="Always"))
    quota.wait_status("big", "Running")
    quota.settle()
    before = state(quota)
    code, dry = request(quota, "POST", vms_path(quota.ns) + DRY, vm_manifest("more", strategy="Always"))
    assert code == 403
    unchanged(quota, before)
    real_code, real = request(quota, "POST", vms_path(quota.ns), vm_manifest("more", strategy="Always"))
    assert (real_code, real) == (code, dry)
    assert "exceeded quota: compute" in dry["message"]


def test_dry_run_replace_patch_and_delete_answer_what_would_be(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1"))
    quota.settle()
    vm = quota.vm("web-1")
    before = state(quota)
    path = f"{vms_path(quota.ns)}/web-1"
    rv = vm["metadata"]["resourceVersion"]

    vm["metadata"]["labels"] = {"tier": "web"}
    code, replaced = request(quota, "PUT", path + DRY, vm)
    assert code == 200 and replaced["metadata"]["labels"] == {"tier": "web"}
    assert replaced["metadata"]["resourceVersion"] == rv

    code, patched = request(quota, "PATCH", path + DRY, {"spec": {"template": {"spec": {"domain": {
        "memory": {"guest": "3Gi"}}}}}}, "application/merge-patch+json")
    assert code == 200 and patched["spec"]["template"]["spec"]["domain"]["memory"]["guest"] == "3Gi"

    code, deleted = request(quota, "DELETE", path + DRY)
    assert code == 200 and deleted["metadata"]["deletionTimestamp"]
    # kubectl sends its dryRun in the DeleteOptions body.
    code, deleted = request(quota, "DELETE", path, {"kind": "DeleteOptions", "apiVersion": "v1", "dryRun": ["All"]})
    assert code == 200 and deleted["metadata"]["deletionTimestamp"]
    unchanged(quota, before)
    assert quota.status("web-1") == "Stopped"


def test_dry_run_of_a_quota_below_usage_is_refused_and_of_a_namespace_delete_keeps_it(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1"))
    quota.settle()
    before = state(quota)
    code, status = request(quota, "PATCH", f"{quotas_path(quota.ns)}/compute" + DRY,
                           {"spec": {"hard": {"requests.storage": "1Gi"}}}, "application/merge-patch+json")
    assert code == 403 and "cannot be set below current usage" in status["message"]
    code, _ = request(quota, "DELETE", f"/api/v1/namespaces/{quota.ns}/resourcequotas/compute" + DRY)
    assert code == 200
    unchanged(quota, before)


def test_dry_run_start_admits_or_refuses_like_the_real_start_and_starts_nothing(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1"))
    quota.create_vm(vm_manifest("web-2"))
    quota.create_vm(vm_manifest("web-3"))
    quota.settle()
    before = state(quota)
    code, answer = request(quota, "PUT", action_path(quota.ns, "web-1", "start") + DRY)
    assert (code, answer["status"]) == (202, "Success")
    code, answer = request(quota, "PUT", action_path(quota.ns, "web-1", "start"), {"dryRun": ["All"]})  # virtctl's
    assert code == 202
    unchanged(quota, before)
    assert quota.status("web-1") == "Stopped"

    quota.action("web-1", "start")
    quota.action("web-2", "start")
    quota.wait_status("web-2", "Running")
    quota.settle()
    before = state(quota)
    code, dry = request(quota, "PUT", action_path(quota.ns, "web-3", "start") + DRY)
    assert code == 403
    assert dry["message"] == ('virtualmachines.kubevirt.io "web-3" is forbidden: exceeded quota: compute, requested: '
                              "limits.cpu=2,limits.memory=2Gi, used: limits.cpu=4,limits.memory=4Gi, limited: "
                              "limits.cpu=4,limits.memory=4Gi")
    unchanged(quota, before)
    real_code, real = request(quota, "PUT", action_path(quota.ns, "web-3", "start"))
    assert (real_code, real) == (code, dry)


def test_dry_run_stop_and_restart_change_nothing(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1", strategy="Always"))
    quota.wait_status("web-1", "Running")
    quota.settle()
    before = state(quota)
    for action in ("stop", "restart"):
        code, _ = request(quota, "PUT", action_path(quota.ns, "web-1", action) + DRY)
        assert code == 202, action
    code, _ = request(quota, "PUT", action_path(quota.ns, "web-1", "stop"), {"gracePeriod": 0, "dryRun": ["All"]})
    assert code == 202
    unchanged(quota, before)
    assert quota.status("web-1") == "Running"


def test_dry_run_clone_makes_no_target(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1"))
    quota.settle()
    before = state(quota)
    clone = {"apiVersion": "clone.kubevirt.io/v1beta1", "kind": "VirtualMachineClone", "metadata": {"name": "c1"},
             "spec": {"source": {"kind": "VirtualMachine", "name": "web-1"},
                      "target": {"kind": "VirtualMachine", "name": "web-2"}}}
    code, answer = request(quota, "POST", clones_path(quota.ns) + DRY, clone)
    assert code == 201 and answer["status"]["phase"] == "Succeeded"
    unchanged(quota, before)
    # Over the count quota, the dry run says so as the clone itself would.
    quota.create_vm(vm_manifest("web-3"))
    quota.create_vm(vm_manifest("web-4"))
    quota.settle()
    before = state(quota)
    code, status = request(quota, "POST", clones_path(quota.ns) + DRY, clone)
    assert code == 403 and "count/virtualmachines.kubevirt.io" in status["message"]
    unchanged(quota, before)


@pytest.mark.parametrize(("method", "suffix", "options"), [
    ("POST", "", "CreateOptions"), ("PUT", "/web-1", "UpdateOptions"), ("PATCH", "/web-1", "PatchOptions"),
    ("DELETE", "/web-1", "DeleteOptions")])
def test_any_other_dry_run_value_is_refused_before_anything_is_done(quota: Cluster, method: str, suffix: str,
                                                                     options: str) -> None:
    quota.create_vm(vm_manifest("web-1"))
    quota.settle()
    vm = quota.vm("web-1")
    before = state(quota)
    body = None if method == "DELETE" else vm if method == "PUT" else {"metadata": {"labels": {"a": "b"}}} \
        if method == "PATCH" else vm_manifest("web-2")
    code, status = request(quota, method, vms_path(quota.ns) + suffix + "?dryRun=Yes", body,
                           "application/merge-patch+json" if method == "PATCH" else "application/json")
    assert code == 422 and status["reason"] == "Invalid"
    assert status["message"] == (f'{options}.meta.k8s.io "" is invalid: dryRun: Unsupported value: '
                                 '[]string{"Yes"}: supported values: "All"')
    unchanged(quota, before)


def vmquota_cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VMQUOTA_SERVER", "KUBECONFIG")}
    return subprocess.run([sys.executable, "-m", "vmquota", "--server", cluster.app.url, *args],
                          capture_output=True, text=True, timeout=60, env=env, check=False)


def test_cli_start_dry_run_says_whether_it_would_be_admitted(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1", cores=2))
    quota.create_vm(vm_manifest("web-2", cores=4))
    quota.create_vm(vm_manifest("web-3", cores=1, memory="1Gi"))
    quota.action("web-2", "start")
    quota.wait_status("web-2", "Running")
    quota.settle()
    before = state(quota)
    fits = vmquota_cli(quota, "start", "web-3", "-n", quota.ns, "--dry-run")
    assert (fits.returncode, fits.stdout) == (1, ""), fits
    assert "exceeded quota: compute" in fits.stderr
    unchanged(quota, before)
    quota.action("web-2", "stop")
    quota.wait_status("web-2", "Stopped")
    quota.settle()
    before = state(quota)
    fits = vmquota_cli(quota, "start", "web-1", "-n", quota.ns, "--dry-run")
    assert (fits.returncode, fits.stdout) == (0, "VM web-1 would be admitted to start now (dry run: nothing "
                                                 "changed)\n"), fits
    unchanged(quota, before)


# -- kubectl --dry-run=server ------------------------------------------------------------------------



def kubectl(cluster: Cluster, tmp_path: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBECTL, "--cache-dir", str(tmp_path / "kubectl-cache"), "--server", cluster.app.url,
                           *args], input=stdin, capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)})


def test_kubectl_create_namespace_dry_run_server_creates_nothing(cluster: Cluster, tmp_path: Path) -> None:
    result = kubectl(cluster, tmp_path, "create", "namespace", "dry-ns", "--dry-run=server")
    assert (result.returncode, result.stdout) == (0, "namespace/dry-ns created (server dry run)\n"), result.stderr
    with pytest.raises(ClientError) as missing:
        cluster.client.get("/api/v1/namespaces/dry-ns")
    assert missing.value.code == 404


def test_kubectl_apply_dry_run_server_of_a_new_vm_leaves_it_absent(quota: Cluster, tmp_path: Path) -> None:
    manifest = vm_manifest("web-9")
    manifest["metadata"]["namespace"] = quota.ns
    quota.settle()
    before = state(quota)
    result = kubectl(quota, tmp_path, "apply", "--dry-run=server", "-f", "-", stdin=json.dumps(manifest))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "virtualmachine.kubevirt.io/web-9 created (server dry run)\n"
    unchanged(quota, before)
