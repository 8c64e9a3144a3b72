"""Sections 4 and 5 on real KVM: one `vmquota serve --hypervisor qemu:///system` process on a loopback port.

4. Start request to `Running` (seen over the API) against defining and starting the same domain straight
   through libvirt; a forced stop (grace 0) to `Stopped` against virDomainDestroy. The direct domains are
   this benchmark's own (`vmquota-bench-direct-N`, their own disk file), made from the XML vmquota sends.
   vmquota and direct runs alternate, so both see the same host.
5. A domain destroyed through this process's own libvirt connection until the quota's `status.used`
   over the API shows it. The VM's runStrategy is Manual, so it stays off until started again.

Every VM, domain and file made here is removed at the end, whatever happens in between.
"""

from __future__ import annotations

import itertools
import subprocess
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt

from benchmarks.common import (
    Row,
    SectionResult,
    ServerProcess,
    fmt_ms,
    median,
    percentile,
    progress,
    summary,
    vm_manifest,
)
from vmquota import domainxml, vmspec
from vmquota.client import Client, ClientError, action_path
from vmquota.hypervisor import _start_event_loop as start_event_loop
from vmquota.waiting import wait_until

URI = "qemu:///system"
DIRECT_PREFIX = "vmquota-bench-direct-"
FAILED_PHASES = {"CrashLoopBackOff", "ErrorUnschedulable"}
POLL_S = 0.002  # how often section 5 asks the API: the resolution of its figure
# Section 4 asks every 10 ms: polling every 2 ms costs the server CPU on the same two cores QEMU starts on,
# which can slow the very start being measured.
LIFECYCLE_POLL_S = 0.010
# libvirt announces a domain off (and vmquota shows Stopped) before virDomainDestroy has finished tearing it
# down; a start right after may wait for that teardown. Every start begins on a quiet host instead.
SETTLE_S = 2.0


