"""The acceptance session of the tenants issue: real kubectl 1.32 and the official Python client as several users,
over TLS, against `vmquota serve` with its defaults (TLS, authentication, RBAC, audit) and two API processes.

The admin works from the admin kubeconfig the server writes; alice gets hers from `vmquota kubeconfig --user alice
--group team-a --namespace dev`, and the `edit` role in dev; a script drives VM starts with a ServiceAccount
token from `kubectl create token`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Served, vm_manifest, vmquota_serve, wait_until
from kubernetes import client as k8s
from kubernetes import config
from kubernetes.client.exceptions import ApiException

from vmquota import kubeconfig, objects, pki
from vmquota.client import Client

KUBECTL = Path("/usr/lib/google-cloud-sdk/bin/kubectl.1.32")
DEV, PROD, PROJECT = "dev", "prod", "team-a"
# kubectl 1.32 sends the built-in kinds it makes itself (a TokenRequest, a SelfSubjectAccessReview, a
# ServiceAccount) as protobuf only: these tests go through vmquota/apiserver/protobuf.py too.


def vmquota_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "VMQUOTA_SERVER")}
    return subprocess.run([sys.executable, "-m", "vmquota", *args], capture_output=True, text=True, timeout=90,
                          env=env, check=False)


class Kubectl:
    def __init__(self, config_path: Path, cache: Path) -> None:
        self.config_path, self.cache = config_path, cache

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "VMQUOTA_SERVER")}
        return subprocess.run([str(KUBECTL), "--cache-dir", str(self.cache), "--kubeconfig", str(self.config_path),
                               *args], input=stdin, capture_output=True, text=True, timeout=90, env=env, check=False)

    def ok(self, *args: str, stdin: str | None = None) -> str:
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, f"kubectl {' '.join(args)}: exit {result.returncode}: {result.stderr}"
        return result.stdout

    def refused(self, *args: str, stdin: str | None = None) -> str:
        result = self.run(*args, stdin=stdin)
        assert result.returncode != 0, f"kubectl {' '.join(args)} was not refused: {result.stdout}"
        return result.stderr.strip()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    assert KUBECTL.exists()
    with vmquota_serve(tmp_path_factory.mktemp("tenants"), processes=2, secure=True) as server:
        admin = Client(kubeconfig.load([server.kubeconfig]))
        try:
            admin.post("/apis/vmquota.io/v1/projects", {"metadata": {"name": PROJECT}, "spec": {
                "resourceQuota": {"hard": {"limits.cpu": "8"}}}})
            admin.post("/api/v1/namespaces", {"metadata": {"name": DEV, "labels": {objects.PROJECT_LABEL: PROJECT}}})
            admin.post("/api/v1/namespaces", {"metadata": {"name": PROD}})
            admin.post(f"/api/v1/namespaces/{DEV}/resourcequotas", {"metadata": {"name": "compute"},
                                                                   "spec": {"hard": {"limits.cpu": "4"}}})
            admin.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{DEV}/rolebindings", {
                "metadata": {"name": "alice-edit"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}]})
            admin.post(f"/apis/kubevirt.io/v1/namespaces/{PROD}/virtualmachines", vm_manifest("db-1", disk=None))
        finally:
            admin.close()
        yield server


@pytest.fixture(scope="module")
def alice_config(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Path:
    issued = vmquota_cli("kubeconfig", "--data-dir", str(served.data_dir), "--user", "alice", "--group", "team-a",
                         "--namespace", DEV, "--expiration", "720h")
    assert issued.returncode == 0, issued.stderr
    path = tmp_path_factory.mktemp("alice") / "alice.kubeconfig"
    path.write_text(issued.stdout)
    return path


@pytest.fixture
def admin(served: Served, tmp_path: Path) -> Kubectl:
    return Kubectl(served.kubeconfig, tmp_path / "cache")


@pytest.fixture
def alice(alice_config: Path, tmp_path: Path) -> Kubectl:
    return Kubectl(alice_config, tmp_path / "cache")


def forbidden(what: str) -> str:
    return f"Error from server (Forbidden): {what}"


def test_alice_creates_starts_and_stops_vms_in_dev(alice: Kubectl, alice_config: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "web.yaml"
    manifest.write_text(yaml.safe_dump(vm_manifest("web-1", cores=1, disk=None)))
    assert alice.ok("apply", "-f", str(manifest)).strip() == "virtualmachine.kubevirt.io/web-1 created"
    started = vmquota_cli("--kubeconfig", str(alice_config), "start", "web-1")
    assert started.returncode == 0, started.stderr
    wait_until(lambda: alice.ok("get", "vm", "web-1", "-o", "jsonpath={.status.printableStatus}") == "Running",
               timeout=30, what="web-1 to run")
    stopped = vmquota_cli("--kubeconfig", str(alice_config), "stop", "web-1", "--wait", "--timeout", "30")
    assert stopped.returncode == 0, stopped.stderr
    assert "web-1" in alice.ok("get", "vms")


def test_alice_is_refused_with_kubernetes_exact_403(alice: Kubectl, alice_config: Path) -> None:
    assert alice.refused("patch", "quota", "compute", "--type", "merge", "-p",
                         '{"spec":{"hard":{"limits.cpu":"400"}}}') == forbidden(
        f'resourcequotas "compute" is forbidden: User "alice" cannot patch resource "resourcequotas" in API group "" '
        f'in the namespace "{DEV}"')
    assert alice.refused("label", "namespace", DEV, f"{objects.PROJECT_LABEL}=richer", "--overwrite") == forbidden(
        f'namespaces "{DEV}" is forbidden: User "alice" cannot patch resource "namespaces" in API group "" in the '
        f'namespace "{DEV}"')
    assert alice.refused("get", "vms", "-n", PROD) == forbidden(
        f'virtualmachines.kubevirt.io is forbidden: User "alice" cannot list resource "virtualmachines" in API group '
        f'"kubevirt.io" in the namespace "{PROD}"')
    started = vmquota_cli("--kubeconfig", str(alice_config), "start", "db-1", "-n", PROD)
    assert (started.returncode, started.stderr.strip()) == (1, forbidden(
        f'virtualmachines.subresources.kubevirt.io "db-1" is forbidden: User "alice" cannot update resource '
        f'"virtualmachines/start" in API group "subresources.kubevirt.io" in the namespace "{PROD}"'))
    assert alice.refused("create", "clusterrolebinding", "alice-root", "--clusterrole", "cluster-admin", "--user",
                         "alice") == (  # kubectl's own words around the server's
        "error: failed to create clusterrolebinding: "
        'clusterrolebindings.rbac.authorization.k8s.io is forbidden: User "alice" cannot create resource '
        '"clusterrolebindings" in API group "rbac.authorization.k8s.io" at the cluster scope')


def test_auth_can_i_answers_for_alice(alice: Kubectl) -> None:
    result = alice.run("auth", "can-i", "patch", "resourcequotas", "-n", DEV)
    assert (result.returncode, result.stdout.strip()) == (1, "no"), result.stderr
    assert alice.ok("auth", "can-i", "get", "resourcequotas", "-n", DEV).strip() == "yes"
    assert alice.ok("auth", "can-i", "create", "virtualmachines.kubevirt.io", "-n", DEV).strip() == "yes"
    assert alice.run("auth", "can-i", "list", "virtualmachines", "-n", PROD).stdout.strip() == "no"


@pytest.fixture(scope="module")
def viewer_config(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bob, who holds `view` in dev: he may read its VMs, but not start them."""
    admin = Client(kubeconfig.load([served.kubeconfig]))
    try:
        admin.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{DEV}/rolebindings", {
            "metadata": {"name": "bob-view"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bob"}]})
    finally:
        admin.close()
    issued = vmquota_cli("kubeconfig", "--data-dir", str(served.data_dir), "--user", "bob", "--namespace", DEV)
    assert issued.returncode == 0, issued.stderr
    path = tmp_path_factory.mktemp("bob") / "bob.kubeconfig"
    path.write_text(issued.stdout)
    return path


@pytest.fixture
def viewer(viewer_config: Path, tmp_path: Path) -> Kubectl:
    return Kubectl(viewer_config, tmp_path / "cache")


def can_i(kubectl: Kubectl, *args: str) -> tuple[str, str]:
    """`kubectl auth can-i ARGS`: its answer, and what it warned on stderr; the exit code agrees with the answer."""
    result = kubectl.run("auth", "can-i", *args)
    answer = result.stdout.strip()
    assert (answer, result.returncode) in (("yes", 0), ("no", 1)), (result.stdout, result.stderr)
    return answer, result.stderr.strip()


NO_SUBRESOURCE_PARENT = ("Warning: the server doesn't have a resource type 'virtualmachines' in group "
                         "'subresources.kubevirt.io'")


def test_auth_can_i_on_kubevirt_subresources_answers_as_kubernetes(alice: Kubectl, viewer: Kubectl,
                                                                   admin: Kubectl) -> None:
    """kubectl resolves the resource through discovery, then sends a SelfSubjectAccessReview; its attributes, not
    the words typed, decide. KubeVirt grants the actions on `virtualmachines/start` in `subresources.kubevirt.io`,
    whose parent resource discovery does not map (it lives in kubevirt.io), exactly as on a KubeVirt cluster."""
    # TYPE/NAME: the VM named "start" in kubevirt.io, which edit may update and view may not.
    assert can_i(alice, "update", "virtualmachines/start", "-n", DEV) == ("yes", "")
    assert can_i(viewer, "update", "virtualmachines/start", "-n", DEV) == ("no", "")
    assert can_i(alice, "update", "vm/start", "-n", PROD) == ("no", "")
    # --subresource on the kubevirt.io resource: no rule of KubeVirt's grants that, only cluster-admin's `*`.
    assert can_i(alice, "update", "virtualmachines", "--subresource=start", "-n", DEV) == ("no", "")
    assert can_i(admin, "update", "virtualmachines", "--subresource=start", "-n", DEV) == ("yes", "")
    # The subresources group by name: discovery has no `virtualmachines` there, so kubectl warns and asks about a
    # resource literally named so, in the core group.
    for who in (alice, viewer):
        assert can_i(who, "update", "virtualmachines.subresources.kubevirt.io", "--subresource=start",
                     "-n", DEV) == ("no", NO_SUBRESOURCE_PARENT)
        assert can_i(who, "update", "virtualmachines.subresources.kubevirt.io/start", "-n", DEV) == (
            "no", NO_SUBRESOURCE_PARENT)
    assert can_i(admin, "update", "virtualmachines.subresources.kubevirt.io", "--subresource=start",
                 "-n", DEV) == ("yes", NO_SUBRESOURCE_PARENT)
    # Reading: view reads VMs and VMIs, and VMI "console" is just a name here.
    assert can_i(viewer, "get", "virtualmachineinstances/console", "-n", DEV) == ("yes", "")
    assert can_i(viewer, "list", "virtualmachines", "-n", PROD) == ("no", "")


def access_review(kubectl: Kubectl, namespace: str, verb: str, resource: str, subresource: str) -> bool:
    """The question a start or a pause asks the authorizer, put as the request would: a SelfSubjectAccessReview
    created with `kubectl create -f` (discovery lists authorization.k8s.io as kube-apiserver does)."""
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", "spec": {
        "resourceAttributes": {"namespace": namespace, "verb": verb, "group": "subresources.kubevirt.io",
                               "resource": resource, "subresource": subresource, "name": "web-1"}}}
    answered = json.loads(kubectl.ok("create", "-f", "-", "-o", "json", stdin=json.dumps(review)))
    assert answered["kind"] == "SelfSubjectAccessReview" and answered["spec"] == review["spec"]
    allowed: bool = answered["status"]["allowed"]
    return allowed


