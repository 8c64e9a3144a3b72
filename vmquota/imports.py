"""Disk images from URLs, as CDI's `http` source imports them: probed, downloaded (resumably), checked, unpacked.

Bottom layer, beside `disks.py` (which converts with qemu-img). Three steps, each a plain function:

* `probe(url, size)` reads the first 64 KiB (a ranged GET) and refuses at once what can be refused from them:
  a URL that does not answer 2xx, a file that is not a disk image, an uncompressed image whose virtual size
  exceeds the request. The API calls it before it admits a VM, so those refusals are synchronous. A compressed
  image's size is only known once unpacked: that refusal comes from `unpack`, as the import's Failed phase.
* `download(url, dest, ...)` appends to `dest` from where an earlier, interrupted run stopped (an HTTP Range
  request), so a server killed mid-import resumes it; a server without ranges restarts it from byte 0.
* `verify(path, checksum)` and `unpack(path, out, size)` finish it; `disks.Disks.import_image` converts.

Errors are `ImportFailed`; `permanent` tells whether trying again could help (a checksum mismatch cannot, a
dropped connection can). urllib is enough here: one GET at a time, with Range and timeouts, no sessions.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import gzip
import hashlib
import logging
import lzma
import os
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from vmquota import errors, quantity, vmspec
from vmquota.disks import Disks

log = logging.getLogger(__name__)

HEAD_BYTES = 65536  # enough for a qcow2 header, a boot sector, a GPT header and an ISO 9660 descriptor
CHUNK = 1 << 20
TIMEOUT_SECONDS = 15.0
COMPRESSED_SLACK = Decimal(64 << 20)  # a qcow2 file may be this much larger than its virtual size (metadata)


class ImportFailed(errors.HypervisorError):
    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class Format(enum.StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"  # a raw disk, or an ISO 9660 image (which is a raw disk too)
    XZ = "xz"
    GZIP = "gzip"


@dataclass(frozen=True)
class Sniffed:
    format: Format
    virtual_size: int | None  # None when it is compressed: known only once unpacked


def sniff(head: bytes, length: int | None) -> Sniffed | None:
    """What the first bytes of a file say it is; None when it is no disk image vmquota imports."""
    if head[:4] == b"QFI\xfb" and len(head) >= 32:
        return Sniffed(Format.QCOW2, int.from_bytes(head[24:32], "big"))
    if head[:6] == b"\xfd7zXZ\x00":
        return Sniffed(Format.XZ, None)
    if head[:2] == b"\x1f\x8b":
        return Sniffed(Format.GZIP, None)
    boot_sector = len(head) >= 512 and head[510:512] == b"\x55\xaa"  # MBR, FAT, SYSLINUX, a hybrid ISO
    gpt = head[512:520] == b"EFI PART"
    iso9660 = head[0x8001:0x8006] == b"CD001"
    ext = head[1080:1082] == b"\x53\xef"
    if boot_sector or gpt or iso9660 or ext:
        return Sniffed(Format.RAW, length)
    return None


def describe_url(url: str) -> str:
    return url if len(url) <= 200 else url[:200] + "..."


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; an import follows only http and https."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        if not newurl.lower().startswith(("http://", "https://")):
            raise urllib.error.HTTPError(newurl, code, "redirected to a URL that is not http or https", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _http_opener() -> urllib.request.OpenerDirector:
    """An opener with http and https only: no file://, ftp:// or data: handler, and no proxy from the environment."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.HTTPHandler, urllib.request.HTTPSHandler, _HttpOnlyRedirects,
                    urllib.request.HTTPDefaultErrorHandler, urllib.request.HTTPErrorProcessor):
        opener.add_handler(handler())
    return opener


_OPENER = _http_opener()


