"""Kubernetes resource quantities ("500m", "2", "1.5Gi", "10G") as exact decimals.

A bottom-layer module with no I/O: `parse` turns the text users write into a
`Decimal`, `format` turns a `Decimal` back into the shortest exact Kubernetes
string. Everything that adds or compares resources (`resources.py`) works on the
decimals, never on strings.
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation

# Largest magnitude accepted: 2^63 bytes is already 8 EiB; anything bigger is a typo.
_LIMIT = Decimal(2) ** 63

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}

_DECIMAL_LARGEST_FIRST = sorted(_DECIMAL.items(), key=lambda item: -item[1])

_PATTERN = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]{1,3})?$")


class QuantityError(ValueError):
    """The text is not a Kubernetes quantity; the message quotes it."""


def parse(text: str | int | float) -> Decimal:
    """Parse a quantity; ints and floats (as YAML gives them) are accepted as plain numbers."""
    if type(text) is str:  # nearly always: stored quantities are strings
        return _parse_text(text)
    if isinstance(text, bool):
        raise QuantityError(f"quantities must be a number or a string like '2Gi', not {text!r}")
    if isinstance(text, int | float):
        text = repr(text) if isinstance(text, float) else str(text)
    if not isinstance(text, str):
        raise QuantityError(f"quantities must be a number or a string like '2Gi', not {text!r}")
    return _parse_text(text)


# Admission parses and renders every covering quota's hard and used on each start and stop, and they take
# few distinct values: remembering them took a quarter off an admitted start. Equal decimals always render
# alike (2 and 2.0 both as "2"), so a cached rendering is never the wrong spelling.
@functools.lru_cache(maxsize=4096)
def _parse_text(text: str) -> Decimal:
    match = _PATTERN.match(text)
    if match is None:
        raise QuantityError(f"quantities must match the regular expression "
                            f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$', got {text!r}")
    number, suffix = match.group(1), match.group(2) or ""
    try:
        value = Decimal(number)
    except InvalidOperation as e:  # pragma: no cover - the pattern admits only valid decimals
        raise QuantityError(f"invalid quantity {text!r}") from e
    if suffix in _BINARY:
        value *= _BINARY[suffix]
    elif suffix[:1] in ("e", "E"):
        value = value.scaleb(int(suffix[1:]))
    else:
        value = value.scaleb(_DECIMAL[suffix])
    if abs(value) >= _LIMIT:
        raise QuantityError(f"quantity {text!r} is too large")
    return value.normalize() if value != 0 else Decimal(0)


@functools.lru_cache(maxsize=4096)
def format(value: Decimal) -> str:
    """The shortest exact Kubernetes form: binary suffixes for multiples of 1024, else decimal ones.

    Values finer than a nano are rounded up, as Kubernetes does.
    """
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    magnitude = abs(value)
    if magnitude == magnitude.to_integral_value():
        return sign + min(_whole_forms(int(magnitude)), key=len)
    for suffix, exponent in (("m", 3), ("u", 6), ("n", 9)):
        scaled = magnitude.scaleb(exponent)
        if scaled == scaled.to_integral_value():
            return f"{sign}{int(scaled)}{suffix}"
    nanos = magnitude.scaleb(9).to_integral_value(rounding="ROUND_CEILING")
    return f"{sign}{int(nanos)}n"


def _whole_forms(whole: int) -> list[str]:
    """Exact spellings of a whole number, binary first so that ties keep the binary suffix."""
    forms = []
    for suffix, factor in reversed(_BINARY.items()):
        if whole % factor == 0:
            forms.append(f"{whole // factor}{suffix}")
            break
    for suffix, exponent in _DECIMAL_LARGEST_FIRST:
        if exponent > 0 and whole % 10**exponent == 0:
            forms.append(f"{whole // 10**exponent}{suffix}")
            break
    forms.append(str(whole))
    return forms
