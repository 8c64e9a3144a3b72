"""Shared fixtures: a real vmquota server on libvirt's simulated host, and helpers to drive it.

Every test gets its own data directory and namespace, so tests never see each other's VMs even though
`test:///default` is one simulated host per process. The server runs in this process on a loopback port,
with real SQLite and real qemu-img; only the hypervisor is simulated.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from vmquota import domainxml, objects, waiting
from vmquota.app import App
from vmquota.client import Client, ClientError, action_path, collection_path
from vmquota.usage import OverheadModel

pytest_plugins = ["kvm_harness", "guest_harness"]  # the real-KVM fixtures: `server`, `kvm`; the real guest's

_ns_counter = itertools.count()

# The simulated host lives as long as some connection to it is open: this one keeps it alive across
# server restarts inside a test, as a real host outlives vmquota. Tests also use it to act behind
# vmquota's back.
HOST = libvirt.open("test:///default")


def free_port() -> int:
    """A loopback port free now, for a `vmquota serve` subprocess to listen on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """A real `vmquota serve` child process on `test:///default`, its data directory and its URL."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, data_dir: Path, log: Path) -> None:
        self.process = process
        self.url = url
        self.data_dir = data_dir
        self.log = log

    @property
    def kubeconfig(self) -> Path:
        return self.data_dir / "admin.kubeconfig"

    def children(self) -> list[int]:
        """Its API processes: the children of all its threads (a replacement is started by another thread)."""
        found: list[int] = []
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            try:
                found += map(int, (task / "children").read_text().split())
            except FileNotFoundError:
                pass  # a thread that ended meanwhile (one per HTTP connection)
        return found


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # ended, not yet reaped


# What the tests that predate tenants run with, as kube-apiserver's own switches allow: plain HTTP on loopback,
# requests without credentials anonymous, and everything allowed. Tests of tenancy pass `secure=True`.
INSECURE_SERVE_ARGS = ("--plain-http", "--anonymous-auth", "--authorization-mode", "AlwaysAllow")
INSECURE_APP = {"tls": False, "anonymous_auth": True, "authorization_mode": "AlwaysAllow", "audit": False}


@contextlib.contextmanager
def vmquota_serve(tmp_path: Path, *, processes: int = 1, args: tuple[str, ...] = (),
                  secure: bool = False) -> Iterator[Served]:
    """`vmquota serve` with `processes` API processes, until the block ends; then it and its children end.

    Secure (TLS, authentication, RBAC, audit: the defaults of `serve`) only when asked for."""
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "vmquota", "serve", "--hypervisor", "test:///default",
                                    "--data-dir", str(tmp_path / "data"), "--listen", f"127.0.0.1:{port}",
                                    "--api-processes", str(processes),
                                    *(() if secure else INSECURE_SERVE_ARGS), *args], stderr=out)
    server = Served(process, f"{'https' if secure else 'http'}://127.0.0.1:{port}", tmp_path / "data", log)
    # Not /healthz: an API process answers as soon as it serves, before the first process has started the rest.
    wait_until(lambda: b"vmquota serving on" in log.read_bytes() or process.poll() is not None, timeout=30,
               what="the server to say it serves")
    assert process.poll() is None, f"vmquota serve ended at once: {log.read_text()}"
    children = server.children()
    try:
        yield server
    finally:
        if process.poll() is None:
            children += server.children()  # and any started since in place of one that died
            process.terminate()
            process.wait(timeout=30)
        wait_until(lambda: all(gone(pid) for pid in children), timeout=10, what="the API processes to end")


def vm_manifest(name: str, *, cores: int = 2, memory: str = "2Gi", disk: str | None = "5Gi",
                strategy: str = "Halted", grace: int = 0, **extra_spec: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "runStrategy": strategy,
        "template": {"spec": {
            "terminationGracePeriodSeconds": grace,
            "domain": {"cpu": {"cores": cores}, "memory": {"guest": memory},
                       "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}] if disk else []}},
            "volumes": [{"name": "root", "dataVolume": {"name": f"{name}-root"}}] if disk else [],
        }},
    }
    if disk:
        spec["dataVolumeTemplates"] = [{"metadata": {"name": f"{name}-root"},
                                        "spec": {"storage": {"resources": {"requests": {"storage": disk}}}}}]
    spec.update(extra_spec)
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name}, "spec": spec}


def simulated_host(path: Path, *, cpus: int, memory_kib: int) -> str:
    """A libvirt test-driver host with `cpus` CPUs and `memory_kib` KiB, as a URI."""
    path.write_text(f"""<node>
  <cpu><nodes>1</nodes><sockets>1</sockets><cores>{cpus}</cores><threads>1</threads><active>{cpus}</active>
       <mhz>2000</mhz><model>x86_64</model></cpu>
  <memory>{memory_kib}</memory>
