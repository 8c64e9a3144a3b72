"""Placement: which node a starting VM runs on, decided as Kubernetes' scheduler decides, and its words when none.

Pure: `choose` takes what a VM needs (its requests with the memory overhead, its nodeSelector) and each node as
the store holds it (allocatable, what is already placed there, cordoned, ready, labels), and returns a node's
name or raises `Unschedulable` with kube-scheduler's message: `0/3 nodes are available: 2 Insufficient memory,
1 node(s) were unschedulable.` A node is ruled out by the first filter it fails, in kube-scheduler's order
(unschedulable, not ready, node selector), then by every resource that does not fit.

Host capacity and tenant quota stay apart: nothing here reads a quota, and `accounting` never reads a node.
"""

from __future__ import annotations

import enum
import functools
import json
import threading
import types
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from vmquota import errors, quantity
from vmquota import resources as r
from vmquota.store import MIGRATION_TARGET, RUNS, Reader
from vmquota.vmspec import VMSpec

UNSCHEDULABLE = "node(s) were unschedulable"
NOT_READY = "node(s) had untolerated taint {node.kubernetes.io/unreachable: }"
TAINTED = "node(s) had untolerated taint {{{key}: {value}}}"
REPELLING = ("NoSchedule", "NoExecute")  # the taint effects that keep a new VM off (VMs tolerate none)
SELECTOR = "node(s) didn't match Pod's node affinity/selector"
WANTED_ELSEWHERE = "node(s) didn't match the requested node name"
INSUFFICIENT = "Insufficient {}"


__all__ = ["MIGRATION_TARGET", "RUNS", "Candidate", "Candidates", "Need", "Policy", "Unschedulable", "choose",
           "need_of", "reservation"]


class Unschedulable(errors.VmquotaError):
    """No node fits: the message is the scheduler's."""


class Policy(enum.StrEnum):
    SPREAD = "spread"  # the node with the most memory left after placing the VM: load evens out
    PACK = "pack"  # the node with the least memory left that still fits: whole hosts stay free


@dataclass(frozen=True)
class Need:
    """What a VM asks of a node."""
    cpu: Decimal  # requests.cpu
    memory: Decimal  # requests.memory, with the overhead
    node_selector: Mapping[str, str]
    node_name: str | None = None  # a move to one node (`migrate --to`)
    exclude: str | None = None  # a migration never targets the node the VM is on


@dataclass(frozen=True)
class Candidate:
    """A node as placement sees it."""
    name: str
    labels: Mapping[str, str]
    unschedulable: bool
    ready: bool
    taints: tuple[tuple[str, str, str], ...]  # (key, value, effect)
    allocatable_cpu: Decimal
    allocatable_memory: Decimal
    placed_cpu: Decimal  # requests of the VMs placed on it, and of migrations into it
    placed_memory: Decimal

    def free_memory(self) -> Decimal:
        return self.allocatable_memory - self.placed_memory


def reasons(need: Need, node: Candidate) -> list[str]:
    """Why `need` cannot go on `node` (nothing when it can)."""
    if need.node_name is not None and node.name != need.node_name:
        return [WANTED_ELSEWHERE]
    if node.unschedulable:
        return [UNSCHEDULABLE]
    if not node.ready:
        return [NOT_READY]
    for key, value, effect in node.taints:
        if effect in REPELLING:
            return [TAINTED.format(key=key, value=value)]
    if any(node.labels.get(key) != value for key, value in need.node_selector.items()):
        return [SELECTOR]
    found = []
    if node.placed_cpu + need.cpu > node.allocatable_cpu:
        found.append(INSUFFICIENT.format("cpu"))
    if node.placed_memory + need.memory > node.allocatable_memory:
        found.append(INSUFFICIENT.format("memory"))
    return found


