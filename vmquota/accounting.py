"""Charges, admission and recounts: how VM charges become every quota's `status.used`.

Middle layer. Every change of what a VM charges goes through `set_charge`, inside
a store transaction, so the ledger (`charges` table) and the `used` of every quota
that covers the VM's namespace (its ResourceQuotas and its Project) change together.
With `enforce=True` a rise is admitted first against every one of those quotas:
if any refuses, `QuotaExceeded` propagates, the transaction rolls back and nothing
changes. The cost depends on the number of quotas, never on the number of VMs.

`recount` rebuilds every `used` from the ledger, the way a periodic full resync
corrects whatever drifted.

Every write of a quota's status here also writes a point of its usage history (`usage_points`, rolled up by
`history.py`), in the same transaction, so the history is exact at every change. Admission also decides the
two things around a charge that users see before the wall: a rise that leaves a quota above its warning
threshold (80 %, or the annotation `vmquota.io/warning-threshold`) warns the client (`warning.add`) and,
when it crosses it, writes a `QuotaNearLimit` event on the quota; a quota in audit mode (annotation
`vmquota.io/enforcement: audit`) admits past hard, and records and warns instead of refusing. A refusal is
counted (`refusals`) and reported as a `QuotaExceeded` event on the quota once its transaction has rolled
back (`recording_refusals`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from vmquota import errors, objects, quantity, warning
from vmquota import resources as r
from vmquota.objects import Obj
from vmquota.store import Reader, Store, Transaction, dumps

THRESHOLD_ANNOTATION = "vmquota.io/warning-threshold"
ENFORCEMENT_ANNOTATION = "vmquota.io/enforcement"
DEFAULT_THRESHOLD = Decimal(80)  # percent of hard, as oVirt warns by default
ENFORCE, AUDIT = "enforce", "audit"
MODES = (ENFORCE, AUDIT)

# The clock of the usage history; tests may replace it.
clock = time.time


@dataclass(frozen=True)
class Quota:
    """One quota covering a namespace: a ResourceQuota, or the namespace's project."""

    display: str  # "compute" or "project/team-a", as refusals name it
    kind: objects.Kind
    namespace: str  # "" for a project
    name: str
    hard: r.ResourceList
    used: r.ResourceList
    threshold: Decimal = DEFAULT_THRESHOLD  # percent of hard above which a rise warns
    mode: str = ENFORCE  # or AUDIT: admitted past hard, recorded and warned

    @property
    def ref(self) -> tuple[str, str, str]:
        return (self.kind.kind, self.namespace, self.name)


def threshold_of(text: str | None) -> Decimal:
    """The warning threshold an annotation sets ("90" or "90%"), else the default; ValueError if it is no
    percentage from 0 to 100."""
    if text is None:
        return DEFAULT_THRESHOLD
    try:
        value = Decimal(text.strip().removesuffix("%"))
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a percentage") from None
    if not value.is_finite() or not 0 <= value <= 100:
        raise ValueError(f"{text!r} is not a percentage from 0 to 100")
    return value


def settings_problem(obj: Obj) -> tuple[str, str] | None:
    """(annotation, why) when a quota's or project's warning threshold or enforcement mode is not valid."""
    annotations = objects.meta(obj).get("annotations") or {}
    try:
        threshold_of(annotations.get(THRESHOLD_ANNOTATION))
    except ValueError as e:
        return THRESHOLD_ANNOTATION, str(e)
    mode = annotations.get(ENFORCEMENT_ANNOTATION, ENFORCE)
    if mode not in MODES:
        return ENFORCEMENT_ANNOTATION, f"Unsupported value: {objects.quote(mode)}: supported values: " + \
            ", ".join(f'"{m}"' for m in MODES)
    return None


def hard_of(kind: objects.Kind, obj: Obj) -> r.ResourceList:
    spec = obj.get("spec") or {}
    raw = (spec.get("resourceQuota") or {}).get("hard") if kind is objects.PROJECT else spec.get("hard")
    return r.parse(raw or {}, field="spec.hard")


def _quota(kind_name: str, namespace: str, name: str, hard: str, used: str, threshold: str | None = None,
           mode: str | None = None) -> Quota:
    """A quota from its stored status (JSON text of status.hard and status.used) and settings."""
    kind = objects.PROJECT if kind_name == objects.PROJECT.kind else objects.RESOURCE_QUOTA
    try:
        percent = threshold_of(threshold)
    except ValueError:  # refused on write; an older file may still hold one
        percent = DEFAULT_THRESHOLD
    return Quota(display=f"project/{name}" if kind is objects.PROJECT else name, kind=kind, namespace=namespace,
                 name=name, hard=r.parse(json.loads(hard), field="status.hard"),
                 used=r.parse(json.loads(used), field="status.used"), threshold=percent,
                 mode=AUDIT if mode == AUDIT else ENFORCE)