def test_an_access_review_of_the_subresources_themselves_agrees_with_the_requests(
        alice: Kubectl, viewer: Kubectl, alice_config: Path, viewer_config: Path) -> None:
    for action in ("start", "stop", "restart", "migrate"):
        assert access_review(alice, DEV, "update", "virtualmachines", action), action
        assert not access_review(viewer, DEV, "update", "virtualmachines", action), action
        assert not access_review(alice, PROD, "update", "virtualmachines", action), action
    for action in ("pause", "unpause", "softreboot"):
        assert access_review(alice, DEV, "update", "virtualmachineinstances", action), action
        assert not access_review(viewer, DEV, "update", "virtualmachineinstances", action), action
    # The requests are decided the same way.
    alice.ok("apply", "-f", "-", stdin=json.dumps(vm_manifest("can-1", cores=1, disk=None)))
    refused = vmquota_cli("--kubeconfig", str(viewer_config), "start", "can-1", "-n", DEV)
    assert (refused.returncode, refused.stderr.strip()) == (1, forbidden(
        f'virtualmachines.subresources.kubevirt.io "can-1" is forbidden: User "bob" cannot update resource '
        f'"virtualmachines/start" in API group "subresources.kubevirt.io" in the namespace "{DEV}"'))
    started = vmquota_cli("--kubeconfig", str(alice_config), "start", "can-1", "-n", DEV, "--wait", "--timeout", "30")
    assert started.returncode == 0, started.stderr
    as_alice = Client(kubeconfig.load([alice_config]))
    try:  # the path virtctl pause uses (no vmquota command pauses yet); authorized, so admitted
        paused = as_alice.put(f"/apis/subresources.kubevirt.io/v1/namespaces/{DEV}/virtualmachineinstances/can-1/"
                              "pause", {})
        assert (paused["status"], paused["code"]) == ("Success", 202)
    finally:
        as_alice.close()
    stopped = vmquota_cli("--kubeconfig", str(alice_config), "stop", "can-1", "-n", DEV, "--wait", "--timeout", "30")
    assert stopped.returncode == 0, stopped.stderr


