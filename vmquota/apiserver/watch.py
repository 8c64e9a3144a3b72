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

Why the feed writes the watchers' sockets itself. Each watcher has a thread (its HTTP connection's), but
waking 100 threads for each burst of changes, each to take the GIL, encode and send, cost the writers: with
50 watchers, 36 us of CPU per change per watcher, and a commit's median went from 0.2 to 1.5 ms, as the
threads queued for the one GIL. So, as kube-apiserver's cacher hands each event to every watcher's channel
without a goroutine per event, the feed hands a burst to each live watcher (`Subscription.offer`): the
watchers without selectors share one chunk for it (`Lines`: each line encoded once, filtered by namespace
and name, joined and framed once), and the feed sends it without waiting (`request.Wire.send_now`). Only
when a socket does not take it all does the watcher's own thread wake, to send the rest and whatever the
feed queued meanwhile, blocking for its client alone. That thread also writes what comes before the live
events (the current state, the log) and the bookmarks; `Subscription` decides, under its lock, which of
the two threads writes at any moment, so the chunks go out whole and in order.

Each watcher has a bounded queue. One that cannot keep up (MAX_QUEUED changes waiting) is ended, as
kube-apiserver's cacher ends an unresponsive watcher ("Forcing watcher close due to unresponsiveness"): its
stream closes cleanly, and its client watches again from the last resourceVersion it saw, which the log still
holds, so it loses nothing and blocks nobody. Streams also end at `timeoutSeconds` (without it, after 30 to
60 minutes, as kube-apiserver's default), and when the server closes.

Neighbours: `handlers.py` calls `serve` for a list path with `watch=true`; `http.py` lends the connection as
a `Wire` (chunked) to the `Stream` that `serve` answers, and owns the Feed (one per `Server`); `paging.py`
reads the same snapshots for lists.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace

from vmquota import errors, objects
from vmquota.apiserver import routing
from vmquota.apiserver.request import Request, Response, Stream, Wire, status
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


class Lines:
    """What the watchers of one hand-out share, made once for all of them: each change's event line, and for the
    watchers without selectors, of one kind and the same namespace and name, their changes, their chunk's data
    and the chunk on the wire."""

    def __init__(self) -> None:
        self._lines: dict[int, bytes] = {}
        self._subsets: dict[tuple[str, str | None, str | None], list[Change]] = {}
        self._joined: dict[tuple[str, str | None, str | None], bytes] = {}
        self._framed: dict[int, tuple[bytes, bytes]] = {}  # by the id of the data, which it keeps alive

    def plain(self, change: Change) -> bytes:
        line = self._lines.get(change.rv)
        if line is None:
            line = self._lines[change.rv] = event_line(change.type, change.body)
        return line

    def subset(self, key: tuple[str, str | None, str | None], changes: list[Change]) -> list[Change]:
        """The changes of the namespace and name of `key` (kind, namespace, name); None is any."""
        subset = self._subsets.get(key)
        if subset is None:
            _, namespace, name = key
            subset = self._subsets[key] = [c for c in changes if (namespace is None or c.namespace == namespace)
                                           and (name is None or c.name == name)]
        return subset

    def joined(self, key: tuple[str, str | None, str | None], changes: list[Change]) -> bytes:
        """The lines of `changes`, the subset of `key`, as one chunk's data."""
        data = self._joined.get(key)
        if data is None:
            data = self._joined[key] = b"".join(self.plain(c) for c in changes)
        return data

    def framed(self, data: bytes, frame: Callable[[bytes], bytes]) -> bytes:
        kept = self._framed.get(id(data))
        if kept is None or kept[0] is not data:
            kept = self._framed[id(data)] = (data, frame(data))
        return kept[1]


Select = Callable[[list[Change], Lines], bytes]  # a watcher's events of a burst of changes, as one chunk's data


class Subscription:
    """One watcher's place in its process's feed: the live changes of one kind (of one namespace or name, when it
    watches only those), and the writer of its stream while it is live.

    Two threads write a watcher's connection, never at once, as `_writing` says. While the watcher keeps up, the
    feed's thread writes its events itself, in the hand-out, as far as the socket takes them without waiting:
    one send per burst, and no thread woken. Otherwise the watcher's own thread writes (`_writing` set): before it
    goes live (the current state, the log), for its bookmarks, and after a send the socket did not take whole
    (the rest of it, then whatever the feed queued meanwhile, bounded by MAX_QUEUED).
    """

    def __init__(self, kind: str, position: int, *, namespace: str | None = None, name: str | None = None) -> None:
        self.kind, self.namespace, self.name = kind, namespace, name
        self.key = (kind, namespace, name)
        self.position = position  # every change after this reaches the watcher, and none before it
        self._queue: deque[Change] = deque()
        self._unsent = b""  # the part of a chunk the socket did not take at once; the watcher's thread sends it
        self._writing = True  # the watcher's thread holds the wire; until `wait` hands it to the feed
        self._live: tuple[Wire, Select] | None = None
        self._ready = threading.Condition(threading.Lock())
        self.ended: str | None = None  # why it ended: "closing", "too slow", "gone" (the client), "done"

    def offer(self, changes: list[Change], lines: Lines) -> bool:
        """A burst of changes of its kind (the feed holds its lock): written at once, or queued for the watcher's
        thread. False when the watcher is ended: too far behind to take more, or its client gone."""
        with self._ready:
            if self.ended is not None:
                return False
            if self.namespace is not None or self.name is not None:
                changes = lines.subset(self.key, changes)
            if not changes:
                return True
            if self._writing or self._live is None:
                return self._enqueue(changes)
            wire, select = self._live
            data = select(changes, lines)
            if data:
                framed = lines.framed(data, wire.frame)
                try:
                    sent = wire.send_now(framed)
                except OSError:
                    self._end("gone")
                    return False
                if sent < len(framed):
                    self._unsent, self._writing = framed[sent:], True
                    self._ready.notify()
            return True

    def _enqueue(self, changes: list[Change]) -> bool:
        if len(self._queue) + len(changes) > MAX_QUEUED:
            self._end("too slow")
            return False
        self._queue.extend(changes)
        self._ready.notify()
        return True

    def _end(self, why: str) -> None:
        if self.ended is None:
            self.ended = why
        self._queue.clear()  # what is unsent of a chunk stays: the watcher's thread completes it
        self._ready.notify()

    def end(self, why: str) -> None:
        with self._ready:
            self._end(why)

    def take(self, timeout: float) -> list[Change]:
        """Every queued change, or none after `timeout` seconds or once ended (see `ended`). Before the
        watcher is live, every change is queued."""
        with self._ready:
            if not self._queue and self.ended is None:
                self._ready.wait(timeout)
            if self.ended is not None:
                return []
            taken = list(self._queue)
            self._queue.clear()
            return taken

    def go_live(self, wire: Wire, select: Select) -> None:
        """From the next `wait` on, the feed may write the watcher's events itself."""
        with self._ready:
            self._live = (wire, select)

    def wait(self, timeout: float) -> tuple[bytes, list[Change]]:
        """For the watcher's thread: the rest of a chunk to send and the changes queued, taking the wire; or, when
        there are none, the wire handed to the feed, the changes it had no room for after up to `timeout`
        seconds, or once ended."""
        with self._ready:
            if not self._queue and not self._unsent and self.ended is None:
                self._writing = self._live is None
                self._ready.wait(timeout)
            unsent, self._unsent = self._unsent, b""
            taken = [] if self.ended is not None else list(self._queue)
            self._queue.clear()
            if unsent or taken:
                self._writing = True
            return unsent, taken

    def claim_if_idle(self) -> bool:
        """Take the wire from the feed when nothing waits to be sent (a bookmark goes next); the next `wait` hands
        it back."""
        with self._ready:
            if self.ended is not None or self._queue or self._unsent:
                return False
            self._writing = True
            return True

    def finish(self) -> bytes:
        """For the watcher's thread, at the end of its stream: the feed writes no more; what it left unsent of a
        chunk, to complete before the stream ends."""
        with self._ready:
            self._end("done")
            unsent, self._unsent = self._unsent, b""
            return unsent

    @property
    def idle(self) -> bool:
        with self._ready:
            return not self._queue and not self._unsent


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

    def subscribe(self, kind: str, *, namespace: str | None = None, name: str | None = None) -> Subscription:
        """A new watcher of `kind` (of one namespace or name): it gets every change after its `position`."""
        with self._lock:
            if not any(self._watchers.values()):
                self._position = self._revision()  # idle until now: follow the log from here
            subscription = Subscription(kind, self._position, namespace=namespace, name=name)
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
        """A resourceVersion the watcher has seen everything up to, when nothing waits to be sent to it: then
        every change of its kind up to the feed's position has been. The watcher's thread then holds the wire
        (`claim_if_idle`), so that no change goes out before the bookmark that would say it came before."""
        with self._lock:
            return self._position if subscription.claim_if_idle() else None

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
            by_kind: dict[str, list[Change]] = {}
            for change in changes:
                by_kind.setdefault(change.kind, []).append(change)
            lines = Lines()
            for kind, burst in by_kind.items():
                subs = self._watchers.get(kind)
                if subs:
                    for subscription in [s for s in subs if not s.offer(burst, lines)]:
                        subs.discard(subscription)
                        if subscription.ended == "too slow":
                            log.info("a watcher of %s fell %d changes behind: ended, it watches again from where "
                                     "it was", kind, MAX_QUEUED)
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
    elif match := request.param("resourceVersionMatch"):  # kube-apiserver's validateWatchOptions
        problems = ["resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless "
                    "sendInitialEvents is provided"]
        if match != "NotOlderThan":
            problems.append(f'resourceVersionMatch: Unsupported value: {json.dumps(match[:80])}: supported values: '
                            '"NotOlderThan"')
        listed = problems[0] if len(problems) == 1 else f"[{', '.join(problems)}]"
        raise errors.Invalid(f'ListOptions.meta.k8s.io "" is invalid: {listed}')
    name, selected_namespace = fields if fields is not None else simple_field_selector(request.param("fieldSelector"))
    if selected_namespace is not None and namespace is not None and selected_namespace != namespace:
        selected_namespace = "\0"  # matches nothing, as in Kubernetes
    return Options(version, bookmarks, timeout, initial, name, namespace if namespace is not None
                   else selected_namespace, predicate, render)


def legacy(request: Request) -> Request:
    """A request on a deprecated watch path as the current API spells it; any other request as it is.

    kube-apiserver still serves `/api/v1/watch/...` and `/apis/{group}/{version}/watch/...` as watches of the
    list they name, whatever `watch` says; one object's path watches that name, as `fieldSelector=metadata.name`
    does, and a field selector that does not ask for exactly that name is its 400.
    """
    segments = [s for s in request.path.split("/") if s]
    start = {"api": 2, "apis": 3}.get(segments[0]) if segments else None
    if start is None or len(segments) <= start or segments[start] != "watch":
        return request
    path = "/" + "/".join(segments[:start] + segments[start + 1:])
    target = routing.route(path)
    if target.subresource is not None:
        raise errors.NotFound("the server could not find the requested resource")
    query = {**request.query, "watch": "true"}
    if target.name is not None:
        selected = query.get("fieldSelector")
        if selected and _required_name(selected) != target.name:
            raise errors.BadRequest("fieldSelector metadata.name doesn't match requested name")
        query["fieldSelector"] = selected or f"metadata.name={target.name}"
        path = path.rsplit("/", 1)[0]
    return replace(request, path=path, query=query)


def _required_name(selector: str) -> str | None:
    """The name a field selector requires metadata.name to equal, as apimachinery's RequiresExactMatch."""
    for term in selector.split(","):
        field, sep, value = term.partition("==") if "==" in term else term.partition("=")
        if sep and field.strip() == "metadata.name" and not field.endswith("!"):
            return value.strip()
    return None


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
    return Response(200, _Stream(feed, store, kind, opts))


def _send_all(events: Generator[bytes, None, bool], wire: Wire) -> bool:
    """Send each event as a chunk of its own; what the generator returns."""
    while True:
        try:
            wire.send(wire.frame(next(events)))
        except StopIteration as done:
            return bool(done.value)


def event_line(event_type: str, obj_text: str) -> bytes:
    return f'{{"type":"{event_type}","object":{obj_text}}}\n'.encode()


def _expired(version: int, pruned: int) -> bytes:
    gone = status(410, "Expired", f"too old resource version: {version} ({pruned})")
    return event_line("ERROR", json.dumps(gone))


class _Stream(Stream):
    """One watch's events, from its start to its end, written by its request's thread and the feed's."""

    def __init__(self, feed: Feed, store: Store, kind: Kind, opts: Options) -> None:
        self.feed, self.store, self.kind, self.opts = feed, store, kind, opts
        self.sent = 0  # the newest resourceVersion the client has seen everything up to

    def run(self, wire: Wire) -> bool:
        subscription = self.feed.subscribe(self.kind.kind, namespace=self.opts.namespace, name=self.opts.name)
        try:
            deadline = time.monotonic() + self.opts.timeout
            if not _send_all(self._start(subscription), wire):
                return True  # the log cannot serve the version asked for: the stream carries the ERROR only
            subscription.go_live(wire, self._select)
            return self._live(subscription, wire, deadline)
        finally:
            subscription.end("done")
            self.feed.unsubscribe(subscription)

    def _start(self, subscription: Subscription) -> Generator[bytes, None, bool]:
        """The events before the live ones: the current state, or those the log holds already; False when the
        version asked for is not in the log (an ERROR event is all there is)."""
        if self.opts.resource_version is None or self.opts.send_initial_events:
            yield from self._current_state()
            if self.opts.send_initial_events:
                yield self._bookmark(self.sent, initial_events_end=True)
        elif not (yield from self._from_log(self.opts.resource_version, subscription.position)):
            return False
        self.sent = max(self.sent, subscription.position)
        return True

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

    def _live(self, subscription: Subscription, wire: Wire, deadline: float) -> bool:
        """The live events, until the deadline or the subscription's end; False when the client is gone."""
        next_bookmark = time.monotonic() + self.feed.bookmark_seconds
        while (now := time.monotonic()) < deadline:
            wait = min(deadline - now, HEARTBEAT_SECONDS)
            if self.opts.bookmarks:
                wait = max(0.0, min(wait, next_bookmark - now))
            unsent, changes = subscription.wait(wait)
            if unsent:
                wire.send(unsent)
            if changes:
                data = self._select(changes, Lines())
                if data:
                    wire.send(wire.frame(data))
            if unsent or changes:
                continue
            if subscription.ended is not None:
                return subscription.ended != "gone"
            if self.opts.bookmarks and time.monotonic() >= next_bookmark:
                position = self.feed.bookmark_position(subscription)
                if position is not None:
                    self.sent = max(self.sent, position)
                    wire.send(wire.frame(self._bookmark(self.sent)))
                next_bookmark = time.monotonic() + self.feed.bookmark_seconds
            elif wire.client_gone():
                return False
        rest = subscription.finish()
        if rest:
            wire.send(rest)
        return True

    def _select(self, changes: list[Change], lines: Lines) -> bytes:
        """This watcher's events of a burst of changes, one line each, skipping those it has had already (the
        current state or the log had them). Without selectors, the same as every such watcher's of the burst:
        made once."""
        opts = self.opts
        if opts.predicate is None and opts.render is None and changes and changes[0].rv > self.sent:
            self.sent = changes[-1].rv
            return lines.joined((self.kind.kind, opts.namespace, opts.name), changes)
        out = []
        for change in changes:
            if change.rv <= self.sent:
                continue
            self.sent = change.rv
            line = self._line(change, lines)
            if line:
                out.append(line)
        return b"".join(out)

    def _bookmark(self, version: int, *, initial_events_end: bool = False) -> bytes:
        metadata: Obj = {"resourceVersion": str(version)}
        if initial_events_end:
            metadata["annotations"] = {INITIAL_EVENTS_END: "true"}
        return event_line("BOOKMARK", json.dumps({"kind": self.kind.kind, "apiVersion": self.kind.api_version,
                                                  "metadata": metadata}))

    def _line(self, change: Change, lines: Lines | None = None) -> bytes | None:
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
            return event_line(change.type, change.body) if lines is None else lines.plain(change)
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
