"""Request bodies: JSON or YAML to plain JSON values, refusing anything that is not one.

Pure. A body is parsed once, here, before any handler sees it; whatever parsed but is no plain JSON document
(YAML dates, sets, NaN, deep nesting, alias bombs) is a 400, so later code may rely on plain values.
"""

from __future__ import annotations

import json
import math
from typing import Any

import yaml

from vmquota import errors

MAX_BODY_BYTES = 1 << 20
MAX_DEPTH = 100  # objects nest about a dozen levels; far deeper bodies only exhaust recursive code
MAX_VALUES = MAX_BODY_BYTES  # more than a JSON body of MAX_BODY_BYTES can hold: only YAML aliases expand past it


def parse_body(raw: bytes, content_type: str) -> Any:
    if not raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.BadRequest("the body is not UTF-8") from e
    try:
        if "yaml" in content_type:
            body = yaml.safe_load(text)
        else:
            body = json.loads(text, parse_constant=_not_json)
    except RecursionError as e:
        raise errors.BadRequest("the body is nested too deeply") from e
    except (ValueError, yaml.YAMLError) as e:
        raise errors.BadRequest(f"the body is not valid {'YAML' if 'yaml' in content_type else 'JSON'}: "
                                f"{str(e).splitlines()[0][:200]}") from e
    _check_plain(body)
    return body


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


def _check_plain(body: Any) -> None:
    """Refuse what parsed but is no plain JSON document, before any code relies on it being one: YAML dates,
    binary, sets and non-string keys, NaN and infinities, strings that are not Unicode, nesting deeper than
    MAX_DEPTH, and YAML aliases that expand to more than MAX_VALUES values (a "billion laughs")."""
    stack, count = [(body, 1)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES or depth > MAX_DEPTH:
            raise errors.BadRequest(f"the body holds more than {MAX_VALUES} values" if count > MAX_VALUES
                                    else f"the body is nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise errors.BadRequest(f"object keys must be strings, not {type(key).__name__} "
                                            f"{str(key)[:40]!r}: quote it")
                stack += [(key, depth + 1), (item, depth + 1)]
        elif isinstance(value, list):
            stack += [(item, depth + 1) for item in value]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise errors.BadRequest("strings must be valid Unicode (no lone surrogates)") from e
        elif isinstance(value, float) and not math.isfinite(value):
            raise errors.BadRequest(f"{value} is not a JSON value")
        elif value is not None and not isinstance(value, bool | int | float):
            raise errors.BadRequest(f"the body holds a {type(value).__name__} value, which JSON cannot represent: "
                                    f"quote it")
