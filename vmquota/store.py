"""The embedded store: every object and every VM's charge, in one SQLite file (WAL).

Bottom layer. All writes go through `transaction()`, which holds the store's one write
lock for its whole duration and commits everything it did at once or nothing:
that lock is what makes admission atomic (`accounting.py` reads `used`, checks
and writes inside it). The lock is a thread lock inside a process and an
`flock` on `<store>-lock` between the processes of one server (its API
processes), so no two writers anywhere ever interleave. Reads use their own
per-thread connections and never wait for writers.

Tables:
    objects(kind, namespace, name, uid, rv, body)  -- body is the JSON object
    changes(rv, type, kind, namespace, name, body, previous) -- the change log: what watches and paging read
    charges(namespace, name, resources)            -- what each VM charges now (the ledger)
    counters(name, value)                          -- the resourceVersion sequence
    settings(name, value)                          -- this installation's instance id
    vm_states(namespace, name, uid, phase, ...)    -- the few fields of every VM a recount compares
    quota_status(kind, namespace, name, hard, used) -- status.hard and status.used of every quota and project
    quota_settings(kind, namespace, name, ...)     -- a quota's warning threshold and enforcement mode (index)
    vm_metrics(namespace, name, ...)               -- the few fields of every VM that /metrics exports (index)
    usage_points(kind, namespace, name, at, ...)   -- every change of a quota's used or hard, until rolled up
    usage_rollup(kind, namespace, name, resolution, bucket, ...) -- per minute, then per hour: last, peak, at limit
    refusals(day, namespace, quota, resource, mode, count) -- admissions refused (or, in audit mode, let past hard)
Cluster-scoped objects have namespace ''. Triggers keep `vm_states`, `vm_metrics` and `quota_settings` equal to
what the bodies say, in the same transaction: they are indexes, never written directly. `history.py` reads
and rolls up the usage tables; `accounting.py` writes a point with every change of a quota's status.

Selected reads: `bodies(..., where)` and `extract(..., parts, where)` let SQLite evaluate a selector's
conditions (`Where`) and cut out the few fields a Table needs (`Part`), so the API server never parses a body
it drops or needs only a few fields of.

A ResourceQuota's or Project's status is kept apart from its body, in `quota_status`: every start and stop
changes it, and rewriting two small rows costs a start far less than rewriting two objects (JSON in and
out). Reads put it back into the body, so nobody outside the store sees the difference. A change of that
status is a change like any other: the object gets a new resourceVersion and a MODIFIED entry in the log.

The change log is Kubernetes' watch history. Every create, update and delete of an object, in the same
transaction, appends one row (ADDED, MODIFIED or DELETED) whose `rv` is the resourceVersion the change gave
the object, with the object's body as a reader sees it then (status included) and its body just before
(`previous`, NULL for an ADDED). An object written several times in one transaction (a quota created, then
its status set) gets one resourceVersion and one row, showing its final state: nobody could see the steps.
Rows have no gaps (a rolled-back transaction hands its resourceVersions back), so "every change after N" is
exactly the rows above N. The newest CHANGES_KEPT rows are kept; `counters('pruned')` is the resourceVersion
at and below which rows are gone: a watch or a continue token from before it is too old (410).
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import heapq
import json
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

from vmquota import errors, objects
from vmquota.objects import Kind, Obj

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    uid TEXT NOT NULL, rv INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS charges (
    namespace TEXT NOT NULL, name TEXT NOT NULL, resources TEXT NOT NULL,
    PRIMARY KEY (namespace, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS quota_status (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    hard TEXT NOT NULL, used TEXT NOT NULL,  -- JSON, as status.hard and status.used show them
    PRIMARY KEY (kind, namespace, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    rv INTEGER PRIMARY KEY, type TEXT NOT NULL, kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    body TEXT NOT NULL, previous TEXT  -- JSON as readers saw the object after and before the change
);
CREATE TABLE IF NOT EXISTS vm_states (
    namespace TEXT NOT NULL, name TEXT NOT NULL, uid TEXT NOT NULL,
    phase TEXT, deleting INTEGER NOT NULL, run_strategy TEXT, running INTEGER, last_exit TEXT,
    volumes_ready INTEGER NOT NULL,
    PRIMARY KEY (namespace, name)
) WITHOUT ROWID;
"""

# Observability (issue 14): what /metrics, the usage history and the warnings read without parsing bodies.
_OBSERVE_SCHEMA = """
CREATE TABLE IF NOT EXISTS quota_settings (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    threshold TEXT, mode TEXT,  -- the annotations vmquota.io/warning-threshold and vmquota.io/enforcement
    PRIMARY KEY (kind, namespace, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vm_metrics (
    namespace TEXT NOT NULL, name TEXT NOT NULL, created INTEGER, status TEXT, machine_type TEXT,
    cores, sockets, threads, requests_cpu, limits_cpu, requests_memory, limits_memory, guest_memory,
    PRIMARY KEY (namespace, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_points (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    at REAL NOT NULL, hard TEXT NOT NULL, used TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_points_by_quota ON usage_points(kind, namespace, name, id);
CREATE TABLE IF NOT EXISTS usage_rollup (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL, resolution INTEGER NOT NULL,
    bucket INTEGER NOT NULL, hard TEXT NOT NULL, last TEXT NOT NULL, peak TEXT NOT NULL, at_limit TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name, resolution, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS refusals (
    day TEXT NOT NULL, namespace TEXT NOT NULL, quota TEXT NOT NULL, resource TEXT NOT NULL, mode TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, namespace, quota, resource, mode)
) WITHOUT ROWID;
"""
_DOMAIN = "{body}->'$.spec.template.spec.domain'"
_VM_METRICS = f"""unixepoch({{body}}->>'$.metadata.creationTimestamp'), {{body}}->>'$.status.printableStatus',
    {_DOMAIN}->>'$.machine.type', {_DOMAIN}->>'$.cpu.cores', {_DOMAIN}->>'$.cpu.sockets', {_DOMAIN}->>'$.cpu.threads',
    {_DOMAIN}->>'$.resources.requests.cpu', {_DOMAIN}->>'$.resources.limits.cpu',
    {_DOMAIN}->>'$.resources.requests.memory', {_DOMAIN}->>'$.resources.limits.memory',
    {_DOMAIN}->>'$.memory.guest'"""
_QUOTA_SETTINGS = """{body}->>'$.metadata.annotations."vmquota.io/warning-threshold"',
    {body}->>'$.metadata.annotations."vmquota.io/enforcement"'"""

# What `vm_states` holds of a VM, read out of its JSON body by SQLite when the body is written. The recount
# compares every VM with the hypervisor; reading these from 100,000 whole bodies took it 0.7 to 1.4 s.
_VM_STATE = """{body}->>'$.status.phase', {body}->>'$.metadata.deletionTimestamp' IS NOT NULL,
    {body}->>'$.spec.runStrategy', {body}->>'$.spec.running', {body}->>'$.status.lastExit',
    EXISTS (SELECT 1 FROM json_each({body}, '$.status.conditions') AS c
            WHERE c.value->>'$.type' = 'DataVolumesReady' AND c.value->>'$.status' = 'True')"""
