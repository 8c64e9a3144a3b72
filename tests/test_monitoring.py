"""monitoring/: the alert rules and the Grafana dashboard, checked by Prometheus' own tools.

`promtool check rules` and `promtool test rules` (Debian's `prometheus` package) check the rules and their unit
tests; every dashboard query is checked as PromQL; and a real Prometheus scrapes a real `vmquota serve` and
fires KubeQuotaFullyUsed when a quota fills.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port, vm_manifest, vmquota_serve, wait_until

from vmquota.client import Client

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_the_alert_rules_are_valid() -> None:
    done = promtool("check", "rules", "alerts.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 11 rules found" in done.stdout


def test_the_alert_rules_pass_their_unit_tests() -> None:
    done = promtool("test", "rules", "tests/alerts_test.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_mixin_alerts_keep_kubernetes_mixins_expressions() -> None:
    """Only the job selector differs from kubernetes-mixin's (its kubeStateMetricsSelector)."""
    rules = {r["alert"]: r for g in yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"]
             for r in g["rules"]}
    mixin = ('kube_resourcequota{job="vmquota", type="used"} / ignoring(instance, job, type) '
             '(kube_resourcequota{job="vmquota", type="hard"} > 0) ')
    for alert, tail, severity in (("KubeQuotaAlmostFull", "> 0.9 < 1", "info"), ("KubeQuotaFullyUsed", "== 1", "info"),
                                  ("KubeQuotaExceeded", "> 1", "warning")):
        assert " ".join(rules[alert]["expr"].split()) == mixin + tail
        assert rules[alert]["for"] == "15m"
        assert rules[alert]["labels"] == {"severity": severity}


def dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(queries) >= 9
    return [q.replace("$namespace", ".*") for q in queries]


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": q}
                                                         for i, q in enumerate(dashboard_queries())]}]}
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", "queries.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def _prometheus_get(url: str, path: str, **params: str) -> Any:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(params)}", timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]


def _firing(url: str, alert: str) -> list[dict[str, str]]:
    return [a["labels"] for a in _prometheus_get(url, "/api/v1/alerts")["alerts"]
            if a["labels"]["alertname"] == alert and a["state"] == "firing"]


@pytest.mark.timeout(180)
def test_a_real_prometheus_fires_the_alert_when_a_quota_fills(tmp_path: Path) -> None:
    # The shipped rules, with `for` shortened so the test need not wait fifteen minutes (promtool's unit tests
    # check the waiting).
    rules = re.sub(r"^(\s+)for: \S+$", r"\1for: 0s", (MONITORING / "alerts.yaml").read_text(), flags=re.M)
    (tmp_path / "alerts.yaml").write_text(rules)
    (tmp_path / "vmquota").mkdir()
    with vmquota_serve(tmp_path / "vmquota", processes=2) as served:
        port = free_port()
        target = served.url.removeprefix("http://")
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "alerts.yaml")],
            "scrape_configs": [{"job_name": "vmquota", "static_configs": [{"targets": [target]}]}]}))
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below, after the process
        prometheus = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            client = Client(served.url)
            client.post("/api/v1/namespaces", {"metadata": {"name": "dev"}})
            client.post("/api/v1/namespaces/dev/resourcequotas", {"metadata": {"name": "compute"},
                                                                  "spec": {"hard": {"limits.cpu": "2"}}})
            client.post("/apis/kubevirt.io/v1/namespaces/dev/virtualmachines", vm_manifest("a", cores=2, disk=None))

            def scraped() -> bool:
                try:
                    return bool(_prometheus_get(url, "/api/v1/query", query='up{job="vmquota"} == 1')["result"])
                except OSError:
                    return False
            wait_until(scraped, timeout=60, what="Prometheus to scrape vmquota")
            assert not _firing(url, "KubeQuotaFullyUsed")
            client.put("/apis/subresources.kubevirt.io/v1/namespaces/dev/virtualmachines/a/start")
            wait_until(lambda: _firing(url, "KubeQuotaFullyUsed"), timeout=60, what="KubeQuotaFullyUsed to fire")
            assert _firing(url, "KubeQuotaFullyUsed") == [{"alertname": "KubeQuotaFullyUsed", "namespace": "dev",
                                                          "resourcequota": "compute", "resource": "limits.cpu",
                                                          "severity": "info"}]
            for query in dashboard_queries():  # every panel's query runs against the real series
                _prometheus_get(url, "/api/v1/query", query=query)
            share = _prometheus_get(url, "/api/v1/query", query=dashboard_queries()[0])["result"]
            assert [(r["metric"]["namespace"], r["metric"]["resource"], r["value"][1]) for r in share] == [
                ("dev", "limits.cpu", "1")]
            client.close()
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=30)
            log.close()