def _vm_path(ns: str, name: str) -> str:
    return f"/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines/{name}"


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ns = f"bench-kvm-{uuid.uuid4().hex[:6]}"
        self.server = ServerProcess(tmp / "data", URI)
        self.conn: Any = None
        self.client: Client | None = None
        self.direct_disk = tmp / "direct-root.qcow2"
        self._direct_ids = itertools.count()

    # -- setup and cleanup --------------------------------------------------------------------------

    def open(self) -> None:
        self.conn = libvirt.open(URI)
        self.server.start()
        self.client = Client(self.server.url)
        self.client.post("/api/v1/namespaces", {"metadata": {"name": self.ns}})
        self.client.post(f"/api/v1/namespaces/{self.ns}/resourcequotas",
                         {"metadata": {"name": "compute"}, "spec": {"hard": {"limits.cpu": "16",
                                                                             "limits.memory": "16Gi"}}})

    def close(self) -> None:
        """Delete our VMs through vmquota, then remove anything of ours libvirt still has."""
        try:
            if self.client is not None and self.server.process and self.server.process.poll() is None:
                for vm in self.client.get(f"/apis/kubevirt.io/v1/namespaces/{self.ns}/virtualmachines")["items"]:
                    self.client.delete(_vm_path(self.ns, vm["metadata"]["name"]))
                wait_until(lambda: not self.client.get(  # type: ignore[union-attr]
                    f"/apis/kubevirt.io/v1/namespaces/{self.ns}/virtualmachines")["items"],
                    timeout=60, what="the benchmark's VMs to be deleted", interval=0.1)
        finally:
            if self.client is not None:
                self.client.close()
            self.server.stop()
            if self.conn is not None:
                for dom in self.conn.listAllDomains():
                    if dom.name().startswith((DIRECT_PREFIX, domainxml.domain_name(self.ns, ""))):
                        _remove(dom)
                self.conn.close()

    # -- API helpers --------------------------------------------------------------------------------

    def create_vm(self, name: str, **kwargs: Any) -> dict[str, Any]:
        assert self.client is not None
        return self.client.post(f"/apis/kubevirt.io/v1/namespaces/{self.ns}/virtualmachines",  # type: ignore[no-any-return]
                                vm_manifest(name, **kwargs))

    def action(self, name: str, action: str, body: Any = None) -> None:
        assert self.client is not None
        self.client.put(action_path(self.ns, name, action), body)

    def wait_status(self, name: str, wanted: str, timeout: float = 120, interval: float = POLL_S) -> None:
        assert self.client is not None

        def reached() -> bool:
            status = self.client.get(_vm_path(self.ns, name)).get("status") or {}  # type: ignore[union-attr]
            if status.get("printableStatus") in FAILED_PHASES:
                raise RuntimeError(f"{name} failed: {status}")
            return bool(status.get("printableStatus") == wanted)
        wait_until(reached, timeout=timeout, what=f"{name} to be {wanted}", interval=interval)

    def used_cpu(self) -> str:
        assert self.client is not None
        quota = self.client.get(f"/api/v1/namespaces/{self.ns}/resourcequotas/compute")
        return str(quota["status"]["used"]["limits.cpu"])

    # -- section 4 ----------------------------------------------------------------------------------

    def direct_xml(self, name: str, manifest: dict[str, Any]) -> str:
        """The XML vmquota sends for this VM, renamed, with a new UUID, no vmquota metadata, its own disk."""
        vm = self.client.get(_vm_path(self.ns, name))  # type: ignore[union-attr]
        dom = self.conn.lookupByName(domainxml.domain_name(self.ns, name))
        domain_type = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).get("type", "kvm")
        spec = vmspec.read(manifest)
        xml = domainxml.build(namespace=self.ns, name=name, uid=vm["metadata"]["uid"], instance="direct", spec=spec,
                              disks=[domainxml.DomainDisk(self.direct_disk, "vda")], domain_type=domain_type)
        root = ET.fromstring(xml)
        root.remove(root.find("metadata"))  # type: ignore[arg-type]
        root.find("uuid").text = str(uuid.uuid4())  # type: ignore[union-attr]
        root.find("title").text = "vmquota benchmark: direct libvirt"  # type: ignore[union-attr]
        return ET.tostring(root, encoding="unicode")

    def direct_start(self, xml: str) -> tuple[Any, float]:
        root = ET.fromstring(xml)
        root.find("name").text = f"{DIRECT_PREFIX}{next(self._direct_ids)}"  # type: ignore[union-attr]
        root.find("uuid").text = str(uuid.uuid4())  # type: ignore[union-attr]
        text = ET.tostring(root, encoding="unicode")
        t0 = time.perf_counter()
        dom = self.conn.defineXML(text)
        dom.create()
        return dom, time.perf_counter() - t0

    def vmquota_start(self, name: str) -> float:
        t0 = time.perf_counter()
        self.action(name, "start")
        self.wait_status(name, "Running", interval=LIFECYCLE_POLL_S)
        return time.perf_counter() - t0

    def vmquota_stop(self, name: str) -> float:
        t0 = time.perf_counter()
        self.action(name, "stop", {"gracePeriod": 0})
        self.wait_status(name, "Stopped", interval=LIFECYCLE_POLL_S)
        return time.perf_counter() - t0

    def overhead(self, runs: int) -> SectionResult:
        name = "kvm-0"
        manifest = vm_manifest(name, cores=1, memory="256Mi", disk="1Gi")
        self.create_vm(name, cores=1, memory="256Mi", disk="1Gi")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.direct_disk), "1G"], check=True)
        self.vmquota_start(name)  # warm-up: makes the disk, QEMU's first start loads its files
        xml = self.direct_xml(name, manifest)
        self.vmquota_stop(name)
        dom, _ = self.direct_start(xml)
        _remove(dom)
        times: dict[str, list[float]] = {"vmquota_start": [], "direct_start": [], "vmquota_stop": [], "direct_stop": []}
        for i in range(runs):
            for side in ("vmquota", "direct") if i % 2 == 0 else ("direct", "vmquota"):
                time.sleep(SETTLE_S)
                if side == "vmquota":
                    times["vmquota_start"].append(self.vmquota_start(name))
                    times["vmquota_stop"].append(self.vmquota_stop(name))
                else:
                    dom, took = self.direct_start(xml)
                    times["direct_start"].append(took)
                    t0 = time.perf_counter()
                    dom.destroy()
                    times["direct_stop"].append(time.perf_counter() - t0)
                    dom.undefine()
            progress(f"kvm: run {i + 1}/{runs}: start {fmt_ms(times['vmquota_start'][-1])} vs "
                     f"{fmt_ms(times['direct_start'][-1])}, stop {fmt_ms(times['vmquota_stop'][-1])} vs "
                     f"{fmt_ms(times['direct_stop'][-1])}")
        rows = []
        ratios = {}
        for op, what in (("start", "start request to Running"), ("stop", "forced stop (grace 0) to Stopped")):
            ours, direct = median(times[f"vmquota_{op}"]), median(times[f"direct_{op}"])
            ratios[op] = ours / direct
            libvirt_call = "define+create" if op == "start" else "virDomainDestroy"
            rows.append(Row("4", f"KVM {what} (median of {runs})", fmt_ms(ours),
                            baseline=f"{fmt_ms(direct)} {libvirt_call}", ratio=f"{ours / direct:.2f}",
                            target="<= 1.15", met=ours / direct <= 1.15))
        return SectionResult(rows, {"runs": runs, "ratio_of_medians": ratios,
                                    **{k: summary(v) for k, v in times.items()}})

    # -- section 5 ----------------------------------------------------------------------------------

    def realtime(self, runs: int) -> SectionResult:
        """t0 is when libvirt announces the domain stopped (the lifecycle event on our own connection).

        The API is polled from the moment destroy is called, on this thread, while another thread makes
        the call: a change vmquota shows before virDomainDestroy returns is seen as early as it happens.
        """
        name = "rt-0"
        self.create_vm(name, cores=2, memory="256Mi", disk=None, strategy="Manual")
        domain = domainxml.domain_name(self.ns, name)
        stopped_at: list[float] = []

        def on_event(_conn: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:
            if dom.name() == domain and event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
                stopped_at.append(time.perf_counter())

        callback = self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_event, None)
        after_event, after_return, after_call, destroy_calls = [], [], [], []
        try:
            for i in range(runs):
                self.action(name, "start")
                self.wait_status(name, "Running")
                before = self.used_cpu()
                dom = self.conn.lookupByName(domain)
                stopped_at.clear()
                returned: list[float] = []
                destroyer = threading.Thread(target=_destroy, args=(dom, returned))
                t0 = time.perf_counter()
                destroyer.start()  # behind vmquota's back
                wait_until(lambda: self.used_cpu() != before, timeout=30, what="used to change",  # noqa: B023
                           interval=POLL_S)
                seen = time.perf_counter()
                destroyer.join()
                wait_until(lambda: stopped_at, timeout=10, what="libvirt's stopped event")
                after_event.append(seen - stopped_at[0])
                after_return.append(seen - returned[0])
                after_call.append(seen - t0)
                destroy_calls.append(returned[0] - t0)
                self.wait_status(name, "Stopped")
                if (i + 1) % 10 == 0:
                    progress(f"realtime: {i + 1}/{runs}: last {fmt_ms(after_event[-1])} after the event")
        finally:
            self.conn.domainEventDeregisterAny(callback)
        p50, p99 = percentile(after_event, 50), percentile(after_event, 99)
        rows = [Row("5", f"KVM domain destroyed outside vmquota: libvirt's stopped event -> status.used changed "
                         f"over the API, p50; p99 ({runs} runs)",
                    f"{fmt_ms(p50)}; {fmt_ms(p99)}",
                    baseline=f"virDomainDestroy call: {fmt_ms(median(destroy_calls))}",
                    target="p99 < 200 ms", met=p99 < 0.2)]
        return SectionResult(rows, {"runs": runs, "from_stopped_event": summary(after_event),
                                    "from_destroy_returned": summary(after_return),
                                    "from_destroy_called": summary(after_call),
                                    "destroy_call": summary(destroy_calls), "poll_interval_ms": POLL_S * 1000})


