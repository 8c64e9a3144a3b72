"""Bad input: schemathesis generates requests for every operation of the served `/openapi.json` (valid ones and
ones that break the schema), and explicit cases cover what generators rarely reach: XML and shell metacharacters
in fields that do reach libvirt and qemu-img, path traversal in names and paths, huge and tiny numbers, unicode,
malformed, deeply nested, alias-bomb and oversized YAML/JSON, and stale resourceVersions on every kind.

Whatever comes in: no 5xx, no traceback in any body, every error a Kubernetes Status, and a refused request
changes nothing (the store's revision, which every write bumps, stays where it was).
tests/test_api.py has the API's own bad-input cases (names, quantities, run strategies, labels reaching
libvirt, 1 MiB bodies); the cases here are the ones it does not have.
"""

from __future__ import annotations

import copy
import http.client
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import schemathesis
from conftest import HOST, Cluster, _cleanup, open_app, unsettled, vm_manifest, wait_until
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from reliability import profile
from reliability.invariants import PROJECTS, look, violations, vms_path

from vmquota.apiserver import openapi
from vmquota.app import App, NodeSettings
from vmquota.client import Client, ClientError

SEEDED = {"namespace": "fuzz", "name": "vm-a"}  # objects that exist, so generated requests reach real work
TRIED: Counter[str] = Counter()  # generated requests sent per operation, for the report
SENT: Counter[str] = Counter()  # explicit requests sent, for the report


def raw(app: App, method: str, path: str, body: bytes | None = None,
        content_type: str = "application/json") -> tuple[int, str]:
    parts = urlsplit(app.url)
    SENT["explicit requests"] += 1
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type} if body is not None else {})
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def settle(app: App) -> None:
    wait_until(lambda: not unsettled(app, lambda _ns: True), timeout=30, what="the controller to settle")


def assert_well_refused(status: int, text: str, what: str) -> None:
    """No server error, no traceback; an error is a Kubernetes Status naming its own code."""
    assert status < 500, f"{what}: {status} {text[:500]}"
    assert "Traceback" not in text and 'File "' not in text, f"{what}: a traceback reached the client"
    if status >= 400:
        body = json.loads(text)
        assert body["kind"] == "Status" and body["code"] == status and body["message"], f"{what}: {text[:300]}"


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """One server for every generated request, with a project, a namespace, a quota and two VMs in it."""
    # The heartbeat rewrites each Node's status now and then even when nothing changed: an hour apart here.
    app = open_app(tmp_path_factory.mktemp("fuzz") / "data", node_settings=NodeSettings(heartbeat_seconds=3600.0))
    # Retries of refused or failed automatic starts write to the store: an hour away, they never land between the
    # two looks at the store's revision that tell whether a refused request changed anything.
    app.controller.unschedulable_retry_seconds = app.controller.backoff_base_seconds = 3600.0
    client = Client(app.url)
    client.post(PROJECTS, {"metadata": {"name": "fuzz"}, "spec": {"resourceQuota": {"hard": {"limits.cpu": "8"}}}})
    client.post("/api/v1/namespaces", {"metadata": {"name": "fuzz", "labels": {"vmquota.io/project": "fuzz"}}})
    client.post("/api/v1/namespaces/fuzz/resourcequotas", {"metadata": {"name": "vm-a"},
                                                            "spec": {"hard": {"limits.cpu": "4"}}})
    client.post(vms_path("fuzz"), vm_manifest("vm-a", cores=1, disk="1Gi", strategy="Always"))
    client.post(vms_path("fuzz"), vm_manifest("vm-b", cores=1, disk="1Gi"))
    client.close()
    try:
        yield app
    finally:
        cluster = Cluster(app, "fuzz")
        _cleanup(cluster)
        cluster.client.close()
        app.close()


# The document the server serves at /openapi.json (checked below to be byte for byte the same): schemathesis
# needs it when tests are collected, before any server runs.
schema = schemathesis.openapi.from_dict(openapi.document())


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
    """Half the requests name the seeded namespace and VM, so they reach validation and admission."""
    seeded = {k: SEEDED.get(k, v) for k, v in (path_parameters or {}).items()}
    return st.sampled_from([path_parameters, seeded])


def test_the_fuzzed_document_is_the_served_one(fuzz_app: App) -> None:
    status, text = raw(fuzz_app, "GET", "/openapi.json")
    assert status == 200 and json.loads(text) == openapi.document()


