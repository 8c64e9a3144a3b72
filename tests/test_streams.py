"""The console and port-forward subresources (KubeVirt's websockets) on the simulated host: refusals in KubeVirt's
words, RBAC as KubeVirt's roles grant it, discovery and OpenAPI, and the bytes both ways through `vmquota console`
and `vmquota port-forward` over TLS.

The simulated host has no serial console and no guest network, so for the byte path the controller's
`open_console` / `open_port` are replaced by a fake guest on a socket pair: everything from the CLI's terminal or
local socket, through TLS, the filters, the websocket and the tunnel, to the guest's end, is the real code.
`tests/e2e/test_guest_linux.py` does the same against a real Linux guest.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import HOST, free_port, vm_manifest, wait_until

from vmquota import domainxml, kubeconfig, pki
from vmquota.app import App
from vmquota.client import Client, ClientError, action_path, console_path, port_forward_path
from vmquota.kubeconfig import Connection

SUBRESOURCES_V1 = "/apis/subresources.kubevirt.io/v1"


class Streams:
    """A secure server (TLS, RBAC) with a namespace where alice may edit and victor may only view."""

    def __init__(self, app: App, tmp_path: Path) -> None:
        self.app = app
        self.tmp_path = tmp_path
        self.ns = f"cons-{os.getpid() % 1000}-{int(time.time() * 1000) % 100000}"
        self.admin = Client(kubeconfig.load([app.kubeconfig_path]))
        self.ca = pki.Authority.load(app.data_dir)
        self.clients = [self.admin]
        self.admin.post("/api/v1/namespaces", {"metadata": {"name": self.ns}})
        for user, role in (("alice", "edit"), ("victor", "view")):
            self.admin.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{self.ns}/rolebindings", {
                "metadata": {"name": f"{role}-{user}"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "User", "name": user}]})

    def kubeconfig_of(self, user: str) -> Path:
        pair = self.ca.issue_client(user, ())
        path = self.tmp_path / f"{user}.kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig.document(
            server=self.app.url, user=user, namespace=self.ns, ca_pem=self.ca.cert_pem,
            client_cert_pem=pair.cert_pem, client_key_pem=pair.key_pem)))
        return path

    def as_user(self, user: str) -> Client:
        pair = self.ca.issue_client(user, ())
        client = Client(Connection(server=self.app.url, ca_pem=self.ca.cert_pem, client_cert_pem=pair.cert_pem,
                                   client_key_pem=pair.key_pem))
        self.clients.append(client)
        return client

    def running_vm(self, name: str, **spec: Any) -> None:
        self.admin.post(f"/apis/kubevirt.io/v1/namespaces/{self.ns}/virtualmachines",
                        vm_manifest(name, cores=1, memory="64Mi", disk=None, **spec))
        self.admin.put(action_path(self.ns, name, "start"))
        wait_until(lambda: self.phase(name) == "Running", what=f"{name} to run")

    def phase(self, name: str) -> str:
        vm = self.admin.get(f"/apis/kubevirt.io/v1/namespaces/{self.ns}/virtualmachines/{name}")
        return str((vm.get("status") or {}).get("printableStatus"))

    def close(self) -> None:
        for vm in self.admin.get(f"/apis/kubevirt.io/v1/namespaces/{self.ns}/virtualmachines")["items"]:
            self.admin.delete(f"/apis/kubevirt.io/v1/namespaces/{self.ns}/virtualmachines/{vm['metadata']['name']}")
        wait_until(lambda: not self.admin.get(f"/apis/kubevirt.io/v1/namespaces/{self.ns}/virtualmachines")["items"],
                   what="the VMs to be gone")
        for domain in HOST.listAllDomains():  # no simulated domain outlives its test
            parsed = domainxml.parse_domain_name(domain.name())
            if parsed and self.app.hypervisor.owner(*parsed) is not None:
                if domain.isActive():
                    domain.destroy()
                domain.undefine()
        for client in self.clients:
            client.close()


@pytest.fixture
def streams(tmp_path: Path) -> Iterator[Streams]:
    app = App.open(data_dir=tmp_path / "data", hypervisor_uri="test:///default", port=0, resync_interval=3600.0)
    app.serve_in_thread()
    s = Streams(app, tmp_path)
    try:
        yield s
    finally:
        try:
            s.close()
        finally:
            app.close()


def refusal(client: Client, path: str) -> dict[str, Any]:
    with pytest.raises(ClientError) as caught:
        client.websocket(path)
    return caught.value.status


def vmi_path(ns: str, name: str, *rest: str) -> str:
    return "/".join((f"{SUBRESOURCES_V1}/namespaces/{ns}/virtualmachineinstances/{name}", *rest))


# -- refusals ---------------------------------------------------------------------------------------------

def test_a_vm_that_does_not_run_is_refused_in_kubevirts_words(streams: Streams) -> None:
    admin, ns = streams.admin, streams.ns
    admin.post(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines", vm_manifest("idle", disk=None))
    for path in (console_path(ns, "idle"), console_path(ns, "nothing"),
                 port_forward_path(ns, "virtualmachineinstances", "idle", 80)):
        status = refusal(admin, path)
        name = path.split("/")[7]
        assert (status["code"], status["reason"]) == (404, "NotFound")
        assert status["message"] == f'virtualmachineinstance.kubevirt.io "{name}" not found'
    status = refusal(admin, port_forward_path(ns, "virtualmachines", "idle", 80))
    assert (status["code"], status["message"]) == (
        409, 'Operation cannot be fulfilled on virtualmachine.kubevirt.io "idle": VMI is not started')
    status = refusal(admin, port_forward_path(ns, "virtualmachines", "nothing", 80))
    assert (status["code"], status["message"]) == (404, 'virtualmachine.kubevirt.io "nothing" not found')


def test_a_paused_vmi_takes_no_port_forward_and_bad_ports_and_requests_are_400(streams: Streams) -> None:
    admin, ns = streams.admin, streams.ns
    streams.running_vm("web")
    for port in ("0", "65536", "http", "-1", "8O", "000080000"):
        status = refusal(admin, vmi_path(ns, "web", "portforward", port))
        assert status["code"] == 400 and "a port is a number from 1 to 65535" in status["message"], port
    status = refusal(admin, vmi_path(ns, "web", "portforward", "80", "udp"))
    assert status["code"] == 400 and "only tcp" in status["message"]
    for path in (vmi_path(ns, "web", "portforward"), vmi_path(ns, "web", "console", "extra")):
        assert refusal(admin, path)["code"] == 404
    # Not a websocket handshake: gorilla/websocket's words, as virt-api answers.
    with pytest.raises(ClientError) as caught:
        admin.get(console_path(ns, "web"))
    assert caught.value.code == 400
    assert "'upgrade' token not found in 'Connection' header" in caught.value.message
    with pytest.raises(ClientError) as caught:
        admin.put(console_path(ns, "web"))
    assert caught.value.code == 405

    admin.put(vmi_path(ns, "web", "pause"))
    wait_until(lambda: streams.phase("web") == "Paused", what="web to pause")
    status = refusal(admin, port_forward_path(ns, "virtualmachineinstances", "web", 80))
    assert (status["code"], status["message"]) == (
        409, 'Operation cannot be fulfilled on virtualmachineinstance.kubevirt.io "web": VMI is paused')


def test_the_simulated_host_has_no_console_and_says_so(streams: Streams) -> None:
    streams.running_vm("web")
    status = refusal(streams.admin, console_path(streams.ns, "web"))
    assert status["code"] == 500 and status["message"].startswith("dialing VM: ")
    assert "virDomainOpenConsole" in status["message"]


# -- RBAC, discovery, OpenAPI ----------------------------------------------------------------------------------

def test_edit_may_open_a_console_and_view_may_not_as_kubevirts_roles_say(streams: Streams) -> None:
    streams.running_vm("web")
    ns = streams.ns
    victor, alice = streams.as_user("victor"), streams.as_user("alice")
    for path, resource in ((console_path(ns, "web"), "virtualmachineinstances/console"),
                           (port_forward_path(ns, "virtualmachineinstances", "web", 80),
                            "virtualmachineinstances/portforward"),
                           (port_forward_path(ns, "virtualmachines", "web", 80), "virtualmachines/portforward")):
        status = refusal(victor, path)
        assert status["code"] == 403
        assert status["message"] == (f'{resource.split("/")[0]}.subresources.kubevirt.io "web" is forbidden: User '
                                     f'"victor" cannot get resource "{resource}" in API group '
                                     f'"subresources.kubevirt.io" in the namespace "{ns}"')
        assert refusal(alice, path)["code"] != 403  # past authorization: the simulated host's own refusal
    anonymous = Client(Connection(server=streams.app.url, ca_pem=streams.ca.cert_pem))
    try:
        assert refusal(anonymous, console_path(ns, "web"))["code"] == 401
    finally:
        anonymous.close()
    review = streams.as_user("alice").post("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", {
        "spec": {"resourceAttributes": {"namespace": ns, "verb": "get", "group": "subresources.kubevirt.io",
                                        "resource": "virtualmachineinstances", "subresource": "console"}}})
    assert review["status"]["allowed"] is True


def test_discovery_and_openapi_list_the_streams_as_kubevirt_does(streams: Streams) -> None:
    listed = {r["name"]: r for r in streams.admin.get(SUBRESOURCES_V1)["resources"]}
    for name in ("virtualmachineinstances/console", "virtualmachineinstances/portforward",
                 "virtualmachines/portforward"):
        assert listed[name]["verbs"] == ["get"] and listed[name]["namespaced"] is True
    paths = streams.admin.get("/openapi/v2")["paths"]
    base = f"{SUBRESOURCES_V1}/namespaces/{{namespace}}"
    assert paths[f"{base}/virtualmachineinstances/{{name}}/console"]["get"]["operationId"] == "v1Console"
    forward = paths[f"{base}/virtualmachineinstances/{{name}}/portforward/{{port}}"]
    assert forward["get"]["operationId"] == "v1vmi-PortForward"
    assert [p["name"] for p in forward["parameters"]][:3] == ["namespace", "name", "port"]
    assert paths[f"{base}/virtualmachines/{{name}}/portforward/{{port}}"]["get"]["operationId"] == "v1vm-PortForward"


# -- the bytes, through the CLI ----------------------------------------------------------------------------

class FakeGuest:
    """A guest's end on a socket pair: prints a banner, then answers each line typed with it in capitals."""

    def __init__(self) -> None:
        self._server, self._guest = socket.socketpair()
        self._guest.sendall(b"fake-guest login: ")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self._guest:
            while data := self._guest.recv(4096):
                self._guest.sendall(data.upper())

    @property
    def port(self) -> socket.socket:
        return self._server

    # What the server's tunnel uses, as it uses a libvirt console stream.
    def recv(self, size: int) -> bytes:
        return self._server.recv(size)

    def sendall(self, data: bytes) -> None:
        self._server.sendall(data)

    def close(self) -> None:
        self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()


