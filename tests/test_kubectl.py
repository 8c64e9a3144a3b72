"""The real kubectl 1.32 of the machine image against a real `vmquota serve` (two API processes), reached
through the admin kubeconfig the server writes and nothing else: the acceptance session of issue 11.

Each test works in a namespace of its own on one server shared by the module. kubectl gets a discovery
cache of its own per test (`--cache-dir`), so that no test sees another's cached documents.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Served, vm_manifest, vmquota_serve, wait_until

from vmquota.client import Client, ClientError, action_path

KUBECTL = Path("/usr/lib/google-cloud-sdk/bin/kubectl.1.32")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    assert KUBECTL.exists(), f"{KUBECTL} is missing: the machine image's google-cloud-sdk package ships it"
    with vmquota_serve(tmp_path_factory.mktemp("kubectl"), processes=2) as server:
        yield server


class Kubectl:
    def __init__(self, served: Served, cache: Path) -> None:
        self.served, self.cache = served, cache

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "VMQUOTA_SERVER")}
        env["KUBECONFIG"] = str(self.served.kubeconfig)
        return env

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(KUBECTL), "--cache-dir", str(self.cache), *args], input=stdin,
                              capture_output=True, text=True, timeout=90, env=self.env(), check=False)

    def ok(self, *args: str, stdin: str | None = None) -> str:
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, f"kubectl {' '.join(args)}: exit {result.returncode}: {result.stderr}"
        return result.stdout

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([str(KUBECTL), "--cache-dir", str(self.cache), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env())


_counter = iter(range(1_000_000))


@pytest.fixture
def ns() -> str:
    return f"k{next(_counter)}-{os.getpid() % 1000}"


@pytest.fixture
def kubectl(served: Served, tmp_path: Path) -> Kubectl:
    return Kubectl(served, tmp_path / "kube-cache")


@pytest.fixture
def client(served: Served) -> Iterator[Client]:
    c = Client(served.url)
    yield c
    c.close()


def demo(ns: str, *, cpu: str = "4") -> str:
    """The README's demo.yaml, in namespace `ns`."""
    vm = vm_manifest("web-1", memory="2Gi")
    vm["metadata"].update(namespace=ns, labels={"app": "web"})
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "compute", "namespace": ns},
         "spec": {"hard": {"limits.cpu": cpu, "limits.memory": "4Gi", "requests.storage": "20Gi",
                           "count/virtualmachines.kubevirt.io": "3"}}},
        vm,
    ]
    return yaml.safe_dump_all(docs)


def table(output: str) -> tuple[list[str], dict[str, list[str]]]:
    """kubectl's table: the header's words, and rows by their first cell."""
    lines = output.splitlines()
    return lines[0].split(), {line.split()[0]: line.split() for line in lines[1:]}


def test_api_resources_lists_every_kind_and_says_nothing_on_stderr(kubectl: Kubectl) -> None:
    result = kubectl.run("api-resources")
    assert result.returncode == 0 and result.stderr == ""
    _, rows = table(result.stdout)
    assert rows["virtualmachines"] == ["virtualmachines", "vm,vms", "kubevirt.io/v1", "true", "VirtualMachine"]
    assert rows["resourcequotas"] == ["resourcequotas", "quota", "v1", "true", "ResourceQuota"]
    assert rows["namespaces"] == ["namespaces", "ns", "v1", "false", "Namespace"]
    assert rows["projects"][-3:] == ["vmquota.io/v1", "false", "Project"]
    assert {"events", "virtualmachineclones"} <= set(rows)


