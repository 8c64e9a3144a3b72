"""Section "dashboard": the web dashboard's first paint on 1,000 VMs, against the same lists fetched and parsed
without rendering, in the same run and the same browser.

A `vmquota serve` process (one API process, `test:///default`, plain HTTP) over a store filled with 1,000 VMs in
10 namespaces of one project, each namespace with its quota; 20 of the VMs are then started through the API, so
the page has charges, events and a top list to show. Headless Chromium (Debian's, driven by Playwright) opens the
page in a fresh context each round (an empty cache: the page's files are fetched too) and reads the page's own
mark `vmquota-first-paint`, set in the frame after the quotas and the VM table are in the DOM, as milliseconds
since the navigation started.

The baseline, in a fresh context of the same browser on a page of the same origin, makes the requests the page
makes before its first paint (who am I, the namespaces, quotas, VMs, events and projects at once, then one
SelfSubjectAccessReview for start and one for stop per namespace), reads and parses every answer, and renders
nothing. The ratio is then what loading the page's files and building the DOM adds to fetching the data.
Rounds alternate which comes first.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import Row, SectionResult, ServerProcess, fill, fmt_ms, median, new_store, progress, recount
from vmquota.client import Client, action_path
from vmquota.vmstatus import Phase

CHROMIUM = "/usr/bin/chromium"
TARGET_MS = 1000.0  # a page of 1,000 VMs should be usable within a second on the 2-core machine
PROJECT = "bench"

# The page's own requests before its first paint, made and parsed without rendering.
FETCH_ONLY = """async (namespaces) => {
  const started = performance.now();
  const get = async (path, init) => { const r = await fetch(path, init); return JSON.parse(await r.text()); };
  const post = (path, body) => get(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)});
  await Promise.all([
    post("/apis/authentication.k8s.io/v1/selfsubjectreviews",
         {apiVersion: "authentication.k8s.io/v1", kind: "SelfSubjectReview"}),
    ...["/apis/vmquota.io/v1/projects", "/api/v1/namespaces", "/api/v1/resourcequotas",
        "/apis/kubevirt.io/v1/virtualmachines", "/api/v1/events"].map((p) => get(p))]);
  await Promise.all(namespaces.flatMap((ns) => ["start", "stop"].map((sub) =>
    post("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", {apiVersion: "authorization.k8s.io/v1",
      kind: "SelfSubjectAccessReview", spec: {resourceAttributes: {verb: "update", group: "subresources.kubevirt.io",
      resource: "virtualmachines", subresource: sub, namespace: ns}}}))));
  return performance.now() - started;
}"""
# After the mark: when the last API answer of the first paint ended (charges and history are asked for after it),
# so that building the DOM shows apart.
LAST_ANSWER = """() => {
  const mark = performance.getEntriesByName('vmquota-first-paint')[0].startTime;
  const api = performance.getEntriesByType('resource').filter(e => e.name.includes('/api') &&
    !e.name.includes('/charges') && !e.name.includes('/history') && e.responseEnd < mark);
  return Math.max(...api.map(e => e.responseEnd));
}"""


def _first_paint_ms(browser: object, url: str, vms: int) -> tuple[float, float, float]:
    """(ms from navigation start to the page's first-paint mark, ms the page's script took to it, ms from the
    last API answer before the mark to the mark: building the DOM)."""
    context = browser.new_context()  # type: ignore[attr-defined]
    try:
        page = context.new_page()
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready=true]", timeout=60_000)
        rows = page.eval_on_selector_all("#vm-rows tr", "rows => rows.length")
        if rows != vms:
            raise RuntimeError(f"the page shows {rows} VMs, not {vms}")
        mark = page.evaluate("performance.getEntriesByName('vmquota-first-paint')[0].startTime")
        return (float(mark), float(page.evaluate("Number(document.body.dataset.firstPaintMs)")),
                float(mark) - float(page.evaluate(LAST_ANSWER)))
    finally:
        context.close()


def _fetch_only_ms(browser: object, url: str, namespaces: list[str]) -> float:
    context = browser.new_context()  # type: ignore[attr-defined]
    try:
        page = context.new_page()
        page.goto(url + "/healthz")  # the same origin, and nothing of the dashboard loaded
        return float(page.evaluate(FETCH_ONLY, namespaces))
    finally:
        context.close()


def dashboard_section(vms: int = 1_000, rounds: int = 9, namespaces: int = 10, running: int = 20) -> SectionResult:
    from playwright.sync_api import sync_playwright  # only this section needs it

    if shutil.which(CHROMIUM) is None:
        raise RuntimeError("Debian's chromium is missing: scripts/bootstrap.sh installs it")
    names = [f"ns-{n}" for n in range(namespaces)]
    with tempfile.TemporaryDirectory(prefix="vmquota-bench-dashboard-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        progress(f"filling a store with {vms:,} VMs in {namespaces} namespaces of project {PROJECT}")
        store = new_store(data_dir)
        per = vms // namespaces
        with store.transaction() as txn:
            for ns in names:
                fill(txn, ns, (f"vm-{i}" for i in range(per)), phase_of=lambda i: Phase.STOPPED, project=PROJECT)
        recount(store)
        store.close()

        server = ServerProcess(data_dir, "test:///default", api_processes=1)
        server.start()
        client = Client(server.url)
        try:
            client.post("/apis/vmquota.io/v1/projects", {"metadata": {"name": PROJECT}, "spec": {
                "resourceQuota": {"hard": {"limits.cpu": "10000", "limits.memory": "100Ti"}}}})
            progress(f"starting {running} VMs through the API")
            for i in range(running):
                client.put(action_path(names[i % namespaces], f"vm-{i // namespaces}", "start"), {})
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                items = client.get("/apis/kubevirt.io/v1/virtualmachines")["items"]
                if sum(vm["status"].get("printableStatus") == "Running" for vm in items) == running:
                    break
                time.sleep(0.2)
            sizes = {path: len(json.dumps(client.get(path))) for path in (
                "/apis/kubevirt.io/v1/virtualmachines", "/api/v1/resourcequotas", "/api/v1/events")}

            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
                try:
                    progress("warming up the browser and the server")
                    _first_paint_ms(browser, server.url, vms)
                    _fetch_only_ms(browser, server.url, names)
                    painted: list[float] = []
                    scripted: list[float] = []
                    rendered: list[float] = []
                    fetched: list[float] = []
                    progress(f"{rounds} rounds of first paint and of the same requests without rendering")
                    for r in range(rounds):
                        order = ("paint", "fetch") if r % 2 == 0 else ("fetch", "paint")
                        for step in order:
                            if step == "paint":
                                total, script, render = _first_paint_ms(browser, server.url, vms)
                                painted.append(total)
                                scripted.append(script)
                                rendered.append(render)
                            else:
                                fetched.append(_fetch_only_ms(browser, server.url, names))
                finally:
                    browser.close()
        finally:
            client.close()
            server.stop()

    paint, fetch = median(painted) / 1000, median(fetched) / 1000
    ratio = paint / fetch
    rows = [
        Row("dashboard", f"first paint, {vms:,} VMs (quotas and VM table drawn) vs its requests alone",
            fmt_ms(paint), fmt_ms(fetch), f"{ratio:.2f}", f"< {TARGET_MS:.0f} ms", paint * 1000 < TARGET_MS),
        Row("dashboard", "of which the page's script, from its start to the mark", fmt_ms(median(scripted) / 1000)),
        Row("dashboard", "of which building the DOM, from the last answer to the mark",
            fmt_ms(median(rendered) / 1000)),
    ]
    details = {"vms": vms, "namespaces": namespaces, "running": running, "rounds": rounds,
               "first_paint_ms": painted, "script_ms": scripted, "render_ms": rendered, "fetch_only_ms": fetched,
               "median_first_paint_ms": paint * 1000, "median_fetch_only_ms": fetch * 1000, "ratio": ratio,
               "response_bytes": sizes}
    return SectionResult(rows, details)