_VM = "'VirtualMachine'"
_VM_STATE_TRIGGERS = f"""
DROP TRIGGER IF EXISTS vm_states_insert;
DROP TRIGGER IF EXISTS vm_states_update;
DROP TRIGGER IF EXISTS vm_states_delete;
CREATE TRIGGER vm_states_insert AFTER INSERT ON objects WHEN NEW.kind = {_VM} BEGIN
    INSERT OR REPLACE INTO vm_states VALUES (NEW.namespace, NEW.name, NEW.uid, {_VM_STATE.format(body="NEW.body")});
END;
CREATE TRIGGER vm_states_update AFTER UPDATE ON objects WHEN NEW.kind = {_VM} BEGIN
    INSERT OR REPLACE INTO vm_states VALUES (NEW.namespace, NEW.name, NEW.uid, {_VM_STATE.format(body="NEW.body")});
END;
CREATE TRIGGER vm_states_delete AFTER DELETE ON objects WHEN OLD.kind = {_VM} BEGIN
    DELETE FROM vm_states WHERE namespace = OLD.namespace AND name = OLD.name;
END;
DELETE FROM vm_states;
INSERT INTO vm_states SELECT namespace, name, uid, {_VM_STATE.format(body="body")} FROM objects WHERE kind = {_VM};
"""
# The kinds whose status lives in `quota_status`; a read puts it back into the body (`_WITH_STATUS`).
STATUS_APART = frozenset({objects.RESOURCE_QUOTA.kind, objects.PROJECT.kind})
_QUOTAS = "(" + ", ".join(f"'{kind}'" for kind in sorted(STATUS_APART)) + ")"
_QUOTA_STATUS_TRIGGER = f"""
DROP TRIGGER IF EXISTS quota_status_delete;
CREATE TRIGGER quota_status_delete AFTER DELETE ON objects WHEN OLD.kind IN {_QUOTAS} BEGIN
    DELETE FROM quota_status WHERE kind = OLD.kind AND namespace = OLD.namespace AND name = OLD.name;
END;
-- Files written before quota_status kept the status in the bodies: move it out (the server's first
-- recount then checks every used against the ledger).
INSERT OR IGNORE INTO quota_status
    SELECT kind, namespace, name, coalesce(json(body->'$.status.hard'), '{{}}'),
           coalesce(json(body->'$.status.used'), '{{}}')
    FROM objects WHERE kind IN {_QUOTAS};
UPDATE objects SET body = json_remove(body, '$.status') WHERE kind IN {_QUOTAS} AND body->'$.status' IS NOT NULL;
"""
_OBSERVE_TRIGGERS = f"""
DROP TRIGGER IF EXISTS vm_metrics_insert;
DROP TRIGGER IF EXISTS vm_metrics_update;
DROP TRIGGER IF EXISTS vm_metrics_delete;
CREATE TRIGGER vm_metrics_insert AFTER INSERT ON objects WHEN NEW.kind = {_VM} BEGIN
    INSERT OR REPLACE INTO vm_metrics VALUES (NEW.namespace, NEW.name, {_VM_METRICS.format(body="NEW.body")});
END;
CREATE TRIGGER vm_metrics_update AFTER UPDATE ON objects WHEN NEW.kind = {_VM} BEGIN
    INSERT OR REPLACE INTO vm_metrics VALUES (NEW.namespace, NEW.name, {_VM_METRICS.format(body="NEW.body")});
END;
CREATE TRIGGER vm_metrics_delete AFTER DELETE ON objects WHEN OLD.kind = {_VM} BEGIN
    DELETE FROM vm_metrics WHERE namespace = OLD.namespace AND name = OLD.name;
END;
DELETE FROM vm_metrics;
INSERT INTO vm_metrics SELECT namespace, name, {_VM_METRICS.format(body="body")} FROM objects WHERE kind = {_VM};
DROP TRIGGER IF EXISTS quota_settings_insert;
DROP TRIGGER IF EXISTS quota_settings_update;
DROP TRIGGER IF EXISTS quota_settings_delete;
CREATE TRIGGER quota_settings_insert AFTER INSERT ON objects WHEN NEW.kind IN {_QUOTAS} BEGIN
    INSERT OR REPLACE INTO quota_settings VALUES (NEW.kind, NEW.namespace, NEW.name,
        {_QUOTA_SETTINGS.format(body="NEW.body")});
END;
CREATE TRIGGER quota_settings_update AFTER UPDATE ON objects WHEN NEW.kind IN {_QUOTAS} BEGIN
    INSERT OR REPLACE INTO quota_settings VALUES (NEW.kind, NEW.namespace, NEW.name,
        {_QUOTA_SETTINGS.format(body="NEW.body")});
END;
CREATE TRIGGER quota_settings_delete AFTER DELETE ON objects WHEN OLD.kind IN {_QUOTAS} BEGIN
    DELETE FROM quota_settings WHERE kind = OLD.kind AND namespace = OLD.namespace AND name = OLD.name;
END;
DELETE FROM quota_settings;
INSERT INTO quota_settings SELECT kind, namespace, name, {_QUOTA_SETTINGS.format(body="body")}
    FROM objects WHERE kind IN {_QUOTAS};
"""
# A file written before the change log has no history: watching is possible from its current revision on.
_CHANGES_START = """
INSERT OR IGNORE INTO counters(name, value)
    SELECT 'pruned', coalesce((SELECT value FROM counters WHERE name = 'rv'), 0);
"""
# Raise it when the scripts above change: opening an older file runs them again (vm_states is rebuilt, a
# quota's status moved out of its body, the change log starts, the observability indexes are filled).
SCHEMA_VERSION = 4

# The change log's window: the newest CHANGES_KEPT changes, pruned every PRUNE_CHANGES_EVERY (so between 10,000
# and 10,500 are kept). kube-apiserver's watch cache keeps 100 to 1,000 events per kind, and etcd keeps 5
# minutes; 10,000 changes is minutes of a busy server (a start writes 3 to 4: the VM, an event, its quotas),
# at most some tens of MB, and a watcher or pager away for longer lists again.
CHANGES_KEPT = 10_000
PRUNE_CHANGES_EVERY = 500
ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"

# A quota in audit mode says so in its status (`enforcement: audit`); one in the default mode shows no more.
_BODY = """CASE WHEN s.kind IS NULL THEN o.body
    ELSE json_set(o.body, '$.status', CASE WHEN q.mode = 'audit'
        THEN json_object('hard', json(s.hard), 'used', json(s.used), 'enforcement', 'audit')
        ELSE json_object('hard', json(s.hard), 'used', json(s.used)) END) END"""
_JOIN_STATUS = """FROM objects AS o LEFT JOIN quota_status AS s
        ON s.kind = o.kind AND s.namespace = o.namespace AND s.name = o.name
    LEFT JOIN quota_settings AS q ON q.kind = o.kind AND q.namespace = o.namespace AND q.name = o.name"""
_WITH_STATUS = f"{_BODY} {_JOIN_STATUS}"
# The objects of a kind as they were at resourceVersion :at, in key order after (:after_ns, :after_name):
# those not changed since are as they are; the others are the `previous` body of their first change after
# :at (none: the object did not exist then). The two parts never name the same object.
_UNCHANGED_SINCE = f"""SELECT o.namespace, o.name, {_BODY} {_JOIN_STATUS}
    WHERE o.kind = :kind AND o.rv <= :at AND (o.namespace, o.name) > (:after_ns, :after_name) {{namespace}}
    ORDER BY o.namespace, o.name"""
_CHANGED_SINCE = """SELECT namespace, name, previous FROM (
        SELECT namespace, name, previous, row_number() OVER (PARTITION BY namespace, name ORDER BY rv) AS n
        FROM changes WHERE rv > :at AND kind = :kind AND (namespace, name) > (:after_ns, :after_name) {namespace})
    WHERE n = 1 AND previous IS NOT NULL ORDER BY namespace, name"""
_COVERING = f"""
SELECT s.kind AS kind, s.namespace, s.name AS name, s.hard, s.used, q.threshold, q.mode FROM quota_status AS s
    LEFT JOIN quota_settings AS q ON q.kind = s.kind AND q.namespace = s.namespace AND q.name = s.name
    WHERE s.kind = '{objects.RESOURCE_QUOTA.kind}' AND s.namespace = :namespace
UNION ALL
SELECT s.kind, s.namespace, s.name, s.hard, s.used, q.threshold, q.mode FROM objects AS n JOIN quota_status AS s
    ON s.kind = '{objects.PROJECT.kind}' AND s.namespace = ''
    AND s.name = n.body->>'$.metadata.labels."{objects.PROJECT_LABEL}"'
    LEFT JOIN quota_settings AS q ON q.kind = s.kind AND q.namespace = '' AND q.name = s.name
    WHERE n.kind = '{objects.NAMESPACE.kind}' AND n.namespace = '' AND n.name = :namespace
ORDER BY kind DESC, name"""  # ResourceQuota sorts after Project: descending puts the project last

