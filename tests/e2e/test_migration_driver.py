"""Issue 13's bottom layer on real KVM: `Hypervisor.migrate` between extra libvirt hosts of this machine.

Each test starts its own hosts (tests/hosts_harness.py, scripts/test-host.sh) and 64 MiB domains made from vmquota's
own domain XML, with no operating system (QEMU runs the BIOS, which is all a migration needs). Shared storage is
the same file seen by both hosts; local disks are a private folder of the target's over the disks' folder, so the
migration must copy them. Hosts, domains and files are removed whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest
from conftest import wait_until
from hosts_harness import SCRIPT, ExtraHost, extra_host

from vmquota import domainxml, errors, vmspec
from vmquota.hypervisor import DomainState, MigrationProgress, MigrationStep
from vmquota.hypervisor import Hypervisor as Host

pytestmark = pytest.mark.kvm

INSTANCE = "hosts-tests"
MIB = 1 << 20
# This suite's ports for migration data; the test hosts' libvirtd picks its own (a storage copy's NBD server)
# from 49240-49250.
MIGRATION_PORTS = range(49200, 49240)


def free_migration_port() -> int:
    for port in MIGRATION_PORTS:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free migration port in 49200-49239")


@dataclass
class Guest:
    """A 64 MiB domain of vmquota's on one host."""

    ns: str
    name: str
    uid: str
    disk: Path


@dataclass
class Site:
    """This test's folder, its hosts, and the migration events each host told of."""

    base: Path
    steps: list[tuple[str, str, str, MigrationStep]] = field(default_factory=list)
    hosts: list[Host] = field(default_factory=list)

    def host(self, extra: ExtraHost) -> Host:
        host = Host(extra.uri, instance=INSTANCE)
        host.connect()
        host.listen_migrations(lambda *step: self.steps.append(step))
        self.hosts.append(host)
        return host

    def steps_on(self, host: Host) -> list[MigrationStep]:
        return [step for uri, _ns, _name, step in list(self.steps) if uri == host.uri]

    def guest(self, host: Host, *, random_mib: int = 0, seed: bool = False) -> Guest:
        """A running domain on `host` whose disk is a qcow2 under this test's disks folder; `random_mib` of random
        data in it make a storage copy take its time; `seed` adds a read-only CD-ROM beside it, as cloud-init's."""
        ns = f"hosts-{uuid.uuid4().hex[:6]}"
        guest = Guest(ns, "vm", str(uuid.uuid4()), self.base / "disks" / ns / "root.qcow2")
        guest.disk.parent.mkdir(parents=True)
        if random_mib:
            raw = self.base / f"{ns}.raw"
            with open(raw, "wb") as out:
                out.write(os.urandom(random_mib * MIB))
            subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(guest.disk)], check=True)
            raw.unlink()
        else:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(guest.disk), "64M"], check=True)
        # The spec gives CPU and memory; the disk is handed to the domain XML directly, as vmquota's volumes do.
        spec = vmspec.read({"spec": {"runStrategy": "Manual", "template": {"spec": {"domain": {
            "cpu": {"cores": 1}, "memory": {"guest": "64Mi"}}}}}})
        cdrom = None
        if seed:
            cdrom = domainxml.Seed(guest.disk.parent / "seed.iso", cdrom=True)
            cdrom.path.write_bytes(os.urandom(MIB + 512))  # any bytes do: only their copy is checked
        xml = domainxml.build(namespace=ns, name=guest.name, uid=guest.uid, instance=INSTANCE, spec=spec,
                              disks=[domainxml.DomainDisk(guest.disk, "vda")], domain_type=host.domain_type,
                              seed=cdrom)
        host.start(ns, guest.name, guest.uid, xml)
        assert host.observe(ns, guest.name).state is DomainState.RUNNING
        return guest


@pytest.fixture
def site() -> Iterator[Site]:
    base = Path("/tmp/hosts") / uuid.uuid4().hex[:8]
    (base / "disks").mkdir(parents=True)
    s = Site(base)
    try:
        yield s
    finally:
        for host in s.hosts:
            host.close()
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def two_hosts(site: Site, *, private_target: bool = False) -> Iterator[tuple[ExtraHost, ExtraHost]]:
    """Hosts a and b; b's view of the disks folder is a private one of its own when `private_target`."""
    tag = uuid.uuid4().hex[:6]
    with extra_host(f"{tag}-a") as a, \
            extra_host(f"{tag}-b", private_dirs=(site.base / "disks",) if private_target else ()) as b:
        yield a, b


