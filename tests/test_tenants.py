"""Tenants: TLS by default, authentication as Kubernetes does it, RBAC, the audit log, per-user limits.

Every test here runs a secure server (the defaults of `App.open` and `vmquota serve`) and talks to it as several
users over TLS: the admin of the admin kubeconfig, users with client certificates from vmquota's CA, users of a
static token file, and ServiceAccounts with tokens from TokenRequest. `test_tenants_kubectl.py` does the same
through kubectl 1.32, the official Python client and `vmquota serve` processes.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HOST, vm_manifest, wait_until
from cryptography import x509

from vmquota import app as app_module
from vmquota import domainxml, errors, identity, kubeconfig, objects, pki
from vmquota.apiserver import authentication, handlers, limits, tls
from vmquota.apiserver.audit import audit_dir, read
from vmquota.apiserver.request import Request, Response
from vmquota.app import App
from vmquota.client import Client, ClientError, action_path
from vmquota.kubeconfig import Connection

_counter = itertools.count()
RBAC_V1 = "/apis/rbac.authorization.k8s.io/v1"
UNAUTHORIZED = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "Unauthorized",
                "reason": "Unauthorized", "code": 401}


class Tenants:
    """A secure server with two teams: alice may edit `dev` (project team-a), `prod` belongs to another team."""

    def __init__(self, app: App, token_file: Path) -> None:
        self.app = app
        self.token_file = token_file
        suffix = f"{next(_counter)}-{int(time.time() * 1000) % 100000}"
        self.dev, self.prod, self.project = f"dev-{suffix}", f"prod-{suffix}", f"team-a-{suffix}"
        self.admin = Client(kubeconfig.load([app.kubeconfig_path]))
        self.ca = pki.Authority.load(app.data_dir)
        self.clients: list[Client] = [self.admin]

    def as_user(self, user: str, *groups: str) -> Client:
        pair = self.ca.issue_client(user, groups)
        client = Client(Connection(server=self.app.url, ca_pem=self.ca.cert_pem, client_cert_pem=pair.cert_pem,
                                   client_key_pem=pair.key_pem))
        self.clients.append(client)
        return client

    def with_token(self, token: str | None) -> Client:
        client = Client(Connection(server=self.app.url, ca_pem=self.ca.cert_pem, token=token))
        self.clients.append(client)
        return client

    def bind(self, namespace: str, role: str, *, user: str | None = None, group: str | None = None,
             service_account: str | None = None, name: str | None = None) -> Any:
        subject = ({"kind": "User", "name": user} if user else {"kind": "Group", "name": group} if group
                   else {"kind": "ServiceAccount", "name": service_account, "namespace": namespace})
        return self.admin.post(f"{RBAC_V1}/namespaces/{namespace}/rolebindings", {
            "metadata": {"name": name or f"{role}-{subject['name']}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [subject]})

    def close(self) -> None:
        for client in self.clients:
            client.close()


@pytest.fixture
def tenants(tmp_path: Path) -> Iterator[Tenants]:
    token_file = tmp_path / "tokens.csv"
    token_file.write_text('secret-of-bob,bob,1001,"team-b,ops"\n')
    app = App.open(data_dir=tmp_path / "data", hypervisor_uri="test:///default", port=0, resync_interval=3600.0,
                   token_auth_file=str(token_file))
    app.serve_in_thread()
    t = Tenants(app, token_file)
    t.admin.post("/apis/vmquota.io/v1/projects", {"metadata": {"name": t.project}, "spec": {
        "resourceQuota": {"hard": {"limits.cpu": "8", "limits.memory": "16Gi"}}}})
    t.admin.post("/api/v1/namespaces", {"metadata": {"name": t.dev, "labels": {objects.PROJECT_LABEL: t.project}}})
    t.admin.post("/api/v1/namespaces", {"metadata": {"name": t.prod}})
    t.admin.post(f"/api/v1/namespaces/{t.dev}/resourcequotas", {"metadata": {"name": "compute"},
                                                               "spec": {"hard": {"limits.cpu": "4"}}})
    t.bind(t.dev, "edit", user="alice")
    try:
        yield t
    finally:
        try:
            _delete_every_vm(t.admin, app)
        finally:
            t.close()
            app.close()


def _delete_every_vm(admin: Client, app: App) -> None:
    """So that no simulated domain outlives its test (the simulated host is shared by the whole run)."""
    for vm in admin.get("/apis/kubevirt.io/v1/virtualmachines")["items"]:
        admin.delete(f"{vms(vm['metadata']['namespace'])}/{vm['metadata']['name']}")
    wait_until(lambda: not admin.get("/apis/kubevirt.io/v1/virtualmachines")["items"], what="every VM to be gone")
    for domain in HOST.listAllDomains():
        parsed = domainxml.parse_domain_name(domain.name())
        if parsed and app.hypervisor.owner(*parsed) is not None:
            if domain.isActive():
                domain.destroy()
            domain.undefine()


def refusal(call: Any, *args: Any) -> dict[str, Any]:
    with pytest.raises(ClientError) as caught:
        call(*args)
    return caught.value.status


def forbidden(message: str, name: str | None, group: str, kind: str) -> dict[str, Any]:
    """Kubernetes' 403 Status, with its details as Go leaves out the empty ones."""
    details = {key: value for key, value in (("name", name), ("group", group), ("kind", kind)) if value}
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": "Forbidden", "details": details, "code": 403}


