"""The `vmquota` command: `serve`, and kubectl-like client commands against a running server.

Top layer. Exit codes: 0 success; 1 the server refused or failed (its message on
stderr); 2 bad usage or no server to talk to.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import termios
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import yaml

from vmquota import errors, kubeconfig, objects, printers, quantity, tunnel, waiting
from vmquota.client import (
    DEFAULT_SERVER,
    Client,
    ClientError,
    Unreachable,
    action_path,
    collection_path,
    object_path,
    port_forward_path,
    upload_path,
)
from vmquota.usage import OverheadModel

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2

RESOURCE_NAMES = {
    "projects": objects.PROJECT, "project": objects.PROJECT,
    "namespaces": objects.NAMESPACE, "namespace": objects.NAMESPACE, "ns": objects.NAMESPACE,
    "quotas": objects.RESOURCE_QUOTA, "quota": objects.RESOURCE_QUOTA, "resourcequotas": objects.RESOURCE_QUOTA,
    "resourcequota": objects.RESOURCE_QUOTA,
    "vms": objects.VIRTUAL_MACHINE, "vm": objects.VIRTUAL_MACHINE, "virtualmachines": objects.VIRTUAL_MACHINE,
    "virtualmachine": objects.VIRTUAL_MACHINE,
    "events": objects.EVENT, "event": objects.EVENT,
    "clones": objects.VIRTUAL_MACHINE_CLONE, "virtualmachineclones": objects.VIRTUAL_MACHINE_CLONE,
    "nodes": objects.NODE, "node": objects.NODE, "no": objects.NODE,
    "vmis": objects.VIRTUAL_MACHINE_INSTANCE, "vmi": objects.VIRTUAL_MACHINE_INSTANCE,
    "virtualmachineinstances": objects.VIRTUAL_MACHINE_INSTANCE,
}


class UsageError(Exception):
    pass


class Refused(Exception):
    pass


def _kind(word: str, allowed: tuple[str, ...] | None = None) -> objects.Kind:
    kind = RESOURCE_NAMES.get(word)
    if kind is None or (allowed and word not in allowed):
        choices = ", ".join(allowed) if allowed else "projects, namespaces, quotas, vms, vmis, nodes, events"
        raise UsageError(f"unknown resource type {word!r}; use one of: {choices}")
    return kind


def _display(kind: objects.Kind) -> str:
    """kubectl's `virtualmachine.kubevirt.io`, `resourcequota`."""
    return f"{kind.kind.lower()}.{kind.group}" if kind.group else kind.kind.lower()


# -- serve ------------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    metrics_folder = _share_metrics()  # before anything imports prometheus_client
    try:
        return _serve(args)
    finally:
        shutil.rmtree(metrics_folder, ignore_errors=True)


def _serve(args: argparse.Namespace) -> int:
    from vmquota import workers  # the server side is imported only to serve
    from vmquota.app import App, NodeSettings
    from vmquota.controller.placement import Policy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--listen takes HOST:PORT, got {args.listen!r}")
    data_dir = Path(args.data_dir) if args.data_dir else kubeconfig.serving_data_dir()
    api_processes = workers.default_count() if args.api_processes is None else args.api_processes
    if not 1 <= api_processes <= workers.MAX_API_PROCESSES:
        raise UsageError(f"--api-processes takes 1 to {workers.MAX_API_PROCESSES}, got {api_processes}")
    if args.authorization_mode not in ("RBAC", "AlwaysAllow"):
        raise UsageError(f"--authorization-mode takes RBAC or AlwaysAllow, got {args.authorization_mode!r}")
    try:
        app = App.open(data_dir=data_dir, hypervisor_uri=args.hypervisor, host=host.strip("[]"), port=int(port),
                       overhead=OverheadModel(args.memory_overhead), resync_interval=args.resync_interval,
                       api_processes=api_processes, use_emulation=args.use_emulation,
                       tls=not args.plain_http, tls_cert_file=args.tls_cert_file,
                       tls_private_key_file=args.tls_private_key_file, anonymous_auth=args.anonymous_auth,
                       token_auth_file=args.token_auth_file, authorization_mode=args.authorization_mode,
                       max_requests_inflight_per_user=args.max_requests_inflight_per_user,
                       node_settings=NodeSettings(args.node_status_update_frequency, args.node_monitor_grace_period,
                                                   Policy(args.placement)))
    except errors.HypervisorUnavailable as e:
        print(f"vmquota: {e}\nvmquota: is libvirtd running? `make run` starts it (scripts/libvirtd-up.sh); "
              f"`--hypervisor test:///default` runs on libvirt's simulated host.", file=sys.stderr)
        return EXIT_REFUSED
    except (errors.VmquotaError, OSError) as e:
        print(f"vmquota: {e}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"vmquota serving on {app.url} (hypervisor {args.hypervisor}, domains of type "
          f"{app.hypervisor.domain_type}, data in {data_dir}, memory overhead {args.memory_overhead}, "
          f"{api_processes} API process{'es' if api_processes > 1 else ''}; kubeconfig {app.kubeconfig_path})",
          file=sys.stderr, flush=True)

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        app.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return EXIT_OK


# -- admin commands on the server's host -----------------------------------------------------------

def cmd_kubeconfig(args: argparse.Namespace) -> int:
    """A kubeconfig for a user, with a client certificate from the server's CA (like `kubeadm kubeconfig user`)."""
    from vmquota import durations, pki

    data_dir = Path(args.data_dir) if args.data_dir else kubeconfig.default_data_dir()
    try:
        lifetime = datetime.timedelta(seconds=durations.parse(args.expiration))
    except ValueError as e:
        raise UsageError(str(e)) from e
    if lifetime.total_seconds() <= 0:
        raise UsageError("--expiration must be longer than 0s")
    try:
        authority = pki.Authority.load(data_dir)
        admin = kubeconfig.load([kubeconfig.admin_path(data_dir)])
    except (OSError, ValueError) as e:
        raise Refused(f"no CA in {data_dir}: has `vmquota serve --data-dir {data_dir}` run there with TLS? ({e})") \
            from e
    if not args.user.strip():
        raise UsageError("--user takes a user name")
    pair = authority.issue_client(args.user, args.group, lifetime)
    config = kubeconfig.document(server=admin.server, user=args.user, namespace=args.namespace,
                                 ca_pem=authority.cert_pem, client_cert_pem=pair.cert_pem,
                                 client_key_pem=pair.key_pem)
    print(yaml.safe_dump(config, sort_keys=False), end="")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    """The audit log's events, oldest first, one JSON object a line."""
    from vmquota import durations
    from vmquota.apiserver import audit

    data_dir = Path(args.data_dir) if args.data_dir else kubeconfig.default_data_dir()
    since = None
    if args.since:
        try:
            seconds = durations.parse(args.since)
        except ValueError as e:
            raise UsageError(str(e)) from e
        since = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds)).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ")
    folder = audit.audit_dir(data_dir)
    if not folder.exists():
        raise Refused(f"no audit log in {data_dir}")
    for event in audit.read(folder):
        if args.user and (event.get("user") or {}).get("username") != args.user:
            continue
        if since and str(event.get("requestReceivedTimestamp", "")) < since:
            continue
        print(json.dumps(event, separators=(",", ":")))
    return EXIT_OK


