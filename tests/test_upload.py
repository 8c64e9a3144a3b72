"""Uploads (CDI's `upload: {}` source, `vmquota image-upload`): a local image streamed into a VM's data volume,
on libvirt's simulated host with real qemu-img. What is accepted becomes a whole disk grown to its request;
everything refused is refused before the body is read where it can be, and leaves no file beside the disk."""

from __future__ import annotations

import gzip
import http.client
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import Cluster, events_path, vm_manifest, wait_until
from test_guest_disks import boot_sector, guest_bytes, qcow2
from test_tenants import Tenants, tenants  # noqa: F401  (the secure server's fixture)

from vmquota.apiserver import http as wire
from vmquota.client import Client, ClientError, upload_path

pytestmark = pytest.mark.timeout(120)


def upload_vm(name: str, disk: str = "64Mi") -> dict[str, Any]:
    manifest = vm_manifest(name, cores=1, memory="64Mi", disk=disk)
    manifest["spec"]["dataVolumeTemplates"][0]["spec"]["source"] = {"upload": {}}
    return manifest


def upload(cluster: Cluster, data_volume: str, data: bytes, *, client: Client | None = None,
           namespace: str | None = None) -> Any:
    return (client or cluster.client).upload(upload_path(namespace or cluster.ns, data_volume), io.BytesIO(data),
                                             len(data))


def refusal(call: Any, *args: Any, **kwargs: Any) -> ClientError:
    with pytest.raises(ClientError) as caught:
        call(*args, **kwargs)
    return caught.value


def volume(cluster: Cluster, name: str) -> dict[str, Any]:
    [entry] = cluster.vm(name)["status"]["dataVolumes"]
    return dict(entry)


def vm_files(cluster: Cluster, name: str) -> list[str]:
    """What the VM's disk folder holds, but the upload lock (an empty file that stays with the folder)."""
    folder = cluster.app.controller.disks.vm_dir(cluster.ns, cluster.vm(name)["metadata"]["uid"])
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".upload-lock")) if folder.exists() else []


def reasons(cluster: Cluster, name: str) -> list[str]:
    return [e["reason"] for e in cluster.client.get(events_path(cluster.ns))["items"]
            if e["involvedObject"]["name"] == name]


def raw_qcow2(tmp_path: Path, size: str, payload: bytes) -> bytes:
    return qcow2(tmp_path / "image.qcow2", size, data=payload).read_bytes()


# -- what is accepted ---------------------------------------------------------------------------------------

def test_an_uploaded_qcow2_becomes_the_disk_grown_to_its_request_and_the_vm_starts(cluster: Cluster,
                                                                                  tmp_path: Path) -> None:
    cluster.create_quota({"requests.storage": "1Gi"})
    created = cluster.create_vm(upload_vm("up"))
    assert created["status"]["dataVolumes"] == [{"name": "up-root", "phase": "UploadReady", "progress": "N/A"}]
    assert cluster.used()["requests.storage"] == "64Mi"  # admitted with the VM, before any byte is sent
    cluster.settle()
    assert vm_files(cluster, "up") == []  # no blank disk in its place

    payload = boot_sector(b"vmquota-upload")
    answer = upload(cluster, "up-root", raw_qcow2(tmp_path, "16M", payload))
    assert answer["status"] == "Success" and "qcow2" in answer["message"]
    assert volume(cluster, "up")["phase"] == "Succeeded"
    disk = cluster.app.controller.disks.path(cluster.ns, cluster.vm("up")["metadata"]["uid"], "up-root")
    assert cluster.app.controller.disks.virtual_size(disk) == 64 << 20
    assert guest_bytes(disk, len(payload)) == payload
    assert vm_files(cluster, "up") == ["up-root.qcow2"]
    assert "UploadSucceeded" in reasons(cluster, "up")

    cluster.action("up", "start")
    cluster.wait_status("up", "Running")
    conditions = {c["type"]: c for c in cluster.vm("up")["status"]["conditions"]}
    assert conditions["DataVolumesReady"]["status"] == "True"


