"""Who set which field: `metadata.managedFields`, and server-side apply built on it, as Kubernetes does.

Bottom layer, pure: objects in, objects and managedFields out; the clock is passed in. `api.py` calls
`record_update` on every write that is not an apply (create, PUT, and the JSON, merge and strategic merge
patches) and `apply` for `application/apply-patch+yaml`; it stores what they return.

A field set is a set of paths (tuples of keys). Lists are atomic, as the brief's kinds need: a list is one
field, owned and compared whole. A map's own path is in the set beside its keys (Kubernetes' `.: {}`), so that
a map a manager applied empty stays owned. Fields the server owns (apiVersion, kind, name, namespace, uid,
resourceVersion, creationTimestamp, generation, managedFields, status) are never in a set, as in Kubernetes'
structured-merge-diff ("StripMeta" and the reset status).

Conflicts are Kubernetes' too: an apply that changes a field another manager owns is refused, naming each
field and manager, unless forced; a forced apply takes those fields over. An Update always takes what it changed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vmquota import errors
from vmquota.objects import Obj

FieldPath = tuple[str, ...]

APPLY, UPDATE = "Apply", "Update"
MAX_MANAGER_LENGTH = 128
# The fields every object has that the server sets: never anyone's (structured-merge-diff's StripMeta).
_SERVER_METADATA = frozenset({"name", "namespace", "uid", "resourceVersion", "creationTimestamp", "generation",
                              "selfLink", "managedFields", "deletionTimestamp", "deletionGracePeriodSeconds"})
_SERVER_TOP = frozenset({"apiVersion", "kind", "status"})
# Struct fields of the built-in kinds: Kubernetes records no `.` for a struct, only for maps and for the
# objects of a custom resource's schema (which are all vmquota's other kinds know).
_BUILTIN_STRUCTS = frozenset({("spec",), ("spec", "scopeSelector")})
_BUILTIN_KINDS = frozenset({"Namespace", "ResourceQuota", "Event", "Node"})
_MISSING = object()


@dataclass(frozen=True)
class Conflict:
    """A field an apply would change that `entry` (one managedFields entry) owns."""
    entry: dict[str, Any]
    path: FieldPath

    @property
    def manager(self) -> str:
        """The manager as Kubernetes prints it: quoted, with the apiVersion and time of an Update."""
        text = json.dumps(self.entry.get("manager", ""))
        if self.entry.get("operation") == UPDATE:
            text += f" using {self.entry.get('apiVersion', '')}"
            if self.entry.get("time"):
                text += f" at {self.entry['time']}"
        return text

    @property
    def field(self) -> str:
        return "".join(f".{key}" for key in self.path)


def conflict_error(conflicts: list[Conflict]) -> errors.ApplyConflict:
    """Kubernetes' 409 for conflicts, with the message and `details.causes` that kubectl prints."""
    causes = [{"type": "FieldManagerConflict", "message": f"conflict with {c.manager}", "field": c.field}
              for c in conflicts]
    if len(conflicts) == 1:
        message = f"Apply failed with 1 conflict: conflict with {conflicts[0].manager}: {conflicts[0].field}"
    else:
        lines: list[str] = []
        for manager in sorted({c.manager for c in conflicts}):
            lines.append(f"conflicts with {manager}:")
            lines += [f"- {c.field}" for c in conflicts if c.manager == manager]
        message = f"Apply failed with {len(conflicts)} conflicts: " + "\n".join(lines)
    return errors.ApplyConflict(message, causes=causes)


def manager_from_user_agent(user_agent: str | None) -> str:
    """Kubernetes' default manager for a write that names none: the User-Agent up to its first `/`."""
    return (user_agent or "").split("/")[0][:MAX_MANAGER_LENGTH]


def check_manager(manager: str) -> None:
    if len(manager) > MAX_MANAGER_LENGTH or not manager.isprintable():
        raise errors.Invalid(f"fieldManager: Invalid value: {json.dumps(manager[:80])}: must be at most "
                             f"{MAX_MANAGER_LENGTH} printable characters")


# -- field sets ---------------------------------------------------------------------------------------


