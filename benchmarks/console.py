"""Section `console`: from a start request to the guest's first console line, through vmquota and straight through
libvirt, on the real Linux guest under plain emulation (`vmquota serve --use-emulation`, as its tests run it).

- vmquota: `PUT .../start`, then the console subresource as `vmquota console` opens it (`Client.console`: asked
  again every 100 ms while the VM starts), a websocket read until the guest's first line.
- the baseline: the same domain XML (vmquota's, renamed, without its metadata and console log, on a copy of the
  same disk), defined once; then `virDomainCreate` (what `virsh start` calls) and a console stream opened at once
  (what `virsh console` does), read until the same line. libvirt's own calls from this process: no virsh process
  to start, so the baseline is the faster one can be.

The guest's first line is its init's `vmquota-guest: init started` (the kernel prints nothing on ttyS0 at
loglevel 3). Runs alternate between the two, each on a quiet host after the last stop.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection

from benchmarks.common import Row, SectionResult, ServerProcess, fmt_ms, median, progress, summary
from vmquota import domainxml
from vmquota.client import Client, action_path

URI = "qemu:///system"
FIRST_LINE = b"vmquota-guest: init started"
DIRECT_PREFIX = "vmquota-bench-console-"
TARGET = 1.1
SETTLE_S = 2.0
REPO = Path(__file__).resolve().parent.parent


def _guest_image() -> Path:
    """The cached test guest (scripts/build-test-guest.sh builds it on first use)."""
    done = subprocess.run(["bash", str(REPO / "scripts" / "build-test-guest.sh")], capture_output=True, text=True,
                          timeout=600, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


def _manifest(name: str) -> dict[str, Any]:
    return {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name}, "spec": {
        "runStrategy": "Halted",
        "dataVolumeTemplates": [{"metadata": {"name": f"{name}-root"},
                                 "spec": {"storage": {"resources": {"requests": {"storage": "64Mi"}}}}}],
        "template": {"spec": {
            "terminationGracePeriodSeconds": 0,
            "domain": {"cpu": {"cores": 1}, "memory": {"guest": "256Mi"},
                       "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]}},
            "volumes": [{"name": "root", "dataVolume": {"name": f"{name}-root"}}]}}}}


class _Bench:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ns = f"cons-bench-{uuid.uuid4().hex[:6]}"
        self.server = ServerProcess(tmp / "data", URI, extra_args=("--use-emulation",))
        self.client: Client | None = None
        self.conn: Any = None
        self.name = "console-0"

    def open(self, image: Path) -> str:
        """The VM made and its disk filled with the guest; the direct domain's XML, made from vmquota's."""
        self.server.start()
        # An API process answers before the first process has started the controller; a VM made then would wait
        # for the next recount (an hour here) before its disk is made. Wait for the controller's line instead.
        self._wait(lambda: "vmquota serving on" in self.server.log_path.read_text(errors="replace"),
                   "the controller to run", with_vm=False)
        self.conn = libvirt.open(URI)
        self.client = Client(self.server.url)
        self.client.post("/api/v1/namespaces", {"metadata": {"name": self.ns}})
        self.client.post(f"/apis/kubevirt.io/v1/namespaces/{self.ns}/virtualmachines", _manifest(self.name))
        self._wait(lambda: any(c["type"] == "DataVolumesReady" and c["status"] == "True"
                               for c in self._vm().get("status", {}).get("conditions", [])), "the disk")
        [disk] = self.server.data_dir.rglob(f"{self.name}-root.qcow2")
        subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(image), str(disk)],
                       check=True, capture_output=True)
        direct_disk = self.tmp / "direct-root.qcow2"
        shutil.copyfile(disk, direct_disk)
        self.vmquota_run()  # warm-up, and the domain vmquota defines, whose XML the baseline takes
        xml = self.conn.lookupByName(domainxml.domain_name(self.ns, self.name)).XMLDesc(
            libvirt.VIR_DOMAIN_XML_INACTIVE)
        self.stop_vmquota()
        return _direct_xml(xml, direct_disk)

    def _vm(self) -> dict[str, Any]:
        assert self.client is not None
        return self.client.get(  # type: ignore[no-any-return]
            f"/apis/kubevirt.io/v1/namespaces/{self.ns}/virtualmachines/{self.name}")

    def _wait(self, done: Any, what: str, timeout: float = 60.0, *, with_vm: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                status = f": the VM's status is {self._vm().get('status')}" if with_vm else ""
                raise RuntimeError(f"timed out waiting for {what}{status}; server log:\n{self.server.log_tail()}")
            time.sleep(0.05)

    def vmquota_run(self) -> tuple[float, float]:
        """(to the console open, to the first line)."""
        assert self.client is not None
        t0 = time.perf_counter()
        self.client.put(action_path(self.ns, self.name, "start"))
        opened = self.client.console(self.ns, self.name, timeout=120)
        connected = time.perf_counter() - t0
        try:
            _first_line_ws(opened)
            return connected, time.perf_counter() - t0
        finally:
            opened.close()

    def stop_vmquota(self) -> None:
        assert self.client is not None
        self.client.put(action_path(self.ns, self.name, "stop"), {"gracePeriod": 0})
        self._wait(lambda: self._vm().get("status", {}).get("printableStatus") == "Stopped", "the stop")

    def direct_run(self, dom: Any) -> tuple[float, float]:
        t0 = time.perf_counter()
        dom.create()
        stream = self.conn.newStream(0)
        dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        connected = time.perf_counter() - t0
        try:
            _first_line(stream.recv)
            return connected, time.perf_counter() - t0
        finally:
            try:
                stream.abort()
            except libvirt.libvirtError:
                pass

    def close(self) -> None:
        try:
            client = self.client
            if client is not None and self.server.process and self.server.process.poll() is None:
                client.delete(f"/apis/kubevirt.io/v1/namespaces/{self.ns}/virtualmachines/{self.name}")
                vms = f"/apis/kubevirt.io/v1/namespaces/{self.ns}/virtualmachines"
                self._wait(lambda: not client.get(vms)["items"], "the VM's delete")
        finally:
            if self.client is not None:
                self.client.close()
            self.server.stop()
            if self.conn is not None:
                for dom in self.conn.listAllDomains():
                    if dom.name().startswith((DIRECT_PREFIX, domainxml.domain_name(self.ns, ""))):
                        _remove(dom)
                self.conn.close()


def _direct_xml(xml: str, disk: Path) -> str:
    """vmquota's domain as anyone would define it: another name and UUID, no vmquota metadata, no console log, its
    own copy of the disk."""
    root = ET.fromstring(xml)
    root.find("name").text = f"{DIRECT_PREFIX}{uuid.uuid4().hex[:6]}"  # type: ignore[union-attr]
    root.find("uuid").text = str(uuid.uuid4())  # type: ignore[union-attr]
    metadata = root.find("metadata")
    if metadata is not None:
        root.remove(metadata)
    for serial in root.iter("serial"):
        for log in serial.findall("log"):
            serial.remove(log)
    [source] = [d.find("source") for d in root.iter("disk") if d.get("device") == "disk"]
    source.set("file", str(disk))  # type: ignore[union-attr]
    return ET.tostring(root, encoding="unicode")


def _first_line(recv: Any, timeout: float = 120.0) -> bytes:
    """Read a console until the guest's first line; what was read up to it is returned."""
    seen = b""
    deadline = time.monotonic() + timeout
    while FIRST_LINE not in seen:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the guest's first line never came; the console showed {seen[-500:]!r}")
        data = recv(4096)
        if not data:
            raise RuntimeError(f"the console closed before the first line; it showed {seen[-500:]!r}")
        seen += data
    return seen


