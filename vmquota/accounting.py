"""Charges, admission and recounts: how VM charges become every quota's `status.used`.

Middle layer. Every change of what a VM charges goes through `set_charge`, inside
a store transaction, so the ledger (`charges` table) and the `used` of every quota
that covers the VM's namespace (its ResourceQuotas and its Project) change together.
With `enforce=True` a rise is admitted first against every one of those quotas:
if any refuses, `QuotaExceeded` propagates, the transaction rolls back and nothing
changes. The cost depends on the number of quotas, never on the number of VMs.

`recount` rebuilds every `used` from the ledger, the way a periodic full resync
corrects whatever drifted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from vmquota import errors, objects
from vmquota import resources as r
from vmquota.objects import Obj
from vmquota.store import Reader, Transaction


@dataclass(frozen=True)
class Quota:
    """One quota covering a namespace: a ResourceQuota, or the namespace's project."""

    display: str  # "compute" or "project/team-a", as refusals name it
    kind: objects.Kind
    obj: Obj
    hard: r.ResourceList
    used: r.ResourceList


def hard_of(kind: objects.Kind, obj: Obj) -> r.ResourceList:
    spec = obj.get("spec") or {}
    raw = (spec.get("resourceQuota") or {}).get("hard") if kind is objects.PROJECT else spec.get("hard")
    return r.parse(raw or {}, field="spec.hard")


def quota_of(kind: objects.Kind, obj: Obj) -> Quota:
    name = obj["metadata"]["name"]
    used = r.parse((obj.get("status") or {}).get("used") or {}, field="status.used")
    return Quota(display=f"project/{name}" if kind is objects.PROJECT else name, kind=kind, obj=obj,
                 hard=hard_of(kind, obj), used=used)


def project_of(reader: Reader, namespace: str) -> str | None:
    ns = reader.get(objects.NAMESPACE, "", namespace)
    return objects.labels(ns).get(objects.PROJECT_LABEL) if ns else None


def covering(reader: Reader, namespace: str) -> list[Quota]:
    """Every quota a charge in `namespace` counts against: its ResourceQuotas, then its project."""
    quotas = [quota_of(objects.RESOURCE_QUOTA, q) for q in reader.list(objects.RESOURCE_QUOTA, namespace)]
    project = project_of(reader, namespace)
    if project:
        obj = reader.get(objects.PROJECT, "", project)
        if obj is not None:
            quotas.append(quota_of(objects.PROJECT, obj))
    return quotas


def refusal(quota: Quota, delta: Mapping[str, Decimal]) -> str | None:
    """Kubernetes' words for why `delta` does not fit in `quota`, or None when it fits."""
    rising = [name for name in r.increased(delta) if name in quota.hard]
    if not rising:
        return None
    after = r.add(r.mask(quota.used, rising), r.mask(delta, rising))
    fits, exceeded = r.less_than_or_equal(after, quota.hard)
    if fits:
        return None
    return (f"exceeded quota: {quota.display}, requested: {r.describe(delta, exceeded)}, "
            f"used: {r.describe(quota.used, exceeded)}, limited: {r.describe(quota.hard, exceeded)}")


def admit(quotas: Iterable[Quota], delta: Mapping[str, Decimal], *, subject: str) -> None:
    """Raise QuotaExceeded naming the first quota `delta` would push over its hard limit."""
    for quota in quotas:
        message = refusal(quota, delta)
        if message:
            raise errors.QuotaExceeded(f"{subject} is forbidden: {message}", quota=quota.display)


def set_charge(txn: Transaction, namespace: str, name: str, new: r.ResourceList | None, *,
               enforce: bool, subject: str) -> r.ResourceList:
    """Make the VM `namespace/name` charge `new` (None: nothing, it is gone); returns the change.

    With `enforce`, any rise must fit every covering quota. Without it (the hypervisor already
    did it: a VM found running, a stop confirmed) the change is recorded as it is.
    """
    old = txn.charge(namespace, name) or {}
    delta = r.subtract(new or {}, old)
    if r.is_zero(delta):
        if new is not None and not old:
            txn.set_charge(namespace, name, new)
        return delta
    quotas = covering(txn, namespace)
    if enforce:
        admit(quotas, delta, subject=subject)
    for quota in quotas:
        _write_used(txn, quota, r.add(quota.used, r.mask(delta, quota.hard)))
    txn.set_charge(namespace, name, new)
    return delta


