"""The web dashboard in a real browser: Playwright drives Debian's chromium headless against `vmquota serve`.

Each test runs a real `vmquota serve` on `test:///default` (conftest's `vmquota_serve`) and reads the page as a
user would, then compares it with what the API answers: the numbers on the page, a start made through the API
arriving over the watch, a start button, a refusal, and a user whom RBAC gives no start right. The page marks
itself `data-ready` once quotas and the VM table are drawn; everything after that is polled in the DOM with a
timeout of a few seconds, never timed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import (
    INSECURE_SERVE_ARGS,
    events_path,
    free_port,
    quotas_path,
    vm_manifest,
    vmquota_serve,
    vms_path,
    wait_until,
)
from playwright.sync_api import Browser, Page, Route, sync_playwright

from vmquota import kubeconfig, objects, quantity
from vmquota.apiserver import dashboard
from vmquota.client import Client, action_path

CHROMIUM = "/usr/bin/chromium"
SOON_MS = 5000  # "within a second" on an idle machine; a shared CI machine gets some slack, the DOM is polled
RBAC_V1 = "/apis/rbac.authorization.k8s.io/v1"



@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:  # a failure, not a skip: a missing install must not pass unseen
        pytest.fail("Debian's chromium is missing: scripts/bootstrap.sh (make setup) installs it")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()


def open_page(browser: Browser, url: str) -> Page:
    """The dashboard as a fresh browser tab sees it (its own sessionStorage), failing on any script error."""
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true], #login:not([hidden])", timeout=15000)
    assert not errors, errors
    return page


def ready(page: Page) -> Page:
    page.wait_for_selector("body[data-ready=true]", timeout=15000)
    return page


def percent_text(used: str, hard: str) -> str:
    """As the page (and `vmquota top`) writes a share: used / hard in whole percent."""
    limit, value = quantity.parse(hard), quantity.parse(used)
    if limit == 0:
        return "0%" if value == 0 else "\N{EN DASH}"  # full past any share
    return f"{value * 100 / limit:.0f}%"


def level_of(used: str, hard: str, threshold: Decimal) -> str:
    limit, value = quantity.parse(hard), quantity.parse(used)
    share = value * 100 / limit if limit else (Decimal(0) if value == 0 else Decimal("Infinity"))
    return "over" if share > 100 else "full" if share == 100 else "warn" if share >= threshold else "ok"


def shown_bars(page: Page, quota_id: str) -> dict[str, dict[str, str]]:
    """{resource: {used, hard, pct, level}} of one quota card, as the page shows it."""
    return page.eval_on_selector_all(f'[data-quota="{quota_id}"] .bar', """bars => Object.fromEntries(bars.map(b => [
        b.dataset.resource, {used: b.querySelector('.used').textContent, hard: b.querySelector('.hard').textContent,
                             pct: b.querySelector('.pct').textContent,
                             level: [...b.classList].find(c => c.startsWith('level-')).slice(6)}]))""")


def expected_bars(obj: dict[str, Any]) -> dict[str, dict[str, str]]:
    status = obj["status"]
    threshold = Decimal((obj["metadata"].get("annotations") or {}).get("vmquota.io/warning-threshold", "80"))
    return {name: {"used": status["used"].get(name, "0"), "hard": hard,
                   "pct": percent_text(status["used"].get(name, "0"), hard),
                   "level": level_of(status["used"].get(name, "0"), hard, threshold)}
            for name, hard in status["hard"].items()}


def vm_phase(page: Page, namespace: str, name: str) -> str | None:
    row = page.query_selector(f'tr[data-vm="{namespace}/{name}"]')
    return row.get_attribute("data-phase") if row else None


class Demo:
    """A namespace `dash-dev` of project `dash-team`, quota `compute` (audit-free) and `small` (audit mode)."""

    ns, project = "dash-dev", "dash-team"

    def __init__(self, admin: Client) -> None:
        self.admin = admin
        admin.post("/apis/vmquota.io/v1/projects", {"metadata": {"name": self.project}, "spec": {
            "resourceQuota": {"hard": {"limits.cpu": "16", "limits.memory": "32Gi"}}}})
        admin.post("/api/v1/namespaces", {"metadata": {"name": self.ns,
                                                       "labels": {objects.PROJECT_LABEL: self.project}}})
        admin.post(quotas_path(self.ns), {"metadata": {"name": "compute"}, "spec": {"hard": {
            "limits.cpu": "6", "limits.memory": "8Gi", "requests.storage": "40Gi"}}})
        admin.post(quotas_path(self.ns), {"metadata": {"name": "counts", "annotations": {
            "vmquota.io/enforcement": "audit", "vmquota.io/warning-threshold": "50"}},
            "spec": {"hard": {"count/virtualmachines.kubevirt.io": "4"}}})

    def vm(self, name: str, **kwargs: Any) -> None:
        self.admin.post(vms_path(self.ns), vm_manifest(name, **kwargs))

    def start(self, name: str) -> None:
        self.admin.put(action_path(self.ns, name, "start"), {})

    def phase(self, name: str) -> str:
        vm = self.admin.get(f"{vms_path(self.ns)}/{name}")
        return str((vm.get("status") or {}).get("printableStatus", ""))


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[str, Demo]]:
    with vmquota_serve(tmp_path) as server:
        admin = Client(server.url)
        try:
            yield server.url, Demo(admin)
        finally:
            admin.close()


def test_the_pages_numbers_equal_the_apis(browser: Browser, demo: tuple[str, Demo]) -> None:
    url, d = demo
    d.vm("web-1", cores=2, memory="2Gi", disk="5Gi")
    d.vm("web-2", cores=1, memory="1Gi", disk="5Gi")
    d.vm("db-1", cores=3, memory="4Gi", disk="20Gi")
    d.start("web-1")
    d.start("db-1")
    wait_until(lambda: d.phase("web-1") == "Running" and d.phase("db-1") == "Running", what="the VMs to run")
    page = ready(open_page(browser, url))

    quotas = d.admin.get(quotas_path(d.ns))["items"]
    project = d.admin.get(f"/apis/vmquota.io/v1/projects/{d.project}")
    assert {q["metadata"]["name"] for q in quotas} == {"compute", "counts"}
    for quota in quotas:
        assert shown_bars(page, f"{d.ns}/{quota['metadata']['name']}") == expected_bars(quota)
    assert shown_bars(page, d.project) == expected_bars(project)
    # 5 of 6 cores is past the 80 % threshold; 3 of 4 VMs past the audit quota's own 50 %, which says audit.
    assert shown_bars(page, f"{d.ns}/compute")["limits.cpu"]["level"] == "warn"
    assert page.get_attribute(f'[data-quota="{d.ns}/counts"]', "data-mode") == "audit"
    assert page.get_attribute(f'[data-quota="{d.ns}/compute"]', "data-mode") == "enforce"

    # At the limit and past it (audit mode admits lowering hard below use): red, then dark red, over the watch.
    d.admin.patch(f"{quotas_path(d.ns)}/compute", {"spec": {"hard": {"limits.cpu": "5"}}})
    d.admin.patch(f"{quotas_path(d.ns)}/counts", {"spec": {"hard": {"count/virtualmachines.kubevirt.io": "2"}}})
    for name, resource, level in (("compute", "limits.cpu", "full"), ("counts", "count/virtualmachines.kubevirt.io",
                                                                     "over")):
        page.wait_for_selector(f'[data-quota="{d.ns}/{name}"] [data-resource="{resource}"].level-{level}',
                               timeout=SOON_MS)
        quota = d.admin.get(f"{quotas_path(d.ns)}/{name}")
        assert shown_bars(page, f"{d.ns}/{name}") == expected_bars(quota)
    assert shown_bars(page, f"{d.ns}/counts")["count/virtualmachines.kubevirt.io"]["pct"] == "150%"

    vms = d.admin.get(vms_path(d.ns))["items"]
    assert page.eval_on_selector_all("#vm-rows tr", "rows => rows.map(r => [r.dataset.vm, r.dataset.phase])") == \
        sorted([f"{d.ns}/{vm['metadata']['name']}", vm["status"]["printableStatus"]] for vm in vms)

    # The VMs that use the most: those charging compute, biggest first, with the API's charges.
    charges = {c["name"]: c["charge"] for c in d.admin.get(f"/apis/vmquota.io/v1/namespaces/{d.ns}/charges")["items"]}
    page.wait_for_selector('#top-rows tr[data-vm]')
    top = page.eval_on_selector_all("#top-rows tr", """rows => rows.map(r => [r.dataset.vm, Object.fromEntries(
        [...r.querySelectorAll('td[data-resource]')].map(c => [c.dataset.resource, c.textContent]))])""")
    assert [vm for vm, _ in top] == [f"{d.ns}/db-1", f"{d.ns}/web-1"]
    for vm, shown in top:
        name = vm.split("/")[1]
        assert shown == {r: charges[name].get(r, "0") for r in shown}


def test_a_vm_started_through_the_api_shows_on_the_page_soon(browser: Browser, demo: tuple[str, Demo]) -> None:
    url, d = demo
    d.vm("web-1")
    page = ready(open_page(browser, url))
    assert vm_phase(page, d.ns, "web-1") == "Stopped"
    assert page.text_content("#live") == "live"

    d.start("web-1")
    page.wait_for_selector(f'tr[data-vm="{d.ns}/web-1"][data-phase="Running"]', timeout=SOON_MS)
    # The quota's bar follows over its own watch, to the API's numbers.
    quota = d.admin.get(f"{quotas_path(d.ns)}/compute")
    page.wait_for_function("([id, used]) => document.querySelector(`[data-quota=\"${id}\"] "
                           "[data-resource=\"limits.cpu\"] .used`)?.textContent === used",
                           arg=[f"{d.ns}/compute", quota["status"]["used"]["limits.cpu"]], timeout=SOON_MS)
    assert quota["status"]["used"]["limits.cpu"] == "2"
    project = d.admin.get(f"/apis/vmquota.io/v1/projects/{d.project}")  # read again after each VM or quota change
    page.wait_for_function("([id, used]) => document.querySelector(`[data-quota=\"${id}\"] "
                           "[data-resource=\"limits.cpu\"] .used`)?.textContent === used",
                           arg=[d.project, project["status"]["used"]["limits.cpu"]], timeout=SOON_MS)
    assert project["status"]["used"]["limits.cpu"] == "2"
    # A VM created meanwhile joins the table.
    d.vm("web-2")
    page.wait_for_selector(f'tr[data-vm="{d.ns}/web-2"]', timeout=SOON_MS)


def test_a_burst_of_new_vms_reaches_the_table_sorted(browser: Browser, demo: tuple[str, Demo]) -> None:
    url, d = demo
    d.vm("m-00", disk=None)
    page = ready(open_page(browser, url))
    for i in range(30, 0, -1):  # made in reverse order; the table is sorted by namespace/name
        d.vm(f"m-{i:02d}", disk=None)
    wanted = sorted(f"{d.ns}/{vm['metadata']['name']}" for vm in d.admin.get(vms_path(d.ns))["items"])
    page.wait_for_function("n => document.querySelectorAll('#vm-rows tr').length === n", arg=len(wanted),
                           timeout=SOON_MS)
    assert page.eval_on_selector_all("#vm-rows tr", "rows => rows.map(r => r.dataset.vm)") == wanted
    assert page.text_content("#vm-count") == "31"


def test_a_start_button_starts_the_vm_and_a_stop_button_stops_it(browser: Browser, demo: tuple[str, Demo]) -> None:
    url, d = demo
    d.vm("web-1")
    page = ready(open_page(browser, url))
    page.click(f'tr[data-vm="{d.ns}/web-1"] button[data-action=start]')
    wait_until(lambda: d.phase("web-1") == "Running", what="the button's start")
    page.wait_for_selector(f'tr[data-vm="{d.ns}/web-1"][data-phase="Running"]', timeout=SOON_MS)
    started = [e for e in d.admin.get(events_path(d.ns))["items"] if e["reason"] == "StartRequested"]
    assert len(started) == 1

    # A start that leaves the quota above its warning threshold says so, with the server's Warning header.
    d.vm("web-2", cores=3)  # 2 + 3 of 6 cores: 83 %, above compute's 80 %
    page.wait_for_selector(f'tr[data-vm="{d.ns}/web-2"] button[data-action=start]', timeout=SOON_MS)
    page.click(f'tr[data-vm="{d.ns}/web-2"] button[data-action=start]')
    warned = page.wait_for_selector("#toast .toast.warn", timeout=SOON_MS)
    assert warned is not None
    assert 'resourcequota "compute" is above its warning threshold of 80%' in warned.text_content()
    assert "limits.cpu=5 of 6" in warned.text_content()

    page.click(f'tr[data-vm="{d.ns}/web-1"] button[data-action=stop]')
    wait_until(lambda: d.phase("web-1") == "Stopped", what="the button's stop")
    page.wait_for_selector(f'tr[data-vm="{d.ns}/web-1"][data-phase="Stopped"]', timeout=SOON_MS)


def test_a_refusal_is_shown_with_the_quotas_message(browser: Browser, demo: tuple[str, Demo]) -> None:
    url, d = demo
    d.vm("big", cores=8, memory="2Gi")  # 8 cores against compute's 6
    page = ready(open_page(browser, url))
    page.click(f'tr[data-vm="{d.ns}/big"] button[data-action=start]')
    # What the press answered, word for word as the API refuses, and the QuotaExceeded event over the watch.
    refused = page.wait_for_selector("#last-refusals li", timeout=SOON_MS)
    assert refused is not None
    assert "exceeded quota: compute, requested: limits.cpu=8, used: limits.cpu=0, limited: limits.cpu=6" in \
        refused.text_content()
    page.wait_for_selector("#refusal-rows tr[data-reason=QuotaExceeded]", timeout=SOON_MS)
    events = [e for e in d.admin.get(events_path(d.ns))["items"] if e["reason"] == "QuotaExceeded"]
    assert page.eval_on_selector_all("#refusal-rows tr .message", "cells => cells.map(c => c.textContent)") == \
        [e["message"] for e in events]
    assert page.text_content("#refusal-count") == str(len(events))
    # The quota's history counts it, as the history API does.
    page.select_option("#history-of", f"quota:{d.ns}/compute")
    page.wait_for_selector("#history-note[data-refused='1']", timeout=SOON_MS)
    days = d.admin.get(f"/apis/vmquota.io/v1/namespaces/{d.ns}/resourcequotas/compute/history")["refusalsPerDay"]
    assert sum(day["refused"] for day in days) == 1
    assert d.phase("big") == "Stopped"  # a refusal changes nothing
    assert page.get_attribute(f'tr[data-vm="{d.ns}/big"]', "data-phase") == "Stopped"


def test_the_page_loads_nothing_from_elsewhere_and_runs_under_its_csp(browser: Browser,
                                                                     demo: tuple[str, Demo]) -> None:
    url, d = demo
    d.vm("web-1")
    context = browser.new_context()
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    response = page.goto(url + "/")
    assert response is not None
    assert response.headers["content-security-policy"] == dashboard.CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    ready(page)
    page.wait_for_selector("#chart canvas", timeout=SOON_MS)  # uPlot, from the package, drew the history
    assert requested and all(u.startswith(url + "/") or u.startswith("data:") for u in requested), requested
    assert not violations, violations
    context.close()


# -- a secure server: tokens and RBAC ------------------------------------------------------------------------

@pytest.fixture
def secure(tmp_path: Path) -> Iterator[tuple[str, Client]]:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text('token-of-vera,vera,2001\ntoken-of-eddie,eddie,2002\n')
    with vmquota_serve(tmp_path, secure=True, args=("--token-auth-file", str(tokens))) as server:
        admin = Client(kubeconfig.load([server.kubeconfig]))
        try:
            Demo(admin)
            admin.post(vms_path(Demo.ns), vm_manifest("web-1"))
            for user, role in (("vera", "view"), ("eddie", "edit")):
                admin.post(f"{RBAC_V1}/namespaces/{Demo.ns}/rolebindings", {
                    "metadata": {"name": f"{role}-{user}"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                    "subjects": [{"kind": "User", "name": user}]})
            yield server.url, admin
        finally:
            admin.close()


def sign_in(page: Page, token: str) -> Page:
    page.wait_for_selector("#login:not([hidden])")
    page.fill("#token", token)
    page.click("#login button[type=submit]")
    return ready(page)


def test_a_user_without_rights_sees_the_vms_but_no_start_button(browser: Browser,
                                                                secure: tuple[str, Client]) -> None:
    url, admin = secure
    page = open_page(browser, url)
    # No credentials: the page loads (it holds no data), the API refuses it, and the page asks for a token.
    assert page.is_visible("#login") and not page.is_visible("#main")
    sign_in(page, "token-of-vera")
    assert page.text_content("#who") == "signed in as vera"
    assert vm_phase(page, Demo.ns, "web-1") == "Stopped"
    assert page.query_selector_all("#vm-rows button") == []
    # Her quotas' history is hers to read (the view role holds resourcequotas/history), her project's is not: the
    # chart moves on to the first quota and offers the project no more.
    page.wait_for_selector("#chart canvas", timeout=SOON_MS)
    assert page.input_value("#history-of") == f"quota:{Demo.ns}/compute"
    assert page.is_disabled(f'#history-of option[value="project:{Demo.project}"]')
    quota = admin.get(f"{quotas_path(Demo.ns)}/compute")
    assert shown_bars(page, f"{Demo.ns}/compute") == expected_bars(quota)
    # The token stays in this tab's sessionStorage, never in the URL.
    assert "token-of-vera" not in page.url
    assert page.evaluate("sessionStorage.getItem('vmquota.token')") == "token-of-vera"

    editor = open_page(browser, url)
    sign_in(editor, "token-of-eddie")
    editor.click(f'tr[data-vm="{Demo.ns}/web-1"] button[data-action=start]')
    editor.wait_for_selector(f'tr[data-vm="{Demo.ns}/web-1"][data-phase="Running"]', timeout=SOON_MS)
    # Vera's page follows the start over her own watch.
    page.wait_for_selector(f'tr[data-vm="{Demo.ns}/web-1"][data-phase="Running"]', timeout=SOON_MS)


def test_a_refused_token_asks_again_and_the_api_stays_closed(browser: Browser, secure: tuple[str, Client]) -> None:
    url, _ = secure
    page = open_page(browser, url)
    page.fill("#token", "not-a-token")
    page.click("#login button[type=submit]")
    page.wait_for_selector("#login:not([hidden])")
    page.wait_for_function("document.getElementById('login-error').textContent.length > 0")
    assert page.text_content("#login-error") == "That token was refused."
    assert not page.is_visible("#main")


@contextlib.contextmanager
def tls_watch(url: str, ca_pem: str, token: str, path: str) -> Iterator[list[dict[str, Any]]]:
    """The events of one watch over TLS as a bearer-token user, gathered by a thread until the block ends."""
    parts = urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=30,
                                       context=ssl.create_default_context(cadata=ca_pem))
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    assert response.status == 200
    events: list[dict[str, Any]] = []

    def read() -> None:
        try:
            for line in response:
                events.append(json.loads(line))
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            pass  # the connection closed under it at the end of the block

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield events
    finally:
        conn.sock.shutdown(socket.SHUT_RDWR) if conn.sock else None
        conn.close()
        reader.join(timeout=5)


def test_a_watch_over_tls_gets_live_changes(secure: tuple[str, Client], tmp_path: Path) -> None:
    """The feed writes a live watch's events from its own thread (`http._Wire.send_now`): over TLS too, where
    the page's watches go (the feed's thread once died on its first TLS watcher, and every watch went silent)."""
    url, admin = secure
    ca_pem = kubeconfig.load([tmp_path / "data" / "admin.kubeconfig"]).ca_pem
    assert ca_pem
    rv = admin.get(vms_path(Demo.ns))["metadata"]["resourceVersion"]
    with tls_watch(url, ca_pem, "token-of-eddie", f"{vms_path(Demo.ns)}?watch=true&resourceVersion={rv}") as events:
        admin.put(action_path(Demo.ns, "web-1", "start"), {})
        seen = wait_until(lambda: [e for e in events if (e["object"].get("status") or {}).get("printableStatus")
                                   == "Running"], what="the start over the TLS watch")
    assert seen[0]["type"] == "MODIFIED"


# -- the watch: 410 Gone relists, a closed stream resumes ---------------------------------------------------

def test_a_watch_answered_410_gone_relists_and_follows_on(browser: Browser, demo: tuple[str, Demo]) -> None:
    """The server answers a watch from a resourceVersion its log no longer holds with Kubernetes' ERROR event
    (code 410). The page's first VM watch gets exactly that, after a VM was made behind its list: the page
    must list again (so the VM shows) and watch on from the new list."""
    url, d = demo
    d.vm("web-1")
    context = browser.new_context()
    page = context.new_page()
    answered: list[str] = []

    def expire_first_watch(route: Route) -> None:
        if answered:
            route.continue_()
            return
        d.vm("made-meanwhile")  # not in the list the page holds, and no watch event will tell it
        rv = route.request.url.rpartition("resourceVersion=")[2]
        answered.append(rv)
        gone = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": f"too old resource version: {rv} (1)", "reason": "Expired", "code": 410}
        route.fulfill(status=200, content_type="application/json",
                      body=json.dumps({"type": "ERROR", "object": gone}) + "\n")

    page.route("**/apis/kubevirt.io/v1/virtualmachines?watch=true*", expire_first_watch)
    page.goto(url + "/")
    ready(page)
    page.wait_for_selector(f'tr[data-vm="{d.ns}/made-meanwhile"]', timeout=SOON_MS)
    assert answered
    d.start("web-1")  # and the watch after the relist follows
    page.wait_for_selector(f'tr[data-vm="{d.ns}/web-1"][data-phase="Running"]', timeout=SOON_MS)
    context.close()


def serving_count(log: Path) -> int:
    return log.read_bytes().count(b"vmquota serving on") if log.exists() else 0


def serve_on(port: int, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    """`vmquota serve` on a port of the test's choosing (conftest's picks its own), plain HTTP as there."""
    before = serving_count(log)
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "vmquota", "serve", "--hypervisor", "test:///default",
                                    "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}",
                                    "--api-processes", "1", *INSECURE_SERVE_ARGS], stderr=out)
    wait_until(lambda: serving_count(log) > before or process.poll() is not None, timeout=30,
               what="the server to say it serves")
    assert process.poll() is None, log.read_text()
    return process


def test_the_page_resumes_its_watches_when_the_server_comes_back(browser: Browser, tmp_path: Path) -> None:
    """A watch stream that ends (here: the server stopped and started again on its data directory) is opened
    again from the last resourceVersion the page saw; what changed meanwhile, and after, reaches the page."""
    port, data_dir, log = free_port(), tmp_path / "data", tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    first = serve_on(port, data_dir, log)
    try:
        admin = Client(url)
        d = Demo(admin)
        d.vm("web-1")
        page = ready(open_page(browser, url))
        assert page.text_content("#live") == "live"
        admin.close()
    finally:
        first.terminate()
        first.wait(timeout=30)
    page.wait_for_selector("#live.off", timeout=SOON_MS)  # it noticed, and retries

    second = serve_on(port, data_dir, log)
    try:
        admin = Client(url)
        d = Demo.__new__(Demo)  # the objects exist already: only its helpers
        d.admin = admin
        d.vm("web-2")
        d.start("web-1")
        page.wait_for_selector(f'tr[data-vm="{d.ns}/web-2"]', timeout=15000)  # retries back off up to 5 s
        page.wait_for_selector(f'tr[data-vm="{d.ns}/web-1"][data-phase="Running"]', timeout=SOON_MS)
        assert page.text_content("#live") == "live"
        admin.close()
    finally:
        page.context.close()
        second.terminate()
        second.wait(timeout=30)


def test_the_files_are_public_and_the_data_is_not(secure: tuple[str, Client], tmp_path: Path) -> None:
    """Without credentials, a secure server serves the page's files (they hold no data) and refuses the API,
    as kube-apiserver refuses it; a file the browser holds already is a 304."""
    url, _ = secure
    ca_pem = kubeconfig.load([tmp_path / "data" / "admin.kubeconfig"]).ca_pem
    assert ca_pem
    parts = urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=30,
                                       context=ssl.create_default_context(cadata=ca_pem))
    try:
        def get(path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            response.read()
            return response

        for path in sorted(dashboard.PATHS):
            response = get(path)
            assert response.status == 200, path
            assert response.headers["Content-Security-Policy"] == dashboard.CONTENT_SECURITY_POLICY
        assert get("/").headers["Content-Type"] == "text/html; charset=utf-8"
        assert get("/ui/app.js").headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert get("/ui/app.js", {"If-None-Match": get("/ui/app.js").headers["ETag"]}).status == 304
        assert get("/ui/../api/v1/namespaces").status == 401
        assert get("/ui/nothing.js").status == 401  # not a file of the page: authenticated like any path
        assert get(vms_path(Demo.ns)).status == 401
    finally:
        conn.close()
