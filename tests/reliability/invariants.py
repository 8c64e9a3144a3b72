"""The invariants every reliability test checks, computed from the hypervisor's truth and never from vmquota's own
accounting code.

`charge_of(vm)` re-derives what a VM must charge from its spec alone (the contract's rules, overhead model
`none`); `truth(...)` adds up the charges of what exists and of what the hypervisor really runs; `violations(...)`
compares every quota's and project's `status.used` with that truth and lists everything that is wrong (leaked
domains, leaked or missing disk files, VMs stuck in a transient phase), so a failing test prints all of it at once.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import libvirt

# The API paths, defined once in conftest; `as` marks them re-exported for the reliability tests.
from conftest import clones_path as clones_path
from conftest import events_path as events_path
from conftest import quotas_path as quotas_path
from conftest import vms_path as vms_path

from vmquota import quantity
from vmquota.client import Client

# libvirt prints every error to stderr by default; a domain without vmquota's metadata is an expected one here.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

PROJECT_LABEL = "vmquota.io/project"
PROJECTS = "/apis/vmquota.io/v1/projects"
ALL_VMS = "/apis/kubevirt.io/v1/virtualmachines"
ALL_QUOTAS = "/api/v1/resourcequotas"
NAMESPACES = "/api/v1/namespaces"
METADATA_URI = "https://vmquota.io/xmlns/domain/1"
TRANSIENT = ("Starting", "Stopping", "Terminating", "Provisioning", "Unknown")

Resources = dict[str, Decimal]


def q(value: Any) -> Decimal:
    return quantity.parse(value)


# -- what a VM charges, from its spec alone ------------------------------------------------------------


def disk_sizes(vm: dict[str, Any]) -> dict[str, Decimal]:
    sizes = {}
    for template in vm["spec"].get("dataVolumeTemplates") or []:
        source = template["spec"].get("storage") or template["spec"].get("pvc")
        sizes[template["metadata"]["name"]] = q(source["resources"]["requests"]["storage"])
    return sizes


def persistent_charge(vm: dict[str, Any]) -> Resources:
    return {"requests.storage": sum(disk_sizes(vm).values(), Decimal(0)),
            "count/virtualmachines.kubevirt.io": Decimal(1)}


def compute_charge(vm: dict[str, Any]) -> Resources:
    """What the VM charges while it holds a runtime: the contract's rules with overhead model `none`."""
    domain = vm["spec"]["template"]["spec"]["domain"]
    cpu = domain.get("cpu") or {}
    vcpus = Decimal(cpu.get("sockets", 1) * cpu.get("cores", 1) * cpu.get("threads", 1))
    resources = domain.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    guest = q((domain.get("memory") or {}).get("guest") or requests.get("memory") or limits.get("memory"))
    requests_cpu = q(requests["cpu"]) if "cpu" in requests else vcpus / 10
    requests_memory = q(requests["memory"]) if "memory" in requests else guest
    return {
        "limits.cpu": q(limits["cpu"]) if "cpu" in limits else vcpus,
        "limits.memory": q(limits["memory"]) if "memory" in limits else guest,
        "requests.cpu": requests_cpu, "cpu": requests_cpu,
        "requests.memory": requests_memory, "memory": requests_memory,
        "requests.instances/vmi": Decimal(1), "count/virtualmachineinstances.kubevirt.io": Decimal(1),
    }


def add(a: Resources, b: Resources) -> Resources:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, Decimal(0)) + v
    return out


def fits(used: Resources, delta: Resources, hard: Resources) -> bool:
    """Kubernetes' admission: every resource the quota limits and the request raises stays within hard."""
    return all(used.get(k, Decimal(0)) + v <= hard[k] for k, v in delta.items() if k in hard and v > 0)


# -- the hypervisor's truth ----------------------------------------------------------------------------


def domain_name(ns: str, name: str) -> str:
    return f"vmquota_{ns}_{name}"


def parse_domain(name: str) -> tuple[str, str] | None:
    parts = name.removeprefix("vmquota_").split("_") if name.startswith("vmquota_") else []
    return (parts[0], parts[1]) if len(parts) == 2 else None