def vmquota(kubeconfig_path: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "vmquota", "--kubeconfig", str(kubeconfig_path), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@contextlib.contextmanager
def running(process: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """The process, killed at the end of the block if it still runs, its pipes closed."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def read_until(stream: Any, needle: bytes, timeout: float = 10.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} never came; got {seen!r}"
        if select.select([stream], [], [], left)[0]:
            chunk = os.read(stream.fileno(), 4096)
            assert chunk, f"the stream ended before {needle!r}; got {seen!r}"
            seen += chunk
    return seen


def test_vmquota_console_carries_keys_and_output_over_tls_and_ctrl_bracket_leaves(
        streams: Streams, monkeypatch: pytest.MonkeyPatch) -> None:
    streams.running_vm("web")
    guests: list[FakeGuest] = []

    def open_console(namespace: str, name: str) -> FakeGuest:
        assert (namespace, name) == (streams.ns, "web")
        guests.append(FakeGuest())
        return guests[-1]

    monkeypatch.setattr(streams.app.controller, "open_console", open_console)
    with running(vmquota(streams.kubeconfig_of("alice"), "console", "web")) as console:
        assert console.stdout is not None and console.stdin is not None
        read_until(console.stdout, b"fake-guest login: ")
        console.stdin.write(b"root\r")
        console.stdin.flush()
        read_until(console.stdout, b"ROOT\r")
        console.stdin.write(b"\x1d")  # Ctrl+]
        console.stdin.flush()
        assert console.wait(timeout=10) == 0
        assert console.stderr is not None
        assert b"Successfully connected to web console. Press Ctrl+] or Ctrl+5 to exit console." in \
            console.stderr.read()
    wait_until(lambda: not guests[0].thread.is_alive(), what="the server to close the guest's end")


def test_vmquota_console_of_a_vm_that_does_not_exist_fails_with_the_servers_words(streams: Streams) -> None:
    console = vmquota(streams.kubeconfig_of("alice"), "console", "nothing", "--timeout", "1")
    _, err = console.communicate(timeout=20)
    assert console.returncode == 1
    assert b'virtualmachineinstance.kubevirt.io "nothing" not found' in err
    console = vmquota(streams.kubeconfig_of("victor"), "console", "nothing")
    _, err = console.communicate(timeout=20)
    assert console.returncode == 1 and b'cannot get resource "virtualmachineinstances/console"' in err


def test_vmquota_port_forward_gives_each_connection_its_own_tunnel(
        streams: Streams, monkeypatch: pytest.MonkeyPatch) -> None:
    streams.running_vm("web")
    opened: list[int] = []

    def open_port(namespace: str, name: str, port: int) -> socket.socket:
        opened.append(port)
        return FakeGuest().port  # a TCP connection to the guest, as QEMU's forward gives one

    monkeypatch.setattr(streams.app.controller, "open_port", open_port)
    local = free_port()
    with running(vmquota(streams.kubeconfig_of("alice"), "port-forward", "vm/web", f"{local}:8080")) as forward:
        assert forward.stdout is not None
        read_until(forward.stdout, f"Forwarding from 127.0.0.1:{local} -> 8080".encode())
        first, second = (socket.create_connection(("127.0.0.1", local), timeout=10) for _ in range(2))
        with first, second:
            assert read_until(first, b"login: ") and read_until(second, b"login: ")
            second.sendall(b"two")
            first.sendall(b"one" * 50_000)  # more than a message and a queue's worth: it comes back whole
            assert read_until(second, b"TWO")
            assert read_until(first, b"ONE" * 50_000)
        assert opened == [8080, 8080]
        with socket.socket() as elsewhere:  # bound to 127.0.0.1 alone, not to every address
            elsewhere.settimeout(1)
            assert elsewhere.connect_ex(("127.0.0.2", local)) != 0
        forward.send_signal(signal.SIGINT)
        assert forward.wait(timeout=10) == 0


def test_port_forward_refuses_bad_targets_and_ports_before_listening(streams: Streams) -> None:
    config = streams.kubeconfig_of("alice")
    for args in (("vmx/web", "80"), ("vm/web", "80:0"), ("vm/web", "abc"), ("vm/Web", "80")):
        done = vmquota(config, "port-forward", *args)
        _, err = done.communicate(timeout=20)
        assert done.returncode == 2, (args, err)
    done = vmquota(config, "port-forward", "vm/nothing", f"{free_port()}:80")
    _, err = done.communicate(timeout=20)
    assert done.returncode == 1 and b'"nothing" not found' in err
