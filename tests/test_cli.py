"""The `vmquota` command line exactly as the contract fixes it, run as a real subprocess against the `cluster`
fixture's server: apply, get (table, json, yaml, -A), describe, start/stop --wait, clone, delete, and the exit
codes (0 done, 1 refused by the server, 2 bad usage or no server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from conftest import Cluster, vm_manifest, vms_path

from vmquota.client import ClientError


def vmquota(cluster: Cluster | None, *args: str, stdin: str | None = None, server: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`vmquota --server URL ARGS...` in a child process; with server="" no --server is passed."""
    url = server if server is not None else cluster.app.url if cluster else ""
    command = [sys.executable, "-m", "vmquota", *(["--server", url] if url else []), *args]
    child_env = {k: v for k, v in os.environ.items() if k != "VMQUOTA_SERVER"}
    child_env.update(env or {})
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60, env=child_env,
                          check=False)


def ok(cluster: Cluster, *args: str, stdin: str | None = None) -> str:
    result = vmquota(cluster, *args, stdin=stdin)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return result.stdout


def header(output: str) -> list[str]:
    return output.splitlines()[0].split()


def rows(output: str) -> dict[str, list[str]]:
    """Table rows by their first cell."""
    return {line.split()[0]: line.split() for line in output.splitlines()[1:]}


def quota_doc(ns: str, hard: dict[str, str], name: str = "compute") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": name, "namespace": ns},
            "spec": {"hard": hard}}


def gone(cluster: Cluster, name: str) -> bool:
    try:
        cluster.vm(name)
    except ClientError as e:
        return e.code == 404
    return False


# -- apply -----------------------------------------------------------------------------------------


def test_apply_creates_every_yaml_document_of_a_file(cluster: Cluster, tmp_path: Path) -> None:
    web = vm_manifest("web-1")
    web["metadata"]["namespace"] = cluster.ns
    manifest = tmp_path / "objects.yaml"
    manifest.write_text(yaml.safe_dump_all([quota_doc(cluster.ns, {"limits.cpu": "4"}), web]))
    out = ok(cluster, "apply", "-f", str(manifest))
    assert out.splitlines() == ["resourcequota/compute created", "virtualmachine.kubevirt.io/web-1 created"]
    assert cluster.quota()["spec"]["hard"] == {"limits.cpu": "4"}
    assert cluster.vm("web-1")["spec"] == web["spec"]


def test_apply_takes_json_and_the_namespace_flag(cluster: Cluster, tmp_path: Path) -> None:
    manifest = tmp_path / "vm.json"
    manifest.write_text(json.dumps(vm_manifest("web-1"), indent=2))
    out = ok(cluster, "apply", "-f", str(manifest), "-n", cluster.ns)
    assert out.strip() == "virtualmachine.kubevirt.io/web-1 created"
    assert cluster.vm("web-1")["metadata"]["namespace"] == cluster.ns


def test_apply_takes_several_json_documents(cluster: Cluster, tmp_path: Path) -> None:
    manifest = tmp_path / "vms.json"
    manifest.write_text("\n".join(json.dumps(vm_manifest(name), indent=2) for name in ("web-1", "web-2")))
    out = ok(cluster, "apply", "-f", str(manifest), "-n", cluster.ns)
    assert out.splitlines() == ["virtualmachine.kubevirt.io/web-1 created", "virtualmachine.kubevirt.io/web-2 created"]


def test_apply_takes_a_json_list(cluster: Cluster, tmp_path: Path) -> None:
    manifest = tmp_path / "list.json"
    manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                    "items": [vm_manifest("web-1"), vm_manifest("web-2")]}))
    ok(cluster, "apply", "-f", str(manifest), "-n", cluster.ns)
    assert [v["metadata"]["name"] for v in cluster.client.get(vms_path(cluster.ns))["items"]] == ["web-1", "web-2"]


def test_apply_reads_standard_input(cluster: Cluster) -> None:
    text = yaml.safe_dump_all([quota_doc(cluster.ns, {"limits.cpu": "2"}), vm_manifest("web-1")])
    out = ok(cluster, "apply", "-f", "-", "-n", cluster.ns, stdin=text)
    assert out.splitlines() == ["resourcequota/compute created", "virtualmachine.kubevirt.io/web-1 created"]
    assert cluster.vm("web-1")["metadata"]["name"] == "web-1"