def _write_used(txn: Transaction, quota: Quota, used: r.ResourceList) -> bool:
    """Store `used` (limited to the quota's hard names) in the quota's status; False if unchanged."""
    status = quota.obj.setdefault("status", {})
    rendered_used = r.render({name: used.get(name, Decimal(0)) for name in quota.hard})
    rendered_hard = r.render(quota.hard)
    if status.get("used") == rendered_used and status.get("hard") == rendered_hard:
        return False
    status["hard"], status["used"] = rendered_hard, rendered_used
    txn.update(quota.kind, quota.obj)
    return True


def namespace_usage(reader: Reader, namespace: str) -> r.ResourceList:
    """The sum of every charge in a namespace, from the ledger."""
    total: r.ResourceList = {}
    for _, _, charge in reader.charges(namespace):
        total = r.add(total, charge)
    return total


def all_usage(reader: Reader) -> dict[str, r.ResourceList]:
    """Per namespace, the sum of every charge in it: one pass over the ledger."""
    totals: dict[str, dict[str, Decimal]] = defaultdict(dict)
    for namespace, charge, count in reader.charge_groups():  # n equal charges: one decode, one exact product
        total = totals[namespace]
        for resource, value in charge.items():
            total[resource] = total.get(resource, Decimal(0)) + value * count
    return totals


def membership(reader: Reader) -> dict[str, list[str]]:
    """Every project's namespaces, in one pass over the namespaces."""
    namespaces_of: dict[str, list[str]] = defaultdict(list)
    for ns in reader.list(objects.NAMESPACE):
        project = objects.labels(ns).get(objects.PROJECT_LABEL)
        if project:
            namespaces_of[project].append(ns["metadata"]["name"])
    return namespaces_of


def members(reader: Reader, project: str) -> list[str]:
    return membership(reader).get(project, [])


def project_usage(reader: Reader, project: str) -> r.ResourceList:
    """The sum over the project's namespaces, from the ledger."""
    total: r.ResourceList = {}
    for namespace in members(reader, project):
        total = r.add(total, namespace_usage(reader, namespace))
    return total


def refresh(txn: Transaction, kind: objects.Kind, obj: Obj) -> Obj:
    """Recompute one quota's status from the ledger, after its hard limits changed."""
    name = obj["metadata"]["name"]
    if kind is objects.PROJECT:
        usage = project_usage(txn, name)
    else:
        usage = namespace_usage(txn, obj["metadata"]["namespace"])
    quota = quota_of(kind, obj)
    _write_used(txn, quota, usage)
    return quota.obj


def recount(txn: Transaction) -> list[str]:
    """Rebuild every quota's and project's used from the ledger; returns the quotas that had drifted."""
    usage = all_usage(txn)
    drifted = []
    for quota_obj in txn.list(objects.RESOURCE_QUOTA):
        quota = quota_of(objects.RESOURCE_QUOTA, quota_obj)
        if _write_used(txn, quota, usage.get(quota_obj["metadata"]["namespace"], {})):
            drifted.append(f"{quota_obj['metadata']['namespace']}/{quota.display}")
    namespaces_of = membership(txn)  # one pass over the namespaces, not one per project
    for project_obj in txn.list(objects.PROJECT):
        quota = quota_of(objects.PROJECT, project_obj)
        total: r.ResourceList = {}
        for namespace in namespaces_of.get(quota.obj["metadata"]["name"], []):
            total = r.add(total, usage.get(namespace, {}))
        if _write_used(txn, quota, total):
            drifted.append(quota.display)
    return drifted