def _open(url: str, start: int = 0, end: int | None = None) -> tuple[object, int]:
    """A GET from byte `start` (to `end`); returns the response and its status. HTTP errors raise ImportFailed."""
    request = urllib.request.Request(url, headers={"User-Agent": "vmquota-importer"})
    if start or end is not None:
        request.add_header("Range", f"bytes={start}-{'' if end is None else end}")
    try:
        response = _OPENER.open(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as e:
        if e.code == 416:
            return e, 416
        permanent = 400 <= e.code < 500 and e.code not in (408, 429)
        raise ImportFailed(f"{describe_url(url)} answered HTTP {e.code} {e.reason}", permanent=permanent) from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ImportFailed(f"cannot reach {describe_url(url)}: {reason}", permanent=False) from e
    if response is None:  # a scheme the opener has no handler for
        raise ImportFailed(f"{describe_url(url)}: only http and https URLs are imported", permanent=True)
    return response, int(response.status)


def _total_length(response: object, status: int) -> int | None:
    headers = response.headers  # type: ignore[attr-defined]
    if status == 206:
        total = (headers.get("Content-Range") or "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def probe(url: str, size: Decimal) -> Sniffed:
    """The synchronous checks of an import: the URL answers, it is a disk image, it fits `size` if uncompressed."""
    response, status = _open(url, 0, HEAD_BYTES - 1)
    if status == 416:  # an empty file
        raise ImportFailed(f"{describe_url(url)} is empty, not a disk image", permanent=True)
    try:
        total = _total_length(response, status)
        head = response.read(HEAD_BYTES)  # type: ignore[attr-defined]
    except OSError as e:
        raise ImportFailed(f"reading {describe_url(url)}: {e}", permanent=False) from e
    finally:
        response.close()  # type: ignore[attr-defined]
    sniffed = sniff(head, total)
    if sniffed is None:
        raise ImportFailed(f"{describe_url(url)} is not a disk image (qcow2, raw or ISO, optionally xz or gzip)",
                           permanent=True)
    check_fits(sniffed.virtual_size, size)
    return sniffed


def check_fits(virtual_size: int | None, size: Decimal) -> None:
    if virtual_size is not None and virtual_size > size:
        raise ImportFailed(f"the image's virtual size {quantity.format(Decimal(virtual_size))} exceeds the requested "
                           f"storage {quantity.format(size)}", permanent=True)


def download(url: str, dest: Path, *, limit: Decimal, cancel: threading.Event,
             progress: Callable[[int, int | None], None]) -> None:
    """Fetch `url` into `dest`, continuing an earlier partial download; at most `limit` bytes."""
    have = dest.stat().st_size if dest.exists() else 0
    response, status = _open(url, have)
    if status == 416:  # nothing after byte `have`: the earlier run had it all
        response.close()  # type: ignore[attr-defined]
        return
    total = _total_length(response, status)
    if status != 206:
        have = 0  # no ranges: start again
    if total is not None and total > limit:
        response.close()  # type: ignore[attr-defined]
        raise ImportFailed(f"{describe_url(url)} is {quantity.format(Decimal(total))}, larger than the requested "
                           f"storage allows", permanent=True)
    try:
        with dest.open("r+b" if have else "wb") as out:
            out.seek(have)
            out.truncate()
            done = have

            def wrote(count: int) -> None:
                nonlocal done
                if cancel.is_set():
                    raise ImportFailed("the import was cancelled", permanent=False)
                done += count
                if done > limit:
                    raise ImportFailed(f"{describe_url(url)} is larger than the requested storage allows",
                                       permanent=True)
                progress(done, total)

            if not _splice_body(response, out, wrote):
                while chunk := response.read(CHUNK):  # type: ignore[attr-defined]
                    out.write(chunk)
                    wrote(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        raise ImportFailed(f"downloading {describe_url(url)}: {e}", permanent=False) from e
    finally:
        response.close()  # type: ignore[attr-defined]
    if total is not None and done < total:
        raise ImportFailed(f"{describe_url(url)} ended after {done} of {total} bytes", permanent=False)


SPLICE_CHUNK = 1 << 20
F_SETPIPE_SZ = 1031  # fcntl's, for a pipe that holds a whole chunk


def _splice_body(response: Any, out: Any, wrote: Callable[[int], None]) -> bool:
    """The rest of a plain-HTTP body with a known length, moved from the socket to the file by the kernel
    (splice(2) through a pipe): no copy through Python, which made the download, not qemu-img, the slow half
    of an import. False, having read nothing, for what it cannot move (TLS, chunked, no length)."""
    fp = getattr(response, "fp", None)
    sock = getattr(getattr(fp, "raw", None), "_sock", None)
    length = getattr(response, "length", None)
    if fp is None or type(sock) is not socket.socket or getattr(response, "chunked", True) or not length or \
            not hasattr(os, "splice"):
        return False  # an SSLSocket is a socket.socket too, and splicing it would copy ciphertext
    out.flush()
    buffered = fp.read(len(fp.peek(1)[:length]))  # what http.client's reader holds already
    os.write(out.fileno(), buffered)
    wrote(len(buffered))
    left = length - len(buffered)
    read_end, write_end = os.pipe()
    # Python's timeout makes the socket non-blocking underneath, and each splice would then move only what has
    # arrived, with a select between: blocking, with the kernel's own receive timeout, moves whole chunks.
    saved = sock.gettimeout()
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(TIMEOUT_SECONDS), 0))
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, F_SETPIPE_SZ, SPLICE_CHUNK)
        while left > 0:
            try:
                moved = os.splice(sock.fileno(), write_end, min(left, SPLICE_CHUNK))
            except BlockingIOError:  # SO_RCVTIMEO ran out
                raise TimeoutError(f"no data for {TIMEOUT_SECONDS:g} s") from None
            if not moved:
                raise OSError("the server closed the connection early")
            written = 0
            while written < moved:
                written += os.splice(read_end, out.fileno(), moved - written)
            left -= moved
            wrote(moved)
    finally:
        os.close(read_end)
        os.close(write_end)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
        sock.settimeout(saved)
    out.seek(0, os.SEEK_END)  # the file object's position, after writes it did not make
    return True