def private_copy(extra: ExtraHost, site: Site, path: Path) -> Path:
    """Where the file that `extra` sees at `path` (inside its private disks folder) lies on this machine."""
    return Path("/tmp/vmquota-hosts") / extra.name / "private" / "0" / path.relative_to(site.base / "disks")


def domain_of(host: Host, guest: Guest) -> Any:
    return libvirt.open(host.uri).lookupByName(domainxml.domain_name(guest.ns, guest.name))


def copying(host: Host, guest: Guest) -> bool:
    """The guest's migration job has begun moving data (libvirt knows how much there is)."""
    progress = host.migration_progress(guest.ns, guest.name, guest.uid)
    return progress is not None and progress.total_bytes > 0 and progress.processed_bytes > 0


def test_shared_storage_migration_there_and_back(site: Site) -> None:
    with two_hosts(site) as (a_host, b_host):
        a, b = site.host(a_host), site.host(b_host)
        guest = site.guest(a)
        progress: list[MigrationProgress] = []

        a.migrate(guest.ns, guest.name, guest.uid, b, migrate_uri=f"tcp://127.0.0.1:{free_migration_port()}",
                  copy_storage=False, trust_shared_storage=True, on_progress=progress.append,
                  progress_interval=0.05)

        assert b.observe(guest.ns, guest.name).state is DomainState.RUNNING
        assert b.observe(guest.ns, guest.name).uid == guest.uid
        assert b.owner(guest.ns, guest.name) == guest.uid  # vmquota's metadata went with it
        assert a.observe(guest.ns, guest.name).state is DomainState.ABSENT  # UNDEFINE_SOURCE: nothing left
        assert domain_of(b, guest).isPersistent()  # PERSIST_DEST: it survives a restart of b's daemon
        assert progress and max(p.total_bytes for p in progress) >= 64 * MIB
        # The events tell a migration from a shutdown, on each side.
        wait_until(lambda: site.steps_on(a) == [MigrationStep.PAUSED, MigrationStep.LEFT]
                   and site.steps_on(b) == [MigrationStep.ARRIVED, MigrationStep.RESUMED],
                   timeout=10, what=f"the migration events, seen so far: {site.steps}")

        site.steps.clear()
        # No port: a's libvirtd picks one of its own (49240-49250 on the test hosts).
        b.migrate(guest.ns, guest.name, guest.uid, a, migrate_uri="tcp://127.0.0.1",
                  copy_storage=False, trust_shared_storage=True)
        assert a.observe(guest.ns, guest.name).state is DomainState.RUNNING
        assert b.observe(guest.ns, guest.name).state is DomainState.ABSENT
        wait_until(lambda: MigrationStep.LEFT in site.steps_on(b) and MigrationStep.RESUMED in site.steps_on(a),
                   timeout=10, what="the way back's events")


def test_local_disks_are_copied(site: Site) -> None:
    with two_hosts(site, private_target=True) as (a_host, b_host):
        a, b = site.host(a_host), site.host(b_host)
        guest = site.guest(a, random_mib=8, seed=True)
        copy = private_copy(b_host, site, guest.disk)
        seed = guest.disk.parent / "seed.iso"
        assert not copy.exists()

        a.migrate(guest.ns, guest.name, guest.uid, b, migrate_uri=f"tcp://127.0.0.1:{free_migration_port()}",
                  copy_storage=True)

        assert b.observe(guest.ns, guest.name).state is DomainState.RUNNING
        assert a.observe(guest.ns, guest.name).state is DomainState.ABSENT
        # b's disk is a file of its own with the source's contents; the source's file is left for its owner.
        assert copy.exists() and guest.disk.exists()
        subprocess.run(["qemu-img", "compare", "-q", "-U", str(guest.disk), str(copy)], check=True)
        # The read-only seed, which libvirt does not copy, was streamed over before the target's QEMU opened it.
        assert private_copy(b_host, site, seed).read_bytes() == seed.read_bytes()
        pools = libvirt.open(b.uri).listAllStoragePools()
        assert pools == []  # the transient pool that made the disk is gone again


