"""meta.k8s.io Tables and selectors over HTTP: what `kubectl get` asks for and reads, column by column."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from conftest import Cluster, quotas_path, vm_manifest, vms_path

from vmquota import objects
from vmquota.apiserver import tables

KUBECTL_ACCEPT = ("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,"
                  "application/json")


def get(cluster: Cluster, path: str, accept: str = KUBECTL_ACCEPT) -> tuple[int, str, Any]:
    """(code, Content-Type, parsed body) of a GET with this Accept header."""
    request = urllib.request.Request(cluster.app.url + path, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["Content-Type"], json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], json.loads(e.read())


def cells(table: dict[str, Any]) -> list[list[Any]]:
    return [row["cells"] for row in table["rows"]]


def columns(table: dict[str, Any]) -> list[tuple[str, str, int]]:
    return [(c["name"], c["type"], c["priority"]) for c in table["columnDefinitions"]]


def labelled_vm(cluster: Cluster, name: str, **labels: str) -> None:
    manifest = vm_manifest(name)
    manifest["metadata"]["labels"] = labels
    cluster.create_vm(manifest)


def test_vms_as_kubevirts_printer_columns(cluster: Cluster) -> None:
    labelled_vm(cluster, "web-1", app="web")
    labelled_vm(cluster, "db-1", app="db")
    cluster.action("web-1", "start")
    cluster.wait_status("web-1", "Running")
    code, content_type, table = get(cluster, vms_path(cluster.ns))
    assert code == 200 and content_type == "application/json"
    assert table["kind"] == "Table" and table["apiVersion"] == "meta.k8s.io/v1"
    assert columns(table) == [("Name", "string", 0), ("Age", "date", 0), ("Status", "string", 0),
                              ("Ready", "string", 0)]
    assert table["columnDefinitions"][0]["format"] == "name"
    assert [[row[0], *row[2:]] for row in cells(table)] == [["db-1", "Stopped", "False"], ["web-1", "Running", "True"]]
    assert all(re.fullmatch(r"[0-9]+s", row[1]) for row in cells(table))  # ages in kubectl's form
    # Each row carries the object's metadata, which --show-labels reads.
    partial = table["rows"][1]["object"]
    assert partial["kind"] == "PartialObjectMetadata" and partial["apiVersion"] == "meta.k8s.io/v1"
    assert partial["metadata"]["labels"] == {"app": "web"} and partial["metadata"]["namespace"] == cluster.ns
    assert table["metadata"]["resourceVersion"] == cluster.client.get(vms_path(cluster.ns))["metadata"][
        "resourceVersion"]


def test_one_vm_is_a_one_row_table_and_a_missing_one_a_status(cluster: Cluster) -> None:
    labelled_vm(cluster, "web-1")
    code, _, table = get(cluster, f"{vms_path(cluster.ns)}/web-1")
    assert code == 200 and [row[0] for row in cells(table)] == ["web-1"]
    assert table["metadata"]["resourceVersion"] == cluster.vm("web-1")["metadata"]["resourceVersion"]
    code, _, status = get(cluster, f"{vms_path(cluster.ns)}/nope")
    assert code == 404 and status["kind"] == "Status"
    assert status["message"] == 'virtualmachines.kubevirt.io "nope" not found'


def test_negotiation_as_kube_apiserver(cluster: Cluster) -> None:
    path = vms_path(cluster.ns)
    assert get(cluster, path, "application/json")[2]["kind"] == "VirtualMachineList"
    assert get(cluster, path, "*/*")[2]["kind"] == "VirtualMachineList"
    beta = get(cluster, path, "application/json;as=Table;v=v1beta1;g=meta.k8s.io")[2]
    assert beta["kind"] == "Table" and beta["apiVersion"] == "meta.k8s.io/v1beta1"
    # Preference by q: the plain list is asked for first here.
    assert get(cluster, path, "application/json;as=Table;v=v1;g=meta.k8s.io;q=0.5,application/json")[2][
        "kind"] == "VirtualMachineList"
    # A Table of a version that does not exist, with nothing else acceptable: 406.
    code, _, status = get(cluster, path, "application/json;as=Table;v=v2;g=meta.k8s.io")
    assert code == 406 and status["reason"] == "NotAcceptable"
    # ... but with the plain list as a fallback, the plain list.
    assert get(cluster, path, "application/json;as=Table;v=v2;g=meta.k8s.io,application/json")[2]["kind"] == \
        "VirtualMachineList"


def test_include_object(cluster: Cluster) -> None:
    labelled_vm(cluster, "web-1", app="web")
    path = vms_path(cluster.ns)
    assert "object" not in get(cluster, path + "?includeObject=None")[2]["rows"][0]
    whole = get(cluster, path + "?includeObject=Object")[2]["rows"][0]["object"]
    assert whole["kind"] == "VirtualMachine" and whole["spec"]["runStrategy"] == "Halted"
    code, _, status = get(cluster, path + "?includeObject=Everything")
    assert code == 400 and status["message"] == ('Unable to convert to Table as requested: includeObject: Invalid '
                                                 'value: "Everything": must be \'Metadata\', \'Object\', \'None\', '
                                                 'or empty')


def test_quotas_as_kubectl_request_and_limit(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "4", "limits.memory": "4Gi", "requests.storage": "20Gi",
                          "count/virtualmachines.kubevirt.io": "3"})
    labelled_vm(cluster, "web-1")
    assert cells(get(cluster, quotas_path(cluster.ns))[2])[0][3] == "limits.cpu: 0/4, limits.memory: 0/4Gi"
    cluster.action("web-1", "start")
    cluster.wait_status("web-1", "Running")
    code, _, table = get(cluster, quotas_path(cluster.ns))  # the same quota, its status changed since
    assert code == 200
    assert [c[0] for c in columns(table)] == ["Name", "Age", "Request", "Limit"]
    [(name, _age, request, limit)] = cells(table)
    assert name == "compute"
    assert request == "count/virtualmachines.kubevirt.io: 1/3, requests.storage: 5Gi/20Gi"
    assert limit == "limits.cpu: 2/4, limits.memory: 2Gi/4Gi"


def test_events_with_kube_apiservers_wide_columns(cluster: Cluster) -> None:
    labelled_vm(cluster, "web-1")
    cluster.action("web-1", "start")
    cluster.wait_status("web-1", "Running")
    code, _, table = get(cluster, f"/api/v1/namespaces/{cluster.ns}/events")
    assert code == 200
    assert columns(table) == [("Last Seen", "string", 0), ("Type", "string", 0), ("Reason", "string", 0),
                              ("Object", "string", 0), ("Subobject", "string", 1), ("Source", "string", 1),
                              ("Message", "string", 0), ("First Seen", "string", 1), ("Count", "string", 1),
                              ("Name", "string", 1)]
    by_reason = {row[2]: row for row in cells(table)}
    started = by_reason["Started"]
    assert started[1] == "Normal" and started[3] == "virtualmachine/web-1" and started[4] == ""
    assert started[5] == "vmquota" and started[6] == "the domain is running" and started[8] == 1
    assert started[9].startswith("web-1.")


def test_namespaces_projects_and_clones(cluster: Cluster) -> None:
    cluster.client.post("/apis/vmquota.io/v1/projects", {"metadata": {"name": f"p-{cluster.ns}"}, "spec": {
        "resourceQuota": {"hard": {"limits.cpu": "8", "requests.storage": "100Gi"}}}})
    cluster.client.post("/api/v1/namespaces", {"metadata": {"name": f"{cluster.ns}-b",
                                                            "labels": {objects.PROJECT_LABEL: f"p-{cluster.ns}"}}})
    table = get(cluster, f"/api/v1/namespaces?fieldSelector=metadata.name%3D{cluster.ns}")[2]
    assert [c[0] for c in columns(table)] == ["Name", "Status", "Age"]
    assert [row[:2] for row in cells(table)] == [[cluster.ns, "Active"]]
    table = get(cluster, f"/apis/vmquota.io/v1/projects/p-{cluster.ns}")[2]
    assert [c[0] for c in columns(table)] == ["Name", "Age", "Used/Hard"]
    assert cells(table)[0][2] == "limits.cpu: 0/8, requests.storage: 0/100Gi"

    labelled_vm(cluster, "web-1")
    cluster.client.post(f"/apis/clone.kubevirt.io/v1beta1/namespaces/{cluster.ns}/virtualmachineclones", {
        "metadata": {"name": "c1"}, "spec": {"source": {"kind": "VirtualMachine", "name": "web-1"},
                                             "target": {"kind": "VirtualMachine", "name": "web-2"}}})
    table = get(cluster, f"/apis/clone.kubevirt.io/v1beta1/namespaces/{cluster.ns}/virtualmachineclones")[2]
    assert [c[0] for c in columns(table)] == ["Name", "Phase", "SourceVirtualMachine", "TargetVirtualMachine"]
    assert [row[0] for row in cells(table)] == ["c1"] and cells(table)[0][2:] == ["web-1", "web-2"]


def test_a_table_follows_every_change_of_its_objects(cluster: Cluster) -> None:
    """Rows are kept per object version: a changed, deleted or new VM shows in the next Table at once."""
    for i in range(8):
        labelled_vm(cluster, f"vm-{i}")
    path = vms_path(cluster.ns)
    assert [row[2] for row in cells(get(cluster, path)[2])] == ["Stopped"] * 8
    cluster.action("vm-3", "start")
    cluster.wait_status("vm-3", "Running")
    statuses = {row[0]: row[2] for row in cells(get(cluster, path)[2])}
    assert statuses["vm-3"] == "Running" and list(statuses.values()).count("Stopped") == 7
    cluster.delete_vm("vm-5")
    labelled_vm(cluster, "vm-9", app="new")
    table = get(cluster, path)[2]
    assert [row[0] for row in cells(table)] == ["vm-0", "vm-1", "vm-2", "vm-3", "vm-4", "vm-6", "vm-7", "vm-9"]
    assert table["rows"][-1]["object"]["metadata"]["labels"] == {"app": "new"}
    assert table["metadata"]["resourceVersion"] == cluster.client.get(path)["metadata"]["resourceVersion"]


# -- selectors on lists -----------------------------------------------------------------------------------


def names(cluster: Cluster, path: str) -> list[str]:
    code, _, body = get(cluster, path, "application/json")
    assert code == 200, body
    return [item["metadata"]["name"] for item in body["items"]]


def test_label_selectors_on_lists(cluster: Cluster) -> None:
    labelled_vm(cluster, "web-1", app="web", tier="front")
    labelled_vm(cluster, "web-2", app="web")
    labelled_vm(cluster, "db-1", app="db")
    labelled_vm(cluster, "bare")
    path = vms_path(cluster.ns) + "?labelSelector="
    assert names(cluster, path + quote("app=web")) == ["web-1", "web-2"]
    assert names(cluster, path + quote("app!=web")) == ["bare", "db-1"]
    assert names(cluster, path + quote("app in (db,web),tier")) == ["web-1"]
    assert names(cluster, path + quote("app notin (web)")) == ["bare", "db-1"]
    assert names(cluster, path + quote("!app")) == ["bare"]
    assert names(cluster, path + quote("app=nothing")) == []
    # As a Table too, and across namespaces.
    table = get(cluster, "/apis/kubevirt.io/v1/virtualmachines?labelSelector=" + quote("app=db"))[2]
    assert [row[0] for row in cells(table)] == ["db-1"]
    # The namespace list has selectors as well (the issue's own example).
    cluster.create_namespace(f"{cluster.ns}-a", {"a": "b"})
    assert names(cluster, "/api/v1/namespaces?labelSelector=" + quote("a=b")) == [f"{cluster.ns}-a"]


def test_field_selectors_on_lists(cluster: Cluster) -> None:
    labelled_vm(cluster, "web-1")
    labelled_vm(cluster, "web-2")
    cluster.action("web-1", "start")
    cluster.wait_status("web-1", "Running")
    assert names(cluster, vms_path(cluster.ns) + "?fieldSelector=metadata.name%3Dweb-2") == ["web-2"]
    assert names(cluster, "/apis/kubevirt.io/v1/virtualmachines?fieldSelector=" +
                 quote(f"metadata.namespace={cluster.ns},metadata.name!=web-2")) == ["web-1"]
    # What `kubectl describe vm` asks for.
    events = f"/api/v1/namespaces/{cluster.ns}/events?fieldSelector=" + quote(
        f"involvedObject.name=web-1,involvedObject.namespace={cluster.ns},involvedObject.kind=VirtualMachine")
    code, _, body = get(cluster, events, "application/json")
    assert code == 200 and {e["reason"] for e in body["items"]} >= {"StartRequested", "Started"}
    assert names(cluster, f"/api/v1/namespaces/{cluster.ns}/events?fieldSelector=involvedObject.name%3Dweb-2") == []
    assert len(names(cluster, f"/api/v1/namespaces/{cluster.ns}/events?fieldSelector=source%3Dvmquota")) >= 2


@pytest.mark.parametrize(("query", "message"), [
    ("labelSelector=" + quote("a b"), "unable to parse requirement: found 'b', expected: in, notin, =, ==, !=, gt, lt"),
    ("labelSelector=" + quote("app=web,"), "found '', expected: identifier after ','"),
    ("fieldSelector=" + quote("spec.running=true"), "field label not supported: spec.running"),
    ("fieldSelector=" + quote("metadata.name"), "invalid selector: 'metadata.name'; can't understand 'metadata.name'"),
])
def test_a_selector_that_cannot_be_evaluated_is_a_400(cluster: Cluster, query: str, message: str) -> None:
    labelled_vm(cluster, "web-1")
    for accept in ("application/json", KUBECTL_ACCEPT):
        code, _, status = get(cluster, f"{vms_path(cluster.ns)}?{query}", accept)
        assert (code, status["reason"], status["message"]) == (400, "BadRequest", message)


def test_a_quota_selector_is_refused_in_the_default_conversions_words(cluster: Cluster) -> None:
    code, _, status = get(cluster, f"{quotas_path(cluster.ns)}?fieldSelector=spec.hard%3Dx", "application/json")
    assert code == 400
    assert status["message"] == '"spec.hard" is not a known field selector: only "metadata.name", "metadata.namespace"'


def test_partial_object_metadata(cluster: Cluster) -> None:
    labelled_vm(cluster, "web-1", app="web")
    accept = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
    code, _, listed = get(cluster, vms_path(cluster.ns) + "?labelSelector=app%3Dweb", accept)
    assert code == 200 and listed["kind"] == "PartialObjectMetadataList"
    assert [i["metadata"]["name"] for i in listed["items"]] == ["web-1"] and "spec" not in listed["items"][0]
    one = get(cluster, f"{vms_path(cluster.ns)}/web-1", "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1")
    assert one[2]["kind"] == "PartialObjectMetadata" and one[2]["metadata"]["labels"] == {"app": "web"}


def test_a_selected_table_is_the_same_whether_or_not_python_matches(cluster: Cluster) -> None:
    """`tier>1` is matched in Python after the store, every other selector by the store alone: both paths
    give the same rows."""
    for i in range(4):
        labelled_vm(cluster, f"vm-{i}", tier=str(i))
    by_python = get(cluster, vms_path(cluster.ns) + "?labelSelector=" + quote("tier>1"))[2]
    by_store = get(cluster, vms_path(cluster.ns) + "?labelSelector=" + quote("tier in (2,3)"))[2]
    assert cells(by_python) == cells(by_store) and [r[0] for r in cells(by_store)] == ["vm-2", "vm-3"]
    assert by_python["rows"][0]["object"] == by_store["rows"][0]["object"]


def watch_lines(cluster: Cluster, path: str, accept: str = KUBECTL_ACCEPT) -> list[dict[str, Any]]:
    """The events of a watch that ends by itself (timeoutSeconds=1)."""
    request = urllib.request.Request(cluster.app.url + path + "&watch=true&timeoutSeconds=1",
                                     headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=30) as response:
        return [json.loads(line) for line in response.read().splitlines() if line.strip()]


def test_a_watch_with_the_table_accept_sends_one_row_tables(cluster: Cluster) -> None:
    """`kubectl get -w`: each event's object is a Table of one row; the columns come with the first only."""
    labelled_vm(cluster, "web-1", app="web")
    labelled_vm(cluster, "db-1", app="db")
    cluster.settle()  # its disks made: no change left to come
    events = watch_lines(cluster, vms_path(cluster.ns) + "?labelSelector=app%3Dweb")
    assert [e["type"] for e in events] == ["ADDED"]
    first = events[0]["object"]
    assert first["kind"] == "Table" and [c[0] for c in columns(first)] == ["Name", "Age", "Status", "Ready"]
    assert cells(first)[0][0] == "web-1" and cells(first)[0][2] == "Stopped"
    rv = first["metadata"]["resourceVersion"]
    cluster.action("web-1", "start")
    cluster.wait_status("web-1", "Running")
    later = watch_lines(cluster, vms_path(cluster.ns) + f"?labelSelector=app%3Dweb&resourceVersion={rv}")
    assert later and all(e["type"] == "MODIFIED" for e in later)
    assert later[0]["object"]["columnDefinitions"] is not None
    assert all(e["object"]["columnDefinitions"] is None for e in later[1:])
    assert cells(later[-1]["object"])[0][2] == "Running"