def verify(path: Path, checksum: str) -> None:
    algorithm, _, expected = checksum.partition(":")
    digest = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != expected.lower():
        raise ImportFailed(f"checksum mismatch: the file's {algorithm} is {digest.hexdigest()}, not {expected}",
                           permanent=True)


def unpack(path: Path, out: Path, size: Decimal) -> Sniffed:
    """`path` as a disk image in `out` (unpacked when xz or gzip), checked to be one and to fit `size`."""
    with path.open("rb") as f:
        head = f.read(HEAD_BYTES)
    sniffed = sniff(head, path.stat().st_size)
    if sniffed is None:
        raise ImportFailed("the downloaded file is not a disk image (qcow2, raw or ISO, optionally xz or gzip)",
                           permanent=True)
    if sniffed.format in (Format.XZ, Format.GZIP):
        opener = lzma.open if sniffed.format is Format.XZ else gzip.open
        limit = size + COMPRESSED_SLACK  # no unpacked file, however it was made, may fill the host's disk
        written = 0
        try:
            with opener(path, "rb") as packed, out.open("wb") as unpacked:
                while chunk := packed.read(CHUNK):
                    written += len(chunk)
                    if written > limit:
                        raise ImportFailed(f"the image unpacks to more than the requested storage "
                                           f"{quantity.format(size)}", permanent=True)
                    unpacked.write(chunk)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise ImportFailed(f"unpacking the {sniffed.format.value} file: {e}", permanent=True) from e
        with out.open("rb") as f:
            head = f.read(HEAD_BYTES)
        sniffed = sniff(head, out.stat().st_size)
        if sniffed is None or sniffed.format not in (Format.QCOW2, Format.RAW):
            raise ImportFailed("the unpacked file is not a disk image (qcow2, raw or ISO)", permanent=True)
    else:
        out.unlink(missing_ok=True)
        os.link(path, out)  # the same bytes under the name the conversion reads
    check_fits(sniffed.virtual_size, size)
    return sniffed


# -- running imports: one thread each -----------------------------------------------------------------

class Phase(enum.StrEnum):
    """CDI's DataVolume phases, as a VM's status.dataVolumes shows them."""

    PENDING = "Pending"  # a blank disk not made yet
    IMPORT_SCHEDULED = "ImportScheduled"  # admitted; the download has not begun
    IMPORT_IN_PROGRESS = "ImportInProgress"  # downloading, checking, converting
    CLONE_SCHEDULED = "CloneScheduled"  # a pvc source, not copied yet
    UPLOAD_READY = "UploadReady"  # an upload source waiting for its image (`uploads.py`), or for a retry of it
    SUCCEEDED = "Succeeded"  # the disk exists
    FAILED = "Failed"  # the import failed; `message` says why


@dataclass(frozen=True)
class Progress:
    phase: Phase
    progress: str = "N/A"  # CDI's "45.20%"
    message: str = ""


@dataclass(frozen=True)
class Job:
    """One disk to import: whose, which, from where, into which file."""

    namespace: str
    name: str
    uid: str
    disk: vmspec.Disk
    target: Path


RETRY_BASE_SECONDS = 10.0
RETRY_MAX_SECONDS = 300.0
REPORT_EVERY_SECONDS = 1.0


@dataclass
class _Failure:
    progress: Progress
    retry_at: float | None  # None: permanent; tried again only after a restart of the server
    attempts: int