def test_reapply_says_unchanged_then_configured(cluster: Cluster, tmp_path: Path) -> None:
    manifest = tmp_path / "objects.yaml"
    docs = [quota_doc(cluster.ns, {"limits.cpu": "4"}), vm_manifest("web-1")]
    manifest.write_text(yaml.safe_dump_all(docs))
    ok(cluster, "apply", "-f", str(manifest), "-n", cluster.ns)
    cluster.settle()
    rv = cluster.vm("web-1")["metadata"]["resourceVersion"]

    out = ok(cluster, "apply", "-f", str(manifest), "-n", cluster.ns)
    assert out.splitlines() == ["resourcequota/compute unchanged", "virtualmachine.kubevirt.io/web-1 unchanged"]
    assert cluster.vm("web-1")["metadata"]["resourceVersion"] == rv

    docs[1] = vm_manifest("web-1", cores=3)
    manifest.write_text(yaml.safe_dump_all(docs))
    out = ok(cluster, "apply", "-f", str(manifest), "-n", cluster.ns)
    assert out.splitlines() == ["resourcequota/compute unchanged", "virtualmachine.kubevirt.io/web-1 configured"]
    assert cluster.vm("web-1")["spec"]["template"]["spec"]["domain"]["cpu"] == {"cores": 3}


def test_apply_refused_by_the_server_exits_1_with_its_message(cluster: Cluster) -> None:
    text = yaml.safe_dump(vm_manifest("bad", strategy="Sometimes"))
    result = vmquota(cluster, "apply", "-f", "-", "-n", cluster.ns, stdin=text)
    assert result.returncode == 1
    assert 'Error from server (Invalid): VirtualMachine.kubevirt.io "bad" is invalid: spec.runStrategy: ' \
           'Unsupported value: "Sometimes"' in result.stderr
    assert cluster.client.get(vms_path(cluster.ns))["items"] == []


# -- get -------------------------------------------------------------------------------------------


def test_get_tables_have_the_kubectl_headers(cluster: Cluster) -> None:
    project = f"p-{cluster.ns}"
    cluster.client.post("/apis/vmquota.io/v1/projects", {"metadata": {"name": project},
                                                         "spec": {"resourceQuota": {"hard": {"limits.cpu": "8"}}}})
    cluster.client.patch(f"/api/v1/namespaces/{cluster.ns}", {"metadata": {"labels": {"vmquota.io/project": project}}})
    cluster.create_quota({"limits.cpu": "4"})
    cluster.create_vm(vm_manifest("web-1"))
    cluster.action("web-1", "start")
    cluster.wait_status("web-1", "Running")

    vms = ok(cluster, "get", "vms", "-n", cluster.ns)
    assert header(vms) == ["NAME", "AGE", "STATUS", "READY"]
    assert rows(vms)["web-1"][2:] == ["Running", "true"]

    quotas = ok(cluster, "get", "quotas", "-n", cluster.ns)
    assert header(quotas) == ["NAME", "AGE", "USED/HARD"]
    assert "limits.cpu: 2/4" in quotas

    namespaces = ok(cluster, "get", "namespaces")
    assert header(namespaces) == ["NAME", "STATUS", "PROJECT", "AGE"]
    assert rows(namespaces)[cluster.ns][1:3] == ["Active", project]

    projects = ok(cluster, "get", "projects")
    assert header(projects) == ["NAME", "AGE", "USED/HARD"]
    assert project in rows(projects)
    assert "limits.cpu: 2/8" in projects

    events = ok(cluster, "get", "events", "-n", cluster.ns)
    assert events.splitlines()[0].split()[:5] == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT"]
    assert events.splitlines()[0].split()[-1] == "MESSAGE"
    assert "virtualmachine/web-1" in events and "StartRequested" in events