def _destroy(dom: Any, returned: list[float]) -> None:
    dom.destroy()
    returned.append(time.perf_counter())


def _remove(dom: Any) -> None:
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass
    try:
        dom.undefine()
    except libvirt.libvirtError:
        pass


def reachable() -> str | None:
    """None when qemu:///system answers, else why not."""
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as e:
        return str(e.get_error_message())
    conn.close()
    return None


def kvm_sections(want: set[str], *, runs: int, realtime_runs: int) -> SectionResult:
    start_event_loop()  # before the first connection: section 5 listens to libvirt's lifecycle events
    problem = reachable()
    if problem is not None:
        skipped = [Row(n, f"skipped: qemu:///system not reachable ({problem})", "")
                   for n, section in (("4", "kvm"), ("5", "realtime")) if section in want]
        return SectionResult(skipped, {"skipped": f"qemu:///system not reachable: {problem}"})
    rows: list[Row] = []
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vmquota-bench-kvm-") as tmp:
        bench = Bench(Path(tmp))
        try:
            bench.open()
            if "kvm" in want:
                result = bench.overhead(runs)
                rows += result.rows
                details["kvm"] = result.details
            if "realtime" in want:
                result = bench.realtime(realtime_runs)
                rows += result.rows
                details["realtime"] = result.details
        except ClientError as e:
            raise RuntimeError(f"{e.message}; server log:\n{bench.server.log_tail()}") from e
        finally:
            bench.close()
    return SectionResult(rows, details)