def test_a_watch_selects_events_by_involved_object(cluster: Cluster) -> None:
    """What `kubectl describe` and `kubectl events --for` watch: events of one object."""
    labelled_vm(cluster, "web-1")
    labelled_vm(cluster, "web-2")
    cluster.action("web-1", "start")
    cluster.action("web-2", "start")
    cluster.wait_status("web-1", "Running")
    cluster.wait_status("web-2", "Running")
    events = watch_lines(cluster, f"/api/v1/namespaces/{cluster.ns}/events?fieldSelector=involvedObject.name%3Dweb-2",
                         "application/json")
    assert events and {e["object"]["involvedObject"]["name"] for e in events} == {"web-2"}


def test_paged_tables(cluster: Cluster) -> None:
    """kubectl asks for pages of 500: each page is a Table, with the List's continue token."""
    for i in range(3):
        labelled_vm(cluster, f"vm-{i}", app="web")
    labelled_vm(cluster, "other")
    path = vms_path(cluster.ns) + "?labelSelector=app%3Dweb&limit=2"
    first = get(cluster, path)[2]
    assert first["kind"] == "Table" and [row[0] for row in cells(first)] == ["vm-0", "vm-1"]
    token = first["metadata"]["continue"]
    second = get(cluster, f"{path}&continue={quote(token)}")[2]
    assert [row[0] for row in cells(second)] == ["vm-2"] and "continue" not in second["metadata"]
    assert second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    assert names(cluster, vms_path(cluster.ns) + "?labelSelector=app%3Dweb&limit=5") == ["vm-0", "vm-1", "vm-2"]


