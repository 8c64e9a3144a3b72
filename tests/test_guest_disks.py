"""Disks from images (CDI's dataVolumeTemplates[].spec.source): http imports over loopback, blank disks and pvc
clones, on libvirt's simulated host with real qemu-img. The refusals that can be synchronous are; the others
show in the VM's status.dataVolumes, in CDI's phases."""

from __future__ import annotations

import hashlib
import lzma
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, vm_manifest, vmquota_serve, vms_path, wait_until
from image_server import ImageServer

from vmquota.client import Client, ClientError


@pytest.fixture
def images(tmp_path: Path) -> Iterator[ImageServer]:
    root = tmp_path / "images"
    root.mkdir()
    with ImageServer(root).running() as server:
        yield server


def qcow2(path: Path, size: str, *, data: bytes = b"") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    if data:
        raw = path.with_suffix(".bin")
        raw.write_bytes(data)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {raw} 0 {len(data)}", str(path)],
                       check=True, capture_output=True)
    return path


def boot_sector(extra: bytes = b"") -> bytes:
    return (b"\xeb\xfe" + extra).ljust(510, b"\0") + b"\x55\xaa"


def imported_vm(name: str, url: str, disk: str = "64Mi", **source: Any) -> dict[str, Any]:
    manifest = vm_manifest(name, cores=1, memory="64Mi", disk=disk)
    manifest["spec"]["dataVolumeTemplates"][0]["spec"]["source"] = {"http": {"url": url, **source}}
    return manifest


def volume(cluster: Cluster, name: str) -> dict[str, Any]:
    [entry] = cluster.vm(name)["status"]["dataVolumes"]
    return dict(entry)


def disk_file(cluster: Cluster, name: str) -> Path:
    return cluster.app.controller.disks.path(cluster.ns, cluster.vm(name)["metadata"]["uid"], f"{name}-root")


