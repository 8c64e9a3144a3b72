"""The hypervisor boundary: libvirt, for `qemu:///system` (real KVM or QEMU) and `test:///default`.

Bottom layer. The controller asks for what it needs in its own words (observe,
start, shutdown, destroy, undefine) and is told of lifecycle changes through one
callback; it never sees libvirt objects. A domain is vmquota's only if its name is
`vmquota_<ns>_<name>`, its UUID is the VM's uid and it carries vmquota's metadata
element naming this installation (the store's instance id): every action that changes
a domain checks that first, so domains vmquota did not create are never touched.

libvirt's default event loop runs in one daemon thread for the whole process; a
lost connection (libvirtd restarted) is reopened on the next call and reported
through `on_reconnect`, so the controller can recount what it may have missed.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import os
import re
import socket
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from vmquota import domainxml, errors

log = logging.getLogger(__name__)

EventCallback = Callable[[str, str], None]  # (namespace, name) of a VM whose domain changed


class DomainState(enum.StrEnum):
    RUNNING = "running"  # the guest runs (or is blocked, or being shut down: still up)
    PAUSED = "paused"  # suspended; QEMU still holds its memory
    OFF = "off"  # defined but not running
    ABSENT = "absent"  # no domain of this VM


class ExitCause(enum.StrEnum):
    NONE = "none"  # it is not off, or has never run
    GUEST_SHUTDOWN = "GuestShutdown"  # the guest powered itself off: a success for RerunOnFailure
    DESTROYED = "Destroyed"  # forced off (by vmquota, or by someone else)
    CRASHED = "Crashed"  # the guest or QEMU crashed
    FAILED = "Failed"  # QEMU failed or was killed
    MIGRATED = "Migrated"  # it left for another host (live migration): it runs there, this is no shutdown


@dataclass(frozen=True, slots=True)  # slots: a recount holds one per domain
class Observed:
    state: DomainState
    uid: str | None = None
    cause: ExitCause = ExitCause.NONE

    @property
    def up(self) -> bool:
        return self.state in (DomainState.RUNNING, DomainState.PAUSED)


ABSENT = Observed(DomainState.ABSENT)
OFF = Observed(DomainState.OFF)  # a domain that is off, as a recount sees it: its UUID is not asked for

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.RUNNING,  # shutting down: still holds its resources
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.OFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.OFF,
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.OFF,
}
_SHUTOFF_CAUSES = {
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: ExitCause.GUEST_SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: ExitCause.DESTROYED,
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: ExitCause.CRASHED,
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: ExitCause.FAILED,
    libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: ExitCause.MIGRATED,
}

_event_loop_started = False
_event_loop_lock = threading.Lock()


def _start_event_loop() -> None:
    """libvirt's default event loop, once per process, in a daemon thread."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt prints every error to stderr by default; vmquota reports them itself.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def _observed(state: int, reason: int, uid: str) -> Observed:
    mapped = _STATES.get(state, DomainState.OFF)
    cause = ExitCause.NONE
    if mapped is DomainState.OFF:
        crashed = state == libvirt.VIR_DOMAIN_CRASHED
        cause = ExitCause.CRASHED if crashed else _SHUTOFF_CAUSES.get(reason, ExitCause.NONE)
    return Observed(mapped, uid, cause)


@dataclass(frozen=True)
class HostInfo:
    """What a Node's status shows of its libvirt host (`virNodeGetInfo` and the connection's versions)."""
    hostname: str
    cpus: int
    memory_bytes: int
    architecture: str
    libvirt_version: str  # "v9.0.0": kubectl's VERSION column of `get nodes`
    hypervisor: str  # "QEMU 7.2.0", "Test 2.0.0"


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


