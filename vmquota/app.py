"""Wiring: one running vmquota server made of store, hypervisor, disks, controller, API and HTTP server.

Top layer. `App.open` refuses a second server on the same data directory (a file
lock), says clearly when the hypervisor cannot be reached, and makes the `default`
namespace as Kubernetes has one. Tests build an App on `test:///default` with a
temporary data directory and a free loopback port.
"""

from __future__ import annotations

import copy
import datetime
import fcntl
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vmquota import errors, identity, kubeconfig, objects, rbac
from vmquota.api import Api
from vmquota.apiserver import Server, limits, security, serve, tables
from vmquota.apiserver.security import Options, Security
from vmquota.controller import Controller, nodes
from vmquota.controller.placement import Policy
from vmquota.disks import Disks
from vmquota.hypervisor import Hypervisor
from vmquota.store import Store, Transaction
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


@dataclass(frozen=True)
class NodeSettings:
    """How often each node's host is asked for its state, how long it may stay silent before NotReady, and how
    a starting VM's node is chosen."""
    heartbeat_seconds: float = nodes.HEARTBEAT_SECONDS
    grace_seconds: float = nodes.NODE_GRACE_SECONDS
    placement: Policy = Policy.SPREAD


def open_core(data_dir: Path, hypervisor_uri: str, overhead: OverheadModel, *,
              resync_interval: float = 30.0, use_emulation: bool = False,
              node_settings: NodeSettings = NodeSettings()) -> Core:
    """The server's parts on `data_dir`; only the first process runs the controller (`Controller.run`)."""
    store = Store(data_dir / "vmquota.db")
    for kind, parts in tables.kept_parts().items():
        store.keep(kind, parts)
    hypervisor = Hypervisor(hypervisor_uri, instance=store.instance_id, use_emulation=use_emulation)
    controller = Controller(store=store, hypervisor=hypervisor, disks=Disks(data_dir / "disks"),
                            overhead=overhead, resync_interval=resync_interval,
                            heartbeat_seconds=node_settings.heartbeat_seconds,
                            node_grace_seconds=node_settings.grace_seconds, placement=node_settings.placement)
    return Core(store, hypervisor, controller, Api(store, controller))


@dataclass
class App(Core):
    """The first process: a Core whose controller runs, the HTTP server, and the other API processes."""
    server: Server
    data_dir: Path
    lock_file: IO[str]
    other_api_processes: ApiProcesses
    security: Security

    @classmethod
    def open(cls, *, data_dir: Path, hypervisor_uri: str, host: str = "127.0.0.1", port: int = 8686,
             overhead: OverheadModel = OverheadModel.NONE, resync_interval: float = 30.0,
             api_processes: int = 1, use_emulation: bool = False, tls: bool = True, tls_cert_file: str | None = None,
             tls_private_key_file: str | None = None, anonymous_auth: bool = False,
             token_auth_file: str | None = None, authorization_mode: str = "RBAC", audit: bool = True,
             max_requests_inflight_per_user: int = limits.DEFAULT_PER_USER,
             node_settings: NodeSettings = NodeSettings()) -> App:
        """`api_processes` - 1 processes besides this one answer HTTP too (`workers.py`).

        Secure unless told otherwise, with kube-apiserver's switches: TLS (`tls=False` for plain HTTP, loopback
        only), no anonymous requests (`anonymous_auth`), RBAC (`authorization_mode="AlwaysAllow"`), audit.
        """
        options = Options(tls=tls, tls_cert_file=tls_cert_file, tls_private_key_file=tls_private_key_file,
                          anonymous_auth=anonymous_auth, token_auth_file=token_auth_file,
                          authorization_mode=authorization_mode, audit=audit,
                          max_requests_inflight_per_user=max_requests_inflight_per_user)
        security.check_listen(options, host)
        # QEMU, unprivileged, must traverse the data dir to its disks, but has no business listing it.
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        lock_file = open(data_dir / "server.lock", "w")  # noqa: SIM115 - held for the server's life
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            lock_file.close()
            raise errors.VmquotaError(f"another vmquota server is using {data_dir}") from e
        core = open_core(data_dir, hypervisor_uri, overhead, resync_interval=resync_interval,
                         use_emulation=use_emulation, node_settings=node_settings)
        store, controller = core.store, core.controller
        with store.transaction() as txn:
            if txn.get(objects.NAMESPACE, "", "default") is None:
                txn.create(objects.NAMESPACE, {"metadata": {"name": "default"}, "spec": {"finalizers": ["kubernetes"]},
                                               "status": {"phase": "Active"}})
            _bootstrap_rbac(txn)
        others = ApiProcesses(lambda key, after: controller.queue.add(key, after=after))
        server: Server | None = None
        try:
            secured = security.build(options, api=core.api, data_dir=data_dir, listen_host=host)
            controller.run()  # connects to the hypervisor and recounts before serving
            server = serve(core.api, host, port, secured)
            # Before any process answers: whoever reaches the server can find how to reach it.
            kubeconfig.write(kubeconfig.admin_path(data_dir), _admin_kubeconfig(server, secured))
            others.start(api_processes - 1, listening=server.socket, data_dir=data_dir,
                         hypervisor_uri=hypervisor_uri, overhead=overhead, security_options=options,
                         listen_host=host)
        except BaseException:
            others.close()
            if server is not None:
                server.server_close()
            controller.shutdown()
            store.close()
            lock_file.close()
            raise
        return cls(store, core.hypervisor, controller, core.api, server, data_dir, lock_file, others, secured)

    @property
    def url(self) -> str:
        return _client_url(self.server, tls=self.security.tls_context is not None)

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


def _client_url(server: Server, *, tls: bool) -> str:
    """The URL a client on this host uses: a server listening on every address is reached on loopback."""
    host, port = str(server.server_address[0]), server.server_address[1]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


ADMIN_CERT_LIFETIME = datetime.timedelta(days=365)


def _admin_kubeconfig(server: Server, secured: Security) -> dict[str, object]:
    """Full rights: over TLS, the CA and a fresh client certificate for admin in system:masters."""
    url = _client_url(server, tls=secured.tls_context is not None)
    if secured.authority is None:
        return kubeconfig.document(server=url, user="admin")
    pair = secured.authority.issue_client("admin", [identity.MASTERS], ADMIN_CERT_LIFETIME)
    return kubeconfig.document(server=url, user="admin", ca_pem=secured.authority.cert_pem,
                               client_cert_pem=pair.cert_pem, client_key_pem=pair.key_pem)


def _bootstrap_rbac(txn: Transaction) -> None:
    """kube-apiserver's and KubeVirt's roles, made at every start when missing, and brought back to their
    bootstrap rules unless an admin set `rbac.authorization.kubernetes.io/autoupdate: "false"` on them."""
    for item in rbac.with_aggregated_rules(rbac.bootstrap()):
        kind = objects.BY_KIND[item.kind]
        name = item.body["metadata"]["name"]
        current = txn.get(kind, "", name)
        if current is None:
            txn.create(kind, copy.deepcopy(item.body))
            continue
        if (current["metadata"].get("annotations") or {}).get(rbac.AUTOUPDATE) == "false":
            continue
        fields = ("rules", "aggregationRule") if item.kind == "ClusterRole" else ("roleRef", "subjects")
        if any(current.get(f) != item.body.get(f) for f in fields):
            txn.update(kind, {**current, **{f: copy.deepcopy(item.body[f]) for f in fields if f in item.body}})
