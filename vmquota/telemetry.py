"""The server's own measurements: request latency, recount duration, the hypervisor's reachability.

Bottom layer: instruments of `prometheus_client`, which the API server (`apiserver/metrics.py`) exposes
beside what it reads from the store at scrape time. Several API processes serve one server, and a scrape
reaches any one of them: with `PROMETHEUS_MULTIPROC_DIR` set (`vmquota serve` sets it, before anything imports
this module, to a fresh folder of its own under `<data-dir>/metrics`) every process writes its values to a
file there, and a scrape sums them all (`prometheus_client.multiprocess`). Without it (a server in one
process, as the tests run it in-process), the values live in this process's default registry.
"""

from __future__ import annotations

import os

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

# A `_created` series beside every counter doubles what a scrape carries, and nothing here reads it.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

# kube-apiserver's names and buckets, so its dashboards' latency panels work on vmquota too.
REQUEST_SECONDS = Histogram(
    "apiserver_request_duration_seconds",
    "Response latency distribution in seconds for each verb, group, resource, subresource and scope.",
    ["verb", "group", "resource", "subresource", "scope"],
    buckets=(0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60))
REQUESTS = Counter(
    "apiserver_request", "Counter of apiserver requests broken out for each verb, group, resource, scope and "
    "HTTP response code.", ["verb", "group", "resource", "subresource", "scope", "code"])
RECOUNT_SECONDS = Histogram(
    "vmquota_recount_duration_seconds", "How long a full recount (every VM against the hypervisor, every quota's "
    "used from the ledger) took.", buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
RECOUNT_CORRECTIONS = Counter(
    "vmquota_recount_corrections", "Quotas and projects whose stored used a recount found drifted and corrected.")
HYPERVISOR_UP = Gauge(
    "vmquota_hypervisor_up", "1 when the hypervisor answered the controller's last call, else 0.", ["uri"],
    multiprocess_mode="max")  # only the controller's process sets it


def multiprocess_folder() -> str | None:
    return os.environ.get(MULTIPROCESS_ENV) or None