def test_get_one_vm_by_name(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("web-1"))
    cluster.create_vm(vm_manifest("web-2"))
    cluster.wait_status("web-1", "Stopped")
    out = ok(cluster, "get", "vm", "web-1", "-n", cluster.ns)
    assert header(out) == ["NAME", "AGE", "STATUS", "READY"]
    assert list(rows(out)) == ["web-1"]
    assert rows(out)["web-1"][2:] == ["Stopped", "false"]


def test_get_missing_vm_exits_1_with_not_found(cluster: Cluster) -> None:
    result = vmquota(cluster, "get", "vm", "ghost", "-n", cluster.ns)
    assert result.returncode == 1
    assert 'Error from server (NotFound): virtualmachines.kubevirt.io "ghost" not found' in result.stderr


def test_get_all_namespaces_adds_the_namespace_column(cluster: Cluster) -> None:
    other = f"{cluster.ns}-b"
    cluster.create_namespace(other)
    cluster.create_vm(vm_manifest("web-1"))
    cluster.create_vm(vm_manifest("web-2"), namespace=other)
    out = ok(cluster, "get", "vms", "-A")
    assert header(out) == ["NAMESPACE", "NAME", "AGE", "STATUS", "READY"]
    listed = {(line.split()[0], line.split()[1]) for line in out.splitlines()[1:]}
    assert {(cluster.ns, "web-1"), (other, "web-2")} <= listed
    only_one = ok(cluster, "get", "vms", "-n", other)
    assert list(rows(only_one)) == ["web-2"]


def test_get_json_prints_exactly_what_the_api_returns(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "4"})
    cluster.create_vm(vm_manifest("web-1"))
    cluster.create_vm(vm_manifest("web-2"))
    for name in ("web-1", "web-2"):
        cluster.action(name, "start")
        cluster.wait_status(name, "Running")
    cluster.settle()
    ns = cluster.ns
    for args, path in [
        (["vms", "-n", ns], vms_path(ns)),
        (["vm", "web-1", "-n", ns], f"{vms_path(ns)}/web-1"),
        (["vms", "-A"], "/apis/kubevirt.io/v1/virtualmachines"),
        (["quotas", "-n", ns], f"/api/v1/namespaces/{ns}/resourcequotas"),
        (["quota", "compute", "-n", ns], f"/api/v1/namespaces/{ns}/resourcequotas/compute"),
        (["namespaces"], "/api/v1/namespaces"),
        (["projects"], "/apis/vmquota.io/v1/projects"),
        (["events", "-n", ns], f"/api/v1/namespaces/{ns}/events"),
    ]:
        printed = json.loads(ok(cluster, "get", *args, "-o", "json"))
        assert printed == cluster.client.get(path), args


def test_get_yaml_prints_the_object(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("web-1"))
    cluster.settle()
    printed = yaml.safe_load(ok(cluster, "get", "vm", "web-1", "-n", cluster.ns, "-o", "yaml"))
    assert printed == cluster.vm("web-1")
    listed = yaml.safe_load(ok(cluster, "get", "vms", "-n", cluster.ns, "-o", "yaml"))
    assert listed == cluster.client.get(vms_path(cluster.ns))
    assert listed["kind"] == "VirtualMachineList"


def test_server_from_the_environment(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("web-1"))
    result = vmquota(None, "get", "vms", "-n", cluster.ns, server="", env={"VMQUOTA_SERVER": cluster.app.url})
    assert result.returncode == 0, result.stderr
    assert "web-1" in rows(result.stdout)


def test_server_flag_after_the_command(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("web-1"))
    result = vmquota(None, "get", "vms", "-n", cluster.ns, "--server", cluster.app.url, server="",
                     env={"VMQUOTA_SERVER": "http://127.0.0.1:1"})
    assert result.returncode == 0, result.stderr
    assert "web-1" in rows(result.stdout)
    # The flag wins over the environment.
    result = vmquota(cluster, "get", "vms", "-n", cluster.ns, env={"VMQUOTA_SERVER": "http://127.0.0.1:1"})
    assert result.returncode == 0, result.stderr


# -- describe --------------------------------------------------------------------------------------


