"""Node health: each libvirt host is a `v1` Node whose status the controller keeps from a heartbeat.

The server's `--hypervisor` is the first node, registered when the controller starts; an admin adds more by
creating Nodes whose `spec.providerID` is a libvirt URI. Every HEARTBEAT_SECONDS the controller asks each host
for its CPUs and memory (`Hypervisor.host_info`) in a thread of its own with a deadline, so that a host that
hangs cannot stall the others. A node that has not answered for NODE_GRACE_SECONDS turns Ready=False.

The status is a pure function of the Node, the host's answer and the time (`node_status`): capacity from the
host, allocatable = capacity x the node's overcommit ratio - what it reserves (annotations below), and the
Ready condition. Quotas never see it, and it never sees quotas.
"""

from __future__ import annotations

import functools
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from vmquota import errors, objects, quantity
from vmquota.controller.context import Context
from vmquota.controller.state import is_ready, node_of, show_node_readiness
from vmquota.hypervisor import HostInfo, Hypervisor
from vmquota.objects import NODE, Obj
from vmquota.store import Transaction

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0  # kubelet's default nodeStatusUpdateFrequency
NODE_GRACE_SECONDS = 40.0  # kube-controller-manager's node-monitor-grace-period
PROBE_TIMEOUT_SECONDS = 8.0  # a host that takes longer has not answered this round
HEARTBEAT_REFRESH_SECONDS = 60.0  # lastHeartbeatTime is rewritten this often when nothing else changed

# Per-node settings an admin writes on the Node, as kubelet's --system-reserved and KubeVirt's allocation ratios.
CPU_OVERCOMMIT = "vmquota.io/cpu-overcommit"
MEMORY_OVERCOMMIT = "vmquota.io/memory-overcommit"
RESERVED_CPU = "vmquota.io/reserved-cpu"
RESERVED_MEMORY = "vmquota.io/reserved-memory"
MIGRATION_ADDRESS = "vmquota.io/migration-address"
# At most this many bytes a second for a migration to or from the node (KubeVirt's bandwidthPerMigration), a
# quantity such as 64Mi; libvirt takes whole MiB/s. Of two nodes' limits the smaller holds.
MIGRATION_BANDWIDTH = "vmquota.io/migration-bandwidth"
MIB = 1024 * 1024
SETTINGS = (CPU_OVERCOMMIT, MEMORY_OVERCOMMIT, RESERVED_CPU, RESERVED_MEMORY)

# Kubernetes' non-graceful node shutdown: an admin who has made sure a host is off (fenced) taints its Node so;
# only then are the VMs it held released, and restarted elsewhere if their strategy says so (`confirm-down`).
OUT_OF_SERVICE = "node.kubernetes.io/out-of-service"
TAINT_EFFECTS = ("NoExecute", "NoSchedule", "PreferNoSchedule")
_TAINT_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_TAINT_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")

PROVIDER_SCHEMES = ("qemu", "qemu+ssh", "qemu+tls", "qemu+tcp", "qemu+unix", "qemu+libssh", "qemu+libssh2", "test")


def provider_problem(uri: Any) -> str | None:
    """Why `uri` cannot be a Node's spec.providerID (a libvirt URI of a QEMU or simulated host), or None."""
    if not isinstance(uri, str) or not uri:
        return "Required value: the host's libvirt URI, e.g. qemu+ssh://host/system"
    if len(uri) > 1024 or any(c.isspace() or ord(c) < 32 for c in uri):
        return "must be at most 1024 characters, without spaces or control characters"
    scheme = urlsplit(uri).scheme
    if scheme not in PROVIDER_SCHEMES:
        return f"the scheme must be one of {', '.join(PROVIDER_SCHEMES)}, not {scheme or 'none'!r}"
    return None