def test_copying_onto_shared_storage_is_refused(site: Site) -> None:
    with two_hosts(site) as (a_host, b_host):
        a, b = site.host(a_host), site.host(b_host)
        guest = site.guest(a)
        before = guest.disk.read_bytes()
        with pytest.raises(errors.HypervisorError, match=r"already has a file at .*root\.qcow2"):
            a.migrate(guest.ns, guest.name, guest.uid, b,
                      migrate_uri=f"tcp://127.0.0.1:{free_migration_port()}", copy_storage=True)
        assert a.observe(guest.ns, guest.name).state is DomainState.RUNNING
        assert b.observe(guest.ns, guest.name).state is DomainState.ABSENT
        assert libvirt.open(b.uri).listAllStoragePools() == []
        assert guest.disk.read_bytes() == before

        # Without trust_shared_storage libvirt itself refuses a disk on a local file system.
        with pytest.raises(errors.HypervisorError, match="Migration without shared storage is unsafe"):
            a.migrate(guest.ns, guest.name, guest.uid, b,
                      migrate_uri=f"tcp://127.0.0.1:{free_migration_port()}", copy_storage=False)
        assert a.observe(guest.ns, guest.name).state is DomainState.RUNNING


def test_abort_leaves_it_running_on_the_source(site: Site) -> None:
    with two_hosts(site, private_target=True) as (a_host, b_host):
        a, b = site.host(a_host), site.host(b_host)
        guest = site.guest(a, random_mib=32)  # at 1 MiB/s its copy takes half a minute
        failure: list[BaseException] = []

        def migrate() -> None:
            try:
                a.migrate(guest.ns, guest.name, guest.uid, b, migrate_uri=f"tcp://127.0.0.1:{free_migration_port()}",
                          copy_storage=True, bandwidth_mib_s=1)
            except BaseException as e:
                failure.append(e)

        thread = threading.Thread(target=migrate)
        thread.start()
        try:
            wait_until(lambda: failure or copying(a, guest), timeout=30, what="the disk copy to begin")
            assert not failure
            assert a.abort_migration(guest.ns, guest.name, guest.uid)
        finally:
            thread.join(timeout=60)
        assert not thread.is_alive()

        assert len(failure) == 1 and isinstance(failure[0], errors.HypervisorError)
        assert "canceled by client" in str(failure[0])
        assert a.observe(guest.ns, guest.name).state is DomainState.RUNNING
        assert b.observe(guest.ns, guest.name).state is DomainState.ABSENT
        assert not private_copy(b_host, site, guest.disk).exists()  # the half-copied disk was removed
        assert a.migration_progress(guest.ns, guest.name, guest.uid) is None
        assert not a.abort_migration(guest.ns, guest.name, guest.uid)  # nothing left to cancel
        wait_until(lambda: MigrationStep.ARRIVED in site.steps_on(b), timeout=10, what="b's incoming domain event")
        assert MigrationStep.LEFT not in site.steps_on(a)


def test_a_host_that_is_down_is_a_clear_error(site: Site) -> None:
    with two_hosts(site) as (a_host, b_host):
        a = site.host(a_host)
        b = Host(b_host.uri, instance=INSTANCE)
        guest = site.guest(a)
        b_host.stop()
        with pytest.raises(errors.HypervisorUnavailable, match=r"cannot reach the hypervisor at .*hosts-.*-b"):
            a.migrate(guest.ns, guest.name, guest.uid, b, migrate_uri=f"tcp://127.0.0.1:{free_migration_port()}",
                      copy_storage=False, trust_shared_storage=True)
        assert a.observe(guest.ns, guest.name).state is DomainState.RUNNING