class Hypervisor:
    def __init__(self, uri: str, *, instance: str, use_emulation: bool = False) -> None:
        self.uri = uri
        self.instance = instance  # only domains whose metadata names this instance are ours
        # KubeVirt's useEmulation: plain QEMU (TCG) even where KVM works. A Debian kernel crawls under the
        # nested KVM of some hosts, and boots in seconds under emulation.
        self.use_emulation = use_emulation
        self._conn: Any = None
        self._lock = threading.Lock()
        self._on_event: EventCallback | None = None
        self._on_reconnect: Callable[[], object] | None = None
        self._callback_id = -1
        self.domain_type = "test"

    # -- connection -------------------------------------------------------------------------

    def connect(self, *, on_event: EventCallback | None = None,
                on_reconnect: Callable[[], object] | None = None) -> None:
        """Open the connection now, so `serve` can say at once when the hypervisor is not there."""
        self.listen(on_event=on_event, on_reconnect=on_reconnect)
        self._connection()

    def listen(self, *, on_event: EventCallback | None, on_reconnect: Callable[[], object] | None) -> None:
        """Whom to tell of lifecycle events and reconnections, from the next connection on (no call to libvirt:
        a host that is away now is told so on its first use)."""
        self._on_event, self._on_reconnect = on_event, on_reconnect

    def _connection(self) -> Any:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                self._drop()
                reconnected = True
            else:
                reconnected = False
            _start_event_loop()  # before the first connection, or its events never come; never in an API process
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise errors.HypervisorUnavailable(
                    f"cannot reach the hypervisor at {self.uri}: {e.get_error_message()}") from e
            try:
                conn.setKeepAlive(5, 3)  # notice a dead libvirtd within ~15 s even when idle
            except libvirt.libvirtError:
                pass  # in-process drivers (test:///) have no keepalive
            self._callback_id = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                                            self._lifecycle, None)
            self.domain_type = self._domain_type(conn)
            self._conn = conn
        if reconnected and self._on_reconnect:
            self._on_reconnect()
        return conn

    def _drop(self) -> None:
        try:
            self._conn.domainEventDeregisterAny(self._callback_id)
        except libvirt.libvirtError:
            pass  # the connection is already dead
        try:
            self._conn.close()
        except libvirt.libvirtError:
            pass
        self._conn = None

    def _domain_type(self, conn: Any) -> str:
        if conn.getType().lower() == "test":
            return "test"
        if self.use_emulation:
            return "qemu"
        try:
            conn.getDomainCapabilities(None, None, None, "kvm")
            return "kvm"
        except libvirt.libvirtError:
            return "qemu"  # no usable /dev/kvm: plain emulation

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._drop()

    def _lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        self._tell_migration(dom, event, detail)
        parsed = domainxml.parse_domain_name(dom.name())
        if parsed and self._on_event:
            try:
                self._on_event(*parsed)
            except Exception:  # an event handler must never kill libvirt's event thread
                log.exception("handling the lifecycle event of %s", dom.name())

    def ensure_reachable(self) -> None:
        """HypervisorUnavailable unless the hypervisor answers (reconnecting to it if it came back)."""
        self._connection()

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except libvirt.libvirtError as e:
            raise self._failure(what, e) from e

    def _failure(self, what: str, e: libvirt.libvirtError) -> errors.HypervisorError:
        """HypervisorUnavailable when the connection died (libvirtd went away): the caller retries, not fails."""
        if e.get_error_code() in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR,
                                  libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_INTERNAL_ERROR) and not self._alive():
            return errors.HypervisorUnavailable(f"{what}: the hypervisor at {self.uri} does not answer: "
                                                f"{e.get_error_message()}")
        return errors.HypervisorError(f"{what}: {e.get_error_message()}")

    def _alive(self) -> bool:
        try:
            return bool(self._conn is not None and self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    def host_info(self) -> HostInfo:
        """The host's CPUs, memory and versions, for its Node's capacity; HypervisorUnavailable if it is away."""
        conn = self._connection()
        model, memory_mib, cpus, *_ = self._call("reading the host's info", conn.getInfo)
        return HostInfo(hostname=self._call("reading the host's name", conn.getHostname), cpus=int(cpus),
                        memory_bytes=int(memory_mib) * 1024 * 1024, architecture=str(model),
                        libvirt_version="v" + _version(self._call("reading libvirt's version", conn.getLibVersion)),
                        hypervisor=f"{conn.getType()} {_version(self._call('reading the version', conn.getVersion))}")

    # -- looking --------------------------------------------------------------------------------

    def _lookup(self, namespace: str, name: str) -> Any | None:
        conn = self._connection()
        try:
            return conn.lookupByName(domainxml.domain_name(namespace, name))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise self._failure(f"looking up the domain of {namespace}/{name}", e) from e

    def observe(self, namespace: str, name: str) -> Observed:
        dom = self._lookup(namespace, name)
        if dom is None:
            return ABSENT
        try:
            state, reason = dom.state()
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return ABSENT  # undefined between the lookup and now
            raise self._failure(f"reading the state of {namespace}/{name}", e) from e
        return _observed(state, reason, dom.UUIDString())

    def observe_all(self) -> dict[tuple[str, str], Observed]:
        """Every domain with a vmquota name: the hypervisor's truth for a recount.

        Domains that are off come by name only (OFF, uid None), which is all a recount needs of them; the
        running ones with their state and UUID. That halves the Python work per domain at 100,000 domains.
        The off ones are listed first, so a domain started in between is seen running, not off; one that
        stops in between is missed, which only queues its VM for a look (the controller looks again).
        """
        conn = self._connection()
        off = self._call("listing defined domains", conn.listDefinedDomains)
        up = self._call("listing running domains", lambda: conn.getAllDomainStats(
            libvirt.VIR_DOMAIN_STATS_STATE, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE))
        found: dict[tuple[str, str], Observed] = {}
        for domain in off:
            parsed = domainxml.parse_domain_name(domain)
            if parsed:
                found[parsed] = OFF
        for dom, values in up:
            parsed = domainxml.parse_domain_name(dom.name())
            if parsed:
                found[parsed] = _observed(values["state.state"], values["state.reason"], dom.UUIDString())
        return found

    def owner(self, namespace: str, name: str) -> str | None:
        """The uid in the domain's vmquota metadata, or None when vmquota did not make this domain."""
        dom = self._lookup(namespace, name)
        return None if dom is None else self._owner(dom)

    def _owner(self, dom: Any) -> str | None:
        try:
            text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domainxml.METADATA_URI)
        except libvirt.libvirtError:
            return None
        try:
            element = ET.fromstring(text)
        except ET.ParseError:
            return None
        parsed = domainxml.parse_domain_name(dom.name())
        if parsed != (element.get("namespace"), element.get("name")) or element.get("instance") != self.instance:
            return None
        uid = element.get("uid")
        return uid if uid and uid == dom.UUIDString() else None

    def _own(self, namespace: str, name: str, uid: str, *, refuse_foreign: bool = False) -> Any | None:
        """The domain of this VM if it is ours; None if there is none or (unless refused) it is not ours."""
        dom = self._lookup(namespace, name)
        if dom is None:
            return None
        owner = self._owner(dom)
        if owner is None:
            if not refuse_foreign:
                return None  # someone else's domain: nothing of ours to stop or remove
            raise errors.HypervisorError(f"a domain named {dom.name()} exists that vmquota did not create; "
                                         f"vmquota leaves it alone and cannot run {namespace}/{name}")
        if owner != uid:
            return _Stale(dom, owner)
        return dom

    # -- acting ---------------------------------------------------------------------------------

    def start(self, namespace: str, name: str, uid: str, xml: str) -> None:
        """Define (or redefine, to pick up spec changes) the domain and start it."""
        dom = self._own(namespace, name, uid, refuse_foreign=True)
        if isinstance(dom, _Stale):
            self._remove_stale(dom)
        conn = self._connection()
        for bridge in _bridges(xml):
            self._check_bridge(conn, bridge, namespace, name)
        dom = self._call(f"defining the domain of {namespace}/{name}", lambda: conn.defineXML(xml))
        self._call(f"starting {namespace}/{name}", dom.create)

    def _check_bridge(self, conn: Any, bridge: str, namespace: str, name: str) -> None:
        """A bridge NIC needs the bridge on this host: said plainly before libvirt's "Cannot get interface MTU"."""
        try:
            iface = conn.interfaceLookupByName(bridge)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_INTERFACE:
                raise self._failure(f"looking up host bridge {bridge} for {namespace}/{name}", e) from e
            raise errors.HypervisorError(f"starting {namespace}/{name}: host bridge {bridge} does not exist on "
                                         f"{self.uri}") from e
        kind = ET.fromstring(self._call(f"reading host interface {bridge}", iface.XMLDesc)).get("type")
        if kind != "bridge":
            raise errors.HypervisorError(f"starting {namespace}/{name}: host interface {bridge} on {self.uri} is "
                                         f"not a bridge (its type is {kind or 'unknown'})")

    def shutdown(self, namespace: str, name: str, uid: str) -> None:
        """Ask the guest to power off (ACPI); it may ignore this."""
        dom = self._own(namespace, name, uid)
        if dom is not None and not isinstance(dom, _Stale):
            self._call(f"shutting down {namespace}/{name}", lambda: _ignore_not_running(dom.shutdown))

    def destroy(self, namespace: str, name: str, uid: str) -> None:
        """Force the domain off now."""
        dom = self._own(namespace, name, uid)
        if dom is not None and not isinstance(dom, _Stale):
            self._call(f"forcing off {namespace}/{name}", lambda: _ignore_not_running(dom.destroy))

    def undefine(self, namespace: str, name: str, uid: str) -> None:
        """Remove the domain's definition (forcing it off first); its disks are not ours to touch here."""
        dom = self._own(namespace, name, uid)
        if isinstance(dom, _Stale):
            self._remove_stale(dom)
        elif dom is not None:
            self._call(f"forcing off {namespace}/{name}", lambda: _ignore_not_running(dom.destroy))
            self._call(f"undefining {namespace}/{name}", lambda: _undefine(dom))

    def remove_orphan(self, namespace: str, name: str, expected_uid: str) -> bool:
        """Remove a domain vmquota made for a VM that no longer exists; False if it is not ours."""
        dom = self._lookup(namespace, name)
        if dom is None or self._owner(dom) != expected_uid:
            return False
        self._remove_stale(_Stale(dom, expected_uid))
        return True

    def _remove_stale(self, stale: _Stale) -> None:
        self._call(f"removing the leftover domain {stale.dom.name()}", lambda: _ignore_not_running(stale.dom.destroy))
        self._call(f"removing the leftover domain {stale.dom.name()}", lambda: _undefine(stale.dom))

    def live_disk_copy(self, namespace: str, name: str, uid: str, copies: dict[str, Path]) -> bool:
        """Point-in-time copies of a running domain's disks (target dev -> file) with libvirt's backup job.

        Returns False where the hypervisor cannot do it (libvirt's test driver), so the caller copies the
        files directly, which is safe there because no QEMU process writes to them.
        """
        dom = self._own(namespace, name, uid)
        if dom is None or isinstance(dom, _Stale):
            return False
        backup = ET.Element("domainbackup")
        disks = ET.SubElement(backup, "disks")
        for target, path in copies.items():
            disk = ET.SubElement(disks, "disk", {"name": target, "type": "file"})
            ET.SubElement(disk, "target", {"file": str(path)})
            ET.SubElement(disk, "driver", {"type": "qcow2"})
        try:
            dom.backupBegin(ET.tostring(backup, encoding="unicode"), None)
        except libvirt.libvirtError as e:
            if e.get_error_code() in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED):
                return False
            raise errors.HypervisorError(f"copying the disks of running {namespace}/{name}: "
                                         f"{e.get_error_message()}") from e
        return True

    def job_active(self, namespace: str, name: str) -> bool:
        dom = self._lookup(namespace, name)
        if dom is None:
            return False
        info = self._call(f"reading the jobs of {namespace}/{name}", dom.jobInfo)
        return bool(info[0] not in (libvirt.VIR_DOMAIN_JOB_NONE, libvirt.VIR_DOMAIN_JOB_COMPLETED))

    # -- live migration (issue 13): peer-to-peer, to another libvirt host ------------------------------------

    _on_migration: MigrationCallback | None = None

    def listen_migrations(self, on_migration: MigrationCallback | None) -> None:
        """Whom to tell of the migration events of vmquota's domains on this host, decoded, with this host's URI
        (`listen`'s callback still hears of every event, these too, as before).

        What each side's libvirt says during a migration, so the controller never takes it for a guest that
        shut down or a domain that came from nowhere (seen on libvirt 9.0, in this order on success):
            target  STARTED/MIGRATED    Arrived  the incoming QEMU exists, paused until the switch-over
            source  SUSPENDED/MIGRATED  Paused   paused for the final switch-over, not by a user
            target  DEFINED/ADDED       -        its persistent definition (PERSIST_DEST)
            target  RESUMED/MIGRATED    Resumed  it runs on the target
            source  STOPPED/MIGRATED    Left     it runs elsewhere now; UNDEFINE_SOURCE removes the definition
                                                 next, so the source then observes ABSENT (in between: OFF with
                                                 the exit cause Migrated), never a shutdown
        On a failure or cancel:
            source  RESUMED/MIGRATED    Resumed  a switch-over failed after the pause: it runs on the source again
                                                 (libvirt's word for it; the tests' failures all come earlier)
            target  STOPPED/FAILED      -        the incoming copy ends (STOPPED/FAILED is also any QEMU failure,
                                                 so it is left to `listen`'s callback and `observe`)
        A migration that fails before the switch-over sends the source nothing: it never stopped running.
        """
        self._on_migration = on_migration

    def _tell_migration(self, dom: Any, event: int, detail: int) -> None:
        step = _MIGRATION_EVENTS.get((event, detail))
        if step is None or self._on_migration is None:
            return
        parsed = domainxml.parse_domain_name(dom.name())
        if parsed is None:
            return
        try:
            self._on_migration(self.uri, *parsed, step)
        except Exception:  # an event handler must never kill libvirt's event thread
            log.exception("handling the migration event of %s", dom.name())

    def migrate(self, namespace: str, name: str, uid: str, target: Hypervisor, *, migrate_uri: str,
                copy_storage: bool, trust_shared_storage: bool = False, bandwidth_mib_s: int = 0,
                on_progress: Callable[[MigrationProgress], object] | None = None,
                progress_interval: float = 0.4) -> None:
        """Live-migrate the running domain of this VM to `target`, peer to peer; returns once it runs there.

        libvirt's `migrateToURI3` with LIVE | PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE, as KubeVirt's
        virt-launcher does: this host's libvirtd talks to the target's itself (at `target.uri`, which it must be
        able to reach; a daemon of this machine through `_peer_uri`) and the guest's memory goes to `migrate_uri`
        (`tcp://ADDRESS[:PORT]`, where the target listens, on that address only; without a port the target's
        libvirtd picks one of its migration ports). It blocks for the whole
        migration; `abort_migration` from another thread ends it, `on_progress` hears `migration_progress` every
        `progress_interval` seconds meanwhile.

        copy_storage: the disks are local to each host, so their contents are copied too (NON_SHARED_DISK over
        NBD): the target gets an empty qcow2 of each disk's virtual size first, made by its libvirt in a
        transient storage pool over the disk's folder (libvirt 9.0 pre-creates a missing disk only inside a
        pool whose target path is that folder). A target that already has a file at a disk's path is refused:
        that is shared storage, and copying would write the disk onto itself. Read-only files (a cloud-init
        seed), which libvirt does not copy, are streamed over first (`_send_files`). Without copy_storage the
        target must see the same files; libvirt believes that only of a cluster file system (NFS, GFS2, ...),
        so `trust_shared_storage` vouches for a local one that several hosts share (the test hosts of one
        machine): VIR_MIGRATE_UNSAFE.

        Failures are HypervisorError in libvirt's words (HypervisorUnavailable when a host does not answer);
        after one the domain still runs here: libvirt resumes it on the source, and this removes the disks a
        copy_storage migration created on the target.
        """
        what = f"migrating {namespace}/{name} to {target.uri}"
        if target.uri == self.uri:
            raise errors.HypervisorError(f"{what}: the target is this host")
        if self.domain_type == "test" and target.domain_type == "test":
            self._migrate_simulated(namespace, name, uid, target)
            return
        address, _port = _parse_migrate_uri(migrate_uri)
        dom = self._running(namespace, name, uid)
        target.ensure_reachable()  # a host that is down: a clear error before libvirt is asked anything
        target.clear_for_incoming(namespace, name, uid)
        xml = self._call(f"reading the domain of {namespace}/{name}", dom.XMLDesc)
        disks, files = _writable_disks(xml), _readonly_files(xml)
        flags = _MIGRATE_FLAGS
        params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_URI: migrate_uri}
        if _is_ip(address):  # QEMU on the target listens there only, not on every address
            params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = address
        if bandwidth_mib_s:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(bandwidth_mib_s)
        pools: list[Any] = []
        created: list[Path] = []
        if copy_storage:
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
            if disks:
                params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = list(disks)
            pools, created = target._prepare_disks(namespace, name, uid, [*disks.values(), *files])
        elif trust_shared_storage:
            flags |= libvirt.VIR_MIGRATE_UNSAFE
        try:
            if copy_storage and files:
                self._send_files(target, files, namespace, name, uid)
            with _ProgressReporter(self, namespace, name, uid, on_progress, progress_interval):
                self._call(what, lambda: dom.migrateToURI3(_peer_uri(target.uri, self.uri), params, flags))
        except errors.HypervisorError:
            target._remove_created(namespace, name, created)
            raise
        finally:
            target._drop_pools(pools)

    def abort_migration(self, namespace: str, name: str, uid: str) -> bool:
        """Cancel this VM's outgoing migration (`abortJob`); False if none was going on. The domain goes on
        running here; `migrate` raises in its own thread once libvirt has rolled back."""
        dom = self._running(namespace, name, uid)
        try:
            dom.abortJob()
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:  # "no job is active on the domain"
                return False
            raise self._failure(f"cancelling the migration of {namespace}/{name}", e) from e
        return True

    def migration_progress(self, namespace: str, name: str, uid: str) -> MigrationProgress | None:
        """How far this VM's migration is (libvirt's job stats), or None when no job runs."""
        dom = self._running(namespace, name, uid)
        stats = self._call(f"reading the migration of {namespace}/{name}", dom.jobStats)
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_UNBOUNDED:
            return None
        return MigrationProgress(processed_bytes=int(stats.get("data_processed", 0)),
                                 remaining_bytes=int(stats.get("data_remaining", 0)),
                                 total_bytes=int(stats.get("data_total", 0)),
                                 elapsed_ms=int(stats.get("time_elapsed", 0)))

    def clear_for_incoming(self, namespace: str, name: str, uid: str) -> None:
        """Make room for this VM's incoming domain: a leftover of an earlier VM of this name (off) goes; a
        domain vmquota did not make, or one of this VM that runs here already, is refused."""
        dom = self._own(namespace, name, uid, refuse_foreign=True)
        if dom is None:
            return
        running = self._call(f"reading the state of {namespace}/{name}",
                             (dom.dom if isinstance(dom, _Stale) else dom).isActive)
        if running:
            raise errors.HypervisorError(f"{namespace}/{name} already runs on {self.uri}")
        if isinstance(dom, _Stale):
            self._remove_stale(dom)
        # An inactive definition of this very VM is replaced by the incoming one (PERSIST_DEST).

    def _prepare_disks(self, namespace: str, name: str, uid: str,
                       paths: list[Path]) -> tuple[list[Any], list[Path]]:
        """On this (target) host: a transient storage pool over each disk's folder, so libvirt can create the
        disks the migration copies into. Returns the pools this made and the disk paths it will create."""
        conn = self._connection()
        pools: list[Any] = []
        try:
            for index, folder in enumerate(sorted({p.parent for p in paths})):
                pool = self._pool_at(conn, folder, f"vmquota-migration-{uid}-{index}", namespace, name)
                if pool is not None:
                    pools.append(pool)
            for path in paths:
                if self._volume_exists(conn, path):
                    raise errors.HypervisorError(
                        f"migrating {namespace}/{name} with its storage: {self.uri} already has a file at {path}; "
                        f"copying the disk would overwrite it (if the hosts share this storage, migrate without "
                        f"copying it)")
        except BaseException:
            self._drop_pools(pools)
            raise
        return pools, list(paths)

    def _send_files(self, target: Hypervisor, files: list[Path], namespace: str, name: str, uid: str) -> None:
        """Copy the domain's read-only files (a cloud-init seed) to the target before the migration starts:
        libvirt copies only writable disks, and the target's QEMU opens these when it starts. Through libvirt's
        storage streams on both sides (download here, upload there), so it works between machines too."""
        conn, target_conn = self._connection(), target._connection()
        pools: list[Any] = []
        what = f"copying the read-only files of {namespace}/{name} to {target.uri}"
        try:
            for index, folder in enumerate(sorted({path.parent for path in files})):
                pool = self._pool_at(conn, folder, f"vmquota-migration-{uid}-files-{index}", namespace, name,
                                     build=False)
                if pool is not None:
                    pools.append(pool)
            for path in files:
                self._call(what, lambda path=path: _stream_file(conn, target_conn, path))  # type: ignore[misc]
        finally:
            self._drop_pools(pools)

    def _pool_at(self, conn: Any, folder: Path, pool_name: str, namespace: str, name: str, *,
                 build: bool = True) -> Any | None:
        """A transient dir pool over `folder` (made, with its parents, if missing and `build`); None when a pool
        of this host covers the folder already (libvirt finds that one by its path)."""
        xml = ET.Element("pool", {"type": "dir"})
        ET.SubElement(xml, "name").text = pool_name
        ET.SubElement(ET.SubElement(xml, "target"), "path").text = str(folder)
        try:
            return conn.storagePoolCreateXML(ET.tostring(xml, encoding="unicode"),
                                             libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD if build else 0)
        except libvirt.libvirtError as e:
            message = e.get_error_message()
            if e.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED and (
                    "conflict with pool" in message or "already exists" in message):
                return None  # "Storage source conflict with pool 'x'": a pool of the host has this folder already
            raise self._failure(f"preparing {folder} on {self.uri} for the disks of {namespace}/{name}", e) from e

    def _volume_exists(self, conn: Any, path: Path) -> bool:
        try:
            pool = conn.storagePoolLookupByTargetPath(str(path.parent))
            pool.refresh(0)
            pool.storageVolLookupByName(path.name)
        except libvirt.libvirtError as e:
            if e.get_error_code() in (libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_ERR_NO_STORAGE_POOL):
                return False
            raise self._failure(f"looking for {path} on {self.uri}", e) from e
        return True

    def _remove_created(self, namespace: str, name: str, created: list[Path]) -> None:
        """After a failed copy_storage migration: the disks it made here go, unless the VM runs here after all."""
        if not created or self.observe(namespace, name).up:
            return
        conn = self._connection()
        for path in created:
            try:
                pool = conn.storagePoolLookupByTargetPath(str(path.parent))
                pool.refresh(0)
                pool.storageVolLookupByName(path.name).delete(0)
            except libvirt.libvirtError as e:
                if e.get_error_code() not in (libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_ERR_NO_STORAGE_POOL):
                    log.warning("removing %s from %s after a failed migration: %s", path, self.uri,
                                e.get_error_message())

    def _drop_pools(self, pools: list[Any]) -> None:
        """Transient pools end when destroyed; their folder and files stay (a dir pool deletes nothing)."""
        for pool in pools:
            try:
                pool.destroy()
            except libvirt.libvirtError as e:
                log.warning("ending the migration's storage pool on %s: %s", self.uri, e.get_error_message())

    # -- guest lifecycle extras: pause, unpause, soft reboot -------------------------------------------

    def suspend(self, namespace: str, name: str, uid: str) -> None:
        self._call(f"pausing {namespace}/{name}", self._running(namespace, name, uid).suspend)

    def resume(self, namespace: str, name: str, uid: str) -> None:
        self._call(f"unpausing {namespace}/{name}", self._running(namespace, name, uid).resume)

    def reboot(self, namespace: str, name: str, uid: str) -> None:
        """A soft reboot: the guest is asked through ACPI; libvirt starts it again once it has shut down."""
        dom = self._running(namespace, name, uid)
        self._call(f"rebooting {namespace}/{name}", lambda: dom.reboot(libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN))

    def _running(self, namespace: str, name: str, uid: str) -> Any:
        dom = self._own(namespace, name, uid)
        if dom is None or isinstance(dom, _Stale):
            raise errors.HypervisorError(f"{namespace}/{name} has no domain of vmquota's")
        return dom

    # -- streams to the guest: its serial console, its ports ------------------------------------------

    def open_console(self, namespace: str, name: str, uid: str) -> GuestStream:
        """The guest's serial console (ttyS0) as a byte stream, taking it over from any earlier reader, as
        `virtctl console` does."""
        dom = self._running(namespace, name, uid)
        stream = self._call("opening a stream", lambda: self._connection().newStream(0))
        self._call(f"opening the console of {namespace}/{name}",
                   lambda: dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE))
        return GuestStream(stream)

    def open_port(self, namespace: str, name: str, uid: str, port: int, *, timeout: float = 10.0) -> socket.socket:
        """A TCP connection to the guest's `port` through QEMU's user-mode network, with no port left open.

        QEMU forwards a loopback port of its own to the guest (`hostfwd_add`) only until it has accepted this
        one connection; then the forward is removed again, so no other local process can use it.
        """
        dom = self._running(namespace, name, uid)
        if self.domain_type == "test":
            raise errors.HypervisorError("the simulated host has no guest network to forward to")
        with socket.socket() as probe:  # a free loopback port for QEMU to listen on
            probe.bind(("127.0.0.1", 0))
            host_port = probe.getsockname()[1]
        rule = f"tcp:127.0.0.1:{host_port}"
        self._monitor(dom, f"hostfwd_add {NETDEV} {rule}-:{port}", namespace, name)
        try:
            connection = socket.create_connection(("127.0.0.1", host_port), timeout=timeout)
            try:
                self._wait_accepted(dom, host_port, timeout, namespace, name)
            except BaseException:
                connection.close()
                raise
        finally:
            self._monitor(dom, f"hostfwd_remove {NETDEV} {rule}", namespace, name)
        connection.settimeout(None)
        return connection

    def _wait_accepted(self, dom: Any, host_port: int, timeout: float, namespace: str, name: str) -> None:
        """Until QEMU lists a connection through the forward of `host_port` (it has accepted ours), so removing
        the forward cannot drop ours from the listening socket's backlog."""
        deadline = time.monotonic() + timeout
        pattern = re.compile(rf"TCP\[ESTABLISHED\]\s+\d+\s+127\.0\.0\.1\s+{host_port}\b")
        while not pattern.search(self._monitor(dom, "info usernet", namespace, name)):
            if time.monotonic() > deadline:
                raise errors.HypervisorError(f"QEMU did not take the connection to {namespace}/{name} in time")
            time.sleep(0.02)

    def _monitor(self, dom: Any, command: str, namespace: str, name: str) -> str:
        reply = str(self._call(f"forwarding a port of {namespace}/{name}", lambda: libvirt_qemu.qemuMonitorCommand(
            dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)))
        # HMP answers in text: nothing when a forward is added, "... removed" when removed, anything else is an error.
        if command.startswith("hostfwd") and reply.strip() and not reply.strip().endswith("removed"):
            raise errors.HypervisorError(f"forwarding a port of {namespace}/{name}: {reply.strip()}")
        return reply


    # -- live migration on libvirt's test driver ----------------------------------------------------

    def _migrate_simulated(self, namespace: str, name: str, uid: str, target: Hypervisor) -> None:
        """libvirt's test driver cannot migrate: the domain is defined and started on the target, then removed
        here, which is what a migration's outcome looks like from outside (the events differ)."""
        dom = self._running(namespace, name, uid)
        xml = self._call(f"reading the domain of {namespace}/{name}", lambda: dom.XMLDesc(0))
        target.start(namespace, name, uid, xml)
        self.undefine(namespace, name, uid)


