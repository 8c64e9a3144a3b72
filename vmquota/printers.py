"""How the CLI shows objects: kubectl-like tables and `describe` text.

Top layer, pure: functions from API objects to text, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from vmquota import quantity

Obj = dict[str, Any]


def age(timestamp: str | None, now: datetime | None = None) -> str:
    """kubectl's short age: 45s, 12m, 3h, 2d."""
    if not timestamp:
        return "<unknown>"
    try:
        then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "<unknown>"
    seconds = int(((now or datetime.now(UTC)) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size if unit != "m" else seconds >= 120:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [list(headers), *rows]]
    return "\n".join(lines)


def used_of_hard(used: dict[str, str], hard: dict[str, str]) -> str:
    return ", ".join(f"{name}: {used.get(name, '0')}/{hard[name]}" for name in sorted(hard))


def _meta(obj: Obj) -> Obj:
    return obj.get("metadata") or {}


def vm_row(vm: Obj) -> list[str]:
    status = vm.get("status") or {}
    return [_meta(vm).get("name", ""), age(_meta(vm).get("creationTimestamp")),
            status.get("printableStatus", "Stopped"), str(bool(status.get("ready"))).lower()]


def quota_row(quota: Obj) -> list[str]:
    status = quota.get("status") or {}
    return [_meta(quota).get("name", ""), age(_meta(quota).get("creationTimestamp")),
            used_of_hard(status.get("used") or {}, status.get("hard") or {})]


def project_row(project: Obj) -> list[str]:
    status = project.get("status") or {}
    hard = ((project.get("spec") or {}).get("resourceQuota") or {}).get("hard") or {}
    hard = {k: str(v) for k, v in hard.items()}
    return [_meta(project).get("name", ""), age(_meta(project).get("creationTimestamp")),
            used_of_hard(status.get("used") or {}, hard)]


def namespace_row(ns: Obj) -> list[str]:
    project = (_meta(ns).get("labels") or {}).get("vmquota.io/project", "<none>")
    return [_meta(ns).get("name", ""), (ns.get("status") or {}).get("phase", "Active"), project,
            age(_meta(ns).get("creationTimestamp"))]


def event_row(event: Obj) -> list[str]:
    involved = event.get("involvedObject") or {}
    return [age(event.get("lastTimestamp")), event.get("type", ""), event.get("reason", ""),
            f"{involved.get('kind', '').lower()}/{involved.get('name', '')}", event.get("message", "")]


def _ready(node: Obj) -> str:
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = next((c.get("status") for c in conditions if c.get("type") == "Ready"), None)
    return {"True": "Ready", "False": "NotReady"}.get(str(ready), "Unknown")


def node_row(node: Obj) -> list[str]:
    """kubectl's columns, and where the host is and what it has."""
    status, spec = node.get("status") or {}, node.get("spec") or {}
    word = _ready(node) + (",SchedulingDisabled" if spec.get("unschedulable") else "")
    allocatable = status.get("allocatable") or {}
    return [_meta(node).get("name", ""), word, age(_meta(node).get("creationTimestamp")),
            f"cpu {allocatable.get('cpu', '?')}, memory {allocatable.get('memory', '?')}",
            spec.get("providerID", "")]


def vmi_row(vmi: Obj) -> list[str]:
    status = vmi.get("status") or {}
    interfaces = status.get("interfaces") or [{}]
    return [_meta(vmi).get("name", ""), age(_meta(vmi).get("creationTimestamp")), status.get("phase", ""),
            interfaces[0].get("ipAddress", "") or "", status.get("nodeName", "")]


TABLES: dict[str, tuple[list[str], Callable[[Obj], list[str]]]] = {
    "VirtualMachine": (["NAME", "AGE", "STATUS", "READY"], vm_row),
    "ResourceQuota": (["NAME", "AGE", "USED/HARD"], quota_row),
    "Project": (["NAME", "AGE", "USED/HARD"], project_row),
    "Namespace": (["NAME", "STATUS", "PROJECT", "AGE"], namespace_row),
    "Event": (["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"], event_row),
    "Node": (["NAME", "STATUS", "AGE", "ALLOCATABLE", "URI"], node_row),
    "VirtualMachineInstance": (["NAME", "AGE", "PHASE", "IP", "NODENAME"], vmi_row),
    "VirtualMachineClone": (["NAME", "SOURCE", "TARGET", "PHASE"], lambda c: [
        _meta(c).get("name", ""), ((c.get("spec") or {}).get("source") or {}).get("name", ""),
        ((c.get("spec") or {}).get("target") or {}).get("name", ""), (c.get("status") or {}).get("phase", "")]),
}


def render_table(kind: str, items: list[Obj], *, all_namespaces: bool) -> str:
    headers, row = TABLES[kind]
    rows = [row(item) for item in items]
    if all_namespaces:
        headers = ["NAMESPACE", *headers]
        rows = [[_meta(item).get("namespace", ""), *r] for item, r in zip(items, rows, strict=True)]
    if not rows:
        return "No resources found."
    return table(headers, rows)


def describe_vm(vm: Obj, charge: Obj, events: list[Obj]) -> str:
    meta, status, spec = _meta(vm), vm.get("status") or {}, vm.get("spec") or {}
    lines = [f"Name:           {meta.get('name')}", f"Namespace:      {meta.get('namespace')}",
             f"UID:            {meta.get('uid')}", f"Created:        {meta.get('creationTimestamp')}",
             f"Run strategy:   {spec.get('runStrategy') or ('Always' if spec.get('running') else 'Halted')}",
             f"Status:         {status.get('printableStatus', 'Stopped')}",
             f"Ready:          {status.get('ready', False)}"]
    for condition in status.get("conditions") or []:
        if (condition.get("status") == "True" and condition.get("type") != "Ready") or condition.get("message"):
            lines.append(f"Condition:      {condition.get('type')}={condition.get('status')} "
                         f"{condition.get('reason', '')}: {condition.get('message', '')}".rstrip(": "))
    why = ("it holds a runtime (from an admitted start until the hypervisor confirms it is off)"
           if charge.get("holdsRuntime") else "it holds no runtime: only its disks and its count are charged")
    lines += ["", f"Charge now ({why}):"]
    lines += [f"  {name}: {value}" for name, value in charge.get("charge", {}).items()]
    lines += ["While running it charges:"]
    lines += [f"  {name}: {value}" for name, value in charge.get("whileRunning", {}).items()]
    lines += [f"Memory overhead model: {charge.get('overheadModel')}"]
    lines += [f"  {part['part']}: {part['memory']}" for part in charge.get("overhead", [])]
    lines += [f"Counts against: {', '.join(charge.get('quotas', [])) or 'no quota'}"]
    lines += ["", "Events:", *_events(events)]
    return "\n".join(lines)


def describe_node(node: Obj, vmis: list[Obj], charges: list[Obj]) -> str:
    """A node: its host, its state, and its VMs' requests against what it can allocate (as kubectl's
    "Allocated resources")."""
    meta, spec, status = _meta(node), node.get("spec") or {}, node.get("status") or {}
    lines = [f"Name:           {meta.get('name')}", f"Provider ID:    {spec.get('providerID', '')}",
             f"Unschedulable:  {bool(spec.get('unschedulable'))}"]
    for key, value in sorted((meta.get("annotations") or {}).items()):
        if key.startswith("vmquota.io/"):
            lines.append(f"Setting:        {key}={value}")
    lines.append("Conditions:")
    for c in status.get("conditions") or []:
        lines.append(f"  {c.get('type')}={c.get('status')} {c.get('reason', '')}: {c.get('message', '')} "
                     f"(heartbeat {c.get('lastHeartbeatTime', '?')}, since {c.get('lastTransitionTime', '?')})")
    capacity, allocatable = status.get("capacity") or {}, status.get("allocatable") or {}
    lines += ["Capacity:", *[f"  {k}: {v}" for k, v in sorted(capacity.items())],
              "Allocatable:", *[f"  {k}: {v}" for k, v in sorted(allocatable.items())]]
    charge_of = {(c.get("namespace"), c.get("name")): c.get("charge") or {} for c in charges}
    rows, cpu, memory = [], Decimal(0), Decimal(0)
    for vmi in vmis:
        key = (_meta(vmi).get("namespace"), _meta(vmi).get("name"))
        charge = charge_of.get(key, {})
        rows.append([key[0] or "", key[1] or "", (vmi.get("status") or {}).get("phase", ""),
                     charge.get("requests.cpu", "0"), charge.get("requests.memory", "0")])
        cpu += quantity.parse(charge.get("requests.cpu", "0"))
        memory += quantity.parse(charge.get("requests.memory", "0"))
    lines += ["", f"VMs ({len(rows)}):", table(["NAMESPACE", "NAME", "PHASE", "CPU REQUESTS", "MEMORY REQUESTS"], rows)
              if rows else "  none"]
    lines += ["", "Allocated resources (requests of its VMs / allocatable):",
              f"  cpu:    {quantity.format(cpu)} / {allocatable.get('cpu', '?')}",
              f"  memory: {quantity.format(memory)} / {allocatable.get('memory', '?')}"]
    return "\n".join(lines)


def describe_quota(quota: Obj, charges: list[Obj]) -> str:
    meta, status = _meta(quota), quota.get("status") or {}
    hard, used = status.get("hard") or {}, status.get("used") or {}
    rows = [[name, used.get(name, "0"), hard[name]] for name in sorted(hard)]
    lines = [f"Name:         {meta.get('name')}", f"Namespace:    {meta.get('namespace')}", *_settings(quota), "",
             table(["Resource", "Used", "Hard"], rows) if rows else "No limits.", "", "Used by:"]
    users = [[c["name"], ", ".join(f"{k}={v}" for k, v in c["charge"].items() if k in hard and v != "0")]
             for c in charges]
    users = [u for u in users if u[1]]
    lines.append(table(["VM", "Charge"], users) if users else "  nothing")
    return "\n".join(lines)


def describe_project(project: Obj, usage: Obj) -> str:
    lines = [f"Name:         {_meta(project).get('name')}", *_settings(project), ""]
    hard, used = usage.get("hard") or {}, usage.get("used") or {}
    rows = [[name, used.get(name, "0"), hard[name]] for name in sorted(hard)]
    lines.append(table(["Resource", "Used", "Hard"], rows) if rows else "No limits.")
    default = ((project.get("spec") or {}).get("namespaceDefaultResourceQuota") or {}).get("hard") or {}
    if default:
        lines += ["", "Namespace default quota: " + ", ".join(f"{k}={v}" for k, v in sorted(default.items()))]
    lines += ["", "Namespaces:"]
    if not usage.get("namespaces"):
        lines.append("  none")
    for ns in usage.get("namespaces", []):
        lines.append(f"  {ns['namespace']}: " + (", ".join(f"{k}={v}" for k, v in ns["used"].items()) or "nothing"))
        for vm in ns["virtualMachines"]:
            lines.append(f"    {vm['name']}: " + ", ".join(f"{k}={v}" for k, v in vm["charge"].items()))
    return "\n".join(lines)


THRESHOLD_ANNOTATION = "vmquota.io/warning-threshold"
ENFORCEMENT_ANNOTATION = "vmquota.io/enforcement"


def _settings(quota: Obj) -> list[str]:
    """How a quota or project is enforced (audit: admitted past hard, recorded and warned) and where it warns."""
    annotations = _meta(quota).get("annotations") or {}
    mode = (quota.get("status") or {}).get("enforcement") or annotations.get(ENFORCEMENT_ANNOTATION) or "enforce"
    threshold = annotations.get(THRESHOLD_ANNOTATION, "80").rstrip("%")
    note = "  (admits past hard: records and warns instead of refusing)" if mode == "audit" else ""
    return [f"Enforcement:  {mode}{note}", f"Warning at:   {threshold}% of hard"]


def _percent(used: str, hard: str) -> Decimal | None:
    try:
        limit = quantity.parse(hard)
        return quantity.parse(used) * 100 / limit if limit > 0 else None
    except quantity.QuantityError:
        return None


def top_quotas(items: list[Obj], *, projects: bool) -> str:
    """Every resource of every quota (or project), fullest first: who is close to the limit."""
    rows: list[tuple[Decimal, list[str]]] = []
    for quota in items:
        meta, status = _meta(quota), quota.get("status") or {}
        hard, used = status.get("hard") or {}, status.get("used") or {}
        mode = status.get("enforcement") or (meta.get("annotations") or {}).get(ENFORCEMENT_ANNOTATION) or "enforce"
        for name in sorted(hard):
            share = _percent(used.get(name, "0"), hard[name])
            where = [] if projects else [meta.get("namespace", "")]
            rows.append((share if share is not None else Decimal(-1),
                         [*where, meta.get("name", ""), name, used.get(name, "0"), hard[name],
                          "-" if share is None else f"{share:.0f}%", mode]))
    rows.sort(key=lambda row: (-row[0], row[1]))
    headers = [*([] if projects else ["NAMESPACE"]), "NAME", "RESOURCE", "USED", "HARD", "USE", "MODE"]
    return table(headers, [row for _, row in rows]) if rows else "No quotas found."


_TOP_VM_RESOURCES = ("limits.cpu", "requests.cpu", "limits.memory", "requests.memory", "requests.storage")


def top_vms(charges: list[Obj], vms: list[Obj]) -> str:
    """Every VM with what it charges now, the biggest first (by limits.cpu, then limits.memory)."""
    status = {(_meta(vm).get("namespace"), _meta(vm).get("name")): (vm.get("status") or {}).get("printableStatus", "")
              for vm in vms}

    def amount(charge: Obj, name: str) -> Decimal:
        return quantity.parse(charge.get(name, "0"))

    ordered = sorted(charges, key=lambda c: (-amount(c["charge"], "limits.cpu"), -amount(c["charge"], "limits.memory"),
                                             c["namespace"], c["name"]))
    rows = [[c["namespace"], c["name"], status.get((c["namespace"], c["name"]), ""),
             *(c["charge"].get(name, "0") for name in _TOP_VM_RESOURCES)] for c in ordered]
    headers = ["NAMESPACE", "NAME", "STATUS", "LIMITS.CPU", "REQUESTS.CPU", "LIMITS.MEMORY", "REQUESTS.MEMORY",
               "STORAGE"]
    return table(headers, rows) if rows else "No VMs found."


def _events(events: list[Obj]) -> list[str]:
    if not events:
        return ["  <none>"]
    rows = [[e.get("type", ""), e.get("reason", ""), age(e.get("lastTimestamp")), e.get("message", "")]
            for e in events[-15:]]
    return ["  " + line for line in table(["Type", "Reason", "Age", "Message"], rows).splitlines()]