def test_the_target_daemon_killed_mid_way_leaves_it_on_the_source(site: Site) -> None:
    with two_hosts(site, private_target=True) as (a_host, b_host):
        a, b = site.host(a_host), site.host(b_host)
        guest = site.guest(a, random_mib=32)
        failure: list[BaseException] = []

        def migrate() -> None:
            try:
                a.migrate(guest.ns, guest.name, guest.uid, b, migrate_uri=f"tcp://127.0.0.1:{free_migration_port()}",
                          copy_storage=True, bandwidth_mib_s=1)
            except BaseException as e:
                failure.append(e)

        thread = threading.Thread(target=migrate)
        thread.start()
        try:
            wait_until(lambda: failure or copying(a, guest), timeout=30, what="the disk copy to begin")
            assert not failure
            b_host.kill_daemon()  # SIGKILL of b's libvirtd; its incoming QEMU is left behind
        finally:
            thread.join(timeout=90)
        assert not thread.is_alive()
        assert len(failure) == 1 and isinstance(failure[0], errors.HypervisorError), failure
        wait_until(lambda: a.observe(guest.ns, guest.name).state is DomainState.RUNNING, timeout=30,
                   what="the guest to run on the source again")
        assert a.migration_progress(guest.ns, guest.name, guest.uid) is None
        # b comes back and ends the half-arrived copy itself: the guest never runs twice.
        b_host.restart_daemon()
        wait_until(lambda: b.observe(guest.ns, guest.name).state is DomainState.ABSENT, timeout=30,
                   what="b to drop the interrupted incoming domain")
        assert a.observe(guest.ns, guest.name).state is DomainState.RUNNING
        wait_until(lambda: len(qemus_of(guest)) == 1, timeout=30, what="one QEMU of the guest: the source's")


def qemus_of(guest: Guest) -> list[int]:
    """The QEMU processes on this machine that run this guest's domain, on whichever host."""
    wanted = f"guest={domainxml.domain_name(guest.ns, guest.name)},".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if wanted in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
    return found


def test_refusals_change_nothing(site: Site) -> None:
    with two_hosts(site) as (a_host, b_host):
        a, b = site.host(a_host), site.host(b_host)
        guest = site.guest(a)
        port = free_migration_port()
        for bad in ("http://127.0.0.1:1", "tcp://127.0.0.1:", "tcp://127.0.0.1:99999", "tcp://:49200",
                    f"tcp://127.0.0.1:{port}/x", f"tcp://u@127.0.0.1:{port}", "127.0.0.1:49200"):
            with pytest.raises(errors.HypervisorError, match="invalid migration URI"):
                a.migrate(guest.ns, guest.name, guest.uid, b, migrate_uri=bad, copy_storage=False,
                          trust_shared_storage=True)
        with pytest.raises(errors.HypervisorError, match="has no domain of vmquota's"):
            a.migrate(guest.ns, guest.name, str(uuid.uuid4()), b, migrate_uri=f"tcp://127.0.0.1:{port}",
                      copy_storage=False, trust_shared_storage=True)
        with pytest.raises(errors.HypervisorError, match="the target is this host"):
            a.migrate(guest.ns, guest.name, guest.uid, a, migrate_uri=f"tcp://127.0.0.1:{port}",
                      copy_storage=False, trust_shared_storage=True)
        # A domain of the same name on the target that vmquota did not make is left alone, and refused.
        foreign = domain_of(a, guest).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace(guest.uid, str(uuid.uuid4()))
        conn_b = libvirt.open(b.uri)
        conn_b.defineXML(foreign.replace(f'instance="{INSTANCE}"', 'instance="someone-else"'))
        with pytest.raises(errors.HypervisorError, match="that vmquota did not create"):
            a.migrate(guest.ns, guest.name, guest.uid, b, migrate_uri=f"tcp://127.0.0.1:{port}",
                      copy_storage=False, trust_shared_storage=True)
        assert len(conn_b.listAllDomains()) == 1
        assert a.observe(guest.ns, guest.name).state is DomainState.RUNNING
        assert guest.disk.exists()


# -- the extra hosts themselves (scripts/test-host.sh) ----------------------------------------------------------

HOSTS_ROOT = Path("/tmp/vmquota-hosts")


def daemon_pid(extra: ExtraHost) -> int:
    return int((HOSTS_ROOT / extra.name / "libvirtd.pid").read_text())


def script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False)


def host_uuid(uri: str) -> str:
    conn = libvirt.openReadOnly(uri)
    try:
        return str(ET.fromstring(conn.getCapabilities()).findtext("host/uuid"))
    finally:
        conn.close()


