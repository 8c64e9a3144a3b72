"""Issue 13: live migration of a 64 MiB KVM domain between two extra libvirt hosts of this machine.

`Hypervisor.migrate` (vmquota's driver, shared storage) against `virsh migrate --live --p2p` of the same domain with
the same flags and migrate URI, alternating and in both directions, so both see the same hosts and the same guest:
the domain goes a -> b with one and back b -> a with the other, and the order swaps every round. A third figure,
libvirt-python's `migrateToURI3` called straight, shows what the driver adds to libvirt itself (virsh also starts
a process and opens two connections per run).

The hosts are scripts/test-host.sh's (`hosts-bench-a`, `hosts-bench-b`); they, the domain and its disk are removed
at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt

from benchmarks.common import Row, SectionResult, fmt_ms, median, progress, summary
from vmquota import domainxml, vmspec
from vmquota.hypervisor import Hypervisor

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "test-host.sh"
INSTANCE = "hosts-bench"
PORTS = range(49200, 49240)  # the migrate URIs' ports; the test hosts' libvirtd keeps 49240-49250 for itself
SETTLE_S = 1.0  # the source's QEMU is gone when a migration returns; its host settles before the next one


def _host(*args: str) -> str:
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"test-host.sh {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


@contextlib.contextmanager
def _extra_hosts(*names: str) -> Iterator[list[str]]:
    try:
        yield [_host("start", name) for name in names]
    finally:
        for name in names:
            _host("stop", name)


def _free_port() -> int:
    for port in PORTS:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free migration port in 49200-49239")


def _virsh_migrate(source: str, target: str, domain: str, port: int) -> None:
    done = subprocess.run(["virsh", "-q", "-c", source, "migrate", "--live", "--p2p", "--persistent",
                           "--undefinesource", "--unsafe", domain, target, "--migrateuri", f"tcp://127.0.0.1:{port}",
                           "--listen-address", "127.0.0.1"], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"virsh migrate {domain} to {target}: {done.stderr.strip()}")


def _libvirt_migrate(source: str, target: str, domain: str, port: int) -> None:
    conn = libvirt.open(source)
    try:
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
                 | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE | libvirt.VIR_MIGRATE_UNSAFE)
        conn.lookupByName(domain).migrateToURI3(target, {
            libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://127.0.0.1:{port}",
            libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: "127.0.0.1"}, flags)
    finally:
        conn.close()


def migration_section(runs: int) -> SectionResult:
    base = Path("/tmp/hosts") / f"bench-{uuid.uuid4().hex[:6]}"
    disk = base / "root.qcow2"
    base.mkdir(parents=True)
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
        with _extra_hosts("hosts-bench-a", "hosts-bench-b") as uris:
            return _measure(uris, disk, runs)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _measure(uris: list[str], disk: Path, runs: int) -> SectionResult:
    hosts = [Hypervisor(uri, instance=INSTANCE) for uri in uris]
    for host in hosts:
        host.connect()
    ns, name, uid = "hosts-bench", "vm", str(uuid.uuid4())
    domain = domainxml.domain_name(ns, name)
    spec = vmspec.read({"spec": {"template": {"spec": {"domain": {"cpu": {"cores": 1}, "memory": {"guest": "64Mi"}}}}}})
    xml = domainxml.build(namespace=ns, name=name, uid=uid, instance=INSTANCE, spec=spec,
                          disks=[domainxml.DomainDisk(disk, "vda")], domain_type=hosts[0].domain_type)
    hosts[0].start(ns, name, uid, xml)
    at = 0  # the host the domain is on now

    def vmquota(source: int, target: int) -> None:
        hosts[source].migrate(ns, name, uid, hosts[target], migrate_uri=f"tcp://127.0.0.1:{_free_port()}",
                              copy_storage=False, trust_shared_storage=True)

    def virsh(source: int, target: int) -> None:
        _virsh_migrate(uris[source], uris[target], domain, _free_port())

    def direct(source: int, target: int) -> None:
        _libvirt_migrate(uris[source], uris[target], domain, _free_port())

    ways: dict[str, Callable[[int, int], None]] = {"vmquota": vmquota, "virsh": virsh, "libvirt": direct}
    times: dict[str, list[float]] = {way: [] for way in ways}
    try:
        vmquota(0, 1)  # warm-up: each host's first incoming QEMU loads its files
        virsh(1, 0)
        for i in range(runs):
            order = list(ways) if i % 2 == 0 else list(reversed(ways))
            for way in order:
                time.sleep(SETTLE_S)
                t0 = time.perf_counter()
                ways[way](at, 1 - at)
                times[way].append(time.perf_counter() - t0)
                at = 1 - at
            progress(f"migration: run {i + 1}/{runs}: vmquota {fmt_ms(times['vmquota'][-1])}, virsh "
                     f"{fmt_ms(times['virsh'][-1])}, libvirt {fmt_ms(times['libvirt'][-1])}")
    finally:
        with contextlib.suppress(Exception):
            hosts[at].undefine(ns, name, uid)
        for host in hosts:
            host.close()
    ours, virsh_s, direct_s = (median(times[w]) for w in ("vmquota", "virsh", "libvirt"))
    rows = [Row("13", f"KVM live migration of a 64 MiB domain, shared storage (median of {runs})", fmt_ms(ours),
                baseline=f"{fmt_ms(virsh_s)} virsh migrate --live --p2p", ratio=f"{ours / virsh_s:.2f}",
                target="<= 1.15", met=ours / virsh_s <= 1.15),
            Row("13", f"  the same against libvirt-python's migrateToURI3 (median of {runs})", fmt_ms(ours),
                baseline=f"{fmt_ms(direct_s)} migrateToURI3", ratio=f"{ours / direct_s:.2f}")]
    details: dict[str, Any] = {"runs": runs, "ratio_vs_virsh": ours / virsh_s, "ratio_vs_libvirt": ours / direct_s,
                               **{way: summary(values) for way, values in times.items()}}
    return SectionResult(rows, details)
