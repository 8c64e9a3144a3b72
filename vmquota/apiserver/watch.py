"""Watches: `?watch=true` on a list path streams Kubernetes WatchEvents, one JSON object per line.

A watch is a view of the store's change log (`store.py`, table `changes`), whose position is the
resourceVersion, as kube-apiserver's watch is a view of etcd's history. In each server process one `Feed`
thread follows the log and hands every new change to that process's watchers (`Subscription`s): this
process's own commits wake it at once (`Store.change_listeners`, called after each commit), and it polls
every POLL_SECONDS for the commits of the other API processes (`workers.py`), which share the store. So a
change made through any process reaches the watchers on every process, each in resourceVersion order,
exactly once.

A watch starts in one of two ways, as in Kubernetes:
- from a `resourceVersion` N: every change after N, first those already in the log, then live ones;
- without one (or "0"): an ADDED for every object as it is now, then every change after that.
A resourceVersion older than the log's window gets what kube-apiserver's watch cache answers: a 200 stream
with one ERROR event, a 410 Status "too old resource version: N (M)" with reason Expired, M being the newest
resourceVersion the log no longer holds. client-go and the Python client then list again.

Each watcher has a bounded queue. One that cannot keep up (MAX_QUEUED changes waiting) is ended, as
kube-apiserver's cacher ends an unresponsive watcher ("Forcing watcher close due to unresponsiveness"): its
stream closes cleanly, and its client watches again from the last resourceVersion it saw, which the log still
holds, so it loses nothing and blocks nobody. Streams also end at `timeoutSeconds` (without it, after 30 to
60 minutes, as kube-apiserver's default), and when the server closes.

Neighbours: `handlers.py` calls `serve` for a list path with `watch=true`; `http.py` writes the streamed body
chunked and owns the Feed (one per `Server`); `paging.py` reads the same snapshots for lists.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

from vmquota import errors, objects
from vmquota.apiserver.request import Request, Response, status
from vmquota.objects import Kind, Obj
from vmquota.store import ADDED, DELETED, MODIFIED, Change, Store

log = logging.getLogger(__name__)

POLL_SECONDS = 0.01  # how soon a change committed by another API process reaches this one's watchers
BOOKMARK_SECONDS = 5.0  # between BOOKMARK events when allowed (kube-apiserver: about a minute)
HEARTBEAT_SECONDS = 10.0  # an idle stream checks this often whether its client is still there
MAX_QUEUED = 1_000  # changes waiting for one watcher before it is ended as too slow
BATCH = 1_000  # changes read from the log at a time
MIN_TIMEOUT_SECONDS = 1800  # without timeoutSeconds a watch lasts 30 to 60 minutes, as kube-apiserver's
INITIAL_EVENTS_END = "k8s.io/initial-events-end"

Predicate = Callable[[Obj], bool]
Render = Callable[[Obj], Obj]  # what a watcher sees of each object (a Table row, for `kubectl get -w`)


class Subscription:
    """One watcher's place in its process's feed: the live changes of one kind, queued, bounded."""

    def __init__(self, kind: str, position: int) -> None:
        self.kind = kind
        self.position = position  # every change after this reaches the queue, and none before it
        self._queue: deque[Change] = deque()
        self._ready = threading.Condition(threading.Lock())
        self.ended: str | None = None  # why the feed ended it: "closing" or "too slow"

    def offer(self, change: Change) -> bool:
        """Queue a change (the feed holds its lock); False when the watcher is too far behind to take more."""
        with self._ready:
            if self.ended is not None:
                return False
            if len(self._queue) >= MAX_QUEUED:
                self.ended = "too slow"
                self._queue.clear()
                self._ready.notify()
                return False
            self._queue.append(change)
            self._ready.notify()
            return True

    def end(self, why: str) -> None:
        with self._ready:
            if self.ended is None:
                self.ended = why
            self._ready.notify()

    def take(self, timeout: float) -> list[Change]:
        """Every queued change (a burst goes out in one write), or none after `timeout` seconds or once ended
        (see `ended`)."""
        with self._ready:
            if not self._queue and self.ended is None:
                self._ready.wait(timeout)
            if self.ended is not None:
                return []
            taken = list(self._queue)
            self._queue.clear()
            return taken

    @property
    def idle(self) -> bool:
        with self._ready:
            return not self._queue


class Feed:
    """This process's follower of the change log, fanning each change out to the watchers of its kind."""

    def __init__(self, store: Store, *, poll_seconds: float = POLL_SECONDS) -> None:
        self._store = store
        self._poll_seconds = poll_seconds
        self.bookmark_seconds = BOOKMARK_SECONDS
        self._lock = threading.Lock()  # guards the watchers and the position; taken before any Subscription's
        self._watchers: dict[str, set[Subscription]] = {}
        self._position = 0  # the newest change handed out; meaningful while there are watchers
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        store.change_listeners.append(self._wake.set)

    def subscribe(self, kind: str) -> Subscription:
        """A new watcher of `kind`: it gets every change after its `position`."""
        with self._lock:
            if not any(self._watchers.values()):
                self._position = self._revision()  # idle until now: follow the log from here
            subscription = Subscription(kind, self._position)
            if self._closed:
                subscription.end("closing")
                return subscription
            self._watchers.setdefault(kind, set()).add(subscription)
            if self._thread is None:
                self._thread = threading.Thread(target=self._follow, name="watch-feed", daemon=True)
                self._thread.start()
        self._wake.set()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._watchers.get(subscription.kind, set()).discard(subscription)

    def bookmark_position(self, subscription: Subscription) -> int | None:
        """A resourceVersion the watcher has seen everything up to, when nothing waits in its queue: then every
        change of its kind up to the feed's position has been taken."""
        with self._lock:
            return self._position if subscription.idle else None

    @property
    def watchers(self) -> int:
        with self._lock:
            return sum(len(subs) for subs in self._watchers.values())

    def close(self) -> None:
        """End every watch (the server closes): each stream ends cleanly."""
        with self._lock:
            self._closed = True
            for subs in self._watchers.values():
                for subscription in subs:
                    subscription.end("closing")
            self._watchers.clear()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _revision(self) -> int:
        with self._store.own_reader() as reader:
            return reader.revision()

    def _follow(self) -> None:
        """The feed's thread: read what was committed after the position, hand it out, wait, again."""
        with self._store.own_reader() as reader:
            while not self._closed:
                with self._lock:
                    active, after = any(self._watchers.values()), self._position
                if active:
                    try:
                        with reader.snapshot():
                            pruned, changes = reader.pruned(), reader.changes(after, limit=BATCH)
                    except Exception:  # a store that cannot be read now (a full disk): try again at the next poll
                        log.exception("the watch feed could not read the change log")
                        changes, pruned = [], 0
                    if pruned > after:  # the log moved past changes never handed out: nobody may miss them
                        self._end_all("too slow")
                    elif changes:
                        self._hand_out(after, changes)
                        if len(changes) == BATCH:
                            continue  # more are waiting
                self._wake.wait(self._poll_seconds if active else None)
                self._wake.clear()

    def _hand_out(self, after: int, changes: list[Change]) -> None:
        with self._lock:
            if self._position != after:
                return  # the feed went idle and started again meanwhile: these are before its new position
            for change in changes:
                subs = self._watchers.get(change.kind)
                if subs:
                    for subscription in [s for s in subs if not s.offer(change)]:
                        subs.discard(subscription)
                        log.info("a watcher of %s fell %d changes behind: ended, it watches again from where it "
                                 "was", change.kind, MAX_QUEUED)
            self._position = changes[-1].rv

    def _end_all(self, why: str) -> None:
        with self._lock:
            for subs in self._watchers.values():
                for subscription in subs:
                    subscription.end(why)
            self._watchers.clear()