def field_set(obj: Obj) -> set[FieldPath]:
    """Every field `obj` sets that a manager can own."""
    builtin = obj.get("kind") in _BUILTIN_KINDS
    paths: set[FieldPath] = set()

    def walk(value: Any, path: FieldPath) -> None:
        if isinstance(value, dict) and (value or not path):
            if path and not (builtin and path in _BUILTIN_STRUCTS):
                paths.add(path)
            for key, item in value.items():
                walk(item, (*path, key))
        else:
            paths.add(path)

    for key, value in obj.items():
        if key in _SERVER_TOP:
            continue
        if key == "metadata" and isinstance(value, dict):
            for meta_key, meta_value in value.items():
                if meta_key not in _SERVER_METADATA:
                    walk(meta_value, ("metadata", meta_key))
        else:
            walk(value, (key,))
    return paths


def to_fields_v1(paths: Iterable[FieldPath]) -> dict[str, Any]:
    """A field set in Kubernetes' FieldsV1 form: `{"f:spec": {"f:hard": {".": {}, "f:cpu": {}}}}`."""
    tree: dict[str, Any] = {}
    for path in sorted(paths):
        node = tree
        for key in path:
            node = node.setdefault(f"f:{key}", {})
        if node is not tree:
            node.setdefault(".", {})
    return _drop_lone_dots(tree)


def _drop_lone_dots(node: dict[str, Any]) -> dict[str, Any]:
    """`.` only marks a node that also has children; a leaf is `{}`."""
    children = {key: _drop_lone_dots(value) for key, value in node.items() if key != "."}
    if "." in node and children:
        return {".": {}, **children}
    return children


def from_fields_v1(tree: Any, prefix: FieldPath = ()) -> set[FieldPath]:
    """A FieldsV1 tree back to paths. A list element's key (`k:`, `v:`, `i:`), which Kubernetes writes for
    lists it merges, stands here for the whole list: lists are atomic in vmquota."""
    if not isinstance(tree, dict):
        raise errors.BadRequest("metadata.managedFields: fieldsV1 must be an object")
    paths: set[FieldPath] = set()
    if (not tree or "." in tree) and prefix:
        paths.add(prefix)
    for key, value in tree.items():
        if key == ".":
            continue
        if key[:2] in ("k:", "v:", "i:"):
            paths.add(prefix)
        elif key.startswith("f:"):
            paths |= from_fields_v1(value, (*prefix, key[2:]))
        else:
            raise errors.BadRequest(f"metadata.managedFields: fieldsV1: unknown key {key[:40]!r}")
    return paths


def value_at(obj: Any, path: FieldPath) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


def _remove_at(obj: Obj, path: FieldPath) -> None:
    parent = value_at(obj, path[:-1])
    if isinstance(parent, dict):
        parent.pop(path[-1], None)


def changed_fields(old: Obj | None, new: Obj) -> set[FieldPath]:
    """The fields of `new` that `old` does not have with the same value (a map counts if it is new)."""
    before = field_set(old) if old is not None else set()
    return {path for path in field_set(new)
            if path not in before or (not isinstance(value_at(new, path), dict)
                                      and value_at(new, path) != value_at(old, path))}


# -- managedFields entries ----------------------------------------------------------------------------


def entries(obj: Obj | None) -> list[dict[str, Any]]:
    """The managedFields of `obj`, each checked to be an entry."""
    managed = ((obj or {}).get("metadata") or {}).get("managedFields") or []
    if not isinstance(managed, list) or not all(isinstance(e, dict) for e in managed):
        raise errors.BadRequest("metadata.managedFields must be a list of entries")
    return managed


def _entry_paths(entry: dict[str, Any]) -> set[FieldPath]:
    return from_fields_v1(entry.get("fieldsV1") or {})


def _same_owner(entry: dict[str, Any], manager: str, operation: str, api_version: str) -> bool:
    """Kubernetes keeps one Apply entry per manager, and one Update entry per manager and apiVersion."""
    if entry.get("manager") != manager or entry.get("operation") != operation:
        return False
    return operation == APPLY or entry.get("apiVersion") == api_version