def vms(namespace: str) -> str:
    return f"/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines"


# -- TLS -------------------------------------------------------------------------------------------------

def test_the_first_start_makes_a_ca_and_a_server_certificate_with_private_keys(tenants: Tenants) -> None:
    folder = tenants.app.data_dir / "pki"
    for key in ("ca.key", "server.key", "sa.key"):
        assert stat.S_IMODE((folder / key).stat().st_mode) == 0o600, key
    cert = x509.load_pem_x509_certificate((folder / "server.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in sans.get_values_for_type(x509.DNSName)} | \
            {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
    assert {"localhost", "127.0.0.1", "::1", socket.gethostname()} <= names
    assert tenants.app.url.startswith("https://")


def test_the_admin_kubeconfig_carries_the_ca_and_a_system_masters_certificate(tenants: Tenants) -> None:
    connection = kubeconfig.load([tenants.app.kubeconfig_path])
    assert connection.ca_pem == tenants.ca.cert_pem
    assert connection.client_cert_pem and connection.client_key_pem
    cert = x509.load_pem_x509_certificate(connection.client_cert_pem.encode())
    assert pki.subject_identity(cert) == ("admin", (identity.MASTERS,))
    whoami = tenants.admin.post("/apis/authentication.k8s.io/v1/selfsubjectreviews", {})
    assert whoami["status"]["userInfo"]["username"] == "admin"
    assert whoami["status"]["userInfo"]["groups"] == [identity.MASTERS, identity.AUTHENTICATED]


def test_a_stalled_tls_handshake_holds_neither_the_server_nor_other_clients(tenants: Tenants,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls, "HANDSHAKE_TIMEOUT", 0.5)
    host, port = tenants.app.url.removeprefix("https://").split(":")
    stalled = [socket.create_connection((host, int(port))) for _ in range(5)]
    stalled[0].sendall(b"\x16\x03\x01\x00\xff")  # the start of a ClientHello, and then nothing
    try:
        assert tenants.admin.get("/healthz") == "ok"  # served meanwhile (a fresh connection each time)
        fresh = tenants.as_user("someone")
        fresh.get("/healthz")
        for connection in stalled:  # each is closed by the server once its handshake timed out
            connection.settimeout(60)
            try:
                data = connection.recv(1024)
            except ConnectionResetError:
                data = b""
            assert data == b"" or data.startswith(b"\x15")  # closed, perhaps after a TLS alert
    finally:
        for connection in stalled:
            connection.close()


def test_plain_http_or_no_authentication_beyond_loopback_is_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.VmquotaError, match=r"refusing to serve plain HTTP on 0\.0\.0\.0"):
        App.open(data_dir=tmp_path / "data", hypervisor_uri="test:///default", host="0.0.0.0", port=0, tls=False)
    with pytest.raises(errors.VmquotaError, match="anonymous requests allowed to do anything"):
        App.open(data_dir=tmp_path / "data", hypervisor_uri="test:///default", host="0.0.0.0", port=0,
                 anonymous_auth=True, authorization_mode="AlwaysAllow")
    assert not (tmp_path / "data").exists()  # refused before anything was made


# -- authentication ----------------------------------------------------------------------------------------

def test_no_credentials_get_kubernetes_401_except_health_and_version(tenants: Tenants) -> None:
    anonymous = tenants.with_token(None)
    assert refusal(anonymous.get, "/api/v1/namespaces") == UNAUTHORIZED
    assert refusal(anonymous.put, action_path(tenants.dev, "web-1", "start")) == UNAUTHORIZED
    assert anonymous.get("/healthz") == "ok"
    try:
        anonymous.get("/version")
    except ClientError as e:
        assert e.code == 404  # where /version is not served yet: authorized, then not found


def test_wrong_expired_deleted_and_garbage_credentials_get_401(tenants: Tenants, tmp_path: Path) -> None:
    admin, signer = tenants.admin, tenants.app.api.tokens
    assert signer is not None
    admin.post(f"/api/v1/namespaces/{tenants.dev}/serviceaccounts", {"metadata": {"name": "robot"}})
    uid = admin.get(f"/api/v1/namespaces/{tenants.dev}/serviceaccounts/robot")["metadata"]["uid"]
    expired, _ = signer.issue(namespace=tenants.dev, name="robot", uid=uid, audiences=("https://vmquota.local",),
                              expiration_seconds=600, now=time.time() - 3600)
    valid = admin.post(f"/api/v1/namespaces/{tenants.dev}/serviceaccounts/robot/token", {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}})["status"]["token"]
    tenants.bind(tenants.dev, "view", service_account="robot")
    assert tenants.with_token(valid).get(vms(tenants.dev))["items"] == []
    for token in ("wrong", expired, valid[:-4] + "AAAA", "a.b.c", "x" * 20000, "secret-of-bob " * 3):
        assert refusal(tenants.with_token(token).get, vms(tenants.dev)) == UNAUTHORIZED, token[:40]
    admin.delete(f"/api/v1/namespaces/{tenants.dev}/serviceaccounts/robot")
    assert refusal(tenants.with_token(valid).get, vms(tenants.dev)) == UNAUTHORIZED
    admin.post(f"/api/v1/namespaces/{tenants.dev}/serviceaccounts", {"metadata": {"name": "robot"}})
    assert refusal(tenants.with_token(valid).get, vms(tenants.dev)) == UNAUTHORIZED  # a new uid: still refused
    other_ca = pki.Authority.load_or_create(tmp_path / "elsewhere")
    pair = other_ca.issue_client("admin", [identity.MASTERS])
    foreign = Client(Connection(server=tenants.app.url, ca_pem=tenants.ca.cert_pem, client_cert_pem=pair.cert_pem,
                                client_key_pem=pair.key_pem))
    try:
        assert refusal(foreign.get, "/api/v1/namespaces") == UNAUTHORIZED
    finally:
        foreign.close()