def test_describe_vm_shows_its_charge_and_why(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "4", "requests.storage": "20Gi"})
    cluster.create_vm(vm_manifest("web-1", cores=2, memory="2Gi", disk="5Gi"))
    cluster.wait_status("web-1", "Stopped")

    stopped = ok(cluster, "describe", "vm", "web-1", "-n", cluster.ns)
    assert "Name:           web-1" in stopped
    assert "holds no runtime" in stopped
    now, _, rest = stopped.partition("While running it charges:")
    assert "  requests.storage: 5Gi\n" in now and "  limits.cpu: 0\n" in now and "  limits.memory: 0\n" in now
    assert "  count/virtualmachines.kubevirt.io: 1\n" in now
    assert "  limits.cpu: 2\n" in rest and "  limits.memory: 2Gi\n" in rest
    assert "Counts against: compute\n" in stopped

    cluster.action("web-1", "start")
    cluster.wait_status("web-1", "Running")
    running = ok(cluster, "describe", "vm", "web-1", "-n", cluster.ns)
    now = running.partition("While running it charges:")[0]
    assert "holds a runtime" in now and "holds no runtime" not in now
    assert "  limits.cpu: 2\n" in now and "  requests.storage: 5Gi\n" in now
    assert "StartRequested" in running.split("Events:")[1]


def test_describe_quota_shows_which_vms_use_how_much(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "8", "limits.memory": "8Gi"})
    cluster.create_vm(vm_manifest("web-1", cores=2, memory="1Gi"))
    cluster.create_vm(vm_manifest("web-2", cores=3, memory="2Gi"))
    cluster.create_vm(vm_manifest("idle", cores=1))
    for name in ("web-1", "web-2"):
        cluster.action(name, "start")
        cluster.wait_status(name, "Running")

    out = ok(cluster, "describe", "quota", "compute", "-n", cluster.ns)
    assert "Name:         compute" in out
    resources = out.split("Used by:")[0]
    assert rows(resources.split("\n\n")[1]) == {"limits.cpu": ["limits.cpu", "5", "8"],
                                                "limits.memory": ["limits.memory", "3Gi", "8Gi"]}
    users = out.split("Used by:")[1]
    assert rows(users.strip()) == {"web-1": ["web-1", "limits.cpu=2,", "limits.memory=1Gi"],
                                   "web-2": ["web-2", "limits.cpu=3,", "limits.memory=2Gi"]}
    # "idle" is absent: stopped, it uses nothing these limits count


# -- lifecycle -------------------------------------------------------------------------------------


def test_start_wait_returns_once_running_and_stop_wait_once_stopped(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "4"})
    cluster.create_vm(vm_manifest("web-1"))
    result = vmquota(cluster, "start", "web-1", "-n", cluster.ns, "--wait")
    assert result.returncode == 0, result.stderr
    assert cluster.status("web-1") == "Running"
    assert cluster.used()["limits.cpu"] == "2"
    assert cluster.domain("web-1").isActive()

    result = vmquota(cluster, "stop", "web-1", "-n", cluster.ns, "--wait")
    assert result.returncode == 0, result.stderr
    assert cluster.status("web-1") == "Stopped"
    assert cluster.used()["limits.cpu"] == "0"
    assert not cluster.domain("web-1").isActive()


def test_start_refused_by_quota_exits_1_with_the_kubernetes_message(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "3"})
    cluster.create_vm(vm_manifest("web-1", cores=2))
    cluster.create_vm(vm_manifest("web-2", cores=2))
    ok(cluster, "start", "web-1", "-n", cluster.ns, "--wait")

    result = vmquota(cluster, "start", "web-2", "-n", cluster.ns, "--wait")
    assert result.returncode == 1
    assert result.stdout == ""
    assert ("exceeded quota: compute, requested: limits.cpu=2, used: limits.cpu=2, limited: limits.cpu=3"
            in result.stderr)
    assert cluster.status("web-2") == "Stopped"
    assert cluster.used()["limits.cpu"] == "2"


