"""API processes: one server's HTTP served by several Python interpreters.

Top layer. One interpreter runs one thread at a time, so one process serves at
most about a core's worth of requests. `vmquota serve --api-processes N` keeps
everything in its first process (the controller: its queue and workers, the
recount, libvirt's events; and an HTTP server) and starts N-1 more processes
that only answer HTTP. They accept on the first process's listening socket,
inherited (no SO_REUSEPORT: no other program can join the port), and each has
its own connection to the same store, whose write lock holds between processes.

What an API process decides, the controller must hear at once: each VM key the
API queues goes to the first process as one line on a pipe. An API process
exits when the first process goes (its lifeline pipe reaches end of file), and
the first process ends the others when it closes, or starts another in place of
one that dies.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vmquota import errors
from vmquota.apiserver.security import Options
from vmquota.controller import Key
from vmquota.usage import OverheadModel
from vmquota.workqueue import WorkQueue

log = logging.getLogger(__name__)

MAX_API_PROCESSES = 64
READY = b"ready\n"  # an API process's first line: it serves
START_TIMEOUT_SECONDS = 30.0
RESTART_DELAY_SECONDS = 1.0  # before starting another API process in place of one that died


def default_count() -> int:
    """One API process per core this server may run on (at most 8)."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


class KeysToController(WorkQueue[Key]):
    """In an API process: `add` sends the key to the controller's queue in the first process.

    The API only ever adds keys; nothing takes them here (the controller does not run in this process).
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def add(self, key: Key, *, after: float = 0.0) -> None:
        # One write of less than PIPE_BUF bytes is atomic: lines from many threads never interleave.
        try:
            os.write(self._fd, json.dumps([key[0], key[1], after]).encode() + b"\n")
        except BrokenPipeError:
            # The first process is gone (this one ends with it). The change is committed, so the request did
            # succeed: the next server's recount at its start queues every VM that needs work.
            log.warning("the controller is gone: %s/%s waits for the next server's recount", *key)


@dataclass
class _Child:
    process: subprocess.Popen[bytes]
    lifeline: int  # the write end of its lifeline pipe; -1 once closed
    keys: IO[bytes]


def _cut_lifeline(child: _Child) -> None:
    """Close the write end of a child's lifeline: it stops serving and exits (the caller holds the lock)."""
    if child.lifeline >= 0:
        os.close(child.lifeline)
        child.lifeline = -1