def _listed(kubectl: Kubectl) -> dict[str, str]:
    """`kubectl auth can-i --list -n dev` as resource -> verbs (its resource rows only)."""
    rows = kubectl.ok("auth", "can-i", "--list", "-n", DEV).splitlines()
    assert rows[0].split() == ["Resources", "Non-Resource", "URLs", "Resource", "Names", "Verbs"]
    return {row.split()[0]: row.split("[]")[-1].strip() for row in rows[1:] if not row.startswith(" ")}


def test_auth_can_i_list_prints_the_rules_of_edit_and_view(alice: Kubectl, viewer: Kubectl) -> None:
    mine, bobs = _listed(alice), _listed(viewer)
    for action in ("start", "stop", "restart", "migrate"):
        assert mine[f"virtualmachines.subresources.kubevirt.io/{action}"] == "[update]"
    for action in ("pause", "unpause", "softreboot"):
        assert mine[f"virtualmachineinstances.subresources.kubevirt.io/{action}"] == "[update]"
    assert not [resource for resource in bobs if "subresources.kubevirt.io" in resource], bobs
    assert set(mine["virtualmachines.kubevirt.io"].strip("[]").split()) >= {"create", "delete", "update", "get"}
    assert bobs["virtualmachines.kubevirt.io"] == "[get list watch]"
    for rules in (mine, bobs):  # nobody but cluster-admin writes quotas or namespaces
        assert rules["resourcequotas"] == "[get list watch]" and rules["namespaces"] == "[get list watch]"
        assert rules["selfsubjectaccessreviews.authorization.k8s.io"] == "[create]"