@dataclass(frozen=True)
class Options:
    """What a watch request asks for, checked."""
    resource_version: int | None  # None: first the current state
    bookmarks: bool
    timeout: float  # seconds
    send_initial_events: bool
    name: str | None = None  # fieldSelector metadata.name
    namespace: str | None = None  # the path's namespace, or fieldSelector metadata.namespace
    predicate: Predicate | None = None  # label and field selectors (selectors.py)
    render: Render | None = None


def options(request: Request, namespace: str | None, *, predicate: Predicate | None = None,
            render: Render | None = None, fields: tuple[str | None, str | None] | None = None) -> Options:
    """The watch parameters of a request; BadRequest for any that is malformed.

    `fields` is (metadata.name, metadata.namespace) that the request's field selector requires, when the
    caller has parsed it whole (selectors.py, with the rest of it in `predicate`); without it only those two
    fields may be selected on.
    """
    version = parse_resource_version(request.param("resourceVersion"))
    timeout_text = request.param("timeoutSeconds")
    if timeout_text:
        if not timeout_text.isdigit():
            raise errors.BadRequest(f'timeoutSeconds: Invalid value: "{timeout_text[:40]}": must be a whole number '
                                    f"of seconds")
        timeout = float(timeout_text)
    else:
        timeout = MIN_TIMEOUT_SECONDS * (1 + random.random())
    initial = request.flag("sendInitialEvents")
    bookmarks = request.flag("allowWatchBookmarks")
    if request.param("sendInitialEvents") is not None:
        # kube-apiserver's checks of a streaming list (KEP 3157)
        if request.param("resourceVersionMatch") != "NotOlderThan":
            raise errors.Invalid("ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: "
                                 "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan")
        if initial and not bookmarks:
            raise errors.Invalid("ListOptions.meta.k8s.io \"\" is invalid: allowWatchBookmarks: Required value: "
                                 "sendInitialEvents requires setting allowWatchBookmarks to true")
    elif request.param("resourceVersionMatch"):
        raise errors.BadRequest("resourceVersionMatch is forbidden for watch")
    name, selected_namespace = fields if fields is not None else simple_field_selector(request.param("fieldSelector"))
    if selected_namespace is not None and namespace is not None and selected_namespace != namespace:
        selected_namespace = "\0"  # matches nothing, as in Kubernetes
    return Options(version, bookmarks, timeout, initial, name, namespace if namespace is not None
                   else selected_namespace, predicate, render)


