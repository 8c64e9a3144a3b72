"""Take the README's screenshots of the dashboard: a demo on `test:///default`, photographed by Playwright.

    python scripts/dashboard-screenshots.py [--out docs] [--port 18710]

It runs a secure `vmquota serve` (TLS, a token file, RBAC: the defaults) in a temporary data directory, makes a
project with two namespaces, quotas at several levels (one in audit mode), VMs, starts and a refusal, and then
photographs the page in headless Chromium (Debian's) as the admin (`dashboard.png`) and as a viewer whom RBAC
gives no start right (`dashboard-viewer.png`). Everything stays on loopback; the server ends with the script.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import Browser, sync_playwright

from vmquota import kubeconfig
from vmquota.client import Client, ClientError, action_path

CHROMIUM = "/usr/bin/chromium"
RBAC_V1 = "/apis/rbac.authorization.k8s.io/v1"


def vm(name: str, cores: int, memory: str, disk: str) -> dict[str, object]:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name}, "spec": {
        "runStrategy": "Halted",
        "dataVolumeTemplates": [{"metadata": {"name": f"{name}-root"},
                                 "spec": {"storage": {"resources": {"requests": {"storage": disk}}}}}],
        "template": {"spec": {"terminationGracePeriodSeconds": 0, "domain": {
            "cpu": {"cores": cores}, "memory": {"guest": memory},
            "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]}},
            "volumes": [{"name": "root", "dataVolume": {"name": f"{name}-root"}}]}}}}


def demo(admin: Client) -> None:
    admin.post("/apis/vmquota.io/v1/projects", {"metadata": {"name": "team-a"}, "spec": {
        "resourceQuota": {"hard": {"limits.cpu": "16", "limits.memory": "32Gi"}}}})
    for ns in ("dev", "prod"):
        admin.post("/api/v1/namespaces", {"metadata": {"name": ns, "labels": {"vmquota.io/project": "team-a"}}})
    admin.post("/api/v1/namespaces/dev/resourcequotas", {"metadata": {"name": "compute"}, "spec": {"hard": {
        "limits.cpu": "8", "limits.memory": "12Gi", "requests.storage": "200Gi"}}})
    admin.post("/api/v1/namespaces/prod/resourcequotas", {
        "metadata": {"name": "compute", "annotations": {"vmquota.io/enforcement": "audit",
                                                        "vmquota.io/warning-threshold": "90"}},
        "spec": {"hard": {"limits.cpu": "4", "limits.memory": "8Gi", "count/virtualmachines.kubevirt.io": "3"}}})
    for ns, name, cores, memory, disk in (("dev", "web-1", 2, "2Gi", "20Gi"), ("dev", "web-2", 2, "2Gi", "20Gi"),
                                          ("dev", "db-1", 3, "6Gi", "100Gi"), ("dev", "build", 8, "4Gi", "40Gi"),
                                          ("prod", "api-1", 2, "4Gi", "20Gi"), ("prod", "api-2", 2, "2Gi", "20Gi"),
                                          ("prod", "batch", 1, "1Gi", "10Gi")):
        admin.post(f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines", vm(name, cores, memory, disk))
    for ns, name in (("dev", "web-1"), ("dev", "db-1"), ("prod", "api-1"), ("prod", "api-2")):
        admin.put(action_path(ns, name, "start"), {})
        time.sleep(1)  # a few points of history
    try:
        admin.put(action_path("dev", "build", "start"), {})  # 8 cores against 3 left: refused
    except ClientError:
        pass
    admin.post(f"{RBAC_V1}/namespaces/dev/rolebindings", {
        "metadata": {"name": "view-vera"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "User", "name": "vera"}]})
    time.sleep(2)


def photograph(browser: Browser, url: str, token: str, path: Path, *, clip_to: str | None = None) -> None:
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.on("pageerror", lambda e: print("page error:", e, file=sys.stderr))
    page.on("console", lambda m: print("console:", m.text, file=sys.stderr) if m.type == "error" else None)
    page.goto(url + "/")
    page.wait_for_selector("#login:not([hidden])")
    page.fill("#token", token)
    page.click("#login button[type=submit]")
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_selector("#chart canvas")
    page.wait_for_timeout(1500)  # the top list and the chart after the first paint
    if clip_to:
        page.locator(clip_to).screenshot(path=str(path))
    else:
        page.screenshot(path=str(path), full_page=True)
    context.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs", type=Path)
    parser.add_argument("--port", default=18710, type=int)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmquota-screenshots-") as tmp:
        data = Path(tmp) / "data"
        tokens = Path(tmp) / "tokens.csv"
        tokens.write_text('token-of-ada,ada,1000,"system:masters"\ntoken-of-vera,vera,1001\n')
        url = f"https://127.0.0.1:{args.port}"
        server = subprocess.Popen([sys.executable, "-m", "vmquota", "serve", "--hypervisor", "test:///default",
                                   "--data-dir", str(data), "--listen", f"127.0.0.1:{args.port}",
                                   "--api-processes", "1", "--token-auth-file", str(tokens)])
        try:
            deadline = time.monotonic() + 30
            while not (data / "admin.kubeconfig").exists():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("vmquota serve did not start")
                time.sleep(0.1)
            admin = Client(kubeconfig.load([data / "admin.kubeconfig"]))
            demo(admin)
            admin.close()
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
                photograph(browser, url, "token-of-ada", args.out / "dashboard.png")
                photograph(browser, url, "token-of-vera", args.out / "dashboard-viewer.png", clip_to="#vms")
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"written: {args.out / 'dashboard.png'}, {args.out / 'dashboard-viewer.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