@pytest.mark.parametrize("header", [
    "Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer ", "bearer  ", "Negotiate xyz", "Bearer \u00e9\u00e9",
    "Bearer " + "A" * 60000, "Bearer a.b", "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
])
def test_garbage_authorization_headers_get_401_never_a_5xx(tenants: Tenants, header: str) -> None:
    host, port = tenants.app.url.removeprefix("https://").split(":")
    context = ssl.create_default_context(cadata=tenants.ca.cert_pem)
    with socket.create_connection((host, int(port)), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname=host) as connection:
        connection.sendall(f"GET /api/v1/namespaces HTTP/1.1\r\nHost: x\r\nAuthorization: {header}\r\n"
                           f"Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.split()[1] in (b"401", b"431", b"400"), status_line


def test_a_token_file_user_is_authenticated_and_the_file_is_read_again_when_it_changes(tenants: Tenants) -> None:
    bob = tenants.with_token("secret-of-bob")
    info = bob.post("/apis/authentication.k8s.io/v1/selfsubjectreviews", {})["status"]["userInfo"]
    assert info == {"username": "bob", "uid": "1001", "groups": ["team-b", "ops", identity.AUTHENTICATED]}
    tenants.token_file.write_text('new-secret,bob,1001,"team-c"\n')
    assert refusal(bob.get, "/healthz") == UNAUTHORIZED  # an invalid token is refused even where none is needed
    renewed = tenants.with_token("new-secret")
    info = renewed.post("/apis/authentication.k8s.io/v1/selfsubjectreviews", {})["status"]["userInfo"]
    assert info["groups"] == ["team-c", identity.AUTHENTICATED]


def test_token_file_rows_are_kubernetes_csv() -> None:
    users = authentication.parse_token_file('t1,alice,1\n\n# a comment\nt2,bob,2,"a,b"\n', "tokens.csv")
    assert sorted(u.name for u in users.values()) == ["alice", "bob"]
    with pytest.raises(authentication.TokenFileError, match=r"tokens.csv, line 1") as caught:
        authentication.parse_token_file("only-a-token\n", "tokens.csv")
    assert "only-a-token" not in str(caught.value)  # a token never reaches a message


def test_a_service_account_token_drives_vm_starts(tenants: Tenants) -> None:
    admin = tenants.admin
    admin.post(f"/api/v1/namespaces/{tenants.dev}/serviceaccounts", {"metadata": {"name": "ci"}})
    tenants.bind(tenants.dev, "edit", service_account="ci")
    answer = admin.post(f"/api/v1/namespaces/{tenants.dev}/serviceaccounts/ci/token",
                        {"spec": {"expirationSeconds": 600}})
    assert answer["kind"] == "TokenRequest" and answer["status"]["expirationTimestamp"]
    script = tenants.with_token(answer["status"]["token"])
    script.post(vms(tenants.dev), vm_manifest("batch-1", cores=1, disk=None))
    script.put(action_path(tenants.dev, "batch-1", "start"))
    wait_until(lambda: script.get(f"{vms(tenants.dev)}/batch-1")["status"].get("printableStatus") == "Running",
               what="batch-1 to run")
    whoami = script.post("/apis/authentication.k8s.io/v1/selfsubjectreviews", {})["status"]["userInfo"]
    assert whoami["username"] == f"system:serviceaccount:{tenants.dev}:ci"
    assert whoami["groups"] == ["system:serviceaccounts", f"system:serviceaccounts:{tenants.dev}",
                                identity.AUTHENTICATED]
    assert refusal(admin.post, f"/api/v1/namespaces/{tenants.dev}/serviceaccounts/ci/token",
                   {"spec": {"expirationSeconds": 60}})["code"] == 422


# -- RBAC --------------------------------------------------------------------------------------------------

def test_alice_edits_her_namespace_and_is_refused_everything_else_with_kubernetes_403(tenants: Tenants) -> None:
    alice, dev, prod = tenants.as_user("alice", "team-a"), tenants.dev, tenants.prod
    alice.post(vms(dev), vm_manifest("web-1", cores=1, disk=None))
    alice.put(action_path(dev, "web-1", "start"))
    wait_until(lambda: alice.get(f"{vms(dev)}/web-1")["status"].get("printableStatus") == "Running", what="running")
    alice.put(action_path(dev, "web-1", "stop"))
    assert alice.get(f"/api/v1/namespaces/{dev}/resourcequotas/compute")["spec"]["hard"] == {"limits.cpu": "4"}

    assert refusal(alice.patch, f"/api/v1/namespaces/{dev}/resourcequotas/compute",
                   {"spec": {"hard": {"limits.cpu": "400"}}}) == forbidden(
        f'resourcequotas "compute" is forbidden: User "alice" cannot patch resource "resourcequotas" in API group "" '
        f'in the namespace "{dev}"', "compute", "", "resourcequotas")
    assert refusal(alice.patch, f"/api/v1/namespaces/{dev}",
                   {"metadata": {"labels": {objects.PROJECT_LABEL: "richer"}}}) == forbidden(
        f'namespaces "{dev}" is forbidden: User "alice" cannot patch resource "namespaces" in API group "" in the '
        f'namespace "{dev}"', dev, "", "namespaces")
    tenants.admin.post(vms(prod), vm_manifest("web-1", cores=1, disk=None))
    assert refusal(alice.get, vms(prod))["message"] == (
        f'virtualmachines.kubevirt.io is forbidden: User "alice" cannot list resource "virtualmachines" in API '
        f'group "kubevirt.io" in the namespace "{prod}"')
    assert refusal(alice.put, action_path(prod, "web-1", "start"))["message"] == (
        f'virtualmachines.subresources.kubevirt.io "web-1" is forbidden: User "alice" cannot update resource '
        f'"virtualmachines/start" in API group "subresources.kubevirt.io" in the namespace "{prod}"')
    assert refusal(alice.post, f"{RBAC_V1}/clusterrolebindings", {
        "metadata": {"name": "alice-admin"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "User", "name": "alice"}]})["message"] == (
        'clusterrolebindings.rbac.authorization.k8s.io is forbidden: User "alice" cannot create resource '
        '"clusterrolebindings" in API group "rbac.authorization.k8s.io" at the cluster scope')
    assert refusal(alice.post, f"{RBAC_V1}/namespaces/{dev}/rolebindings", {
        "metadata": {"name": "alice-admin"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "User", "name": "alice"}]})["code"] == 403
    assert refusal(alice.post, "/apis/vmquota.io/v1/projects", {"metadata": {"name": "mine"}})["code"] == 403
    assert refusal(alice.delete, f"/api/v1/namespaces/{prod}")["code"] == 403