def test_extra_hosts_are_hosts_of_their_own(site: Site) -> None:
    system_pid = Path("/run/libvirtd.pid").read_text().strip()
    marker = site.base / "disks" / "seen-by-shared-hosts"
    marker.write_text("here")
    tag = uuid.uuid4().hex[:6]
    with extra_host(f"{tag}-a") as a, extra_host(f"{tag}-b", private_dirs=(site.base / "disks",)) as b:
        uuids = {host_uuid(a.uri), host_uuid(b.uri), host_uuid("qemu:///system")}
        assert len(uuids) == 3  # libvirt refuses a migration between hosts that share one
        assert a.uri == f"qemu+unix:///system?socket={HOSTS_ROOT}/{a.name}/run/libvirt-sock"
        pids = {daemon_pid(a), daemon_pid(b)}
        assert str(system_pid) not in {str(p) for p in pids}
        listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
        assert not any(f"pid={pid}," in listening for pid in pids)  # a unix socket only, no TCP

        # b sees an empty folder of its own over the disks folder; a sees this machine's.
        def seen_by(extra: ExtraHost) -> list[str]:
            return subprocess.run(["nsenter", f"--mount=/proc/{daemon_pid(extra)}/ns/mnt", "ls", str(marker.parent)],
                                  capture_output=True, text=True, check=True).stdout.split()
        assert seen_by(a) == [marker.name]
        assert seen_by(b) == []

        # Starting a running host again changes nothing; with other private folders it is refused.
        again = script("start", a.name)
        assert again.returncode == 0 and again.stdout.strip() == a.uri and daemon_pid(a) in pids
        other = script("start", a.name, "--private-dir", str(site.base))
        assert other.returncode == 1 and "already runs with other private folders" in other.stderr
    assert not (HOSTS_ROOT / a.name).exists() and not (HOSTS_ROOT / b.name).exists()
    assert script("stop", a.name).returncode == 0  # nothing left to stop: still fine
    assert Path("/run/libvirtd.pid").read_text().strip() == system_pid  # the system daemon was never touched


@pytest.mark.parametrize(("args", "message"), [
    (("start", "Bad_Name"), "invalid host name 'Bad_Name'"),
    (("start", "hosts-x", "--private-dir", "relative/dir"), "not an absolute path"),
    (("start", "hosts-x", "--private-dir", "/nonexistent/hosts-dir"), "no such folder"),
    (("start", "hosts-x", "--private-dir", "/etc"), "not a folder a test host may hide"),
    (("start", "hosts-x", "--private-dir", "/tmp"), "not a folder a test host may hide (it holds"),
    (("start", "hosts-x", "--private-dir"), "--private-dir needs a folder"),
    (("start", "hosts-x", "--bogus"), "unknown option '--bogus'"),
    (("kill", "hosts-x-not-running"), "has no libvirtd running"),
    (("stop", "../etc"), "invalid host name"),
])
def test_test_host_refuses_bad_input(args: tuple[str, ...], message: str) -> None:
    done = script(*args)
    assert done.returncode != 0
    assert message in done.stderr
    assert not (HOSTS_ROOT / "hosts-x").exists()


def test_from_the_system_daemon_and_back(site: Site) -> None:
    """The server's own host (qemu:///system, the first node) to an extra host and back, shared storage."""
    system = Host("qemu:///system", instance=INSTANCE)
    system.connect()
    site.hosts.append(system)
    tag = uuid.uuid4().hex[:6]
    with extra_host(f"{tag}-x") as x_host:
        x = site.host(x_host)
        guest = site.guest(system)
        try:
            system.migrate(guest.ns, guest.name, guest.uid, x, migrate_uri=f"tcp://127.0.0.1:{free_migration_port()}",
                           copy_storage=False, trust_shared_storage=True)
            assert x.observe(guest.ns, guest.name).state is DomainState.RUNNING
            assert system.observe(guest.ns, guest.name).state is DomainState.ABSENT
            x.migrate(guest.ns, guest.name, guest.uid, system, migrate_uri=f"tcp://127.0.0.1:{free_migration_port()}",
                      copy_storage=False, trust_shared_storage=True)
            assert system.observe(guest.ns, guest.name).state is DomainState.RUNNING
            assert x.observe(guest.ns, guest.name).state is DomainState.ABSENT
        finally:
            system.undefine(guest.ns, guest.name, guest.uid)  # wherever it is, nothing of it stays on the system
    assert system.observe(guest.ns, guest.name).state is DomainState.ABSENT
