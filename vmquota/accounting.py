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

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from vmquota import errors, objects
from vmquota import resources as r
from vmquota.objects import Obj
from vmquota.store import Reader, Transaction, dumps


@dataclass(frozen=True)
class Quota:
    """One quota covering a namespace: a ResourceQuota, or the namespace's project."""

    display: str  # "compute" or "project/team-a", as refusals name it
    kind: objects.Kind
    namespace: str  # "" for a project
    name: str
    hard: r.ResourceList
    used: r.ResourceList


def hard_of(kind: objects.Kind, obj: Obj) -> r.ResourceList:
    spec = obj.get("spec") or {}
    raw = (spec.get("resourceQuota") or {}).get("hard") if kind is objects.PROJECT else spec.get("hard")
    return r.parse(raw or {}, field="spec.hard")


def _quota(kind_name: str, namespace: str, name: str, hard: str, used: str) -> Quota:
    """A quota from its stored status (JSON text of status.hard and status.used)."""
    kind = objects.PROJECT if kind_name == objects.PROJECT.kind else objects.RESOURCE_QUOTA
    return Quota(display=f"project/{name}" if kind is objects.PROJECT else name, kind=kind, namespace=namespace,
                 name=name, hard=r.parse(json.loads(hard), field="status.hard"),
                 used=r.parse(json.loads(used), field="status.used"))


def stored_quota(reader: Reader, kind: objects.Kind, namespace: str, name: str) -> Quota | None:
    status = reader.quota_status(kind, namespace, name)
    return _quota(kind.kind, namespace, name, *status) if status else None


def project_of(reader: Reader, namespace: str) -> str | None:
    ns = reader.get(objects.NAMESPACE, "", namespace)
    return objects.labels(ns).get(objects.PROJECT_LABEL) if ns else None


def covering(reader: Reader, namespace: str) -> list[Quota]:
    """Every quota a charge in `namespace` counts against: its ResourceQuotas, then its project."""
    return [_quota(*row) for row in reader.covering_statuses(namespace)]


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
        change = r.mask(delta, quota.hard)
        if not r.is_zero(change):  # only used changes: its hard stays as it is stored
            txn.set_quota_used(quota.kind, quota.namespace, quota.name,
                               dumps(_rendered_used(quota.hard, r.add(quota.used, change))))
    txn.set_charge(namespace, name, new)
    return delta


def _rendered_used(hard: r.ResourceList, used: r.ResourceList) -> dict[str, str]:
    """A quota's status.used: exactly the names it limits."""
    return r.render({name: used.get(name, Decimal(0)) for name in hard})


def rendered_status(hard: r.ResourceList, used: r.ResourceList) -> Obj:
    """A quota's status as the API shows it: its hard limits, and what is used of them."""
    return {"hard": r.render(hard), "used": _rendered_used(hard, used)}


def _store_status(txn: Transaction, kind: objects.Kind, namespace: str, name: str, hard: r.ResourceList,
                  used: r.ResourceList) -> Obj:
    status = rendered_status(hard, used)
    txn.set_quota_status(kind, namespace, name, dumps(status["hard"]), dumps(status["used"]))
    return status


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
    """Recompute one quota's status from its spec and the ledger (it was created, or its limits or
    members changed); `obj` shows the new status too."""
    metadata = obj["metadata"]
    if kind is objects.PROJECT:
        usage = project_usage(txn, metadata["name"])
    else:
        usage = namespace_usage(txn, metadata["namespace"])
    obj["status"] = _store_status(txn, kind, metadata.get("namespace", "") if kind.namespaced else "",
                                  metadata["name"], hard_of(kind, obj), usage)
    return obj


def recount(txn: Transaction) -> list[str]:
    """Rebuild every quota's and project's status from its spec and the ledger; returns those whose
    stored status had drifted."""
    usage = all_usage(txn)
    stored = txn.quota_statuses()
    drifted = []

    def check(kind: objects.Kind, namespace: str, name: str, hard: r.ResourceList, used: r.ResourceList,
              display: str) -> None:
        status = rendered_status(hard, used)
        current = stored.get((kind.kind, namespace, name))
        if current is None or [json.loads(text) for text in current] != [status["hard"], status["used"]]:
            _store_status(txn, kind, namespace, name, hard, used)
            drifted.append(display)

    for quota_obj in txn.list(objects.RESOURCE_QUOTA):
        namespace, name = quota_obj["metadata"]["namespace"], quota_obj["metadata"]["name"]
        check(objects.RESOURCE_QUOTA, namespace, name, hard_of(objects.RESOURCE_QUOTA, quota_obj),
              usage.get(namespace, {}), f"{namespace}/{name}")
    namespaces_of = membership(txn)  # one pass over the namespaces, not one per project
    for project_obj in txn.list(objects.PROJECT):
        name = project_obj["metadata"]["name"]
        total: r.ResourceList = {}
        for namespace in namespaces_of.get(name, []):
            total = r.add(total, usage.get(namespace, {}))
        check(objects.PROJECT, "", name, hard_of(objects.PROJECT, project_obj), total, f"project/{name}")
    return drifted