def test_lists_across_namespaces_show_only_what_the_user_may_list(tenants: Tenants) -> None:
    alice = tenants.as_user("alice")
    tenants.admin.post(vms(tenants.dev), vm_manifest("mine", cores=1, disk=None))
    tenants.admin.post(vms(tenants.prod), vm_manifest("theirs", cores=1, disk=None))
    every = alice.get("/apis/kubevirt.io/v1/virtualmachines")["items"]
    assert [(v["metadata"]["namespace"], v["metadata"]["name"]) for v in every] == [(tenants.dev, "mine")]
    assert [n["metadata"]["name"] for n in alice.get("/api/v1/namespaces")["items"]] == [tenants.dev]
    assert [p["metadata"]["name"] for p in alice.get("/apis/vmquota.io/v1/projects")["items"]] == [tenants.project]
    stranger = tenants.as_user("mallory")
    assert refusal(stranger.get, "/apis/kubevirt.io/v1/virtualmachines")["message"] == (
        'virtualmachines.kubevirt.io is forbidden: User "mallory" cannot list resource "virtualmachines" in API '
        'group "kubevirt.io" at the cluster scope')
    assert len(tenants.admin.get("/apis/kubevirt.io/v1/virtualmachines")["items"]) == 2


def test_watches_and_pages_across_namespaces_show_only_what_the_user_may_list(tenants: Tenants) -> None:
    alice = tenants.as_user("alice")
    for index in range(3):
        tenants.admin.post(vms(tenants.dev), vm_manifest(f"mine-{index}", cores=1, disk=None))
        tenants.admin.post(vms(tenants.prod), vm_manifest(f"theirs-{index}", cores=1, disk=None))
    first = alice.get("/apis/kubevirt.io/v1/virtualmachines?limit=2")
    rest = alice.get(f"/apis/kubevirt.io/v1/virtualmachines?limit=2&continue={first['metadata']['continue']}")
    paged = [(v["metadata"]["namespace"], v["metadata"]["name"]) for v in first["items"] + rest["items"]]
    assert paged == [(tenants.dev, f"mine-{index}") for index in range(3)]
    host, port = tenants.app.url.removeprefix("https://").split(":")
    pair = tenants.ca.issue_client("alice")
    folder = tenants.app.data_dir / "alice-tls"
    pki.write_private(folder / "alice.crt", pair.cert_pem)
    pki.write_private(folder / "alice.key", pair.key_pem)
    context = ssl.create_default_context(cadata=tenants.ca.cert_pem)
    context.load_cert_chain(folder / "alice.crt", folder / "alice.key")
    with socket.create_connection((host, int(port)), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname=host) as connection:
        connection.sendall(b"GET /apis/kubevirt.io/v1/virtualmachines?watch=true&timeoutSeconds=1 HTTP/1.1\r\n"
                           b"Host: x\r\nConnection: close\r\n\r\n")
        stream = b""
        while chunk := connection.recv(65536):
            stream += chunk
    assert b" 200 " in stream.split(b"\r\n", 1)[0]
    assert stream.count(b'"ADDED"') == 3 and b"theirs-" not in stream


