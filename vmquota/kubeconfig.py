"""kubeconfig files: the admin's, which the server writes, and any, which the CLI reads as kubectl does.

Beside the client. `vmquota serve` writes `<data-dir>/admin.kubeconfig` (mode 0600) before it answers, so that
kubectl, the official client libraries and vmquota's own CLI reach it with no other set-up (as k3s does).
`load` follows kubectl's rules: `$KUBECONFIG` may list several files, and the first file to set a value wins;
the current context names a cluster (server URL, CA) and a user (token or client certificate).
"""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

ADMIN_FILE = "admin.kubeconfig"
CONTEXT = "vmquota"


class KubeconfigError(Exception):
    """A kubeconfig that cannot be read or names nothing usable; the message names the file."""


@dataclass(frozen=True)
class Connection:
    """Where a client sends its requests, and with what credentials."""
    server: str
    namespace: str | None = None
    token: str | None = None
    ca_pem: str | None = None  # the CA that signs the server's certificate
    client_cert_pem: str | None = None
    client_key_pem: str | None = None
    source: str = ""  # the file it came from, for messages


# The data directory of the root service. QEMU runs as libvirt-qemu under libvirt's DAC driver, and it must reach
# the disks below the data dir: root's own ~/.local/share is under /root, which is 0700.
SYSTEM_DATA_DIR = Path("/var/lib/vmquota")
STORE_FILE = "vmquota.db"