</node>
""")
    return f"test://{path}"


def vms_path(ns: str) -> str:
    return collection_path(objects.VIRTUAL_MACHINE, ns)


def quotas_path(ns: str) -> str:
    return collection_path(objects.RESOURCE_QUOTA, ns)


def clones_path(ns: str) -> str:
    return collection_path(objects.VIRTUAL_MACHINE_CLONE, ns)


def events_path(ns: str) -> str:
    return collection_path(objects.EVENT, ns)


def vm_state_row(vm: dict[str, Any]) -> tuple[Any, ...]:
    """The row `Reader.vm_states` must give for a VM, worked out here from its body."""
    meta, spec, status = vm["metadata"], vm["spec"], vm.get("status") or {}
    running = spec.get("running")
    ready = any(c.get("type") == "DataVolumesReady" and c.get("status") == "True" for c in status.get("conditions", []))
    return (meta["namespace"], meta["name"], meta["uid"], status.get("phase"), int("deletionTimestamp" in meta),
            spec.get("runStrategy"), None if running is None else int(running), status.get("lastExit"), int(ready))


def wait_until(condition: Callable[[], Any], *, timeout: float = 10.0, what: str = "condition") -> Any:
    return waiting.wait_until(condition, timeout=timeout, what=what)


def unsettled(app: App, in_scope: Callable[[str], bool]) -> list[str]:
    """What keeps the controller from being settled for the namespaces `in_scope`: work in its queue, and VMs
    on their way from one phase to another; empty once settled.

    An idle work queue alone is not enough: the end of a graceful stop arrives as a libvirt event, which the
    queue sees only once it comes.
    """
    queue = [] if app.controller.queue.idle() else ["the controller's work queue"]
    return queue + [f"{vm['metadata']['namespace']}/{vm['metadata']['name']}: {vm['status'].get('printableStatus')}"
                    for vm in app.store.reader().list(objects.VIRTUAL_MACHINE)
                    if in_scope(vm["metadata"]["namespace"])
                    and (vm["status"].get("printableStatus") in ("Starting", "Stopping", "Terminating")
                         or vm["metadata"].get("deletionTimestamp"))]


class Cluster:
    """A running server plus the calls tests make against it, all through HTTP."""

    def __init__(self, app: App, namespace: str) -> None:
        self.app = app
        self.client = Client(app.url)
        self.ns = namespace

    # objects
    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> Any:
        return self.client.post("/api/v1/namespaces", {"metadata": {"name": name, "labels": labels or {}}})

    def create_quota(self, hard: dict[str, str], *, name: str = "compute", namespace: str | None = None) -> Any:
        return self.client.post(f"/api/v1/namespaces/{namespace or self.ns}/resourcequotas",
                                {"metadata": {"name": name}, "spec": {"hard": hard}})

    def quota(self, name: str = "compute", namespace: str | None = None) -> Any:
        return self.client.get(f"/api/v1/namespaces/{namespace or self.ns}/resourcequotas/{name}")

    def used(self, name: str = "compute", namespace: str | None = None) -> dict[str, str]:
        return dict(self.quota(name, namespace)["status"]["used"])

    def create_vm(self, manifest: dict[str, Any], namespace: str | None = None) -> Any:
        return self.client.post(f"/apis/kubevirt.io/v1/namespaces/{namespace or self.ns}/virtualmachines", manifest)

    def vm(self, name: str, namespace: str | None = None) -> Any:
        return self.client.get(f"/apis/kubevirt.io/v1/namespaces/{namespace or self.ns}/virtualmachines/{name}")

    def status(self, name: str, namespace: str | None = None) -> str:
        return str(self.vm(name, namespace).get("status", {}).get("printableStatus"))

    def action(self, name: str, action: str, namespace: str | None = None, body: Any = None) -> Any:
        return self.client.put(action_path(namespace or self.ns, name, action), body)

    def wait_status(self, name: str, wanted: str, namespace: str | None = None, timeout: float = 10.0) -> None:
        wait_until(lambda: self.status(name, namespace) == wanted, timeout=timeout,
                   what=f"{name} to be {wanted} (is {self.status(name, namespace)})")

    def delete_vm(self, name: str, namespace: str | None = None, *, wait: bool = True) -> None:
        ns = namespace or self.ns
        self.client.delete(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines/{name}")
        if wait:
            wait_until(lambda: not any(v["metadata"]["name"] == name for v in self.client.get(
                f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines")["items"]), what=f"{name} to be gone")

    def settle(self, timeout: float = 10.0) -> None:
        """Until the controller has nothing left to do."""
        wait_until(self.app.controller.queue.idle, timeout=timeout, what="the controller to settle")

    def domain(self, name: str, namespace: str | None = None) -> Any:
        """The libvirt domain behind a VM, through a connection of the test's own (behind vmquota's back)."""
        return HOST.lookupByName(f"vmquota_{namespace or self.ns}_{name}")


def open_app(data_dir: Path, **kwargs: Any) -> App:
    app = App.open(data_dir=data_dir, hypervisor_uri="test:///default", host="127.0.0.1", port=0,
                   resync_interval=kwargs.pop("resync_interval", 3600.0),
                   overhead=kwargs.pop("overhead", OverheadModel.NONE), **{**INSECURE_APP, **kwargs})
    app.serve_in_thread()
    return app


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    app = open_app(tmp_path / "data")
    namespace = f"t{next(_ns_counter)}-{int(time.time() * 1000) % 100000}"
    c = Cluster(app, namespace)
    c.create_namespace(namespace)
    try:
        yield c
    finally:
        _cleanup(c)
        c.client.close()
        app.close()


def _cleanup(c: Cluster) -> None:
    """Delete every VM the test left, so no simulated domain outlives its test."""
    for vm in c.client.get("/apis/kubevirt.io/v1/virtualmachines")["items"]:
        ns, name = vm["metadata"]["namespace"], vm["metadata"]["name"]
        try:
            c.delete_vm(name, ns)
        except Exception:  # the test may have broken the VM on purpose; the domain is removed below
            pass
    for dom in HOST.listAllDomains():
        parsed = domainxml.parse_domain_name(dom.name())
        if parsed and c.app.hypervisor.owner(*parsed) is not None:  # only this test's server's domains
            if dom.isActive():
                dom.destroy()
            dom.undefine()


def start_all_at_once(url: str, targets: list[tuple[str, str]]) -> list[int]:
    """One start request per (namespace, name), each from its own thread and connection, all released
    together by a barrier: the HTTP codes, sorted."""
    barrier = threading.Barrier(len(targets))
    codes: list[int] = []

    def start(namespace: str, name: str) -> None:
        client = Client(url)
        barrier.wait()
        try:
            client.put(action_path(namespace, name, "start"))
            codes.append(202)
        except ClientError as e:
            codes.append(e.code)
        finally:
            client.close()

    threads = [threading.Thread(target=start, args=target) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(codes)


class Sampler:
    """Reads one value over HTTP again and again on a thread, for as long as the `with` block runs."""

    def __init__(self, url: str, read: Callable[[Client], Any]) -> None:
        self.samples: list[Any] = []
        self._url, self._read = url, read
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        client = Client(self._url)
        try:
            while not self._done.is_set():
                self.samples.append(self._read(client))
        finally:
            client.close()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()