def test_apply_creates_then_leaves_unchanged_then_configures(kubectl: Kubectl, ns: str, tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(demo(ns))
    assert kubectl.ok("apply", "-f", str(path)).splitlines() == [
        f"namespace/{ns} created", "resourcequota/compute created", "virtualmachine.kubevirt.io/web-1 created"]
    assert kubectl.ok("apply", "-f", str(path)).splitlines() == [
        f"namespace/{ns} unchanged", "resourcequota/compute unchanged", "virtualmachine.kubevirt.io/web-1 unchanged"]
    path.write_text(demo(ns, cpu="6"))
    assert kubectl.ok("apply", "-f", str(path)).splitlines() == [
        f"namespace/{ns} unchanged", "resourcequota/compute configured", "virtualmachine.kubevirt.io/web-1 unchanged"]
    assert kubectl.ok("get", "quota", "compute", "-n", ns, "-o", "jsonpath={.spec.hard.limits\\.cpu}") == "6"


def test_server_side_apply_owns_fields_and_refuses_another_managers_change(kubectl: Kubectl, ns: str,
                                                                           tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(demo(ns))
    out = kubectl.ok("apply", "--server-side", "-f", str(path))
    assert out.splitlines() == [f"namespace/{ns} serverside-applied", "resourcequota/compute serverside-applied",
                                "virtualmachine.kubevirt.io/web-1 serverside-applied"]
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ResourceQuota",
                                     "metadata": {"name": "compute", "namespace": ns},
                                     "spec": {"hard": {"limits.cpu": "5"}}}))
    refused = kubectl.run("apply", "--server-side", "--field-manager", "team-bot", "-f", str(other))
    assert refused.returncode == 1
    assert 'conflict with "kubectl"' in refused.stderr and ".spec.hard.limits.cpu" in refused.stderr
    forced = kubectl.ok("apply", "--server-side", "--field-manager", "team-bot", "--force-conflicts", "-f", str(other))
    assert forced.strip() == "resourcequota/compute serverside-applied"
    assert kubectl.ok("get", "quota", "compute", "-n", ns, "-o", "jsonpath={.spec.hard.limits\\.cpu}") == "5"


