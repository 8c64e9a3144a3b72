"""Version, discovery, OpenAPI and fieldValidation: what kubectl and the official clients ask before anything else.

The documents are checked against the kind registry (every kind, verb and subresource is in them, every reference
resolves), and then used as users use them: the machine's kubectl 1.32 (`api-resources`, `api-versions`,
`explain`, `apply` with its default `--validate=strict`) and the official `kubernetes` Python client, against a
server in this process. fieldValidation's three modes are checked through HTTP.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes
import pytest
import yaml
from conftest import Cluster, vm_manifest

from vmquota import objects, schema
from vmquota.apiserver import discovery, openapi, openapi_pb

KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.1.32"
AGGREGATED_ACCEPT = ("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
                     "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json")


def request(cluster: Cluster, method: str, path: str, body: Any = None, *,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """One plain HTTP request: the code, the headers (Warning ones joined) and the decoded JSON body."""
    parts = urlsplit(cluster.app.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        text = response.read()
        found = {name: ", ".join(response.headers.get_all(name) or []) for name in set(response.headers.keys())}
        return response.status, found, json.loads(text) if text else None
    finally:
        conn.close()


# -- the documents and the registry ---------------------------------------------------------------------------


def refs(document: Any) -> Iterator[str]:
    if isinstance(document, dict):
        for key, value in document.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(document, list):
        for value in document:
            yield from refs(value)


def v3(group: str, version: str) -> dict[str, Any]:
    return json.loads(openapi.V3[openapi.gv_key(group, version)].body)


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method != "parameters":
                yield path, method, op


def test_every_reference_resolves_in_every_document() -> None:
    v2 = json.loads(openapi.V2.body)
    assert v2["swagger"] == "2.0"
    assert {r.removeprefix("#/definitions/") for r in refs(v2)} <= set(v2["definitions"])
    for key in openapi.V3:
        document = json.loads(openapi.V3[key].body)
        assert document["openapi"].startswith("3.")
        missing = {r.removeprefix("#/components/schemas/") for r in refs(document)} - \
            set(document["components"]["schemas"])
        assert not missing, key


def test_the_v3_index_names_a_document_for_every_served_group_version() -> None:
    index = json.loads(openapi.V3_INDEX.body)["paths"]
    wanted = {openapi.gv_key(k.group, k.version) for k in objects.KINDS} | \
        {openapi.gv_key(s.group, s.version) for s in objects.SUBRESOURCES}
    assert set(index) == wanted
    for key, entry in index.items():
        assert entry["serverRelativeURL"] == f"/openapi/v3/{key}?hash={openapi.V3[key].hash}"


@pytest.mark.parametrize("kind", objects.KINDS, ids=lambda k: k.kind)
def test_each_kind_is_described_as_kubectl_looks_for_it(kind: objects.Kind) -> None:
    """A definition carrying the kind's group-version-kind (explain, apply), and an operation for each verb; a
    PATCH lists fieldValidation (so kubectl leaves validation to the server) and, for the built-in kinds only,
    strategic merge patch."""
    gvk = {"group": kind.group, "version": kind.version, "kind": kind.kind}
    for document, definitions in ((v3(kind.group, kind.version), "components"), (json.loads(openapi.V2.body), "")):
        found = document["components"]["schemas"] if definitions else document["definitions"]
        definition = found[schema.definition_name(kind)]
        assert definition["x-kubernetes-group-version-kind"] == [gvk]
        assert {"apiVersion", "kind", "metadata"} <= set(definition["properties"])
        actions = {op["x-kubernetes-action"] for _, _, op in operations(document)
                   if op.get("x-kubernetes-group-version-kind") == gvk}
        # A PATCH operation even where vmquota refuses patches: kubectl looks for fieldValidation there.
        wanted = {"list", "get", "patch"} | {a for verb, a in (("create", "post"), ("update", "put"),
                                                                ("delete", "delete")) if verb in kind.verbs}
        assert actions == wanted
    for _, method, op in operations(v3(kind.group, kind.version)):
        if method == "patch" and op.get("x-kubernetes-group-version-kind") == gvk:
            names = {p["name"] for p in op["parameters"] if p["in"] == "query"}
            assert {"dryRun", "fieldValidation", "fieldManager", "force"} <= names
            strategic = "application/strategic-merge-patch+json" in op["requestBody"]["content"]
            assert strategic == (kind.group == "")


def test_lists_take_the_list_parameters_and_writes_dry_run() -> None:
    document = v3("kubevirt.io", "v1")
    listing = document["paths"]["/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines"]
    names = {p["name"] for p in listing["get"]["parameters"]}
    assert {"labelSelector", "fieldSelector", "limit", "continue", "resourceVersion", "watch", "timeoutSeconds",
            "allowWatchBookmarks"} <= names
    assert {p["name"] for p in listing["post"]["parameters"]} == {"dryRun", "fieldManager", "fieldValidation"}


def test_discovery_lists_every_kind_and_subresource_of_the_registry() -> None:
    listed: dict[tuple[str, str], Any] = {}
    for group, version in discovery.GROUP_VERSIONS:
        document = discovery.api_resource_list(group, version)
        assert document is not None
        listed |= {(document["groupVersion"], r["name"]): r for r in document["resources"]}
    for kind in objects.KINDS:
        resource = listed[(kind.api_version, kind.plural)]
        assert resource["kind"] == kind.kind
        assert resource["verbs"] == list(kind.verbs) and resource["namespaced"] == kind.namespaced
        assert resource.get("shortNames", []) == list(kind.short_names)
        assert resource.get("categories", []) == list(kind.categories)
    names = {name for _, name in listed}
    assert {"virtualmachines/start", "virtualmachines/stop", "virtualmachines/restart", "projects/usage"} <= names


# -- the pure field checks ------------------------------------------------------------------------------------


def test_unknown_fields_are_named_by_their_path_and_unmodelled_subtrees_are_kept() -> None:
    vm = vm_manifest("web-1", foo=1)
    vm["metadata"]["bogus"] = True
    spec = vm["spec"]["template"]["spec"]
    spec["domain"]["cpu"]["cores2"] = 1
    spec["domain"]["devices"]["disks"][0]["typo"] = 1
    spec["domain"]["devices"]["interfaces"] = [{"name": "default", "masquerade": {}, "anything": 1}]
    spec["networks"] = [{"name": "default", "pod": {}}]
    vm["spec"]["dataVolumeTemplates"][0]["spec"]["source"] = {"http": {"url": "http://example.com/disk.qcow2"}}
    vm["status"] = {"printableStatus": "Stopped", "phase": "Stopped", "lastExit": "shutdown"}
    assert schema.unknown_fields(objects.VIRTUAL_MACHINE, vm) == [
        "metadata.bogus", "spec.template.spec.domain.cpu.cores2",
        "spec.template.spec.domain.devices.disks[0].typo", "spec.foo"]
    assert schema.unknown_fields(objects.VIRTUAL_MACHINE, vm_manifest("web-1")) == []
    quota = {"metadata": {"name": "q", "labels": {"any": "label"}}, "spec": {"hard": {"pods": "1"}, "hrad": {}}}
    assert schema.unknown_fields(objects.RESOURCE_QUOTA, quota) == ["spec.hrad"]


def test_a_merge_patch_may_remove_an_unknown_field() -> None:
    patch = {"spec": {"foo": None, "bar": 1}}
    assert schema.unknown_fields(objects.VIRTUAL_MACHINE, patch, merge_patch=True) == ["spec.bar"]
    assert schema.unknown_fields(objects.VIRTUAL_MACHINE, patch) == ["spec.foo", "spec.bar"]


def test_duplicate_keys_are_found_in_json_and_yaml() -> None:
    assert schema.duplicate_fields(b'{"spec": {"runStrategy": "Halted", "runStrategy": "Always"}}') == \
        ["spec.runStrategy"]
    assert schema.duplicate_fields(b"metadata:\n  name: a\n  name: b\n", "application/yaml") == ["metadata.name"]
    assert schema.duplicate_fields(b'{"a": [{"b": 1, "b": 2}]}') == ["a[0].b"]
    assert schema.duplicate_fields(b"not json") == []


# -- through HTTP ---------------------------------------------------------------------------------------------


def test_version_is_a_kubernetes_version_info(cluster: Cluster) -> None:
    code, _, info = request(cluster, "GET", "/version")
    assert code == 200
    assert (info["major"], info["minor"]) == ("1", "32")
    assert info["gitVersion"].startswith("v1.32.0+vmquota.")


def test_aggregated_discovery_is_negotiated_by_the_accept_header(cluster: Cluster) -> None:
    code, headers, body = request(cluster, "GET", "/apis", headers={"Accept": AGGREGATED_ACCEPT})
    assert code == 200 and headers["Content-Type"] == discovery.AGGREGATED_V2
    assert body["kind"] == "APIGroupDiscoveryList"
    groups = {item["metadata"]["name"] for item in body["items"]}
    assert {"kubevirt.io", "clone.kubevirt.io", "subresources.kubevirt.io", "vmquota.io",
            "rbac.authorization.k8s.io", "authorization.k8s.io", "authentication.k8s.io"} == groups
    reviews = {r["resource"]: r for item in body["items"] if item["metadata"]["name"].endswith("k8s.io")
               and item["metadata"]["name"] != "rbac.authorization.k8s.io"
               for r in item["versions"][0]["resources"]}  # created and answered, never stored, as kube-apiserver's
    assert {name: (r["verbs"], r["scope"], r["responseKind"]["kind"]) for name, r in reviews.items()} == {
        "selfsubjectaccessreviews": (["create"], "Cluster", "SelfSubjectAccessReview"),
        "selfsubjectrulesreviews": (["create"], "Cluster", "SelfSubjectRulesReview"),
        "selfsubjectreviews": (["create"], "Cluster", "SelfSubjectReview")}
    code, headers, body = request(cluster, "GET", "/api", headers={"Accept": AGGREGATED_ACCEPT})
    assert headers["Content-Type"] == discovery.AGGREGATED_V2 and body["items"][0]["metadata"] == {}
    code, headers, body = request(cluster, "GET", "/apis", headers={"Accept": "application/json"})
    assert headers["Content-Type"] == "application/json" and body["kind"] == "APIGroupList"
    code, _, body = request(cluster, "GET", "/api")
    assert body == {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
        {"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}


def test_openapi_v2_is_served_as_json_or_as_gnostic_protobuf(cluster: Cluster) -> None:
    code, headers, body = request(cluster, "GET", "/openapi/v2", headers={"Accept": "application/json"})
    assert code == 200 and body["swagger"] == "2.0" and headers["Content-Type"] == "application/json"
    parts = urlsplit(cluster.app.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", "/openapi/v2", headers={"Accept": openapi_pb.ACCEPT})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == openapi_pb.CONTENT_TYPE
    assert response.read() == openapi.V2_PROTOBUF
    conn.close()
    code, _, status = request(cluster, "GET", "/openapi/v2", headers={"Accept": "text/html"})
    assert code == 406 and status["reason"] == "NotAcceptable"


def test_strict_field_validation_refuses_unknown_and_duplicate_fields(cluster: Cluster) -> None:
    path = f"/apis/kubevirt.io/v1/namespaces/{cluster.ns}/virtualmachines"
    code, _, status = request(cluster, "POST", path + "?fieldValidation=Strict", vm_manifest("web-1", foo=1))
    assert code == 400 and status["reason"] == "BadRequest"
    assert status["message"] == ('VirtualMachine in version "v1" cannot be handled as a VirtualMachine: '
                                 'strict decoding error: unknown field "spec.foo"')
    raw = json.dumps(vm_manifest("web-1")).replace('"runStrategy": "Halted"',
                                                   '"runStrategy": "Halted", "runStrategy": "Halted"')
    code, _, status = request(cluster, "POST", path + "?fieldValidation=Strict", raw.encode())
    assert code == 400 and status["message"].endswith('strict decoding error: duplicate field "spec.runStrategy"')
    assert cluster.client.get(path)["items"] == []


def test_warn_field_validation_warns_once_per_field_and_goes_on(cluster: Cluster) -> None:
    path = f"/apis/kubevirt.io/v1/namespaces/{cluster.ns}/virtualmachines"
    manifest = vm_manifest("web-1", foo=1, bar=2)
    code, headers, vm = request(cluster, "POST", path + "?fieldValidation=Warn", manifest)
    assert code == 201
    assert headers["Warning"] == '299 - "unknown field \\"spec.foo\\"", 299 - "unknown field \\"spec.bar\\""'
    assert vm["spec"]["foo"] == 1  # kept, as the contract keeps a VM's unknown fields
    code, headers, _ = request(cluster, "PATCH", f"{path}/web-1", {"spec": {"foo": None}},
                               headers={"Content-Type": "application/merge-patch+json"})
    assert code == 200 and "Warning" not in headers  # the default is Warn; removing a field is no unknown field
    code, headers, _ = request(cluster, "PATCH", f"{path}/web-1", {"spec": {"größe": 1}},
                               headers={"Content-Type": "application/merge-patch+json"})
    assert code == 200 and headers["Warning"] == '299 - "unknown field \\"spec.gr\\\\u00f6\\\\u00dfe\\""'


def test_ignore_field_validation_says_nothing_and_other_values_are_refused(cluster: Cluster) -> None:
    path = f"/api/v1/namespaces/{cluster.ns}/resourcequotas"
    quota = {"metadata": {"name": "compute"}, "spec": {"hard": {"limits.cpu": "4"}, "extra": 1}}
    code, _, status = request(cluster, "POST", path + "?fieldValidation=Sometimes", quota)
    assert code == 400
    assert status["message"] == ('fieldValidation: Unsupported value: "Sometimes": supported values: "", '
                                 '"Ignore", "Strict", "Warn"')
    code, headers, _ = request(cluster, "POST", path + "?fieldValidation=Ignore", quota)
    assert code == 201 and "Warning" not in headers


# -- real clients ---------------------------------------------------------------------------------------------


def kubectl(cluster: Cluster, tmp_path: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "no-kubeconfig"), "HOME": str(tmp_path)}
    return subprocess.run([KUBECTL, "--cache-dir", str(tmp_path / "kube-cache"), "--server", cluster.app.url,
                           *args], input=stdin, capture_output=True, text=True, timeout=60, env=env)


def test_kubectl_api_resources_lists_every_kind_and_says_nothing_else(cluster: Cluster, tmp_path: Path) -> None:
    result = kubectl(cluster, tmp_path, "api-resources")
    assert result.returncode == 0 and result.stderr == ""
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    listed = {row[0]: row for row in rows}
    for kind in (*objects.KINDS, *objects.REVIEWS):  # the self reviews too, as kube-apiserver lists them
        row = listed[kind.plural]
        assert row[-1] == kind.kind and kind.api_version in row
        assert row[-2] == str(kind.namespaced).lower()
        if kind.short_names:
            assert row[1] == ",".join(kind.short_names)
    assert len(rows) == len(objects.KINDS) + len(objects.REVIEWS)  # subresources are not listed as resources


def test_kubectl_api_versions_and_version(cluster: Cluster, tmp_path: Path) -> None:
    result = kubectl(cluster, tmp_path, "api-versions")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.split() == ["authentication.k8s.io/v1", "authorization.k8s.io/v1",
                                     "clone.kubevirt.io/v1beta1", "kubevirt.io/v1", "rbac.authorization.k8s.io/v1",
                                     "subresources.kubevirt.io/v1", "v1", "vmquota.io/v1"]
    result = kubectl(cluster, tmp_path, "version", "-o", "json")
    assert result.returncode == 0 and result.stderr == ""
    assert json.loads(result.stdout)["serverVersion"]["minor"] == "32"


def test_kubectl_explain_answers_from_the_schema(cluster: Cluster, tmp_path: Path) -> None:
    result = kubectl(cluster, tmp_path, "explain", "vm.spec.runStrategy")
    assert result.returncode == 0 and result.stderr == ""
    assert "KIND:       VirtualMachine" in result.stdout and "FIELD: runStrategy <string>" in result.stdout
    assert "RerunOnFailure" in result.stdout and "Running state indicates the requested running state" in \
        " ".join(result.stdout.split())
    result = kubectl(cluster, tmp_path, "explain", "quota.spec.hard")
    assert result.returncode == 0 and "FIELD: hard <map[string]Quantity>" in result.stdout
    result = kubectl(cluster, tmp_path, "explain", "vm.spec.template.spec.domain.memory.guest")
    assert result.returncode == 0 and "visible inside the Guest OS" in " ".join(result.stdout.split())
    result = kubectl(cluster, tmp_path, "explain", "vm.spec.nosuchfield")
    assert result.returncode != 0 and 'field "nosuchfield" does not exist' in result.stderr


def test_kubectl_apply_validates_strictly_on_the_server(cluster: Cluster, tmp_path: Path) -> None:
    """kubectl's default `--validate=strict` finds fieldValidation in the OpenAPI v3 and sends Strict; the server
    refuses the typo in kubectl's own words."""
    good = vm_manifest("web-1")
    good["metadata"]["namespace"] = cluster.ns
    result = kubectl(cluster, tmp_path, "apply", "-f", "-", stdin=yaml.safe_dump(good))
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == "virtualmachine.kubevirt.io/web-1 created\n"
    typo = vm_manifest("web-2", runStrategyy="Always")
    typo["metadata"]["namespace"] = cluster.ns
    result = kubectl(cluster, tmp_path, "apply", "-f", "-", stdin=yaml.safe_dump(typo))
    assert result.returncode == 1
    assert 'strict decoding error: unknown field "spec.runStrategyy"' in result.stderr
    result = kubectl(cluster, tmp_path, "apply", "--validate=warn", "-f", "-", stdin=yaml.safe_dump(typo))
    assert result.returncode == 0 and result.stderr == 'Warning: unknown field "spec.runStrategyy"\n'


