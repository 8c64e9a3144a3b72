"""OpenAPI v2 in gnostic's protobuf form, the one client-go asks /openapi/v2 for.

client-go's `OpenAPISchema()` sends `Accept: application/com.github.proto-openapi.spec.v2@v1.0+protobuf` and
decodes the answer as gnostic's `openapi.v2.Document` message, nothing else. kubectl needs it when it validates
on the client: for a file holding a `List` (as `kubectl get -o yaml` writes), and for a kind whose server-side
validation it cannot find in OpenAPI v3.

Pure. This encodes the JSON document `openapi.v2_document()` renders, message by message, with the field numbers
of gnostic's OpenAPIv2.proto (github.com/google/gnostic-models, openapiv2). Hand-made rather than generated: the
`protobuf` runtime alone cannot encode without gnostic's compiled descriptors, and the protobuf wire format of the
part used here (strings, booleans, varints, doubles and nested messages) is a few lines.
Vendor extensions (`x-kubernetes-*`) and enum values travel as YAML text (gnostic's `Any.yaml`), as kube-apiserver
sends them; JSON is YAML.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from typing import Any

CONTENT_TYPE = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
ACCEPT = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"

_VARINT, _FIXED64, _BYTES = 0, 1, 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes(field: int, payload: bytes) -> bytes:
    """A length-delimited field: a string or an embedded message (present even when empty)."""
    return _tag(field, _BYTES) + _varint(len(payload)) + payload


def _string(field: int, value: Any) -> bytes:
    return _bytes(field, str(value).encode()) if value not in (None, "") else b""


def _strings(field: int, values: Iterable[Any]) -> bytes:
    return b"".join(_bytes(field, str(v).encode()) for v in values)


def _bool(field: int, value: Any) -> bytes:
    return _tag(field, _VARINT) + b"\x01" if value else b""


def _int64(field: int, value: Any) -> bytes:
    return _tag(field, _VARINT) + _varint(int(value)) if value is not None else b""


def _double(field: int, value: Any) -> bytes:
    return _tag(field, _FIXED64) + struct.pack("<d", float(value)) if value is not None else b""


def _messages(field: int, encode: Callable[[Any], bytes], values: Iterable[Any]) -> bytes:
    return b"".join(_bytes(field, encode(v)) for v in values)


def _any(value: Any) -> bytes:
    """gnostic's Any: the value as YAML text (field 2)."""
    return _string(2, json.dumps(value))


def _named(name: str, value: bytes) -> bytes:
    """Every gnostic Named* message: name = 1, value = 2."""
    return _string(1, name) + _bytes(2, value)


def _extensions(field: int, node: dict[str, Any]) -> bytes:
    return b"".join(_bytes(field, _named(k, _any(v))) for k, v in node.items() if k.startswith("x-"))


def schema(node: dict[str, Any]) -> bytes:
    """openapi.v2.Schema."""
    out = [_string(1, node.get("$ref")), _string(2, node.get("format")), _string(4, node.get("description")),
           _double(9, node.get("minimum")), _int64(11, node.get("maxLength")), _string(13, node.get("pattern")),
           _strings(19, node.get("required", ())), _messages(20, _any, node.get("enum", ()))]
    additional = node.get("additionalProperties")
    if isinstance(additional, bool):
        out.append(_bytes(21, _bool(2, additional) or b"\x10\x00"))  # boolean = 2, false written explicitly
    elif isinstance(additional, dict):
        out.append(_bytes(21, _bytes(1, schema(additional))))
    if "type" in node:
        out.append(_bytes(22, _strings(1, [node["type"]])))
    if "items" in node:
        out.append(_bytes(23, _bytes(1, schema(node["items"]))))
    out.append(_messages(24, schema, node.get("allOf", ())))
    if "properties" in node:
        out.append(_bytes(25, b"".join(_bytes(1, _named(name, schema(child)))
                                       for name, child in node["properties"].items())))
    out.append(_extensions(31, node))
    return b"".join(out)


def _parameter(param: dict[str, Any]) -> bytes:
    """openapi.v2.ParametersItem holding a Parameter: a body parameter, or a query or path one."""
    if param["in"] == "body":
        body = (_string(1, param.get("description")) + _string(2, param["name"]) + _string(3, "body") +
                _bool(4, param.get("required")) + _bytes(5, schema(param["schema"])))
        return _bytes(1, _bytes(1, body))
    common = _string(3, param.get("description")) + _string(4, param["name"])
    if param["in"] == "path":  # PathParameterSubSchema
        sub = _bool(1, True) + _string(2, "path") + common + _string(5, param["type"]) + \
            _bool(19, param.get("uniqueItems"))
        return _bytes(1, _bytes(2, _bytes(4, sub)))
    sub = _bool(1, param.get("required")) + _string(2, "query") + common + _string(6, param["type"]) + \
        _bool(20, param.get("uniqueItems"))  # QueryParameterSubSchema
    return _bytes(1, _bytes(2, _bytes(3, sub)))


def _response(response: dict[str, Any]) -> bytes:
    """openapi.v2.ResponseValue holding a Response."""
    body = _string(1, response.get("description"))
    if "schema" in response:
        body += _bytes(2, _bytes(1, schema(response["schema"])))
    return _bytes(1, body)


def _operation(op: dict[str, Any]) -> bytes:
    responses = b"".join(_bytes(1, _named(code, _response(r))) for code, r in op.get("responses", {}).items())
    return b"".join([
        _string(3, op.get("description")), _string(5, op.get("operationId")), _strings(6, op.get("produces", ())),
        _strings(7, op.get("consumes", ())), _messages(8, _parameter, op.get("parameters", ())),
        _bytes(9, responses), _strings(10, op.get("schemes", ())), _extensions(13, op)])


_METHODS = {"get": 2, "put": 3, "post": 4, "delete": 5, "options": 6, "head": 7, "patch": 8}


def _path_item(item: dict[str, Any]) -> bytes:
    out = [_bytes(_METHODS[method], _operation(op)) for method, op in item.items() if method in _METHODS]
    out.append(_messages(9, _parameter, item.get("parameters", ())))
    out.append(_extensions(10, item))
    return b"".join(out)


def _security_definition(item: dict[str, Any]) -> bytes:
    """A SecurityDefinitionsItem holding an ApiKeySecurity (kube-apiserver's BearerToken)."""
    key = _string(1, item.get("type")) + _string(2, item.get("name")) + _string(3, item.get("in")) + \
        _string(4, item.get("description"))
    return _bytes(2, key)


def _security_requirement(requirement: dict[str, list[str]]) -> bytes:
    return b"".join(_bytes(1, _named(name, _strings(1, scopes))) for name, scopes in requirement.items())


def document(doc: dict[str, Any]) -> bytes:
    """openapi.v2.Document of a swagger 2.0 document."""
    info = doc.get("info", {})
    return b"".join([
        _string(1, doc.get("swagger")),
        _bytes(2, _string(1, info.get("title")) + _string(2, info.get("version"))),
        _bytes(8, b"".join(_bytes(2, _named(path, _path_item(item))) for path, item in doc["paths"].items())),
        _bytes(9, b"".join(_bytes(1, _named(name, schema(node))) for name, node in doc["definitions"].items())),
        _messages(12, _security_requirement, doc.get("security", ())),
        _bytes(13, b"".join(_bytes(1, _named(name, _security_definition(item)))
                            for name, item in doc.get("securityDefinitions", {}).items())),
    ])