def stored_quota(reader: Reader, kind: objects.Kind, namespace: str, name: str) -> Quota | None:
    status = reader.quota_status(kind, namespace, name)
    return _quota(kind.kind, namespace, name, *status) if status else None


def project_of(reader: Reader, namespace: str) -> str | None:
    ns = reader.get(objects.NAMESPACE, "", namespace)
    return objects.labels(ns).get(objects.PROJECT_LABEL) if ns else None


def covering(reader: Reader, namespace: str) -> list[Quota]:
    """Every quota a charge in `namespace` counts against: its ResourceQuotas, then its project."""
    return [_quota(*row) for row in reader.covering_statuses(namespace)]


def exceeded_by(quota: Quota, delta: Mapping[str, Decimal]) -> list[str]:
    """The resources `delta` would push over `quota`'s hard limits (only rises count)."""
    rising = [name for name in r.increased(delta) if name in quota.hard]
    if not rising:
        return []
    after = r.add(r.mask(quota.used, rising), r.mask(delta, rising))
    return r.less_than_or_equal(after, quota.hard)[1]


def refusal(quota: Quota, delta: Mapping[str, Decimal]) -> str | None:
    """Kubernetes' words for why `delta` does not fit in `quota`, or None when it fits."""
    exceeded = exceeded_by(quota, delta)
    if not exceeded:
        return None
    return (f"exceeded quota: {quota.display}, requested: {r.describe(delta, exceeded)}, "
            f"used: {r.describe(quota.used, exceeded)}, limited: {r.describe(quota.hard, exceeded)}")


def admit(quotas: Iterable[Quota], delta: Mapping[str, Decimal], *, subject: str,
          namespace: str = "") -> list[tuple[Quota, list[str], str]]:
    """Raise QuotaExceeded naming the first enforced quota `delta` would push over its hard limit.

    Returns what audit-mode quotas let past hard: (quota, exceeded resources, the refusal's words).
    """
    audited = []
    for quota in quotas:
        exceeded = exceeded_by(quota, delta)
        if not exceeded:
            continue
        message = refusal(quota, delta)
        assert message is not None
        if quota.mode == AUDIT:
            audited.append((quota, exceeded, message))
            continue
        raise errors.QuotaExceeded(f"{subject} is forbidden: {message}", quota=quota.display, namespace=namespace,
                                   resources=tuple(exceeded), quota_ref=quota.ref)
    return audited


def check_charge(txn: Transaction, namespace: str, name: str, new: r.ResourceList, *, subject: str) -> None:
    """Raise QuotaExceeded if making the VM charge `new` would be refused; writes nothing (placement asks this
    before it chooses a node, so that a quota's refusal comes first, as in Kubernetes)."""
    delta = r.subtract(new, txn.charge(namespace, name) or {})
    if r.increased(delta):
        admit(covering(txn, namespace), delta, subject=subject, namespace=namespace)


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
    audited = admit(quotas, delta, subject=subject, namespace=namespace) if enforce else []
    now = clock()
    for quota in quotas:
        change = r.mask(delta, quota.hard)
        if not r.is_zero(change):  # only used changes: its hard stays as it is stored
            used = r.add(quota.used, change)
            rendered = dumps(_rendered_used(quota.hard, used))
            txn.set_quota_used(quota.kind, quota.namespace, quota.name, rendered)
            txn.add_usage_point(quota.kind, quota.namespace, quota.name, now, dumps(r.render(quota.hard)), rendered)
            if r.increased(change):
                _warn_near_limit(txn, quota, used, namespace)
    for quota, exceeded, message in audited:
        _record_audited(txn, quota, exceeded, message, namespace, subject)
    txn.set_charge(namespace, name, new)
    return delta


# -- warnings before the wall, and refusals -------------------------------------------------------------------

def _percent(used: Decimal, hard: Decimal) -> Decimal:
    return used * 100 / hard if hard > 0 else Decimal(100 if used > 0 else 0)


def _above(quota: Quota, used: r.ResourceList) -> list[str]:
    """The resources of `quota` whose use is above its warning threshold."""
    return [name for name, hard in sorted(quota.hard.items())
            if hard > 0 and _percent(used.get(name, Decimal(0)), hard) > quota.threshold]


def _what(quota: Quota) -> str:
    return f'project "{quota.name}"' if quota.kind is objects.PROJECT else f'resourcequota "{quota.name}"'


