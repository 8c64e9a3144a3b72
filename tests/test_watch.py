"""Watches and paged lists, as Kubernetes clients rely on them: every change in order, once, from a
resourceVersion; the current state first without one; bookmarks, timeouts, 410 for a version the log no longer
holds; pages of one snapshot however the objects change between them; clear 4xx for bad parameters.

Most tests run the server in this process; one runs a real `vmquota serve --api-processes 2`, whose two
processes share one change log.
"""

from __future__ import annotations

import http.client
import json
import queue
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from conftest import Cluster, quotas_path, vm_manifest, vmquota_serve, wait_until

from vmquota.apiserver import paging
from vmquota.client import Client, ClientError

END = object()  # what `Watch.next` gives once the server has ended the stream


class Watch:
    """One watch request, its events read on a thread of its own as they arrive."""

    def __init__(self, url: str, path: str, **params: Any) -> None:
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
        query = urlencode({"watch": "true", **{k: str(v).lower() if isinstance(v, bool) else v
                                               for k, v in params.items()}})
        self.connection.request("GET", f"{path}?{query}")
        self.response = self.connection.getresponse()
        self.events: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for line in iter(self.response.readline, b""):
                self.events.put(json.loads(line))
        except Exception:  # the connection was closed under it: http.client raises anything then
            pass
        self.events.put(END)

    def next(self, timeout: float = 10.0) -> Any:
        return self.events.get(timeout=timeout)

    def take(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        return [self.next(timeout) for _ in range(count)]

    def until(self, wanted: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Events up to and including the first for which `wanted(event)` holds."""
        seen = []
        while True:
            event = self.next(timeout)
            assert event is not END, f"the stream ended before the wanted event; it had {seen}"
            seen.append(event)
            if wanted(event):
                return seen

    def close(self) -> None:
        """Hang up, as a client that goes away does (a shutdown first: it wakes the reading thread)."""
        if self.connection.sock is not None:
            try:
                self.connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.connection.close()


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    opened: list[Watch] = []
    yield opened
    for w in opened:
        w.close()


def watch(cluster_or_url: Cluster | str, path: str, opened: list[Watch], **params: Any) -> Watch:
    url = cluster_or_url if isinstance(cluster_or_url, str) else cluster_or_url.app.url
    w = Watch(url, path, **params)
    opened.append(w)
    assert w.response.status == 200
    return w


def rv(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


def summary(event: dict[str, Any]) -> tuple[str, str, int]:
    return event["type"], event["object"]["metadata"]["name"], rv(event["object"])


def test_a_watch_from_a_lists_version_sees_each_change_once_in_order_with_the_objects_new_version(
        cluster: Cluster, watches: list[Watch]) -> None:
    """What an informer does: list, then watch from the list's resourceVersion. A VM's start changes its
    quota's used: a MODIFIED of the quota with a new resourceVersion, as kubectl get quota -w shows."""
    cluster.create_quota({"limits.cpu": "4"})
    listing = cluster.client.get(quotas_path(cluster.ns))
    quotas = watch(cluster, quotas_path(cluster.ns), watches, resourceVersion=listing["metadata"]["resourceVersion"])
    vms = watch(cluster, f"/apis/kubevirt.io/v1/namespaces/{cluster.ns}/virtualmachines", watches,
                resourceVersion=listing["metadata"]["resourceVersion"])
    created = cluster.create_vm(vm_manifest("a", cores=2))
    added = vms.next()
    assert added["type"] == "ADDED" and rv(added["object"]) == rv(created)
    cluster.action("a", "start")
    cluster.wait_status("a", "Running")
    events = quotas.until(lambda e: e["object"]["status"]["used"].get("limits.cpu") == "2")
    assert [e["type"] for e in events] == ["MODIFIED"] * len(events)
    versions = [rv(e["object"]) for e in events]
    assert versions == sorted(set(versions)) and versions[0] > int(listing["metadata"]["resourceVersion"])
    assert events[-1]["object"] == cluster.quota()  # the event shows the object exactly as a read does
    statuses = [e["object"]["status"].get("printableStatus") for e in vms.until(
        lambda e: e["object"]["status"].get("printableStatus") == "Running")]
    assert statuses[-1] == "Running"  # a VM's printableStatus is a change of its own too
    late = watch(cluster, quotas_path(cluster.ns), watches, resourceVersion=listing["metadata"]["resourceVersion"])
    replayed = late.take(len(events))  # from the log this time: the same events, and only the quota's
    assert [summary(e) for e in replayed] == [summary(e) for e in events]
    assert late.events.empty()


def test_without_a_version_a_watch_first_adds_every_object_then_follows(cluster: Cluster,
                                                                         watches: list[Watch]) -> None:
    for name in ("a", "b"):
        cluster.create_quota({"limits.cpu": "1"}, name=name)
    w = watch(cluster, quotas_path(cluster.ns), watches)
    assert [(t, n) for t, n, _ in map(summary, w.take(2))] == [("ADDED", "a"), ("ADDED", "b")]
    cluster.create_quota({"limits.cpu": "1"}, name="c")
    assert summary(w.next())[:2] == ("ADDED", "c")
    zero = watch(cluster, quotas_path(cluster.ns), watches, resourceVersion="0")  # "any version": the same
    assert [summary(e)[1] for e in zero.take(3)] == ["a", "b", "c"]


def test_a_field_selector_on_the_name_and_a_delete_that_a_waiter_sees(cluster: Cluster,
                                                                      watches: list[Watch]) -> None:
    """`kubectl delete` and `kubectl wait --for=delete` watch one object by name until its DELETED."""
    cluster.create_vm(vm_manifest("a"))
    cluster.create_vm(vm_manifest("b"))
    cluster.settle()
    listing = cluster.client.get(f"/apis/kubevirt.io/v1/namespaces/{cluster.ns}/virtualmachines")
    w = watch(cluster, f"/apis/kubevirt.io/v1/namespaces/{cluster.ns}/virtualmachines", watches,
              fieldSelector="metadata.name=a", resourceVersion=listing["metadata"]["resourceVersion"])
    cluster.client.patch(f"/apis/kubevirt.io/v1/namespaces/{cluster.ns}/virtualmachines/b",
                         {"metadata": {"labels": {"x": "y"}}})
    uid = cluster.vm("a")["metadata"]["uid"]
    cluster.delete_vm("a")
    events = w.until(lambda e: e["type"] == "DELETED")
    assert {e["object"]["metadata"]["name"] for e in events} == {"a"}
    deleted = events[-1]["object"]
    assert deleted["metadata"]["uid"] == uid and rv(deleted) > rv(events[-2]["object"])


def test_bookmarks_carry_only_the_version_and_a_timeout_ends_the_stream(cluster: Cluster,
                                                                         watches: list[Watch]) -> None:
    cluster.app.server.feed.bookmark_seconds = 0.05
    cluster.create_quota({"limits.cpu": "1"})
    w = watch(cluster, quotas_path(cluster.ns), watches, allowWatchBookmarks=True, timeoutSeconds=3)
    assert w.next()["type"] == "ADDED"
    cluster.create_namespace("other-ns")  # another kind's change: a bookmark may move past it
    newest = cluster.client.get("/api/v1/namespaces")["metadata"]["resourceVersion"]
    bookmark = w.until(lambda e: e["type"] == "BOOKMARK" and rv(e["object"]) >= int(newest))[-1]
    assert bookmark["object"] == {"kind": "ResourceQuota", "apiVersion": "v1",
                                  "metadata": {"resourceVersion": bookmark["object"]["metadata"]["resourceVersion"]}}
    while (event := w.next(timeout=30)) is not END:  # timeoutSeconds=3 ends it; only bookmarks came meanwhile
        assert event["type"] == "BOOKMARK"


def test_a_version_older_than_the_log_gets_the_410_event_kube_apiserver_sends(cluster: Cluster,
                                                                              watches: list[Watch]) -> None:
    store = cluster.app.store
    store.changes_kept, store.prune_every = 5, 5
    first = cluster.create_quota({"limits.cpu": "1"}, name="a")
    for cpu in range(2, 20):
        cluster.client.patch(f"{quotas_path(cluster.ns)}/a", {"spec": {"hard": {"limits.cpu": str(cpu)}}})
    pruned = store.reader().pruned()
    assert pruned > rv(first)
    w = watch(cluster, quotas_path(cluster.ns), watches, resourceVersion=rv(first))
    assert w.next() == {"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 410, "reason": "Expired",
        "message": f"too old resource version: {rv(first)} ({pruned})"}}
    assert w.next() is END
    kept = watch(cluster, quotas_path(cluster.ns), watches, resourceVersion=pruned)  # the oldest still held
    assert kept.next()["type"] == "MODIFIED"


def test_bad_watch_parameters_are_refused_before_any_stream(cluster: Cluster) -> None:
    for params, reason in (({"resourceVersion": "abc"}, "BadRequest"), ({"timeoutSeconds": "-1"}, "BadRequest"),
                           ({"fieldSelector": "spec.foo=bar"}, "BadRequest"),
                           ({"watch": "maybe"}, "BadRequest")):
        with pytest.raises(ClientError) as refused:
            cluster.client.get(f"{quotas_path(cluster.ns)}?{urlencode({'watch': 'true', **params})}")
        assert refused.value.code == 400 and refused.value.reason == reason


def test_closing_the_server_ends_its_watches_cleanly(tmp_path: Path) -> None:
    from conftest import open_app
    app = open_app(tmp_path / "data")
    w = Watch(app.url, "/api/v1/namespaces")
    try:
        assert w.next()["object"]["metadata"]["name"] == "default"
    finally:
        app.close()
    assert w.next() is END
    w.close()


def test_pages_are_one_snapshot_however_the_objects_change_between_them(cluster: Cluster) -> None:
    names = [f"q{i:02}" for i in range(12)]
    for name in names:
        cluster.create_quota({"limits.cpu": "1"}, name=name)
    before = cluster.client.get(quotas_path(cluster.ns))["items"]
    first = cluster.client.get(f"{quotas_path(cluster.ns)}?limit=5")
    assert [q["metadata"]["name"] for q in first["items"]] == names[:5]
    assert first["metadata"]["remainingItemCount"] == 7
    # Between the pages: a deletion, a change, a new object, and a VM whose disks change `used`.
    cluster.client.delete(f"{quotas_path(cluster.ns)}/q07")
    cluster.client.patch(f"{quotas_path(cluster.ns)}/q08", {"spec": {"hard": {"limits.cpu": "3"}}})
    cluster.client.delete(f"{quotas_path(cluster.ns)}/q01")
    cluster.create_quota({"limits.cpu": "1"}, name="q05a")
    cluster.create_vm(vm_manifest("a", cores=1))
    pages, token = [first], first["metadata"]["continue"]
    while token:
        page = cluster.client.get(f"{quotas_path(cluster.ns)}?{urlencode({'limit': 5, 'continue': token})}")
        assert page["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        pages.append(page)
        token = page["metadata"].get("continue")
    assert [q for page in pages for q in page["items"]] == before
    assert "remainingItemCount" not in pages[-1]["metadata"]
    now = [q["metadata"]["name"] for q in cluster.client.get(f"{quotas_path(cluster.ns)}?limit=100")["items"]]
    assert now == sorted({*names, "q05a"} - {"q01", "q07"})


def test_paging_while_writers_run_sees_each_object_once_as_it_was(cluster: Cluster) -> None:
    for i in range(20):
        cluster.create_quota({"limits.cpu": "1"}, name=f"q{i:02}")
    stop = threading.Event()

    def write() -> None:
        client, i = Client(cluster.app.url), 0
        while not stop.is_set():
            client.patch(f"{quotas_path(cluster.ns)}/q{i % 20:02}", {"metadata": {"labels": {"n": str(i)}}})
            i += 1
        client.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(3):
            seen, token, version = [], "", None
            while True:
                query = urlencode({"limit": 3, **({"continue": token} if token else {})})
                page = cluster.client.get(f"{quotas_path(cluster.ns)}?{query}")
                version = version or page["metadata"]["resourceVersion"]
                assert page["metadata"]["resourceVersion"] == version
                seen += page["items"]
                token = page["metadata"].get("continue")
                if not token:
                    break
            assert [q["metadata"]["name"] for q in seen] == [f"q{i:02}" for i in range(20)]
            assert all(rv(q) <= int(version) for q in seen)  # nothing newer than the snapshot
    finally:
        stop.set()
        writer.join()


def test_bad_and_expired_continue_tokens(cluster: Cluster) -> None:
    for name in ("a", "b", "c"):
        cluster.create_quota({"limits.cpu": "1"}, name=name)
    first = cluster.client.get(f"{quotas_path(cluster.ns)}?limit=1")
    for bad in ("!!!", "bm90IGpzb24", paging.encode(0, cluster.app.api.rules["ResourceQuota"].kind, ("x", "a")),
                "eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6MywiZm9vIjoxfQ"):
        with pytest.raises(ClientError) as refused:
            cluster.client.get(f"{quotas_path(cluster.ns)}?{urlencode({'limit': 1, 'continue': bad})}")
        assert refused.value.code == 400 and "invalid continue token" in refused.value.message
    with pytest.raises(ClientError) as refused:
        cluster.client.get(f"{quotas_path(cluster.ns)}?limit=-1")
    assert refused.value.code == 400
    store = cluster.app.store
    store.changes_kept, store.prune_every = 2, 2
    for cpu in range(2, 8):
        cluster.client.patch(f"{quotas_path(cluster.ns)}/c", {"spec": {"hard": {"limits.cpu": str(cpu)}}})
    with pytest.raises(ClientError) as expired:
        cluster.client.get(f"{quotas_path(cluster.ns)}?"
                           f"{urlencode({'limit': 1, 'continue': first['metadata']['continue']})}")
    assert expired.value.code == 410 and expired.value.reason == "Expired"
    assert expired.value.message.startswith("The provided continue parameter is too old to display a consistent "
                                            "list result.")


def test_two_api_processes_every_watcher_sees_every_change_once_in_order(tmp_path: Path,
                                                                          watches: list[Watch]) -> None:
    """Writers on many connections reach both processes; watchers on either see the same sequence: no change
    lost, none twice, none out of order, and replaying it gives exactly what a fresh list shows."""
    with vmquota_serve(tmp_path, processes=2) as served:
        url = served.url
        client = Client(url)
        client.post("/api/v1/namespaces", {"metadata": {"name": "team"}})
        start = client.get(quotas_path("team"))["metadata"]["resourceVersion"]
        watchers = [watch(url, quotas_path("team"), watches, resourceVersion=start) for _ in range(6)]

        def writer(n: int) -> None:
            c = Client(url)
            for i in range(8):
                path = f"{quotas_path('team')}/w{n}-{i}"
                c.post(quotas_path("team"), {"metadata": {"name": f"w{n}-{i}"}, "spec": {"hard": {"limits.cpu": "1"}}})
                c.patch(path, {"spec": {"hard": {"limits.cpu": "2"}}})
                if i % 2:
                    c.delete(path)
            c.close()

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        writes = 6 * (8 + 8 + 4)
        received = [w.take(writes, timeout=30) for w in watchers]
        sequences = [[summary(e) for e in events] for events in received]
        assert all(s == sequences[0] for s in sequences)
        versions = [v for _, _, v in sequences[0]]
        assert versions == sorted(set(versions))
        assert all(w.events.empty() for w in watchers)  # nothing beyond the writes
        state: dict[str, Any] = {}
        for event in received[0]:
            if event["type"] == "DELETED":
                del state[event["object"]["metadata"]["name"]]
            else:
                state[event["object"]["metadata"]["name"]] = event["object"]
        assert list(state.values()) != [] and sorted(state.items()) == sorted(
            (q["metadata"]["name"], q) for q in client.get(quotas_path("team"))["items"])
        client.close()


def test_a_watcher_that_falls_too_far_behind_is_ended_and_the_others_go_on(cluster: Cluster,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """As kube-apiserver ends an unresponsive watcher: the slow one's stream ends (it watches again from the
    last version it saw), and nobody waits for it."""
    from vmquota.apiserver import watch as watching
    monkeypatch.setattr(watching, "MAX_QUEUED", 3)
    feed = cluster.app.server.feed
    slow, keeping_up = feed.subscribe("Namespace"), feed.subscribe("Namespace")
    seen = []
    for i in range(6):
        cluster.create_namespace(f"{cluster.ns}-n{i}")
        seen += wait_until(lambda: keeping_up.take(0.1), what="the change to reach the watcher that keeps up")
    assert slow.ended == "too slow" and slow.take(0) == []
    assert keeping_up.ended is None and [c.name for c in seen] == [f"{cluster.ns}-n{i}" for i in range(6)]
    feed.unsubscribe(keeping_up)


class PausedWatch:
    """A watch whose client reads nothing until `resume`, through a small receive buffer: the server's socket
    fills, and the rest of its events must wait for the watcher's own thread."""

    def __init__(self, url: str, path: str, **params: Any) -> None:
        parts = urlsplit(url)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((parts.hostname or "127.0.0.1", parts.port or 80))
        self.connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
        self.connection.sock = sock
        self.connection.request("GET", f"{path}?{urlencode({'watch': 'true', **params})}")
        self.response = self.connection.getresponse()

    def resume(self) -> list[dict[str, Any]]:
        """Every event up to the end of the stream (http.client raises on a chunk cut short)."""
        return [json.loads(line) for line in iter(self.response.readline, b"")]

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def small_send_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's watch connections send through a small buffer, as over a slow network: a chunk of 100 KB
    never goes in one send."""
    from vmquota.apiserver import http as wire_side
    lend = wire_side._Wire.__init__

    def small(self: Any, connection: socket.socket) -> None:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        lend(self, connection)
    monkeypatch.setattr(wire_side._Wire, "__init__", small)


def big_namespaces(cluster: Cluster, count: int) -> list[str]:
    """Namespaces of 100 KB each: a few of them are more than a paused client's socket holds."""
    names = [f"{cluster.ns}-big{i}" for i in range(count)]
    for name in names:
        cluster.client.post("/api/v1/namespaces", {"metadata": {"name": name, "annotations": {
            f"note-{i}": "x" * 4000 for i in range(25)}}})
    return names


def test_a_watcher_that_stops_reading_a_while_gets_every_event_whole_once_in_order(
        cluster: Cluster, watches: list[Watch], small_send_buffers: None) -> None:
    """The feed writes a live watcher's events as far as its socket takes them; the rest of a chunk and what
    follows come from the watcher's own thread, in order, while a watcher that keeps up goes on."""
    version = cluster.client.get("/api/v1/namespaces")["metadata"]["resourceVersion"]
    paused = PausedWatch(cluster.app.url, "/api/v1/namespaces", resourceVersion=version, timeoutSeconds="5")
    try:
        keeping_up = watch(cluster, "/api/v1/namespaces", watches, resourceVersion=version)
        names = big_namespaces(cluster, 30)
        assert [summary(e)[1] for e in keeping_up.take(len(names))] == names
        events = paused.resume()  # until the stream's timeout: it then ends cleanly
        assert [(t, n) for t, n, _ in map(summary, events)] == [("ADDED", n) for n in names]
        assert {n: v for _, n, v in map(summary, events)} == {
            ns["metadata"]["name"]: rv(ns) for ns in cluster.client.get("/api/v1/namespaces")["items"]
            if ns["metadata"]["name"] in names}
    finally:
        paused.close()


def test_a_watcher_ended_as_too_slow_with_a_chunk_half_sent_still_ends_cleanly(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch, small_send_buffers: None) -> None:
    """Ended with part of a chunk still in the server: the chunk is completed, then the stream ends as any
    other, and its client has a whole prefix of the events to watch again from."""
    from vmquota.apiserver import watch as watching
    monkeypatch.setattr(watching, "MAX_QUEUED", 3)
    version = cluster.client.get("/api/v1/namespaces")["metadata"]["resourceVersion"]
    paused = PausedWatch(cluster.app.url, "/api/v1/namespaces", resourceVersion=version, timeoutSeconds="60")
    try:
        names = big_namespaces(cluster, 30)
        events = paused.resume()
        seen = [summary(e)[1] for e in events]
        assert 0 < len(seen) < len(names) and seen == names[:len(seen)]
        assert cluster.app.server.feed.watchers == 0
    finally:
        paused.close()


# -- legacy watch paths and a list's resourceVersion, as kube-apiserver serves them ----------------------------


def test_legacy_watch_paths_watch_the_list_or_the_one_object_they_name(cluster: Cluster,
                                                                       watches: list[Watch]) -> None:
    """`/api/v1/watch/...` and `/apis/{group}/{version}/watch/...` (deprecated, still served by kube-apiserver)
    watch whatever `watch` says; one object's path watches that name only."""
    start = cluster.client.get(quotas_path(cluster.ns))["metadata"]["resourceVersion"]
    every = watch(cluster, f"/api/v1/watch/namespaces/{cluster.ns}/resourcequotas", watches, watch=False,
                  resourceVersion=start)
    one = watch(cluster, f"/api/v1/watch/namespaces/{cluster.ns}/resourcequotas/b", watches, resourceVersion=start)
    vms = watch(cluster, "/apis/kubevirt.io/v1/watch/virtualmachines", watches, resourceVersion=start)
    own = watch(cluster, f"/api/v1/watch/namespaces/{cluster.ns}", watches, resourceVersion=start)
    a, b = cluster.create_quota({"limits.cpu": "1"}, name="a"), cluster.create_quota({"limits.cpu": "1"}, name="b")
    cluster.create_vm(vm_manifest("web-1"))
    labelled = cluster.client.patch(f"/api/v1/namespaces/{cluster.ns}", {"metadata": {"labels": {"x": "y"}}})
    assert [summary(e) for e in every.take(2)] == [("ADDED", "a", rv(a)), ("ADDED", "b", rv(b))]
    assert [summary(e) for e in one.until(lambda e: e["object"]["metadata"]["name"] == "b")] == [
        ("ADDED", "b", rv(b))]
    assert summary(vms.until(lambda e: e["object"]["metadata"]["name"] == "web-1")[-1])[:2] == ("ADDED", "web-1")
    assert summary(own.until(lambda e: e["type"] == "MODIFIED")[-1]) == ("MODIFIED", cluster.ns, rv(labelled))
    with pytest.raises(queue.Empty):  # a's changes never reach the watch of b
        while True:
            assert one.next(timeout=0.5)["object"]["metadata"]["name"] == "b"


def test_legacy_watch_paths_refuse_what_kube_apiserver_refuses(cluster: Cluster) -> None:
    path = f"/api/v1/watch/namespaces/{cluster.ns}/resourcequotas/b"
    for selector in ("metadata.name=a", "metadata.namespace=" + cluster.ns):
        with pytest.raises(ClientError) as refused:
            cluster.client.get(f"{path}?{urlencode({'fieldSelector': selector})}")
        assert (refused.value.code, refused.value.message) == (
            400, "fieldSelector metadata.name doesn't match requested name")
    for missing in ("/api/v1/watch/nothings", f"/apis/kubevirt.io/v1/watch/namespaces/{cluster.ns}/nothings",
                    "/apis/vmquota.io/v1/watch/projects/p/usage"):
        with pytest.raises(ClientError) as refused:
            cluster.client.get(missing)
        assert refused.value.code == 404, missing


def test_a_legacy_watch_is_authorized_as_a_watch_of_its_name() -> None:
    from vmquota.apiserver import authorization
    from vmquota.apiserver.request import Request
    from vmquota.identity import UserInfo
    alice = UserInfo("alice")

    def attributes(path: str) -> tuple[str, str, str, str]:
        a = authorization.attributes(Request("GET", path, {}, {}), alice)  # type: ignore[arg-type]
        return a.verb, a.resource, a.namespace, a.name
    assert attributes("/api/v1/watch/namespaces/dev/resourcequotas/b") == ("watch", "resourcequotas", "dev", "b")
    assert attributes("/apis/kubevirt.io/v1/watch/virtualmachines") == ("watch", "virtualmachines", "", "")
    assert attributes("/api/v1/watch/namespaces/dev") == ("watch", "namespaces", "dev", "dev")


def names(listing: dict[str, Any]) -> list[str]:
    return [item["metadata"]["name"] for item in listing["items"]]


def test_a_list_at_an_exact_version_is_the_list_as_it_was_then(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "1"}, name="a")
    then = cluster.client.get(quotas_path(cluster.ns))
    cluster.client.patch(f"{quotas_path(cluster.ns)}/a", {"spec": {"hard": {"limits.cpu": "2"}}})
    cluster.create_quota({"limits.cpu": "1"}, name="b")
    version = then["metadata"]["resourceVersion"]
    exact = cluster.client.get(f"{quotas_path(cluster.ns)}?resourceVersion={version}&resourceVersionMatch=Exact")
    assert exact == then
    # With a limit and no match, a version is Exact too (the legacy rule for paged lists), one page at a time.
    page = cluster.client.get(f"{quotas_path(cluster.ns)}?resourceVersion={version}&limit=1")
    assert names(page) == ["a"] and "continue" not in page["metadata"]
    assert page["items"][0]["spec"]["hard"] == {"limits.cpu": "1"}
    # NotOlderThan, or a version without a match or a limit: the newest list.
    newest = cluster.client.get(quotas_path(cluster.ns))
    for query in (f"resourceVersion={version}&resourceVersionMatch=NotOlderThan", f"resourceVersion={version}",
                  "resourceVersion=0", "resourceVersion=0&resourceVersionMatch=NotOlderThan"):
        assert names(cluster.client.get(f"{quotas_path(cluster.ns)}?{query}")) == names(newest) == ["a", "b"], query
    # A Table at that version shows the rows as they were.
    request = urllib.request.Request(
        f"{cluster.app.url}{quotas_path(cluster.ns)}?resourceVersion={version}&resourceVersionMatch=Exact",
        headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
    with urllib.request.urlopen(request, timeout=30) as response:
        table = json.loads(response.read())
    assert [row["cells"][0] for row in table["rows"]] == ["a"] and table["metadata"]["resourceVersion"] == version


def test_a_list_version_too_new_or_too_old_gets_kube_apiservers_answers(cluster: Cluster) -> None:
    store = cluster.app.store
    store.changes_kept, store.prune_every = 5, 5
    first = cluster.create_quota({"limits.cpu": "1"}, name="a")
    for cpu in range(2, 20):
        cluster.client.patch(f"{quotas_path(cluster.ns)}/a", {"spec": {"hard": {"limits.cpu": str(cpu)}}})
    newest = store.revision
    for match in ("NotOlderThan", "Exact"):
        with pytest.raises(ClientError) as refused:
            cluster.client.get(f"{quotas_path(cluster.ns)}?resourceVersion={newest + 10}&resourceVersionMatch={match}")
        assert refused.value.code == 504 and refused.value.reason == "Timeout"
        assert refused.value.message == f"Too large resource version: {newest + 10}, current: {newest}"
    with pytest.raises(ClientError) as expired:
        cluster.client.get(f"{quotas_path(cluster.ns)}?resourceVersion={rv(first)}&resourceVersionMatch=Exact")
    assert (expired.value.code, expired.value.reason, expired.value.message) == (
        410, "Expired", "The resourceVersion for the provided list is too old.")


def test_bad_list_versions_are_refused_in_kube_apiservers_words(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "1"}, name="a")
    before = cluster.client.get(quotas_path(cluster.ns))
    token = cluster.client.get(f"{quotas_path(cluster.ns)}?limit=1")["metadata"].get("continue") or "x"
    invalid = 'ListOptions.meta.k8s.io "" is invalid: '
    for params, code, message in (
            ({"resourceVersionMatch": "Exact"}, 422,
             invalid + "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is "
                       "provided"),
            ({"resourceVersion": "5", "resourceVersionMatch": "Newest"}, 422,
             invalid + 'resourceVersionMatch: Unsupported value: "Newest": supported values: "Exact", '
                       '"NotOlderThan", ""'),
            ({"resourceVersion": "0", "resourceVersionMatch": "Exact"}, 422,
             invalid + 'resourceVersionMatch: Forbidden: resourceVersionMatch "exact" is forbidden for '
                       'resourceVersion "0"'),
            ({"resourceVersionMatch": "Sometimes", "continue": token}, 422,
             invalid + "[resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion "
                       "is provided, resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden when "
                       'continue is provided, resourceVersionMatch: Unsupported value: "Sometimes": supported '
                       'values: "Exact", "NotOlderThan", ""]'),
            ({"sendInitialEvents": "true"}, 422, invalid + "sendInitialEvents: Forbidden: sendInitialEvents is "
                                                           "forbidden for list"),
            ({"resourceVersion": "5", "continue": token}, 400,
             "specifying resource version is not allowed when using continue"),
            ({"resourceVersion": "abc"}, 400,
             'resourceVersion: Invalid value: "abc": must be a resourceVersion returned by this server'),
            ({"watch": "true", "resourceVersionMatch": "Exact"}, 422,
             invalid + "[resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless "
                       'sendInitialEvents is provided, resourceVersionMatch: Unsupported value: "Exact": supported '
                       'values: "NotOlderThan"]')):
        with pytest.raises(ClientError) as refused:
            cluster.client.get(f"{quotas_path(cluster.ns)}?{urlencode(params)}")
        assert (refused.value.code, refused.value.message) == (code, message), params
    assert cluster.client.get(quotas_path(cluster.ns))["items"] == before["items"]