class ApiProcesses:
    """The first process's side: starts the other API processes, feeds their keys to `add_key`, and starts
    another when one of them dies (a crash must not leave the server with fewer processes for good)."""

    def __init__(self, add_key: Callable[[Key, float], None]) -> None:
        self._add_key = add_key
        self._lock = threading.Lock()  # guards _children and the lifelines
        self._children: list[_Child] = []
        self._supervisors: list[threading.Thread] = []
        self._closing = threading.Event()
        self._command: list[str] = []
        self._listening_fd = -1

    def start(self, count: int, *, listening: socket.socket, data_dir: Path, hypervisor_uri: str,
              overhead: OverheadModel, security_options: Options | None = None, listen_host: str = "") -> None:
        """Start `count` API processes and return once each of them serves; raises if one cannot."""
        if count == 0:
            return
        listening.setblocking(False)  # shared: a process that loses the race for a connection goes on polling
        self._listening_fd = listening.fileno()
        self._command = [sys.executable, "-m", "vmquota.workers", "--data-dir", str(data_dir),
                         "--hypervisor", hypervisor_uri, "--memory-overhead", overhead.value,
                         "--security", (security_options or Options()).to_json(), "--listen-host", listen_host]
        for _ in range(count):
            try:
                child = self._spawn()
            except BaseException:
                self.close()
                raise
            supervisor = threading.Thread(target=self._supervise, args=(child,), name=f"api-{child.process.pid}",
                                          daemon=True)
            supervisor.start()
            self._supervisors.append(supervisor)

    def _spawn(self) -> _Child:
        """One more API process, returned once it serves; VmquotaError if it cannot start."""
        keys_read, keys_write = os.pipe()
        life_read, life_write = os.pipe()
        process = subprocess.Popen(
            [*self._command, "--listen-fd", str(self._listening_fd), "--keys-fd", str(keys_write),
             "--lifeline-fd", str(life_read)], pass_fds=(self._listening_fd, keys_write, life_read))
        os.close(keys_write)
        os.close(life_read)
        child = _Child(process, life_write, os.fdopen(keys_read, "rb"))
        with self._lock:
            self._children.append(child)
            closing = self._closing.is_set()  # checked under the lock: close() ends it, or it is ended here
        started = not closing and select.select([child.keys], [], [], START_TIMEOUT_SECONDS)[0]
        if not started or child.keys.readline() != READY:  # it failed (its error is on the shared stderr) or hangs
            self._end(child)
            why = (f"did not start within {START_TIMEOUT_SECONDS:.0f} s" if not started
                   else f"could not start (exit code {child.process.returncode})")
            raise errors.VmquotaError(f"an API process {why}")
        return child

    def _supervise(self, child: _Child) -> None:
        """Feed a child's keys to the controller; when it dies while the server runs, start another."""
        while True:
            for line in child.keys:
                namespace, name, after = json.loads(line)
                self._add_key((namespace, name), after)
            self._end(child)
            if self._closing.is_set():
                return
            log.error("API process %d ended (exit code %s); starting another", child.process.pid,
                      child.process.returncode)
            while True:
                if self._closing.wait(RESTART_DELAY_SECONDS):
                    return
                try:
                    child = self._spawn()
                    break
                except errors.VmquotaError as e:
                    if not self._closing.is_set():
                        log.error("%s; trying again in %.0f s", e, RESTART_DELAY_SECONDS)

    def _end(self, child: _Child) -> None:
        """Cut a child's lifeline, wait for it to exit (killing it after 10 s) and forget it."""
        with self._lock:
            if child in self._children:
                self._children.remove(child)
            _cut_lifeline(child)
        try:
            child.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
        child.keys.close()

    def close(self) -> None:
        """End every API process: closing its lifeline tells it to stop serving and exit."""
        with self._lock:
            self._closing.set()
            for child in self._children:  # their supervisors see the end of their keys and end them
                _cut_lifeline(child)
        for supervisor in self._supervisors:
            supervisor.join(timeout=30)


def main(argv: list[str] | None = None) -> int:
    """An API process: the same Api as the first process's, on the inherited socket, until its lifeline ends."""
    from vmquota.apiserver import security, serve_on
    from vmquota.app import open_core  # here: the wiring (app.py) imports this module

    parser = argparse.ArgumentParser(prog="python -m vmquota.workers", description=__doc__)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--hypervisor", required=True)
    parser.add_argument("--memory-overhead", required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--keys-fd", type=int, required=True)
    parser.add_argument("--lifeline-fd", type=int, required=True)
    parser.add_argument("--security", required=True, help="the first process's security options, as JSON")
    parser.add_argument("--listen-host", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the first process too; it ends this one

    core = open_core(Path(args.data_dir), args.hypervisor, OverheadModel(args.memory_overhead))
    core.controller.queue = KeysToController(args.keys_fd)
    # The same TLS, authentication, RBAC and audit as the first process (its CA and keys are in the data dir).
    secured = security.build(Options.from_json(args.security), api=core.api, data_dir=Path(args.data_dir),
                             listen_host=args.listen_host)
    server = serve_on(core.api, socket.socket(fileno=args.listen_fd), secured)

    def wait_for_first_process() -> None:
        while os.read(args.lifeline_fd, 1):
            pass
        server.shutdown()

    threading.Thread(target=wait_for_first_process, name="lifeline", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(target=server.shutdown).start())
    try:
        os.write(args.keys_fd, READY)
    except BrokenPipeError:  # the first process is gone already
        return 1
    try:
        server.serve_forever(poll_interval=0.05)  # gone soon after the first process: a new one may bind the port
    finally:
        server.server_close()
        core.store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
