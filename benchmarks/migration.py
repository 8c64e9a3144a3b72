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
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt

from benchmarks.common import Row, SectionResult, ServerProcess, fmt_ms, median, progress, summary
from vmquota import cli as vmquota_cli
from vmquota import domainxml, vmspec
from vmquota.client import Client
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


# -- the controller's migration: `vmquota migrate --wait` against virsh ------------------------------------------

BENCH_NS = "migbench"


def controller_section(runs: int) -> SectionResult:
    """Issue 13's figure: a migration request to Succeeded through vmquota (the API, the controller's placement and
    reservation, Hypervisor.migrate, the outcome's transaction), timed as a user sees it: `vmquota migrate --to NODE
    --wait` (a process, as virsh is one), and the same two calls made in this process (no interpreter start-up).
    The baseline is `virsh migrate --live --p2p` of a like domain: the VM's own domain XML under another name and
    UUID, with no vmquota metadata (vmquota never touches it), its own blank disk of the same size and its own serial
    log, running on the same two hosts at the same time. The three ways alternate, their order swapped each round;
    each moves its domain to the other host."""
    tag = uuid.uuid4().hex[:6]
    base = Path(tempfile.mkdtemp(prefix="vmquota-bench-migration-"))
    try:
        with _extra_hosts(f"hosts-migbench-{tag}-a", f"hosts-migbench-{tag}-b") as uris:
            server = ServerProcess(base / "data", uris[0], extra_args=("--node-status-update-frequency", "1",
                                                                        "--memory-overhead", "none"))
            server.start()
            try:
                return _measure_controller(server, uris, base, runs)
            except Exception as e:
                raise RuntimeError(f"{e}; server log:\n{server.log_tail()}") from e
            finally:
                server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _twin_xml(vm_xml: str, name: str, disk: Path, console_log: Path) -> str:
    """The like domain: the VM's inactive XML with another name and UUID, no vmquota metadata, its own files."""
    root = ET.fromstring(vm_xml)
    for tag in ("uuid", "metadata", "title"):
        for element in root.findall(tag):
            root.remove(element)
    name_element = root.find("name")
    assert name_element is not None
    name_element.text = name
    disks = [d for d in root.iterfind("devices/disk") if d.get("device", "disk") == "disk"]
    if len(disks) != 1 or disks[0].find("source") is None:
        raise RuntimeError("the VM's domain should have exactly one disk")
    disks[0].find("source").set("file", str(disk))  # type: ignore[union-attr]
    for log_element in root.iterfind("devices/*/log"):
        log_element.set("file", str(console_log))
    return ET.tostring(root, encoding="unicode")