def test_a_start_before_the_upload_waits_for_it_and_keeps_its_charge(cluster: Cluster, tmp_path: Path) -> None:
    cluster.create_quota({"limits.cpu": "1", "requests.storage": "1Gi"})
    cluster.create_vm(upload_vm("early"))
    cluster.action("early", "start")
    cluster.settle()
    assert cluster.status("early") == "Starting"
    assert cluster.used()["limits.cpu"] == "1"
    upload(cluster, "early-root", raw_qcow2(tmp_path, "8M", boot_sector()))
    cluster.wait_status("early", "Running")


def test_a_gzip_compressed_raw_image_is_unpacked_as_an_http_import_is(cluster: Cluster) -> None:
    cluster.create_vm(upload_vm("packed"))
    payload = boot_sector(b"packed")
    upload(cluster, "packed-root", gzip.compress(payload.ljust(1 << 20, b"\0")))
    disk = cluster.app.controller.disks.path(cluster.ns, cluster.vm("packed")["metadata"]["uid"], "packed-root")
    assert guest_bytes(disk, len(payload)) == payload
    assert vm_files(cluster, "packed") == ["packed-root.qcow2"]


@pytest.mark.parametrize("compressed", [False, True])
def test_a_qcow2_is_the_disk_as_it_is_unless_its_clusters_are_compressed(cluster: Cluster, tmp_path: Path,
                                                                        compressed: bool) -> None:
    """A plain qcow2 is not converted (that would write it twice); a compressed one is, so the guest does not
    decompress on every read. Either way the guest sees the image's bytes."""
    cluster.create_vm(upload_vm("qc"))
    plain = qcow2(tmp_path / "plain.qcow2", "16M", data=boot_sector(b"qc") * 64)
    image = tmp_path / "sent.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", *(["-c"] if compressed else []), "-O", "qcow2", str(plain),
                    str(image)], check=True)
    assert _compressed_clusters(image) == (1 if compressed else 0)
    upload(cluster, "qc-root", image.read_bytes())
    disk = cluster.app.controller.disks.path(cluster.ns, cluster.vm("qc")["metadata"]["uid"], "qc-root")
    assert _compressed_clusters(disk) == 0
    assert guest_bytes(disk, 512 * 64) == boot_sector(b"qc") * 64


def _compressed_clusters(path: Path) -> int:
    report = subprocess.run(["qemu-img", "check", "--output=json", str(path)], capture_output=True, text=True,
                            check=True).stdout
    return int(json.loads(report).get("compressed-clusters", 0))


def test_a_dry_run_answers_whether_the_upload_would_be_taken_and_writes_nothing(cluster: Cluster) -> None:
    cluster.create_vm(upload_vm("dry"))
    answer = cluster.client.upload(upload_path(cluster.ns, "dry-root") + "?dryRun=All", io.BytesIO(b"x" * 512), 512)
    assert answer["status"] == "Success" and "dry run" in answer["message"]
    assert vm_files(cluster, "dry") == [] and volume(cluster, "dry")["phase"] == "UploadReady"


# -- what is refused, and leaves nothing ---------------------------------------------------------------------

def test_a_file_that_is_no_disk_image_is_refused_and_said_on_the_vm(cluster: Cluster) -> None:
    cluster.create_vm(upload_vm("junk"))
    error = refusal(upload, cluster, "junk-root", b"just some text, no disk image\n" * 100)
    assert error.code == 422 and "not a disk image" in error.message
    assert vm_files(cluster, "junk") == []
    entry = volume(cluster, "junk")
    assert entry["phase"] == "UploadReady" and "not a disk image" in entry["message"]
    assert "UploadFailed" in reasons(cluster, "junk")


def test_an_image_whose_virtual_size_exceeds_the_request_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    cluster.create_vm(upload_vm("big", disk="32Mi"))
    error = refusal(upload, cluster, "big-root", raw_qcow2(tmp_path, "1G", boot_sector()))
    assert error.code == 422 and "virtual size 1Gi exceeds the requested storage 32Mi" in error.message
    assert vm_files(cluster, "big") == []