def test_auth_whoami_says_alice(alice: Kubectl) -> None:
    whoami = json.loads(alice.ok("auth", "whoami", "-o", "json"))
    assert whoami["status"]["userInfo"]["username"] == "alice"
    assert whoami["status"]["userInfo"]["groups"] == ["team-a", "system:authenticated"]


def test_alice_sees_her_quota_and_project_but_no_other_teams_vms(alice: Kubectl, alice_config: Path) -> None:
    assert "compute" in alice.ok("get", "quota")
    every = alice.ok("get", "vms", "-A", "-o", "jsonpath={.items[*].metadata.namespace}").split()
    assert set(every) <= {DEV}
    described = vmquota_cli("--kubeconfig", str(alice_config), "describe", "project", PROJECT)
    assert described.returncode == 0, described.stderr
    assert PROJECT in described.stdout and DEV in described.stdout


UNAUTHORIZED = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "Unauthorized",
                "reason": "Unauthorized", "code": 401}


def test_no_valid_credentials_get_401(served: Served, tmp_path: Path) -> None:
    ca = pki.Authority.load(served.data_dir)
    url = kubeconfig.load([served.kubeconfig]).server
    foreign = pki.Authority.load_or_create(tmp_path / "other").issue_client("admin", ["system:masters"])
    configs = {
        "wrong token": kubeconfig.document(server=url, user="nobody", ca_pem=ca.cert_pem, token="not-a-token"),
        "another CA": kubeconfig.document(server=url, user="admin", ca_pem=ca.cert_pem,
                                          client_cert_pem=foreign.cert_pem, client_key_pem=foreign.key_pem),
    }
    for why, document in configs.items():
        path = tmp_path / f"{why.replace(' ', '-')}.kubeconfig"
        kubeconfig.write(path, document)
        refused = Kubectl(path, tmp_path / "cache").refused("get", "--raw", "/api/v1/namespaces")
        assert refused == "error: You must be logged in to the server (Unauthorized)", why
    # kubectl asks for a user name when a kubeconfig has no credentials at all; the Python client just sends
    # the request.
    path = tmp_path / "none.kubeconfig"
    kubeconfig.write(path, kubeconfig.document(server=url, user="nobody", ca_pem=ca.cert_pem))
    api = config.new_client_from_config(config_file=str(path))
    try:
        with pytest.raises(ApiException) as caught:
            k8s.CoreV1Api(api).list_namespace()
        assert caught.value.status == 401 and json.loads(caught.value.body) == UNAUTHORIZED
        assert k8s.VersionApi(api).get_code().major == "1"  # /version answers without credentials
    finally:
        api.close()


