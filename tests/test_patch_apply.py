"""PATCH in every form Kubernetes takes, server-side apply and managedFields, and the request bodies kubectl
sends (protobuf, chunked): through HTTP and through the real kubectl 1.32.

Each malformed patch or body gets a clear 4xx and changes nothing.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import Cluster, quotas_path, vm_manifest, vms_path

from vmquota.apiserver import protobuf

KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.1.32"
MERGE, STRATEGIC, JSON_PATCH, APPLY = ("application/merge-patch+json", "application/strategic-merge-patch+json",
                                       "application/json-patch+json", "application/apply-patch+yaml")
PROTOBUF = "application/vnd.kubernetes.protobuf"


def request(cluster: Cluster, method: str, path: str, body: Any = None, content_type: str = "application/json",
            headers: dict[str, str] | None = None) -> tuple[int, Any, http.client.HTTPResponse]:
    parts = urlsplit(cluster.app.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        payload = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(method, path, body=payload, headers={"Content-Type": content_type, **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read()), response
    finally:
        conn.close()


def quota_path(cluster: Cluster, name: str = "compute") -> str:
    return f"{quotas_path(cluster.ns)}/{name}"


def stored(cluster: Cluster, path: str) -> Any:
    return cluster.client.get(path)


@pytest.fixture
def quota(cluster: Cluster) -> Cluster:
    cluster.create_quota({"limits.cpu": "4", "limits.memory": "4Gi"})
    return cluster


# -- JSON merge patch, and "no change" --------------------------------------------------------------


def test_a_merge_patch_that_changes_nothing_keeps_the_resource_version_and_managed_fields(quota: Cluster) -> None:
    path = quota_path(quota)
    patch = {"metadata": {"labels": {"tier": "gold"}}}
    code, first, _ = request(quota, "PATCH", path + "?fieldManager=alice", patch, MERGE)
    assert code == 200
    code, second, _ = request(quota, "PATCH", path + "?fieldManager=bob", patch, MERGE)
    assert code == 200
    assert second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    assert second["metadata"]["managedFields"] == first["metadata"]["managedFields"]
    alice = [e for e in first["metadata"]["managedFields"] if e["manager"] == "alice"]
    assert [(e["operation"], e["apiVersion"], e["fieldsV1"]) for e in alice] == [
        ("Update", "v1", {"f:metadata": {"f:labels": {".": {}, "f:tier": {}}}})]


# -- strategic merge patch --------------------------------------------------------------------------


def test_strategic_merge_patch_merges_lists_by_their_strategy_with_kubectls_directives(quota: Cluster) -> None:
    path = quota_path(quota)
    owner = {"apiVersion": "v1", "kind": "Namespace", "name": quota.ns, "uid": "u-1"}
    code, obj, _ = request(quota, "PATCH", path, {"metadata": {"finalizers": ["example.com/a"],
                                                               "ownerReferences": [owner]}}, STRATEGIC)
    assert code == 200
    # metadata.finalizers merge as a set of names; ownerReferences by uid.
    code, obj, _ = request(quota, "PATCH", path, {"metadata": {
        "finalizers": ["example.com/b", "example.com/a"],
        "$setElementOrder/finalizers": ["example.com/b", "example.com/a"],
        "ownerReferences": [{"uid": "u-1", "name": "renamed"}, {**owner, "uid": "u-2"}]}}, STRATEGIC)
    assert code == 200, obj
    assert obj["metadata"]["finalizers"] == ["example.com/b", "example.com/a"]
    assert [(o["uid"], o["name"]) for o in obj["metadata"]["ownerReferences"]] == [("u-1", "renamed"),
                                                                                   ("u-2", quota.ns)]
    code, obj, _ = request(quota, "PATCH", path, {"metadata": {
        "$deleteFromPrimitiveList/finalizers": ["example.com/b"],
        "ownerReferences": [{"uid": "u-1", "$patch": "delete"}]}}, STRATEGIC)
    assert obj["metadata"]["finalizers"] == ["example.com/a"]
    assert [o["uid"] for o in obj["metadata"]["ownerReferences"]] == ["u-2"]
    # $patch: replace makes a map exactly the patch's; null deletes a key.
    code, obj, _ = request(quota, "PATCH", path, {"spec": {"hard": {"$patch": "replace", "limits.cpu": "8"}},
                                                  "metadata": {"ownerReferences": None}}, STRATEGIC)
    assert code == 200, obj
    assert obj["spec"]["hard"] == {"limits.cpu": "8"}
    assert "ownerReferences" not in obj["metadata"]
    # Namespace.spec.finalizers is atomic, as in Kubernetes: the patch's list replaces it.
    code, ns, _ = request(quota, "PATCH", f"/api/v1/namespaces/{quota.ns}",
                          {"spec": {"finalizers": ["example.com/x"]}}, STRATEGIC)
    assert code == 200 and ns["spec"]["finalizers"] == ["example.com/x"]


def test_strategic_merge_patch_of_a_custom_kind_is_refused_with_415_as_for_a_crd(quota: Cluster) -> None:
    quota.create_vm(vm_manifest("web-1"))
    quota.settle()
    before = quota.vm("web-1")
    code, status, _ = request(quota, "PATCH", f"{vms_path(quota.ns)}/web-1", {"metadata": {"labels": {"a": "b"}}},
                              STRATEGIC)
    assert (code, status["reason"]) == (415, "UnsupportedMediaType")
    assert status["message"] == ("the body of the request was in an unknown format - accepted media types include: "
                                 f"{JSON_PATCH}, {MERGE}, {APPLY}")
    assert quota.vm("web-1") == before


@pytest.mark.parametrize(("content_type", "body", "code"), [
    (MERGE, b"{not json", 400), (MERGE, b"[1, 2]", 400), (STRATEGIC, b'{"spec": {"$patch": "explode"}}', 400),
    (STRATEGIC, b'{"$retainKeys": ["spec"], "metadata": {}}', 400), (JSON_PATCH, b'{"op": "add"}', 400),
    (JSON_PATCH, b'[{"op": "frobnicate", "path": "/spec"}]', 400), (JSON_PATCH, b'[{"op": "add", "path": "x"}]', 400),
    (JSON_PATCH, b'[{"op": "test", "path": "/spec/hard/limits.cpu", "value": "5"}]', 422),
    (JSON_PATCH, b'[{"op": "remove", "path": "/spec/nothing/here"}]', 422), (JSON_PATCH, b"", 400),
    ("text/plain", b"{}", 415),
])
def test_malformed_patches_get_a_clear_4xx_and_change_nothing(quota: Cluster, content_type: str, body: bytes,
                                                              code: int) -> None:
    before = stored(quota, quota_path(quota))
    answer_code, status, _ = request(quota, "PATCH", quota_path(quota), body, content_type)
    assert answer_code == code, status
    assert status["kind"] == "Status" and status["message"]
    assert stored(quota, quota_path(quota)) == before


def test_json_patch_applies_rfc_6902_operations(quota: Cluster) -> None:
    code, obj, _ = request(quota, "PATCH", quota_path(quota), [
        {"op": "test", "path": "/spec/hard/limits.cpu", "value": "4"},
        {"op": "replace", "path": "/spec/hard/limits.cpu", "value": "6"},
        {"op": "add", "path": "/metadata/labels", "value": {"a/b~c": "x"}},
    ], JSON_PATCH)
    assert code == 200, obj
    assert obj["spec"]["hard"]["limits.cpu"] == "6" and obj["metadata"]["labels"] == {"a/b~c": "x"}
    assert obj["status"]["hard"]["limits.cpu"] == "6"


# -- server-side apply ------------------------------------------------------------------------------


def applied_quota(cluster: Cluster, hard: dict[str, str], labels: dict[str, str] | None = None) -> bytes:
    metadata: dict[str, Any] = {"name": "team", "namespace": cluster.ns}
    if labels:
        metadata["labels"] = labels
    return yaml.safe_dump({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": metadata,
                           "spec": {"hard": hard}}).encode()


def apply(cluster: Cluster, body: bytes, manager: str, *, force: bool = False,
          path: str | None = None) -> tuple[int, Any]:
    query = f"?fieldManager={manager}" + ("&force=true" if force else "")
    code, obj, _ = request(cluster, "PATCH", (path or quota_path(cluster, "team")) + query, body, APPLY)
    return code, obj


def test_apply_creates_then_updates_and_records_who_owns_what(cluster: Cluster) -> None:
    code, obj = apply(cluster, applied_quota(cluster, {"limits.cpu": "2"}, {"app": "web"}), "gitops")
    assert code == 201, obj
    [entry] = obj["metadata"]["managedFields"]
    assert {k: entry[k] for k in ("manager", "operation", "apiVersion", "fieldsType")} == {
        "manager": "gitops", "operation": "Apply", "apiVersion": "v1", "fieldsType": "FieldsV1"}
    assert entry["fieldsV1"] == {"f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                                 "f:spec": {"f:hard": {".": {}, "f:limits.cpu": {}}}}
    assert entry["time"].endswith("Z")
    # The same apply again changes nothing, not even the time.
    code, again = apply(cluster, applied_quota(cluster, {"limits.cpu": "2"}, {"app": "web"}), "gitops")
    assert code == 200 and again == obj
    # A field the manager no longer applies is removed.
    code, obj = apply(cluster, applied_quota(cluster, {"limits.cpu": "3"}), "gitops")
    assert code == 200 and "labels" not in obj["metadata"] and obj["spec"]["hard"] == {"limits.cpu": "3"}
    assert int(obj["metadata"]["resourceVersion"]) > int(again["metadata"]["resourceVersion"])


def test_apply_conflicts_with_another_manager_unless_forced(cluster: Cluster) -> None:
    apply(cluster, applied_quota(cluster, {"limits.cpu": "2", "limits.memory": "2Gi"}), "gitops")
    before = stored(cluster, quota_path(cluster, "team"))
    code, status = apply(cluster, applied_quota(cluster, {"limits.cpu": "4"}), "ops")
    assert code == 409
    assert status == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Conflict",
                      "code": 409,
                      "message": 'Apply failed with 1 conflict: conflict with "gitops": .spec.hard.limits.cpu',
                      "details": {"causes": [{"type": "FieldManagerConflict", "message": 'conflict with "gitops"',
                                              "field": ".spec.hard.limits.cpu"}]}}
    assert stored(cluster, quota_path(cluster, "team")) == before
    code, status = apply(cluster, applied_quota(cluster, {"limits.cpu": "4", "limits.memory": "1Gi"}), "ops")
    assert status["message"] == ('Apply failed with 2 conflicts: conflicts with "gitops":\n'
                                 "- .spec.hard.limits.cpu\n- .spec.hard.limits.memory")
    # The same value is no conflict: both own the field.
    code, _ = apply(cluster, applied_quota(cluster, {"limits.memory": "2Gi"}), "ops")
    assert code == 200
    code, forced = apply(cluster, applied_quota(cluster, {"limits.cpu": "4"}), "ops", force=True)
    assert code == 200 and forced["spec"]["hard"] == {"limits.cpu": "4", "limits.memory": "2Gi"}
    owners = {e["manager"]: e["fieldsV1"]["f:spec"]["f:hard"] for e in forced["metadata"]["managedFields"]}
    assert owners == {"gitops": {".": {}, "f:limits.memory": {}},
                      "ops": {".": {}, "f:limits.cpu": {}}}  # ops no longer applies limits.memory
    # gitops, now without limits.cpu, conflicts no more; what ops still owns stays.
    code, obj = apply(cluster, applied_quota(cluster, {"limits.memory": "2Gi"}), "gitops")
    assert code == 200 and obj["spec"]["hard"] == {"limits.cpu": "4", "limits.memory": "2Gi"}


def test_an_update_takes_the_fields_it_changes_from_their_appliers(cluster: Cluster) -> None:
    apply(cluster, applied_quota(cluster, {"limits.cpu": "2"}), "gitops")
    code, obj, _ = request(cluster, "PATCH", quota_path(cluster, "team"), {"spec": {"hard": {"limits.cpu": "3"}}},
                           MERGE, headers={"User-Agent": "kubectl-edit/v1.32.5 (linux/amd64)"})
    assert code == 200
    owners = {(e["manager"], e["operation"]): e["fieldsV1"] for e in obj["metadata"]["managedFields"]}
    assert owners == {("gitops", "Apply"): {"f:spec": {"f:hard": {}}},
                      ("kubectl-edit", "Update"): {"f:spec": {"f:hard": {"f:limits.cpu": {}}}}}
    code, status = apply(cluster, applied_quota(cluster, {"limits.cpu": "2"}), "gitops")
    assert code == 409 and status["details"]["causes"][0]["message"].startswith(
        'conflict with "kubectl-edit" using v1 at ')


def test_apply_options_are_checked(cluster: Cluster) -> None:
    code, status, _ = request(cluster, "PATCH", quota_path(cluster, "team"), applied_quota(cluster, {}), APPLY)
    assert (code, status["message"]) == (422, 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: '
                                              "is required for apply patch")
    code, status, _ = request(cluster, "PATCH", quota_path(cluster, "compute") + "?force=true", {}, MERGE)
    assert (code, status["reason"]) == (422, "Invalid")
    code, status, _ = request(cluster, "PATCH", quota_path(cluster, "team") + "?fieldManager=x", b"{a: [", APPLY)
    assert code == 400
    assert cluster.client.get(quotas_path(cluster.ns))["items"] == []


def test_apply_dry_run_creates_nothing(cluster: Cluster) -> None:
    revision = cluster.app.store.revision
    code, obj = apply(cluster, applied_quota(cluster, {"limits.cpu": "2"}), "gitops&dryRun=All")
    assert code == 201 and obj["metadata"]["managedFields"][0]["manager"] == "gitops"
    assert "resourceVersion" not in obj["metadata"]
    assert cluster.client.get(quotas_path(cluster.ns))["items"] == []
    assert cluster.app.store.revision == revision


def test_a_body_with_managed_fields_sets_them_as_kubectl_does_when_it_upgrades_to_server_side(
        cluster: Cluster) -> None:
    code, obj, _ = request(cluster, "POST", quotas_path(cluster.ns) + "?fieldManager=kubectl-client-side-apply",
                           {"metadata": {"name": "team"}, "spec": {"hard": {"limits.cpu": "2"}}})
    assert code == 201
    entry = obj["metadata"]["managedFields"][0]
    moved = [{**entry, "manager": "kubectl", "operation": "Apply"}]
    code, obj, _ = request(cluster, "PATCH", quota_path(cluster, "team"), [
        {"op": "test", "path": "/metadata/resourceVersion", "value": obj["metadata"]["resourceVersion"]},
        {"op": "replace", "path": "/metadata/managedFields", "value": moved}], JSON_PATCH)
    assert code == 200 and obj["metadata"]["managedFields"] == moved
    # Now kubectl's apply without limits.cpu removes it, as its own applied field.
    code, obj = apply(cluster, applied_quota(cluster, {"limits.memory": "1Gi"}), "kubectl")
    assert code == 200 and obj["spec"]["hard"] == {"limits.memory": "1Gi"}


# -- warnings -----------------------------------------------------------------------------------------


def test_a_finalizer_without_a_path_gets_kube_apiservers_warning(quota: Cluster) -> None:
    code, _, response = request(quota, "PATCH", quota_path(quota), {"metadata": {"finalizers": ["mine"]}}, MERGE)
    assert code == 200
    assert response.getheader("Warning") == ('299 - "metadata.finalizers: \\"mine\\": prefer a domain-qualified '
                                             'finalizer name including a path (/) to avoid accidental conflicts '
                                             'with other finalizer writers"')
    code, _, response = request(quota, "PATCH", quota_path(quota), {"metadata": {"labels": {"a": "b"}}}, MERGE)
    assert response.getheader("Warning") is None  # only the write that adds it is warned
    code, _, response = request(quota, "PATCH", quota_path(quota), {"metadata": {
        "finalizers": ["mine", "example.com/ok", "kubernetes"]}}, MERGE)
    assert response.getheader("Warning") is None


# -- protobuf bodies ----------------------------------------------------------------------------------

# What kubectl 1.32 sends for `kubectl create namespace dev` and `kubectl create quota compute -n dev
# --hard=cpu=2,limits.memory=4Gi` (its -v=8 dump).
NAMESPACE_PB = bytes.fromhex("6b3873000a0f0a0276311209" "4e616d657370616365121b0a130a036465761200"
                             "1a0022002a00320038004200" "12001a020a001a002200")
QUOTA_PB = bytes.fromhex(
    "6b3873000a130a027631120d5265736f7572636551756f7461" "12440a1a0a07636f6d7075746512001a03646576" "22002a00"
    "320038004200" "12240a0a0a0363707512030a01320a160a0d6c696d6974732e6d656d6f7279" "12050a033447691a00" "1a00"
    "2200")


def test_protobuf_namespace_and_quota_are_decoded(cluster: Cluster) -> None:
    code, ns, _ = request(cluster, "POST", "/api/v1/namespaces?fieldManager=kubectl-create", NAMESPACE_PB, PROTOBUF)
    assert code == 201, ns
    assert ns["metadata"]["name"] == "dev" and ns["status"]["phase"] == "Active"
    assert set(ns["metadata"]) == {"name", "uid", "resourceVersion", "creationTimestamp", "managedFields"}
    code, quota, _ = request(cluster, "POST", "/api/v1/namespaces/dev/resourcequotas", QUOTA_PB, PROTOBUF)
    assert code == 201, quota
    assert quota["spec"] == {"hard": {"cpu": "2", "limits.memory": "4Gi"}}


def test_the_protobuf_decoder_reads_what_kubectl_auth_can_i_sends() -> None:
    # `kubectl auth can-i create vms -n dev`: a kind is decoded once its table is there (the tenancy issue
    # serves the review itself).
    body = bytes.fromhex(
        "6b3873000a320a17617574686f72697a6174696f6e2e6b38732e696f2f7631121753656c665375626a65637441636365737352"
        "657669657712510a100a0012001a0022002a0032003800420012330a310a0364657612066372656174651a0b6b75626576697274"
        "2e696f22002a0f7669727475616c6d616368696e657332003a001a08080012001a0020001a002200")
    assert protobuf.decode(body) == {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"namespace": "dev", "verb": "create", "group": "kubevirt.io",
                                        "resource": "virtualmachines"}}}


@pytest.mark.parametrize("body", [
    NAMESPACE_PB[:-3],  # cut inside a field
    NAMESPACE_PB[:20],
    b"k8s\x01" + NAMESPACE_PB[4:],  # not the magic
    b"k8s\x00" + b"\xff" * 11,  # a varint that never ends
    NAMESPACE_PB.replace(b"\x0a\x03dev", b"\x08\x03dev"),  # the name as a varint
    NAMESPACE_PB.replace(b"\x0a\x03dev", b"\x0a\x7fdev"),  # a length past the end
    NAMESPACE_PB.replace(b"\x0a\x03dev", b"\x0a\x03\xff\xfe\xfd"),  # not UTF-8
    NAMESPACE_PB.replace(b"Namespace", b"Frobnicat"),  # a kind it has no table for
    b"",
])
def test_malformed_protobuf_is_a_400_and_creates_nothing(cluster: Cluster, body: bytes) -> None:
    before = cluster.client.get("/api/v1/namespaces")["items"]
    code, status, _ = request(cluster, "POST", "/api/v1/namespaces", body, PROTOBUF)
    assert code in (400, 422) and status["kind"] == "Status", status
    assert code == 400 or body == b""
    assert cluster.client.get("/api/v1/namespaces")["items"] == before


def test_protobuf_for_a_custom_kind_is_refused_with_415(cluster: Cluster) -> None:
    code, status, _ = request(cluster, "POST", vms_path(cluster.ns), NAMESPACE_PB, PROTOBUF)
    assert (code, status["reason"]) == (415, "UnsupportedMediaType")
    assert cluster.client.get(vms_path(cluster.ns))["items"] == []


# -- chunked bodies -----------------------------------------------------------------------------------


def chunked(cluster: Cluster, method: str, path: str, chunks: list[bytes],
            tail: bytes = b"0\r\n\r\n") -> tuple[int, Any]:
    parts = urlsplit(cluster.app.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: vmquota\r\nContent-Type: application/json\r\n"
                     f"Transfer-Encoding: chunked\r\n\r\n".encode())
        for chunk in chunks:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(tail)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def test_a_chunked_body_is_read_whole(quota: Cluster) -> None:
    obj = stored(quota, quota_path(quota))
    obj["spec"]["hard"]["limits.cpu"] = "5"
    text = json.dumps(obj).encode()
    code, replaced = chunked(quota, "PUT", quota_path(quota), [text[i:i + 7] for i in range(0, len(text), 7)])
    assert code == 200, replaced
    assert stored(quota, quota_path(quota))["spec"]["hard"]["limits.cpu"] == "5"


def test_a_chunked_body_over_the_limit_is_a_413_and_changes_nothing(quota: Cluster) -> None:
    before = stored(quota, quota_path(quota))
    code, status = chunked(quota, "PUT", quota_path(quota), [b" " * (1 << 19)] * 3)
    assert (code, status["reason"]) == (413, "RequestEntityTooLarge")
    code, status = chunked(quota, "PUT", quota_path(quota), [b"{}"], tail=b"zz\r\n")
    assert (code, status["reason"]) == (400, "BadRequest")
    assert stored(quota, quota_path(quota)) == before


# -- kubectl ------------------------------------------------------------------------------------------


DEMO = """\
apiVersion: v1
kind: Namespace
metadata: {name: dev}
---
apiVersion: v1
kind: ResourceQuota
metadata: {name: compute, namespace: dev}
spec:
  hard: {limits.cpu: "4", limits.memory: 4Gi, requests.storage: 20Gi, count/virtualmachines.kubevirt.io: "3"}
