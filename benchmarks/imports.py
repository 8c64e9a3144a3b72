"""Section "import": a disk imported over loopback HTTP against a plain `qemu-img convert` of the same file.

The image is a real file system, not zeros or random bytes: ext4 made by `mkfs.ext4 -d` from the host's
`/usr/lib/x86_64-linux-gnu` (shared libraries, about 740 MB of them in 1 GiB), as qcow2, the format
cloud images are published in. A small mirror in a child process serves it with `sendfile` and Range requests,
as nginx on a LAN would. vmquota imports it through `vmquota serve` on libvirt's simulated host (the import is
the same on KVM: probe, download, checks, disk): from the VM's POST until `status.dataVolumes` says
Succeeded, seen over the API. The baseline converts the same local file into a qcow2 disk beside vmquota's.
The two alternate, so both see the same machine; the figure is the ratio of their throughputs, image bytes
per second. A raw image of the same file system is measured too: there both must convert it.

`python -m benchmarks.imports ROOT PORT` is the mirror.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Row, SectionResult, ServerProcess, free_port, median, progress
from vmquota.client import Client, ClientError

POPULATE_FROM = Path("/usr/lib/x86_64-linux-gnu")
NAMESPACE = "bench-import"
POLL_S = 0.01


def import_section(*, runs: int = 5, image_mib: int = 1024) -> SectionResult:
    with tempfile.TemporaryDirectory(prefix="vmquota-bench-import-") as scratch:
        root = Path(scratch)
        images = root / "images"
        images.mkdir()
        progress(f"making a {image_mib} MiB ext4 image of {POPULATE_FROM}")
        raw = images / "root.raw"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "bench", "-d", str(POPULATE_FROM), str(raw), f"{image_mib}M"],
                       check=True, capture_output=True)
        qcow2 = images / "root.qcow2"
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
        mirror_port = free_port()
        mirror = subprocess.Popen([sys.executable, "-m", "benchmarks.imports", str(images), str(mirror_port)])
        server = ServerProcess(root / "data", "test:///default")
        try:
            _wait_listening(mirror_port)
            server.start()
            client = Client(server.url, timeout=120)
            client.post("/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})
            figures = {fmt: _compare(client, root, images / f"root.{fmt}", fmt, f"http://127.0.0.1:{mirror_port}",
                                     runs=runs, size=f"{image_mib}Mi")
                       for fmt in ("qcow2", "raw")}
            client.close()
        finally:
            server.stop()
            mirror.kill()
            mirror.wait()
    rows = []
    for fmt, f in figures.items():
        ratio = f["ratio"]
        rows.append(Row("import", f"{fmt} image ({f['mb']:.0f} MB) over loopback HTTP, throughput (median of {runs})",
                        f"{f['vmquota_mb_s']:.0f} MB/s", f"{f['convert_mb_s']:.0f} MB/s qemu-img convert",
                        f"{ratio:.2f}", "≥ 0.9" if fmt == "qcow2" else "",
                        ratio >= 0.9 if fmt == "qcow2" else None))
        rows.append(Row("import", f"{fmt}: the same against qemu-img convert with its output fsynced, as the "
                                  "import's", f"{f['vmquota_mb_s']:.0f} MB/s",
                        f"{f['durable_convert_mb_s']:.0f} MB/s", f"{f['durable_ratio']:.2f}"))
    return SectionResult(rows=rows, details={"image_mib": image_mib, "populated_from": str(POPULATE_FROM),
                                             "formats": figures})


def _compare(client: Client, root: Path, image: Path, fmt: str, mirror: str, *, runs: int,
             size: str) -> dict[str, Any]:
    mb = image.stat().st_size / 1e6
    imports: list[float] = []
    converts: list[float] = []
    for run in range(runs):
        progress(f"{fmt}: run {run + 1} of {runs}")
        if run % 2:  # alternate which goes first: neither always finds the other's dirty pages
            converts.append(_convert(image, fmt, root / "data"))
            imports.append(_import(client, f"{mirror}/{image.name}", f"imp{run}", size))
        else:
            imports.append(_import(client, f"{mirror}/{image.name}", f"imp{run}", size))
            converts.append(_convert(image, fmt, root / "data"))
    ratios = [c / i for c, i in zip(converts, imports, strict=True)]
    durable = [_convert(image, fmt, root / "data", durable=True) for _ in range(runs)]
    return {"mb": mb, "import_seconds": imports, "convert_seconds": converts, "ratios": ratios,
            "ratio": median(ratios), "vmquota_mb_s": mb / median(imports), "convert_mb_s": mb / median(converts),
            "durable_convert_seconds": durable, "durable_convert_mb_s": mb / median(durable),
            "durable_ratio": median(durable) / median(imports)}


def _convert(image: Path, fmt: str, beside: Path, *, durable: bool = False) -> float:
    """qemu-img convert of the local file; `durable`: and its output on the disk, as an import's disk is."""
    out = beside / "baseline.qcow2"
    started = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-q", "-f", fmt, "-O", "qcow2", str(image), str(out)], check=True)
    if durable:
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    seconds = time.perf_counter() - started
    out.unlink()
    return seconds