def test_a_body_larger_than_the_request_allows_is_refused_before_it_is_sent(cluster: Cluster) -> None:
    cluster.create_vm(upload_vm("huge", disk="1Mi"))
    sent: list[int] = []
    length = 200 << 20  # more than 1Mi and the slack a qcow2 may need; never read, so never made
    error = refusal(cluster.client.upload, upload_path(cluster.ns, "huge-root"), _Zeros(length), length,
                    progress=sent.append)
    assert error.code == 413 and error.reason == "RequestEntityTooLarge"
    assert sent == []  # the client waited for `100 Continue`, which never came
    assert vm_files(cluster, "huge") == []


def test_a_refusal_reaches_a_client_that_sends_its_body_without_waiting(cluster: Cluster) -> None:
    """A client without `Expect: 100-continue` (a script's POST): the server drops the body (up to 64 MiB) and
    answers, instead of a broken pipe."""
    body = b"\0" * (16 << 20)
    conn = _connection(cluster)
    conn.request("POST", upload_path(cluster.ns, "nosuch-root"), body=body)
    response = conn.getresponse()
    assert response.status == 404 and b"not found" in response.read()
    conn.close()


def test_a_body_cut_short_is_refused_and_leaves_no_half_disk(cluster: Cluster, tmp_path: Path) -> None:
    cluster.create_vm(upload_vm("cut"))
    image = raw_qcow2(tmp_path, "8M", boot_sector())
    conn = _connection(cluster)
    conn.putrequest("POST", upload_path(cluster.ns, "cut-root"))
    conn.putheader("Content-Length", str(len(image) + 4096))
    conn.endheaders()
    conn.send(image)
    conn.sock.shutdown(1)  # the client's side ends; the server sees the body end early
    response = conn.getresponse()
    assert response.status == 400 and b"ended after" in response.read()
    conn.close()
    wait_until(lambda: "UploadFailed" in reasons(cluster, "cut"), what="the failure to be recorded")
    assert vm_files(cluster, "cut") == []