def test_a_member_reads_its_project_and_its_usage_but_no_other_teams_vms(tenants: Tenants) -> None:
    other = f"{tenants.dev}-b"
    tenants.admin.post("/api/v1/namespaces", {"metadata": {"name": other,
                                                           "labels": {objects.PROJECT_LABEL: tenants.project}}})
    tenants.admin.post(vms(other), vm_manifest("secret-vm", cores=1, disk=None))
    tenants.admin.put(action_path(other, "secret-vm", "start"))
    alice = tenants.as_user("alice")
    project = alice.get(f"/apis/vmquota.io/v1/projects/{tenants.project}")
    assert project["spec"]["resourceQuota"]["hard"]["limits.cpu"] == "8"
    wait_until(lambda: alice.get(f"/apis/vmquota.io/v1/projects/{tenants.project}/usage")["used"].get(
        "limits.cpu") == "1", what="the project to count secret-vm")
    usage = alice.get(f"/apis/vmquota.io/v1/projects/{tenants.project}/usage")
    by_namespace = {n["namespace"]: n for n in usage["namespaces"]}
    assert by_namespace[other]["used"]["limits.cpu"] == "1"
    assert by_namespace[other]["virtualMachines"] == []  # another team's VMs stay hidden
    assert refusal(tenants.as_user("mallory").get, f"/apis/vmquota.io/v1/projects/{tenants.project}")["code"] == 403
    assert refusal(alice.patch, f"/apis/vmquota.io/v1/projects/{tenants.project}",
                   {"spec": {"resourceQuota": {"hard": {"limits.cpu": "80"}}}})["code"] == 403


def test_charges_across_namespaces_show_only_the_namespaces_the_user_may_read(tenants: Tenants) -> None:
    """`GET /apis/vmquota.io/v1/charges` by a tenant is the tenant view of its namespaces, as every list across
    namespaces is: another team's VM names and charges never show (they once did, every one of them)."""
    tenants.admin.post(vms(tenants.prod), vm_manifest("secret-vm", cores=1, disk=None))
    tenants.admin.post(vms(tenants.dev), vm_manifest("mine", cores=1, disk=None))
    alice = tenants.as_user("alice")
    shown = {(c["namespace"], c["name"]) for c in alice.get("/apis/vmquota.io/v1/charges")["items"]}
    assert (tenants.dev, "mine") in shown
    assert all(namespace == tenants.dev for namespace, _ in shown), shown
    everything = {(c["namespace"], c["name"]) for c in tenants.admin.get("/apis/vmquota.io/v1/charges")["items"]}
    assert (tenants.prod, "secret-vm") in everything
    assert refusal(tenants.as_user("mallory").get, "/apis/vmquota.io/v1/charges")["code"] == 403


