"""The official `kubernetes` Python client against a real `vmquota serve` with two API processes, configured
from the admin kubeconfig alone: typed CRUD of quotas, CRUD of VMs as custom objects, and an informer's
list-then-watch loop that follows 50 concurrent writers and ends with exactly what a fresh list shows.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Served, vm_manifest, vmquota_serve, wait_until
from kubernetes import client as k8s
from kubernetes import config, watch
from kubernetes.client.exceptions import ApiException

from vmquota.client import Client, action_path

NS = "informed"
WRITERS = 50
VM = ("kubevirt.io", "v1")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with vmquota_serve(tmp_path_factory.mktemp("pyclient"), processes=2) as server:
        yield server


def api_client(served: Served) -> k8s.ApiClient:
    return config.new_client_from_config(config_file=str(served.kubeconfig))


def test_quotas_and_vms_round_trip_through_the_typed_and_custom_object_clients(served: Served) -> None:
    with api_client(served) as api:
        round_trip(api)


def round_trip(api: k8s.ApiClient) -> None:
    core, custom = k8s.CoreV1Api(api), k8s.CustomObjectsApi(api)
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name="crud")))
    quota = core.create_namespaced_resource_quota("crud", k8s.V1ResourceQuota(
        metadata=k8s.V1ObjectMeta(name="compute"), spec=k8s.V1ResourceQuotaSpec(hard={"limits.cpu": "4"})))
    assert quota.spec.hard == {"limits.cpu": "4"}
    quota.spec.hard["limits.cpu"] = "6"
    replaced = core.replace_namespaced_resource_quota("compute", "crud", quota)
    assert replaced.spec.hard["limits.cpu"] == "6"
    patched = core.patch_namespaced_resource_quota("compute", "crud", {"spec": {"hard": {"limits.memory": "8Gi"}}})
    assert patched.spec.hard == {"limits.cpu": "6", "limits.memory": "8Gi"}
    assert [q.metadata.name for q in core.list_namespaced_resource_quota("crud").items] == ["compute"]

    vm = custom.create_namespaced_custom_object(*VM, "crud", "virtualmachines", vm_manifest("web-1"))
    assert vm["metadata"]["uid"]
    read = custom.get_namespaced_custom_object(*VM, "crud", "virtualmachines", "web-1")
    assert read["spec"]["runStrategy"] == "Halted"
    custom.patch_namespaced_custom_object(*VM, "crud", "virtualmachines", "web-1",
                                          {"metadata": {"labels": {"app": "web"}}})
    listed = custom.list_namespaced_custom_object(*VM, "crud", "virtualmachines", label_selector="app=web")
    assert [item["metadata"]["name"] for item in listed["items"]] == ["web-1"]
    # A stopped VM charges its count and disk, not compute.
    assert core.read_namespaced_resource_quota("compute", "crud").status.used == {"limits.cpu": "0",
                                                                                  "limits.memory": "0"}
    custom.delete_namespaced_custom_object(*VM, "crud", "virtualmachines", "web-1")
    wait_until(lambda: not custom.list_namespaced_custom_object(*VM, "crud", "virtualmachines")["items"],
               what="web-1 to be gone")
    core.delete_namespaced_resource_quota("compute", "crud")
    with pytest.raises(ApiException) as absent:
        core.read_namespaced_resource_quota("compute", "crud")
    assert absent.value.status == 404


class Informer:
    """What client-go's informers do: list, then watch from the list's resourceVersion, keeping a cache."""

    def __init__(self, served: Served) -> None:
        self.api = api_client(served)
        self.custom = k8s.CustomObjectsApi(self.api)
        self.cache: dict[str, str] = {}  # name -> resourceVersion
        self.seen: list[tuple[str, str, int]] = []  # (type, name, resourceVersion) of every event
        self.watch = watch.Watch()
        self.listed = threading.Event()
        self.failure: BaseException | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            listed = self.custom.list_namespaced_custom_object(*VM, NS, "virtualmachines")
            self.cache = {item["metadata"]["name"]: item["metadata"]["resourceVersion"] for item in listed["items"]}
            self.listed.set()
            for event in self.watch.stream(self.custom.list_namespaced_custom_object, *VM, NS, "virtualmachines",
                                           resource_version=listed["metadata"]["resourceVersion"],
                                           allow_watch_bookmarks=True):
                self._apply(event)
        except BaseException as e:  # reported by the test
            if not self.stopping:  # Watch.stop() shuts the socket down under the stream: that is no failure
                self.failure = e
            self.listed.set()

    def stop(self) -> None:
        """End the watch at its next event (a bookmark comes every few seconds) and close the connection."""
        self.stopping = True
        self.watch.stop()
        self.thread.join(timeout=30)
        self.api.close()

    def _apply(self, event: dict[str, Any]) -> None:
        meta = event["object"]["metadata"]
        if event["type"] == "BOOKMARK":
            return
        name, rv = meta["name"], meta["resourceVersion"]
        self.seen.append((event["type"], name, int(rv)))
        if event["type"] == "DELETED":
            self.cache.pop(name, None)
        else:
            self.cache[name] = rv


def test_an_informer_follows_50_writers_across_api_processes_without_loss_or_duplicates(served: Served) -> None:
    admin = Client(served.url)
    admin.post("/api/v1/namespaces", {"metadata": {"name": NS}})
    informer = Informer(served)
    informer.thread.start()
    assert informer.listed.wait(30) and informer.failure is None, informer.failure

    def write(i: int) -> None:
        name = f"vm-{i}"
        # Connections of its own: either API process may answer each.
        with api_client(served) as api, contextlib.closing(Client(served.url)) as plain:
            custom = k8s.CustomObjectsApi(api)
            custom.create_namespaced_custom_object(*VM, NS, "virtualmachines", vm_manifest(name, disk=None))
            for step in range(2):
                custom.patch_namespaced_custom_object(*VM, NS, "virtualmachines", name,
                                                      {"metadata": {"labels": {"step": str(step)}}})
            plain.put(action_path(NS, name, "start"))
            if i % 3 == 0:
                custom.delete_namespaced_custom_object(*VM, NS, "virtualmachines", name)

    writers = [threading.Thread(target=write, args=(i,)) for i in range(WRITERS)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    reader = api_client(served)
    custom = k8s.CustomObjectsApi(reader)

    def fresh() -> dict[str, str]:
        items = custom.list_namespaced_custom_object(*VM, NS, "virtualmachines")["items"]
        return {item["metadata"]["name"]: item["metadata"]["resourceVersion"] for item in items}

    def settled() -> bool:
        # The controller goes on writing (disks, Running) after the writers end: wait until nothing moves.
        return informer.cache == fresh() and all(
            item.get("status", {}).get("printableStatus") == "Running"
            for item in custom.list_namespaced_custom_object(*VM, NS, "virtualmachines")["items"])

    wait_until(settled, timeout=60, what="the informer's cache to equal a fresh list of running VMs")
    informer.stop()
    reader.close()
    admin.close()
    assert informer.failure is None, informer.failure
    versions = [rv for _, _, rv in informer.seen]
    assert versions == sorted(versions) and len(set(versions)) == len(versions), "events out of order or twice"
    assert len(informer.cache) == WRITERS - len(range(0, WRITERS, 3))
    assert sum(1 for kind, _, _ in informer.seen if kind == "ADDED") == WRITERS
    assert sum(1 for kind, _, _ in informer.seen if kind == "DELETED") == len(range(0, WRITERS, 3))


def test_the_python_client_reads_a_kubeconfig_path_it_is_given(served: Served, tmp_path: Path) -> None:
    with api_client(served) as api:
        assert api.configuration.host == served.url
        names = [n.metadata.name for n in k8s.CoreV1Api(api).list_namespace().items]
    assert "default" in names
