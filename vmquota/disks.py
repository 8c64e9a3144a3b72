"""Persistent disks: qcow2 files under `<data-dir>/disks/<namespace>/<vm-uid>/<disk>.qcow2`.

Bottom layer. Every path is built from checked parts (DNS-1123 names, a UUID) and
checked again to lie inside the disk root before qemu-img or the file system sees
it, so no name can reach a path outside the data directory. Only files under that
root are ever created or removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import uuid
from decimal import Decimal
from pathlib import Path

from vmquota import errors

_SAFE_PART = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
QEMU_IMG_TIMEOUT = 600
QCOW2_MAGIC = b"QFI\xfb"  # a qcow2 header: magic, version, backing file, cluster bits, then the size at 24


def make_traversable(folder: Path) -> None:
    """Let QEMU's unprivileged user (libvirt-qemu under libvirt's DAC driver, which chowns the disk files
    themselves) reach the disks below `folder`: it needs search permission on every folder of the path, and
    temporary folders (tempfile's, pytest's /tmp/pytest-of-root) are 0700. Only search (o+x) is added, so their
    listings stay private, and only to folders this process owns."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in (folder, *folder.parents):
        st = path.stat()
        if st.st_uid == os.geteuid() and not st.st_mode & stat.S_IXOTH:
            path.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


class Disks:
    def __init__(self, root: Path, *, qemu_img: str = "qemu-img") -> None:
        self.root = root.resolve()
        self.qemu_img = qemu_img

    def vm_dir(self, namespace: str, uid: str) -> Path:
        if not _SAFE_PART.match(namespace):
            raise errors.HypervisorError(f"unsafe namespace for a disk path: {namespace!r}")
        uuid.UUID(uid)  # raises ValueError for anything but a UUID
        return self._inside(self.root / namespace / uid)

    def path(self, namespace: str, uid: str, disk: str) -> Path:
        if not _SAFE_PART.match(disk):
            raise errors.HypervisorError(f"unsafe disk name for a disk path: {disk!r}")
        return self._inside(self.vm_dir(namespace, uid) / f"{disk}.qcow2")

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise errors.HypervisorError(f"disk path {path} leaves the disk root {self.root}")
        return resolved

    def ensure(self, path: Path, size: Decimal) -> None:
        """Create the qcow2 file, or grow it to `size`; never shrink."""
        if path.exists():
            if self.virtual_size(path) < size:
                self._run(["resize", "-f", "qcow2", str(path), str(int(size))], path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        self._run(["create", "-q", "-f", "qcow2", str(partial), str(int(size))], path)
        partial.rename(path)  # a crash mid-create leaves a .partial, never a half-made disk

    def copy(self, source: Path, target: Path) -> None:
        """A full, independent copy of a disk that no running domain writes to."""
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        self._run(["convert", "-q", "-f", "qcow2", "-O", "qcow2", str(source), str(partial)], target)
        partial.rename(target)

    def import_image(self, image: Path, image_format: str, target: Path, size: Decimal) -> None:
        """Make a downloaded or uploaded image (qcow2 or raw) the disk `target`, grown to `size`.

        An imported qcow2 may name a backing file or an external data file: a path on this host that
        qemu-img would read into the guest's disk. Such an image is refused, not converted. A plain qcow2
        (version 3, no encryption, snapshots or compressed clusters, and `qemu-img check` finds nothing) is
        the disk as it is: converting it would write every byte a second time for the same result, and
        that second write was most of an import's time. Anything else is converted with `qemu-img convert`.
        """
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        as_it_is = False
        if image_format == "qcow2":
            info = json.loads(self._run(["info", "--output=json", "-f", "qcow2", str(image)], target))
            data_file = ((info.get("format-specific") or {}).get("data") or {}).get("data-file")
            if info.get("backing-filename") or data_file:
                raise errors.HypervisorError("the image names a backing or data file on the host: refused")
            as_it_is = _plain_qcow2(info) and self._clean(image)
        if as_it_is:
            os.replace(image, partial)  # the same folder: a rename, no copy (and over a crash's leftover)
        else:
            self._run(["convert", "-q", "-f", image_format, "-O", "qcow2", str(image), str(partial)], target)
        if self.virtual_size(partial) < size:
            self._run(["resize", "-q", "-f", "qcow2", str(partial), str(int(size))], target)
        _fsync(partial)
        partial.rename(target)  # only a whole, checked disk ever has the disk's name

    def _clean(self, image: Path) -> bool:
        """`qemu-img check` finds no corruption, no leak and no compressed cluster (slow for the guest to read)."""
        try:
            done = subprocess.run([self.qemu_img, "check", "--output=json", "-f", "qcow2", str(image)],
                                  capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT, check=False)
            report = json.loads(done.stdout or "{}")
        except (OSError, subprocess.TimeoutExpired, ValueError):
            return False  # then convert decides, and says what is wrong if anything is
        return done.returncode == 0 and not report.get("compressed-clusters") and not report.get("corruptions")

    def virtual_size(self, path: Path) -> Decimal:
        """The size the guest sees, from the qcow2 header (no qemu-img process on every start)."""
        try:
            with path.open("rb") as f:
                header = f.read(32)
        except OSError as e:
            raise errors.HypervisorError(f"reading {path.name}: {e.strerror}") from e
        if len(header) < 32 or header[:4] != QCOW2_MAGIC:
            raise errors.HypervisorError(f"{path.name} is not a qcow2 disk")
        return Decimal(int.from_bytes(header[24:32], "big"))

    def remove_vm(self, namespace: str, uid: str) -> None:
        folder = self.vm_dir(namespace, uid)
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # only when no other VM of the namespace has disks

    def vm_dirs(self) -> list[tuple[str, str]]:
        """(namespace, uid) of every VM folder on disk, for garbage collection."""
        found: list[tuple[str, str]] = []
        if self.root.is_dir():
            with os.scandir(self.root) as namespaces:  # scandir knows folders without a stat each
                for ns_dir in namespaces:
                    if ns_dir.is_dir() and _SAFE_PART.match(ns_dir.name):
                        found.extend((ns_dir.name, uid) for uid in _subfolders(ns_dir.path))
        return found

    def _run(self, args: list[str], path: Path) -> str:
        try:
            done = subprocess.run([self.qemu_img, *args], capture_output=True, text=True,
                                  timeout=QEMU_IMG_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise errors.HypervisorError(f"qemu-img {args[0]} {path.name}: {e}") from e
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            reason = detail[-1] if detail else f"exit code {done.returncode}"
            raise errors.HypervisorError(f"qemu-img {args[0]} {path.name} failed: {reason}")
        return done.stdout


def _plain_qcow2(info: dict[str, object]) -> bool:
    specific = info.get("format-specific") or {}
    data = specific.get("data") if isinstance(specific, dict) else None
    return (isinstance(data, dict) and data.get("compat") == "1.1" and not data.get("encrypt")
            and not data.get("corrupt") and not info.get("dirty-flag") and not info.get("encrypted")
            and not info.get("snapshots"))


def _fsync(path: Path) -> None:
    """The disk's bytes on the disk before it takes its name: a power cut cannot leave a named, empty disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _subfolders(path: str) -> list[str]:
    """The folders in a namespace's folder; none once it is gone (deleting its last VM removes it meanwhile)."""
    try:
        with os.scandir(path) as entries:
            return [entry.name for entry in entries if entry.is_dir()]
    except FileNotFoundError:
        return []
