"""PATCH bodies: which patch types a kind takes, and how each one changes an object.

Pure. `handlers.py` asks `patch_type` for the request's Content-Type and `change` for the function that makes
the new object from the stored one; `api.Api.update_with` runs it inside the write's transaction. Server-side
apply (`application/apply-patch+yaml`) is no function of the stored object alone: `api.Api.apply` and
`fieldmanager.py` do it.

- JSON merge patch (RFC 7386): `objects.merge_patch`.
- JSON patch (RFC 6902): the `jsonpatch` library, a well-kept implementation of the RFC (tests, pointers,
  escapes), where a hand-made one would only differ in its bugs.
- Strategic merge patch, Kubernetes' own, for its built-in kinds only (Namespace, ResourceQuota, Event): a
  merge patch whose lists merge by the strategy of their field (`LIST_STRATEGIES`), with the directives
  kubectl sends: `$patch: replace|delete|merge`, `$retainKeys`, `$setElementOrder/<list>` and
  `$deleteFromPrimitiveList/<list>`. kube-apiserver refuses it for custom resources with 415, and so does
  vmquota for its other kinds (VirtualMachine, Project, VirtualMachineClone): kubectl sends them merge
  patches, as it does to KubeVirt.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import jsonpatch

from vmquota import errors, objects
from vmquota.apiserver import bodies
from vmquota.objects import Kind, Obj

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

BUILTIN_KINDS = frozenset({objects.NAMESPACE.kind, objects.RESOURCE_QUOTA.kind, objects.EVENT.kind, objects.NODE.kind})

# How the lists of the built-in kinds merge, as their Go types' patchStrategy tags say; every other list is
# atomic (the patch's list replaces the stored one). ("merge", None): a set of primitives; ("merge", key):
# objects merged by `key`.
LIST_STRATEGIES: dict[tuple[str, ...], tuple[str, str | None]] = {
    ("metadata", "finalizers"): ("merge", None),
    ("metadata", "ownerReferences"): ("merge", "uid"),
    ("status", "conditions"): ("merge", "type"),
}

Change = Callable[[Obj], Any]


def accepted(kind: Kind) -> list[str]:
    """The patch types `kind` takes, in kube-apiserver's order."""
    if kind.kind in BUILTIN_KINDS:
        return [JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH, APPLY_PATCH]
    return [JSON_PATCH, MERGE_PATCH, APPLY_PATCH]


def patch_type(kind: Kind, content_type: str) -> str:
    """The patch type of a Content-Type; 415 for one `kind` does not take. No Content-Type, or plain JSON, is a
    merge patch, as vmquota's PATCH always took."""
    media = content_type.split(";")[0].strip().lower()
    if media in ("", "application/json"):
        return MERGE_PATCH
    if media not in accepted(kind):
        raise errors.UnsupportedMediaType(accepted(kind))
    return media


def change(kind: Kind, media: str, raw: bytes) -> Change:
    """The function that makes the patched object from the stored one, for a patch body of type `media`."""
    document = _decode(raw)
    if media == JSON_PATCH:
        return _json_patch(document)
    if not isinstance(document, dict):
        raise errors.BadRequest(f"the patch must be a JSON object, not {type(document).__name__}")
    if media == STRATEGIC_MERGE_PATCH:
        return lambda current: strategic_merge(current, document)
    return lambda current: objects.merge_patch(current, document)


def _decode(raw: bytes) -> Any:
    document = bodies.parse_body(raw, "application/json")  # the limits of every other body
    if document is None:
        raise errors.BadRequest("the patch is empty")
    return document


def _json_patch(document: Any) -> Change:
    if not isinstance(document, list) or not all(isinstance(op, dict) for op in document):
        raise errors.BadRequest("a JSON patch must be a list of operations")
    try:
        ops = jsonpatch.JsonPatch(document)  # checks each operation's name and path; values when applied
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as e:
        raise errors.BadRequest(f"the JSON patch is not valid: {e}") from e

    def apply(current: Obj) -> Any:
        try:
            return ops.apply(current)
        except jsonpatch.InvalidJsonPatch as e:
            raise errors.BadRequest(f"the JSON patch is not valid: {e}") from e
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError,
                IndexError) as e:
            # Kubernetes' answer to a patch that does not fit the object (a failed test, a missing path).
            raise errors.Invalid(f"the JSON patch could not be applied: {e}") from e

    return apply


# -- strategic merge patch ----------------------------------------------------------------------------

_DIRECTIVE = "$patch"
_RETAIN_KEYS = "$retainKeys"
_ORDER = "$setElementOrder/"
_DELETE_PRIMITIVES = "$deleteFromPrimitiveList/"


