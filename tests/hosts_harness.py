"""Extra libvirt hosts for the tests (issue 13): `extra_host(name)` starts one with scripts/test-host.sh and always
stops it again, its domains and files with it.

Each host is a libvirtd in a mount namespace of its own on this machine, reached at
`qemu+unix:///system?socket=...`; with `private_dirs` it sees an empty folder of its own over each of them
("local disks"), otherwise the same files as this machine ("shared storage"). Names are prefixed `hosts-`
unless they are already, so a test's hosts never meet another suite's.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "test-host.sh"
PREFIX = "hosts-"


@dataclass(frozen=True)
class ExtraHost:
    name: str
    uri: str
    started_s: float  # how long `test-host.sh start` took
    private_args: tuple[str, ...] = ()  # its --private-dir options, which a restart repeats

    def stop(self) -> None:
        """End this host now (its daemon and domains), as a host that goes down; `extra_host` does it again at the
        end, which is then nothing to do."""
        _run("stop", self.name)

    def kill_daemon(self) -> None:
        """SIGKILL this host's libvirtd alone, as a crash: its QEMU processes run on."""
        _run("kill", self.name)

    def restart_daemon(self) -> None:
        """Start its libvirtd again after `kill_daemon`, with the host's state (it finds its QEMUs again)."""
        _run("start", self.name, *self.private_args)


def _run(*args: str) -> str:
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"})
    if done.returncode != 0:
        raise RuntimeError(f"test-host.sh {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


def uri_of(name: str) -> str:
    return _run("uri", _named(name))


def _named(name: str) -> str:
    return name if name.startswith(PREFIX) else PREFIX + name


@contextlib.contextmanager
def extra_host(name: str, private_dirs: tuple[Path, ...] = (), *, qemu_conf: Path | None = None) -> Iterator[ExtraHost]:
    """A running extra host for the block's duration; stopped afterwards whatever happened, even if it failed
    half-way through starting. `qemu_conf`: the host's qemu.conf instead of the system's."""
    name = _named(name)
    args = tuple(arg for folder in private_dirs for arg in ("--private-dir", str(folder)))
    if qemu_conf is not None:
        args += ("--qemu-conf", str(qemu_conf))
    t0 = time.perf_counter()
    try:
        uri = _run("start", name, *args)
        yield ExtraHost(name, uri, time.perf_counter() - t0, args)
    finally:
        _run("stop", name)