NETDEV = "hostnet0"  # libvirt's id for the first NIC's QEMU network backend


def _bridges(xml: str) -> list[str]:
    """The host bridges a domain's NICs join (`<interface type='bridge'><source bridge=.../>`)."""
    devices = ET.fromstring(xml).find("devices")
    return [source.get("bridge", "") for source in (devices.findall("interface[@type='bridge']/source")
                                                    if devices is not None else [])]


class GuestStream:
    """A libvirt stream (a guest's console) with a socket's calls: `recv`, `sendall`, `close`."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def recv(self, size: int) -> bytes:
        """Up to `size` bytes, waiting for them; b"" once the console has closed (the domain went off)."""
        try:
            data = self._stream.recv(size)
        except libvirt.libvirtError:
            return b""
        return data if isinstance(data, bytes) else b""

    def sendall(self, data: bytes) -> None:
        while data:
            sent = self._stream.send(data)
            data = data[sent:]

    def close(self) -> None:
        try:
            self._stream.abort()
        except libvirt.libvirtError:
            pass  # already closed by the other end


@dataclass(frozen=True)
class _Stale:
    """A domain vmquota made for an earlier VM of the same name (its uid differs)."""

    dom: Any
    uid: str


def _ignore_not_running(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:  # "domain is not running"
            raise


def _undefine(dom: Any) -> None:
    try:
        dom.undefine()  # vmquota's domains have no NVRAM, snapshots or managed save to keep
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise


# -- live migration: its data and helpers -------------------------------------------------------------------

class MigrationStep(enum.StrEnum):
    """A migration's lifecycle event, decoded (see `Hypervisor.migrate`'s block for the libvirt events)."""

    PAUSED = "Paused"  # source: paused for the switch-over; not a pause a user asked for
    LEFT = "Left"  # source: stopped because it runs on the target now; not a shutdown
    ARRIVED = "Arrived"  # target: the incoming domain started (paused until the switch-over ends)
    RESUMED = "Resumed"  # it runs on the host that tells this: the target after a switch-over, or the source
    #                      again after a failed one


# (host URI, namespace, name, step): the host says which side of the migration it is.
MigrationCallback = Callable[[str, str, str, MigrationStep], None]

_MIGRATION_EVENTS = {
    (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED): MigrationStep.PAUSED,
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED): MigrationStep.LEFT,
    (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED): MigrationStep.ARRIVED,
    (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_MIGRATED): MigrationStep.RESUMED,
}

_MIGRATE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
                  | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)


@dataclass(frozen=True)
class MigrationProgress:
    """libvirt's job stats of a migration: memory and (with copy_storage) disk data together."""

    processed_bytes: int
    remaining_bytes: int
    total_bytes: int
    elapsed_ms: int