def parse_resource_version(text: str | None) -> int | None:
    """A resourceVersion parameter: None for none or "0" (the current state), else the number it names."""
    if text in (None, "", "0"):
        return None
    assert text is not None
    if not text.isdigit() or len(text) > 18:
        raise errors.BadRequest(f'resourceVersion: Invalid value: "{text[:40]}": must be a resourceVersion '
                                f"returned by this server")
    return int(text)


def simple_field_selector(text: str | None) -> tuple[str | None, str | None]:
    """(metadata.name, metadata.namespace) that a field selector requires; anything else is a 400.

    The full selectors (labels, `!=`, events' involvedObject.*) are `selectors.py`'s: the handler passes them
    as a predicate. This is the part every kind supports and the log can filter on without parsing bodies.
    """
    name = namespace = None
    for term in (text or "").split(","):
        if not term:
            continue
        field, sep, value = term.partition("==") if "==" in term else term.partition("=")
        if not sep or field.endswith("!"):
            raise errors.BadRequest(f'invalid field selector "{text}": only metadata.name=X and '
                                    f"metadata.namespace=X are supported in a watch")
        if field == "metadata.name":
            name = value
        elif field == "metadata.namespace":
            namespace = value
        else:
            raise errors.BadRequest(f'"{field}" is not a known field selector: only "metadata.name", '
                                    f'"metadata.namespace"')
    return name, namespace


def serve(feed: Feed, store: Store, kind: Kind, opts: Options) -> Response:
    """The streamed response of a watch."""
    return Response(200, _Stream(feed, store, kind, opts).events())


def event_line(event_type: str, obj_text: str) -> bytes:
    return f'{{"type":"{event_type}","object":{obj_text}}}\n'.encode()


def _expired(version: int, pruned: int) -> bytes:
    gone = status(410, "Expired", f"too old resource version: {version} ({pruned})")
    return event_line("ERROR", json.dumps(gone))


