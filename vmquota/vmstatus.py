"""The VM's phase and the KubeVirt-style status shown for it.

Bottom layer, pure. `Phase` values are KubeVirt's printableStatus strings, so the
phase a user reads is the phase the controller acts on. `render` builds
`status` (printableStatus, ready, conditions) from the phase and the last reason.
"""

from __future__ import annotations

import enum
from typing import Any


class Phase(enum.StrEnum):
    STOPPED = "Stopped"  # no domain running; charges only storage and count
    STARTING = "Starting"  # start admitted, domain being created: charges compute already
    RUNNING = "Running"  # the hypervisor runs it
    PAUSED = "Paused"  # suspended by the hypervisor; its memory is still held, so it still charges
    STOPPING = "Stopping"  # stop asked for, the domain is not off yet: still charges
    TERMINATING = "Terminating"  # being deleted, the domain is not off yet: still charges
    CRASH_LOOP = "CrashLoopBackOff"  # crashed, restart waits for its back-off; charges no compute
    UNSCHEDULABLE = "ErrorUnschedulable"  # should run, but its start was refused (quota): no compute


def render(phase: Phase, *, reason: str = "", message: str = "", timestamp: str) -> dict[str, Any]:
    """The status fields vmquota owns: printableStatus, ready, created and conditions."""
    ready = phase is Phase.RUNNING
    conditions: list[dict[str, Any]] = [
        {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": timestamp,
         "reason": "" if ready else (reason or phase.value), "message": "" if ready else message},
    ]
    if phase is Phase.PAUSED:
        conditions.append({"type": "Paused", "status": "True", "lastTransitionTime": timestamp,
                           "reason": "PausedByHypervisor", "message": "the domain is paused"})
    if phase in (Phase.UNSCHEDULABLE, Phase.CRASH_LOOP) or (reason and message and phase is Phase.STOPPED):
        conditions.append({"type": "Failure", "status": "True", "lastTransitionTime": timestamp,
                           "reason": reason, "message": message})
    return {"printableStatus": phase.value, "ready": ready, "created": phase is not Phase.STOPPED,
            "conditions": conditions}
