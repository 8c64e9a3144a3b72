"""`GET /metrics`: Prometheus' text format, read from the store at scrape time.

Top layer, beside the handlers. Nothing is counted per change for it: every scrape reads the small tables the
store keeps anyway (`quota_status`, `quota_settings`, `refusals`) and the `vm_metrics` index, through a custom
collector of `prometheus_client`, and adds the process measurements of `vmquota.telemetry` (summed over every
API process when there are several).

    kube_resourcequota{namespace,resourcequota,resource,type}   as kube-state-metrics names and values it (base
    kube_resourcequota_created{namespace,resourcequota}         units: cores, bytes), so kubernetes-mixin works
    vmquota_project_quota{project,resource,type}                a project's hard and used, likewise
    vmquota_quota_warning_threshold_ratio{namespace,quota}      the per-quota warning threshold, 0.8 by default
    vmquota_quota_enforcement{namespace,quota,mode}             1 for the mode each quota is in (enforce, audit)
    vmquota_admission_refusals_total{namespace,quota,resource}  refused admissions, counted in the store
    vmquota_admission_audited_total{namespace,quota,resource}   what audit mode admitted past hard
    kubevirt_vm_info, kubevirt_vm_resource_requests, kubevirt_vm_resource_limits,
    kubevirt_vm_create_date_timestamp_seconds                   KubeVirt's per-VM names and labels

The per-VM families are written by SQLite, not through `prometheus_client`'s samples: at 100,000 VMs they are
about half a million lines; the library's generic path took 3.2 s for 300,000 of them, and a loop of Python
f-strings 0.6 to 1 s for all, where SQLite's string concatenation takes a fraction of that (VM names and
namespaces are DNS labels, which need no escaping).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from decimal import Decimal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector
from prometheus_client.utils import floatToGoString as _go_float

from vmquota import accounting, quantity, telemetry
from vmquota import resources as r
from vmquota.store import Reader, Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NONE = "<none>"  # KubeVirt's value for a label it has nothing for

# KubeVirt's status groups of printableStatus (virt-controller's vmstats collector).
_STATUS_GROUPS = {
    "Provisioning": "starting", "Starting": "starting", "WaitingForVolumeBinding": "starting",
    "Running": "running", "Migrating": "migrating",
    "Stopped": "non_running", "Paused": "non_running", "Stopping": "non_running", "Terminating": "non_running",
    "CrashLoopBackOff": "error", "Unknown": "error", "ErrorUnschedulable": "error", "ErrImagePull": "error",
    "ImagePullBackOff": "error", "ErrorPvcNotFound": "error", "DataVolumeError": "error",
}


def float_text(value: float) -> str:
    """A sample's value as Prometheus' own Go code writes it (the library's formatter)."""
    return str(_go_float(value))  # type: ignore[no-untyped-call]


def ksm_value(value: Decimal) -> float:
    """A quantity as kube-state-metrics exports it: its milli-value over 1000 (cores, bytes)."""
    return float(value.scaleb(3).to_integral_value(rounding="ROUND_CEILING").scaleb(-3))


class StoreCollector(Collector):
    """Quotas, projects, settings and refusals, read from the store when Prometheus scrapes."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader

    def collect(self) -> Iterable[Metric]:
        quota = GaugeMetricFamily("kube_resourcequota", "Information about resource quota.",
                                  labels=["namespace", "resourcequota", "resource", "type"])
        created = GaugeMetricFamily("kube_resourcequota_created", "Unix creation timestamp",
                                    labels=["namespace", "resourcequota"])
        project = GaugeMetricFamily("vmquota_project_quota", "A project's aggregate quota over its namespaces: "
                                    "hard and used per resource.", labels=["project", "resource", "type"])
        threshold = GaugeMetricFamily("vmquota_quota_warning_threshold_ratio", "The share of hard above which a "
                                      "rise warns (annotation vmquota.io/warning-threshold).",
                                      labels=["namespace", "quota"])
        mode = GaugeMetricFamily("vmquota_quota_enforcement", "1 for the enforcement mode of each quota: enforce "
                                 "refuses past hard, audit admits, records and warns.",
                                 labels=["namespace", "quota", "mode"])
        for (kind, namespace, name, created_at, hard_text, used_text, threshold_text,
             quota_mode) in self.reader.quota_rows():
            hard, used = _decoded(hard_text), _decoded(used_text)
            is_project = kind == "Project"
            display = f"project/{name}" if is_project else name
            for resource, value in sorted(hard.items()):
                if is_project:
                    project.add_metric([name, resource, "hard"], ksm_value(value))
                else:
                    quota.add_metric([namespace, name, resource, "hard"], ksm_value(value))
            for resource, value in sorted(used.items()):
                if is_project:
                    project.add_metric([name, resource, "used"], ksm_value(value))
                else:
                    quota.add_metric([namespace, name, resource, "used"], ksm_value(value))
            if not is_project and created_at is not None:
                created.add_metric([namespace, name], float(created_at))
            threshold.add_metric([namespace, display], float(_threshold(threshold_text)) / 100)
            mode.add_metric([namespace, display, accounting.AUDIT if quota_mode == accounting.AUDIT
                             else accounting.ENFORCE], 1.0)
        refused = CounterMetricFamily("vmquota_admission_refusals", "Admissions refused by a quota, per resource "
                                      "it would have pushed over hard.", labels=["namespace", "quota", "resource"])
        audited = CounterMetricFamily("vmquota_admission_audited", "Admissions a quota in audit mode let past hard, "
                                      "per resource.", labels=["namespace", "quota", "resource"])
        for namespace, quota_name, resource, refusal_mode, count in self.reader.refusal_totals():
            family = audited if refusal_mode == accounting.AUDIT else refused
            family.add_metric([namespace, quota_name, resource], float(count))
        yield from (quota, created, project, threshold, mode, refused, audited)



def _threshold(text: str | None) -> Decimal:
    try:
        return accounting.threshold_of(text)
    except ValueError:  # refused on write; an older file may hold one
        return accounting.DEFAULT_THRESHOLD


@functools.lru_cache(maxsize=4096)
def _decoded(text: str) -> dict[str, Decimal]:
    value = json.loads(text)
    return r.parse(value if isinstance(value, dict) else {}, field="status")


# -- per-VM families, KubeVirt's names ----------------------------------------------------------------------

_VM = """'{name="' || v.name || '",namespace="' || v.namespace || '"'"""


@functools.lru_cache(maxsize=4096)
def _number(raw: str) -> str | None:
    """A quantity from a VM's spec as the text of a float, or None when it is none (or zero)."""
    try:
        value = quantity.parse(raw)
    except (quantity.QuantityError, TypeError):
        return None
    return float_text(ksm_value(value)) if value else None


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _case(expression: str, mapping: dict[str, str]) -> str:
    """SQL for `mapping[expression]`, NULL when it has no such key: a CASE of literals, which SQLite evaluates
    far faster per row than a lookup in a JSON object."""
    if not mapping:
        return "NULL"
    whens = " ".join(f"WHEN {_sql_text(key)} THEN {_sql_text(value)}" for key, value in sorted(mapping.items()))
    return f"(CASE {expression} {whens} END)"


def _sample(family: str, labels: str, value: str, where: str = "1") -> str:
    """A SELECT of one line per VM, `family{name="..",namespace=".."<labels>} <value>`; `labels` and `value`
    are SQL expressions (text)."""
    return (f"SELECT '{family}' || {_VM} || {labels} || '}} ' || {value} || char(10) AS line "
            f"FROM vm_metrics AS v WHERE {where}")


_NO_CPU = "v.cores IS NULL AND v.sockets IS NULL AND v.threads IS NULL AND v.requests_cpu IS NULL"
_REQUESTS = "kubevirt_vm_resource_requests"
_LIMITS = "kubevirt_vm_resource_limits"
_CREATED = "kubevirt_vm_create_date_timestamp_seconds"
# (family, column, labels): one line per VM whose column holds a non-zero quantity.
_QUANTITIES = (
    (_REQUESTS, "requests_memory", ',resource="memory",unit="bytes",source="domain"'),
    (_REQUESTS, "guest_memory", ',resource="memory",unit="bytes",source="guest"'),
    (_REQUESTS, "cores", ',resource="cpu",unit="cores",source="domain"'),
    (_REQUESTS, "threads", ',resource="cpu",unit="threads",source="domain"'),
    (_REQUESTS, "sockets", ',resource="cpu",unit="sockets",source="domain"'),
    (_REQUESTS, "requests_cpu", ',resource="cpu",unit="cores",source="requests"'),
    (_LIMITS, "limits_memory", ',resource="memory",unit="bytes"'),
    (_LIMITS, "limits_cpu", ',resource="cpu",unit="cores"'),
)
_HELP = {
    "kubevirt_vm_info": "Information about Virtual Machines.",
    _REQUESTS: "Resources requested by Virtual Machine. Reports memory and CPU requests.",
    _LIMITS: "Resources limits by Virtual Machine. Reports memory and CPU limits.",
    _CREATED: "Virtual Machine creation timestamp.",
}


def _selects(reader: Reader) -> dict[str, list[str]]:
    """Per family, the SELECTs of its lines. Quantities are converted here once per distinct text (VMs come in
    few sizes), and machine types escaped as label values, so that SQLite only looks them up."""
    values = reader.vm_metric_values(("machine_type", *(column for _, column, _ in _QUANTITIES)))
    machines = {text: _label_value(text) for text in values["machine_type"]}
    info_labels = (f"""',os="{NONE}",workload="{NONE}",flavor="{NONE}",machine_type="' || """
                   f"""coalesce({_case("v.machine_type", machines)}, '{NONE}') || '",instance_type="{NONE}",'"""
                   f""" || 'preference="{NONE}",status="' || lower(coalesce(v.status, '')) || '",status_group="' """
                   f"""|| coalesce({_case("v.status", _STATUS_GROUPS)}, '<unknown>') || '"'""")
    selects: dict[str, list[str]] = {"kubevirt_vm_info": [_sample("kubevirt_vm_info", info_labels, "'1.0'")],
                                     _REQUESTS: [], _LIMITS: []}
    for family, column, labels in _QUANTITIES:
        numbers = {text: value for text in values[column] if (value := _number(text)) is not None}
        if numbers:
            value = _case(f"CAST(v.{column} AS TEXT)", numbers)
            selects[family].append(_sample(family, _sql_text(labels), value, where=f"{value} IS NOT NULL"))
    # KubeVirt's default when a VM asks for no CPU at all: one core, one thread, one socket.
    selects[_REQUESTS] += [_sample(_REQUESTS, _sql_text(f',resource="cpu",unit="{unit}",source="default"'), "'1.0'",
                                   where=_NO_CPU) for unit in ("cores", "threads", "sockets")]
    selects[_CREATED] = [_sample(_CREATED, "''", "printf('%.1f', v.created)", where="v.created IS NOT NULL")]
    return selects


def vm_families(reader: Reader) -> Iterator[str]:
    """The text of KubeVirt's per-VM families, one chunk per family, written by SQLite."""
    for family, selects in _selects(reader).items():
        lines = reader.vm_metric_text(" UNION ALL ".join(selects), {}) if selects else ""
        if lines:
            yield f"# HELP {family} {_HELP[family]}\n# TYPE {family} gauge\n{lines}"


# -- the scrape ---------------------------------------------------------------------------------------------

def _process_registry() -> CollectorRegistry:
    """The process measurements: every API process's, summed, when they share a folder; else this one's."""
    folder = telemetry.multiprocess_folder()
    if folder is None:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    return registry


def scrape(store: Store) -> bytes:
    """The whole exposition: the store's families read in one snapshot, then the process measurements."""
    reader = store.reader()
    with reader.snapshot():
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StoreCollector(reader))
        head = generate_latest(registry)
        vms = "".join(vm_families(reader)).encode()
    return head + vms + generate_latest(_process_registry())