def guest_bytes(path: Path, length: int) -> bytes:
    """The first bytes the guest sees on a qcow2 disk."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "head.raw"
        subprocess.run(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"if={path}", f"of={out}", "bs=512",
                        f"count={-(-length // 512)}"], check=True, capture_output=True)
        return out.read_bytes()[:length]


def wait_imported(cluster: Cluster, name: str) -> None:
    wait_until(lambda: volume(cluster, name)["phase"] in ("Succeeded", "Failed"), timeout=30,
               what=f"{name}'s import to end")


def test_a_qcow2_image_is_imported_grown_to_its_request_and_charged_from_creation(cluster: Cluster,
                                                                               images: ImageServer) -> None:
    payload = boot_sector(b"vmquota-import")
    qcow2(images.root / "small.qcow2", "16M", data=payload)
    cluster.create_quota({"requests.storage": "1Gi"})
    created = cluster.create_vm(imported_vm("web", images.url("small.qcow2")))
    assert created["status"]["dataVolumes"] == [{"name": "web-root", "phase": "ImportScheduled", "progress": "N/A"}]
    assert cluster.used()["requests.storage"] == "64Mi"  # admitted and charged before a byte is written
    wait_imported(cluster, "web")
    assert volume(cluster, "web") == {"name": "web-root", "phase": "Succeeded", "progress": "100.0%"}
    conditions = {c["type"]: c for c in cluster.vm("web")["status"]["conditions"]}
    assert conditions["DataVolumesReady"]["status"] == "True"
    disk = disk_file(cluster, "web")
    assert cluster.app.controller.disks.virtual_size(disk) == 64 * 2**20
    assert guest_bytes(disk, 512) == payload
    assert sorted(p.suffix for p in disk.parent.iterdir()) == [".qcow2"]  # no download or partial file left


def test_an_xz_raw_image_is_unpacked_and_a_checksum_is_checked(cluster: Cluster, images: ImageServer) -> None:
    payload = boot_sector(b"raw") + b"\x01" * 4096
    packed = lzma.compress(payload.ljust(1 << 20, b"\0"))
    (images.root / "disk.img.xz").write_bytes(packed)
    good = "sha256:" + hashlib.sha256(packed).hexdigest()
    cluster.create_vm(imported_vm("good", images.url("disk.img.xz"), checksum=good))
    cluster.create_vm(imported_vm("bad", images.url("disk.img.xz"), checksum="sha256:" + "0" * 64))
    wait_imported(cluster, "good")
    wait_imported(cluster, "bad")
    assert volume(cluster, "good")["phase"] == "Succeeded"
    assert guest_bytes(disk_file(cluster, "good"), len(payload)) == payload
    bad = volume(cluster, "bad")
    assert bad["phase"] == "Failed" and "checksum mismatch" in bad["message"]
    assert not disk_file(cluster, "bad").parent.exists() or not any(disk_file(cluster, "bad").parent.iterdir())
    conditions = {c["type"]: c for c in cluster.vm("bad")["status"]["conditions"]}
    assert conditions["DataVolumesReady"]["status"] == "False"


@pytest.mark.parametrize(("name", "content", "why"), [
    ("big.qcow2", None, "the image's virtual size 128Mi exceeds the requested storage 64Mi"),
    ("missing.qcow2", b"", "answered HTTP 404 Not Found"),
    ("page.html", b"<html>not a disk</html>\n" * 100, "is not a disk image"),
])
def test_an_image_that_cannot_be_imported_is_refused_at_once_and_charges_nothing(
        cluster: Cluster, images: ImageServer, name: str, content: bytes | None, why: str) -> None:
    if content is None:
        qcow2(images.root / name, "128M")
    elif content:
        (images.root / name).write_bytes(content)
    cluster.create_quota({"requests.storage": "1Gi", "count/virtualmachines.kubevirt.io": "5"})
    with pytest.raises(ClientError) as refused:
        cluster.create_vm(imported_vm("web", images.url(name)))
    assert refused.value.code == 422
    assert refused.value.message.startswith(
        'VirtualMachine.kubevirt.io "web" is invalid: spec.dataVolumeTemplates[0].spec.source.http.url: '
        f'Invalid value: "{images.url(name)}": ')
    assert why in refused.value.message
    assert cluster.used() == {"requests.storage": "0", "count/virtualmachines.kubevirt.io": "0"}


def test_a_pvc_source_clones_another_vms_disk_of_the_namespace(cluster: Cluster, images: ImageServer) -> None:
    payload = boot_sector(b"golden")
    qcow2(images.root / "golden.qcow2", "16M", data=payload)
    cluster.create_vm(imported_vm("golden", images.url("golden.qcow2"), disk="32Mi"))
    wait_imported(cluster, "golden")
    clone = vm_manifest("copy", cores=1, memory="64Mi", disk="64Mi")
    clone["spec"]["dataVolumeTemplates"][0]["spec"]["source"] = {"pvc": {"namespace": cluster.ns,
                                                                         "name": "golden-root"}}
    created = cluster.create_vm(clone)
    assert created["status"]["dataVolumes"][0]["phase"] == "CloneScheduled"
    wait_until(lambda: volume(cluster, "copy")["phase"] == "Succeeded", what="the clone")
    disk = disk_file(cluster, "copy")
    assert guest_bytes(disk, 512) == payload
    assert cluster.app.controller.disks.virtual_size(disk) == 64 * 2**20
    too_small = vm_manifest("tiny", cores=1, memory="64Mi", disk="16Mi")
    too_small["spec"]["dataVolumeTemplates"][0]["spec"]["source"] = {"pvc": {"name": "golden-root"}}
    with pytest.raises(ClientError, match="the source is 32Mi, larger than the requested storage 16Mi"):
        cluster.create_vm(too_small)
    too_small["spec"]["dataVolumeTemplates"][0]["spec"]["source"] = {"pvc": {"name": "nowhere-root"}}
    with pytest.raises(ClientError, match='Not found: "nowhere-root"'):
        cluster.create_vm(too_small)


def test_a_start_waits_for_its_import(cluster: Cluster, images: ImageServer) -> None:
    qcow2(images.root / "slow.qcow2", "16M", data=boot_sector() + b"\x07" * (2 << 20))
    images.bytes_per_second = 2 << 20  # about 1.5 s for the file
    cluster.create_vm(imported_vm("web", images.url("slow.qcow2"), disk="64Mi"))
    cluster.action("web", "start")
    wait_until(lambda: volume(cluster, "web")["phase"] == "ImportInProgress", what="the import to begin")
    assert cluster.status("web") == "Starting"  # admitted, and waiting for its disk
    cluster.wait_status("web", "Running", timeout=30)
    assert volume(cluster, "web")["phase"] == "Succeeded"


def test_a_server_killed_mid_import_resumes_it_without_a_corrupt_disk(tmp_path: Path, images: ImageServer) -> None:
    payload = boot_sector(b"resumed") + bytes(range(256)) * (16 << 12)  # 16 MiB that are not all zeros
    raw = images.root / "disk.raw"
    raw.write_bytes(payload)
    images.bytes_per_second = 4 << 20  # about four seconds for the whole file
    with vmquota_serve(tmp_path) as first:
        client = Client(first.url)
        client.post("/api/v1/namespaces", {"metadata": {"name": "imports"}})
        client.post(vms_path("imports"), imported_vm("web", images.url("disk.raw"), disk="32Mi"))
        vm_path = f"{vms_path('imports')}/web"

        def progress() -> float:
            entry = client.get(vm_path)["status"]["dataVolumes"][0]
            return float(entry["progress"].rstrip("%")) if entry["phase"] == "ImportInProgress" else 0.0

        wait_until(lambda: progress() >= 20.0, timeout=30, what="the import to be well under way")
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        client.close()
    uid_dirs = list((tmp_path / "data" / "disks" / "imports").iterdir())
    assert [p.name for d in uid_dirs for p in d.iterdir()] == ["web-root.download"]  # no half-made disk
    images.bytes_per_second = None
    with vmquota_serve(tmp_path) as second:
        client = Client(second.url)
        wait_until(lambda: client.get(vm_path)["status"]["dataVolumes"][0]["phase"] == "Succeeded", timeout=30,
                   what="the import to resume and finish")
        client.close()
    [disk] = [p for d in uid_dirs for p in d.iterdir()]
    assert disk.name == "web-root.qcow2"
    assert subprocess.run(["qemu-img", "check", "-q", str(disk)], check=False).returncode == 0
    assert guest_bytes(disk, len(payload)) == payload
    resumed_from = [int(r.split("=")[1].split("-")[0]) for p, r in images.requests if p == "/disk.raw" and r]
    assert max(resumed_from) > len(payload) // 10  # the second server asked for the rest, not for it all again