def _rebuild(managed: list[tuple[dict[str, Any], set[FieldPath]]], present: Obj) -> list[dict[str, Any]]:
    """Entries with their field sets pruned to what `present` still has; empty ones dropped; Kubernetes'
    order (Apply before Update, then oldest first, then by manager)."""
    still = field_set(present)
    result = []
    for entry, paths in managed:
        kept = paths & still
        if kept:
            result.append({**entry, "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(kept)})
    result.sort(key=lambda e: (e.get("operation", ""), e.get("time", ""), e.get("manager", ""),
                               e.get("apiVersion", "")))
    return result


def record_update(old: Obj | None, new: Obj, *, manager: str, api_version: str, now: str) -> list[dict[str, Any]]:
    """The managedFields after a write that is no apply: `manager` owns what it changed, nobody else does.

    Returns the old entries untouched (same times) when nothing changed.
    """
    changed = changed_fields(old, new)
    gone = (field_set(old) if old is not None else set()) - field_set(new)
    managed = entries(old)
    if not changed and not gone:
        return managed
    parsed = [(dict(entry), _entry_paths(entry) - changed) for entry in managed]
    mine = next((item for item in parsed if _same_owner(item[0], manager, UPDATE, api_version)), None)
    if changed:
        if mine is None:
            mine = ({"manager": manager, "operation": UPDATE, "apiVersion": api_version}, set())
            parsed.append(mine)
        mine[1].update(changed)
        mine[0]["time"] = now
    return _rebuild(parsed, new)


@dataclass(frozen=True)
class Applied:
    obj: Obj  # the object after the apply, managedFields included
    changed: bool  # False: the apply changed nothing, not even who owns what; write nothing


def apply(live: Obj | None, config: Obj, *, manager: str, api_version: str, force: bool, now: str) -> Applied:
    """Server-side apply of `config` by `manager` onto `live` (None: it does not exist yet)."""
    applied = field_set(config)
    base: Obj = copy.deepcopy(live) if live is not None else {}
    base.get("metadata", {}).pop("managedFields", None)
    merged = _merge(base, {k: v for k, v in config.items() if k != "status"})
    parsed = [(dict(entry), _entry_paths(entry)) for entry in entries(live)]
    mine = next((item for item in parsed if _same_owner(item[0], manager, APPLY, api_version)), None)
    others = [item for item in parsed if item is not mine]

    conflicts = [Conflict(entry, path) for path in sorted(applied) for entry, paths in others
                 if path in paths and not isinstance(value_at(config, path), dict)
                 and value_at(config, path) != value_at(live, path)]
    if conflicts and not force:
        raise conflict_error(conflicts)
    for conflict in conflicts:
        next(paths for entry, paths in others if entry is conflict.entry).discard(conflict.path)

    # What this manager applied before and applies no more goes, unless another manager owns it too.
    owned_by_others = set().union(*(paths for _, paths in others))
    dropped = (mine[1] if mine else set()) - applied - owned_by_others
    for path in sorted(dropped, key=len, reverse=True):
        value = value_at(merged, path)
        if not isinstance(value, dict) or not value:
            _remove_at(merged, path)

    entry = {"manager": manager, "operation": APPLY, "apiVersion": api_version, "time": now}
    managed = _rebuild([*others, (entry, applied)], merged)
    before = entries(live)
    if live is not None and _without_managed(merged) == _without_managed(live) and \
            _ownership(managed) == _ownership(before):
        return Applied(copy.deepcopy(live), changed=False)
    merged.setdefault("metadata", {})["managedFields"] = managed
    return Applied(merged, changed=True)


def _merge(live: Any, config: Any) -> Any:
    """`config` over `live`: maps merge key by key, anything else (lists too: atomic) replaces."""
    if not isinstance(config, dict) or not isinstance(live, dict):
        return copy.deepcopy(config)
    result = dict(live)
    for key, value in config.items():
        result[key] = _merge(live.get(key), value)
    return result


def _without_managed(obj: Obj) -> Obj:
    clean = copy.deepcopy(obj)
    clean.get("metadata", {}).pop("managedFields", None)
    clean.get("metadata", {}).pop("resourceVersion", None)
    return clean


def _ownership(managed: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Who owns what, without the times: a time alone never makes a change."""
    return sorted((e.get("manager"), e.get("operation"), e.get("apiVersion"), json.dumps(e.get("fieldsV1"),
                                                                                         sort_keys=True))
                  for e in managed)