def test_a_stalled_upload_ends_and_lets_go_of_the_volume(cluster: Cluster, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "UPLOAD_STALL_SECONDS", 1.0)
    cluster.create_vm(upload_vm("stall"))
    image = raw_qcow2(tmp_path, "8M", boot_sector(b"stall"))
    conn = _connection(cluster)
    conn.putrequest("POST", upload_path(cluster.ns, "stall-root"))
    conn.putheader("Content-Length", str(len(image)))
    conn.endheaders()
    conn.send(image[:len(image) // 2])  # and then nothing
    response = conn.getresponse()
    assert response.status == 400 and b"ended after" in response.read()
    conn.close()
    assert vm_files(cluster, "stall") == []
    assert upload(cluster, "stall-root", image)["status"] == "Success"  # the lock is free again


@pytest.mark.parametrize(("volume_name", "code", "words"), [
    ("nosuch", 404, 'datavolumes.cdi.kubevirt.io "nosuch" not found'),
    ("plain-root", 400, "has a blank source"),
])
def test_an_upload_into_a_volume_that_takes_none_is_refused(cluster: Cluster, volume_name: str, code: int,
                                                          words: str) -> None:
    cluster.create_vm(vm_manifest("plain", cores=1, memory="64Mi", disk="64Mi"))
    error = refusal(upload, cluster, volume_name, boot_sector())
    assert error.code == code and words in error.message


def test_a_second_upload_into_an_uploaded_volume_is_a_conflict(cluster: Cluster, tmp_path: Path) -> None:
    cluster.create_vm(upload_vm("once"))
    upload(cluster, "once-root", raw_qcow2(tmp_path, "8M", boot_sector(b"first")))
    error = refusal(upload, cluster, "once-root", boot_sector(b"second"))
    assert error.code == 409 and "uploaded already" in error.message
    disk = cluster.app.controller.disks.path(cluster.ns, cluster.vm("once")["metadata"]["uid"], "once-root")
    assert guest_bytes(disk, 512) == boot_sector(b"first")


def test_two_uploads_at_once_into_one_volume_the_second_is_a_conflict(cluster: Cluster, tmp_path: Path) -> None:
    cluster.create_vm(upload_vm("race"))
    image = raw_qcow2(tmp_path, "8M", boot_sector(b"race"))
    first = _connection(cluster)
    first.putrequest("POST", upload_path(cluster.ns, "race-root"))
    first.putheader("Content-Length", str(len(image)))
    first.endheaders()
    first.send(image[:len(image) // 2])
    disk_dir = cluster.app.controller.disks.vm_dir(cluster.ns, cluster.vm("race")["metadata"]["uid"])
    wait_until(lambda: (disk_dir / "race-root.upload").exists(), what="the first upload to begin")
    error = refusal(upload, cluster, "race-root", image)
    assert error.code == 409 and "in progress" in error.message
    first.send(image[len(image) // 2:])
    assert first.getresponse().status == 200
    first.close()
    assert volume(cluster, "race")["phase"] == "Succeeded"


def test_the_storage_of_an_upload_volume_is_admitted_with_its_vm(cluster: Cluster) -> None:
    cluster.create_quota({"requests.storage": "100Mi"})
    error = refusal(cluster.create_vm, upload_vm("over", disk="200Mi"))
    assert error.code == 403 and "exceeded quota: compute" in error.message
    assert "requested: requests.storage=200Mi" in error.message


# -- authorization ---------------------------------------------------------------------------------------

def test_uploading_takes_create_on_datavolumes_upload_which_edit_holds_and_view_does_not(
        tenants: Tenants, tmp_path: Path) -> None:  # noqa: F811
    tenants.admin.post(f"/apis/kubevirt.io/v1/namespaces/{tenants.dev}/virtualmachines", upload_vm("shared"))
    tenants.bind(tenants.dev, "view", user="victor")
    victor = tenants.as_user("victor")
    image = raw_qcow2(tmp_path, "8M", boot_sector())
    error = refusal(victor.upload, upload_path(tenants.dev, "shared-root"), io.BytesIO(image), len(image))
    assert error.code == 403
    assert error.message == (f'datavolumes.upload.cdi.kubevirt.io "shared-root" is forbidden: User "victor" cannot '
                             f'create resource "datavolumes/upload" in API group "upload.cdi.kubevirt.io" in the '
                             f'namespace "{tenants.dev}"')
    alice = tenants.as_user("alice", "team-a")
    assert alice.upload(upload_path(tenants.dev, "shared-root"), io.BytesIO(image), len(image))["status"] == "Success"


# -- the command ------------------------------------------------------------------------------------------

def image_upload(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmquota", "--server", cluster.app.url, "image-upload", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_image_upload_streams_the_file_with_progress_and_exit_codes(cluster: Cluster, tmp_path: Path) -> None:
    cluster.create_vm(upload_vm("cli"))
    image = tmp_path / "disk.raw"
    image.write_bytes(boot_sector(b"cli").ljust(3 << 20, b"\0"))
    wrong = image_upload(cluster, "dv", "cli-root", "-n", cluster.ns, "--image-path", str(image), "--size", "1Gi")
    assert wrong.returncode == 1 and "requests 64Mi, not 1Gi" in wrong.stderr

    done = image_upload(cluster, "dv", "cli-root", "-n", cluster.ns, "--image-path", str(image), "--size", "64Mi")
    assert done.returncode == 0, done.stderr
    assert "3.0 MiB / 3.0 MiB (100%)" in done.stderr and "completed successfully" in done.stderr
    assert "uploaded 3145728 bytes (raw) into cli-root" in done.stdout
    assert volume(cluster, "cli")["phase"] == "Succeeded"

    again = image_upload(cluster, "dv", "cli-root", "-n", cluster.ns, "--image-path", str(image))
    assert again.returncode == 1 and "uploaded already" in again.stderr
    missing = image_upload(cluster, "dv", "cli-root", "-n", cluster.ns, "--image-path", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "cannot read --image-path" in missing.stderr


# -- helpers ------------------------------------------------------------------------------------------------

def _connection(cluster: Cluster) -> http.client.HTTPConnection:
    parts = urlsplit(cluster.app.url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)


class _Zeros(io.RawIOBase):
    """`length` zero bytes, made as they are read."""

    def __init__(self, length: int) -> None:
        self.left = length

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return b"\0" * size
