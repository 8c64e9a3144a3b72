"""`vmquota serve --api-processes N`: several processes answer HTTP on one port, share one store and one
controller, and go together.

Each test runs a real `vmquota serve` on `test:///default` with its own data directory and loopback port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Served, free_port, gone, vm_manifest, vmquota_serve, wait_until

from vmquota import errors, workers
from vmquota.app import App
from vmquota.client import Client, ClientError, action_path

NS = "team"
PROCESSES = 3


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    # No recount within a test: it would queue every VM again and hide a key that never reached the controller.
    with vmquota_serve(tmp_path, processes=PROCESSES, args=("--resync-interval", "3600")) as server:
        yield server


def test_every_api_process_admits_against_the_same_quota_and_the_controller_hears_each(served: Served) -> None:
    """40 clients at once, each on its own connection, spread by the kernel over three processes: exactly
    the quota's 10 starts are admitted, and every admitted VM runs (the controller lives in one process)."""
    assert len(served.children()) == PROCESSES - 1
    admin = Client(served.url)
    admin.post("/api/v1/namespaces", {"metadata": {"name": NS}})
    admin.post(f"/api/v1/namespaces/{NS}/resourcequotas",
               {"metadata": {"name": "compute"}, "spec": {"hard": {"limits.cpu": "10"}}})
    names = [f"vm-{i}" for i in range(40)]
    for name in names:
        admin.post(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines",
                   vm_manifest(name, cores=1, memory="1Gi", disk=None))
    ticks_before = {pid: cpu_ticks(pid) for pid in served.children()}
    results: dict[str, int] = {}
    refusals: list[str] = []
    ready = threading.Barrier(len(names))

    def start(name: str) -> None:
        client = Client(served.url)  # a connection of its own: the kernel picks the process that accepts it
        client.get("/healthz")
        ready.wait()
        try:
            client.put(action_path(NS, name, "start"), None)
            results[name] = 202
        except ClientError as e:
            results[name] = e.code
            refusals.append(e.message)
        for _ in range(50):  # keep this connection's process busy for a few clock ticks of CPU time
            client.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/{name}")
        client.close()

    threads = [threading.Thread(target=start, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    admitted = sorted(name for name, code in results.items() if code == 202)
    assert len(admitted) == 10 and sorted(results.values()) == [202] * 10 + [403] * 30
    assert all("exceeded quota: compute, requested: limits.cpu=1, used: limits.cpu=10, limited: limits.cpu=10"
               in message for message in refusals), refusals[:3]
    assert all(cpu_ticks(pid) > ticks for pid, ticks in ticks_before.items()), "an API process answered nothing"

    def all_running() -> bool:
        vms = admin.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines")["items"]
        return sorted(vm["metadata"]["name"] for vm in vms
                      if vm.get("status", {}).get("printableStatus") == "Running") == admitted
    wait_until(all_running, timeout=30, what="every admitted VM to run")
    used = admin.get(f"/api/v1/namespaces/{NS}/resourcequotas/compute")["status"]["used"]
    assert used == {"limits.cpu": "10"}
    admin.close()


def test_a_stop_with_its_grace_period_reaches_the_controller_from_any_process(served: Served) -> None:
    admin = Client(served.url)
    admin.post("/api/v1/namespaces", {"metadata": {"name": NS}})
    names = [f"vm-{i}" for i in range(12)]
    for name in names:
        admin.post(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines",
                   vm_manifest(name, cores=1, memory="1Gi", disk=None, grace=600))
    clients = [Client(served.url) for _ in range(12)]  # a dozen connections: each process gets some
    for name, client in zip(names, clients, strict=True):
        client.put(action_path(NS, name, "start"), None)
    for name in names:
        wait_until(lambda name=name: admin.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/{name}")
                   ["status"]["printableStatus"] == "Running", timeout=30, what=f"{name} to run")
    for name, client in zip(names, clients, strict=True):
        client.put(action_path(NS, name, "stop"), {"gracePeriod": 0})
        client.close()
    for name in names:
        wait_until(lambda name=name: admin.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/{name}")
                   ["status"]["printableStatus"] == "Stopped", timeout=30, what=f"{name} to stop")
    events = admin.get(f"/api/v1/namespaces/{NS}/events")["items"]
    assert not [e for e in events if e["reason"] == "ShuttingDown"]  # forced off: the guest was never asked
    admin.close()


def test_an_api_process_that_dies_is_replaced(served: Served) -> None:
    first = served.children()
    os.kill(first[0], signal.SIGKILL)
    wait_until(lambda: len(served.children()) == PROCESSES - 1 and first[0] not in served.children(), timeout=30,
               what="another API process in place of the killed one")
    replacement = (set(served.children()) - set(first)).pop()
    admin = Client(served.url)
    admin.post("/api/v1/namespaces", {"metadata": {"name": NS}})
    ticks = cpu_ticks(replacement)
    for i in range(20):  # connections of their own: the replacement accepts some of them
        client = Client(served.url)
        client.post(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines",
                    vm_manifest(f"vm-{i}", cores=1, memory="1Gi", disk=None))
        for _ in range(50):
            client.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/vm-{i}")
        client.close()
    assert cpu_ticks(replacement) > ticks, "the new API process answered nothing"
    assert len(admin.get(f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines")["items"]) == 20
    admin.close()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["terminated", "killed"])
def test_the_api_processes_end_with_the_first_one(served: Served, how: signal.Signals) -> None:
    children = served.children()
    served.process.send_signal(how)
    served.process.wait(timeout=30)
    wait_until(lambda: all(gone(pid) for pid in children), timeout=10, what="the API processes to end")
    port = int(served.url.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):  # nobody listens on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_count_of_api_processes_out_of_range_is_refused(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "vmquota", "serve", "--hypervisor", "test:///default",
                           "--data-dir", str(tmp_path / "data"), "--api-processes", "0"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "--api-processes takes 1 to 64, got 0" in done.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_a_server_whose_api_process_cannot_start_refuses_to_serve_and_frees_everything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers.sys, "executable", "/bin/false")  # the API process exits at once
    port = free_port()
    with pytest.raises(errors.VmquotaError, match=r"an API process could not start \(exit code 1\)"):
        App.open(data_dir=tmp_path / "data", hypervisor_uri="test:///default", port=port, api_processes=2)
    monkeypatch.undo()
    app = App.open(data_dir=tmp_path / "data", hypervisor_uri="test:///default", port=port)  # port and lock free
    app.serve_in_thread()
    app.close()


def test_a_change_committed_after_the_controller_died_is_still_answered_as_done() -> None:
    """Between the first process's death and its own end, an API process may commit a change: the key then has
    nowhere to go, but the change is in the store (the next server's recount finds it), so it is no error."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        workers.KeysToController(write_end).add((NS, "vm-0"))
    finally:
        os.close(write_end)