class _Stream:
    """One watch's events, from its start to its end."""

    def __init__(self, feed: Feed, store: Store, kind: Kind, opts: Options) -> None:
        self.feed, self.store, self.kind, self.opts = feed, store, kind, opts
        self.sent = 0  # the newest resourceVersion the client has seen everything up to

    def events(self) -> Iterator[bytes]:
        subscription = self.feed.subscribe(self.kind.kind)
        try:
            deadline = time.monotonic() + self.opts.timeout
            if self.opts.resource_version is None or self.opts.send_initial_events:
                yield from self._current_state()
                if self.opts.send_initial_events:
                    yield self._bookmark(self.sent, initial_events_end=True)
            else:
                caught_up = yield from self._from_log(self.opts.resource_version, subscription.position)
                if not caught_up:
                    return
            self.sent = max(self.sent, subscription.position)
            yield from self._live(subscription, deadline)
        finally:
            self.feed.unsubscribe(subscription)

    def _current_state(self) -> Iterator[bytes]:
        """An ADDED for every object as it is now (one snapshot); `sent` becomes its resourceVersion."""
        with self.store.own_reader() as reader, reader.snapshot():
            self.sent = reader.revision()
            namespace = self.opts.namespace
            for ns, name, body in reader.bodies_at(self.kind, namespace, self.sent):
                if self.opts.name is None or name == self.opts.name:
                    line = self._line(Change(self.sent, ADDED, self.kind.kind, ns, name, body, None))
                    if line:
                        yield line

    def _from_log(self, after: int, until: int) -> Generator[bytes, None, bool]:
        """The changes after `after` up to `until` that are in the log already; returns False when `after` is
        older than the log (the stream then carries only the 410)."""
        self.sent = after
        with self.store.own_reader() as reader:
            newest = reader.revision()
            if after > newest:  # no such version yet: this server did not give it (all its processes share one log)
                yield event_line("ERROR", json.dumps(status(504, "Timeout", f"Too large resource version: {after}, "
                                                                           f"current: {newest}")))
                return False
            while self.sent < until:
                with reader.snapshot():
                    pruned = reader.pruned()
                    changes = [] if self.sent < pruned else reader.changes(self.sent, until=until,
                                                                           kind=self.kind.kind, limit=BATCH)
                if self.sent < pruned:
                    yield _expired(after, pruned)
                    return False
                if not changes:
                    break
                for change in changes:
                    line = self._line(change)
                    if line:
                        yield line
                self.sent = changes[-1].rv
        self.sent = max(self.sent, until)
        return True

    def _live(self, subscription: Subscription, deadline: float) -> Iterator[bytes]:
        next_bookmark = time.monotonic() + self.feed.bookmark_seconds
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            wait = min(deadline - now, HEARTBEAT_SECONDS)
            if self.opts.bookmarks:
                wait = max(0.0, min(wait, next_bookmark - now))
            changes = subscription.take(wait)
            if not changes:
                if subscription.ended is not None:
                    return
                if self.opts.bookmarks and time.monotonic() >= next_bookmark:
                    position = self.feed.bookmark_position(subscription)
                    if position is not None:
                        self.sent = max(self.sent, position)
                        yield self._bookmark(self.sent)
                    next_bookmark = time.monotonic() + self.feed.bookmark_seconds
                else:
                    yield b""  # nothing to send: http.py checks that the client is still there
                continue
            lines = []
            for change in changes:
                if change.rv <= self.sent:
                    continue  # the current state or the log had it already
                self.sent = change.rv
                line = self._line(change)
                if line:
                    lines.append(line)
            yield b"".join(lines)  # empty: nothing for this watcher, a moment to check on its client

    def _bookmark(self, version: int, *, initial_events_end: bool = False) -> bytes:
        metadata: Obj = {"resourceVersion": str(version)}
        if initial_events_end:
            metadata["annotations"] = {INITIAL_EVENTS_END: "true"}
        return event_line("BOOKMARK", json.dumps({"kind": self.kind.kind, "apiVersion": self.kind.api_version,
                                                  "metadata": metadata}))

    def _line(self, change: Change) -> bytes | None:
        """The event a change is for this watcher, or None when it is not one of the objects it watches.

        With a predicate, an object that starts or stops matching it is ADDED or DELETED, as kube-apiserver's
        cacher does (a DELETED shows the object as it last matched, at the change's resourceVersion).
        """
        opts = self.opts
        if change.kind != self.kind.kind:
            return None
        if opts.namespace is not None and change.namespace != opts.namespace:
            return None
        if opts.name is not None and change.name != opts.name:
            return None
        if opts.predicate is None and opts.render is None:
            return event_line(change.type, change.body)
        event_type, obj = change.type, json.loads(change.body)
        if opts.predicate is not None:
            matches = opts.predicate(obj)
            if change.type == MODIFIED:
                previous = json.loads(change.previous) if change.previous else None
                matched = previous is not None and opts.predicate(previous)
                if matches and not matched:
                    event_type = ADDED
                elif matched and not matches:
                    assert previous is not None
                    event_type, obj = DELETED, previous
                    objects.meta(obj)["resourceVersion"] = str(change.rv)
                elif not matches:
                    return None
            elif not matches:
                return None
        if opts.render is not None:
            obj = opts.render(obj)
        return event_line(event_type, json.dumps(obj))