def test_a_server_dry_run_of_a_new_vm_leaves_it_absent(kubectl: Kubectl, ns: str, client: Client,
                                                       tmp_path: Path) -> None:
    kubectl.ok("create", "namespace", ns)
    vm = vm_manifest("ghost")
    vm["metadata"]["namespace"] = ns
    path = tmp_path / "ghost.yaml"
    path.write_text(yaml.safe_dump(vm))
    out = kubectl.ok("apply", "--dry-run=server", "-f", str(path))
    assert out.strip() == "virtualmachine.kubevirt.io/ghost created (server dry run)"
    with pytest.raises(ClientError) as absent:
        client.get(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines/ghost")
    assert absent.value.code == 404


def test_create_namespace_and_quota(kubectl: Kubectl, ns: str, client: Client) -> None:
    assert kubectl.ok("create", "namespace", ns).strip() == f"namespace/{ns} created"
    out = kubectl.ok("create", "quota", "compute", "-n", ns, "--hard=limits.cpu=4,limits.memory=8Gi")
    assert out.strip() == "resourcequota/compute created"
    assert client.get(f"/api/v1/namespaces/{ns}/resourcequotas/compute")["spec"]["hard"] == {
        "limits.cpu": "4", "limits.memory": "8Gi"}


def test_get_vms_shows_kubevirts_columns_labels_and_selections(kubectl: Kubectl, ns: str, tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(demo(ns))
    kubectl.ok("apply", "-f", str(path))
    other = vm_manifest("db-1", disk=None)
    other["metadata"].update(namespace=ns, labels={"app": "db"})
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump(other))
    header, rows = table(kubectl.ok("get", "vms", "-n", ns))
    assert header == ["NAME", "AGE", "STATUS", "READY"]
    assert rows["web-1"][2:] == ["Stopped", "False"] and set(rows) == {"web-1", "db-1"}
    listed = kubectl.ok("get", "vms", "-A", "--show-labels").splitlines()
    assert listed[0].split() == ["NAMESPACE", "NAME", "AGE", "STATUS", "READY", "LABELS"]
    mine = [line.split() for line in listed[1:] if line.split()[0] == ns]  # keyed by name: -A starts with NAMESPACE
    assert sorted((row[1], row[-1]) for row in mine) == [("db-1", "app=db"), ("web-1", "app=web")]
    _, rows = table(kubectl.ok("get", "vms", "-n", ns, "-l", "app=web"))
    assert set(rows) == {"web-1"}
    _, rows = table(kubectl.ok("get", "vms", "-n", ns, "-l", "app notin (web)"))
    assert set(rows) == {"db-1"}
    missing = kubectl.run("get", "vm", "nope", "-n", ns)
    assert missing.returncode == 1
    assert missing.stderr.strip() == 'Error from server (NotFound): virtualmachines.kubevirt.io "nope" not found'


def test_get_quota_events_namespaces_and_wide_columns(kubectl: Kubectl, ns: str, client: Client,
                                                      tmp_path: Path) -> None:
    """The server's Tables for the built-in kinds: kube-apiserver's columns, -o wide adding the priority-1 ones."""
    path = tmp_path / "demo.yaml"
    path.write_text(demo(ns))
    kubectl.ok("apply", "-f", str(path))
    client.put(action_path(ns, "web-1", "start"))
    kubectl.ok("wait", "--for=condition=Ready", "vm/web-1", "-n", ns, "--timeout=60s")

    quota = kubectl.ok("get", "quota", "-n", ns).splitlines()
    assert quota[0].split() == ["NAME", "AGE", "REQUEST", "LIMIT"]
    assert quota[1].split()[0] == "compute"
    assert "count/virtualmachines.kubevirt.io: 1/3, requests.storage: 5Gi/20Gi" in quota[1]
    assert quota[1].rstrip().endswith("limits.cpu: 2/4, limits.memory: 2Gi/4Gi")

    events = kubectl.ok("get", "events", "-n", ns).splitlines()
    assert events[0].split() == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    assert any(line.split()[1:4] == ["Normal", "Started", "virtualmachine/web-1"] for line in events[1:])
    wide = kubectl.ok("get", "events", "-n", ns, "-o", "wide").splitlines()
    assert wide[0].split() == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "SUBOBJECT", "SOURCE", "MESSAGE",
                               "FIRST", "SEEN", "COUNT", "NAME"]
    assert kubectl.ok("get", "vms", "-n", ns, "-o", "wide").splitlines()[0].split() == \
        ["NAME", "AGE", "STATUS", "READY"]  # KubeVirt's VM columns have no wide ones

    header, rows = table(kubectl.ok("get", "vm", "web-1", "-n", ns))
    assert header == ["NAME", "AGE", "STATUS", "READY"] and rows["web-1"][2:] == ["Running", "True"]
    header, rows = table(kubectl.ok("get", "namespace", ns))
    assert header == ["NAME", "STATUS", "AGE"] and rows[ns][1] == "Active"
    bad = kubectl.run("get", "vms", "-n", ns, "--field-selector", "spec.running=true")
    assert bad.returncode == 1
    assert bad.stderr.strip() == ('Error from server (BadRequest): Unable to find "kubevirt.io/v1, '
                                  'Resource=virtualmachines" that match label selector "", field selector '
                                  '"spec.running=true": field label not supported: spec.running')  # kubectl's frame