def settings_problem(node: Obj) -> str | None:
    """Why one of the node's annotations above cannot be used, or None."""
    annotations = objects.meta(node).get("annotations") or {}
    for key in SETTINGS:
        if key not in annotations:
            continue
        try:
            value = quantity.parse(annotations[key])
        except (errors.Invalid, ValueError, TypeError):
            return f"metadata.annotations[{key}]: Invalid value: {annotations[key]!r}: must be a quantity"
        if value < 0 or (key in (CPU_OVERCOMMIT, MEMORY_OVERCOMMIT) and value == 0):
            return f"metadata.annotations[{key}]: Invalid value: {annotations[key]!r}: must be positive"
    if MIGRATION_BANDWIDTH in annotations:
        value = annotations[MIGRATION_BANDWIDTH]
        try:
            ok = quantity.parse(value) >= MIB
        except (errors.Invalid, ValueError, TypeError):
            ok = False
        if not ok:
            return (f"metadata.annotations[{MIGRATION_BANDWIDTH}]: Invalid value: {value!r}: must be a quantity of "
                    f"bytes a second of at least 1Mi (libvirt limits a migration in whole MiB/s)")
    return None


def migration_bandwidth_mib(node: Obj) -> int:
    """The node's migration bandwidth limit in whole MiB/s (rounded down), 0 for none."""
    value = (objects.meta(node).get("annotations") or {}).get(MIGRATION_BANDWIDTH)
    return 0 if value is None else int(quantity.parse(value)) // MIB


def taints_problem(taints: Any) -> str | None:
    """Why spec.taints is not a list of Kubernetes taints, in kube-apiserver's words, or None."""
    if taints is None:
        return None
    if not isinstance(taints, list):
        return "spec.taints: Invalid value: must be a list"
    for index, taint in enumerate(taints):
        where = f"spec.taints[{index}]"
        if not isinstance(taint, dict):
            return f"{where}: Invalid value: must be an object"
        key, value, effect = taint.get("key"), taint.get("value", ""), taint.get("effect")
        if not isinstance(key, str) or not _TAINT_KEY.match(key):
            return f"{where}.key: Invalid value: {key!r}: must be a qualified name (a label key)"
        if not isinstance(value, str) or not _TAINT_VALUE.match(value):
            return f"{where}.value: Invalid value: {value!r}: must be a valid label value"
        if effect not in TAINT_EFFECTS:
            supported = ", ".join(f'"{e}"' for e in TAINT_EFFECTS)
            return f'{where}.effect: Unsupported value: "{effect}": supported values: {supported}'
    return None


def out_of_service(node: Obj) -> bool:
    """Has an admin confirmed that the node's host is off (the out-of-service taint, NoExecute)?"""
    return any(isinstance(t, dict) and t.get("key") == OUT_OF_SERVICE and t.get("effect") == "NoExecute"
               for t in (node.get("spec") or {}).get("taints") or [])


def first_node_annotations(uri: str) -> dict[str, str]:
    """A first node on libvirt's test driver is given room without end: that driver's capacity is a fixed
    fiction (16 CPUs, 3 GiB) that one-host use never had to fit in. Hosts described by a `test:///<file>`
    added as later nodes keep the capacity their file gives them, which is what placement tests use."""
    if uri == "test:///default":
        return {CPU_OVERCOMMIT: "1000000", MEMORY_OVERCOMMIT: "1000000"}
    return {}


def first_node_name(hostname: str) -> str:
    """The first node's name: the host's name as a DNS-1123 label (`node-1` if nothing of it is left)."""
    name = re.sub(r"[^a-z0-9-]+", "-", hostname.lower().split(".")[0]).strip("-")[:63].strip("-")
    return name or "node-1"


def migration_address(node: Obj) -> str:
    """Where other hosts send this host's incoming migration data: the annotation, else its URI's host (the
    loopback for a unix socket or a local URI)."""
    annotations = objects.meta(node).get("annotations") or {}
    if annotations.get(MIGRATION_ADDRESS):
        return str(annotations[MIGRATION_ADDRESS])
    return urlsplit(str((node.get("spec") or {}).get("providerID", ""))).hostname or "127.0.0.1"


@dataclass(frozen=True)
class Probe:
    """One heartbeat's look at a host: its info, or why it did not answer."""
    info: HostInfo | None
    error: str = ""


def _setting(node: Obj, key: str, default: str) -> Decimal:
    return quantity.parse((objects.meta(node).get("annotations") or {}).get(key, default))