def _first_line_ws(opened: Any) -> bytes:
    """The same over the websocket, reading its frames as `vmquota console` does (wsproto, in this thread)."""
    def recv(size: int) -> bytes:
        while True:
            for event in opened.ws.events():
                if isinstance(event, BytesMessage):
                    return bytes(event.data)
                if isinstance(event, CloseConnection):
                    return b""
            if opened.ws.state is not ConnectionState.OPEN:
                return b""
            data = opened.wire.recv(1 << 16)
            opened.ws.receive_data(data or None)
    return _first_line(recv)


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


def console_section(*, runs: int) -> SectionResult:
    try:
        subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return SectionResult([Row("console", f"skipped: {URI} not reachable ({e})", "")],
                             {"skipped": str(e)})
    image = _guest_image()
    times: dict[str, list[float]] = {"vmquota": [], "direct": [], "vmquota_open": [], "direct_open": []}
    with tempfile.TemporaryDirectory(prefix="vmquota-bench-console-") as tmp:
        bench = _Bench(Path(tmp))
        try:
            xml = bench.open(image)
            direct = bench.conn.defineXML(xml)
            for i in range(runs):
                for side in ("vmquota", "direct") if i % 2 == 0 else ("direct", "vmquota"):
                    time.sleep(SETTLE_S)
                    if side == "vmquota":
                        connected, took = bench.vmquota_run()
                        bench.stop_vmquota()
                    else:
                        connected, took = bench.direct_run(direct)
                        direct.destroy()
                    times[side].append(took)
                    times[f"{side}_open"].append(connected)
                progress(f"console: run {i + 1}/{runs}: vmquota {fmt_ms(times['vmquota'][-1])}, "
                         f"virDomainCreate + console {fmt_ms(times['direct'][-1])}")
        finally:
            bench.close()
    ours, baseline = median(times["vmquota"]), median(times["direct"])
    ratio = ours / baseline
    paired = median([a / b for a, b in zip(times["vmquota"], times["direct"], strict=True)])
    opened, opened_baseline = median(times["vmquota_open"]), median(times["direct_open"])
    rows = [Row("console", f"start request to the guest's first console line, emulated (median of {runs}; median "
                           f"of the paired runs' ratios {paired:.2f})",
                fmt_ms(ours), baseline=f"{fmt_ms(baseline)} virDomainCreate + console stream", ratio=f"{ratio:.2f}",
                target=f"<= {TARGET}", met=ratio <= TARGET),
            Row("console", f"start request to the console open, before the guest prints (median of {runs})",
                fmt_ms(opened), baseline=f"{fmt_ms(opened_baseline)} virDomainCreate + virDomainOpenConsole",
                ratio=f"{opened / opened_baseline:.2f}")]
    return SectionResult(rows, {"runs": runs, "ratio_of_medians": ratio, "median_paired_ratio": paired,
                                "first_line": FIRST_LINE.decode(), **{k: summary(v) for k, v in times.items()}})

