"""What every section shares: statistics, result rows, VM manifests, a bulk-filled store and a server process."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vmquota import accounting, disks, objects, usage, vmspec, vmstatus
from vmquota.client import Client
from vmquota.kubeconfig import Connection
from vmquota.store import Store, Transaction
from vmquota.usage import OverheadModel
from vmquota.vmstatus import Phase

# A quota so large no benchmark ever hits it: admission still checks every resource against it.
BIG_HARD = {"limits.cpu": "1000000", "limits.memory": "1Ei", "requests.cpu": "1000000",
            "requests.memory": "1Ei", "requests.storage": "1Ei", "count/virtualmachines.kubevirt.io": "10000000",
            "requests.instances/vmi": "10000000"}


# -- statistics and results ---------------------------------------------------------------------------

def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def summary(seconds: Sequence[float]) -> dict[str, float]:
    """Milliseconds: what the JSON keeps of a list of durations."""
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "mean_ms": sum(ms) / len(ms), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99), "min_ms": min(ms), "max_ms": max(ms)}


@dataclass
class Row:
    """One line of the table; `met` is None when a figure has no target of its own."""

    section: str
    figure: str
    value: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SectionResult:
    rows: list[Row]
    details: dict[str, Any]


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.3f} ms" if ms < 1 else f"{ms:.2f} ms" if ms < 100 else f"{ms:.0f} ms"


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


# -- VMs ------------------------------------------------------------------------------------------------

def vm_manifest(name: str, *, cores: int = 2, memory: str = "2Gi", disk: str | None = "5Gi",
                strategy: str = "Halted", namespace: str | None = None) -> dict[str, Any]:
    """A VM as a user would write it (the tests' shape): stop grace 0, one data volume unless `disk` is None."""
    template: dict[str, Any] = {
        "terminationGracePeriodSeconds": 0,
        "domain": {"cpu": {"cores": cores}, "memory": {"guest": memory},
                   "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}] if disk else []}},
        "volumes": [{"name": "root", "dataVolume": {"name": f"{name}-root"}}] if disk else [],
    }
    spec: dict[str, Any] = {"runStrategy": strategy, "template": {"spec": template}}
    if disk:
        spec["dataVolumeTemplates"] = [{"metadata": {"name": f"{name}-root"},
                                        "spec": {"storage": {"resources": {"requests": {"storage": disk}}}}}]
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": metadata, "spec": spec}


def fill(txn: Transaction, namespace: str, names: Iterable[str], *, phase_of: Callable[[int], Phase],
         project: str | None = None) -> list[objects.Obj]:
    """Bulk-insert a namespace, its quota and VMs with their charges, as the controller would have left them.

    Straight through the store (one `create` and one `set_charge` per VM) instead of admitting VMs one at a time:
    the state is the same, reached in seconds for 100,000 VMs. The caller recounts once at the end.
    """
    labels = {objects.PROJECT_LABEL: project} if project else {}
    txn.create(objects.NAMESPACE, {"metadata": {"name": namespace, "labels": labels},
                                   "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
    txn.create(objects.RESOURCE_QUOTA, {"metadata": {"name": "compute", "namespace": namespace},
                                        "spec": {"hard": dict(BIG_HARD)}})
    stamp = objects.now()
    made = []
    for i, name in enumerate(names):
        vm = vm_manifest(name, namespace=namespace)
        spec = vmspec.read(vm)
        phase = phase_of(i)
        vm["status"] = {"phase": phase.value, **vmstatus.render(phase, timestamp=stamp)}
        vm["status"]["conditions"].append({"type": "DataVolumesReady", "status": "True", "lastTransitionTime": stamp,
                                           "reason": "AllDVsReady", "message": "all of the VM's disks exist"})
        if phase is Phase.RUNNING:
            vm["status"]["runningSince"] = time.time()
        made.append(txn.create(objects.VIRTUAL_MACHINE, vm))
        txn.set_charge(namespace, name, usage.charge(spec, phase, OverheadModel.NONE))
    return made


def new_store(path: Path) -> Store:
    return Store(path / "vmquota.db")


def recount(store: Store) -> None:
    with store.transaction() as txn:
        accounting.recount(txn)


# -- a vmquota server in its own process ----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`vmquota serve` as a child process on a loopback port, with its own data directory."""

    def __init__(self, data_dir: Path, hypervisor: str, *, resync_interval: float = 3600.0,
                 api_processes: int | None = None, secure: bool = False, extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.extra_args = extra_args  # more `vmquota serve` options
        if hypervisor.startswith("qemu"):  # QEMU may run as libvirt-qemu, which must reach the disks
            disks.make_traversable(data_dir)
        self.api_processes = api_processes  # None: the server's default
        self.port = free_port()
        self.secure = secure  # serve's defaults (TLS, authentication, RBAC, audit); else plain HTTP, no auth
        self.url = f"{'https' if secure else 'http'}://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        self.hypervisor = hypervisor
        self.resync_interval = resync_interval
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vmquota", "serve", "--hypervisor", self.hypervisor,
                 "--data-dir", str(self.data_dir), "--listen", f"127.0.0.1:{self.port}",
                 "--resync-interval", str(self.resync_interval),
                 # the baseline: plain HTTP with no authentication (kube-apiserver's own switches)
                 *(() if self.secure else ("--plain-http", "--anonymous-auth", "--authorization-mode",
                                           "AlwaysAllow")),
                 *([] if self.api_processes is None else ["--api-processes", str(self.api_processes)]),
                 *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT)
        client = Client(self.url, timeout=5)  # /healthz needs no credentials
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"vmquota serve exited with {self.process.returncode}: {self.log_tail()}")
                try:
                    if not self.secure or (self.data_dir / "pki" / "ca.crt").exists():
                        if self.secure:  # verify the server against its own CA, once it made one
                            client.close()
                            client = Client(Connection(server=self.url, ca_pem=(
                                self.data_dir / "pki" / "ca.crt").read_text()), timeout=5)
                        client.get("/healthz")
                        return
                except Exception:
                    client.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vmquota serve did not answer within {timeout}s: {self.log_tail()}")
                time.sleep(0.05)
        finally:
            client.close()

    def pids(self) -> list[int]:
        """The server's process and its other API processes."""
        assert self.process is not None
        pids = [self.process.pid]
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():  # a replacement is another thread's child
            try:
                pids += map(int, (task / "children").read_text().split())
            except FileNotFoundError:
                pass  # a thread that ended meanwhile (one per HTTP connection)
        return pids

    def cpu_seconds(self) -> float:
        """User plus system CPU time the server's processes have used so far."""
        total = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