def _parse_migrate_uri(uri: str) -> tuple[str, int | None]:
    """(address, port) of `tcp://ADDRESS[:PORT]`; anything else is refused before libvirt sees it. Without a port
    the target's libvirtd picks one from its `migration_port_min`..`max` (qemu.conf)."""
    try:
        parsed = urllib.parse.urlsplit(uri)
        port = parsed.port
    except ValueError as e:
        raise errors.HypervisorError(f"invalid migration URI {uri!r}: {e}") from e
    if parsed.scheme != "tcp" or not parsed.hostname or port == 0 or parsed.path or parsed.query \
            or parsed.fragment or parsed.username is not None or uri.endswith(":"):
        raise errors.HypervisorError(f"invalid migration URI {uri!r}: expected tcp://ADDRESS[:PORT]")
    return parsed.hostname, port


SYSTEM_SOCKET = "/run/libvirt/libvirt-sock"  # where qemu:///system answers


def _local_socket(uri: str) -> str | None:
    """The unix socket of a libvirt URI of this machine's system daemon (qemu:///system, or qemu+unix:///system
    with or without ?socket=); None for any other URI (a remote host, a session daemon, test:///)."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.netloc or parsed.path != "/system":
        return None
    if parsed.scheme == "qemu" and not parsed.query:
        return SYSTEM_SOCKET
    if parsed.scheme == "qemu+unix":
        sockets = urllib.parse.parse_qs(parsed.query).get("socket", [SYSTEM_SOCKET])
        return sockets[-1] if sockets[-1].startswith("/") else None
    return None


def _peer_uri(target: str, source: str) -> str:
    """The target's URI as the source's libvirtd must dial it for a peer-to-peer migration (libvirt's dconnuri).

    A local socket path means what the dialling process's mount namespace makes of it, and a libvirtd in a mount
    namespace of its own (the test hosts of scripts/test-host.sh) finds its own socket at /run/libvirt, so
    `qemu:///system` from there is the source itself ("Attempt to migrate guest to the same host"). When both
    hosts are daemons of this machine, the target's socket is named through /proc/<this process>/root, which
    is the socket this process sees, from any mount namespace. Remote URIs (qemu+ssh, qemu+tls) pass unchanged.
    """
    socket_path = _local_socket(target)
    if socket_path is None or _local_socket(source) is None:
        return target
    return f"qemu+unix:///system?socket=/proc/{os.getpid()}/root{socket_path}"


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _readonly_files(xml: str) -> list[Path]:
    """The files of a domain's read-only file disks and CD-ROMs (a cloud-init seed): what the target must have
    before a copy_storage migration, as libvirt does not copy them."""
    found: list[Path] = []
    for disk in ET.fromstring(xml).iterfind("devices/disk"):
        source = disk.find("source")
        if disk.get("type") == "file" and disk.find("readonly") is not None and source is not None \
                and source.get("file"):
            found.append(Path(str(source.get("file"))))
    return found


STREAM_CHUNK = 256 * 1024


def _stream_file(conn: Any, target_conn: Any, path: Path) -> None:
    """One file from this host to the same path on the target, as a raw volume of its pool there."""
    pool = conn.storagePoolLookupByTargetPath(str(path.parent))
    pool.refresh(0)
    source = pool.storageVolLookupByName(path.name)
    size = int(source.info()[1])
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = path.name
    ET.SubElement(volume, "capacity", {"unit": "bytes"}).text = str(size)
    ET.SubElement(ET.SubElement(volume, "target"), "format", {"type": "raw"})
    copy = target_conn.storagePoolLookupByTargetPath(str(path.parent)).createXML(
        ET.tostring(volume, encoding="unicode"), 0)
    down, up = conn.newStream(0), target_conn.newStream(0)
    source.download(down, 0, size, 0)
    copy.upload(up, 0, size, 0)
    while chunk := down.recv(STREAM_CHUNK):
        if not isinstance(chunk, bytes):  # -2: would block, which a blocking stream never answers
            raise libvirt.libvirtError(f"reading {path} from its host")
        while chunk:
            chunk = chunk[up.send(chunk):]
    down.finish()
    up.finish()


def _writable_disks(xml: str) -> dict[str, Path]:
    """Target device -> file of each writable file disk of a domain: what copy_storage copies (read-only disks
    and CD-ROMs are skipped, as libvirt and KubeVirt skip them)."""
    found: dict[str, Path] = {}
    for disk in ET.fromstring(xml).iterfind("devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        if (disk.get("type") != "file" or disk.get("device", "disk") != "disk" or disk.find("readonly") is not None
                or source is None or target is None or not source.get("file") or not target.get("dev")):
            continue
        found[str(target.get("dev"))] = Path(str(source.get("file")))
    return found


class _ProgressReporter:
    """While a migration blocks its thread, a daemon thread hands `migration_progress` to a callback."""

    def __init__(self, host: Hypervisor, namespace: str, name: str, uid: str,
                 on_progress: Callable[[MigrationProgress], object] | None, interval: float) -> None:
        self._args = (host, namespace, name, uid)
        self._on_progress = on_progress
        self._interval = interval
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _ProgressReporter:
        if self._on_progress is not None:
            self._thread = threading.Thread(target=self._run, name="migration-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        host, namespace, name, uid = self._args
        assert self._on_progress is not None
        while not self._done.wait(self._interval):
            try:
                progress = host.migration_progress(namespace, name, uid)
            except errors.HypervisorError:
                continue  # the domain left between two looks, or libvirt is busy: the migration decides
            if progress is not None:
                try:
                    self._on_progress(progress)
                except Exception:  # a progress callback must not end the migration's bookkeeping
                    log.exception("reporting the migration progress of %s/%s", namespace, name)