# -- pure parts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "shown"), [
    (-5, "<invalid>"), (-1, "0s"), (0, "0s"), (59, "59s"), (119, "119s"), (120, "2m"), (260, "4m20s"),
    (600, "10m"), (179 * 60, "179m"), (3 * 3600, "3h"), (5 * 3600 + 600, "5h10m"), (8 * 3600, "8h"),
    (47 * 3600, "47h"), (2 * 86400, "2d"), (3 * 86400 + 3600, "3d1h"), (8 * 86400, "8d"),
    (2 * 365 * 86400, "2y"), (3 * 365 * 86400 + 86400 * 5, "3y5d"), (9 * 365 * 86400, "9y"),
])
def test_ages_are_kubectls_short_durations(seconds: int, shown: str) -> None:
    assert tables.human_duration(seconds) == shown


def test_a_watch_event_is_a_one_row_table_with_headers_once() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
          "metadata": {"name": "web-1", "namespace": "dev", "resourceVersion": "42",
                       "creationTimestamp": (now - timedelta(minutes=3)).strftime("%Y-%m-%dT%H:%M:%SZ")},
          "status": {"printableStatus": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
    options = tables.options(None, "v1")
    first = tables.table_for_event(objects.VIRTUAL_MACHINE, vm, options, now=now)
    assert first["metadata"]["resourceVersion"] == "42" and len(first["columnDefinitions"]) == 4
    assert first["rows"][0]["cells"] == ["web-1", "3m", "Running", "True"]
    later = tables.table_for_event(objects.VIRTUAL_MACHINE, vm, tables.without_headers(options), now=now)
    assert later["columnDefinitions"] is None and later["rows"] == first["rows"]
    # The same row whether made from the object or from the store's extracted fields.
    fields = tables.PRINTERS["VirtualMachine"].fields
    extracted = [(*(json.dumps(tables.value_of(f, vm)) if f.as_json else tables.value_of(f, vm) for f in fields),
                  json.dumps(vm["metadata"]))]
    assert [json.loads(row) for row in tables.rows_of_values(objects.VIRTUAL_MACHINE, extracted, options, now=now)] \
        == [json.loads(row) for row in tables.rows_of_objects(objects.VIRTUAL_MACHINE, [vm], options, now=now)]


def test_quota_cells_sort_and_split_as_kube_apiserver() -> None:
    used = {"limits.cpu": "2", "cpu": "200m"}
    hard = {"limits.cpu": "4", "cpu": "1", "count/virtualmachines.kubevirt.io": "3", "limits.memory": "4Gi"}
    assert tables.quota_columns(used, hard) == ("count/virtualmachines.kubevirt.io: 0/3, cpu: 200m/1",
                                                "limits.cpu: 2/4, limits.memory: 0/4Gi")


def test_ages_in_rows_follow_the_clock(cluster: Cluster) -> None:
    labelled_vm(cluster, "web-1")
    created = datetime.strptime(cluster.vm("web-1")["metadata"]["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
    vm = cluster.vm("web-1")
    row = json.loads(next(tables.rows_of_objects(objects.VIRTUAL_MACHINE, [vm], tables.options(None, "v1"),
                                                now=created.replace(tzinfo=UTC) + timedelta(days=2, hours=1))))
    assert row["cells"][1] == "2d1h"