# A counter that every write of an RBAC object (or a namespace, whose deletion removes its Roles) raises, in the
# same transaction: each API process keeps its RBAC policy in memory and builds it again only when this moved.
# Made at every open (IF NOT EXISTS), so that it needs no schema version of its own.
RBAC_GENERATION = "rbac-generation"
_RBAC_KINDS = "(" + ", ".join(f"'{k.kind}'" for k in (*objects.RBAC_KINDS, objects.NAMESPACE)) + ")"
_RBAC_GENERATION_TRIGGERS = "".join(f"""
CREATE TRIGGER IF NOT EXISTS rbac_generation_{event.lower()} AFTER {event} ON objects
    WHEN {row}.kind IN {_RBAC_KINDS} BEGIN
    INSERT INTO counters(name, value) VALUES ('{RBAC_GENERATION}', 1)
        ON CONFLICT(name) DO UPDATE SET value = value + 1;
END;""" for event, row in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")))

# The hosts (issue 13): where each VM holding a runtime is placed, and what that reserves of the node (its
# requests: millicores and bytes, integers so that SQLite sums them exactly). A migrating VM has a second row, on
# its target. `node_allocated` is their sum per node, kept by triggers in the same transaction; the recount checks
# it. Host capacity only: quotas are charged in `charges`, never here. Made at every open (IF NOT EXISTS).
RUNS, MIGRATION_TARGET = "runs", "migration-target"  # a placement's role: where it runs, or is moving to
_HOSTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS placements (
    namespace TEXT NOT NULL, name TEXT NOT NULL, node TEXT NOT NULL, role TEXT NOT NULL,
    cpu_milli INTEGER NOT NULL, memory INTEGER NOT NULL,
    PRIMARY KEY (namespace, name, node)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS node_allocated (
    node TEXT PRIMARY KEY, cpu_milli INTEGER NOT NULL, memory INTEGER NOT NULL, vms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS node_allocated_insert AFTER INSERT ON placements BEGIN
    INSERT INTO node_allocated(node, cpu_milli, memory, vms) VALUES (NEW.node, NEW.cpu_milli, NEW.memory, 1)
        ON CONFLICT(node) DO UPDATE SET cpu_milli = cpu_milli + NEW.cpu_milli, memory = memory + NEW.memory,
                                        vms = vms + 1;
END;
CREATE TRIGGER IF NOT EXISTS node_allocated_delete AFTER DELETE ON placements BEGIN
    UPDATE node_allocated SET cpu_milli = cpu_milli - OLD.cpu_milli, memory = memory - OLD.memory, vms = vms - 1
        WHERE node = OLD.node;
END;
"""
# Raised by every committed change of a Node: placement reads the nodes' bodies again only when it moved.
NODE_GENERATION = "node_generation"
_NODE_GENERATION_TRIGGERS = "".join(f"""
CREATE TRIGGER IF NOT EXISTS node_generation_{event.lower()} AFTER {event} ON objects
    WHEN {row}.kind = 'Node' BEGIN
    INSERT INTO counters(name, value) VALUES ('{NODE_GENERATION}', 1)
        ON CONFLICT(name) DO UPDATE SET value = value + 1;
END;""" for event, row in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")))
# What placement reads of each Node, cut out by SQLite (a start reads all nodes: no Python parse of their bodies).
_NODE_CANDIDATES = """
SELECT o.name, coalesce(o.body->>'$.spec.unschedulable', 0), coalesce(json(o.body->'$.metadata.labels'), '{}'),
       coalesce(json(o.body->'$.spec.taints'), '[]'),
       o.body->>'$.status.allocatable.cpu', o.body->>'$.status.allocatable.memory',
       EXISTS (SELECT 1 FROM json_each(o.body, '$.status.conditions') AS c
               WHERE c.value->>'$.type' = 'Ready' AND c.value->>'$.status' = 'True'),
       coalesce(a.cpu_milli, 0), coalesce(a.memory, 0)
FROM objects AS o LEFT JOIN node_allocated AS a ON a.node = o.name
WHERE o.kind = 'Node' ORDER BY o.name"""


@dataclass(frozen=True)
class Where:
    """A condition on the stored bodies that SQLite evaluates, so a selected read never parses what it drops
    (the API server's label and field selectors become these).

    `path` leads from the body's root to a string (`("metadata", "labels", "app")`); `op` is one of:
        in       the value is present and one of `values`
        notin    the value is absent or none of `values`
        exists   the value is present
        absent   the value is absent
    A `default` stands for an absent value (a field selector compares a missing field as "").
    """
    path: tuple[str, ...]
    op: str
    values: tuple[str, ...] = ()
    default: str | None = None


@dataclass(frozen=True)
class Part:
    """A part of each body that `Reader.extract` cuts out in SQLite:

        Part(path)                     the scalar at `path` (text or number; a non-scalar as JSON text), or None
        Part(path, as_json=True)       the JSON text at `path` (the whole body for path ()), or None
        Part(path, item=(k, v, f))     of the array at `path`, field `f` of the first element whose `k` is `v`:
                                       `.status.conditions[?(@.type=='Ready')].status`
    metadata.name, metadata.namespace and metadata.resourceVersion are read from the key columns.
    """
    path: tuple[str, ...]
    as_json: bool = False
    item: tuple[str, str, str] | None = None

    BODY: ClassVar[Part]


Part.BODY = Part((), as_json=True)

EVENTS_KEPT_PER_NAMESPACE = 500
PRUNE_EVERY = 64  # a namespace's events are pruned after every this many of them, not on each one


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit reaches the disk before it returns, so what the API acknowledged (a VM created, a start
    # admitted) survives an OS crash or a power cut too, as etcd's writes do for Kubernetes. NORMAL would
    # only survive a killed process, for about 0.15 ms less per write transaction on this machine's disk.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def encode_resources(resources: dict[str, Decimal]) -> str:
    return json.dumps({k: str(v) for k, v in sorted(resources.items())}, separators=(",", ":"))


def decode_resources(text: str) -> dict[str, Decimal]:
    return {k: Decimal(v) for k, v in json.loads(text).items()}


@dataclass(frozen=True)
class Change:
    """One entry of the change log: what happened to one object at resourceVersion `rv`."""
    rv: int
    type: str  # ADDED, MODIFIED or DELETED
    kind: str
    namespace: str  # "" for a cluster-scoped object
    name: str
    body: str  # the object after the change as JSON text (for a DELETED: its last state, at `rv`)
    previous: str | None  # the object just before the change; None for an ADDED


class Reader:
    """Queries shared by read-only access and transactions."""

    def __init__(self, conn: sqlite3.Connection, kept: dict[str, _KeptTable] | None = None) -> None:
        self._conn = conn
        self._kept = kept or {}  # the kinds whose Table parts this process knows to be kept (`Store.keep`)

    def get(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        row = self._conn.execute(f"{_select(kind)} WHERE o.kind=? AND o.namespace=? AND o.name=?",
                                 (kind.kind, namespace, name)).fetchone()
        return json.loads(row[0]) if row else None

    def list(self, kind: Kind, namespace: str | None = None) -> list[Obj]:
        return [json.loads(body) for body in self.bodies(kind, namespace)]

    def bodies(self, kind: Kind, namespace: str | None = None, where: Sequence[Where] = ()) -> Iterator[str]:
        """The stored JSON text of every object of a kind (in one namespace, or all) that meets every `where`,
        in namespace and name order, streamed and never parsed."""
        rows: Iterator[Any]
        if namespace is None and not where:
            rows = self._conn.execute(f"{_select(kind)} WHERE o.kind=? ORDER BY o.namespace, o.name", (kind.kind,))
        elif not where:
            rows = self._conn.execute(f"{_select(kind)} WHERE o.kind=? AND o.namespace=? ORDER BY o.name",
                                      (kind.kind, namespace))
        else:
            rows = self._extract(kind, namespace, ("b",), where)
        for (body,) in rows:
            yield body

    def rbac_generation(self) -> int:
        """Raised by every committed change of an RBAC object or a namespace (a trigger keeps it)."""
        row = self._conn.execute("SELECT value FROM counters WHERE name=?", (RBAC_GENERATION,)).fetchone()
        return int(row[0]) if row else 0
    def extract(self, kind: Kind, namespace: str | None, parts: Sequence[Part],
                where: Sequence[Where] = ()) -> Iterator[tuple[Any, ...]]:
        """`parts` of every object of a kind that meets every `where`, cut out by SQLite, in namespace and name
        order: a table of 10,000 VMs needs a few fields of each, and parsing whole bodies in Python costs far
        more than listing them.

        SQLite parses a body once per JSON function that reads it, so the scalars are read by one
        json_extract of several paths (one parse, one small array to decode) and the name and namespace come
        from the key columns. A kind whose parts are kept (`Store.keep`) has them read from its side table
        instead, where its triggers wrote them with each body: no body is parsed at all.
        """
        kept = self._kept.get(kind.kind)
        read = kept.reading(parts) if kept is not None else None
        if read is not None:
            yield from read.rows(self._conn, namespace, where)
            return
        plan = _ExtractPlan(parts)
        for row in self._extract(kind, namespace, plan.columns, where):
            yield tuple(plan.split(row))

    def cut(self, texts: Sequence[str], parts: Sequence[Part]) -> Iterator[tuple[Any, ...]]:
        """`parts` of each of these JSON objects, in order, cut out by SQLite as `extract` does: a page of a
        list as it was at an older resourceVersion (`bodies_at`) has its bodies in hand, not in a table.
        One statement for them all: json_each walks their array, and each element is parsed again by the
        functions reading it, in C, which still costs far less than json.loads."""
        if not texts:
            return
        plan = _ExtractPlan(parts, key_columns=False)
        sql = f"SELECT {', '.join(plan.columns)} FROM (SELECT value AS b, key FROM json_each(?)) ORDER BY key"
        for row in self._conn.execute(sql, ("[" + ",".join(texts) + "]",)):
            yield tuple(plan.split(row))

    def _extract(self, kind: Kind, namespace: str | None, columns: Sequence[str],
                 where: Sequence[Where]) -> Iterator[tuple[Any, ...]]:
        select = ", ".join(column for column in columns)
        scope, scope_params = ("AND o.namespace=?", [namespace]) if namespace is not None else ("", [])
        conditions, condition_params = _where_sql(where)
        # The body as a reader sees it (a quota's status put back), named b, beside the key columns.
        keys = " AS b, o.namespace AS ns, o.name AS nm, o.rv AS rv FROM "
        body = _select(kind)[len("SELECT "):].replace(" FROM ", keys, 1)
        sql = f"SELECT {select} FROM (SELECT {body} WHERE o.kind=? {scope}) WHERE {conditions} ORDER BY ns, nm"
        yield from self._conn.execute(sql, [kind.kind, *scope_params, *condition_params])

    def revision(self) -> int:
        """The newest committed resourceVersion: lists report it, as Kubernetes does."""
        row = self._conn.execute("SELECT value FROM counters WHERE name='rv'").fetchone()
        return row[0] if row else 0

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one committed state (a list and its resourceVersion agree)."""
        self._conn.execute("BEGIN")
        try:
            yield
        finally:
            self._conn.execute("COMMIT")

    def pruned(self) -> int:
        """The resourceVersion at and below which the change log is gone: every change above it is kept."""
        row = self._conn.execute("SELECT value FROM counters WHERE name='pruned'").fetchone()
        return row[0] if row else 0

    def changes(self, after: int, *, until: int | None = None, kind: str | None = None,
                limit: int = 1000) -> builtins.list[Change]:
        """The logged changes with `after` < rv (<= `until`), of one kind or all, oldest first, at most `limit`
        of them (a batch ends at a resourceVersion: the next batch goes on from the last one's)."""
        rows = self._conn.execute(
            "SELECT rv, type, kind, namespace, name, body, previous FROM changes WHERE rv > ? AND rv <= ? "
            f"{'AND kind = ?' if kind else ''} ORDER BY rv LIMIT ?",
            (after, until if until is not None else 1 << 62, *([kind] if kind else []), limit))
        return [Change(*row) for row in rows]

    def bodies_at(self, kind: Kind, namespace: str | None, at: int, *,
                  after: tuple[str, str] = ("", "")) -> Iterator[tuple[str, str, str]]:
        """(namespace, name, JSON text) of every object of a kind (in one namespace, or all) as it was at
        resourceVersion `at`, in key order after the key `after`, streamed: one page of a consistent list.

        The caller holds a snapshot and has checked that `at` is within the change log (`pruned() <= at`).
        """
        params = {"kind": kind.kind, "at": at, "after_ns": after[0], "after_name": after[1], "ns": namespace}
        where = "" if namespace is None else "AND namespace = :ns"
        unchanged = self._conn.execute(_UNCHANGED_SINCE.format(namespace=where.replace("namespace", "o.namespace")),
                                       params)
        changed = self._conn.execute(_CHANGED_SINCE.format(namespace=where), params).fetchall()  # a window's worth
        yield from heapq.merge(unchanged, changed)

    def count_at(self, kind: Kind, namespace: str | None, at: int, *, after: tuple[str, str] = ("", "")) -> int:
        """How many objects `bodies_at` would give, without reading a body."""
        params = {"kind": kind.kind, "at": at, "after_ns": after[0], "after_name": after[1], "ns": namespace}
        where = "" if namespace is None else "AND namespace = :ns"
        unchanged = self._conn.execute(
            "SELECT COUNT(*) FROM objects WHERE kind = :kind AND rv <= :at AND (namespace, name) > (:after_ns, "
            f":after_name) {where}", params).fetchone()[0]
        changed = self._conn.execute(f"SELECT COUNT(*) FROM ({_CHANGED_SINCE.format(namespace=where)})",
                                     params).fetchone()[0]
        return int(unchanged) + int(changed)

    def vm_states(self) -> Iterator[tuple[str, str, str, str | None, int, str | None, int | None, str | None, int]]:
        """(namespace, name, uid, status.phase, deleting, spec.runStrategy, spec.running, status.lastExit,
        DataVolumesReady) of every VM, in namespace and name order, without reading a body.

        Flags are 0 or 1; a missing field is None (spec.running is 1 or 0 when set).
        """
        yield from self._conn.execute("SELECT namespace, name, uid, phase, deleting, run_strategy, running, last_exit, "
                                      "volumes_ready FROM vm_states ORDER BY namespace, name")

    def placements_of(self, namespace: str, name: str) -> builtins.list[tuple[str, str, int, int]]:
        """(node, role, cpu millicores, memory bytes) of each placement of a VM: one, or two while it migrates."""
        return self._conn.execute("SELECT node, role, cpu_milli, memory FROM placements WHERE namespace=? AND name=? "
                                  "ORDER BY role DESC", (namespace, name)).fetchall()

    def running_placements(self) -> dict[tuple[str, str], str]:
        """(namespace, name) -> the node each placed VM runs on."""
        rows = self._conn.execute("SELECT namespace, name, node FROM placements WHERE role = ?", (RUNS,)).fetchall()
        return {(namespace, name): node for namespace, name, node in rows}

    def node_generation(self) -> int:
        """Raised by every committed change of a Node (a trigger keeps it)."""
        row = self._conn.execute("SELECT value FROM counters WHERE name=?", (NODE_GENERATION,)).fetchone()
        return int(row[0]) if row else 0

    def node_allocated(self) -> dict[str, tuple[int, int]]:
        """node -> (cpu millicores, memory bytes) placed on it: its VMs' and its incoming migrations'."""
        return {node: (cpu, memory) for node, cpu, memory in
                self._conn.execute("SELECT node, cpu_milli, memory FROM node_allocated")}

    def vms_showing(self, printable_status: str) -> builtins.list[tuple[str, str]]:
        """(namespace, name) of every VM whose status.printableStatus is this (a scan: for a server's start)."""
        return self._conn.execute("SELECT namespace, name FROM objects WHERE kind = 'VirtualMachine' AND "
                                  "body->>'$.status.printableStatus' = ?", (printable_status,)).fetchall()

    def vms_on(self, node: str) -> builtins.list[tuple[str, str]]:
        """(namespace, name) of every VM that runs on `node`."""
        return self._conn.execute("SELECT namespace, name FROM placements WHERE node = ? AND role = ? "
                                  "ORDER BY namespace, name", (node, RUNS)).fetchall()

    def node_candidates(self) -> builtins.list[tuple[str, int, str, str, str | None, str | None, int, int, int]]:
        """Every Node as placement needs it: name, cordoned, labels and taints (JSON), allocatable cpu and
        memory (as written), Ready, and the cpu millicores and memory bytes placed on it."""
        return self._conn.execute(_NODE_CANDIDATES).fetchall()

    def placement_drift(self) -> builtins.list[tuple[str, int, int, int]]:
        """The nodes whose `node_allocated` differs from the sum of their placements: (node, cpu, memory, vms) as
        the sum says (normally none)."""
        return self._conn.execute("""
            SELECT s.node, s.cpu, s.memory, s.vms FROM
                (SELECT node, SUM(cpu_milli) AS cpu, SUM(memory) AS memory, COUNT(*) AS vms FROM placements
                 GROUP BY node) AS s LEFT JOIN node_allocated AS a ON a.node = s.node
            WHERE a.node IS NULL OR a.cpu_milli != s.cpu OR a.memory != s.memory OR a.vms != s.vms
            UNION ALL
            SELECT node, 0, 0, 0 FROM node_allocated WHERE vms != 0 AND node NOT IN (SELECT node FROM placements)
        """).fetchall()

    def exists(self, kind: Kind, namespace: str, name: str) -> bool:
        return self._conn.execute("SELECT 1 FROM objects WHERE kind=? AND namespace=? AND name=?",
                                  (kind.kind, namespace, name)).fetchone() is not None

    def names(self, kind: Kind, namespace: str | None = None) -> builtins.list[tuple[str, str]]:
        """(namespace, name) of every object of a kind, without reading bodies."""
        if namespace is None:
            rows = self._conn.execute("SELECT namespace, name FROM objects WHERE kind=? ORDER BY namespace, name",
                                      (kind.kind,))
        else:
            rows = self._conn.execute("SELECT namespace, name FROM objects WHERE kind=? AND namespace=? "
                                      "ORDER BY name", (kind.kind, namespace))
        return [(ns, name) for ns, name in rows]

    def charge(self, namespace: str, name: str) -> dict[str, Decimal] | None:
        row = self._conn.execute("SELECT resources FROM charges WHERE namespace=? AND name=?",
                                 (namespace, name)).fetchone()
        return decode_resources(row[0]) if row else None

    def charges(self, namespace: str | None = None) -> Iterator[tuple[str, str, dict[str, Decimal]]]:
        """(namespace, name, charge) of every charged VM, streamed."""
        if namespace is None:
            rows = self._conn.execute("SELECT namespace, name, resources FROM charges")
        else:
            rows = self._conn.execute("SELECT namespace, name, resources FROM charges WHERE namespace=?",
                                      (namespace,))
        for ns, name, text in rows:
            yield ns, name, decode_resources(text)

    def covering_statuses(self, namespace: str) -> builtins.list[tuple[str, str, str, str, str, str | None,
                                                                       str | None]]:
        """(kind, namespace, name, hard, used, warning threshold, enforcement mode) of every quota a charge in
        `namespace` counts against: its ResourceQuotas in name order, then its project's (named by the
        namespace's label), if it has one.

        One statement, reading no object but the namespace: admission runs it on every start and stop.
        """
        return self._conn.execute(_COVERING, {"namespace": namespace}).fetchall()

    def quota_status(self, kind: Kind, namespace: str, name: str) -> tuple[str, str] | None:
        """(hard, used) of one quota or project, as JSON text."""
        row = self._conn.execute("SELECT hard, used FROM quota_status WHERE kind=? AND namespace=? AND name=?",
                                 (kind.kind, namespace, name)).fetchone()
        return (row[0], row[1]) if row else None

    def quota_statuses(self) -> dict[tuple[str, str, str], tuple[str, str]]:
        """(hard, used) of every quota and project, by (kind, namespace, name)."""
        rows = self._conn.execute("SELECT kind, namespace, name, hard, used FROM quota_status")
        return {(kind, ns, name): (hard, used) for kind, ns, name, hard, used in rows}

    def charge_groups(self) -> Iterator[tuple[str, dict[str, Decimal], int]]:
        """(namespace, charge, how many VMs of the namespace charge exactly that), grouped by SQLite.

        VMs come in few sizes, so a recount decodes a few charges per namespace instead of one per VM.
        """
        rows = self._conn.execute("SELECT namespace, resources, COUNT(*) FROM charges GROUP BY namespace, resources")
        for ns, text, count in rows:
            yield ns, decode_resources(text), count

    # -- observability: what /metrics and the usage history read ---------------------------------------------

    def quota_rows(self) -> builtins.list[tuple[str, str, str, int | None, str, str, str | None, str | None]]:
        """(kind, namespace, name, creation time, hard, used, warning threshold, mode) of every quota and project,
        from the small tables and one field of each body."""
        return self._conn.execute(
            "SELECT o.kind, o.namespace, o.name, unixepoch(o.body->>'$.metadata.creationTimestamp'), s.hard, "
            "s.used, q.threshold, q.mode FROM objects AS o JOIN quota_status AS s ON s.kind = o.kind "
            "AND s.namespace = o.namespace AND s.name = o.name LEFT JOIN quota_settings AS q ON q.kind = o.kind "
            f"AND q.namespace = o.namespace AND q.name = o.name WHERE o.kind IN {_QUOTAS} "
            "ORDER BY o.kind, o.namespace, o.name").fetchall()

    def vm_metric_values(self, columns: tuple[str, ...]) -> dict[str, set[str]]:
        """The distinct values (as text) of some `vm_metrics` columns, in one pass: few, as VMs come in few
        sizes."""
        listed = ", ".join(f"CAST({c} AS TEXT)" for c in columns)
        found: dict[str, set[str]] = {c: set() for c in columns}
        for row in self._conn.execute(f"SELECT DISTINCT {listed} FROM vm_metrics"):
            for column, value in zip(columns, row, strict=True):
                if value is not None:
                    found[column].add(value)
        return found

    def vm_metric_text(self, select: str, params: dict[str, str]) -> str:
        """One text made by SQLite of the `line` column of `select` (a SELECT over `vm_metrics AS v`).

        At 100,000 VMs /metrics writes half a million lines; built in Python they took most of a second.
        """
        row = self._conn.execute(f"SELECT coalesce(group_concat(line, ''), '') FROM ({select})", params).fetchone()
        return str(row[0])

    def refusal_totals(self) -> builtins.list[tuple[str, str, str, str, int]]:
        """(namespace, quota, resource, mode, count) summed over every day kept."""
        return self._conn.execute("SELECT namespace, quota, resource, mode, SUM(count) FROM refusals "
                                  "GROUP BY namespace, quota, resource, mode ORDER BY 1, 2, 3, 4").fetchall()

    def refusals_by_day(self, quota: str, namespace: str | None) -> builtins.list[tuple[str, str, str, int]]:
        """(day, resource, mode, count) of one quota (its display name), in one namespace or all."""
        if namespace is None:
            rows = self._conn.execute("SELECT day, resource, mode, SUM(count) FROM refusals WHERE quota=? "
                                      "GROUP BY day, resource, mode ORDER BY 1, 2, 3", (quota,))
        else:
            rows = self._conn.execute("SELECT day, resource, mode, count FROM refusals WHERE quota=? AND namespace=? "
                                      "ORDER BY 1, 2, 3", (quota, namespace))
        return rows.fetchall()

    def usage_points(self, kind: str, namespace: str, name: str) -> builtins.list[tuple[int, float, str, str]]:
        """(id, at, hard, used) of one quota's changes not rolled up yet, oldest first."""
        return self._conn.execute("SELECT id, at, hard, used FROM usage_points WHERE kind=? AND namespace=? AND name=? "
                                  "ORDER BY id", (kind, namespace, name)).fetchall()

    def usage_rollups(self, kind: str, namespace: str, name: str, resolution: int,
                      since: int = 0) -> builtins.list[tuple[int, str, str, str, str]]:
        """(bucket, hard, last, peak, at_limit) of one quota at one resolution from `since`, oldest first."""
        return self._conn.execute("SELECT bucket, hard, last, peak, at_limit FROM usage_rollup WHERE kind=? AND "
                                  "namespace=? AND name=? AND resolution=? AND bucket >= ? ORDER BY bucket",
                                  (kind, namespace, name, resolution, since)).fetchall()

    def quotas_with_points_before(self, cutoff: float) -> builtins.list[tuple[str, str, str]]:
        return self._conn.execute("SELECT DISTINCT kind, namespace, name FROM usage_points WHERE at < ?",
                                  (cutoff,)).fetchall()

    def quotas_with_rollups_before(self, resolution: int, bucket: int) -> builtins.list[tuple[str, str, str]]:
        return self._conn.execute("SELECT DISTINCT kind, namespace, name FROM usage_rollup WHERE resolution=? "
                                  "AND bucket < ?", (resolution, bucket)).fetchall()


class Transaction(Reader):
    """Writes inside one SQLite transaction; only `Store.transaction()` makes these."""

    def __init__(self, conn: sqlite3.Connection, store: Store) -> None:
        super().__init__(conn, store.kept)
        self._store = store

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once this transaction has committed (never if it rolls back).

        Work queued for other threads must wait for the commit, or they would read the old state.
        """
        self._store._after_commit.append(callback)

    def _next_rv(self) -> int:
        """A new resourceVersion; the first of a transaction arranges for the feeds to hear of its commit."""
        self._store._rv += 1
        if not self._store._logged:
            self._store._logged = True
            self.after_commit(self._store._notify_changed)
        return self._store._rv

    def _version_for(self, key: tuple[str, str, str]) -> tuple[int, bool]:
        """The resourceVersion a write of the object `key` gives it, and whether this transaction wrote it
        already (then it keeps the version it got, and its one log entry shows its final state)."""
        written = self._store._written.get(key)
        if written is not None:
            return written, True
        rv = self._store._written[key] = self._next_rv()
        return rv, False

    def _log(self, rv: int, key: tuple[str, str, str], *, change: str, body: str | None, previous: str | None,
             again: bool) -> None:
        """Append the change at `rv`, or, when this transaction logged the object already (`again`), make that
        entry show its new state. `body` None: the object's stored body as readers see it (status put back)."""
        if body is None:
            body = self._conn.execute(f"SELECT {_WITH_STATUS} WHERE o.kind=? AND o.namespace=? AND o.name=?",
                                      key).fetchone()[0]
        if again:
            self._conn.execute("UPDATE changes SET body=? WHERE rv=?", (body, rv))
        else:
            self._conn.execute("INSERT INTO changes(rv, type, kind, namespace, name, body, previous) "
                               "VALUES (?,?,?,?,?,?,?)", (rv, change, *key, body, previous))

    def _stored_text(self, kind: str, namespace: str, name: str) -> str | None:
        """An object's JSON text as readers see it (status put back), not parsed."""
        row = self._conn.execute(f"SELECT {_WITH_STATUS} WHERE o.kind=? AND o.namespace=? AND o.name=?",
                                 (kind, namespace, name)).fetchone()
        return row[0] if row else None

    def create(self, kind: Kind, obj: Obj) -> Obj:
        """Insert a new object, filling resourceVersion, creationTimestamp and the uid (unless vmquota chose it)."""
        metadata = obj.setdefault("metadata", {})
        namespace = metadata.get("namespace", "") if kind.namespaced else ""
        name = metadata["name"]
        key = (kind.kind, namespace, name)
        if key in self._store._written:  # written in this transaction, so it exists
            raise errors.AlreadyExists(f'{kind.resource} "{name}" already exists')
        rv = self._next_rv()
        metadata["uid"] = metadata.get("uid") or objects.new_uid()  # the API drops a uid a user sent
        metadata["creationTimestamp"] = objects.now()
        metadata["resourceVersion"] = str(rv)
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        body = _stored_body(kind, obj)
        try:  # the primary key refuses a second object of the name: no SELECT first (every start writes an event)
            self._conn.execute("INSERT INTO objects(kind, namespace, name, uid, rv, body) VALUES (?,?,?,?,?,?)",
                               (kind.kind, namespace, name, metadata["uid"], rv, body))
        except sqlite3.IntegrityError as e:
            self._store._rv -= 1  # handed back: nothing was written at it
            if "UNIQUE" not in str(e):
                raise
            raise errors.AlreadyExists(f'{kind.resource} "{name}" already exists') from None
        self._store._written[key] = rv
        # A quota's status comes right after (accounting.refresh) and updates this entry with it.
        self._log(rv, key, change=ADDED, body=None if kind.kind in STATUS_APART else body, previous=None,
                  again=False)
        if kind is objects.EVENT:
            self._prune_events(namespace)
        return obj

    def update(self, kind: Kind, obj: Obj) -> Obj:
        """Write a changed object back with a new resourceVersion; uid and creation stay."""
        metadata = obj["metadata"]
        namespace = metadata.get("namespace", "") if kind.namespaced else ""
        key = (kind.kind, namespace, metadata["name"])
        again = key in self._store._written
        previous = None if again else self._stored_text(*key)
        if not again and previous is None:
            raise errors.NotFound(f'{kind.resource} "{metadata["name"]}" not found')
        rv, _ = self._version_for(key)
        metadata["resourceVersion"] = str(rv)
        body = _stored_body(kind, obj)
        self._conn.execute("UPDATE objects SET rv=?, body=? WHERE kind=? AND namespace=? AND name=?", (rv, body, *key))
        self._log(rv, key, change=MODIFIED, body=None if kind.kind in STATUS_APART else body, previous=previous,
                  again=again)
        return obj

    def delete(self, kind: Kind, namespace: str, name: str) -> None:
        """Remove an object; its DELETED entry shows its last state, at the deletion's own resourceVersion."""
        key = (kind.kind, namespace, name)
        last = self._stored_text(*key)
        if last is None:
            return
        self._store._written.pop(key, None)  # a deletion is a change of its own, after any earlier one
        rv = self._next_rv()
        self._conn.execute("DELETE FROM objects WHERE kind=? AND namespace=? AND name=?", key)
        self._conn.execute("INSERT INTO changes(rv, type, kind, namespace, name, body, previous) "
                           "VALUES (?, ?, ?, ?, ?, json_set(?, '$.metadata.resourceVersion', ?), ?)",
                           (rv, DELETED, *key, last, str(rv), last))

    def _status_changed(self, kind: Kind, namespace: str, name: str, previous: str | None) -> None:
        """A quota's or project's status changed: the object gets a new resourceVersion and a MODIFIED entry
        (or, written already in this transaction, its entry shows the new status)."""
        key = (kind.kind, namespace, name)
        if previous is None and key not in self._store._written:
            return  # no such object (its status row outlived it only inside a deletion)
        rv, again = self._version_for(key)
        if not again:
            self._conn.execute("UPDATE objects SET rv=?, body=json_set(body, '$.metadata.resourceVersion', ?) "
                               "WHERE kind=? AND namespace=? AND name=?", (rv, str(rv), *key))
        self._log(rv, key, change=MODIFIED, body=None, previous=previous, again=again)

    def place(self, namespace: str, name: str, node: str, role: str, cpu_milli: int, memory: int) -> None:
        """Reserve on `node` what the VM needs (replacing its placement there, if any)."""
        self.unplace(namespace, name, node)
        self._conn.execute("INSERT INTO placements(namespace, name, node, role, cpu_milli, memory) "
                           "VALUES (?,?,?,?,?,?)", (namespace, name, node, role, cpu_milli, memory))

    def unplace(self, namespace: str, name: str, node: str | None = None) -> None:
        """Release the VM's reservation on `node` (every node when None)."""
        if node is None:
            self._conn.execute("DELETE FROM placements WHERE namespace=? AND name=?", (namespace, name))
        else:
            self._conn.execute("DELETE FROM placements WHERE namespace=? AND name=? AND node=?",
                               (namespace, name, node))

    def correct_node_allocated(self, node: str, cpu_milli: int, memory: int, vms: int) -> None:
        self._conn.execute("INSERT OR REPLACE INTO node_allocated(node, cpu_milli, memory, vms) VALUES (?,?,?,?)",
                           (node, cpu_milli, memory, vms))

    def set_charge(self, namespace: str, name: str, resources: dict[str, Decimal] | None) -> None:
        if resources is None:
            self._conn.execute("DELETE FROM charges WHERE namespace=? AND name=?", (namespace, name))
        else:
            self._conn.execute("INSERT OR REPLACE INTO charges(namespace, name, resources) VALUES (?,?,?)",
                               (namespace, name, encode_resources(resources)))

    def set_quota_status(self, kind: Kind, namespace: str, name: str, hard: str, used: str) -> None:
        """Store a quota's or project's status.hard and status.used (JSON text); a change of them is a change of
        the object (a new resourceVersion, a MODIFIED entry), and rewriting the same status changes nothing."""
        if self.quota_status(kind, namespace, name) == (hard, used):
            return
        previous = self._previous_for_status(kind, namespace, name)
        self._conn.execute("INSERT OR REPLACE INTO quota_status(kind, namespace, name, hard, used) VALUES (?,?,?,?,?)",
                           (kind.kind, namespace, name, hard, used))
        self._status_changed(kind, namespace, name, previous)

    def set_quota_used(self, kind: Kind, namespace: str, name: str, used: str) -> None:
        previous = self._previous_for_status(kind, namespace, name)
        self._conn.execute("UPDATE quota_status SET used=? WHERE kind=? AND namespace=? AND name=?",
                           (used, kind.kind, namespace, name))
        self._status_changed(kind, namespace, name, previous)

    def _previous_for_status(self, kind: Kind, namespace: str, name: str) -> str | None:
        """What a status change's log entry needs of the object before it: nothing when this transaction has
        logged the object already (its entry keeps the state before the transaction)."""
        if (kind.kind, namespace, name) in self._store._written:
            return None
        return self._stored_text(kind.kind, namespace, name)

    # -- observability -----------------------------------------------------------------------------------

    def add_usage_point(self, kind: Kind, namespace: str, name: str, at: float, hard: str, used: str) -> None:
        """One change of a quota's status, in the transaction that made it (`accounting.py` is the one caller)."""
        self._conn.execute("INSERT INTO usage_points(kind, namespace, name, at, hard, used) VALUES (?,?,?,?,?,?)",
                           (kind.kind, namespace, name, at, hard, used))

    def count_refusal(self, day: str, namespace: str, quota: str, resource: str, mode: str) -> None:
        self._conn.execute("INSERT INTO refusals(day, namespace, quota, resource, mode, count) VALUES (?,?,?,?,?,1) "
                           "ON CONFLICT DO UPDATE SET count = count + 1", (day, namespace, quota, resource, mode))

    def delete_usage_points(self, ids: builtins.list[int]) -> None:
        self._conn.executemany("DELETE FROM usage_points WHERE id=?", [(i,) for i in ids])

    def put_rollup(self, kind: str, namespace: str, name: str, resolution: int, bucket: int, hard: str, last: str,
                   peak: str, at_limit: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO usage_rollup VALUES (?,?,?,?,?,?,?,?,?)",
                           (kind, namespace, name, resolution, bucket, hard, last, peak, at_limit))

    def delete_rollups_before(self, kind: str, namespace: str, name: str, resolution: int, bucket: int) -> None:
        self._conn.execute("DELETE FROM usage_rollup WHERE kind=? AND namespace=? AND name=? AND resolution=? "
                           "AND bucket < ?", (kind, namespace, name, resolution, bucket))

    def forget_refusals_before(self, day: str) -> None:
        self._conn.execute("DELETE FROM refusals WHERE day < ?", (day,))

    def _prune_events(self, namespace: str) -> None:
        written = self._store._events_unpruned.get(namespace, 0) + 1
        if written < PRUNE_EVERY:
            self._store._events_unpruned[namespace] = written
            return
        self._store._events_unpruned[namespace] = 0
        old = self._conn.execute(
            "SELECT name FROM objects WHERE kind='Event' AND namespace=? AND rv <= "
            "(SELECT rv FROM objects WHERE kind='Event' AND namespace=? ORDER BY rv DESC LIMIT 1 OFFSET ?)",
            (namespace, namespace, EVENTS_KEPT_PER_NAMESPACE)).fetchall()
        for (name,) in old:  # one by one: each is a deletion a watcher of events sees
            self.delete(objects.EVENT, namespace, name)


def _owner_only(path: Path) -> None:
    """The database and its WAL files readable by their owner only (SQLite gives the WAL files the database's
    mode): under the data dir QEMU's unprivileged user may traverse, every tenant's objects must stay private."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(part.stat().st_mode) & 0o077:
                part.chmod(0o600)


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Held from BEGIN to COMMIT by the process writing now: other processes wait in the kernel, where
        # SQLite's own busy wait would sleep in steps of milliseconds.
        self.lock_path = path.with_name(path.name + "-lock")
        self._process_lock = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _owner_only(path)
        self._writer = _connect(path)
        self._writer.executescript(_SCHEMA + _OBSERVE_SCHEMA)
        if self._writer.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            self._writer.executescript(f"BEGIN IMMEDIATE; {_VM_STATE_TRIGGERS} {_QUOTA_STATUS_TRIGGER} "
                                       f"{_OBSERVE_TRIGGERS} {_CHANGES_START} "
                                       f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        self._writer.executescript(f"BEGIN IMMEDIATE; {_RBAC_GENERATION_TRIGGERS} {_HOSTS_SCHEMA} "
                                     f"{_NODE_GENERATION_TRIGGERS} COMMIT;")
        self._rv = 0  # the resourceVersion counter, read from the file when a group begins
        self._writer.execute("INSERT OR IGNORE INTO settings(name, value) VALUES ('instance', ?)",
                             (objects.new_uid(),))
        # Marks this installation's domains: two vmquota servers on one host never touch each other's.
        self.instance_id: str = self._writer.execute(
            "SELECT value FROM settings WHERE name='instance'").fetchone()[0]
        self._local = threading.local()
        self._owner: int | None = None  # the thread in a transaction now
        self._depth = 0
        self._after_commit: list[Callable[[], None]] = []
        # Events written per namespace since it was last pruned. Kept in memory: after a restart a namespace
        # holds at most PRUNE_EVERY more events until its next prune; a rolled-back event only prunes early.
        self._events_unpruned: dict[str, int] = {}
        self._group: _Group | None = None  # the SQLite transaction that ended transactions wait to commit
        # Of the transaction running now: the objects it wrote (and still exist) with the resourceVersion each
        # got, and whether it changed anything (then the change listeners hear of its commit).
        self._written: dict[tuple[str, str, str], int] = {}
        self._logged = False
        self.change_listeners: list[Callable[[], None]] = []  # called after every commit that changed objects
        self.changes_kept, self.prune_every = CHANGES_KEPT, PRUNE_CHANGES_EVERY  # tests shrink the window
        self._waiting = 0  # threads waiting for the write lock: the group stays open for them
        self._waiting_lock = threading.Lock()
        self.kept: dict[str, _KeptTable] = {}  # kind -> its side table of kept parts (`keep`)

    def keep(self, kind: Kind, parts: Sequence[Part]) -> None:
        """Keep `parts` of every object of `kind` in a side table of their own, written by triggers in the same
        transaction as each body, so that `extract` of those parts (a Table's: its printer's fields and the
        metadata) reads them instead of parsing every body: a first `kubectl get` of 10,000 VMs then reads no
        more than a plain list. Every process of a server calls it at its start with the same parts; the first
        one to find the table missing, or made for other parts, (re)builds it from the bodies."""
        table = _KeptTable(kind, parts)
        with self._lock:
            if self._group is not None:
                raise RuntimeError("keep() is for a store's opening, before its first transaction")
            fcntl.flock(self._process_lock, fcntl.LOCK_EX)
            try:
                self._writer.execute("BEGIN IMMEDIATE")
                try:
                    made = self._writer.execute("SELECT value FROM settings WHERE name=?", (table.setting,)).fetchone()
                    if made is None or made[0] != table.signature:
                        for statement in table.statements():
                            self._writer.execute(statement)
                        self._writer.execute("INSERT OR REPLACE INTO settings(name, value) VALUES (?, ?)",
                                             (table.setting, table.signature))
                    self._writer.execute("COMMIT")
                except BaseException:
                    self._writer.execute("ROLLBACK")
                    raise
            finally:
                fcntl.flock(self._process_lock, fcntl.LOCK_UN)
        self.kept[kind.kind] = table

    @contextlib.contextmanager
    def transaction(self, *, dry_run: bool = False) -> Iterator[Transaction]:
        """One atomic unit of writes under the process-wide write lock; nested calls join the outer one.

        Group commit: a transaction that ends while others wait for the lock leaves SQLite's transaction
        open, as a released savepoint, and the last of the group commits them all with one fsync. Each
        still returns only once its writes are on the disk, and a failed one undoes only its own writes.
        Under concurrent writers that saves an fsync (0.15 ms here, under the lock) per transaction.

        `dry_run`: everything inside runs (every read, check and write sees the writes before it), then it is
        undone as a failed one is, even when it succeeds: no row, no resourceVersion, no after_commit callback
        and no event prune survive it. Kubernetes' `dryRun=All`. Only an outermost transaction can be one.
        """
        if dry_run and self._owner == threading.get_ident():
            raise RuntimeError("a dry run cannot join a transaction that will commit")
        if self._owner == threading.get_ident():  # nested: part of this thread's open transaction
            self._depth += 1
            try:
                yield Transaction(self._writer, self)
            finally:
                self._depth -= 1
            return
        with self._waiting_lock:
            self._waiting += 1
        with self._lock:
            with self._waiting_lock:
                self._waiting -= 1
            if self._group is None:
                self._group = self._begin_group()
            group, rv_before = self._group, self._rv
            unpruned_before = dict(self._events_unpruned) if dry_run else None
            self._owner, self._depth = threading.get_ident(), 1
            self._written, self._logged = {}, False
            try:
                self._writer.execute("SAVEPOINT txn")
                yield Transaction(self._writer, self)
                if dry_run:
                    raise _DryRunEnds
                self._writer.execute("RELEASE txn")
            except BaseException as e:
                try:
                    self._writer.execute("ROLLBACK TO txn")
                    self._writer.execute("RELEASE txn")
                except sqlite3.Error:
                    pass  # SQLite rolled the whole group back itself (a full disk): its commit fails for all
                self._rv = rv_before
                self._after_commit.clear()
                if unpruned_before is not None:
                    self._events_unpruned = unpruned_before
                self._written, self._logged = {}, False
                self._end_turn()
                if not isinstance(e, _DryRunEnds):
                    raise
                callbacks: list[Callable[[], None]] = []
            else:
                callbacks, self._after_commit = self._after_commit, []
                self._written, self._logged = {}, False
                self._end_turn()
        group.committed.wait()
        if group.error is not None:
            raise errors.StoreError(group.error)
        for callback in callbacks:
            callback()

    def _end_turn(self) -> None:
        """Give up the write lock (the caller holds it); commit the group unless another writer will join it."""
        self._owner, self._depth = None, 0
        with self._waiting_lock:
            others = self._waiting
        if not others:
            self._commit_group()

    def _begin_group(self) -> _Group:
        """Take the lock between processes and open SQLite's transaction (the caller holds the thread lock)."""
        fcntl.flock(self._process_lock, fcntl.LOCK_EX)
        try:
            self._writer.execute("BEGIN IMMEDIATE")
            self._rv = Reader(self._writer).revision()  # another process may have written since
        except BaseException:  # nothing is open and nobody waits
            if self._writer.in_transaction:
                self._writer.execute("ROLLBACK")
            fcntl.flock(self._process_lock, fcntl.LOCK_UN)
            raise
        return _Group(self._rv)

    def _commit_group(self) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        try:
            if self._rv != group.rv_before:
                self._writer.execute("INSERT OR REPLACE INTO counters(name, value) VALUES ('rv', ?)", (self._rv,))
                if self._rv // self.prune_every != group.rv_before // self.prune_every:
                    self._prune_changes()
            self._writer.execute("COMMIT")
        except sqlite3.Error as e:
            if self._writer.in_transaction:
                self._writer.execute("ROLLBACK")
            self._rv = group.rv_before
            group.error = f"the store could not commit: {e}"
        finally:
            fcntl.flock(self._process_lock, fcntl.LOCK_UN)
        group.committed.set()

    def _prune_changes(self) -> None:
        """Drop the change log's entries older than its window (the caller holds the write lock). The log has
        no gaps, so keeping everything above `rv - changes_kept` keeps exactly that many."""
        below = self._rv - self.changes_kept
        if below > Reader(self._writer).pruned():
            self._writer.execute("DELETE FROM changes WHERE rv <= ?", (below,))
            self._writer.execute("INSERT OR REPLACE INTO counters(name, value) VALUES ('pruned', ?)", (below,))

    def _notify_changed(self) -> None:
        for listener in self.change_listeners:
            listener()

    @property
    def revision(self) -> int:
        """The newest committed resourceVersion."""
        return self.reader().revision()

    def reader(self) -> Reader:
        """A read-only view on this thread's own connection: never blocks on writers."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._local.conn = conn
        return Reader(conn, self.kept)

    @contextlib.contextmanager
    def own_reader(self) -> Iterator[Reader]:
        """A read-only view on a connection of its own, closed at the end: for a thread that reads once and
        then lives long without reading (a watch), which should not keep a connection open all that time."""
        conn = _connect(self.path)
        try:
            yield Reader(conn, self.kept)
        finally:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._commit_group()
            self._writer.close()
            os.close(self._process_lock)


class _DryRunEnds(Exception):
    """Ends a dry run's transaction through the rollback path, so that undoing it is the failure's code."""


class _Group:
    """Transactions that share one SQLite commit (one fsync); each waits for it before it returns."""

    def __init__(self, rv_before: int) -> None:
        self.rv_before = rv_before
        self.committed = threading.Event()
        self.error: str | None = None  # why the commit failed


def _select(kind: Kind) -> str:
    """The start of a SELECT of a kind's bodies (from `objects AS o`), with a status kept apart put back."""
    return f"SELECT {_WITH_STATUS}" if kind.kind in STATUS_APART else "SELECT o.body FROM objects AS o"


def _json_path(path: Sequence[str]) -> str:
    # Keys are quoted: label keys hold dots and slashes. Callers pass checked keys only (no quote in them).
    return "$" + "".join(f'."{step}"' for step in path)


class _ExtractPlan:
    """The SQL columns that cut `parts` out of each body, and how a result row becomes one value per part.

    `split` runs once per object of a list, so what it does per part is worked out here, once: each part is
    an index into the row's columns followed by json_extract's values; an `item` part is then picked out.
    """

    def __init__(self, parts: Sequence[Part], *, key_columns: bool = True) -> None:
        self.columns: list[str] = []
        self._keys = _KEY_COLUMNS if key_columns else {}
        scalars = [p for p in parts if not p.as_json and p.path not in self._keys]
        self._many = len(scalars) > 1
        for part in parts:
            if part.as_json or part.path in self._keys:
                self.columns.append(self._sql(part))
        direct = len(self.columns)
        self._index = [self._column_of(part, direct, scalars) for part in parts]
        self._decoded = [i for i, part in enumerate(parts) if part in scalars and self._many and part.item is None]
        self._items = [(i, part.item, not self._many) for i, part in enumerate(parts) if part.item is not None]
        if scalars:
            # One parse for them all; with one path json_extract gives the value itself, not an array.
            paths = ", ".join(_sql_text(_json_path(p.path)) for p in scalars)
            self.columns.append(f"json_extract(b, {paths})" if self._many else f"b ->> {paths}")
        self._has_scalars = bool(scalars)

    def _sql(self, part: Part) -> str:
        return "b" if part == Part.BODY else self._keys.get(part.path) or f"b -> {_sql_text(_json_path(part.path))}"

    def _column_of(self, part: Part, direct: int, scalars: list[Part]) -> int:
        return direct + scalars.index(part) if part in scalars else self.columns.index(self._sql(part))

    def split(self, row: tuple[Any, ...]) -> list[Any]:
        if self._has_scalars:
            flat = [*row[:-1], *(_DECODER.raw_decode(row[-1])[0] if self._many else (row[-1],))]
        else:
            flat = list(row)
        values = [flat[i] for i in self._index]
        for i in self._decoded:
            value = values[i]
            if value is not None and type(value) is not str:
                values[i] = _as_sql_scalar(value)
        for i, item, encoded in self._items:
            values[i] = _pick(values[i], item, encoded=encoded)
        return values


class _KeptTable:
    """A side table `kept_<kind>` holding some parts of every object of one kind, and the triggers that write
    it with each body (`Store.keep`): what `extract` then reads for those parts instead of parsing bodies.

    A row is (namespace, name, scalars, json_0, ...): `scalars` is one small JSON array of the scalar and item
    parts, as `_ExtractPlan.split` gives them (an item picked out in SQL at write time), and each JSON part has
    a text column of its own, handed on as it is (a Table row's metadata is never parsed). The key columns and
    the body itself (`Part.BODY`) come from `objects`, joined by primary key when asked for or selected on.
    A quota's or a project's status is not in its body (`STATUS_APART`): those kinds are not kept.
    """

    def __init__(self, kind: Kind, parts: Sequence[Part]) -> None:
        if kind.kind in STATUS_APART or not kind.kind.isalpha():
            raise ValueError(f"the parts of {kind.kind} cannot be kept")
        self.kind = kind.kind
        self.name = f"kept_{kind.kind.lower()}"
        self.setting = f"kept:{kind.kind}"
        unique = list(dict.fromkeys(p for p in parts if p != Part.BODY and p.path not in _KEY_COLUMNS))
        self.scalars = [p for p in unique if not p.as_json]
        self.texts = [p for p in unique if p.as_json]
        self.signature = "\n".join(self.statements())

    def _values_sql(self, body: str) -> str:
        scalars = ", ".join(_kept_scalar_sql(part, body) for part in self.scalars)
        texts = "".join(f", {body} -> {_sql_text(_json_path(part.path))}" for part in self.texts)
        return f"json_array({scalars}){texts}"

    def statements(self) -> list[str]:
        """The SQL that (re)makes the table and its triggers, and fills it from the bodies stored now."""
        columns = "".join(f", json_{i} TEXT" for i in range(len(self.texts)))
        kind = _sql_text(self.kind)
        write = f"INSERT OR REPLACE INTO {self.name} VALUES (NEW.namespace, NEW.name, {self._values_sql('NEW.body')})"
        return [
            *(f"DROP TRIGGER IF EXISTS {self.name}_{event}" for event in ("insert", "update", "delete")),
            f"DROP TABLE IF EXISTS {self.name}",
            f"CREATE TABLE {self.name} (namespace TEXT NOT NULL, name TEXT NOT NULL, scalars TEXT NOT NULL{columns}, "
            "PRIMARY KEY (namespace, name)) WITHOUT ROWID",
            f"CREATE TRIGGER {self.name}_insert AFTER INSERT ON objects WHEN NEW.kind = {kind} BEGIN {write}; END",
            f"CREATE TRIGGER {self.name}_update AFTER UPDATE ON objects WHEN NEW.kind = {kind} BEGIN {write}; END",
            f"CREATE TRIGGER {self.name}_delete AFTER DELETE ON objects WHEN OLD.kind = {kind} BEGIN "
            f"DELETE FROM {self.name} WHERE namespace = OLD.namespace AND name = OLD.name; END",
            f"INSERT INTO {self.name} SELECT namespace, name, {self._values_sql('body')} FROM objects "
            f"WHERE kind = {kind}",
        ]

    def reading(self, parts: Sequence[Part]) -> _KeptRead | None:
        """How to read `parts` from this table, or None when one of them is not kept."""
        if any(p != Part.BODY and p.path not in _KEY_COLUMNS and p not in self.scalars and p not in self.texts
               for p in parts):
            return None
        return _KeptRead(self, parts)


class _KeptRead:
    """One `extract` of kept parts: its SQL, and how a row becomes one value per part (as `_ExtractPlan`'s)."""

    def __init__(self, table: _KeptTable, parts: Sequence[Part]) -> None:
        self._table = table
        texts = [p for p in dict.fromkeys(parts) if p in table.texts]
        keys = [p for p in dict.fromkeys(parts) if p.path in _KEY_COLUMNS or p == Part.BODY]
        # The row: scalars, the JSON parts asked for, then the key columns and the body asked for.
        self.columns = ["k.scalars", *(f"k.json_{table.texts.index(p)}" for p in texts),
                        *("b" if p == Part.BODY else _KEPT_KEY_COLUMNS[p.path] for p in keys)]
        direct = [*texts, *keys]
        # Each part's place in [*row[1:], *decoded scalars].
        self._index = [direct.index(p) if p in direct else len(direct) + table.scalars.index(p) for p in parts]
        # The name and namespace are the side table's keys too; the body and resourceVersion are in `objects`.
        self._joined = any(p == Part.BODY or p.path == ("metadata", "resourceVersion") for p in keys)

    def rows(self, conn: sqlite3.Connection, namespace: str | None,
             where: Sequence[Where]) -> Iterator[tuple[Any, ...]]:
        table, select = self._table.name, ", ".join(self.columns)
        if not where and not self._joined:
            scope, params = ("WHERE k.namespace = ?", [namespace]) if namespace is not None else ("", [])
            sql = f"SELECT {select} FROM {table} AS k {scope} ORDER BY k.namespace, k.name"
        else:
            conditions, condition_params = _where_sql(where)
            scope, params = ("AND o.namespace = ?", [namespace]) if namespace is not None else ("", [])
            sql = (f"SELECT {select} FROM (SELECT o.body AS b, o.namespace AS ns, o.name AS nm, o.rv AS rv "
                   f"FROM objects AS o WHERE o.kind = ? {scope}) JOIN {table} AS k ON k.namespace = ns AND "
                   f"k.name = nm WHERE {conditions} ORDER BY ns, nm")
            params = [self._table.kind, *params, *condition_params]
        index, decode = self._index, _DECODER.raw_decode
        for row in conn.execute(sql, params):
            flat = [*row[1:], *decode(row[0])[0]]
            yield tuple([flat[i] for i in index])


def _kept_scalar_sql(part: Part, body: str) -> str:
    """SQL for one scalar or item part of `body`, valued as `_ExtractPlan.split` values it: `->>`'s value (a
    boolean as 1 or 0, an object or array as its JSON text); for an item, the wanted field of the first
    object element that matches, or NULL (also when the path holds no array)."""
    path = _sql_text(_json_path(part.path))
    if part.item is None:
        return f"{body} ->> {path}"
    key, wanted, field = part.item
    return (f"(SELECT CASE WHEN e.type = 'object' THEN e.value ->> {_sql_text(_json_path((field,)))} END "
            f"FROM json_each({body}, {path}) AS e WHERE json_type({body}, {path}) = 'array' AND e.type = 'object' "
            f"AND CASE WHEN e.type = 'object' THEN e.value ->> {_sql_text(_json_path((key,)))} END = "
            f"{_sql_text(wanted)} ORDER BY e.id LIMIT 1)")


def _pick(value: Any, item: tuple[str, str, str], *, encoded: bool) -> Any:
    """Field `item[2]` of the first element of the array `value` whose `item[0]` is `item[1]`, as `->>` gives
    a value; None when there is none."""
    key, wanted, field = item
    if encoded and isinstance(value, str):
        value = json.loads(value)
    for element in value if isinstance(value, list) else ():
        if isinstance(element, dict) and element.get(key) == wanted:
            return _as_sql_scalar(element.get(field))
    return None


_DECODER = json.JSONDecoder()


# What the key columns hold, read without parsing a body.
_KEY_COLUMNS: dict[tuple[str, ...], str] = {("metadata", "name"): "nm", ("metadata", "namespace"): "ns",
                                            ("metadata", "resourceVersion"): "CAST(rv AS TEXT)"}
_KEPT_KEY_COLUMNS = {**_KEY_COLUMNS, ("metadata", "name"): "k.name", ("metadata", "namespace"): "k.namespace"}


def _as_sql_scalar(value: Any) -> Any:
    if value is None or type(value) is str:  # nearly every value: the fast way out
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return value


def _sql_text(text: str) -> str:
    """A checked JSON path as an SQL string literal (paths hold no quote: callers pass checked keys only)."""
    assert "'" not in text, text
    return f"'{text}'"


def _where_sql(where: Sequence[Where]) -> tuple[str, list[str]]:
    """`where` as one SQL condition on `b` (the body), `ns` and `nm`, and its parameters."""
    clauses, params = ["1"], []
    for condition in where:
        value, value_params = _value_sql(condition)
        marks = ", ".join("?" * len(condition.values))
        if condition.op == "in":
            clauses.append(f"{value} IN ({marks})")
            params += [*value_params, *condition.values]
        elif condition.op == "notin":
            clauses.append(f"({value} IS NULL OR {value} NOT IN ({marks}))")
            params += [*value_params, *value_params, *condition.values]
        elif condition.op in ("exists", "absent"):
            clauses.append(f"{value} IS {'NOT ' if condition.op == 'exists' else ''}NULL")
            params += value_params
        else:
            raise ValueError(f"unknown condition {condition.op!r}")
    return " AND ".join(clauses), params


def _value_sql(condition: Where) -> tuple[str, list[str]]:
    params: list[str]
    if condition.path == ("metadata", "name"):
        value, params = "nm", []  # the key columns, so that a name or a namespace is found by the primary key
    elif condition.path == ("metadata", "namespace"):
        value, params = "ns", []
    else:
        value, params = "(b ->> ?)", [_json_path(condition.path)]
    if condition.default is not None:
        return f"coalesce({value}, ?)", [*params, condition.default]
    return value, params


def _stored_body(kind: Kind, obj: Obj) -> str:
    if kind.kind in STATUS_APART:
        obj = {key: value for key, value in obj.items() if key != "status"}
    return dumps(obj)


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