def test_kubectl_reads_the_protobuf_openapi_v2(cluster: Cluster, tmp_path: Path) -> None:
    """client-go decodes /openapi/v2 as gnostic's protobuf: explain's v2 output and client-side validation use it."""
    result = kubectl(cluster, tmp_path, "explain", "--output", "plaintext-openapiv2", "vm.spec.runStrategy")
    assert result.returncode == 0 and result.stderr == ""
    assert "FIELD:    runStrategy <string>" in result.stdout and "RerunOnFailure" in result.stdout


def test_kubectl_applies_a_list_validated_on_the_client(cluster: Cluster, tmp_path: Path) -> None:
    """A `List` (what `kubectl get -o yaml` writes) is validated by kubectl itself, against /openapi/v2: what
    vmquota keeps and writes (unknown VM fields, its own status fields) passes, a typo does not."""
    vm = vm_manifest("web-1")
    vm["metadata"]["namespace"] = cluster.ns
    assert kubectl(cluster, tmp_path, "apply", "-f", "-", stdin=yaml.safe_dump(vm)).returncode == 0
    listed = kubectl(cluster, tmp_path, "get", "vms", "-n", cluster.ns, "-o", "yaml")
    assert listed.returncode == 0 and "kind: List" in listed.stdout
    result = kubectl(cluster, tmp_path, "apply", "-f", "-", stdin=listed.stdout)
    assert result.returncode == 0 and result.stderr == ""
    typo = yaml.safe_load(listed.stdout)
    typo["items"][0]["spec"]["runStrategyy"] = "Always"
    result = kubectl(cluster, tmp_path, "apply", "-f", "-", stdin=yaml.safe_dump(typo))
    assert result.returncode == 1 and 'unknown field "runStrategyy"' in result.stderr