def _measure_controller(server: ServerProcess, uris: list[str], base: Path, runs: int) -> SectionResult:
    client = Client(server.url)
    twin = "migbench-twin"
    conns = [libvirt.open(uri) for uri in uris]
    try:
        client.post("/api/v1/namespaces", {"metadata": {"name": BENCH_NS}})
        client.post("/api/v1/nodes", {"metadata": {"name": "b"}, "spec": {"providerID": uris[1]}})
        _wait(lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in
                          client.get("/api/v1/nodes/b").get("status", {}).get("conditions", [])), "node b")
        vm_path = f"/apis/kubevirt.io/v1/namespaces/{BENCH_NS}/virtualmachines/web"
        client.post(f"/apis/kubevirt.io/v1/namespaces/{BENCH_NS}/virtualmachines", {
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "web"}, "spec": {
                "runStrategy": "Always",
                "dataVolumeTemplates": [{"metadata": {"name": "web-root"}, "spec": {"storage": {
                    "resources": {"requests": {"storage": "64Mi"}}}}}],
                "template": {"spec": {"terminationGracePeriodSeconds": 0, "domain": {
                    "cpu": {"cores": 1}, "memory": {"guest": "64Mi"},
                    "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]}},
                    "volumes": [{"name": "root", "dataVolume": {"name": "web-root"}}]}}}})
        _wait(lambda: client.get(vm_path).get("status", {}).get("printableStatus") == "Running", "web to run")
        by_uri = {n["spec"]["providerID"]: n["metadata"]["name"] for n in client.get("/api/v1/nodes")["items"]}
        nodes = [by_uri[uri] for uri in uris]
        vm_at = nodes.index(client.get(vm_path)["status"]["nodeName"])  # placement may have chosen either
        twin_at = vm_at
        domain = domainxml.domain_name(BENCH_NS, "web")
        twin_disk = base / "twin.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(twin_disk), "64M"], check=True)
        xml = _twin_xml(conns[vm_at].lookupByName(domain).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), twin,
                        twin_disk, base / "twin-console.log")
        conns[twin_at].defineXML(xml).create()

        def cli_way(source: int, target: int) -> None:
            done = subprocess.run([sys.executable, "-m", "vmquota", "--server", server.url, "migrate", "web", "-n",
                                   BENCH_NS, "--to", nodes[target], "--wait", "--timeout", "120"],
                                  capture_output=True, text=True, timeout=150, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"vmquota migrate: {done.stderr.strip()}")

        def api_way(source: int, target: int) -> None:
            vmquota_cli.migrate(client, BENCH_NS, "web", nodes[target])
            vmquota_cli.wait_for_migration(client, BENCH_NS, "web", 120)

        def virsh_way(source: int, target: int) -> None:
            _virsh_migrate(uris[source], uris[target], twin, _free_port())

        ways: dict[str, Callable[[int, int], None]] = {"cli": cli_way, "api": api_way, "virsh": virsh_way}
        times: dict[str, list[float]] = {way: [] for way in ways}

        def run(way: str) -> float:
            nonlocal vm_at, twin_at
            source = twin_at if way == "virsh" else vm_at
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            ways[way](source, 1 - source)
            took = time.perf_counter() - t0
            if way == "virsh":
                twin_at = 1 - twin_at
            else:
                vm_at = 1 - vm_at
            return took

        run("cli")  # warm-up: each host's first incoming QEMU loads its files
        run("virsh")
        for i in range(runs):
            for way in (list(ways) if i % 2 == 0 else list(reversed(ways))):
                times[way].append(run(way))
            progress(f"migration-controller: run {i + 1}/{runs}: vmquota migrate --wait "
                     f"{fmt_ms(times['cli'][-1])}, API {fmt_ms(times['api'][-1])}, virsh {fmt_ms(times['virsh'][-1])}")
    finally:
        libvirt.registerErrorHandler(lambda *_: None, None)  # a lookup on the host without the twin is no news
        with contextlib.suppress(Exception):
            for conn in conns:
                with contextlib.suppress(libvirt.libvirtError):
                    dom = conn.lookupByName(twin)
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.destroy()
                    dom.undefine()
        with contextlib.suppress(Exception):
            client.delete(f"/apis/kubevirt.io/v1/namespaces/{BENCH_NS}/virtualmachines/web")
        client.close()
        for conn in conns:
            conn.close()
    cli_s, api_s, virsh_s = (median(times[w]) for w in ("cli", "api", "virsh"))
    rows = [Row("13", f"vmquota migrate --wait of a running 64 MiB KVM VM, request to Succeeded (median of {runs})",
                fmt_ms(cli_s), baseline=f"{fmt_ms(virsh_s)} virsh migrate --live --p2p", ratio=f"{cli_s / virsh_s:.2f}",
                target="<= 1.15", met=cli_s / virsh_s <= 1.15),
            Row("13", f"  the same two API calls from this process (median of {runs})", fmt_ms(api_s),
                baseline=f"{fmt_ms(virsh_s)} virsh", ratio=f"{api_s / virsh_s:.2f}")]
    details: dict[str, Any] = {"runs": runs, "ratio_cli_vs_virsh": cli_s / virsh_s,
                               "ratio_api_vs_virsh": api_s / virsh_s,
                               **{way: summary(values) for way, values in times.items()}}
    return SectionResult(rows, details)