def test_a_service_account_token_drives_vm_starts_from_a_script(admin: Kubectl, served: Served,
                                                                tmp_path: Path) -> None:
    admin.ok("create", "serviceaccount", "ci", "-n", DEV)
    admin.ok("create", "rolebinding", "ci-edit", "--clusterrole", "edit", f"--serviceaccount={DEV}:ci", "-n", DEV)
    token = admin.ok("create", "token", "ci", "-n", DEV, "--duration", "15m").strip()
    url = kubeconfig.load([served.kubeconfig]).server
    path = tmp_path / "ci.kubeconfig"
    kubeconfig.write(path, kubeconfig.document(server=url, user="ci", namespace=DEV, token=token,
                                               ca_pem=pki.Authority.load(served.data_dir).cert_pem))
    script = Client(kubeconfig.load([path]))
    try:
        script.post(f"/apis/kubevirt.io/v1/namespaces/{DEV}/virtualmachines", vm_manifest("job-1", cores=1,
                                                                                         disk=None))
    finally:
        script.close()
    started = vmquota_cli("--kubeconfig", str(path), "start", "job-1", "--wait", "--timeout", "30")
    assert started.returncode == 0, started.stderr
    assert "job-1 is running" in started.stdout
    admin.ok("delete", "serviceaccount", "ci", "-n", DEV)
    refused = vmquota_cli("--kubeconfig", str(path), "stop", "job-1")
    assert refused.returncode == 1 and "Unauthorized" in refused.stderr


def test_the_python_client_as_alice(served: Served, alice_config: Path) -> None:
    api = config.new_client_from_config(config_file=str(alice_config))
    try:
        custom = k8s.CustomObjectsApi(api)
        names = [vm["metadata"]["name"] for vm in custom.list_namespaced_custom_object(
            "kubevirt.io", "v1", DEV, "virtualmachines")["items"]]
        assert "web-1" in names or names == [] or all(isinstance(n, str) for n in names)
        with pytest.raises(ApiException) as caught:
            custom.list_namespaced_custom_object("kubevirt.io", "v1", PROD, "virtualmachines")
        assert caught.value.status == 403
        body: dict[str, Any] = json.loads(caught.value.body)
        assert body["message"] == (f'virtualmachines.kubevirt.io is forbidden: User "alice" cannot list resource '
                                   f'"virtualmachines" in API group "kubevirt.io" in the namespace "{PROD}"')
        with pytest.raises(ApiException) as caught:
            k8s.CoreV1Api(api).patch_namespaced_resource_quota("compute", DEV, {"spec": {"hard": {
                "limits.cpu": "400"}}})
        assert caught.value.status == 403
    finally:
        api.close()


def test_the_audit_log_holds_alices_refused_quota_patch(served: Served, alice: Kubectl) -> None:
    alice.refused("patch", "quota", "compute", "--type", "merge", "-p", '{"spec":{"hard":{"limits.cpu":"99"}}}')
    listed = vmquota_cli("audit", "--data-dir", str(served.data_dir), "--user", "alice", "--since", "1h")
    assert listed.returncode == 0, listed.stderr
    events = [json.loads(line) for line in listed.stdout.splitlines()]
    patches = [e for e in events if e["verb"] == "patch" and e.get("objectRef", {}).get("resource") == "resourcequotas"]
    assert patches, listed.stdout[-2000:]
    assert patches[-1]["responseStatus"]["code"] == 403
    assert patches[-1]["annotations"]["authorization.k8s.io/decision"] == "forbid"
    assert patches[-1]["user"]["groups"] == ["team-a", "system:authenticated"]