def _share_metrics() -> Path:
    """Point prometheus_client's multiprocess mode at a fresh folder of this server's own: every API process
    started after this writes its values there, and a scrape, whichever process answers it, sums them. A
    temporary folder, so that a restarted server's counters start at zero (as Prometheus expects of a restarted
    target) and nothing lands in a data directory before the server lock is held. Folders that servers killed
    with SIGKILL left behind (their process is gone) are removed here."""
    for stale in Path(tempfile.gettempdir()).glob("vmquota-metrics-*-*"):  # of servers killed (SIGKILL)
        pid = stale.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"vmquota-metrics-{os.getpid()}-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder


# -- client commands -------------------------------------------------------------------------------

def _output(obj: Any, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(obj, indent=2))
    else:
        print(yaml.safe_dump(obj, sort_keys=False, default_flow_style=False), end="")


def cmd_get(client: Client, args: argparse.Namespace) -> int:
    kind = _kind(args.resource)
    namespace = None if args.all_namespaces else args.namespace
    if args.name:
        obj = client.get(object_path(kind, namespace, args.name))
        items = [obj]
    else:
        obj = client.get(collection_path(kind, namespace))
        items = obj["items"]
        if kind is objects.EVENT:  # oldest first in the table; -o json/yaml keep the API's order
            items = sorted(items, key=lambda e: int(e["metadata"].get("resourceVersion", 0)))
    if args.output in ("json", "yaml"):
        _output(obj, args.output)
    else:
        print(printers.render_table(kind.kind, items, all_namespaces=args.all_namespaces and kind.namespaced))
    return EXIT_OK


def cmd_top(client: Client, args: argparse.Namespace) -> int:
    """Who uses what, and how close to the limit: quotas and projects fullest first, VMs biggest first."""
    namespace = None if args.all_namespaces else args.namespace
    if args.resource == "projects":
        print(printers.top_quotas(client.get(collection_path(objects.PROJECT, None))["items"], projects=True))
    elif args.resource == "quotas":
        quotas = client.get(collection_path(objects.RESOURCE_QUOTA, namespace))["items"]
        print(printers.top_quotas(quotas, projects=False))
    else:
        charges = client.get("/apis/vmquota.io/v1/charges" if namespace is None
                             else f"/apis/vmquota.io/v1/namespaces/{namespace}/charges")["items"]
        vms = client.get(collection_path(objects.VIRTUAL_MACHINE, namespace))["items"]
        print(printers.top_vms(charges, vms))
    return EXIT_OK


def _events_for(client: Client, namespace: str, name: str) -> list[dict[str, Any]]:
    events = client.get(collection_path(objects.EVENT, namespace))["items"]
    events = [e for e in events if (e.get("involvedObject") or {}).get("name") == name]
    return sorted(events, key=lambda e: int(e["metadata"].get("resourceVersion", 0)))


def cmd_describe(client: Client, args: argparse.Namespace) -> int:
    kind = _kind(args.resource, ("project", "projects", "quota", "quotas", "resourcequota", "vm", "vms",
                                 "virtualmachine", "node", "nodes"))
    if kind is objects.NODE:
        node = client.get(object_path(kind, None, args.name))
        vmis = [v for v in client.get(collection_path(objects.VIRTUAL_MACHINE_INSTANCE, None))["items"]
                if (v.get("status") or {}).get("nodeName") == args.name]
        charges = client.get("/apis/vmquota.io/v1/charges")["items"]
        print(printers.describe_node(node, vmis, charges))
    elif kind is objects.VIRTUAL_MACHINE:
        vm = client.get(object_path(kind, args.namespace, args.name))
        charge = client.get(f"/apis/vmquota.io/v1/namespaces/{args.namespace}/charges/{args.name}")
        print(printers.describe_vm(vm, charge, _events_for(client, args.namespace, args.name)))
    elif kind is objects.RESOURCE_QUOTA:
        quota = client.get(object_path(kind, args.namespace, args.name))
        charges = client.get(f"/apis/vmquota.io/v1/namespaces/{args.namespace}/charges")["items"]
        print(printers.describe_quota(quota, charges))
    else:
        project = client.get(object_path(kind, None, args.name))
        print(printers.describe_project(project, client.get(f"/apis/vmquota.io/v1/projects/{args.name}/usage")))
    return EXIT_OK