---
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {name: web-1, namespace: dev}
spec:
  runStrategy: Halted
  dataVolumeTemplates:
    - metadata: {name: web-1-root}
      spec: {storage: {resources: {requests: {storage: 5Gi}}}}
  template:
    spec:
      terminationGracePeriodSeconds: 0
      domain:
        cpu: {cores: 2}
        memory: {guest: 2Gi}
        devices: {disks: [{name: root, disk: {bus: virtio}}]}
      volumes:
        - {name: root, dataVolume: {name: web-1-root}}
"""


def kubectl(cluster: Cluster, tmp_path: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBECTL, "--cache-dir", str(tmp_path / "kubectl-cache"), "--server", cluster.app.url,
                           *args], input=stdin, capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)})


def ok(cluster: Cluster, tmp_path: Path, *args: str, stdin: str | None = None) -> str:
    result = kubectl(cluster, tmp_path, *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    return result.stdout


def test_kubectl_create_namespace_and_quota_send_protobuf(cluster: Cluster, tmp_path: Path) -> None:
    assert ok(cluster, tmp_path, "create", "namespace", "team-a") == "namespace/team-a created\n"
    assert ok(cluster, tmp_path, "create", "quota", "compute", "-n", "team-a",
              "--hard=limits.cpu=2,limits.memory=4Gi") == "resourcequota/compute created\n"
    quota = cluster.client.get("/api/v1/namespaces/team-a/resourcequotas/compute")
    assert quota["spec"]["hard"] == {"limits.cpu": "2", "limits.memory": "4Gi"}
    assert quota["metadata"]["managedFields"][0]["manager"] == "kubectl-create"


def test_kubectl_replace_raw_sends_a_chunked_body(quota: Cluster, tmp_path: Path) -> None:
    obj = stored(quota, quota_path(quota))
    obj["spec"]["hard"]["limits.cpu"] = "3"
    out = ok(quota, tmp_path, "replace", "--raw", quota_path(quota), "-f", "-", stdin=json.dumps(obj))
    assert json.loads(out)["spec"]["hard"]["limits.cpu"] == "3"
    assert stored(quota, quota_path(quota))["spec"]["hard"]["limits.cpu"] == "3"


def test_kubectl_apply_of_the_demo_creates_then_is_unchanged_then_configured(cluster: Cluster, tmp_path: Path) -> None:
    assert ok(cluster, tmp_path, "apply", "-f", "-", stdin=DEMO) == (
        "namespace/dev created\nresourcequota/compute created\nvirtualmachine.kubevirt.io/web-1 created\n")
    assert ok(cluster, tmp_path, "apply", "-f", "-", stdin=DEMO) == (
        "namespace/dev unchanged\nresourcequota/compute unchanged\nvirtualmachine.kubevirt.io/web-1 unchanged\n")
    edited = DEMO.replace('limits.cpu: "4"', 'limits.cpu: "6"').replace(
        "{name: web-1, namespace: dev}", "{name: web-1, namespace: dev, labels: {app: web}}")
    assert ok(cluster, tmp_path, "apply", "-f", "-", stdin=edited) == (
        "namespace/dev unchanged\nresourcequota/compute configured\nvirtualmachine.kubevirt.io/web-1 configured\n")
    assert cluster.client.get("/api/v1/namespaces/dev/resourcequotas/compute")["spec"]["hard"]["limits.cpu"] == "6"
    # Removing a field from the file removes it from the object (kubectl's three-way patch).
    assert "configured" in ok(cluster, tmp_path, "apply", "-f", "-", stdin=DEMO)
    vm = cluster.client.get("/apis/kubevirt.io/v1/namespaces/dev/virtualmachines/web-1")
    assert "labels" not in vm["metadata"] or "app" not in vm["metadata"]["labels"]


def test_kubectl_server_side_apply_conflicts_and_force(cluster: Cluster, tmp_path: Path) -> None:
    ok(cluster, tmp_path, "apply", "-f", "-", stdin=DEMO)  # client-side first: kubectl moves its fields over
    assert ok(cluster, tmp_path, "apply", "--server-side", "-f", "-", stdin=DEMO) == (
        "namespace/dev serverside-applied\nresourcequota/compute serverside-applied\n"
        "virtualmachine.kubevirt.io/web-1 serverside-applied\n")
    other = ('apiVersion: v1\nkind: ResourceQuota\nmetadata: {name: compute, namespace: dev}\n'
             'spec: {hard: {limits.cpu: "8"}}\n')
    refused = kubectl(cluster, tmp_path, "apply", "--server-side", "--field-manager=ops", "-f", "-", stdin=other)
    assert refused.returncode == 1
    assert refused.stderr.startswith('error: Apply failed with 1 conflict: conflict with "kubectl": '
                                     ".spec.hard.limits.cpu\n")
    assert ok(cluster, tmp_path, "apply", "--server-side", "--field-manager=ops", "--force-conflicts", "-f", "-",
              stdin=other) == "resourcequota/compute serverside-applied\n"
    quota = cluster.client.get("/api/v1/namespaces/dev/resourcequotas/compute")
    assert quota["spec"]["hard"]["limits.cpu"] == "8" and quota["spec"]["hard"]["limits.memory"] == "4Gi"
    # kubectl, without limits.cpu in its file now, no longer conflicts and leaves ops' field alone.
    without_cpu = DEMO.replace('limits.cpu: "4", ', "")
    assert "resourcequota/compute serverside-applied" in ok(cluster, tmp_path, "apply", "--server-side", "-f", "-",
                                                            stdin=without_cpu)
    assert cluster.client.get("/api/v1/namespaces/dev/resourcequotas/compute")["spec"]["hard"]["limits.cpu"] == "8"


def test_kubectl_patch_merge_twice_then_json(quota: Cluster, tmp_path: Path) -> None:
    args = ("patch", "quota", "compute", "-n", quota.ns, "--type", "merge", "-p", '{"metadata":{"labels":{"a":"b"}}}')
    assert ok(quota, tmp_path, *args) == "resourcequota/compute patched\n"
    assert ok(quota, tmp_path, *args) == "resourcequota/compute patched (no change)\n"
    assert ok(quota, tmp_path, "patch", "quota", "compute", "-n", quota.ns, "--type", "json", "-p",
              '[{"op":"replace","path":"/spec/hard/limits.cpu","value":"3"}]') == "resourcequota/compute patched\n"
    assert stored(quota, quota_path(quota))["spec"]["hard"]["limits.cpu"] == "3"
    refused = kubectl(quota, tmp_path, "patch", "quota", "compute", "-n", quota.ns, "--type", "json", "-p",
                      '[{"op":"test","path":"/spec/hard/limits.cpu","value":"9"}]')
    assert refused.returncode == 1 and "the JSON patch could not be applied" in refused.stderr