def test_clone_wait_then_get_the_target(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("web-1"))
    cluster.wait_status("web-1", "Stopped")
    result = vmquota(cluster, "clone", "web-1", "web-2", "-n", cluster.ns, "--wait")
    assert result.returncode == 0, result.stderr
    out = ok(cluster, "get", "vm", "web-2", "-n", cluster.ns)
    assert rows(out)["web-2"][2] == "Stopped"
    target, source = cluster.vm("web-2"), cluster.vm("web-1")
    assert target["spec"]["dataVolumeTemplates"][0]["metadata"]["name"] == "web-2-root"
    assert target["spec"]["template"]["spec"]["volumes"] == [{"name": "root", "dataVolume": {"name": "web-2-root"}}]
    assert target["spec"]["template"]["spec"]["domain"] == source["spec"]["template"]["spec"]["domain"]
    assert any(c["type"] == "DataVolumesReady" and c["status"] == "True" for c in target["status"]["conditions"])


def test_clone_start_wait_runs_the_target(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("web-1"))
    cluster.wait_status("web-1", "Stopped")
    result = vmquota(cluster, "clone", "web-1", "web-2", "-n", cluster.ns, "--start", "--wait")
    assert result.returncode == 0, result.stderr
    assert cluster.status("web-2") == "Running"
    assert cluster.status("web-1") == "Stopped"


def test_delete_vm_prints_deleted_and_the_vm_is_gone(cluster: Cluster) -> None:
    cluster.create_vm(vm_manifest("x"))
    cluster.action("x", "start")
    cluster.wait_status("x", "Running")
    out = ok(cluster, "delete", "vm", "x", "-n", cluster.ns)
    assert out.strip() == 'virtualmachine.kubevirt.io "x" deleted'
    assert gone(cluster, "x")
    result = vmquota(cluster, "get", "vm", "x", "-n", cluster.ns)
    assert result.returncode == 1


# -- exit codes ------------------------------------------------------------------------------------


def test_unknown_resource_type_exits_2(cluster: Cluster) -> None:
    for args in (["get", "pods"], ["describe", "namespace", "x"], ["delete", "events", "x"]):
        result = vmquota(cluster, *args)
        assert result.returncode == 2, args
        assert "unknown resource type" in result.stderr


def test_missing_arguments_exit_2(cluster: Cluster) -> None:
    for args in ([], ["get"], ["start"], ["describe", "vm"], ["apply"], ["clone", "web-1"], ["frobnicate"],
                 ["get", "vms", "-o", "wide"]):
        result = vmquota(cluster, *args)
        assert result.returncode == 2, args
        assert result.stderr, args


def test_unreadable_or_unknown_apply_input_exits_2(cluster: Cluster, tmp_path: Path) -> None:
    bad_kind = tmp_path / "pod.yaml"
    bad_kind.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}))
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [unclosed\n")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("--- just text\n")
    odd_list = tmp_path / "list.yaml"
    odd_list.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [vm_manifest("web-1"), 7]}))
    dated = tmp_path / "dated.yaml"  # an unquoted date is a YAML date, which JSON cannot carry
    dated.write_text("apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata: {name: web-1, annotations: "
                     "{when: 2026-11-27}}\nspec: {}\n")
    for path in (str(tmp_path / "missing.yaml"), str(bad_kind), str(broken), str(scalar), str(odd_list),
                 str(dated)):
        result = vmquota(cluster, "apply", "-f", path, "-n", cluster.ns)
        assert result.returncode == 2, path
        assert result.stderr.startswith("error: "), result.stderr
    assert cluster.client.get(vms_path(cluster.ns))["items"] == []  # nothing is applied from a bad file


def test_apply_with_empty_metadata_is_refused_by_the_server(cluster: Cluster) -> None:
    text = "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\nspec: {}\n"
    result = vmquota(cluster, "apply", "-f", "-", "-n", cluster.ns, stdin=text)
    assert result.returncode == 1
    assert result.stderr.startswith("Error from server (Invalid): "), result.stderr
    assert "metadata.name" in result.stderr


def test_unreachable_server_exits_2(cluster: Cluster) -> None:
    result = vmquota(cluster, "get", "vms", server="http://127.0.0.1:1")
    assert result.returncode == 2
    assert "cannot reach the vmquota server at http://127.0.0.1:1" in result.stderr
