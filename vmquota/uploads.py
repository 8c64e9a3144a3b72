"""Disk images sent by a client, as CDI's upload source takes them: streamed to a file, checked, converted.

Bottom layer, beside `imports.py`, whose checks it shares: an upload is an import whose bytes come from the
request body instead of a URL. `receive(body, length, ...)` runs while the API server reads the request
(`apiserver/upload.py`, through `Api.upload`):

* the length is bounded before a byte is read: at most the data volume's requested size plus the slack a qcow2
  or compressed file may take (`imports.COMPRESSED_SLACK`); the storage itself was admitted with the VM;
* the first 64 KiB decide at once whether it is a disk image and, uncompressed, whether it fits
  (`imports.sniff`, `imports.check_fits`); the rest is then refused unread;
* the whole file is unpacked and checked again (`imports.unpack`) and converted by `Disks.import_image`, so the
  disk appears whole under its name or not at all: every temporary file is removed whatever happens.

One upload at a time per disk: an `flock` on a lock file beside the disk, held from the first byte to the
rename, across the API processes. The disk's absence is checked again under it, so a second upload can
never replace a disk the first one made.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Protocol

from vmquota import errors, imports, quantity
from vmquota.disks import Disks

CHUNK = 1 << 20
SUFFIXES = (".upload", ".image", ".partial")  # what an upload writes beside the disk before the rename


class Readable(Protocol):
    """Where the image comes from: the request's body on its connection."""

    def read(self, size: int = -1, /) -> bytes: ...


class UploadRefused(errors.VmquotaError):
    """The body cannot become the disk; `code` is the HTTP status the client gets (413, 409, 422, 400)."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def limit_for(size: Decimal) -> int:
    """The most bytes an upload into a disk of `size` may send: the size, and the room a qcow2's metadata or a
    badly compressing file may need beyond it."""
    return int(size + imports.COMPRESSED_SLACK)


def check_length(length: int, size: Decimal) -> None:
    if length <= 0:
        raise UploadRefused("the upload is empty: send the image as the request body, with its Content-Length",
                            code=400)
    if length > limit_for(size):
        raise UploadRefused(f"the upload is {quantity.format(Decimal(length))}, more than the data volume's "
                            f"requested storage {quantity.format(size)} allows", code=413)


@contextlib.contextmanager
def exclusive(target: Path) -> Iterator[None]:
    """Hold the disk's upload lock, or refuse at once with a 409 while another upload holds it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.with_suffix(".upload-lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UploadRefused("another upload into this data volume is in progress", code=409) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def receive(body: Readable, length: int, *, target: Path, size: Decimal, disks: Disks,
            progress: Callable[[int], None] = lambda done: None) -> imports.Sniffed:
    """Read `length` bytes of `body` into the disk `target` (a qcow2 of `size`); what the image was.

    Call it holding `exclusive(target)`, with the disk absent. Raises `UploadRefused` (the client's fault) or
    `errors.HypervisorError` (qemu-img failed); either way nothing is left beside the disk.
    """
    check_length(length, size)
    upload, image = target.with_suffix(".upload"), target.with_suffix(".image")
    try:
        _stream(body, length, upload, size, progress)
        try:
            sniffed = imports.unpack(upload, image, size)
        except imports.ImportFailed as e:
            raise UploadRefused(str(e), code=422) from e
        disks.import_image(image, sniffed.format.value, target, size)
        return sniffed
    finally:
        for suffix in SUFFIXES:
            target.with_suffix(suffix).unlink(missing_ok=True)


def _stream(body: Readable, length: int, upload: Path, size: Decimal, progress: Callable[[int], None]) -> None:
    done = 0
    with upload.open("wb") as out:
        while done < length:
            chunk = body.read(min(CHUNK, length - done))
            if not chunk:
                raise UploadRefused(f"the upload ended after {done} of its {length} bytes", code=400)
            if done == 0:
                _check_head(chunk, length, size)
            out.write(chunk)
            done += len(chunk)
            progress(done)
        out.flush()
        os.fsync(out.fileno())


def _check_head(head: bytes, length: int, size: Decimal) -> None:
    """What the first chunk (1 MiB, or the whole of a smaller file) tells: refused before the rest is read."""
    sniffed = imports.sniff(head[:imports.HEAD_BYTES], length)
    if sniffed is None:
        raise UploadRefused("the upload is not a disk image (qcow2, raw or ISO, optionally xz or gzip)", code=422)
    try:
        imports.check_fits(sniffed.virtual_size, size)
    except imports.ImportFailed as e:
        raise UploadRefused(str(e), code=422) from e