def default_data_dir(*, environ: Mapping[str, str] | None = None, home: Path | None = None) -> Path:
    """The contract's default data directory, where `vmquota serve` keeps its files and its admin kubeconfig:
    `$XDG_DATA_HOME/vmquota` (`~/.local/share/vmquota`)."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("XDG_DATA_HOME") or (home or Path.home()) / ".local" / "share") / "vmquota"


def serving_data_dir(*, environ: Mapping[str, str] | None = None, euid: int | None = None,
                     home: Path | None = None, system_dir: Path = SYSTEM_DATA_DIR) -> Path:
    """Where `vmquota serve` told no `--data-dir` really keeps its files.

    The default data dir, except for root without `$XDG_DATA_HOME`: root's is under /root (0700), which QEMU's
    unprivileged user cannot pass, so a new one is made a symlink to `/var/lib/vmquota` and that real path is
    served (every disk path given to libvirt avoids /root), while the default path still leads to the admin
    kubeconfig, as the contract says. An existing folder there is an earlier installation's: kept as it is.
    """
    environ = os.environ if environ is None else environ
    euid = os.geteuid() if euid is None else euid
    default = default_data_dir(environ=environ, home=home)
    if euid != 0 or environ.get("XDG_DATA_HOME"):
        return default
    if not default.exists() and not default.is_symlink():
        system_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        default.parent.mkdir(parents=True, exist_ok=True)
        default.symlink_to(system_dir, target_is_directory=True)
    return default.resolve()


def admin_path(data_dir: Path) -> Path:
    return data_dir / ADMIN_FILE


def resolve(*, kubeconfig: str | None, server: str | None, environ: Mapping[str, str],
            default: str) -> Connection:
    """Where a client command goes, as the contract says: `--kubeconfig`, else `$KUBECONFIG`, for the server
    and credentials; `--server`, else `$VMQUOTA_SERVER`, overriding the URL only. With none of the four, the
    default data directory's admin kubeconfig when it is readable, else `default`.

    A bare `--server` does not pick up the default admin kubeconfig: its credentials would go to whatever
    server the URL names.
    """
    url = server or environ.get("VMQUOTA_SERVER") or None
    paths = [Path(kubeconfig)] if kubeconfig else [
        Path(p) for p in (environ.get("KUBECONFIG") or "").split(os.pathsep) if p and Path(p).exists()]
    if not paths and url is None:
        admin = admin_path(default_data_dir())
        if os.access(admin, os.R_OK):
            paths = [admin]
    if not paths:
        return Connection(server=url or default)
    connection = load(paths)
    return replace(connection, server=url) if url else connection


def document(*, server: str, user: str, namespace: str | None = None, token: str | None = None,
             ca_pem: str | None = None, client_cert_pem: str | None = None,
             client_key_pem: str | None = None) -> dict[str, Any]:
    """A kubeconfig with one cluster, one user and one context, the current one."""
    cluster: dict[str, Any] = {"server": server}
    if ca_pem:
        cluster["certificate-authority-data"] = _b64(ca_pem)
    credentials: dict[str, Any] = {}
    if token:
        credentials["token"] = token
    if client_cert_pem and client_key_pem:
        credentials["client-certificate-data"] = _b64(client_cert_pem)
        credentials["client-key-data"] = _b64(client_key_pem)
    context: dict[str, Any] = {"cluster": CONTEXT, "user": user}
    if namespace:
        context["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": CONTEXT, "cluster": cluster}],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": CONTEXT, "context": context}],
            "current-context": CONTEXT}


def write(path: Path, config: Mapping[str, Any]) -> None:
    """Write atomically with mode 0600 from the first byte: it may hold credentials."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp makes the file 0600
            yaml.safe_dump(dict(config), f, sort_keys=False)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def load(paths: Sequence[Path], *, context: str | None = None) -> Connection:
    """The connection of the current (or named) context, merged over `paths` as kubectl merges them."""
    merged: dict[str, dict[str, Any]] = {"clusters": {}, "users": {}, "contexts": {}}
    current = context
    for path in paths:
        config = _read(path)
        for section, entries in merged.items():
            for entry in config.get(section) or []:
                if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                    entries.setdefault(entry["name"], {**(entry.get(section[:-1]) or {}), "_file": str(path)})
        if not current and isinstance(config.get("current-context"), str):
            current = config["current-context"]
    where = ", ".join(str(p) for p in paths)
    if not current:
        raise KubeconfigError(f"{where}: no current-context is set")
    ctx = merged["contexts"].get(current)
    if ctx is None:
        raise KubeconfigError(f'{where}: context "{current}" does not exist')
    cluster = merged["clusters"].get(str(ctx.get("cluster")))
    if cluster is None or not isinstance(cluster.get("server"), str):
        raise KubeconfigError(f'{where}: cluster "{ctx.get("cluster")}" of context "{current}" has no server')
    user = merged["users"].get(str(ctx.get("user")), {})
    return Connection(
        server=cluster["server"], namespace=ctx.get("namespace") or None,
        token=user.get("token") or _file_text(user, "tokenFile"),
        ca_pem=_data(cluster, "certificate-authority"),
        client_cert_pem=_data(user, "client-certificate"), client_key_pem=_data(user, "client-key"),
        source=str(cluster["_file"]))


def _read(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as e:
        raise KubeconfigError(f"cannot read {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise KubeconfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise KubeconfigError(f"{path} is not a kubeconfig (a YAML mapping)")
    return config


def _data(entry: Mapping[str, Any], field: str) -> str | None:
    """A PEM given inline (`<field>-data`, base64) or as a file (`<field>`, relative to the kubeconfig)."""
    inline = entry.get(f"{field}-data")
    if isinstance(inline, str) and inline:
        try:
            return base64.b64decode(inline, validate=True).decode()
        except ValueError as e:
            raise KubeconfigError(f"{entry['_file']}: {field}-data is not base64") from e
    return _file_text(entry, field)


def _file_text(entry: Mapping[str, Any], field: str) -> str | None:
    name = entry.get(field)
    if not isinstance(name, str) or not name:
        return None
    path = Path(entry["_file"]).parent / Path(name).expanduser()
    try:
        return path.read_text().strip() if field == "tokenFile" else path.read_text()
    except OSError as e:
        raise KubeconfigError(f"{entry['_file']}: cannot read {field} {path}: {e.strerror}") from e


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
