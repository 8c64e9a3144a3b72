"""Durations as Go and kubectl write them (`720h`, `1h30m`, `90s`, `500ms`): what `--expiration` and `--since` take.

Bottom layer, pure.
"""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse(text: str) -> float:
    """Seconds; ValueError quoting `text` unless it is one or more number-unit parts, in any order."""
    stripped = text.strip()
    if not stripped or len(stripped) > 64:
        raise ValueError(f"invalid duration {text!r}: use e.g. 720h, 1h30m or 90s")
    position, total = 0, 0.0
    for match in _PART.finditer(stripped):
        if match.start() != position:
            break
        total += float(match.group(1)) * _SECONDS[match.group(2)]
        position = match.end()
    if position != len(stripped):
        raise ValueError(f"invalid duration {text!r}: use e.g. 720h, 1h30m or 90s")
    return total
