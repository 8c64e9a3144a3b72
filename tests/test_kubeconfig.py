"""The admin kubeconfig `vmquota serve` writes, and how client commands find their server: `--kubeconfig`,
else `$KUBECONFIG` (several files merged as kubectl merges them), `--server` or `$VMQUOTA_SERVER` overriding
the URL only, else the default data directory's admin kubeconfig.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import Cluster

from vmquota import kubeconfig
from vmquota.client import Client
from vmquota.kubeconfig import Connection, KubeconfigError


def vmquota(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    child_env = {k: v for k, v in os.environ.items() if k not in ("VMQUOTA_SERVER", "KUBECONFIG")}
    child_env.update(env)
    return subprocess.run([sys.executable, "-m", "vmquota", *args], capture_output=True, text=True, timeout=60,
                          env=child_env, check=False)


def config_file(tmp_path: Path, name: str, *, server: str, namespace: str | None = None) -> Path:
    path = tmp_path / name
    kubeconfig.write(path, kubeconfig.document(server=server, user="someone", namespace=namespace))
    return path


def test_the_server_writes_an_admin_kubeconfig_only_its_owner_reads(cluster: Cluster) -> None:
    path = cluster.app.kubeconfig_path
    assert path == cluster.app.data_dir / "admin.kubeconfig"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = yaml.safe_load(path.read_text())
    assert config["current-context"] == "vmquota"
    assert kubeconfig.load([path]).server == cluster.app.url


def test_a_client_command_reaches_the_server_of_its_kubeconfig(cluster: Cluster, tmp_path: Path) -> None:
    by_flag = vmquota("--kubeconfig", str(cluster.app.kubeconfig_path), "get", "namespaces", env={})
    assert by_flag.returncode == 0, by_flag.stderr
    assert cluster.ns in by_flag.stdout
    by_env = vmquota("get", "namespaces", env={"KUBECONFIG": str(cluster.app.kubeconfig_path)})
    assert by_env.returncode == 0, by_env.stderr
    assert cluster.ns in by_env.stdout


def test_the_context_namespace_is_the_default_namespace(cluster: Cluster, tmp_path: Path) -> None:
    cluster.create_quota({"limits.cpu": "2"})
    path = config_file(tmp_path, "ns.kubeconfig", server=cluster.app.url, namespace=cluster.ns)
    result = vmquota("get", "quotas", env={"KUBECONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[0] == "compute"
    explicit = vmquota("get", "quotas", "-n", "default", env={"KUBECONFIG": str(path)})
    assert "compute" not in explicit.stdout


def test_server_overrides_only_the_url(cluster: Cluster, tmp_path: Path) -> None:
    wrong = config_file(tmp_path, "wrong.kubeconfig", server="http://127.0.0.1:9", namespace=cluster.ns)
    refused = vmquota("--kubeconfig", str(wrong), "get", "namespaces", env={})
    assert refused.returncode == 2 and "cannot reach" in refused.stderr
    cluster.create_quota({"limits.cpu": "2"})
    for args, env in ((["--server", cluster.app.url], {}), ([], {"VMQUOTA_SERVER": cluster.app.url})):
        result = vmquota("--kubeconfig", str(wrong), *args, "get", "quotas", env=env)
        assert result.returncode == 0, result.stderr
        assert "compute" in result.stdout  # the namespace still comes from the kubeconfig's context


def test_kubeconfig_files_merge_first_value_wins(tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.write_text(yaml.safe_dump({"current-context": "b", "contexts": [
        {"name": "b", "context": {"cluster": "c", "user": "u", "namespace": "team"}}]}))
    second = config_file(tmp_path, "second", server="http://127.0.0.1:1234")
    doc = yaml.safe_load(second.read_text())
    doc["clusters"].append({"name": "c", "cluster": {"server": "http://127.0.0.1:5678"}})
    second.write_text(yaml.safe_dump(doc))
    connection = kubeconfig.load([first, second])
    assert (connection.server, connection.namespace) == ("http://127.0.0.1:5678", "team")
    missing = tmp_path / "missing"
    joined = os.pathsep.join([str(missing), str(first), str(second)])  # kubectl skips files that do not exist
    resolved = kubeconfig.resolve(kubeconfig=None, server=None, environ={"KUBECONFIG": joined}, default="x")
    assert resolved.server == "http://127.0.0.1:5678"


def test_without_any_setting_the_default_admin_kubeconfig_is_used(cluster: Cluster, tmp_path: Path) -> None:
    home = tmp_path / "xdg"
    kubeconfig.write(home / "vmquota" / "admin.kubeconfig", kubeconfig.document(server=cluster.app.url,
                                                                                user="admin"))
    result = vmquota("get", "namespaces", env={"XDG_DATA_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert cluster.ns in result.stdout
    # A bare --server never picks up the default admin kubeconfig: its credentials stay with its own server.
    assert kubeconfig.resolve(kubeconfig=None, server="http://127.0.0.1:9", environ={"XDG_DATA_HOME": str(home)},
                              default="x") == Connection(server="http://127.0.0.1:9")
    nothing = kubeconfig.resolve(kubeconfig=None, server=None, environ={"XDG_DATA_HOME": str(tmp_path / "no")},
                                 default="http://127.0.0.1:8686")
    assert nothing == Connection(server="http://127.0.0.1:8686")


@pytest.mark.parametrize(("content", "message"), [
    ("- a list\n", "is not a kubeconfig"),
    ("{unclosed", "is not valid YAML"),
    ("apiVersion: v1\nkind: Config\n", "no current-context is set"),
    ("current-context: gone\n", 'context "gone" does not exist'),
    ("current-context: a\ncontexts: [{name: a, context: {cluster: nope}}]\n", 'cluster "nope" of context "a"'),
])
def test_a_broken_kubeconfig_is_a_usage_error_naming_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "broken"
    path.write_text(content)
    with pytest.raises(KubeconfigError, match=message):
        kubeconfig.load([path])
    result = vmquota("--kubeconfig", str(path), "get", "vms", env={})
    assert result.returncode == 2
    assert str(path) in result.stderr and message in result.stderr


def test_a_token_is_never_sent_over_plain_http() -> None:
    plain = Client(Connection(server="http://127.0.0.1:9", token="secret"))
    assert "Authorization" not in plain._headers


def test_the_default_data_dir_is_the_contracts_and_roots_leads_to_a_system_one(tmp_path: Path) -> None:
    """QEMU runs as libvirt-qemu and must reach the disks: root's ~/.local/share is under /root (0700), so for root
    the contract's default path becomes a link to a system dir, which is what is served; an existing folder
    there (an earlier installation) is kept."""
    home, system = tmp_path / "home", tmp_path / "var-lib-vmquota"
    user_default = home / ".local" / "share" / "vmquota"
    assert kubeconfig.default_data_dir(environ={}, home=home) == user_default
    assert kubeconfig.serving_data_dir(environ={}, euid=1000, home=home, system_dir=system) == user_default
    assert not user_default.exists()
    xdg = {"XDG_DATA_HOME": str(tmp_path / "xdg")}  # said explicitly: kept, for root too
    served = kubeconfig.serving_data_dir(environ=xdg, euid=0, home=home, system_dir=system)
    assert served == tmp_path / "xdg" / "vmquota"
    assert kubeconfig.serving_data_dir(environ={}, euid=0, home=home, system_dir=system) == system.resolve()
    assert user_default.is_symlink() and user_default.resolve() == system.resolve()
    assert stat.S_IMODE(system.stat().st_mode) == 0o711
    (system / "admin.kubeconfig").write_text("x")  # what serve writes there is found at the contract's path
    assert (user_default / "admin.kubeconfig").read_text() == "x"
    assert kubeconfig.serving_data_dir(environ={}, euid=0, home=home, system_dir=system) == system.resolve()
    old_home = tmp_path / "old"
    old = old_home / ".local" / "share" / "vmquota"
    old.mkdir(parents=True)
    assert kubeconfig.serving_data_dir(environ={}, euid=0, home=old_home, system_dir=system) == old.resolve()


def test_a_new_data_dir_is_traversable_but_not_listable_by_others(cluster: Cluster) -> None:
    """QEMU as libvirt-qemu must reach the disks below it; nobody but the server lists it or reads its store."""
    assert stat.S_IMODE(cluster.app.data_dir.stat().st_mode) == 0o711
    assert stat.S_IMODE((cluster.app.data_dir / "vmquota.db").stat().st_mode) == 0o600