def allocatable(node: Obj, capacity: dict[str, Decimal]) -> dict[str, Decimal]:
    """capacity x overcommit - reserved, never below zero."""
    cpu = capacity["cpu"] * _setting(node, CPU_OVERCOMMIT, "1") - _setting(node, RESERVED_CPU, "0")
    memory = capacity["memory"] * _setting(node, MEMORY_OVERCOMMIT, "1") - _setting(node, RESERVED_MEMORY, "0")
    return {"cpu": max(cpu, Decimal(0)), "memory": max(memory.to_integral_value(), Decimal(0))}


def node_status(node: Obj, probe: Probe, *, silent_for: float, grace: float = NODE_GRACE_SECONDS) -> dict[str, Any]:
    """The Node's new status: the host's capacity when it answered (else the last known), and Ready.

    `silent_for`: seconds since the host last answered (or since the server started). A host that does not
    answer stays as it was for `grace` seconds, then turns Ready=False.
    """
    status: dict[str, Any] = dict(node.get("status") or {})
    old = _condition(status)
    if probe.info is not None:
        ready = True
        _describe_host(node, status, probe.info)
    else:
        ready = silent_for < grace and old.get("status") == "True"
    status["conditions"] = [c for c in status.get("conditions") or [] if c.get("type") != "Ready"] + \
        [_ready_condition(old, ready, probe)]
    return status


def _describe_host(node: Obj, status: dict[str, Any], info: HostInfo) -> None:
    capacity = {"cpu": Decimal(info.cpus), "memory": Decimal(info.memory_bytes)}
    status["capacity"] = {k: quantity.format(v) for k, v in capacity.items()}
    status["allocatable"] = {k: quantity.format(v) for k, v in allocatable(node, capacity).items()}
    status["nodeInfo"] = {"architecture": info.architecture, "kubeletVersion": info.libvirt_version,
                          "containerRuntimeVersion": info.hypervisor, "operatingSystem": "linux"}
    status["addresses"] = [{"type": "InternalIP", "address": migration_address(node)},
                           {"type": "Hostname", "address": info.hostname}]


def _condition(status: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})


def _ready_condition(old: dict[str, Any], ready: bool, probe: Probe) -> dict[str, Any]:
    """Kubernetes' Ready condition; a heartbeat that changes nothing rewrites it once a minute, not each time."""
    word = "True" if ready else "False"
    if ready:
        reason, message = "HypervisorReady", "libvirt answers"
    elif probe.info is None and probe.error:
        reason, message = "HypervisorUnreachable", f"libvirt does not answer: {probe.error}"
    else:
        reason, message = "HypervisorUnreachable", "libvirt does not answer"
    same = old.get("status") == word
    stamp = objects.now()
    heartbeat = old.get("lastHeartbeatTime", stamp)
    if probe.info is not None and (not same or _age(heartbeat) >= HEARTBEAT_REFRESH_SECONDS):
        heartbeat = stamp
    if same and old.get("reason") == reason:
        message = old.get("message", message)  # the same state: not rewritten for another error's words
    return {"type": "Ready", "status": word, "reason": reason, "message": message, "lastHeartbeatTime": heartbeat,
            "lastTransitionTime": old.get("lastTransitionTime", stamp) if same else stamp}


def _age(timestamp: str) -> float:
    try:
        then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except (TypeError, ValueError):
        return float("inf")
    return (datetime.now(UTC) - then).total_seconds()


