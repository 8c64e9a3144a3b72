"""Bad input on the write paths of issue 11: generated JSON patches, strategic merge patches with directives,
applies, protobuf bodies and chunked framings, sent to a quota and a VM.

Whatever comes in: no 5xx, no traceback, every error a Kubernetes Status; a refused request changes nothing
(the store's revision stays), and a dry run never changes anything. tests/test_patch_apply.py has the explicit
cases; these are the ones a generator finds.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import HOST, Cluster, _cleanup, open_app, unsettled, vm_manifest, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import profile

from vmquota.app import App

NS = "patchfuzz"
QUOTA = f"/api/v1/namespaces/{NS}/resourcequotas/compute"
VM = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/vm-a"
TARGETS = [QUOTA, VM]
EXAMPLES = profile.FUZZ_EXAMPLES * 8
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**12) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                max_size=3), max_leaves=8)
POINTERS = st.sampled_from(["", "/", "/spec", "/spec/hard", "/spec/hard/limits.cpu", "/metadata/labels",
                            "/metadata/labels/a~1b", "/metadata/name", "/metadata/managedFields",
                            "/metadata/managedFields/0/fieldsV1", "/metadata/resourceVersion", "/status/used",
                            "/spec/runStrategy", "/spec/template/spec/domain/cpu/cores", "/kind", "/apiVersion",
                            "/metadata/finalizers/-", "/x/~2", "spec", "/spec/dataVolumeTemplates/0"])
OPERATION = st.fixed_dictionaries({"op": st.sampled_from(["add", "remove", "replace", "move", "copy", "test",
                                                          "bogus"]), "path": POINTERS},
                                  optional={"value": JSON, "from": POINTERS})
KEYS = st.sampled_from(["metadata", "spec", "hard", "labels", "finalizers", "ownerReferences", "limits.cpu",
                        "$patch", "$retainKeys", "$setElementOrder/finalizers",
                        "$deleteFromPrimitiveList/finalizers", "uid", "managedFields", "runStrategy", "status"])
STRATEGIC = st.recursive(JSON | st.sampled_from(["replace", "delete", "merge", "4", "1Gi"]),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
                         max_leaves=10).filter(lambda d: isinstance(d, dict))


def raw(app: App, method: str, path: str, body: bytes | None = None,
        content_type: str = "application/json") -> tuple[int, str]:
    parts = urlsplit(app.url)
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
        answer = json.loads(text)
        assert answer["kind"] == "Status" and answer["code"] == status, f"{what}: {text[:300]}"


@pytest.fixture(scope="module")
def patch_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    app = open_app(tmp_path_factory.mktemp("patchfuzz") / "data")
    raw(app, "POST", "/api/v1/namespaces", json.dumps({"metadata": {"name": NS}}).encode())
    raw(app, "POST", f"/api/v1/namespaces/{NS}/resourcequotas",
        json.dumps({"metadata": {"name": "compute"}, "spec": {"hard": {"limits.cpu": "8"}}}).encode())
    raw(app, "POST", f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines", json.dumps(vm_manifest("vm-a")).encode())
    try:
        yield app
    finally:
        cluster = Cluster(app, NS)
        _cleanup(cluster)
        cluster.client.close()
        app.close()
        assert HOST.isAlive()


def sent(app: App, method: str, path: str, body: bytes, content_type: str, *, dry_run: bool = False) -> None:
    settle(app)
    before = app.store.revision
    status, text = raw(app, method, path + ("?dryRun=All" if dry_run else ""), body, content_type)
    assert_well_refused(status, text, f"{method} {path} {content_type}")
    if status >= 400 or dry_run:
        settle(app)
        assert app.store.revision == before, f"{status} {text[:300]}: refused or dry, but something changed"


@FUZZ
@given(ops=st.lists(OPERATION, max_size=4), target=st.sampled_from(TARGETS), dry_run=st.booleans())
def test_generated_json_patches(patch_app: App, ops: list[Any], target: str, dry_run: bool) -> None:
    sent(patch_app, "PATCH", target, json.dumps(ops).encode(), "application/json-patch+json", dry_run=dry_run)


@FUZZ
@given(document=STRATEGIC, target=st.sampled_from(TARGETS), dry_run=st.booleans())
def test_generated_strategic_merge_patches(patch_app: App, document: Any, target: str, dry_run: bool) -> None:
    sent(patch_app, "PATCH", target, json.dumps(document).encode(), "application/strategic-merge-patch+json",
         dry_run=dry_run)


@FUZZ
@given(document=STRATEGIC, manager=st.sampled_from(["a", "b", "", "x" * 200]), force=st.booleans(),
       dry_run=st.booleans())
def test_generated_applies(patch_app: App, document: Any, manager: str, force: bool, dry_run: bool) -> None:
    config = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "compute", "namespace": NS},
              **{k: v for k, v in document.items() if k not in ("apiVersion", "kind", "metadata")}}
    query = f"?fieldManager={manager}&force={str(force).lower()}" + ("&dryRun=All" if dry_run else "")
    settle(patch_app)
    before = patch_app.store.revision
    status, text = raw(patch_app, "PATCH", QUOTA + query, json.dumps(config).encode(), "application/apply-patch+yaml")
    assert_well_refused(status, text, "apply")
    if status >= 400 or dry_run:
        assert patch_app.store.revision == before


@FUZZ
@given(body=st.binary(max_size=200) | st.binary(max_size=200).map(lambda b: b"k8s\x00" + b))
def test_generated_protobuf_bodies(patch_app: App, body: bytes) -> None:
    sent(patch_app, "POST", "/api/v1/namespaces", body, "application/vnd.kubernetes.protobuf")


@FUZZ
@given(framing=st.binary(max_size=60))
def test_generated_chunked_framings(patch_app: App, framing: bytes) -> None:
    settle(patch_app)
    before = patch_app.store.revision
    parts = urlsplit(patch_app.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(f"PATCH {QUOTA} HTTP/1.1\r\nHost: x\r\nContent-Type: application/merge-patch+json\r\n"
                     f"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode() + framing)
        sock.shutdown(socket.SHUT_WR)  # what the framing leaves unsaid ends here, not in a timeout
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    code = int(head.split()[1]) if head.startswith("HTTP/1.1 ") else 0
    assert code == 0 or code < 500, answer[:300]
    if code != 200:
        assert patch_app.store.revision == before


def test_the_fuzzed_objects_are_still_whole(patch_app: App, tmp_path: Path) -> None:
    settle(patch_app)
    for path in TARGETS:
        status, text = raw(patch_app, "GET", path)
        assert status == 200, text
        assert json.loads(text)["metadata"]["name"] in ("compute", "vm-a")
