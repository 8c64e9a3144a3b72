"""Wiring: one running vmquota server made of store, hypervisor, disks, controller, API and HTTP server.

Top layer. `App.open` refuses a second server on the same data directory (a file
lock), says clearly when the hypervisor cannot be reached, and makes the `default`
namespace as Kubernetes has one. Tests build an App on `test:///default` with a
temporary data directory and a free loopback port.
"""

from __future__ import annotations

import fcntl
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vmquota import errors, kubeconfig, objects
from vmquota.api import Api
from vmquota.apiserver import Server, serve
from vmquota.controller import Controller
from vmquota.disks import Disks
from vmquota.hypervisor import Hypervisor
from vmquota.store import Store
from vmquota.usage import OverheadModel
from vmquota.workers import ApiProcesses

log = logging.getLogger(__name__)


@dataclass
class Core:
    """What every API process has: its own store connection, hypervisor, controller and API."""
    store: Store
    hypervisor: Hypervisor
    controller: Controller
    api: Api


def open_core(data_dir: Path, hypervisor_uri: str, overhead: OverheadModel, *,
              resync_interval: float = 30.0, use_emulation: bool = False) -> Core:
    """The server's parts on `data_dir`; only the first process runs the controller (`Controller.run`)."""
    store = Store(data_dir / "vmquota.db")
    hypervisor = Hypervisor(hypervisor_uri, instance=store.instance_id, use_emulation=use_emulation)
    controller = Controller(store=store, hypervisor=hypervisor, disks=Disks(data_dir / "disks"),
                            overhead=overhead, resync_interval=resync_interval)
    return Core(store, hypervisor, controller, Api(store, controller))


@dataclass
class App(Core):
    """The first process: a Core whose controller runs, the HTTP server, and the other API processes."""
    server: Server
    data_dir: Path
    lock_file: IO[str]
    other_api_processes: ApiProcesses

    @classmethod
    def open(cls, *, data_dir: Path, hypervisor_uri: str, host: str = "127.0.0.1", port: int = 8686,
             overhead: OverheadModel = OverheadModel.NONE, resync_interval: float = 30.0,
             api_processes: int = 1, use_emulation: bool = False) -> App:
        """`api_processes` - 1 processes besides this one answer HTTP too (`workers.py`)."""
        data_dir.mkdir(parents=True, exist_ok=True)
        lock_file = open(data_dir / "server.lock", "w")  # noqa: SIM115 - held for the server's life
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            lock_file.close()
            raise errors.VmquotaError(f"another vmquota server is using {data_dir}") from e
        core = open_core(data_dir, hypervisor_uri, overhead, resync_interval=resync_interval,
                         use_emulation=use_emulation)
        store, controller = core.store, core.controller
        with store.transaction() as txn:
            if txn.get(objects.NAMESPACE, "", "default") is None:
                txn.create(objects.NAMESPACE, {"metadata": {"name": "default"}, "spec": {"finalizers": ["kubernetes"]},
                                               "status": {"phase": "Active"}})
        others = ApiProcesses(lambda key, after: controller.queue.add(key, after=after))
        server: Server | None = None
        try:
            controller.run()  # connects to the hypervisor and recounts before serving
            server = serve(core.api, host, port)
            # Before any process answers: whoever reaches the server can find how to reach it.
            kubeconfig.write(kubeconfig.admin_path(data_dir),
                             kubeconfig.document(server=_client_url(server), user="admin"))
            others.start(api_processes - 1, listening=server.socket, data_dir=data_dir,
                         hypervisor_uri=hypervisor_uri, overhead=overhead)
        except BaseException:
            others.close()
            if server is not None:
                server.server_close()
            controller.shutdown()
            store.close()
            lock_file.close()
            raise
        return cls(store, core.hypervisor, controller, core.api, server, data_dir, lock_file, others)

    @property
    def url(self) -> str:
        return _client_url(self.server)

    @property
    def kubeconfig_path(self) -> Path:
        return kubeconfig.admin_path(self.data_dir)

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="http",
                                  daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop serving; running VMs keep running (vmquota finds them again at its next start)."""
        self.server.shutdown()
        self.other_api_processes.close()
        self.server.server_close()
        self.controller.shutdown()
        self.hypervisor.close()
        self.store.close()
        self.lock_file.close()


def _client_url(server: Server) -> str:
    """The URL a client on this host uses: a server listening on every address is reached on loopback."""
    host, port = str(server.server_address[0]), server.server_address[1]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