def _warn_near_limit(txn: Transaction, quota: Quota, used: r.ResourceList, namespace: str) -> None:
    """Warn the client when its rise leaves `quota` above its threshold; an event when the rise crossed it."""
    above = _above(quota, used)
    if not above:
        return
    parts = ", ".join(f"{name}={quantity.format(used.get(name, Decimal(0)))} of {quantity.format(quota.hard[name])} "
                      f"({_percent(used.get(name, Decimal(0)), quota.hard[name]):.0f}%)" for name in above)
    text = f"{_what(quota)} is above its warning threshold of {quota.threshold:f}%: {parts}"
    warning.add(text)
    crossed = [name for name in above if name not in _above(quota, quota.used)]
    if crossed:
        quota_event(txn, quota, namespace, "Warning", "QuotaNearLimit", text)


def _record_audited(txn: Transaction, quota: Quota, exceeded: list[str], message: str, namespace: str,
                    subject: str) -> None:
    """Audit mode: what enforcing would have refused is admitted, counted, told to the client and reported."""
    day = _day(clock())
    for resource in exceeded:
        txn.count_refusal(day, namespace, quota.display, resource, AUDIT)
    text = f"{_what(quota)} is in audit mode and admitted {subject} past its hard limit: {message}"
    warning.add(text)
    quota_event(txn, quota, namespace, "Warning", "QuotaExceeded", text)


def record_refusal(txn: Transaction, refused: errors.QuotaExceeded) -> None:
    """Count an enforced refusal per resource and report it as a `QuotaExceeded` event on the quota."""
    if refused.quota_ref is None:
        return
    kind_name, quota_namespace, quota_name = refused.quota_ref
    kind = objects.BY_KIND[kind_name]
    day = _day(clock())
    for resource in refused.resources:
        txn.count_refusal(day, refused.namespace, refused.quota, resource, ENFORCE)
    if txn.exists(kind, quota_namespace, quota_name) and (not refused.namespace or
                                                          txn.exists(objects.NAMESPACE, "", refused.namespace)):
        quota = stored_quota(txn, kind, quota_namespace, quota_name)
        if quota is not None:
            quota_event(txn, quota, refused.namespace, "Warning", "QuotaExceeded", refused.message)


@contextlib.contextmanager
def recording_refusals(store: Store, *, dry_run: bool = False) -> Iterator[None]:
    """Around a write's transaction: a refusal that leaves it is recorded once it has rolled back.

    The refused transaction keeps nothing, so the count and the event are written by one of their own.
    A dry run's refusal changes nothing, so it is not recorded either.
    """
    try:
        yield
    except errors.QuotaExceeded as refused:
        if not dry_run and refused.quota_ref is not None:
            with store.transaction() as txn:
                record_refusal(txn, refused)
        raise


def quota_event(txn: Transaction, quota: Quota, namespace: str, type_: str, reason: str, message: str) -> None:
    """A Kubernetes Event about a quota: in its namespace, or for a project (cluster-scoped) in the namespace of
    the request that caused it, where that namespace's users see it."""
    kind = quota.kind
    event_namespace = quota.namespace or namespace or "default"
    stamp = objects.now()
    txn.create(objects.EVENT, {
        "metadata": {"name": f"{quota.name}.{objects.new_uid()[:13].replace('-', '')}", "namespace": event_namespace},
        "involvedObject": {"apiVersion": kind.api_version, "kind": kind.kind, "name": quota.name,
                           **({"namespace": quota.namespace} if quota.namespace else {})},
        "reason": reason, "message": message, "type": type_, "count": 1,
        "firstTimestamp": stamp, "lastTimestamp": stamp,
        "source": {"component": "vmquota"}, "reportingComponent": "vmquota",
    })


def _day(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")


def _rendered_used(hard: r.ResourceList, used: r.ResourceList) -> dict[str, str]:
    """A quota's status.used: exactly the names it limits."""
    return r.render({name: used.get(name, Decimal(0)) for name in hard})


def rendered_status(hard: r.ResourceList, used: r.ResourceList) -> Obj:
    """A quota's status as the API shows it: its hard limits, and what is used of them."""
    return {"hard": r.render(hard), "used": _rendered_used(hard, used)}


def _store_status(txn: Transaction, kind: objects.Kind, namespace: str, name: str, hard: r.ResourceList,
                  used: r.ResourceList) -> Obj:
    status = rendered_status(hard, used)
    hard_text, used_text = dumps(status["hard"]), dumps(status["used"])
    if txn.quota_status(kind, namespace, name) != (hard_text, used_text):  # the history keeps changes only
        txn.set_quota_status(kind, namespace, name, hard_text, used_text)
        txn.add_usage_point(kind, namespace, name, clock(), hard_text, used_text)
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