class _Deleted:
    """What a `$patch: delete` map becomes: its key goes."""


_DELETED = _Deleted()


def strategic_merge(current: Obj, patch: Obj) -> Obj:
    result = _merge_map(current, patch, ())
    if not isinstance(result, dict):
        raise errors.BadRequest("$patch: delete cannot delete the whole object")
    return result


def _merge_map(original: Any, patch: dict[str, Any], path: tuple[str, ...]) -> Any:
    patch = dict(patch)
    directive = patch.pop(_DIRECTIVE, None)
    if directive == "delete":
        return _DELETED
    if directive == "replace":
        return _clean(patch)
    if directive not in (None, "merge"):
        raise errors.BadRequest(f"{_where(path)}: unknown $patch directive {json.dumps(directive)[:60]}")
    result: dict[str, Any] = copy.deepcopy(original) if isinstance(original, dict) else {}
    retain = patch.pop(_RETAIN_KEYS, None)
    if retain is not None:
        if not isinstance(retain, list) or not all(isinstance(key, str) for key in retain):
            raise errors.BadRequest(f"{_where(path)}: $retainKeys must be a list of field names")
        unknown = sorted(key for key in patch if not key.startswith("$") and key not in retain)
        if unknown:
            raise errors.BadRequest(f"{_where(path)}: $retainKeys does not name {unknown[0]}, which the patch sets")
        result = {key: value for key, value in result.items() if key in retain}
    orders: dict[str, list[Any]] = {}
    for key in [k for k in patch if k.startswith((_ORDER, _DELETE_PRIMITIVES))]:
        value = patch.pop(key)
        name = key.split("/", 1)[1]
        if not isinstance(value, list):
            raise errors.BadRequest(f"{_where((*path, name))}: {key.split('/')[0]} must be a list")
        if key.startswith(_ORDER):
            orders[name] = value
        elif isinstance(result.get(name), list):
            result[name] = [item for item in result[name] if item not in value]
    for key, value in patch.items():
        if key.startswith("$"):
            raise errors.BadRequest(f"{_where(path)}: unknown directive {key[:60]}")
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            merged = _merge_map(result.get(key), value, (*path, key))
            if isinstance(merged, _Deleted):
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            result[key] = _merge_list(result.get(key), value, (*path, key))
        else:
            result[key] = value
    for name, order in orders.items():
        if isinstance(result.get(name), list):
            result[name] = _ordered(result[name], order, LIST_STRATEGIES.get((*path, name), ("", None))[1])
    return result


def _merge_list(original: Any, patch: list[Any], path: tuple[str, ...]) -> list[Any]:
    strategy, key = LIST_STRATEGIES.get(path, ("replace", None))
    if any(isinstance(item, dict) and item.get(_DIRECTIVE) == "replace" for item in patch):
        return [_clean(item) for item in patch if not (isinstance(item, dict) and _DIRECTIVE in item)]
    if strategy != "merge" or not isinstance(original, list):
        return [_clean(item) if isinstance(item, dict) else item for item in patch]
    result = copy.deepcopy(original)
    if key is None:
        return result + [item for item in patch if item not in result]
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise errors.BadRequest(f"{_where(path)}: every item must have its merge key {key}")
        index = next((i for i, old in enumerate(result) if isinstance(old, dict) and old.get(key) == item[key]),
                     None)
        if item.get(_DIRECTIVE) == "delete":
            if index is not None:
                del result[index]
        elif index is None:
            result.append(_clean(item))
        else:
            result[index] = _merge_map(result[index], item, path)
    return result


def _ordered(items: list[Any], order: list[Any], key: str | None) -> list[Any]:
    """`items` in the order `$setElementOrder` gives; items it does not name keep their place after those."""
    def identity(item: Any) -> Any:
        return item.get(key) if key is not None and isinstance(item, dict) else item
    wanted = [identity(item) for item in order]
    rank = {json.dumps(value, sort_keys=True): i for i, value in enumerate(wanted)}
    named = [item for item in items if json.dumps(identity(item), sort_keys=True) in rank]
    named.sort(key=lambda item: rank[json.dumps(identity(item), sort_keys=True)])
    return named + [item for item in items if json.dumps(identity(item), sort_keys=True) not in rank]


def _clean(value: Any) -> Any:
    """A patch's value with its directives gone, as it is stored."""
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items() if not key.startswith("$")}
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return value


def _where(path: tuple[str, ...]) -> str:
    return ".".join(path) or "the patch"