def domains(conn: Any, namespaces: Iterable[str]) -> dict[tuple[str, str], tuple[str, bool]]:
    """(namespace, name) -> (UUID, active) of every domain vmquota made for these namespaces (named like its own
    and carrying its metadata: a foreign domain with such a name is not vmquota's, and must stay untouched)."""
    wanted = set(namespaces)
    found = {}
    for dom in conn.listAllDomains():
        key = parse_domain(dom.name())
        if not key or key[0] not in wanted:
            continue
        try:
            dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_URI)
            found[key] = (dom.UUIDString(), bool(dom.isActive()))
        except libvirt.libvirtError:
            continue  # not vmquota's, or undefined while we looked
    return found


@dataclass
class World:
    """One consistent look at the server and the hypervisor."""

    vms: dict[tuple[str, str], dict[str, Any]]
    quotas: dict[tuple[str, str], dict[str, Any]]
    projects: dict[str, dict[str, Any]]
    members: dict[str, list[str]]  # project -> namespaces
    domains: dict[tuple[str, str], tuple[str, bool]]
    usage: dict[str, Resources] = field(default_factory=dict)  # namespace -> the truth

    def running(self, key: tuple[str, str]) -> bool:
        vm = self.vms.get(key)
        uuid, active = self.domains.get(key, ("", False))
        return bool(vm and active and uuid == vm["metadata"]["uid"])


def look(client: Client, conn: Any, namespaces: Iterable[str], projects: Iterable[str] | None = None) -> World:
    namespaces = list(namespaces)
    vms = {(v["metadata"]["namespace"], v["metadata"]["name"]): v for v in client.get(ALL_VMS)["items"]
           if v["metadata"]["namespace"] in namespaces}
    quotas = {(x["metadata"]["namespace"], x["metadata"]["name"]): x for x in client.get(ALL_QUOTAS)["items"]
              if x["metadata"]["namespace"] in namespaces}
    wanted_projects = None if projects is None else set(projects)
    all_projects = {p["metadata"]["name"]: p for p in client.get(PROJECTS)["items"]
                    if wanted_projects is None or p["metadata"]["name"] in wanted_projects}
    members: dict[str, list[str]] = defaultdict(list)
    for ns in client.get(NAMESPACES)["items"]:
        project = (ns["metadata"].get("labels") or {}).get(PROJECT_LABEL)
        if project in all_projects:
            members[project].append(ns["metadata"]["name"])
    world = World(vms, quotas, all_projects, dict(members), domains(conn, namespaces))
    for ns in namespaces:
        world.usage[ns] = {}
    for key, vm in vms.items():
        charge = persistent_charge(vm)
        if world.running(key):
            charge = add(charge, compute_charge(vm))
        world.usage[key[0]] = add(world.usage.get(key[0], {}), charge)
    return world


def project_usage(world: World, project: str) -> Resources:
    total: Resources = {}
    for ns in world.members.get(project, []):
        total = add(total, world.usage.get(ns, {}))
    return total


def project_hard(project: dict[str, Any]) -> Resources:
    hard = ((project.get("spec") or {}).get("resourceQuota") or {}).get("hard") or {}
    return {k: q(v) for k, v in hard.items()}


def quota_hard(quota: dict[str, Any]) -> Resources:
    return {k: q(v) for k, v in ((quota.get("spec") or {}).get("hard") or {}).items()}


def _used(obj: dict[str, Any]) -> Resources:
    return {k: q(v) for k, v in ((obj.get("status") or {}).get("used") or {}).items()}


def _render(resources: Resources) -> str:
    return ", ".join(f"{k}={quantity.format(v)}" for k, v in sorted(resources.items()))


# -- the checks ------------------------------------------------------------------------------------------


