"""The HTTP API as a Kubernetes user relies on it: lists, writes with resourceVersion, merge patch, Status errors,
limits on bodies, what reaches libvirt, the OpenAPI document, events and namespace deletion.

Everything goes through HTTP against the `cluster` fixture's server on libvirt's simulated host; raw
`http.client` is used where the body itself must be malformed.
"""

from __future__ import annotations

import copy
import http.client
import json
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import Cluster, clones_path, events_path, quotas_path, vm_manifest, vms_path

from vmquota.client import Client, ClientError

PROJECTS = "/apis/vmquota.io/v1/projects"
NAMESPACES = "/api/v1/namespaces"
ALL_VMS = "/apis/kubevirt.io/v1/virtualmachines"
ALL_QUOTAS = "/api/v1/resourcequotas"


def raw(cluster: Cluster, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One request on its own connection, the body sent exactly as given; (status, decoded JSON or text)."""
    parts = urlsplit(cluster.app.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, data.decode()


def refused(call: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The Status a refused call returns."""
    with pytest.raises(ClientError) as info:
        call(*args, **kwargs)
    return info.value.status


def assert_status(status: Any, code: int, reason: str) -> None:
    assert isinstance(status, dict), status
    assert status["kind"] == "Status"
    assert status["apiVersion"] == "v1"
    assert status["status"] == "Failure"
    assert status["code"] == code
    assert status["reason"] == reason, status
    assert isinstance(status["message"], str) and status["message"]


def names(listing: dict[str, Any]) -> list[str]:
    return [item["metadata"]["name"] for item in listing["items"]]


def snapshot(cluster: Cluster) -> tuple[Any, Any]:
    """What a refused request must leave alone: the VMs (without the list's resourceVersion) and the quota's used.

    Taken once the controller has settled, so that only the request under test could change them.
    """
    cluster.settle()
    vms = cluster.client.get(vms_path(cluster.ns))["items"]
    return vms, cluster.used()


# -- lists -----------------------------------------------------------------------------------------


LISTS = [
    (PROJECTS, "ProjectList", "vmquota.io/v1"),
    (NAMESPACES, "NamespaceList", "v1"),
    ("/api/v1/namespaces/{ns}/resourcequotas", "ResourceQuotaList", "v1"),
    (ALL_QUOTAS, "ResourceQuotaList", "v1"),
    ("/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines", "VirtualMachineList", "kubevirt.io/v1"),
    (ALL_VMS, "VirtualMachineList", "kubevirt.io/v1"),
    ("/apis/clone.kubevirt.io/v1beta1/namespaces/{ns}/virtualmachineclones", "VirtualMachineCloneList",
     "clone.kubevirt.io/v1beta1"),
    ("/api/v1/namespaces/{ns}/events", "EventList", "v1"),
]


def test_every_list_is_a_kind_list_with_items(cluster: Cluster) -> None:
    for path, kind, api_version in LISTS:
        listing = cluster.client.get(path.format(ns=cluster.ns))
        assert listing["kind"] == kind, path
        assert listing["apiVersion"] == api_version, path
        assert isinstance(listing["items"], list), path


def test_lists_hold_the_objects_created(cluster: Cluster) -> None:
    cluster.client.post(PROJECTS, {"metadata": {"name": f"p-{cluster.ns}"}, "spec": {}})
    cluster.create_quota({"limits.cpu": "4"})
    cluster.create_vm(vm_manifest("web-1"))
    cluster.client.post(clones_path(cluster.ns), {
        "metadata": {"name": "c1"}, "spec": {"source": {"kind": "VirtualMachine", "name": "web-1"},
                                             "target": {"kind": "VirtualMachine", "name": "web-2"}}})
    assert f"p-{cluster.ns}" in names(cluster.client.get(PROJECTS))
    assert cluster.ns in names(cluster.client.get(NAMESPACES))
    assert names(cluster.client.get(quotas_path(cluster.ns))) == ["compute"]
    assert names(cluster.client.get(vms_path(cluster.ns))) == ["web-1", "web-2"]
    assert names(cluster.client.get(clones_path(cluster.ns))) == ["c1"]


def test_a_listed_object_is_the_object_as_get_returns_it(cluster: Cluster) -> None:
    """Lists are written from the stored JSON of their items, not re-encoded: the same objects all the same."""
    assert cluster.client.get(vms_path(cluster.ns))["items"] == []
    cluster.create_quota({"limits.cpu": "4"})
    for name in ("web-2", "web-1"):
        cluster.create_vm(vm_manifest(name))
    cluster.action("web-1", "start")
    cluster.wait_status("web-1", "Running")
    cluster.settle()  # web-2's disk too: the controller writes neither VM meanwhile
    listing = cluster.client.get(vms_path(cluster.ns))
    assert listing["items"] == [cluster.vm("web-1"), cluster.vm("web-2")]  # in name order, as Kubernetes lists
    across = [vm for vm in cluster.client.get(ALL_VMS)["items"] if vm["metadata"]["namespace"] == cluster.ns]
    assert [vm["metadata"]["name"] for vm in across] == ["web-1", "web-2"]
    quota = cluster.client.get(quotas_path(cluster.ns))["items"][0]
    assert quota == cluster.client.get(f"{quotas_path(cluster.ns)}/compute")
    assert int(listing["metadata"]["resourceVersion"]) >= max(int(vm["metadata"]["resourceVersion"])
                                                                for vm in listing["items"])


def test_all_namespace_lists_span_namespaces(cluster: Cluster) -> None:
    other = f"{cluster.ns}-b"
    cluster.create_namespace(other)
    cluster.create_vm(vm_manifest("a"))
    cluster.create_vm(vm_manifest("b"), namespace=other)
    cluster.create_quota({"limits.cpu": "4"})
    cluster.create_quota({"limits.cpu": "2"}, namespace=other)

    vms = {(v["metadata"]["namespace"], v["metadata"]["name"]) for v in cluster.client.get(ALL_VMS)["items"]}
    assert {(cluster.ns, "a"), (other, "b")} <= vms
    quotas = {(q["metadata"]["namespace"], q["metadata"]["name"]) for q in cluster.client.get(ALL_QUOTAS)["items"]}
    assert {(cluster.ns, "compute"), (other, "compute")} <= quotas
    # A namespaced list shows only its own namespace.
    assert names(cluster.client.get(vms_path(other))) == ["b"]


# -- create, get, replace, patch -------------------------------------------------------------------


def test_create_sets_server_fields_and_get_returns_the_object(cluster: Cluster) -> None:
    created = cluster.create_vm(vm_manifest("web-1"))
    meta = created["metadata"]
    assert created["kind"] == "VirtualMachine" and created["apiVersion"] == "kubevirt.io/v1"
    assert meta["namespace"] == cluster.ns
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"]
    fetched = cluster.vm("web-1")
    assert fetched["metadata"]["uid"] == meta["uid"]
    assert fetched["spec"] == created["spec"]


def test_put_with_stale_resource_version_is_a_conflict_and_changes_nothing(cluster: Cluster) -> None:
    path = f"{vms_path(cluster.ns)}/web-1"
    cluster.create_vm(vm_manifest("web-1"))
    cluster.settle()  # the controller writes status (its disks are ready) right after the create
    created = cluster.vm("web-1")
    stale = copy.deepcopy(created)
    first = copy.deepcopy(created)
    first["metadata"]["labels"] = {"tier": "web"}
    updated = cluster.client.put(path, first)
    assert updated["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]

    stale["metadata"]["labels"] = {"tier": "db"}
    status = refused(cluster.client.put, path, stale)
    assert_status(status, 409, "Conflict")
    assert "the object has been modified" in status["message"]
    after = cluster.vm("web-1")
    assert after["metadata"]["labels"] == {"tier": "web"}
    assert after["metadata"]["resourceVersion"] == updated["metadata"]["resourceVersion"]


def test_patch_with_stale_resource_version_is_a_conflict(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("web-1"))
    cluster.settle()
    rv = cluster.vm("web-1")["metadata"]["resourceVersion"]
    path = f"{vms_path(cluster.ns)}/web-1"
    cluster.client.patch(path, {"metadata": {"labels": {"tier": "web"}, "resourceVersion": rv}})
    status = refused(cluster.client.patch, path, {"metadata": {"labels": {"tier": "db"}, "resourceVersion": rv}})
    assert_status(status, 409, "Conflict")
    assert cluster.vm("web-1")["metadata"]["labels"] == {"tier": "web"}


def test_put_without_resource_version_replaces(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("web-1"))
    body = vm_manifest("web-1", cores=3)
    assert "resourceVersion" not in body["metadata"]
    replaced = cluster.client.put(f"{vms_path(cluster.ns)}/web-1", body)
    assert replaced["spec"]["template"]["spec"]["domain"]["cpu"] == {"cores": 3}
    assert cluster.vm("web-1")["spec"]["template"]["spec"]["domain"]["cpu"] == {"cores": 3}


def test_put_keeps_uid_and_creation_timestamp(cluster: Cluster) -> None:
    created = cluster.create_vm(vm_manifest("web-1"))
    body = vm_manifest("web-1", cores=3)
    body["metadata"]["creationTimestamp"] = "2001-01-01T00:00:00Z"
    replaced = cluster.client.put(f"{vms_path(cluster.ns)}/web-1", body)
    for field in ("uid", "creationTimestamp"):
        assert replaced["metadata"][field] == created["metadata"][field]
        assert cluster.vm("web-1")["metadata"][field] == created["metadata"][field]


def test_put_with_another_uid_is_a_conflict(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("web-1"))
    body = vm_manifest("web-1", cores=3)
    body["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
    assert_status(refused(cluster.client.put, f"{vms_path(cluster.ns)}/web-1", body), 409, "Conflict")
    assert cluster.vm("web-1")["spec"]["template"]["spec"]["domain"]["cpu"] == {"cores": 2}


def test_put_with_another_name_than_the_url_is_refused(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("web-1"))
    assert_status(refused(cluster.client.put, f"{vms_path(cluster.ns)}/web-1", vm_manifest("web-2")),
                  400, "BadRequest")
    assert names(cluster.client.get(vms_path(cluster.ns))) == ["web-1"]


def test_put_of_a_missing_object_is_not_found(cluster: Cluster) -> None:
    status = refused(cluster.client.put, f"{vms_path(cluster.ns)}/ghost", vm_manifest("ghost"))
    assert_status(status, 404, "NotFound")
    assert names(cluster.client.get(vms_path(cluster.ns))) == []


def test_merge_patch_deletes_null_keys_and_merges_nested_objects(cluster: Cluster) -> None:
    manifest = vm_manifest("web-1")
    manifest["metadata"]["labels"] = {"keep": "1", "drop": "2"}
    cluster.create_vm(manifest)
    patched = cluster.client.patch(f"{vms_path(cluster.ns)}/web-1", {
        "metadata": {"labels": {"drop": None, "new": "3"}},
        "spec": {"template": {"spec": {"domain": {"cpu": {"cores": 4}}}}},
    })
    assert patched["metadata"]["labels"] == {"keep": "1", "new": "3"}
    domain = patched["spec"]["template"]["spec"]["domain"]
    assert domain["cpu"] == {"cores": 4}
    assert domain["memory"] == {"guest": "2Gi"}  # siblings of the patched key stay
    assert domain["devices"] == {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]}
    fetched = cluster.vm("web-1")
    assert fetched["spec"] == patched["spec"] and fetched["metadata"]["labels"] == patched["metadata"]["labels"]


def test_merge_patch_that_is_not_an_object_is_refused(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("web-1"))
    assert_status(refused(cluster.client.patch, f"{vms_path(cluster.ns)}/web-1", [1, 2]), 400, "BadRequest")


def test_merge_patch_with_invalid_result_is_refused_and_changes_nothing(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("web-1"))
    cluster.settle()
    before = cluster.vm("web-1")
    status = refused(cluster.client.patch, f"{vms_path(cluster.ns)}/web-1", {"spec": {"runStrategy": "Sometimes"}})
    assert_status(status, 422, "Invalid")
    assert cluster.vm("web-1") == before


def test_unknown_vm_fields_are_kept(cluster: Cluster) -> None:
    manifest = vm_manifest("web-1", myField={"anything": [1, "two"]})
    interfaces = [{"name": "default", "masquerade": {}}]
    manifest["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"] = interfaces
    manifest["spec"]["template"]["spec"]["networks"] = [{"name": "default", "pod": {}}]
    manifest["spec"]["template"]["metadata"] = {"labels": {"kubevirt.io/vm": "web-1"}}
    manifest["metadata"]["annotations"] = {"example.com/owner": "team-a"}
    created = cluster.create_vm(manifest)

    def check(vm: dict[str, Any]) -> None:
        template = vm["spec"]["template"]
        assert template["spec"]["domain"]["devices"]["interfaces"] == interfaces
        assert template["spec"]["networks"] == [{"name": "default", "pod": {}}]
        assert template["metadata"] == {"labels": {"kubevirt.io/vm": "web-1"}}
        assert vm["spec"]["myField"] == {"anything": [1, "two"]}
        assert vm["metadata"]["annotations"]["example.com/owner"] == "team-a"

    check(created)
    check(cluster.vm("web-1"))
    check(cluster.client.patch(f"{vms_path(cluster.ns)}/web-1", {"metadata": {"labels": {"a": "b"}}}))
    cluster.action("web-1", "start")
    cluster.wait_status("web-1", "Running")
    check(cluster.vm("web-1"))


# -- errors ----------------------------------------------------------------------------------------


def test_malformed_json_is_bad_request(cluster: Cluster) -> None:
    code, status = raw(cluster, "POST", vms_path(cluster.ns), b'{"metadata": {"name": "x"')
    assert code == 400
    assert_status(status, 400, "BadRequest")
    assert names(cluster.client.get(vms_path(cluster.ns))) == []


def test_body_that_is_not_an_object_is_bad_request(cluster: Cluster) -> None:
    code, status = raw(cluster, "POST", vms_path(cluster.ns), b'["a list"]')
    assert code == 400
    assert_status(status, 400, "BadRequest")


def test_wrong_kind_in_body_is_bad_request(cluster: Cluster) -> None:
    body = vm_manifest("web-1")
    body["kind"] = "ResourceQuota"
    assert_status(refused(cluster.create_vm, body), 400, "BadRequest")
    body = vm_manifest("web-1")
    body["apiVersion"] = "kubevirt.io/v2"
    assert_status(refused(cluster.create_vm, body), 400, "BadRequest")
    assert names(cluster.client.get(vms_path(cluster.ns))) == []


def test_namespace_mismatch_is_bad_request(cluster: Cluster) -> None:
    cluster.create_namespace(f"{cluster.ns}-b")
    body = vm_manifest("web-1")
    body["metadata"]["namespace"] = f"{cluster.ns}-b"
    status = refused(cluster.create_vm, body)
    assert_status(status, 400, "BadRequest")
    assert "does not match the namespace" in status["message"]
    assert cluster.client.get(ALL_VMS)["items"] == []


def test_unknown_object_is_not_found(cluster: Cluster) -> None:
    status = refused(cluster.vm, "ghost")
    assert_status(status, 404, "NotFound")
    assert status["message"] == 'virtualmachines.kubevirt.io "ghost" not found'
    assert_status(refused(cluster.client.delete, f"{vms_path(cluster.ns)}/ghost"), 404, "NotFound")
    assert_status(refused(cluster.client.patch, f"{vms_path(cluster.ns)}/ghost", {}), 404, "NotFound")
    assert_status(refused(cluster.action, "ghost", "start"), 404, "NotFound")
    assert_status(refused(cluster.quota, "ghost"), 404, "NotFound")
    assert_status(refused(cluster.client.get, f"{PROJECTS}/ghost"), 404, "NotFound")


def test_unknown_paths_are_not_found(cluster: Cluster) -> None:
    for path in ["/nope", "/api/v2/namespaces", "/apis/kubevirt.io/v1/pods",
                 f"{vms_path(cluster.ns)}/web-1/extra/deep",
                 f"/apis/subresources.kubevirt.io/v1/namespaces/{cluster.ns}/virtualmachines/web-1/explode",
                 "/apis/kubevirt.io/v1/virtualmachines/web-1"]:
        code, status = raw(cluster, "GET", path)
        assert code == 404, path
        assert_status(status, 404, "NotFound")


def test_unknown_methods_and_malformed_requests_get_a_status_too(cluster: Cluster) -> None:
    for method, path in [("OPTIONS", NAMESPACES), ("TRACE", vms_path(cluster.ns)), ("GET", "/" + "a" * 70000)]:
        code, status = raw(cluster, method, path)
        assert code >= 400, method
        assert isinstance(status, dict), status  # JSON, not the HTML page of Python's http.server
        assert status["kind"] == "Status" and status["status"] == "Failure" and status["code"] == code
    assert raw(cluster, "GET", "/healthz")[0] == 200


def test_create_in_an_unknown_namespace_is_not_found(cluster: Cluster) -> None:
    status = refused(cluster.create_vm, vm_manifest("web-1"), "no-such-ns")
    assert_status(status, 404, "NotFound")
    assert status["message"] == 'namespaces "no-such-ns" not found'
    assert_status(refused(cluster.create_quota, {"limits.cpu": "1"}, name="q", namespace="no-such-ns"),
                  404, "NotFound")
    assert cluster.client.get(ALL_VMS)["items"] == []
    assert_status(refused(cluster.client.get, f"{NAMESPACES}/no-such-ns"), 404, "NotFound")


def test_duplicate_is_already_exists(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("x"))
    cluster.settle()
    before = cluster.vm("x")
    status = refused(cluster.create_vm, vm_manifest("x", cores=4))
    assert_status(status, 409, "AlreadyExists")
    assert status["message"] == 'virtualmachines.kubevirt.io "x" already exists'
    assert cluster.vm("x") == before
    cluster.create_quota({"limits.cpu": "4"})
    assert_status(refused(cluster.create_quota, {"limits.cpu": "8"}), 409, "AlreadyExists")
    assert cluster.quota()["spec"]["hard"] == {"limits.cpu": "4"}


def _with_name(name: Any) -> dict[str, Any]:
    manifest = vm_manifest("placeholder", disk=None)
    manifest["metadata"]["name"] = name
    return manifest


def _bad(**kwargs: Any) -> dict[str, Any]:
    return vm_manifest("bad", **kwargs)


@pytest.mark.parametrize("manifest", [
    pytest.param(_with_name("Web-1"), id="name-upper-case"),
    pytest.param(_with_name("a" * 64), id="name-too-long"),
    pytest.param(_with_name("../x"), id="name-path-traversal"),
    pytest.param(_with_name(""), id="name-empty"),
    pytest.param(_with_name(None), id="name-missing"),
    pytest.param(_with_name(42), id="name-not-a-string"),
    pytest.param(_with_name("a_b"), id="name-underscore"),
    pytest.param(_with_name("web.1"), id="name-dot"),
    pytest.param(_with_name("-web"), id="name-leading-dash"),
    pytest.param(_with_name("x;rm -rf"), id="name-shell"),
    pytest.param(_bad(memory="2XB"), id="quantity-unknown-suffix"),
    pytest.param(_bad(memory="-1Gi"), id="quantity-negative"),
    pytest.param(_bad(memory="1e999"), id="quantity-huge-exponent"),
    pytest.param(_bad(memory=""), id="quantity-empty"),
    pytest.param(_bad(memory="1.5.5Gi"), id="quantity-two-points"),
    pytest.param(_bad(memory=True), id="quantity-boolean"),
    pytest.param(_bad(disk="2XB"), id="disk-quantity-unknown-suffix"),
    pytest.param(_bad(disk="-1Gi"), id="disk-quantity-negative"),
    pytest.param(_bad(disk="1e999"), id="disk-quantity-huge-exponent"),
    pytest.param(_bad(memory=0), id="memory-zero"),
    pytest.param(_bad(memory="0"), id="memory-zero-string"),
    pytest.param(_bad(memory="100Ti"), id="memory-absurd"),
    pytest.param(_bad(disk="0"), id="disk-zero"),
    pytest.param(_bad(disk="100Ti"), id="disk-absurd"),
    pytest.param(_bad(cores=1000), id="cores-absurd"),
    pytest.param(_bad(cores=0), id="cores-zero"),
    pytest.param(_bad(grace=-1), id="grace-negative"),
    pytest.param(_bad(strategy="Sometimes"), id="run-strategy-unknown"),
    pytest.param(_bad(strategy="always"), id="run-strategy-wrong-case"),
    pytest.param(_bad(running=True), id="run-strategy-and-running"),
])
def test_invalid_vm_is_refused_and_changes_nothing(cluster: Cluster, manifest: dict[str, Any]) -> None:
    cluster.create_quota({"requests.storage": "100Gi", "count/virtualmachines.kubevirt.io": "5", "limits.cpu": "8"})
    cluster.create_vm(vm_manifest("existing"))
    before = snapshot(cluster)
    status = refused(cluster.create_vm, manifest)
    assert_status(status, 422, "Invalid")
    assert " is invalid: " in status["message"]
    assert snapshot(cluster) == before


def _mutated(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    manifest = vm_manifest("bad")
    target: Any = manifest
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return manifest


_VOLUME_NAME = ("spec", "template", "spec", "volumes", 0, "dataVolume", "name")
_DOMAIN = ("spec", "template", "spec", "domain")


@pytest.mark.parametrize("manifest", [
    pytest.param(_mutated(_VOLUME_NAME, {"a": 1}), id="volume-name-object"),
    pytest.param(_mutated(_VOLUME_NAME, ["bad-root"]), id="volume-name-list"),
    pytest.param(_mutated(_VOLUME_NAME, "other-root"), id="volume-name-unknown"),
    pytest.param(_mutated((*_DOMAIN, "cpu", "cores"), "2"), id="cores-string"),
    pytest.param(_mutated((*_DOMAIN, "memory"), ["2Gi"]), id="memory-list"),
    pytest.param(_mutated(_DOMAIN, "big"), id="domain-string"),
    pytest.param(_mutated(("spec", "dataVolumeTemplates"), {"a": 1}), id="templates-object"),
    pytest.param(_mutated(("spec", "dataVolumeTemplates", 0, "metadata", "name"), 7), id="template-name-number"),
    pytest.param(_mutated(("spec", "template", "spec", "volumes"), ["root"]), id="volumes-of-strings"),
    pytest.param(_mutated(("metadata", "labels"), ["a"]), id="labels-list"),
    pytest.param(_mutated(("metadata", "annotations"), {"a": 1}), id="annotation-number"),
    pytest.param(_mutated(("spec",), "Halted"), id="spec-string"),
])
def test_wrong_types_in_vm_fields_are_invalid_not_internal_errors(cluster: Cluster, manifest: dict[str, Any]) -> None:
    cluster.create_vm(vm_manifest("existing"))
    path = f"{vms_path(cluster.ns)}/existing"
    cluster.settle()
    before = cluster.client.get(vms_path(cluster.ns))["items"]
    assert_status(refused(cluster.create_vm, manifest), 422, "Invalid")
    replacement = copy.deepcopy(manifest)
    replacement["metadata"]["name"] = "existing"
    assert_status(refused(cluster.client.put, path, replacement), 422, "Invalid")
    assert_status(refused(cluster.client.patch, path, {"spec": replacement["spec"]}), 422, "Invalid")
    assert cluster.client.get(vms_path(cluster.ns))["items"] == before


def test_invalid_name_message_is_kubernetes_like(cluster: Cluster) -> None:
    status = refused(cluster.create_vm, _with_name("Web-1"))
    assert status["message"].startswith('VirtualMachine.kubevirt.io "Web-1" is invalid: metadata.name: '
                                        'Invalid value: "Web-1": a lowercase RFC 1123 label must consist of')


def test_unknown_run_strategy_says_unsupported_value(cluster: Cluster) -> None:
    status = refused(cluster.create_vm, vm_manifest("bad", strategy="Sometimes"))
    assert status["message"] == (
        'VirtualMachine.kubevirt.io "bad" is invalid: spec.runStrategy: Unsupported value: "Sometimes": '
        'supported values: "Always", "RerunOnFailure", "Manual", "Halted", "Once"')


def test_invalid_replace_changes_nothing(cluster: Cluster) -> None:
    cluster.create_quota({"requests.storage": "100Gi"})
    cluster.create_vm(vm_manifest("web-1"))
    before = snapshot(cluster)
    for manifest in (vm_manifest("web-1", memory="0"), vm_manifest("web-1", disk="100Ti"),
                     vm_manifest("web-1", disk="1Gi"), vm_manifest("web-1", strategy="Sometimes")):
        assert_status(refused(cluster.client.put, f"{vms_path(cluster.ns)}/web-1", manifest), 422, "Invalid")
    assert snapshot(cluster) == before


@pytest.mark.parametrize(("hard", "message"), [
    pytest.param({"limits.gpu": "1"}, 'spec.hard[limits.gpu]: Unsupported value: "limits.gpu": supported values: ',
                 id="unknown-resource"),
    pytest.param({"limits.cpu": "-1"}, "spec.hard[limits.cpu]: Invalid value: must be greater than or equal to 0",
                 id="negative"),
    pytest.param({"limits.memory": "2XB"}, "spec.hard: Invalid value: spec.hard[limits.memory]: ", id="bad-suffix"),
    pytest.param({"limits.memory": "1e999"}, "spec.hard: Invalid value: spec.hard[limits.memory]: ", id="huge"),
    pytest.param({"limits.memory": ""}, "spec.hard: Invalid value: spec.hard[limits.memory]: ", id="empty"),
])
def test_invalid_quota_is_refused_and_changes_nothing(cluster: Cluster, hard: dict[str, str], message: str) -> None:
    cluster.create_quota({"count/virtualmachines.kubevirt.io": "5"}, name="existing")
    cluster.create_vm(vm_manifest("web-1"))
    cluster.settle()
    before = cluster.client.get(quotas_path(cluster.ns))["items"]
    status = refused(cluster.create_quota, hard)
    assert_status(status, 422, "Invalid")
    assert status["message"].startswith('ResourceQuota "compute" is invalid: ' + message), status["message"]
    assert cluster.client.get(quotas_path(cluster.ns))["items"] == before


def test_invalid_quota_update_changes_nothing(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "4"})
    cluster.settle()
    before = cluster.quota()
    status = refused(cluster.client.patch, f"{quotas_path(cluster.ns)}/compute",
                     {"spec": {"hard": {"limits.cpu": "-2"}}})
    assert_status(status, 422, "Invalid")
    assert cluster.quota() == before


def test_quota_refusal_is_forbidden_and_changes_nothing(cluster: Cluster) -> None:
    cluster.create_quota({"requests.storage": "8Gi", "count/virtualmachines.kubevirt.io": "5"})
    cluster.create_vm(vm_manifest("web-1", disk="5Gi"))
    before = snapshot(cluster)
    status = refused(cluster.create_vm, vm_manifest("web-2", disk="5Gi"))
    assert_status(status, 403, "Forbidden")
    assert ("exceeded quota: compute, requested: requests.storage=5Gi, used: requests.storage=5Gi, "
            "limited: requests.storage=8Gi") in status["message"]
    assert snapshot(cluster) == before


def test_body_over_one_mebibyte_is_refused_and_the_server_still_serves(cluster: Cluster) -> None:
    manifest = vm_manifest("big")
    manifest["metadata"]["annotations"] = {"filler": "x" * 4000}
    exact = json.dumps(manifest).encode()
    exact += b" " * ((1 << 20) - len(exact))  # valid JSON of exactly the limit
    for body in (exact + b" ", exact + b" " * (7 << 20)):
        for _ in range(3):  # the refusal must reach a client that sends its whole body before reading
            code, status = raw(cluster, "POST", vms_path(cluster.ns), body)
            assert code == 413
            assert_status(status, 413, "RequestEntityTooLarge")
    assert raw(cluster, "GET", "/healthz")[0] == 200
    assert names(cluster.client.get(vms_path(cluster.ns))) == []
    code, created = raw(cluster, "POST", vms_path(cluster.ns), exact)
    assert code == 201, created
    assert names(cluster.client.get(vms_path(cluster.ns))) == ["big"]


def test_malformed_chunked_body_is_refused_and_never_read_as_a_request(cluster: Cluster) -> None:
    # A server that ignored the chunked body would take it for the next request on the connection.
    smuggled = f"DELETE {NAMESPACES}/{cluster.ns} HTTP/1.1\r\nHost: vmquota\r\nContent-Length: 0\r\n\r\n"
    request = (f"POST {vms_path(cluster.ns)} HTTP/1.1\r\nHost: vmquota\r\nContent-Type: application/json\r\n"
               f"Transfer-Encoding: chunked\r\n\r\n{smuggled}").encode()
    parts = urlsplit(cluster.app.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        status = json.loads(response.read())
    assert response.status == 400
    assert_status(status, 400, "BadRequest")
    assert cluster.client.get(f"{NAMESPACES}/{cluster.ns}")["metadata"]["name"] == cluster.ns
    assert raw(cluster, "GET", "/healthz")[0] == 200


# -- nothing a user writes reaches libvirt ---------------------------------------------------------


HOSTILE = ["</name><devices>", "$(rm -rf /)", "`reboot`", "'; DROP TABLE objects; --", "../../etc/passwd",
           "<![CDATA[x]]>", "&amp;&lt;"]


def test_hostile_labels_and_annotations_never_reach_libvirt(cluster: Cluster) -> None:
    manifest = vm_manifest("web-1")
    manifest["metadata"]["annotations"] = {f"example.com/a{i}": value for i, value in enumerate(HOSTILE)}
    manifest["metadata"]["annotations"]['quote"key</x>'] = "v"
    manifest["metadata"]["labels"] = {'quo"te\'key': "$(id)", "path": "../../x", "xml": "<evil/>"}
    created = cluster.create_vm(manifest)
    cluster.action("web-1", "start")
    cluster.wait_status("web-1", "Running")
    assert cluster.vm("web-1")["metadata"]["annotations"] == manifest["metadata"]["annotations"]

    xml = cluster.domain("web-1").XMLDesc()
    for text in [*HOSTILE, 'quo"te', "quote", "$(id)", "../../x", "<evil/>", "evil", "rm -rf", "DROP TABLE",
                 "passwd", "CDATA", "example.com"]:
        assert text not in xml, text
    uid = created["metadata"]["uid"]
    assert f'namespace="{cluster.ns}"' in xml and 'name="web-1"' in xml and f'uid="{uid}"' in xml


def test_hostile_names_in_paths_are_not_found(cluster: Cluster) -> None:
    for path in [f"{vms_path(cluster.ns)}/..", f"{vms_path(cluster.ns)}/..%2F..%2Fetc", f"{vms_path(cluster.ns)}/a%3Cb",
                 "/apis/kubevirt.io/v1/namespaces/../virtualmachines/x",
                 f"/apis/subresources.kubevirt.io/v1/namespaces/{cluster.ns}/virtualmachines/..%2Fx/start"]:
        code, status = raw(cluster, "PUT", path, b"{}")
        assert code == 404, path
        assert_status(status, 404, "NotFound")


# -- schema and health -----------------------------------------------------------------------------


CONTRACT_PATHS = [
    "/apis/vmquota.io/v1/projects",
    "/apis/vmquota.io/v1/projects/{name}",
    "/api/v1/namespaces",
    "/api/v1/namespaces/{name}",
    "/api/v1/namespaces/{namespace}/resourcequotas",
    "/api/v1/namespaces/{namespace}/resourcequotas/{name}",
    "/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines",
    "/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines/{name}",
    "/apis/kubevirt.io/v1/virtualmachines",
    "/api/v1/resourcequotas",
    "/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachines/{name}/start",
    "/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachines/{name}/stop",
    "/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachines/{name}/restart",
    "/apis/clone.kubevirt.io/v1beta1/namespaces/{namespace}/virtualmachineclones",
    "/api/v1/namespaces/{namespace}/events",
    "/healthz",
    "/openapi.json",
]


def test_openapi_document_describes_every_route(cluster: Cluster) -> None:
    code, document = raw(cluster, "GET", "/openapi.json")
    assert code == 200
    assert isinstance(document, dict), "the body is not JSON"
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    missing = [p for p in CONTRACT_PATHS if p not in paths]
    assert not missing
    item = "/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines/{name}"
    assert {"get", "put", "patch", "delete"} <= set(paths[item])
    assert {"get", "post"} <= set(paths["/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines"])
    assert "put" in paths["/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachines/{name}/start"]
    assert "post" not in paths["/api/v1/namespaces/{namespace}/events"]


def test_answers_are_not_held_back_by_nagles_algorithm(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers and body go out in two writes: with Nagle's algorithm on, every answer on a kept-alive connection
    would wait for the client's delayed ACK (40 ms on Linux). Checked on the socket, not with a clock."""
    server = cluster.app.server
    accepted: list[socket.socket] = []
    accept = server.get_request

    def get_request() -> tuple[socket.socket, Any]:
        connection, address = accept()
        accepted.append(connection)
        return connection, address

    monkeypatch.setattr(server, "get_request", get_request)
    client = Client(cluster.app.url)  # a connection of its own, accepted from now on
    try:
        for _ in range(3):  # kept alive: one connection for all three
            client.get(vms_path(cluster.ns))
        assert len(accepted) == 1
        assert accepted[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        client.close()


def test_healthz_answers_200(cluster: Cluster) -> None:
    code, body = raw(cluster, "GET", "/healthz")
    assert code == 200
    assert body == "ok"


# -- events ----------------------------------------------------------------------------------------


def test_events_are_read_only(cluster: Cluster) -> None:
    event = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": "fake"}, "reason": "Started",
             "message": "forged", "involvedObject": {"kind": "VirtualMachine", "name": "web-1"}}
    status = refused(cluster.client.post, events_path(cluster.ns), event)
    assert_status(status, 405, "MethodNotAllowed")
    assert cluster.client.get(events_path(cluster.ns))["items"] == []


def test_events_cannot_be_changed_or_deleted(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("web-1"))
    cluster.action("web-1", "start")
    cluster.wait_status("web-1", "Running")
    events = cluster.client.get(events_path(cluster.ns))["items"]
    assert events
    event = events[0]
    path = f"{events_path(cluster.ns)}/{event['metadata']['name']}"
    assert cluster.client.get(path) == event
    assert_status(refused(cluster.client.put, path, {**event, "message": "forged"}), 405, "MethodNotAllowed")
    assert_status(refused(cluster.client.patch, path, {"message": "forged"}), 405, "MethodNotAllowed")
    assert_status(refused(cluster.client.delete, path), 405, "MethodNotAllowed")
    assert cluster.client.get(path) == event


def test_events_list_what_happened_to_a_started_vm(cluster: Cluster) -> None:
    created = cluster.create_vm(vm_manifest("web-1"))
    cluster.action("web-1", "start")
    cluster.wait_status("web-1", "Running")
    listing = cluster.client.get(events_path(cluster.ns))
    assert listing["kind"] == "EventList"
    about = [e for e in listing["items"] if e["involvedObject"]["name"] == "web-1"]
    assert about
    for event in about:
        assert event["kind"] == "Event" and event["apiVersion"] == "v1"
        assert event["metadata"]["namespace"] == cluster.ns
        assert event["involvedObject"]["kind"] == "VirtualMachine"
        assert event["involvedObject"]["uid"] == created["metadata"]["uid"]
        assert event["reason"] and event["message"] and event["type"] in ("Normal", "Warning")
    assert "StartRequested" in {e["reason"] for e in about}


# -- namespaces ------------------------------------------------------------------------------------


def test_deleting_a_namespace_with_vms_is_refused_naming_them(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("web-1"))
    cluster.create_vm(vm_manifest("db-1"))
    cluster.create_quota({"limits.cpu": "4"})
    status = refused(cluster.client.delete, f"{NAMESPACES}/{cluster.ns}")
    assert_status(status, 409, "Conflict")
    assert "web-1" in status["message"] and "db-1" in status["message"]
    assert cluster.client.get(f"{NAMESPACES}/{cluster.ns}")["metadata"]["name"] == cluster.ns
    assert names(cluster.client.get(vms_path(cluster.ns))) == ["db-1", "web-1"]
    assert names(cluster.client.get(quotas_path(cluster.ns))) == ["compute"]


def test_deleting_an_empty_namespace_removes_it_and_its_quotas(cluster: Cluster) -> None:
    other = f"{cluster.ns}-b"
    cluster.create_namespace(other)
    cluster.create_quota({"limits.cpu": "4"}, namespace=other)
    cluster.create_vm(vm_manifest("web-1"), namespace=other)
    cluster.delete_vm("web-1", other)
    cluster.client.delete(f"{NAMESPACES}/{other}")
    assert_status(refused(cluster.client.get, f"{NAMESPACES}/{other}"), 404, "NotFound")
    assert other not in {q["metadata"]["namespace"] for q in cluster.client.get(ALL_QUOTAS)["items"]}
