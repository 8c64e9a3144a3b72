"""The live-migration driver's pure parts, without KVM: the migrate URI it accepts, the disks a storage copy
moves, and how each host's lifecycle events are decoded for the controller (tests/e2e/test_migration_driver.py
runs the real migrations)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import libvirt
import pytest

from vmquota import errors
from vmquota.hypervisor import (
    ExitCause,
    Hypervisor,
    MigrationStep,
    _observed,
    _parse_migrate_uri,
    _peer_uri,
    _readonly_files,
    _writable_disks,
)


@pytest.mark.parametrize(("uri", "address", "port"), [
    ("tcp://127.0.0.1:49200", "127.0.0.1", 49200), ("tcp://[::1]:49201", "::1", 49201),
    ("tcp://node-2.example:49202", "node-2.example", 49202),
    ("tcp://127.0.0.1", "127.0.0.1", None),  # the target's libvirtd picks the port
])
def test_a_tcp_address_and_port_is_a_migrate_uri(uri: str, address: str, port: int | None) -> None:
    assert _parse_migrate_uri(uri) == (address, port)


@pytest.mark.parametrize("uri", ["", "127.0.0.1:49200", "http://127.0.0.1:49200", "tcp://127.0.0.1:",
                                 "tcp://127.0.0.1:0", "tcp://127.0.0.1:70000", "tcp://:49200", "tcp://h:49200/p",
                                 "tcp://h:49200?x=1", "tcp://u:p@h:49200", "tcp://h:port", "unix:///tmp/sock"])
def test_anything_else_is_refused(uri: str) -> None:
    with pytest.raises(errors.HypervisorError, match="invalid migration URI"):
        _parse_migrate_uri(uri)


def test_a_storage_copy_moves_writable_file_disks_only() -> None:
    xml = """<domain><devices>
      <disk type="file" device="disk"><source file="/d/root.qcow2"/><target dev="vda"/></disk>
      <disk type="file" device="disk"><source file="/d/data.qcow2"/><target dev="vdb"/></disk>
      <disk type="file" device="disk"><source file="/d/seed.img"/><target dev="vdc"/><readonly/></disk>
      <disk type="file" device="cdrom"><source file="/d/seed.iso"/><target dev="sda"/><readonly/></disk>
      <disk type="block" device="disk"><source dev="/dev/sdz"/><target dev="vdd"/></disk>
      <disk type="file" device="disk"><target dev="vde"/></disk>
    </devices></domain>"""
    assert _writable_disks(xml) == {"vda": Path("/d/root.qcow2"), "vdb": Path("/d/data.qcow2")}
    # ... and the read-only files are the ones it streams over first, as libvirt does not copy them.
    assert _readonly_files(xml) == [Path("/d/seed.img"), Path("/d/seed.iso")]


class _Dom:
    def __init__(self, name: str) -> None:
        self._name = name

    def name(self) -> str:
        return self._name


def test_migration_events_are_decoded_with_the_host_that_sent_them() -> None:
    host = Hypervisor("qemu+unix:///system?socket=/x", instance="i")
    heard: list[tuple[str, str, str, MigrationStep]] = []
    changed: list[tuple[str, str]] = []
    host.listen(on_event=lambda ns, name: changed.append((ns, name)), on_reconnect=None)
    host.listen_migrations(lambda *step: heard.append(step))
    events: list[tuple[int, int]] = [
        (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED),
        (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED),
        (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_MIGRATED),
        (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED),
        (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN),  # a shutdown: no step
        (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED),  # a user's pause: no step
    ]
    for event, detail in events:
        host._lifecycle(None, _Dom("vmquota_dev_web"), event, detail, None)
    host._lifecycle(None, _Dom("not-vmquotas"), *events[0], None)
    assert heard == [(host.uri, "dev", "web", step) for step in (MigrationStep.ARRIVED, MigrationStep.PAUSED,
                                                                 MigrationStep.RESUMED, MigrationStep.LEFT)]
    assert changed == [("dev", "web")] * len(events)  # the controller's callback hears every event as before


def test_a_domain_off_because_it_migrated_says_so() -> None:
    off = _observed(libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED, "uid")
    assert not off.up and off.cause is ExitCause.MIGRATED


def test_a_failing_migration_listener_does_not_break_the_event_thread() -> None:
    host = Hypervisor("test:///default", instance="i")

    def broken(*_args: Any) -> None:
        raise RuntimeError("boom")
    host.listen_migrations(broken)
    host._lifecycle(None, _Dom("vmquota_dev_web"), libvirt.VIR_DOMAIN_EVENT_STARTED,
                    libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED, None)


EXTRA = "qemu+unix:///system?socket=/tmp/vmquota-hosts/hosts-b/run/libvirt-sock"


@pytest.mark.parametrize(("target", "source", "socket"), [
    ("qemu:///system", EXTRA, "/run/libvirt/libvirt-sock"),
    (EXTRA, "qemu:///system", "/tmp/vmquota-hosts/hosts-b/run/libvirt-sock"),
    ("qemu+unix:///system", EXTRA, "/run/libvirt/libvirt-sock"),
])
def test_a_local_target_is_dialled_through_this_process_root(target: str, source: str, socket: str) -> None:
    # The source daemon may sit in another mount namespace, where the same path is another daemon's socket.
    assert _peer_uri(target, source) == f"qemu+unix:///system?socket=/proc/{os.getpid()}/root{socket}"


@pytest.mark.parametrize(("target", "source"), [
    ("qemu+ssh://root@node-2/system", "qemu:///system"),  # remote: the source dials it as it is
    ("qemu+tls://node-2/system", EXTRA),
    ("qemu:///system", "qemu+ssh://root@node-1/system"),  # a remote source cannot see this process's files
    ("qemu:///session", "qemu:///system"),
    ("qemu+unix:///system?socket=relative/sock", "qemu:///system"),
    ("test:///default", "qemu:///system"),
])
def test_other_uris_pass_unchanged(target: str, source: str) -> None:
    assert _peer_uri(target, source) == target
