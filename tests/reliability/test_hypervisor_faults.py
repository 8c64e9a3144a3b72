"""Hypervisor faults on real KVM: libvirtd killed and restarted while VMs run, QEMU processes killed, domains started
and undefined behind vmquota's back, and domains vmquota did not create living among its own.

vmquota must keep serving, report the fault on the VM (a condition) and in events, account exactly what libvirt
runs once libvirt answers again, and never touch a domain it did not create.

WARNING: `test_libvirtd_killed_and_restarted_while_vms_run` KILLS the machine's libvirtd (every qemu:///system user
on this machine sees it go). It restarts it with scripts/libvirtd-up.sh in a `finally` block and waits until
`virsh -c qemu:///system version` answers again; running QEMU processes survive a libvirtd restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from conftest import vm_manifest, wait_until
from kvm_harness import URI, Server
from reliability import profile
from reliability.invariants import NAMESPACES, events_path, look, quotas_path, violations, vms_path

from vmquota.client import Client, action_path

pytestmark = pytest.mark.kvm
REPO = Path(__file__).resolve().parents[2]


def foreign_domain(conn: Any, name: str) -> Any:
    """A small running domain defined straight in libvirt, as another tool or a person would."""
    try:
        conn.getDomainCapabilities(None, None, None, "kvm")
        kind = "kvm"
    except libvirt.libvirtError:
        kind = "qemu"
    dom = conn.defineXML(f"<domain type='{kind}'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>"
                         "<os><type arch='x86_64'>hvm</type></os><devices><memballoon model='none'/></devices>"
                         "</domain>")
    dom.create()
    return dom


def qemu_pid(domain: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text())


class Rig:
    """A `vmquota serve` on qemu:///system, a namespace with a quota, and the test's own libvirt connection."""

    def __init__(self, tmp_path: Path) -> None:
        self.data_dir = tmp_path / "data"
        self.server = Server(self.data_dir)
        self.server.start()
        self.ns = f"fault-{uuid.uuid4().hex[:8]}"
        self.client = Client(self.server.url)
        self.conn = libvirt.open(URI)
        self.foreign: list[str] = []  # domains made straight in libvirt, removed at the end
        self.client.post(NAMESPACES, {"metadata": {"name": self.ns}})
        self.client.post(quotas_path(self.ns), {"metadata": {"name": "compute"},
                                                "spec": {"hard": {"limits.cpu": "4", "limits.memory": "1Gi"}}})

    def reconnect(self) -> None:
        self.conn.close()
        self.conn = libvirt.open(URI)

    def create(self, name: str, strategy: str = "Manual", disk: str | None = "64Mi") -> None:
        self.client.post(vms_path(self.ns), vm_manifest(name, cores=1, memory="128Mi", disk=disk, strategy=strategy))

    def vm(self, name: str) -> dict[str, Any]:
        return dict(self.client.get(f"{vms_path(self.ns)}/{name}"))

    def phase(self, name: str) -> str:
        return str(self.vm(name)["status"].get("printableStatus"))

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> None:
        wait_until(lambda: self.phase(name) == phase, timeout=timeout, what=f"{name} to be {phase}")

    def domain(self, name: str) -> Any:
        return self.conn.lookupByName(f"vmquota_{self.ns}_{name}")

    def events(self, name: str) -> list[str]:
        """The reasons of `name`'s events, oldest first (events are listed by name, not by time)."""
        items = sorted(self.client.get(events_path(self.ns))["items"],
                       key=lambda e: int(e["metadata"]["resourceVersion"]))
        return [e["reason"] for e in items if e["involvedObject"]["name"] == name]

    def used(self) -> dict[str, str]:
        return dict(self.client.get(f"{quotas_path(self.ns)}/compute")["status"]["used"])

    def truth_problems(self, *, may_exceed: bool = False) -> list[str]:
        world = look(self.client, self.conn, [self.ns])
        return violations(world, may_exceed=may_exceed, disks_root=self.data_dir / "disks")

    def wait_truth(self, *, may_exceed: bool = False) -> None:
        """Until usage equals libvirt's truth and nothing is between two phases (a recount runs every 2 s)."""
        deadline = time.monotonic() + 60
        while problems := self.truth_problems(may_exceed=may_exceed):
            assert time.monotonic() < deadline, "\n".join(problems)
            time.sleep(0.2)

    def close(self) -> None:
        if not self.conn.isAlive():  # libvirtd was restarted under this connection
            self.reconnect()
        try:
            for vm in self.client.get(vms_path(self.ns))["items"]:
                self.client.delete(f"{vms_path(self.ns)}/{vm['metadata']['name']}")
            wait_until(lambda: self.client.get(vms_path(self.ns))["items"] == [], timeout=120,
                       what="every VM to be deleted")
            self.client.delete(f"{NAMESPACES}/{self.ns}")
        finally:
            self.client.close()
            self.server.stop()
            leftovers = [d.name() for d in self.conn.listAllDomains() if d.name().startswith(f"vmquota_{self.ns}_")
                         and d.name() not in self.foreign]
            for name in self.foreign:
                dom = self.conn.lookupByName(name)
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            self.conn.close()
        assert leftovers == [], "domains left behind"
        assert not any((self.data_dir / "disks").rglob("*.qcow2")), "disk files left behind"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def libvirtd_answers() -> bool:
    return subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, timeout=30, check=False).returncode == 0


def system_libvirtd_pid() -> int | None:
    """The system daemon's pid, from its pid file: never another libvirtd (the tests' extra hosts run their own)."""
    try:
        pid = int(Path("/run/libvirtd.pid").read_text().strip())
        return pid if Path(f"/proc/{pid}/comm").read_text().strip() == "libvirtd" else None
    except (OSError, ValueError):
        return None


