"""Warnings for the client that made the request, in the spirit of k8s.io/apiserver/pkg/warning.

Bottom layer, no I/O. The API server binds a recorder to each request (`recording`), and code deep below it
(admission in `accounting.py`) adds to it with `add`, without every call between them passing a list along:
each warning becomes a `Warning: 299` header. With no recorder bound (the controller's own work, tests that
call accounting directly) a warning goes nowhere.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_recorder: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("vmquota_warnings", default=None)


@contextlib.contextmanager
def recording(into: list[str]) -> Iterator[list[str]]:
    """Warnings added inside the block go to `into` (a request's `warnings`)."""
    token = _recorder.set(into)
    try:
        yield into
    finally:
        _recorder.reset(token)


def add(text: str) -> None:
    """Warn the client of the request being served, once per distinct text."""
    recorder = _recorder.get()
    if recorder is not None and text not in recorder:
        recorder.append(text)
