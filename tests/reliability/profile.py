"""How hard the reliability suite pushes: a fast sample in `make test`, the full run in `make reliability`
(VMQUOTA_RELIABILITY=long). Every figure a test reports comes from here, so the report can quote them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

LONG = os.environ.get("VMQUOTA_RELIABILITY", "") == "long"

# Model-based test (hypothesis state machine on test:///default).
MODEL_EXAMPLES = 200 if LONG else 40
MODEL_STEPS = 60 if LONG else 30

# Concurrency storm (HTTP clients on threads against one in-process server).
STORM_CLIENTS = 32 if LONG else 8
STORM_OPERATIONS = 400 if LONG else 60  # per client

# SIGKILL rounds on real KVM.
KILL_ROUNDS = 20 if LONG else 2

# Schemathesis examples per API operation.
FUZZ_EXAMPLES = 200 if LONG else 8

# Where tests leave their figures for docs/reliability.md (one JSON line per test run).
FIGURES = Path(os.environ.get("VMQUOTA_RELIABILITY_FIGURES", "")) if os.environ.get("VMQUOTA_RELIABILITY_FIGURES") \
    else None


def record(test: str, **figures: Any) -> None:
    """Append what a test did (operations, kills, faults...) to the figures file, when one is asked for."""
    if FIGURES is None:
        return
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    with FIGURES.open("a") as out:
        out.write(json.dumps({"test": test, "profile": "long" if LONG else "fast", "at": time.time(), **figures})
                  + "\n")