def kill_libvirtd() -> None:
    pid = system_libvirtd_pid()
    assert pid is not None, "no system libvirtd to kill"
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: system_libvirtd_pid() is None, timeout=30, what="libvirtd to die")


def start_libvirtd() -> None:
    subprocess.run(["bash", str(REPO / "scripts" / "libvirtd-up.sh")], capture_output=True, timeout=120, check=True)
    wait_until(libvirtd_answers, timeout=60, what="virsh -c qemu:///system version to answer")


def test_libvirtd_killed_and_restarted_while_vms_run(rig: Rig) -> None:
    """KILLS libvirtd (see the module's docstring) and brings it back in `finally`."""
    rig.create("always", strategy="Always")
    rig.create("manual")
    rig.create("later")
    rig.client.put(action_path(rig.ns, "manual", "start"))
    rig.wait_phase("always", "Running")
    rig.wait_phase("manual", "Running")
    rig.foreign += [f"vmquota_{rig.ns}_intruder", f"other-{rig.ns}"]  # the first is named like one of vmquota's
    foreign = [foreign_domain(rig.conn, name) for name in rig.foreign]
    ids = {d.name(): d.ID() for d in [rig.domain("always"), rig.domain("manual"), *foreign]}
    manual_pid = qemu_pid(f"vmquota_{rig.ns}_manual")
    try:
        kill_libvirtd()
        rig.client.put(action_path(rig.ns, "later", "start"))  # admitted: the start waits for the hypervisor
        os.kill(manual_pid, signal.SIGKILL)  # and a guest dies while nobody can tell
        wait_until(lambda: any(c.get("reason") == "HypervisorUnavailable"
                               for c in rig.vm("later")["status"]["conditions"]), timeout=30,
                   what="the outage to be reported on the VM waiting to start")
        assert "HypervisorUnavailable" in rig.events("later")
        assert rig.phase("later") == "Starting"
        assert rig.used()["limits.cpu"] == "3"  # admitted charges stay: always, manual (as far as known), later
        assert rig.client.get("/healthz") == "ok"
    finally:
        start_libvirtd()
    rig.reconnect()
    rig.wait_phase("later", "Running")
    rig.wait_phase("manual", "Stopped")
    rig.wait_truth()
    assert not any(c.get("reason") == "HypervisorUnavailable" for c in rig.vm("later")["status"]["conditions"])
    events = rig.events("later")
    assert "HypervisorAvailable" in events
    assert events.index("HypervisorAvailable") < events.index("Started")  # the outage's end is told first
    assert rig.vm("manual")["status"]["lastExit"] in ("Crashed", "Failed", "Destroyed")
    assert rig.used() == {"limits.cpu": "2", "limits.memory": "256Mi"}
    survivors = {name: rig.conn.lookupByName(name).ID() for name in ids if name != f"vmquota_{rig.ns}_manual"}
    assert survivors == {name: ident for name, ident in ids.items() if name != f"vmquota_{rig.ns}_manual"}
    profile.record("hypervisor-faults", faults=["libvirtd SIGKILLed and restarted", "QEMU killed while libvirtd was "
                                                "down", "start requested while libvirtd was down"])


def test_domains_killed_started_and_undefined_behind_vmquotas_back(rig: Rig) -> None:
    for name in ("killed", "outside", "undefined-running", "undefined-stopped"):
        rig.create(name)
        rig.client.put(action_path(rig.ns, name, "start"))
    rig.foreign.append(f"vmquota_{rig.ns}_intruder")
    intruder = foreign_domain(rig.conn, rig.foreign[0])
    for name in ("killed", "outside", "undefined-running", "undefined-stopped"):
        rig.wait_phase(name, "Running")
    for name in ("outside", "undefined-stopped"):
        rig.client.put(action_path(rig.ns, name, "stop"))
        rig.wait_phase(name, "Stopped")

    os.kill(qemu_pid(f"vmquota_{rig.ns}_killed"), signal.SIGKILL)  # QEMU dies (OOM killer, a crash...)
    rig.domain("outside").create()  # someone runs `virsh start`
    rig.domain("undefined-running").undefine()  # `virsh undefine` of a running domain: it runs on, transient
    rig.domain("undefined-stopped").undefine()
    rig.wait_phase("killed", "Stopped")
    assert "Crashed" in rig.events("killed")
    rig.wait_phase("outside", "Running")
    assert "StartedOutsideVmquota" in rig.events("outside")
    rig.wait_truth()
    assert rig.phase("undefined-running") == "Running"

    rig.client.put(action_path(rig.ns, "undefined-running", "stop"))  # the transient domain goes away for good
    rig.wait_phase("undefined-running", "Stopped")
    for name in ("undefined-running", "undefined-stopped", "killed"):
        rig.client.put(action_path(rig.ns, name, "start"))  # defined again from the VM
        rig.wait_phase(name, "Running")
    rig.wait_truth()
    assert rig.used() == {"limits.cpu": "4", "limits.memory": "512Mi"}
    time.sleep(2.5)  # one more periodic recount (every 2 s) passes over the intruder
    assert intruder.isActive() and rig.conn.lookupByName(f"vmquota_{rig.ns}_intruder").ID() == intruder.ID()
    profile.record("hypervisor-faults", faults=["QEMU SIGKILLed", "virsh start behind vmquota's back",
                                                "virsh undefine of a running domain", "virsh undefine of a stopped "
                                                "domain", "a foreign domain named like vmquota's"])