class NodeHealth:
    """Registers the first node and keeps every Node's status; runs in the controller's process only."""

    def __init__(self, ctx: Context, *, host_lost: Callable[..., None],
                 heartbeat_seconds: float = HEARTBEAT_SECONDS, grace_seconds: float = NODE_GRACE_SECONDS) -> None:
        self.ctx = ctx
        self.host_lost = host_lost  # lifecycle's: a VM on a node confirmed down is released
        self.heartbeat_seconds = heartbeat_seconds
        self.grace_seconds = grace_seconds
        self._last_answer: dict[str, float] = {}  # node name -> when its host last answered (monotonic)
        self._probing: dict[str, threading.Thread] = {}
        self._shown_ready: dict[str, bool] = {}  # node -> the readiness its VMs show now
        self._started = time.monotonic()  # a server's start counts as an answer: the grace runs from it

    def _show_as_its_node(self, txn: Transaction, vm: Obj) -> None:
        node = node_of(vm)
        if node:
            show_node_readiness(txn, vm, node=node, ready=is_ready(txn.get(NODE, "", node)))

    def register_first(self) -> str:
        """The Node of `--hypervisor`: found by its providerID, else created with the host's name."""
        uri = self.ctx.hypervisor.uri
        with self.ctx.store.transaction() as txn:
            for node in txn.list(NODE):
                if (node.get("spec") or {}).get("providerID") == uri:
                    return str(node["metadata"]["name"])
            try:
                hostname = self.ctx.hypervisor.host_info().hostname
            except errors.HypervisorError:
                hostname = socket.gethostname()  # away now: the heartbeat says so; the node needs a name anyway
            name = first_node_name(hostname)
            if txn.exists(NODE, "", name):
                name = f"{name}-{objects.new_uid()[:5]}"
            txn.create(NODE, {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name},
                                           "annotations": first_node_annotations(uri)},
                              "spec": {"providerID": uri}})
        self.heartbeat()
        return name

    def heartbeat(self) -> None:
        """Look at every node's host (in parallel, each within its deadline) and write what changed."""
        nodes = self.ctx.store.reader().list(NODE)
        results: dict[str, Probe] = {}
        threads = [self._start_probe(node, results) for node in nodes]
        deadline = time.monotonic() + PROBE_TIMEOUT_SECONDS
        for thread in threads:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        now = time.monotonic()
        for node in nodes:
            name = node["metadata"]["name"]
            probe = results.get(name, Probe(None, f"no answer within {PROBE_TIMEOUT_SECONDS:g} s"))
            if probe.info is not None:
                self._last_answer[name] = now
            self._write(name, probe, now)
        self._forget(nodes)
        self._follow(self.ctx.store.reader().list(NODE))

    def _follow(self, nodes: list[Obj]) -> None:
        """The VMs of each node follow it: Unknown while it is NotReady (still charged: they may run), and
        released once an admin has confirmed its host is off; VMs are never released on a timeout."""
        if not self._shown_ready:  # this server's first look: a VM may still show an earlier server's Unknown
            for key in self.ctx.store.reader().vms_showing("Unknown"):
                self.ctx.update(key, self._show_as_its_node)
        for node in nodes:
            name = node["metadata"]["name"]
            ready = is_ready(node)
            lost = not ready and out_of_service(node)
            if lost or self._shown_ready.get(name, True) != ready:
                reader = self.ctx.store.reader()
                for key in reader.vms_on(name):
                    change = (functools.partial(self.host_lost, node=name) if lost
                              else functools.partial(show_node_readiness, node=name, ready=ready))
                    self.ctx.update(key, change)
            self._shown_ready[name] = ready

    def _start_probe(self, node: Obj, results: dict[str, Probe]) -> threading.Thread | None:
        name = node["metadata"]["name"]
        if name in self._probing and self._probing[name].is_alive():
            return None  # the last round's look still hangs: no answer this round either
        host = self._host(str((node.get("spec") or {}).get("providerID", "")))

        def probe() -> None:
            try:
                results[name] = Probe(host.host_info())
            except errors.HypervisorError as e:
                results[name] = Probe(None, str(e))
            except Exception as e:  # a heartbeat must survive any host's failure
                log.exception("probing node %s", name)
                results[name] = Probe(None, str(e))

        thread = threading.Thread(target=probe, name=f"heartbeat-{name}", daemon=True)
        self._probing[name] = thread
        thread.start()
        return thread

    def _host(self, uri: str) -> Hypervisor:
        return self.ctx.hosts.for_uri(uri)

    def _write(self, name: str, probe: Probe, now: float) -> None:
        silent_for = now - self._last_answer.get(name, self._started)
        with self.ctx.store.transaction() as txn:
            node = txn.get(NODE, "", name)
            if node is None:
                return
            status = node_status(node, probe, silent_for=silent_for, grace=self.grace_seconds)
            if status != node.get("status"):
                node["status"] = status
                txn.update(NODE, node)

    def _forget(self, nodes: list[Obj]) -> None:
        """Close the connections of nodes that were deleted."""
        self.ctx.hosts.forget({str((n.get("spec") or {}).get("providerID", "")) for n in nodes})