def test_a_namespace_admin_binds_what_it_holds_and_nothing_more(tenants: Tenants) -> None:
    tenants.bind(tenants.dev, "admin", user="carol")
    carol = tenants.as_user("carol")
    carol.post(f"{RBAC_V1}/namespaces/{tenants.dev}/rolebindings", {
        "metadata": {"name": "dave-edit"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                                       "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"kind": "User", "name": "dave"}]})
    tenants.as_user("dave").get(vms(tenants.dev))
    refused = refusal(carol.post, f"{RBAC_V1}/namespaces/{tenants.dev}/rolebindings", {
        "metadata": {"name": "carol-root"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                                        "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "User", "name": "carol"}]})
    assert refused["code"] == 403
    assert refused["message"].startswith('rolebindings.rbac.authorization.k8s.io "carol-root" is forbidden: user '
                                         '"carol" (groups=["system:authenticated"]) is attempting to grant RBAC '
                                         "permissions not currently held:\n")
    refused = refusal(carol.post, f"{RBAC_V1}/namespaces/{tenants.dev}/roles", {
        "metadata": {"name": "quota-raiser"},
        "rules": [{"apiGroups": [""], "resources": ["resourcequotas"], "verbs": ["patch"]}]})
    assert refused["message"].endswith('{APIGroups:[""], Resources:["resourcequotas"], Verbs:["patch"]}')
    carol.post(f"{RBAC_V1}/namespaces/{tenants.dev}/roles", {
        "metadata": {"name": "vm-starter"},
        "rules": [{"apiGroups": ["subresources.kubevirt.io"], "resources": ["virtualmachines/start"],
                   "verbs": ["update"]}]})
    carol.patch(f"{RBAC_V1}/namespaces/{tenants.dev}/roles/vm-starter", {"rules": [
        {"apiGroups": ["subresources.kubevirt.io"], "resources": ["virtualmachines/stop"], "verbs": ["update"]}]})
    assert refusal(carol.patch, f"{RBAC_V1}/namespaces/{tenants.dev}/roles/vm-starter", {"rules": [
        {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]})["code"] == 403


def test_roles_and_bindings_are_checked_as_kubernetes_checks_them(tenants: Tenants) -> None:
    base = f"{RBAC_V1}/namespaces/{tenants.dev}"
    assert refusal(tenants.admin.post, f"{base}/roles", {"metadata": {"name": "r"}, "rules": [
        {"apiGroups": [""], "resources": ["pods"]}]})["message"] == (
        'Role.rbac.authorization.k8s.io "r" is invalid: rules[0].verbs: Required value: verbs must contain at '
        "least one value")
    tenants.bind(tenants.dev, "view", user="erin", name="erin-view")
    assert refusal(tenants.admin.patch, f"{base}/rolebindings/erin-view", {"roleRef": {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"}})["message"].endswith(
        "roleRef: Invalid value: cannot change roleRef")
    names = [r["metadata"]["name"] for r in tenants.admin.get(f"{RBAC_V1}/clusterroles")["items"]]
    assert {"cluster-admin", "admin", "edit", "view", "kubevirt.io:edit", "system:basic-user"} <= set(names)
    edit = tenants.admin.get(f"{RBAC_V1}/clusterroles/edit")
    assert {"apiGroups": ["subresources.kubevirt.io"], "resources": [
        "virtualmachines/start", "virtualmachines/stop", "virtualmachines/restart", "virtualmachines/migrate"],
        "verbs": ["update"]} in edit["rules"]
    view = tenants.admin.get(f"{RBAC_V1}/clusterroles/view")
    assert not any("subresources.kubevirt.io" in r.get("apiGroups", []) for r in view["rules"])


def test_self_subject_access_and_rules_reviews_answer_as_requests_are_decided(tenants: Tenants) -> None:
    alice = tenants.as_user("alice")

    def can(verb: str, resource: str, namespace: str, group: str = "", subresource: str = "") -> bool:
        return bool(alice.post("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {"verb": verb, "resource": resource, "namespace": namespace,
                                            "group": group, "subresource": subresource}}})["status"]["allowed"])

    assert not can("patch", "resourcequotas", tenants.dev)
    assert can("get", "resourcequotas", tenants.dev)
    assert can("update", "virtualmachines", tenants.dev, "subresources.kubevirt.io", "start")
    assert not can("update", "virtualmachines", tenants.prod, "subresources.kubevirt.io", "start")
    rules = alice.post("/apis/authorization.k8s.io/v1/selfsubjectrulesreviews",
                       {"spec": {"namespace": tenants.dev}})["status"]
    assert any("virtualmachines/start" in r.get("resources", []) for r in rules["resourceRules"])


# -- the route table: no path answers without an authorization check ---------------------------------------

def route_table() -> list[str]:
    """Every path the server routes, from the registries (`objects`, `handlers.NON_RESOURCE`), plus the fixed
    paths other parts of the server serve or may serve (discovery, OpenAPI, version, metrics, the dashboard)."""
    paths = set(handlers.NON_RESOURCE) | {"/", "/version", "/metrics", "/api", "/api/v1", "/apis",
                                          "/apis/kubevirt.io/v1", "/openapi/v2", "/openapi/v3", "/openapi.json",
                                          "/livez", "/readyz", "/no/such/path", "/api/v1/nosuch"}
    for kind in objects.KINDS:
        base = f"/apis/{kind.group}/{kind.version}" if kind.group else "/api/v1"
        if kind.namespaced:
            paths |= {f"{base}/{kind.plural}", f"{base}/namespaces/ns/{kind.plural}",
                      f"{base}/namespaces/ns/{kind.plural}/x", f"{base}/namespaces/ns/{kind.plural}?watch=true"}
        else:
            paths |= {f"{base}/{kind.plural}", f"{base}/{kind.plural}/x", f"{base}/{kind.plural}?watch=true"}
    for sub in objects.SUBRESOURCES:
        base = f"/apis/{sub.group}/{sub.version}" if sub.group else "/api/v1"
        scope = "namespaces/ns/" if sub.parent.namespaced else ""
        paths.add(f"{base}/{scope}{sub.parent.plural}/x/{sub.name}")
    paths |= {"/apis/vmquota.io/v1/charges", "/apis/vmquota.io/v1/namespaces/ns/charges",
              "/apis/vmquota.io/v1/namespaces/ns/charges/x", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
              "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews",
              "/apis/authentication.k8s.io/v1/selfsubjectreviews",
              "/apis/upload.cdi.kubevirt.io/v1beta1/namespaces/ns/datavolumes/x/upload"}
    return sorted(paths)


def test_every_route_is_guarded_by_authorization(tenants: Tenants) -> None:
    """With every binding gone, an authenticated user is refused everywhere, and nobody without credentials
    gets further than a 401 (but on the public paths, which authorization then refuses too)."""
    with tenants.app.store.transaction() as txn:
        for kind in (objects.CLUSTER_ROLE_BINDING, objects.ROLE_BINDING):
            for namespace, name in txn.names(kind):
                txn.delete(kind, namespace, name)
    nobody, anonymous = tenants.as_user("nobody", "some-group"), tenants.with_token(None)
    table = route_table()
    assert len(table) > 60
    try:
        for path in table:
            for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                code = _code(nobody, method, path)
                assert code == 403, f"{method} {path} answered {code} without an authorization check"
                code = _code(anonymous, method, path)
                expected = 403 if path.partition("?")[0] in authentication.PUBLIC_PATHS else 401
                assert code == expected, f"{method} {path} answered {code} to a request without credentials"
    finally:
        with tenants.app.store.transaction() as txn:
            app_module._bootstrap_rbac(txn)  # the admin's binding back, for the clean-up


def _code(client: Client, method: str, path: str) -> int:
    try:
        client.request(method, path, {} if method in ("POST", "PUT", "PATCH") else None)
    except ClientError as e:
        return e.code
    return 200


# -- audit -------------------------------------------------------------------------------------------------

def test_the_audit_log_holds_writes_and_refusals_with_quota_hard_before_and_after(tenants: Tenants) -> None:
    alice = tenants.as_user("alice", "team-a")
    quota = f"/api/v1/namespaces/{tenants.dev}/resourcequotas/compute"
    refusal(alice.patch, quota, {"spec": {"hard": {"limits.cpu": "400"}}})
    tenants.admin.patch(quota, {"spec": {"hard": {"limits.cpu": "6"}}})
    events = list(read(audit_dir(tenants.app.data_dir)))
    refused = [e for e in events if e["user"].get("username") == "alice" and e["verb"] == "patch"]
    assert len(refused) == 1
    assert refused[0]["kind"] == "Event" and refused[0]["apiVersion"] == "audit.k8s.io/v1"
    assert refused[0]["user"]["groups"] == ["team-a", identity.AUTHENTICATED]
    assert refused[0]["objectRef"] == {"resource": "resourcequotas", "namespace": tenants.dev, "name": "compute",
                                       "apiVersion": "v1"}
    assert refused[0]["responseStatus"]["code"] == 403
    assert refused[0]["annotations"]["authorization.k8s.io/decision"] == "forbid"
    assert refused[0]["annotations"]["vmquota.io/hard-after"] == '{"limits.cpu": "4"}'
    raised = [e for e in events if e["user"].get("username") == "admin" and e["verb"] == "patch"][-1]
    assert raised["annotations"]["vmquota.io/hard-before"] == '{"limits.cpu": "4"}'
    assert raised["annotations"]["vmquota.io/hard-after"] == '{"limits.cpu": "6"}'
    assert raised["annotations"]["authorization.k8s.io/decision"] == "allow"
    assert not [e for e in events if e["verb"] in ("get", "list") and e["responseStatus"]["code"] < 400]


def test_no_secret_reaches_the_audit_log(tenants: Tenants) -> None:
    tenants.admin.post(f"/api/v1/namespaces/{tenants.dev}/serviceaccounts", {"metadata": {"name": "ci"}})
    token = tenants.admin.post(f"/api/v1/namespaces/{tenants.dev}/serviceaccounts/ci/token", {})["status"]["token"]
    refusal(tenants.with_token(token).get, vms(tenants.dev))
    refusal(tenants.with_token("secret-of-bob-but-wrong").get, vms(tenants.dev))
    text = (audit_dir(tenants.app.data_dir) / "audit.log").read_text()
    assert token not in text and token.split(".")[2] not in text and "secret-of-bob" not in text
    assert '"code":401' in text


def test_the_audit_log_rotates(tmp_path: Path) -> None:
    from vmquota.apiserver.audit import AuditLog
    log = AuditLog(tmp_path, max_bytes=2000, backups=2)
    for index in range(100):
        log.write({"n": index, "pad": "x" * 50})
    log.close()
    kept = [e["n"] for e in read(tmp_path, backups=2)]
    assert kept == sorted(kept) and kept[-1] == 99 and len(kept) < 100
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "audit.log", "audit.log.1", "audit.log.2"]
    assert stat.S_IMODE((tmp_path / "audit.log").stat().st_mode) == 0o600


# -- per-user limits ---------------------------------------------------------------------------------------

def test_a_user_beyond_its_in_flight_limit_gets_429_and_others_are_served() -> None:
    limit = limits.InFlight(per_user=2)
    release = threading.Event()
    entered = threading.Semaphore(0)

    def slow(request: Request) -> Response:
        entered.release()
        release.wait(30)
        return Response(200, b"{}")

    def call(user: str) -> Response:
        request = Request("GET", "/x", {}, {}, b"", user=identity.authenticated(user))  # type: ignore[arg-type]
        return limit(request, slow)

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(call("greedy").code)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for _ in threads:
        entered.acquire(timeout=30)
    refused = call("greedy")
    assert refused.code == 429 and refused.headers == {"Retry-After": "1"}
    assert json.loads(refused.body)["reason"] == "TooManyRequests"  # type: ignore[arg-type]
    release.set()
    assert call("polite").code == 200
    for thread in threads:
        thread.join()
    assert results == [200, 200]
    assert call("greedy").code == 200  # counted down again


def test_the_cli_issues_a_users_kubeconfig_and_reads_the_audit_log(tenants: Tenants, tmp_path: Path) -> None:
    import subprocess
    import sys

    data = str(tenants.app.data_dir)
    done = subprocess.run([sys.executable, "-m", "vmquota", "kubeconfig", "--data-dir", data, "--user", "alice",
                           "--group", "team-a", "--namespace", tenants.dev, "--expiration", "720h"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "alice.kubeconfig"
    path.write_text(done.stdout)
    connection = kubeconfig.load([path])
    assert connection.namespace == tenants.dev and connection.server == tenants.app.url
    assert connection.client_cert_pem is not None
    cert = x509.load_pem_x509_certificate(connection.client_cert_pem.encode())
    assert pki.subject_identity(cert) == ("alice", ("team-a",))
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 720 * 3600 <= lifetime.total_seconds() <= 720 * 3600 + 600
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "VMQUOTA_SERVER")}
    get = subprocess.run([sys.executable, "-m", "vmquota", "--kubeconfig", str(path), "get", "quotas"],
                         capture_output=True, text=True, timeout=60, check=False, env=env)
    assert get.returncode == 0, get.stderr
    assert "compute" in get.stdout
    patch = subprocess.run([sys.executable, "-m", "vmquota", "--kubeconfig", str(path), "get", "vms", "-n",
                            tenants.prod], capture_output=True, text=True, timeout=60, check=False, env=env)
    assert patch.returncode == 1
    assert 'Error from server (Forbidden): virtualmachines.kubevirt.io is forbidden: User "alice"' in patch.stderr
    audit = subprocess.run([sys.executable, "-m", "vmquota", "audit", "--data-dir", data, "--user", "alice",
                            "--since", "1h"], capture_output=True, text=True, timeout=60, check=False)
    assert audit.returncode == 0, audit.stderr
    events = [json.loads(line) for line in audit.stdout.splitlines()]
    assert events and all(e["user"]["username"] == "alice" for e in events)
    assert events[-1]["objectRef"]["namespace"] == tenants.prod


def test_only_cluster_admin_writes_nodes_and_a_team_reads_its_own_vmis(tenants: Tenants) -> None:
    alice, dev, prod = tenants.as_user("alice", "team-a"), tenants.dev, tenants.prod
    node = tenants.admin.get("/api/v1/nodes")["items"][0]["metadata"]["name"]
    assert refusal(alice.patch, f"/api/v1/nodes/{node}", {"spec": {"unschedulable": True}}) == forbidden(
        f'nodes "{node}" is forbidden: User "alice" cannot patch resource "nodes" in API group "" at the cluster '
        f'scope', node, "", "nodes")
    assert refusal(alice.post, "/api/v1/nodes", {"metadata": {"name": "mine"},
                                                 "spec": {"providerID": "qemu+ssh://mine/system"}})["code"] == 403
    alice.post(vms(dev), vm_manifest("web-1", cores=1, disk=None, strategy="Always"))
    wait_until(lambda: alice.get(f"/apis/kubevirt.io/v1/namespaces/{dev}/virtualmachineinstances")["items"],
               what="alice's VMI")
    assert refusal(alice.get, f"/apis/kubevirt.io/v1/namespaces/{prod}/virtualmachineinstances")["code"] == 403
    tenants.admin.patch(f"/api/v1/nodes/{node}", {"spec": {"unschedulable": True}})
    tenants.admin.patch(f"/api/v1/nodes/{node}", {"spec": {"unschedulable": None}})