@schema.parametrize()
@settings(max_examples=profile.FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_never_break_the_server(case: Any, fuzz_app: App) -> None:
    settle(fuzz_app)
    before = fuzz_app.store.revision
    response = case.call(base_url=fuzz_app.url, timeout=60)
    TRIED[case.operation.label] += 1
    assert_well_refused(response.status_code, response.text, f"{case.method} {case.formatted_path}")
    if response.status_code >= 400:
        settle(fuzz_app)
        assert fuzz_app.store.revision == before, f"refused ({response.status_code}) but something changed"


def test_after_the_fuzzing_usage_is_still_the_truth(fuzz_app: App) -> None:
    """Whatever the generated requests did, the quotas still count exactly what exists and runs."""
    settle(fuzz_app)
    client = Client(fuzz_app.url)
    namespaces = [ns["metadata"]["name"] for ns in client.get("/api/v1/namespaces")["items"]]
    world = look(client, HOST, namespaces)
    client.close()
    assert violations(world, disks_root=fuzz_app.controller.disks.root) == []
    assert fuzz_app.controller.resync() == []
    profile.record("bad-input", generated_requests=sum(TRIED.values()), operations=len(TRIED),
                   examples_per_operation=profile.FUZZ_EXAMPLES)
    print(f"\n{sum(TRIED.values())} generated requests over {len(TRIED)} operations")


# -- explicit cases ----------------------------------------------------------------------------------------


def revision(cluster: Cluster) -> int:
    settle(cluster.app)
    return cluster.app.store.revision


def refused(cluster: Cluster, method: str, path: str, body: bytes | None, codes: set[int], what: str,
            content_type: str = "application/json") -> str:
    """Send it; it must be refused with one of `codes`, as a Status, changing nothing."""
    before = revision(cluster)
    status, text = raw(cluster.app, method, path, body, content_type)
    assert_well_refused(status, text, what)
    assert status in codes, f"{what}: {status} {text[:300]}"
    assert revision(cluster) == before, f"{what} was refused but changed something"
    return text


def bomb(levels: int) -> bytes:
    """A YAML "billion laughs": nine references per level, 9**levels strings once expanded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    lines += ["metadata: {name: bomb}", f"spec: {{template: {{spec: {{domain: {{memory: {{guest: 1Gi}}}}}}}}, "
                                        f"laughs: *a{levels}}}"]
    return "\n".join(lines).encode()


def nested(depth: int) -> bytes:
    return b'{"metadata": {"name": "deep"}, "spec": {"x": ' + b"[" * depth + b"]" * depth + b"}}"


MALFORMED = [
    pytest.param(bomb(9), "application/yaml", id="yaml-billion-laughs"),
    pytest.param(nested(200), "application/json", id="json-nested-200"),
    pytest.param(nested(100_000), "application/json", id="json-nested-100k"),
    pytest.param(b"metadata: {name: deep}\nspec: {x: " + b"[" * 600 + b"]" * 600 + b"}",
                 "application/yaml", id="yaml-nested-600"),
    pytest.param(b"metadata: {name: d}\nspec: {when: 2001-01-01}", "application/yaml", id="yaml-date"),
    pytest.param(b"metadata: {name: d, labels: {1: a}}", "application/yaml", id="yaml-integer-key"),
    pytest.param(b"metadata: {name: d}\nspec: {b: !!binary aGVsbG8=}", "application/yaml", id="yaml-binary"),
    pytest.param(b"metadata: {name: d}\nspec: {s: !!set {a, b}}", "application/yaml", id="yaml-set"),
    pytest.param(b"metadata: {name: d}\nspec: {x: .nan}", "application/yaml", id="yaml-nan"),
    pytest.param(b"metadata: {name: d}\nspec: !!python/object/apply:os.system [touch /tmp/pwned]",
                 "application/yaml", id="yaml-python-object"),
    pytest.param(b"a: b\n---\nc: d", "application/yaml", id="yaml-two-documents"),
    pytest.param(b"{\"metadata\": {\"name\": \"d\"}, \"spec\": {\"x\": NaN}}", "application/json", id="json-nan"),
    pytest.param(b"{\"metadata\": {\"name\": \"d\"}, \"spec\": {\"x\": -Infinity}}", "application/json",
                 id="json-infinity"),
    pytest.param(b'{"metadata": {"name": "d", "annotations": {"a": "\\ud800"}}}', "application/json",
                 id="json-lone-surrogate"),
    pytest.param(b'{"metadata": {"name": "d"}, "spec": {"x": ' + b"9" * 5000 + b"}}", "application/json",
                 id="json-5000-digit-integer"),
    pytest.param(b'{"metadata": {"name": "d"}, "metadata": {"name": "e"}', "application/json", id="json-truncated"),
    pytest.param(b"\xff\xfe{\x00}\x00", "application/json", id="utf16-bytes"),
    pytest.param(b"\x00" * 1000, "application/json", id="nul-bytes"),
    pytest.param(b"", "application/json", id="empty-body"),
    pytest.param(b"null", "application/json", id="json-null"),
    pytest.param(b'"a string"', "application/json", id="json-string"),
]


@pytest.mark.parametrize(("body", "content_type"), MALFORMED)
def test_malformed_bodies_are_refused_and_change_nothing(cluster: Cluster, body: bytes, content_type: str) -> None:
    cluster.create_vm(vm_manifest("existing"))
    for method, path in [("POST", vms_path(cluster.ns)), ("PATCH", f"{vms_path(cluster.ns)}/existing"),
                         ("PUT", f"{vms_path(cluster.ns)}/existing"), ("POST", PROJECTS)]:
        refused(cluster, method, path, body, {400, 409, 415, 422}, f"{method} {path}", content_type)
    assert not Path("/tmp/pwned").exists()


HOSTILE_VALUES = ["</name><devices><disk type='file'><source file='/etc/shadow'/></disk></devices>",
                  "$(touch /tmp/pwned)", "`touch /tmp/pwned`", "a; touch /tmp/pwned", "a | cat /etc/passwd",
                  "../../../../etc/passwd", "..\\..\\windows", "%2e%2e%2f", "\u202egnp.exe", "\u200b", "é", "🦄",
                  "\x00", "'\"<>&", "${jndi:ldap://127.0.0.1/a}", "{{7*7}}"]


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_hostile_names_are_refused_wherever_a_name_is_taken(cluster: Cluster, value: str) -> None:
    """Names reach domain names, disk paths and qemu-img arguments: every place that takes one checks it."""
    cluster.create_vm(vm_manifest("source"))
    disk_named = vm_manifest("vm-1")
    disk_named["spec"]["dataVolumeTemplates"][0]["metadata"]["name"] = value
    disk_named["spec"]["template"]["spec"]["volumes"][0]["dataVolume"]["name"] = value
    ns_path = f"/api/v1/namespaces/{cluster.ns}"
    cases: list[tuple[str, str, Any]] = [
        ("POST", vms_path(cluster.ns), disk_named),
        ("POST", f"/apis/clone.kubevirt.io/v1beta1/namespaces/{cluster.ns}/virtualmachineclones",
         {"metadata": {"name": "c"}, "spec": {"source": {"name": value}, "target": {"name": "t"}}}),
        ("POST", f"/apis/clone.kubevirt.io/v1beta1/namespaces/{cluster.ns}/virtualmachineclones",
         {"metadata": {"name": "c"}, "spec": {"source": {"name": "source"}, "target": {"name": value}}}),
        ("PATCH", ns_path, {"metadata": {"labels": {"vmquota.io/project": value}}}),
        ("POST", PROJECTS, {"metadata": {"name": value}}),
        ("POST", "/api/v1/namespaces", {"metadata": {"name": value}}),
        ("POST", f"/api/v1/namespaces/{cluster.ns}/resourcequotas", {"metadata": {"name": value}}),
    ]
    for method, path, body in cases:
        refused(cluster, method, path, json.dumps(body).encode(), {400, 404, 422}, f"{method} {path} with {value!r}")
    assert not Path("/tmp/pwned").exists()


def test_hostile_text_in_fields_that_are_kept_never_reaches_libvirt(cluster: Cluster) -> None:
    """Unknown spec fields and template metadata are kept as written, and stay out of the domain; an interface
    (which vmquota now builds into the domain) with a hostile name is refused before anything is stored."""
    manifest = vm_manifest("web-1")
    template = manifest["spec"]["template"]
    template["metadata"] = {"labels": {"x": HOSTILE_VALUES[0]}, "annotations": {"y": HOSTILE_VALUES[1]}}
    template["spec"]["domain"]["devices"]["disks"][0]["name"] = "root"
    template["spec"]["hostname"] = HOSTILE_VALUES[2]
    manifest["spec"]["extra"] = {value: value for value in HOSTILE_VALUES if value != "\x00"}
    hostile_nic = copy.deepcopy(manifest)
    hostile_nic["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"] = [
        {"name": HOSTILE_VALUES[0], "masquerade": {}}]
    hostile_nic["spec"]["template"]["spec"]["networks"] = [{"name": HOSTILE_VALUES[0], "pod": {}}]
    before = revision(cluster)
    with pytest.raises(ClientError) as refused:
        cluster.create_vm(hostile_nic)
    assert refused.value.code == 422 and revision(cluster) == before
    cluster.create_vm(manifest)
    cluster.action("web-1", "start")
    cluster.wait_status("web-1", "Running")
    assert cluster.vm("web-1")["spec"]["extra"] == manifest["spec"]["extra"]
    xml = cluster.domain("web-1").XMLDesc()
    for text in ("/etc/shadow", "pwned", "passwd", "jndi", "{{7*7}}", "windows", "\u202e"):
        assert text not in xml, text
    assert not Path("/tmp/pwned").exists()


PATHS = ["/apis/kubevirt.io/v1/namespaces/%2e%2e/virtualmachines", "/apis/kubevirt.io/v1/namespaces/%252e%252e/x",
         "/apis/kubevirt.io/v1/namespaces/a%00b/virtualmachines", "/api/v1/namespaces/..%5c..%5cetc",
         "/api/v1/namespaces/" + "a" * 10_000, "/api/v1/namespaces/%F0%9F%A6%84", "/api/v1/namespaces/%C3%A9",
         "//api//v1//namespaces", "/api/v1/namespaces/x/../../../etc/passwd", "/api/v1/namespaces?name=../x",
         "/apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachines/%2e%2e/start",
         "/apis/vmquota.io/v1/projects/..%2f..%2f/usage", "/api/v1/namespaces/{ns}/events/../../../healthz"]


@pytest.mark.parametrize("path", PATHS)
def test_path_traversal_and_odd_paths_are_refused(cluster: Cluster, path: str) -> None:
    path = path.replace("{ns}", cluster.ns)
    for method in ("GET", "PUT", "DELETE"):
        body = b"{}" if method == "PUT" else None
        before = revision(cluster)
        status, text = raw(cluster.app, method, path, body)
        assert_well_refused(status, text, f"{method} {path[:80]}")
        assert status in (200, 400, 404, 405) and revision(cluster) == before, f"{method} {path[:80]}: {status}"


NUMBERS: list[tuple[str, Any]] = [
    ("cores", 2**63), ("cores", -(2**63)), ("cores", 1.5), ("cores", 1e308), ("cores", "1"), ("cores", None),
    ("memory", "1n"), ("memory", "0.5"), ("memory", 1e-300), ("memory", "9223372036854775808"),
    ("memory", "1e3000"), ("memory", "-0"), ("memory", "+1Gi"), ("memory", " 1Gi"), ("memory", "1Gi "),
    ("memory", "0x10"), ("memory", "\uff11Gi"), ("memory", "1_000Mi"),
    ("cpu-limit", "1n"), ("cpu-limit", "0"), ("cpu-limit", "1e-3"), ("cpu-limit", 10**30),
    ("grace", 10**20), ("grace", 1.0), ("grace", True), ("disk", "1e18"), ("disk", 1),
]


@pytest.mark.parametrize(("field", "value"), NUMBERS, ids=[f"{f}={v!r}"[:40] for f, v in NUMBERS])
def test_huge_tiny_and_odd_numbers_are_refused_or_exact(cluster: Cluster, field: str, value: Any) -> None:
    """An odd number is refused (422) with nothing changed, or accepted and then charged exactly as written."""
    cluster.create_quota({"limits.cpu": "64", "limits.memory": "1Ti", "requests.storage": "10Ti"})
    manifest = vm_manifest("odd", cores=1, memory="1Gi", disk="1Gi")
    domain = manifest["spec"]["template"]["spec"]["domain"]
    if field == "cores":
        domain["cpu"]["cores"] = value
    elif field == "memory":
        domain["memory"]["guest"] = value
    elif field == "cpu-limit":
        domain["resources"] = {"limits": {"cpu": value}}
    elif field == "grace":
        manifest["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = value
    else:
        manifest["spec"]["dataVolumeTemplates"][0]["spec"]["storage"]["resources"]["requests"]["storage"] = value
    before = revision(cluster)
    status, text = raw(cluster.app, "POST", vms_path(cluster.ns), json.dumps(manifest).encode())
    assert_well_refused(status, text, f"{field}={value!r}")
    if status >= 400:
        assert status == 422 and revision(cluster) == before, text[:300]
        return
    cluster.settle()
    world = look(cluster.client, HOST, [cluster.ns])
    assert violations(world, disks_root=cluster.app.controller.disks.root) == []


@pytest.mark.parametrize(("hard", "ok"), [
    ({"limits.cpu": "9223372036854775807"}, True), ({"limits.cpu": "9223372036854775808"}, False),
    ({"limits.memory": "1n"}, True), ({"limits.memory": "1e-999"}, True), ({"limits.cpu": 1e308}, False),
    ({"limits.cpu": "0"}, True), ({"limits.cpu": "-0"}, True), ({"limits.cpu": "\uff11"}, False),
    ({"limits.cpu": None}, False), ({"limits.cpu": []}, False), ({"": "1"}, False), ({"limits.cpu ": "1"}, False),
])
def test_huge_and_tiny_hard_limits_are_exact_or_refused(cluster: Cluster, hard: dict[str, Any], ok: bool) -> None:
    cluster.create_vm(vm_manifest("one", cores=1))
    cluster.action("one", "start")
    cluster.wait_status("one", "Running")
    before = revision(cluster)
    status, text = raw(cluster.app, "POST", f"/api/v1/namespaces/{cluster.ns}/resourcequotas",
                       json.dumps({"metadata": {"name": "q"}, "spec": {"hard": hard}}).encode())
    assert_well_refused(status, text, repr(hard))
    if not ok:
        assert status in (403, 422) and revision(cluster) == before, text[:300]
        return
    assert status in (201, 403), text[:300]  # 403: the limit is below what already runs
    if status == 201:
        world = look(cluster.client, HOST, [cluster.ns])
        assert violations(world) == []


def test_stale_resource_versions_are_conflicts_on_every_kind_and_change_nothing(cluster: Cluster) -> None:
    """test_api covers VMs; the same optimistic concurrency must hold for quotas, projects and namespaces."""
    project = f"p-{cluster.ns}"
    cluster.client.post(PROJECTS, {"metadata": {"name": project}, "spec": {"resourceQuota": {"hard": {}}}})
    cluster.create_quota({"limits.cpu": "4"})
    paths = [f"/api/v1/namespaces/{cluster.ns}/resourcequotas/compute", f"{PROJECTS}/{project}",
             f"/api/v1/namespaces/{cluster.ns}"]
    for path in paths:
        current = cluster.client.get(path)
        stale = dict(current, metadata=dict(current["metadata"], resourceVersion="1"))
        cluster.client.patch(path, {"metadata": {"labels": {"touched": "yes"}}})  # now "1" is surely old
        for method, body in (("PUT", stale), ("PATCH", {"metadata": {"resourceVersion": "1", "labels": {"a": "b"}}}),
                             ("PUT", dict(stale, metadata=dict(stale["metadata"], resourceVersion="99999999"))),
                             ("PUT", dict(stale, metadata=dict(stale["metadata"], resourceVersion="not-a-number")))):
            text = refused(cluster, method, path, json.dumps(body).encode(), {409}, f"{method} {path} stale")
            assert "the object has been modified" in text


def test_a_burst_of_bad_requests_leaves_the_server_serving(cluster: Cluster) -> None:
    """Hundreds of bad requests in a row on one connection and on fresh ones: the next good one still works."""
    started = time.monotonic()
    bodies = [p.values[0] for p in MALFORMED] * 5
    for body in bodies:
        status, _ = raw(cluster.app, "POST", vms_path(cluster.ns), body)
        assert status < 500
    cluster.create_vm(vm_manifest("after"))
    assert cluster.vm("after")["metadata"]["name"] == "after"
    seconds = round(time.monotonic() - started, 2)
    profile.record("bad-input-explicit", requests=SENT["explicit requests"], burst=len(bodies), burst_seconds=seconds)
    SENT.clear()