def choose(need: Need, nodes: Iterable[Candidate], policy: Policy = Policy.SPREAD) -> str:
    """The node the VM goes on; Unschedulable when none fits."""
    candidates = [n for n in nodes if n.name != need.exclude]
    histogram: Counter[str] = Counter()
    fitting = []
    for node in candidates:
        found = reasons(need, node)
        histogram.update(found)
        if not found:
            fitting.append(node)
    if not fitting:
        raise Unschedulable(message(len(candidates), histogram))
    if policy is Policy.PACK:
        return min(fitting, key=lambda n: (n.free_memory(), n.name)).name
    return min(fitting, key=lambda n: (-n.free_memory(), n.name)).name


def message(count: int, histogram: Mapping[str, int]) -> str:
    """kube-scheduler's FitError: the reasons with how many nodes each ruled out, the most common first."""
    if count == 0:
        return "0/0 nodes are available: no nodes available to schedule pods."
    parts = [f"{n} {reason}" for reason, n in sorted(histogram.items(), key=lambda item: (-item[1], item[0]))]
    return f"0/{count} nodes are available: {', '.join(parts)}."


def need_of(spec: VMSpec, charge: r.ResourceList, *, node_name: str | None = None,
            exclude: str | None = None) -> Need:
    """What a VM with this charge (while it runs) asks of a node."""
    return Need(cpu=charge.get("requests.cpu", Decimal(0)), memory=charge.get("requests.memory", Decimal(0)),
                node_selector=spec.node_selector, node_name=node_name, exclude=exclude)


def reservation(charge: r.ResourceList) -> tuple[int, int]:
    """The millicores and bytes a running VM reserves of its node: its requests, memory with the overhead."""
    cpu = charge.get("requests.cpu", Decimal(0)) * 1000
    return int(cpu.to_integral_value(rounding="ROUND_CEILING")), int(charge.get("requests.memory", Decimal(0)))


class Candidates:
    """Every node as placement sees it. What a Node's body says (labels, taints, allocatable, Ready) is read and
    parsed again only once a Node has changed (the store's node generation); what is placed on each node is read
    at every call, from its small table, in the caller's transaction. (No transaction both writes a Node and
    places a VM, so a generation read inside one never names node bodies that a rollback took back.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = -1
        self._nodes: list[tuple[str, Mapping[str, str], bool, bool, tuple[tuple[str, str, str], ...], Decimal,
                                Decimal]] = []

    def __call__(self, reader: Reader) -> list[Candidate]:
        generation = reader.node_generation()
        with self._lock:
            if generation != self._generation:
                self._nodes = [(name, _labels(labels), bool(cordoned), bool(ready), _taints(taints), _quantity(cpu),
                                _quantity(memory))
                               for name, cordoned, labels, taints, cpu, memory, ready, _, _ in reader.node_candidates()]
                self._generation = generation
            nodes = self._nodes
        placed = reader.node_allocated()
        found = []
        for name, labels, cordoned, ready, taints, cpu, memory in nodes:
            placed_cpu, placed_memory = placed.get(name, (0, 0))
            found.append(Candidate(name=name, labels=labels, unschedulable=cordoned, ready=ready, taints=taints,
                                   allocatable_cpu=cpu, allocatable_memory=memory,
                                   placed_cpu=Decimal(placed_cpu) / 1000, placed_memory=Decimal(placed_memory)))
        return found


# A start reads every node: what is the same text as last time is not parsed again (a node's labels, taints and
# allocatable change rarely), which keeps placement's cost per node small.
@functools.lru_cache(maxsize=4096)
def _labels(text: str) -> Mapping[str, str]:
    return types.MappingProxyType(json.loads(text))


@functools.lru_cache(maxsize=4096)
def _taints(text: str) -> tuple[tuple[str, str, str], ...]:
    return tuple((str(t.get("key", "")), str(t.get("value", "")), str(t.get("effect", "")))
                 for t in json.loads(text) if isinstance(t, dict))


@functools.lru_cache(maxsize=4096)
def _quantity(text: str | None) -> Decimal:
    """An allocatable as the heartbeat wrote it; a node not heard from yet has none: nothing fits on it."""
    if text is None:
        return Decimal(0)
    try:
        return quantity.parse(text)
    except (errors.Invalid, ValueError):
        return Decimal(0)
