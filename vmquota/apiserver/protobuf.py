"""Kubernetes' protobuf request bodies (`application/vnd.kubernetes.protobuf`) to plain JSON values.

Pure. kubectl 1.32 sends protobuf, with no fallback to JSON, for the built-in kinds it makes itself
(`kubectl create namespace`, `kubectl create quota`). A body is the magic `k8s\\0` and a `runtime.Unknown`
envelope: its TypeMeta (apiVersion, kind) and the object's own bytes. `decode` returns the object as its
JSON form would be, for `handlers.py` to treat it as any other body.

The decoder is table-driven: `MESSAGES` gives each message's fields as Kubernetes' generated.proto numbers
them, and `KINDS` names the top message of each kind served this way; adding a kind is adding its table. A
small wire-format reader is used rather than the `protobuf` package: that one needs classes generated from
Kubernetes' .proto files (their code, and a build step), while what vmquota needs is only the JSON shape of
a few messages, which a table says directly. Anything that is no well-formed message of the table (a
truncated varint, a length past the end, a wrong wire type, an unknown kind) is a 400, never a 500.
Unknown field numbers are skipped, as protobuf readers do.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from vmquota import errors
from vmquota.apiserver import bodies

MEDIA_TYPE = "application/vnd.kubernetes.protobuf"
MAGIC = b"k8s\x00"
MAX_NESTING = 32

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# A field: (JSON name, type). Types: "string", "bytes" (base64 in JSON), "int", "bool", "time" (metav1.Time),
# "quantity", "json" (bytes holding JSON: FieldsV1), a message name; "[]T" is repeated T; "map:T" a map of
# string to T. The envelope (runtime.Unknown: 1 typeMeta, 2 raw, 3 contentEncoding) is read in `decode`.
Field = tuple[str, str]
MESSAGES: dict[str, dict[int, Field]] = {
    "TypeMeta": {1: ("apiVersion", "string"), 2: ("kind", "string")},
    "ObjectMeta": {1: ("name", "string"), 2: ("generateName", "string"), 3: ("namespace", "string"),
                   4: ("selfLink", "string"), 5: ("uid", "string"), 6: ("resourceVersion", "string"),
                   7: ("generation", "int"), 8: ("creationTimestamp", "time"), 9: ("deletionTimestamp", "time"),
                   10: ("deletionGracePeriodSeconds", "int"), 11: ("labels", "map:string"),
                   12: ("annotations", "map:string"), 13: ("ownerReferences", "[]OwnerReference"),
                   14: ("finalizers", "[]string"), 17: ("managedFields", "[]ManagedFieldsEntry")},
    "OwnerReference": {1: ("kind", "string"), 3: ("name", "string"), 4: ("uid", "string"),
                       5: ("apiVersion", "string"), 6: ("controller", "bool"), 7: ("blockOwnerDeletion", "bool")},
    "ManagedFieldsEntry": {1: ("manager", "string"), 2: ("operation", "string"), 3: ("apiVersion", "string"),
                           4: ("time", "time"), 6: ("fieldsType", "string"), 7: ("fieldsV1", "FieldsV1"),
                           8: ("subresource", "string")},
    "FieldsV1": {1: ("Raw", "json")},
    "Namespace": {1: ("metadata", "ObjectMeta"), 2: ("spec", "NamespaceSpec"), 3: ("status", "NamespaceStatus")},
    "NamespaceSpec": {1: ("finalizers", "[]string")},
    "NamespaceStatus": {1: ("phase", "string")},
    "ResourceQuota": {1: ("metadata", "ObjectMeta"), 2: ("spec", "ResourceQuotaSpec"),
                      3: ("status", "ResourceQuotaStatus")},
    "ResourceQuotaSpec": {1: ("hard", "map:quantity"), 2: ("scopes", "[]string"),
                          3: ("scopeSelector", "ScopeSelector")},
    "ResourceQuotaStatus": {1: ("hard", "map:quantity"), 2: ("used", "map:quantity")},
    "ScopeSelector": {1: ("matchExpressions", "[]ScopedResourceSelectorRequirement")},
    "ScopedResourceSelectorRequirement": {1: ("scopeName", "string"), 2: ("operator", "string"),
                                          3: ("values", "[]string")},
    "Quantity": {1: ("string", "string")},
    # authorization.k8s.io/v1, what `kubectl auth can-i` sends; served with the tenancy issue's authorization.
    "SelfSubjectAccessReview": {1: ("metadata", "ObjectMeta"), 2: ("spec", "SelfSubjectAccessReviewSpec")},
    "SelfSubjectAccessReviewSpec": {1: ("resourceAttributes", "ResourceAttributes"),
                                    2: ("nonResourceAttributes", "NonResourceAttributes")},
    "ResourceAttributes": {1: ("namespace", "string"), 2: ("verb", "string"), 3: ("group", "string"),
                           4: ("version", "string"), 5: ("resource", "string"), 6: ("subresource", "string"),
                           7: ("name", "string")},
    "NonResourceAttributes": {1: ("path", "string"), 2: ("verb", "string")},
}
# (apiVersion, kind) of each kind decoded from protobuf, to its top message.
KINDS: dict[tuple[str, str], str] = {
    ("v1", "Namespace"): "Namespace",
    ("v1", "ResourceQuota"): "ResourceQuota",
    ("authorization.k8s.io/v1", "SelfSubjectAccessReview"): "SelfSubjectAccessReview",
}


def takes(api_version: str, kind: str) -> bool:
    return (api_version, kind) in KINDS


def decode(raw: bytes) -> dict[str, Any]:
    """A protobuf body as the JSON object it stands for (apiVersion and kind included)."""
    if not raw.startswith(MAGIC):
        raise errors.BadRequest("the protobuf body does not start with Kubernetes' magic number k8s\\0")
    type_meta: dict[str, Any] = {}
    inner, encoding = b"", ""
    for number, wire, value in _fields(raw[len(MAGIC):]):  # runtime.Unknown
        if number == 1:
            type_meta = _value(value, wire, "TypeMeta", 0, "typeMeta")
        elif number == 2:
            inner = _value(value, wire, "raw", 0, "raw")
        elif number == 3:
            encoding = _value(value, wire, "string", 0, "contentEncoding")
    if encoding:
        raise errors.BadRequest(f"protobuf bodies with contentEncoding {encoding[:40]!r} are not supported")
    api_version, kind = type_meta.get("apiVersion", ""), type_meta.get("kind", "")
    top = KINDS.get((api_version, kind))
    if top is None:
        raise errors.BadRequest(f"{api_version or '(no apiVersion)'}/{kind or '(no kind)'} is not read from "
                                f"protobuf here: send it as JSON")
    return {"apiVersion": api_version, "kind": kind, **_message(inner, top, 0)}


def _message(data: bytes, name: str, depth: int) -> dict[str, Any]:
    if depth > MAX_NESTING:
        raise errors.BadRequest("the protobuf body is nested too deeply")
    fields = MESSAGES[name]
    result: dict[str, Any] = {}
    for number, wire, value in _fields(data):
        if number not in fields:
            continue
        key, type_ = fields[number]
        repeated = type_.startswith("[]")
        if type_.startswith("map:"):
            entry = _map_entry(value, wire, type_[4:], depth, key)
            result.setdefault(key, {}).update([entry])
            continue
        decoded = _value(value, wire, type_[2:] if repeated else type_, depth, key)
        if repeated:
            result.setdefault(key, []).append(decoded)
        elif decoded in ("", 0, None, {}) and not isinstance(decoded, bool):
            # Go writes every field that is no pointer, zero or not; its JSON leaves the zero ones out
            # (`omitempty`), and so does this, so that both forms of one object are one object.
            result.pop(key, None)
        else:
            result[key] = decoded
    return result


def _map_entry(value: bytes | int, wire: int, type_: str, depth: int, key: str) -> tuple[str, Any]:
    if wire != _LEN or not isinstance(value, bytes):
        raise errors.BadRequest(f"protobuf field {key}: a map entry must be length-delimited")
    entry_key, entry_value = "", ""
    for number, entry_wire, item in _fields(value):
        if number == 1:
            entry_key = _value(item, entry_wire, "string", depth, key)
        elif number == 2:
            entry_value = _value(item, entry_wire, type_, depth, key)
    return entry_key, entry_value


def _value(value: bytes | int, wire: int, type_: str, depth: int, key: str) -> Any:
    if type_ in ("int", "bool"):
        if wire != _VARINT or not isinstance(value, int):
            raise errors.BadRequest(f"protobuf field {key}: expected a varint")
        if type_ == "bool":
            return value != 0
        return value - (1 << 64) if value >= 1 << 63 else value  # int64: two's complement
    if wire != _LEN or not isinstance(value, bytes):
        raise errors.BadRequest(f"protobuf field {key}: expected a length-delimited value")
    if type_ == "string":
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise errors.BadRequest(f"protobuf field {key}: not UTF-8") from e
    if type_ == "raw":
        return value  # the envelope's object, decoded by its own table
    if type_ == "bytes":
        return base64.b64encode(value).decode()
    if type_ == "json":
        return bodies.parse_body(value, "application/json")  # with every check a JSON body has
    if type_ == "quantity":
        return _message(value, "Quantity", depth + 1).get("string", "")
    if type_ == "time":
        return _time(value, depth, key)
    message = _message(value, type_, depth + 1)
    return message.get("Raw", {}) if type_ == "FieldsV1" else message


def _time(value: bytes, depth: int, key: str) -> str | None:
    seconds = 0
    for number, wire, item in _fields(value):
        if number == 1:
            seconds = _value(item, wire, "int", depth, key)
    if not seconds:
        return None  # metav1.Time's zero value: null in JSON
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError) as e:
        raise errors.BadRequest(f"protobuf field {key}: the time is out of range") from e


def _fields(data: bytes) -> list[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of every field of one message: a varint's int, a length's bytes."""
    fields: list[tuple[int, int, bytes | int]] = []
    position = 0
    while position < len(data):
        tag, position = _varint(data, position)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise errors.BadRequest("the protobuf body is malformed: field number 0")
        if wire == _VARINT:
            value, position = _varint(data, position)
            fields.append((number, wire, value))
        elif wire == _LEN:
            length, position = _varint(data, position)
            if position + length > len(data):
                raise errors.BadRequest("the protobuf body is malformed: a length runs past its end")
            fields.append((number, wire, data[position:position + length]))
            position += length
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if position + size > len(data):
                raise errors.BadRequest("the protobuf body is malformed: it ends inside a fixed-size value")
            fields.append((number, wire, int.from_bytes(data[position:position + size], "little")))
            position += size
        else:
            raise errors.BadRequest(f"the protobuf body is malformed: wire type {wire} is not supported")
    return fields


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if position >= len(data):
            raise errors.BadRequest("the protobuf body is malformed: it ends inside a varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift >= 70:
            raise errors.BadRequest("the protobuf body is malformed: a varint is longer than 10 bytes")