def _import(client: Client, url: str, name: str, size: str) -> float:
    path = f"/apis/kubevirt.io/v1/namespaces/{NAMESPACE}/virtualmachines"
    manifest = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name}, "spec": {
        "runStrategy": "Halted",
        "dataVolumeTemplates": [{"metadata": {"name": f"{name}-root"}, "spec": {
            "source": {"http": {"url": url}}, "storage": {"resources": {"requests": {"storage": size}}}}}],
        "template": {"spec": {"domain": {"memory": {"guest": "64Mi"},
                                         "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]}},
                              "volumes": [{"name": "root", "dataVolume": {"name": f"{name}-root"}}]}}}}
    started = time.perf_counter()
    client.post(path, manifest)
    while True:
        [volume] = client.get(f"{path}/{name}")["status"]["dataVolumes"]
        if volume["phase"] == "Succeeded":
            break
        if volume["phase"] == "Failed":
            raise RuntimeError(f"the import failed: {volume.get('message')}")
        time.sleep(POLL_S)
    seconds = time.perf_counter() - started
    client.delete(f"{path}/{name}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # its disk is removed before the next run writes
        try:
            client.get(f"{path}/{name}")
        except ClientError as e:
            if e.code == 404:
                return seconds
            raise
        time.sleep(0.05)
    raise RuntimeError(f"{name} was not deleted within 60 s")


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the image mirror did not listen")


# -- the mirror ----------------------------------------------------------------------------------------------

_RANGE = re.compile(rb"^range:\s*bytes=(\d+)-(\d*)\s*$", re.IGNORECASE | re.MULTILINE)


def serve(root: Path, port: int) -> None:
    """GET of the files in `root` by name, whole or by a Range, sent with sendfile: a LAN mirror's speed."""
    listener = socket.create_server(("127.0.0.1", port), backlog=16)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_answer, args=(conn, root), daemon=True).start()


def _answer(conn: socket.socket, root: Path) -> None:
    with conn:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                return
            head += chunk
        name = head.split(b" ", 2)[1].decode().lstrip("/")
        path = root / name
        if "/" in name or not path.is_file():
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        size = path.stat().st_size
        start, end, status = 0, size - 1, b"200 OK"
        ranged = _RANGE.search(head)
        if ranged:
            start = int(ranged.group(1))
            end = min(int(ranged.group(2) or end), size - 1)
            status = b"206 Partial Content"
        headers = b"HTTP/1.1 %s\r\nContent-Length: %d\r\nAccept-Ranges: bytes\r\nConnection: close\r\n" % (
            status, end - start + 1)
        if ranged:
            headers += b"Content-Range: bytes %d-%d/%d\r\n" % (start, end, size)
        conn.sendall(headers + b"\r\n")
        with path.open("rb") as f:
            offset = start
            try:
                while offset <= end:
                    sent = os.sendfile(conn.fileno(), f.fileno(), offset, end + 1 - offset)
                    if not sent:
                        return
                    offset += sent
            except OSError:
                return  # the importer closed early: a probe reads only the first 64 KiB


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