def _documents(path: str) -> list[dict[str, Any]]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from e
    try:
        docs = [d for d in _load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML or JSON: {str(e).splitlines()[0]}") from e
    flat: list[dict[str, Any]] = []
    for doc in docs:
        is_list = isinstance(doc, dict) and str(doc.get("kind", "")).endswith("List")
        items = (doc.get("items") or []) if is_list else [doc]
        for item in items if isinstance(items, list) else [items]:  # a List's items are checked like documents
            if not isinstance(item, dict):
                raise UsageError(f"{path}: every document must be an object with apiVersion and kind")
            if item.get("metadata") is None:
                item["metadata"] = {}  # `metadata:` left empty in YAML
            try:
                json.dumps(item, allow_nan=False)
            except (TypeError, ValueError) as e:  # YAML dates, binary, sets, NaN: the API takes JSON only
                raise UsageError(f"{path}: {e}; quote the value to send it as a string") from e
            flat.append(item)
    return flat


def _load_all(text: str) -> list[Any]:
    """The documents of a YAML stream, or of a stream of JSON objects (which YAML stops reading at the second)."""
    if text.lstrip().startswith("{"):
        decoder = json.JSONDecoder()
        docs: list[Any] = []
        rest = text.strip()
        try:
            while rest:
                doc, end = decoder.raw_decode(rest)
                docs.append(doc)
                rest = rest[end:].lstrip()
            return docs
        except ValueError:
            pass  # YAML in flow style, or broken: YAML says which
    return list(yaml.safe_load_all(text))


def cmd_apply(client: Client, args: argparse.Namespace) -> int:
    docs = _documents(args.filename)
    by_kind = {(k.api_version, k.kind): k for k in objects.KINDS}
    for doc in docs:
        kind = by_kind.get((str(doc.get("apiVersion")), str(doc.get("kind"))))
        if kind is None or kind is objects.EVENT:
            raise UsageError(f"cannot apply {doc.get('apiVersion')}/{doc.get('kind')}: unknown kind")
    failed = False
    for doc in docs:
        kind = by_kind[(doc["apiVersion"], doc["kind"])]
        meta = doc.setdefault("metadata", {}) if isinstance(doc.get("metadata"), dict | type(None)) else {}
        namespace = meta.get("namespace") or args.namespace if kind.namespaced else None
        name = meta.get("name", "")
        label = f"{_display(kind)}/{name}"
        try:
            try:
                client.post(collection_path(kind, namespace), doc)
                print(f"{label} created")
            except ClientError as e:
                if e.reason != "AlreadyExists" or kind is objects.VIRTUAL_MACHINE_CLONE:
                    raise
                current = client.get(object_path(kind, namespace, name))
                doc["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                updated = client.put(object_path(kind, namespace, name), doc)
                same = updated["metadata"]["resourceVersion"] == current["metadata"]["resourceVersion"]
                print(f"{label} {'unchanged' if same else 'configured'}")
        except ClientError as e:
            print(f"Error from server ({e.reason}): {e.message}", file=sys.stderr)
            failed = True
    return EXIT_REFUSED if failed else EXIT_OK


def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    kind = _kind(args.resource, ("project", "projects", "namespace", "namespaces", "ns", "quota", "quotas",
                                 "resourcequota", "vm", "vms", "virtualmachine"))
    namespace = args.namespace if kind.namespaced else None
    client.delete(object_path(kind, namespace, args.name))
    if kind is objects.VIRTUAL_MACHINE and not args.no_wait:
        _wait(lambda: _gone(client, object_path(kind, namespace, args.name)), args.timeout,
              f"{args.name} to be deleted")
    print(f'{_display(kind)} "{args.name}" deleted')
    return EXIT_OK


def _gone(client: Client, path: str) -> bool:
    try:
        client.get(path)
    except ClientError as e:
        if e.code == 404:
            return True
        raise
    return False


def _wait(done: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        waiting.wait_until(done, timeout=timeout, what=what, interval=0.2)
    except TimeoutError as e:
        raise Refused(str(e)) from None


def _failure(vm: dict[str, Any]) -> str | None:
    status = vm.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Failure" and condition.get("status") == "True":
            return f"{condition.get('reason')}: {condition.get('message')}"
    return None


def wait_for_phase(client: Client, namespace: str, name: str, wanted: str, timeout: float) -> None:
    """Until the VM shows `wanted`; Refused with the reason if it fails instead."""
    path = object_path(objects.VIRTUAL_MACHINE, namespace, name)

    def reached() -> bool:
        vm = client.get(path)
        printable = (vm.get("status") or {}).get("printableStatus")
        if printable == wanted:
            return True
        failure = _failure(vm)
        if wanted == "Running" and failure and printable in ("Stopped", "ErrorUnschedulable", "CrashLoopBackOff"):
            raise Refused(f"{namespace}/{name} did not start: {failure}")
        return False

    _wait(reached, timeout, f"{namespace}/{name} to be {wanted}")


def cmd_lifecycle(client: Client, args: argparse.Namespace) -> int:
    body = {"gracePeriod": args.grace_period} if getattr(args, "grace_period", None) is not None else None
    if getattr(args, "dry_run", False):
        # The server runs the admission and changes nothing: a refusal comes back as it would for real.
        client.put(action_path(args.namespace, args.vm, args.command) + "?dryRun=All", body)
        print(f"VM {args.vm} would be admitted to {args.command} now (dry run: nothing changed)")
        return EXIT_OK
    client.put(action_path(args.namespace, args.vm, args.command), body)
    if args.wait:
        wait_for_phase(client, args.namespace, args.vm, "Stopped" if args.command == "stop" else "Running",
                       args.timeout)
    print(f"VM {args.vm} was scheduled to {args.command}" if not args.wait else
          f"VM {args.vm} is {'stopped' if args.command == 'stop' else 'running'}")
    return EXIT_OK


def cmd_cordon(client: Client, args: argparse.Namespace) -> int:
    """cordon: no new VM is placed on the node (those on it keep running); uncordon undoes it."""
    cordon = args.command == "cordon"
    node = client.get(object_path(objects.NODE, None, args.node))
    if bool((node.get("spec") or {}).get("unschedulable")) == cordon:
        print(f"node/{args.node} already {'cordoned' if cordon else 'uncordoned'}")
        return EXIT_OK
    client.patch(object_path(objects.NODE, None, args.node), {"spec": {"unschedulable": True if cordon else None}})
    print(f"node/{args.node} {'cordoned' if cordon else 'uncordoned'}")
    return EXIT_OK


def latest_migration(client: Client, namespace: str, vm: str) -> dict[str, Any] | None:
    found = [m for m in client.get(collection_path(objects.VIRTUAL_MACHINE_INSTANCE_MIGRATION, namespace))["items"]
             if (m.get("spec") or {}).get("vmiName") == vm]
    return max(found, key=lambda m: (m["metadata"].get("creationTimestamp", ""),
                                     int(m["metadata"].get("resourceVersion", 0))), default=None)


def wait_for_migration(client: Client, namespace: str, vm: str, timeout: float) -> None:
    """Until the VM's latest migration has ended; Refused with libvirt's or the scheduler's words if it failed."""
    ended: dict[str, Any] = {}

    def done() -> bool:
        found = latest_migration(client, namespace, vm)
        phase = ((found or {}).get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            ended.update(found or {})
            return True
        return False

    _wait(done, timeout, f"the migration of {namespace}/{vm} to end")
    state = ended["status"].get("migrationState") or {}
    if ended["status"]["phase"] == "Failed":
        raise Refused(f"the migration of {namespace}/{vm} failed: {state.get('failureReason', 'unknown reason')}")


def migrate(client: Client, namespace: str, vm: str, to: str | None) -> None:
    body = {"addedNodeSelector": {"kubernetes.io/hostname": to}} if to else {}
    client.put(action_path(namespace, vm, "migrate"), body)


def cmd_migrate(client: Client, args: argparse.Namespace) -> int:
    """migrate: live-migrate a running VM to another node (to NODE, or where placement chooses); it stays charged
    exactly once. Cancel it by deleting its VirtualMachineInstanceMigration."""
    migrate(client, args.namespace, args.vm, args.to)
    if not args.wait:
        print(f"VM {args.vm} was scheduled to migrate")
        return EXIT_OK
    wait_for_migration(client, args.namespace, args.vm, args.timeout)
    node = (client.get(object_path(objects.VIRTUAL_MACHINE, args.namespace, args.vm)).get("status") or {}).get(
        "nodeName")
    print(f"VM {args.vm} migrated to node {node}")
    return EXIT_OK


LIVE_MIGRATE = ("LiveMigrate", "LiveMigrateIfPossible")  # KubeVirt's evictionStrategy values that migrate


def cmd_drain(client: Client, args: argparse.Namespace) -> int:
    """drain: cordon the node, then live-migrate every VM off it whose evictionStrategy says so, as kubectl
    drain evicts a node's pods and KubeVirt migrates its VMs; the others stop it, unless --force stops them."""
    path = object_path(objects.NODE, None, args.node)
    if not (client.get(path).get("spec") or {}).get("unschedulable"):
        client.patch(path, {"spec": {"unschedulable": True}})
    print(f"node/{args.node} cordoned")
    on_node = [v for v in client.get(collection_path(objects.VIRTUAL_MACHINE_INSTANCE, None))["items"]
               if (v.get("status") or {}).get("nodeName") == args.node]
    movable = [v for v in on_node if (v.get("spec") or {}).get("evictionStrategy") in LIVE_MIGRATE]
    others = [v["metadata"] for v in on_node if v not in movable]
    if others and not args.force:
        names = ", ".join(f"{m['namespace']}/{m['name']}" for m in others)
        print(f"error: cannot drain node/{args.node}: these VMs cannot be live-migrated (their evictionStrategy "
              f"is not LiveMigrate): {names}; use --force to stop them", file=sys.stderr)
        return EXIT_REFUSED
    for meta in others:
        print(f"stopping vm {meta['namespace']}/{meta['name']}")
        client.put(action_path(meta["namespace"], meta["name"], "stop"), {})
    vmis = [v["metadata"] for v in movable]
    for vmi in vmis:
        print(f"migrating vm {vmi['namespace']}/{vmi['name']}")
        migrate(client, vmi["namespace"], vmi["name"], None)
    failed = []
    for vmi in vmis:
        try:
            wait_for_migration(client, vmi["namespace"], vmi["name"], args.timeout)
            print(f"vm/{vmi['name']} migrated")
        except Refused as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(vmi["name"])
    if failed:
        print(f"error: node/{args.node} not drained: {len(failed)} VM(s) still on it", file=sys.stderr)
        return EXIT_REFUSED
    print(f"node/{args.node} drained")
    return EXIT_OK


OUT_OF_SERVICE = {"key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown", "effect": "NoExecute"}


def cmd_node(client: Client, args: argparse.Namespace) -> int:
    """node confirm-down: the admin has made sure the node's host is off, so its VMs are released (and restarted
    elsewhere if their strategy says so). Kubernetes' non-graceful node shutdown: the out-of-service taint."""
    path = object_path(objects.NODE, None, args.node)
    node = client.get(path)
    taints = list((node.get("spec") or {}).get("taints") or [])
    if any(t.get("key") == OUT_OF_SERVICE["key"] for t in taints):
        print(f"node/{args.node} already confirmed down")
        return EXIT_OK
    ready = next((c.get("status") for c in (node.get("status") or {}).get("conditions") or []
                  if c.get("type") == "Ready"), None)
    if ready == "True":
        print(f"error: node/{args.node} is Ready: its host answers, so its VMs may run. Confirm a node down only "
              f"once its host is off", file=sys.stderr)
        return EXIT_REFUSED
    client.patch(path, {"spec": {"taints": [*taints, {**OUT_OF_SERVICE, "timeAdded": objects.now()}]}})
    print(f"node/{args.node} confirmed down: its VMs are released")
    return EXIT_OK


def cmd_clone(client: Client, args: argparse.Namespace) -> int:
    if args.dry_run and (args.start or args.wait):
        raise UsageError("--dry-run checks the clone's admission only: a start of the target can be checked once "
                         "it exists (vmquota start TARGET --dry-run)")
    clone_name = f"clone-{args.target}"[:56] + "-" + format(int(time.time() * 1000) % 16**6, "06x")
    query = "?dryRun=All" if args.dry_run else ""
    client.post(collection_path(objects.VIRTUAL_MACHINE_CLONE, args.namespace) + query, {
        "apiVersion": objects.VIRTUAL_MACHINE_CLONE.api_version, "kind": objects.VIRTUAL_MACHINE_CLONE.kind,
        "metadata": {"name": clone_name},
        "spec": {"source": {"kind": "VirtualMachine", "name": args.source},
                 "target": {"kind": "VirtualMachine", "name": args.target}},
    })
    if args.dry_run:
        print(f"virtualmachine.kubevirt.io/{args.target} would be admitted as a clone of {args.source} now "
              f"(dry run: nothing changed)")
        return EXIT_OK
    if args.start:
        client.put(action_path(args.namespace, args.target, "start"))
    if args.wait:
        path = object_path(objects.VIRTUAL_MACHINE, args.namespace, args.target)

        def disks_ready() -> bool:
            vm = client.get(path)
            conditions = (vm.get("status") or {}).get("conditions") or []
            return any(c.get("type") == "DataVolumesReady" and c.get("status") == "True" for c in conditions)

        _wait(disks_ready, args.timeout, f"the disks of {args.target} to be copied")
        if args.start:
            wait_for_phase(client, args.namespace, args.target, "Running", args.timeout)
    started = " and started" if args.start else ""
    print(f"virtualmachine.kubevirt.io/{args.target} cloned from {args.source}{started}")
    return EXIT_OK


# -- console and port-forward: KubeVirt's websocket subresources, as virtctl uses them ------------------------

ESCAPE = b"\x1d"  # Ctrl+] (and Ctrl+5 in most terminals) leaves the console, as in virtctl and telnet


def cmd_console(client: Client, args: argparse.Namespace) -> int:
    """The VM's serial console on this terminal (raw, so every key reaches the guest) until Ctrl+] or the guest's
    end. A VM still starting is waited for (the server answers 400 until it runs), as virtctl does. Standard input
    may be a pipe: what it gives is typed, and its end leaves the console open until interrupted."""
    socket_ = client.console(args.namespace, args.vm, timeout=args.timeout)
    print(f"Successfully connected to {args.vm} console. Press Ctrl+] or Ctrl+5 to exit console.", file=sys.stderr)
    terminal = _Terminal(sys.stdin.fileno(), sys.stdout.fileno())
    try:
        with terminal.raw():
            tunnel.pump(socket_.wire, socket_.ws, terminal)
    except KeyboardInterrupt:
        pass
    finally:
        socket_.close()
    print(file=sys.stderr)
    return EXIT_OK


class _Terminal:
    """This process's terminal (or pipes) as a tunnel's end: what is typed goes to the guest, what the guest prints
    comes out. `recv` ends at Ctrl+]; waiting for input, it wakes when the tunnel closes the end."""

    def __init__(self, stdin: int, stdout: int) -> None:
        self.stdin, self.stdout = stdin, stdout
        self._closed_reader, self._closed_writer = socket.socketpair()
        self._input_ended = False
        self._left = False

    def raw(self) -> _RawMode:
        return _RawMode(self.stdin)

    def recv(self, size: int) -> bytes:
        while not self._left:
            closed = self._closed_reader.fileno()
            readable, _, _ = select.select([closed] if self._input_ended else [self.stdin, closed], [], [])
            if closed in readable:
                return b""
            data = os.read(self.stdin, size)
            if not data:
                self._input_ended = True  # a pipe's end: keep showing the console until interrupted
                continue
            if ESCAPE in data:
                self._left = True
                return data[:data.index(ESCAPE)]  # what came before it still goes; the next call ends
            return data
        return b""

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.stdout, view):]

    def close(self) -> None:
        try:
            self._closed_writer.send(b"\0")
        except OSError:
            pass


class _RawMode:
    """A terminal in raw mode for the block, as virtctl puts it (every key reaches the guest); a pipe is left be."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None

    def __enter__(self) -> None:
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)

    def __exit__(self, *_: object) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)


def cmd_port_forward(client: Client, args: argparse.Namespace) -> int:
    """Listen on 127.0.0.1:LOCAL and carry each connection to the guest's REMOTE port over a websocket of its own,
    until interrupted, as `virtctl port-forward` (and `kubectl port-forward`) do."""
    plural, name = _forward_target(args.target)
    pairs = [_port_pair(text) for text in args.ports]
    client.get(object_path(objects.VIRTUAL_MACHINE if plural == "virtualmachines" else
                           objects.VIRTUAL_MACHINE_INSTANCE, args.namespace, name))  # a wrong name fails at once
    listeners: list[socket.socket] = []
    try:
        for local, remote in pairs:
            listener = socket.create_server(("127.0.0.1", local))
            listeners.append(listener)
            bound = listener.getsockname()[1]
            print(f"Forwarding from 127.0.0.1:{bound} -> {remote}", flush=True)
            path = port_forward_path(args.namespace, plural, name, remote)
            threading.Thread(target=_accept, args=(client, listener, path, bound), daemon=True).start()
        signal.signal(signal.SIGTERM, _interrupt)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    except OSError as e:
        raise UsageError(f"cannot listen on 127.0.0.1: {e}") from e
    finally:
        for listener in listeners:
            listener.close()
    return EXIT_OK


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _forward_target(text: str) -> tuple[str, str]:
    """virtctl's `vm/NAME` or `vmi/NAME` (a bare NAME is a VM)."""
    kind, _, name = text.rpartition("/")
    plural = {"": "virtualmachines", "vm": "virtualmachines", "vmi": "virtualmachineinstances"}.get(kind)
    if plural is None or objects.name_problem(name):
        raise UsageError(f"port-forward takes vm/NAME or vmi/NAME, got {text!r}")
    return plural, name


def _port_pair(text: str) -> tuple[int, int]:
    """LOCAL:REMOTE, or one PORT for both, as virtctl reads them (`tcp/` in front is taken; 0 picks a free port)."""
    spec = text.removeprefix("tcp/")
    local, _, remote = spec.partition(":")
    try:
        pair = (int(local), int(remote or local))
    except ValueError:
        pair = (-1, -1)
    if not 0 <= pair[0] < 65536 or not 0 < pair[1] < 65536:
        raise UsageError(f"a port forward is LOCAL:REMOTE with ports from 1 to 65535, got {text!r}")
    return pair


def _accept(client: Client, listener: socket.socket, path: str, local: int) -> None:
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:
            return  # the listener was closed: the command ends
        threading.Thread(target=_forward, args=(client, connection, path, local), daemon=True).start()


def _forward(client: Client, connection: socket.socket, path: str, local: int) -> None:
    print(f"Handling connection for {local}", flush=True)
    try:
        opened = client.websocket(path)
    except (ClientError, Unreachable) as e:
        print(f"error: forwarding a connection to {local}: {e}", file=sys.stderr, flush=True)
        connection.close()
        return
    try:
        tunnel.pump(opened.wire, opened.ws, tunnel.SocketEnd(connection))
    finally:
        opened.close()


def cmd_image_upload(client: Client, args: argparse.Namespace) -> int:
    """image-upload dv NAME: stream a local image into the upload data volume NAME (virtctl image-upload's
    shape). vmquota has no DataVolume objects of their own: the data volume is a VM's dataVolumeTemplate with
    `source: {upload: {}}`, created with the VM, so this uploads into an existing one."""
    image = Path(args.image_path)
    try:
        length = image.stat().st_size
        handle = image.open("rb")
    except OSError as e:
        raise UsageError(f"cannot read --image-path {args.image_path}: {e.strerror}") from e
    with handle:
        if args.size is not None:
            _check_upload_size(client, args.namespace, args.name, args.size)
        report = _upload_progress(length)
        answer = client.upload(upload_path(args.namespace, args.name), handle, length, progress=report)
    print(f"Uploading {image} completed successfully", file=sys.stderr)
    print(answer.get("message") if isinstance(answer, dict) else f"datavolume/{args.name} uploaded")
    return EXIT_OK


def _check_upload_size(client: Client, namespace: str, data_volume: str, size: str) -> None:
    """--size is the data volume's: its dataVolumeTemplate sets it (and the quota has charged it), so a
    different one is refused rather than silently ignored."""
    try:
        wanted = quantity.parse(size)
    except quantity.QuantityError as e:
        raise UsageError(f"--size: {e}") from e
    for vm in client.get(collection_path(objects.VIRTUAL_MACHINE, namespace)).get("items", []):
        for template in (vm.get("spec") or {}).get("dataVolumeTemplates") or []:
            if (template.get("metadata") or {}).get("name") != data_volume:
                continue
            claim = (template.get("spec") or {}).get("storage") or (template.get("spec") or {}).get("pvc") or {}
            requested = ((claim.get("resources") or {}).get("requests") or {}).get("storage")
            if requested is not None and quantity.parse(requested) != wanted:
                raise Refused(f"data volume {data_volume} of VM {vm['metadata']['name']} requests {requested}, not "
                              f"{size}: its size is set in the VM's dataVolumeTemplates")


def _upload_progress(total: int) -> Callable[[int], None]:
    """Progress on stderr: a line redrawn in place on a terminal, else a line every 10 %."""
    tty = sys.stderr.isatty()
    shown = [-1]

    def report(done: int) -> None:
        percent = 100 * done // total if total else 100
        if percent == shown[0] or (not tty and percent // 10 == shown[0] // 10 and done < total):
            return
        shown[0] = percent
        line = f"{_mib(done)} / {_mib(total)} ({percent}%)"
        print(f"\r{line}" if tty else line, end="" if tty and done < total else "\n", file=sys.stderr, flush=True)

    return report


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


# -- parsing ---------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vmquota", description="VMs on KVM under quotas that count only what runs.")
    top.add_argument("--server", help="the server URL (default: $VMQUOTA_SERVER, else the kubeconfig's)")
    top.add_argument("--kubeconfig", help="the kubeconfig file (default: $KUBECONFIG, else the default data "
                                          "directory's admin.kubeconfig when readable)")
    sub = top.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--data-dir", help="where the store and disks live (default: $XDG_DATA_HOME/vmquota; for "
                       "root ~/.local/share/vmquota, made a link to /var/lib/vmquota when new)")
    serve.add_argument("--hypervisor", default="qemu:///system", help="libvirt URI (test:///default for demos)")
    serve.add_argument("--listen", default="127.0.0.1:8686", help="HOST:PORT (default 127.0.0.1:8686)")
    serve.add_argument("--memory-overhead", default="none", choices=[m.value for m in OverheadModel],
                       help="memory charged on top of the guest's: none (default) or kubevirt")
    serve.add_argument("--resync-interval", type=float, default=30.0,
                       help="seconds between full recounts from the hypervisor (default 30)")
    serve.add_argument("--node-status-update-frequency", type=float, default=10.0, metavar="SECONDS",
                       help="seconds between two looks at each node's libvirt (kubelet's name; default 10)")
    serve.add_argument("--node-monitor-grace-period", type=float, default=40.0, metavar="SECONDS",
                       help="how long a node's libvirt may not answer before the node is NotReady "
                            "(kube-controller-manager's name; default 40)")
    # placement.Policy's values: the controller is not imported for every command
    serve.add_argument("--placement", default="spread", choices=("spread", "pack"),
                       help="which fitting node a starting VM goes to: spread (the most memory left, the default) "
                            "or pack (the least left that still fits)")
    serve.add_argument("--use-emulation", action="store_true",
                       help="run guests under plain QEMU emulation even where KVM works (KubeVirt's useEmulation)")
    serve.add_argument("--api-processes", type=int, default=None,
                       help="processes answering HTTP, one of them also running the controller "
                            "(default: one per core, at most 8)")
    serve.add_argument("--tls-cert-file", help="the serving certificate (PEM; default: made by vmquota's CA in "
                                               "<data-dir>/pki)")
    serve.add_argument("--tls-private-key-file", help="the key of --tls-cert-file")
    serve.add_argument("--plain-http", action="store_true",
                       help="serve plain HTTP instead of TLS (refused on any address but loopback)")
    serve.add_argument("--anonymous-auth", action="store_true",
                       help="requests without credentials are system:anonymous instead of refused (401)")
    serve.add_argument("--token-auth-file", help="Kubernetes' static token file: token,user,uid,\"group1,group2\"")
    serve.add_argument("--authorization-mode", default="RBAC", help="RBAC (default) or AlwaysAllow")
    serve.add_argument("--max-requests-inflight-per-user", type=int, default=64,
                       help="requests one user may have in flight per API process before a 429 (default 64)")

    issue = sub.add_parser("kubeconfig", help="print a kubeconfig for a user, with a certificate from the "
                                              "server's CA (run on the server's host)")
    issue.add_argument("--data-dir", help="the server's data directory (default: as vmquota serve's)")
    issue.add_argument("--user", required=True)
    issue.add_argument("--group", action="append", default=[], help="a group of the user (repeatable)")
    issue.add_argument("--namespace", help="the context's namespace")
    issue.add_argument("--expiration", default="8760h", help="how long the certificate is valid (default 8760h)")

    audit = sub.add_parser("audit", help="print the audit log (run on the server's host)")
    audit.add_argument("--data-dir", help="the server's data directory (default: as vmquota serve's)")
    audit.add_argument("--user", help="only this user's events")
    audit.add_argument("--since", help="only events this recent (e.g. 1h, 30m)")

    def namespaced(p: argparse.ArgumentParser) -> None:
        p.add_argument("-n", "--namespace", default=None, help="default: the kubeconfig context's, else default")

    get = sub.add_parser("get", help="list or show objects")
    get.add_argument("resource")
    get.add_argument("name", nargs="?")
    namespaced(get)
    get.add_argument("-A", "--all-namespaces", action="store_true")
    get.add_argument("-o", "--output", default="table", choices=["table", "json", "yaml"])

    top_use = sub.add_parser("top", help="who uses what, and how close to the limit")
    top_use.add_argument("resource", choices=["quotas", "vms", "projects"])
    namespaced(top_use)
    top_use.add_argument("-A", "--all-namespaces", action="store_true")

    describe = sub.add_parser("describe", help="show an object with its usage and events")
    describe.add_argument("resource")
    describe.add_argument("name")
    namespaced(describe)

    apply = sub.add_parser("apply", help="create or update objects from YAML or JSON")
    apply.add_argument("-f", "--filename", required=True, help="a file, or - for standard input")
    namespaced(apply)

    delete = sub.add_parser("delete", help="delete an object (a VM: stops it and removes its disks)")
    delete.add_argument("resource")
    delete.add_argument("name")
    namespaced(delete)
    delete.add_argument("--no-wait", action="store_true", help="do not wait until a VM is gone")
    delete.add_argument("--timeout", type=float, default=300)

    for action in ("start", "stop", "restart"):
        p = sub.add_parser(action, help=f"{action} a VM")
        p.add_argument("vm")
        namespaced(p)
        p.add_argument("--wait", action="store_true", help="return once the VM is there, or fail with the reason")
        p.add_argument("--timeout", type=float, default=300)
        if action == "stop":
            p.add_argument("--grace-period", type=int, help="seconds to wait for the guest before forcing it off")
        else:
            p.add_argument("--dry-run", action="store_true",
                           help="would it be admitted now? exit 0, or 1 with the refusal; nothing changes")

    for action, words in (("cordon", "place no new VM on a node"), ("uncordon", "place VMs on a node again")):
        sub.add_parser(action, help=words).add_argument("node")
    drain = sub.add_parser("drain", help="cordon a node and live-migrate its VMs away")
    drain.add_argument("node")
    drain.add_argument("--timeout", type=float, default=600)
    drain.add_argument("--force", action="store_true",
                       help="stop the VMs that cannot be live-migrated (evictionStrategy other than LiveMigrate)")
    move = sub.add_parser("migrate", help="live-migrate a running VM to another node")
    move.add_argument("vm")
    namespaced(move)
    move.add_argument("--to", metavar="NODE", help="the node to move to (default: where placement chooses)")
    move.add_argument("--wait", action="store_true", help="until the migration has ended; exit 1 if it failed")
    move.add_argument("--timeout", type=float, default=600)
    node = sub.add_parser("node", help="act on a node").add_subparsers(dest="node_command", required=True)
    confirm = node.add_parser("confirm-down", help="the node's host is off for sure: release its VMs")
    confirm.add_argument("node")
    global_flags(confirm)

    clone = sub.add_parser("clone", help="clone a VM with copies of its disks")
    clone.add_argument("source")
    clone.add_argument("target")
    namespaced(clone)
    clone.add_argument("--start", action="store_true")
    clone.add_argument("--wait", action="store_true")
    clone.add_argument("--dry-run", action="store_true",
                       help="would the clone be admitted now? exit 0, or 1 with the refusal; nothing changes")
    clone.add_argument("--timeout", type=float, default=600)

    console = sub.add_parser("console", help="the serial console of a running VM (Ctrl+] leaves)")
    console.add_argument("vm")
    namespaced(console)
    console.add_argument("--timeout", type=float, default=300,
                         help="seconds to wait for a VM that is still starting (default 300)")

    forward = sub.add_parser("port-forward", help="forward local ports on 127.0.0.1 to a VM's guest ports")
    forward.add_argument("target", help="vm/NAME (or vmi/NAME)")
    forward.add_argument("ports", nargs="+", metavar="LOCAL:REMOTE", help="a local port and the guest's port")
    namespaced(forward)
    upload = sub.add_parser("image-upload", help="upload a local disk image into a data volume with source "
                                                 "upload: {} (virtctl image-upload)")
    upload.add_argument("kind", choices=["dv"], help="dv: a data volume (a VM's dataVolumeTemplate)")
    upload.add_argument("name")
    namespaced(upload)
    upload.add_argument("--image-path", required=True, help="the qcow2, raw or ISO file, optionally xz or gzip")
    upload.add_argument("--size", help="the data volume's size, checked against its dataVolumeTemplate")
    for name, command in sub.choices.items():  # like kubectl's global flags, these may follow the command
        if name not in ("serve", "kubeconfig", "audit"):
            global_flags(command)
    return top


def global_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument("--server", default=argparse.SUPPRESS, help="the server URL")
    command.add_argument("--kubeconfig", default=argparse.SUPPRESS, help="the kubeconfig file")


COMMANDS = {"get": cmd_get, "top": cmd_top, "describe": cmd_describe, "apply": cmd_apply, "delete": cmd_delete,
            "start": cmd_lifecycle, "stop": cmd_lifecycle, "restart": cmd_lifecycle, "clone": cmd_clone,
            "cordon": cmd_cordon, "uncordon": cmd_cordon, "node": cmd_node,
            "drain": cmd_drain, "migrate": cmd_migrate, "image-upload": cmd_image_upload, "console": cmd_console,
            "port-forward": cmd_port_forward}


LOCAL_COMMANDS = {"kubeconfig": cmd_kubeconfig, "audit": cmd_audit}


def main(argv: list[str] | None = None) -> NoReturn:
    sys.exit(run(argv))


def run(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return EXIT_OK if e.code == 0 else EXIT_USAGE
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command in LOCAL_COMMANDS:
            return LOCAL_COMMANDS[args.command](args)
        connection = kubeconfig.resolve(kubeconfig=args.kubeconfig, server=args.server, environ=os.environ,
                                        default=DEFAULT_SERVER)
        if getattr(args, "namespace", "") is None:  # -n not given: the context's namespace, as kubectl
            args.namespace = connection.namespace or "default"
        client = Client(connection)
        try:
            return COMMANDS[args.command](client, args)
        finally:
            client.close()
    except (UsageError, kubeconfig.KubeconfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Unreachable as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ClientError as e:
        print(f"Error from server ({e.reason or 'Failure'}): {e.message}", file=sys.stderr)
        return EXIT_REFUSED
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