def test_a_quota_watch_shows_used_move_when_a_vm_starts(kubectl: Kubectl, ns: str, client: Client,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(demo(ns))
    kubectl.ok("apply", "-f", str(path))
    watch = kubectl.popen("get", "quota", "-w", "-n", ns, "-o", "custom-columns=CPU:.status.used.limits\\.cpu")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(watch.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_until(lambda: len(lines) >= 2, timeout=30, what=f"the watch's first row ({lines})")
        assert [line.strip() for line in lines] == ["CPU", "0"]
        started = time.monotonic()
        client.put(action_path(ns, "web-1", "start"))
        wait_until(lambda: len(lines) >= 3, timeout=30, what=f"the watch to show the start ({lines})")
        seen_after = time.monotonic() - started
        assert lines[2].strip() == "2"
        print(f"kubectl get quota -w showed the new used {seen_after * 1000:.0f} ms after the start request")
    finally:
        watch.terminate()
        watch.communicate(timeout=10)  # and closes its pipes


def test_wait_for_ready_patch_describe_and_delete(kubectl: Kubectl, ns: str, client: Client,
                                                  tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text(demo(ns))
    kubectl.ok("apply", "-f", str(path))
    client.put(action_path(ns, "web-1", "start"))
    out = kubectl.ok("wait", "--for=condition=Ready", "vm/web-1", "-n", ns, "--timeout=60s")
    assert out.strip() == "virtualmachine.kubevirt.io/web-1 condition met"

    patch = '{"metadata": {"labels": {"tier": "front"}}}'
    assert kubectl.ok("patch", "vm", "web-1", "-n", ns, "--type", "merge", "-p", patch).strip() == \
        "virtualmachine.kubevirt.io/web-1 patched"
    assert kubectl.ok("patch", "vm", "web-1", "-n", ns, "--type", "merge", "-p", patch).strip() == \
        "virtualmachine.kubevirt.io/web-1 patched (no change)"

    described = kubectl.ok("describe", "quota", "compute", "-n", ns)
    rows = {line.split()[0]: line.split()[1:] for line in described.splitlines() if line.strip()}
    assert rows["Resource"] == ["Used", "Hard"]
    assert rows["limits.cpu"] == ["2", "4"] and rows["requests.storage"] == ["5Gi", "20Gi"]

    out = kubectl.ok("delete", "vm", "web-1", "-n", ns)
    assert out.strip() == 'virtualmachine.kubevirt.io "web-1" deleted'
    with pytest.raises(ClientError) as absent:  # kubectl returned only once the VM was gone
        client.get(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines/web-1")
    assert absent.value.code == 404


def test_explain_answers_from_the_served_schema(kubectl: Kubectl) -> None:
    out = kubectl.ok("explain", "vm.spec.runStrategy")
    assert "KIND:       VirtualMachine" in out and "FIELD: runStrategy <string>" in out
    assert "Halted" in out


def test_nodes_and_vmis_as_kubectl_shows_them_and_cordon(kubectl: Kubectl, ns: str, client: Client,
                                                          tmp_path: Path) -> None:
    header, rows = table(kubectl.ok("get", "nodes", "-o", "wide"))
    assert header == ["NAME", "STATUS", "ROLES", "AGE", "VERSION", "INTERNAL-IP", "EXTERNAL-IP", "OS-IMAGE",
                      "KERNEL-VERSION", "CONTAINER-RUNTIME"]
    (name, row), = rows.items()
    assert row[1] == "Ready" and row[4].startswith("v") and row[5] == "127.0.0.1"
    assert kubectl.ok("cordon", name).strip() == f"node/{name} cordoned"
    assert table(kubectl.ok("get", "nodes"))[1][name][1] == "Ready,SchedulingDisabled"
    assert kubectl.ok("uncordon", name).strip() == f"node/{name} uncordoned"

    path = tmp_path / "demo.yaml"
    path.write_text(demo(ns))
    kubectl.ok("apply", "-f", str(path))
    client.put(action_path(ns, "web-1", "start"))
    kubectl.ok("wait", "--for=condition=Ready", "vm/web-1", "-n", ns, "--timeout=60s")
    header, rows = table(kubectl.ok("get", "vmi", "-n", ns, "-o", "wide"))
    assert header == ["NAME", "AGE", "PHASE", "IP", "NODENAME", "READY", "LIVE-MIGRATABLE", "PAUSED"]
    assert rows["web-1"][2:4] == ["Running", name]
    refused = kubectl.run("delete", "vmi", "web-1", "-n", ns)
    assert refused.returncode == 1 and "written by vmquota only" in refused.stderr