def violations(world: World, *, may_exceed: bool = False, disks_root: Path | None = None,
               settled: bool = True) -> list[str]:
    """Everything that is wrong, in words; [] when every invariant holds.

    `may_exceed`: a domain was started behind vmquota's back, which is charged whatever the quota says.
    `settled`: the controller has nothing left to do, so no VM may sit in a transient phase.
    """
    found: list[str] = []
    for (ns, name), quota in sorted(world.quotas.items()):
        hard = quota_hard(quota)
        truth = {k: world.usage.get(ns, {}).get(k, Decimal(0)) for k in hard}
        used = _used(quota)
        if used != truth:
            found.append(f"quota {ns}/{name}: used {_render(used)} but the truth is {_render(truth)}")
        if {k: q(v) for k, v in ((quota.get("status") or {}).get("hard") or {}).items()} != hard:
            found.append(f"quota {ns}/{name}: status.hard {quota.get('status', {}).get('hard')} != spec.hard")
        if not may_exceed and any(used.get(k, Decimal(0)) > v for k, v in hard.items()):
            found.append(f"quota {ns}/{name}: used {_render(used)} exceeds hard {_render(hard)}")
    for name, project in sorted(world.projects.items()):
        hard = project_hard(project)
        total = project_usage(world, name)
        truth = {k: total.get(k, Decimal(0)) for k in hard}
        used = _used(project)
        if used != truth:
            found.append(f"project {name}: used {_render(used)} but the truth is {_render(truth)} "
                         f"(namespaces {sorted(world.members.get(name, []))})")
        if not may_exceed and any(used.get(k, Decimal(0)) > v for k, v in hard.items()):
            found.append(f"project {name}: used {_render(used)} exceeds hard {_render(hard)}")
    for key, (uuid, active) in sorted(world.domains.items()):
        vm = world.vms.get(key)
        if vm is None or vm["metadata"]["uid"] != uuid:
            found.append(f"domain {domain_name(*key)} ({'running' if active else 'defined'}) has no VM: leaked")
    for key, vm in sorted(world.vms.items()):
        status = vm.get("status") or {}
        phase = status.get("printableStatus", "Stopped")
        running = world.running(key)
        if settled and (phase in TRANSIENT or vm["metadata"].get("deletionTimestamp")):
            found.append(f"VM {key[0]}/{key[1]} is stuck in {phase} with nothing left to do "
                         f"(domain {'running' if running else 'not running'})")
        elif settled and (phase in ("Running", "Paused")) != running:
            found.append(f"VM {key[0]}/{key[1]} says {phase} but its domain is {'' if running else 'not '}running")
    if disks_root is not None:
        found += disk_violations(world, disks_root)
    return found


def disk_violations(world: World, root: Path) -> list[str]:
    """No disk folder without its VM, no half-written file, and every disk of every VM on disk."""
    found = []
    uids = {vm["metadata"]["uid"]: key for key, vm in world.vms.items()}
    namespaces = set(world.usage)
    if root.is_dir():
        for ns_dir in sorted(root.iterdir()):
            if ns_dir.name not in namespaces:
                continue
            for vm_dir in sorted(ns_dir.iterdir()):
                if vm_dir.name not in uids:
                    found.append(f"disk folder {ns_dir.name}/{vm_dir.name} has no VM: leaked")
                found += [f"half-written disk file left: {p.relative_to(root)}" for p in vm_dir.glob("*.partial")]
    for uid, (ns, name) in sorted(uids.items(), key=lambda item: item[1]):
        for disk in disk_sizes(world.vms[(ns, name)]):
            if not (root / ns / uid / f"{disk}.qcow2").exists():
                found.append(f"VM {ns}/{name}: disk {disk} is missing on disk")
    return found


def snapshot(client: Client, namespaces: Iterable[str], projects: Iterable[str] = ()) -> str:
    """Every object a refused request must leave alone, resourceVersions included, as comparable text (a quota
    refusal's own QuotaExceeded event left out)."""
    namespaces = sorted(namespaces)
    state: dict[str, Any] = {
        "vms": [v for v in client.get(ALL_VMS)["items"] if v["metadata"]["namespace"] in namespaces],
        "quotas": [x for x in client.get(ALL_QUOTAS)["items"] if x["metadata"]["namespace"] in namespaces],
        "projects": [p for p in client.get(PROJECTS)["items"] if p["metadata"]["name"] in set(projects)],
        "namespaces": [n for n in client.get(NAMESPACES)["items"] if n["metadata"]["name"] in namespaces],
    }
    for ns in namespaces:
        state[f"clones/{ns}"] = client.get(clones_path(ns))["items"]
        # A quota refusal records itself as a QuotaExceeded event on the quota (issue 14): the one trace it leaves.
        state[f"events/{ns}"] = [e["metadata"]["name"] for e in client.get(events_path(ns))["items"]
                                 if e.get("reason") != "QuotaExceeded"]
    return json.dumps(state, indent=1, sort_keys=True)