def test_kubectl_creates_a_kind_it_cannot_patch(cluster: Cluster, tmp_path: Path) -> None:
    """A VirtualMachineClone is never patched, yet `kubectl create -f` validates it on the server as any kind."""
    cluster.create_vm(vm_manifest("web-1"))
    clone = {"apiVersion": "clone.kubevirt.io/v1beta1", "kind": "VirtualMachineClone",
             "metadata": {"name": "copy", "namespace": cluster.ns},
             "spec": {"source": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "web-1"},
                      "target": {"apiGroup": "kubevirt.io", "kind": "VirtualMachine", "name": "web-2"}}}
    result = kubectl(cluster, tmp_path, "create", "-f", "-", stdin=yaml.safe_dump(clone))
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == "virtualmachineclone.clone.kubevirt.io/copy created\n"


def test_the_official_python_client_discovers_the_kinds(cluster: Cluster) -> None:
    configuration = kubernetes.client.Configuration()
    configuration.host = cluster.app.url
    with kubernetes.client.ApiClient(configuration) as api_client:
        assert kubernetes.client.VersionApi(api_client).get_code().minor == "32"
        dynamic = kubernetes.dynamic.DynamicClient(api_client)
        vms = dynamic.resources.get(api_version="kubevirt.io/v1", kind="VirtualMachine")
        assert (vms.name, vms.namespaced, vms.short_names) == ("virtualmachines", True, ["vm", "vms"])
        assert dynamic.resources.get(api_version="v1", kind="ResourceQuota").name == "resourcequotas"
        created = vms.create(body=vm_manifest("web-1"), namespace=cluster.ns)
        assert created.metadata.name == "web-1"