class Runner:
    """Runs each import on a thread of its own, so a long download holds no reconcile worker and a VM's other
    work (a delete) is not stuck behind it. What it did is told through `report` (throttled progress) and
    `finished` (success or failure: the controller looks at the VM again)."""

    def __init__(self, disks: Disks, *, report: Callable[[Job, Progress], None],
                 finished: Callable[[Job], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.disks = disks
        self._report, self._finished, self._clock = report, finished, clock
        self._lock = threading.Lock()
        self._running: dict[tuple[str, str], tuple[threading.Thread, threading.Event]] = {}
        self._failures: dict[tuple[str, str], _Failure] = {}

    def ensure(self, job: Job) -> Progress | None:
        """Start the import unless it runs already; its failure when it failed and is not due for a retry."""
        key = (job.uid, job.disk.name)
        with self._lock:
            if key in self._running:
                return None
            failure = self._failures.get(key)
            if failure and (failure.retry_at is None or failure.retry_at > self._clock()):
                return failure.progress
            cancel = threading.Event()
            thread = threading.Thread(target=self._run, args=(job, cancel), daemon=True,
                                      name=f"import-{job.namespace}-{job.name}-{job.disk.name}")
            self._running[key] = (thread, cancel)
            thread.start()
        return None

    def cancel(self, uid: str, timeout: float = 60.0) -> bool:
        """Stop every import of the VM `uid` and wait for them; False if one is still busy (in qemu-img)."""
        with self._lock:
            jobs = [(key, thread, cancel) for key, (thread, cancel) in self._running.items() if key[0] == uid]
            for key in [k for k in self._failures if k[0] == uid]:
                del self._failures[key]
        for _, _, cancel in jobs:
            cancel.set()
        for _, thread, _ in jobs:
            thread.join(timeout)
        return not any(thread.is_alive() for _, thread, _ in jobs)

    def busy(self) -> bool:
        with self._lock:
            return bool(self._running)

    def _run(self, job: Job, cancel: threading.Event) -> None:
        key = (job.uid, job.disk.name)
        try:
            self._import(job, cancel)
        except errors.HypervisorError as e:  # ImportFailed, or qemu-img refusing the file
            permanent = getattr(e, "permanent", True)
            if permanent:
                job.target.with_suffix(".download").unlink(missing_ok=True)  # no use resuming it
            with self._lock:
                attempts = self._failures[key].attempts + 1 if key in self._failures else 1
                retry_at = None if permanent else self._clock() + min(
                    RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (attempts - 1))
                failed = Progress(Phase.FAILED, message=str(e))
                self._failures[key] = _Failure(failed, retry_at, attempts)
            if not cancel.is_set():
                log.warning("importing %s/%s disk %s: %s", job.namespace, job.name, job.disk.name, e)
                self._report(job, failed)
        except Exception:
            log.exception("importing %s/%s disk %s", job.namespace, job.name, job.disk.name)
            with self._lock:
                self._failures[key] = _Failure(Progress(Phase.FAILED, message="internal error"),
                                               self._clock() + RETRY_MAX_SECONDS, 1)
        else:
            with self._lock:
                self._failures.pop(key, None)
        finally:
            for suffix in (".image", ".partial"):
                job.target.with_suffix(suffix).unlink(missing_ok=True)
            with self._lock:
                del self._running[key]
            if not cancel.is_set():
                self._finished(job)

    def _import(self, job: Job, cancel: threading.Event) -> None:
        source, size = job.disk.source, job.disk.size
        download_path, image = job.target.with_suffix(".download"), job.target.with_suffix(".image")
        job.target.parent.mkdir(parents=True, exist_ok=True)
        last = [0.0, -1.0]  # when the last report went out, and the percentage it gave

        def progress(done: int, total: int | None) -> None:
            percent = 100.0 * done / total if total else 0.0
            now = self._clock()
            if now - last[0] >= REPORT_EVERY_SECONDS and percent - last[1] >= 1.0:
                last[:] = [now, percent]
                self._report(job, Progress(Phase.IMPORT_IN_PROGRESS, f"{min(percent, 99.99):.2f}%"))

        self._report(job, Progress(Phase.IMPORT_IN_PROGRESS, "0.00%"))
        download(source.url, download_path, limit=size + COMPRESSED_SLACK, cancel=cancel, progress=progress)
        if source.checksum:
            verify(download_path, source.checksum)
        sniffed = unpack(download_path, image, size)
        if cancel.is_set():
            raise ImportFailed("the import was cancelled", permanent=False)
        self._report(job, Progress(Phase.IMPORT_IN_PROGRESS, "100.00%", "converting"))
        self.disks.import_image(image, sniffed.format.value, job.target, size)
        download_path.unlink(missing_ok=True)
