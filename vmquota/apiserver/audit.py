"""The audit log: every write and every refusal, as `audit.k8s.io/v1` Events, one JSON object a line.

A filter, outside authentication so that 401s are recorded too. At kube-apiserver's `Metadata` level: who (user,
groups, source address, user agent), what (verb, object reference, request URI), the decision and its reason,
and the response's code and Status. Bodies are never written, so no token, key or certificate reaches the log;
the one exception is what a quota change did: for a ResourceQuota or a Project, `hard` before and after goes
into the event's annotations.

    <data-dir>/audit/audit.log, audit.log.1 ... .N   rotated at MAX_BYTES, the oldest dropped

All API processes append to the same file: each event is one `write` on an O_APPEND descriptor (whole lines
never interleave), and the process that rotates does it under an `flock`; the others notice the new file by
its inode and reopen it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmquota import errors, identity, objects, rbac
from vmquota.api import Api
from vmquota.apiserver import authorization
from vmquota.apiserver.request import Request, Response

log = logging.getLogger(__name__)

Handler = Callable[[Request], Response]

AUDIT_DIR = "audit"
FILE = "audit.log"
MAX_BYTES = 64 << 20
BACKUPS = 5
_QUOTA_KINDS = {("", "resourcequotas"): objects.RESOURCE_QUOTA, ("vmquota.io", "projects"): objects.PROJECT}
_REFUSALS = (401, 403, 429)


def audit_dir(data_dir: Path) -> Path:
    return data_dir / AUDIT_DIR


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AuditLog:
    """An append-only, rotated file of events, shared by the server's processes."""

    def __init__(self, folder: Path, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = folder / FILE
        self.max_bytes, self.backups = max_bytes, backups
        self._lock_path = folder / f".{FILE}.lock"
        self._lock = threading.Lock()
        self._fd = -1
        self._inode = -1
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._inode = fd, os.fstat(fd).st_ino

    def write(self, event: dict[str, Any]) -> None:
        line = (json.dumps(event, separators=(",", ":")) + "\n").encode()
        with self._lock:
            try:
                if os.stat(self.path).st_ino != self._inode:
                    self._open()  # another process rotated it
            except FileNotFoundError:
                self._open()
            os.write(self._fd, line)
            if os.fstat(self._fd).st_size >= self.max_bytes:
                self._rotate()

    def _rotate(self) -> None:
        with open(self._lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.stat(self.path).st_size >= self.max_bytes:  # not rotated meanwhile by another process
                for index in range(self.backups - 1, 0, -1):
                    older = self.path.with_name(f"{FILE}.{index}")
                    if older.exists():
                        os.replace(older, self.path.with_name(f"{FILE}.{index + 1}"))
                os.replace(self.path, self.path.with_name(f"{FILE}.1"))
            self._open()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read(folder: Path, backups: int = BACKUPS) -> Iterator[dict[str, Any]]:
    """Every event, oldest first, across the rotated files; a torn last line (a crash mid-write) is skipped."""
    files = [folder / f"{FILE}.{index}" for index in range(backups, 0, -1)] + [folder / FILE]
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(event, dict):
                        yield event
        except FileNotFoundError:
            continue


class Auditor:
    """The filter: one event per write and per refusal."""

    def __init__(self, sink: AuditLog, api: Api) -> None:
        self.sink = sink
        self.api = api

    def __call__(self, request: Request, handler: Handler) -> Response:
        received = _timestamp()
        write = request.method not in ("GET", "HEAD")
        quota = self._quota_before(request) if write else None
        try:
            response = handler(request)
        except errors.ApiError as e:
            logged = {k: v for k, v in e.status().items() if k not in ("kind", "apiVersion")}  # as Kubernetes logs it
            self._record(request, received, e.code, logged, quota)
            raise
        if write or response.code in _REFUSALS:
            status: dict[str, Any] = {"metadata": {}, "code": response.code}
            if response.code >= 400 and isinstance(response.body, bytes):
                try:
                    parsed = json.loads(response.body)
                    status.update({k: parsed[k] for k in ("status", "reason", "message") if k in parsed})
                except (ValueError, TypeError):
                    pass
            self._record(request, received, response.code, status, quota, response)
        return response

    def _quota_before(self, request: Request) -> tuple[objects.Kind, str, str, Any] | None:
        """For a write of a quota or project: the kind, namespace, name and `hard` before it."""
        a = authorization.attributes(request, identity.anonymous())
        kind = _QUOTA_KINDS.get((a.api_group, a.resource))
        if kind is None or a.subresource:
            return None
        name = a.name
        if not name and request.method == "POST":
            try:
                body = json.loads(request.body or b"{}")
                name = str(((body or {}).get("metadata") or {}).get("name") or "")
            except (ValueError, AttributeError):
                name = ""
        if not name:
            return None
        current = self.api.store.reader().get(kind, a.namespace if kind.namespaced else "", name)
        return kind, a.namespace, name, _hard(kind, current)

    def _record(self, request: Request, received: str, code: int, status: dict[str, Any],
                quota: tuple[objects.Kind, str, str, Any] | None, response: Response | None = None) -> None:
        user = request.user
        a = authorization.attributes(request, user or identity.anonymous())
        decision = "allow" if code not in (401, 403) else "forbid"
        annotations: dict[str, str] = {"authorization.k8s.io/decision": decision}
        reason = status.get("message") if code in (401, 403) else None
        if reason:
            annotations["authorization.k8s.io/reason"] = str(reason)[:1024]
        if quota is not None:
            kind, namespace, name, before = quota
            after = _hard(kind, self.api.store.reader().get(kind, namespace if kind.namespaced else "", name))
            annotations["vmquota.io/hard-before"] = json.dumps(before, sort_keys=True)
            annotations["vmquota.io/hard-after"] = json.dumps(after, sort_keys=True)
        event: dict[str, Any] = {
            "kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata", "auditID": str(uuid.uuid4()),
            "stage": "ResponseComplete", "requestURI": _uri(request), "verb": a.verb,
            "user": {"username": user.name, "uid": user.uid, "groups": list(user.groups)} if user else {},
            "sourceIPs": [request.remote_address] if request.remote_address else [],
            "userAgent": (request.headers.get("User-Agent") or "")[:256],
            "responseStatus": status, "requestReceivedTimestamp": received, "stageTimestamp": _timestamp(),
            "annotations": annotations}
        if a.resource_request:
            event["objectRef"] = _object_ref(a, request)
        try:
            self.sink.write(event)
        except OSError as e:  # a full disk must not fail the request that was already served
            log.error("cannot write the audit log: %s", e)


def _hard(kind: objects.Kind, obj: dict[str, Any] | None) -> Any:
    if obj is None:
        return None
    spec = obj.get("spec") or {}
    if kind is objects.PROJECT:
        return ((spec.get("resourceQuota") or {}).get("hard")) if isinstance(spec, dict) else None
    return spec.get("hard") if isinstance(spec, dict) else None


def _object_ref(a: rbac.Attributes, request: Request) -> dict[str, str]:
    segments = [s for s in request.path.split("/") if s]
    version = segments[1] if segments[:1] == ["api"] else (segments[2] if len(segments) > 2 else "")
    ref = {"resource": a.resource, "namespace": a.namespace, "name": a.name, "apiGroup": a.api_group,
           "apiVersion": version, "subresource": a.subresource}
    return {key: value[:253] for key, value in ref.items() if value}


def _uri(request: Request) -> str:
    query = "&".join(f"{k}={v}" for k, v in request.query.items())
    return (request.path + (f"?{query}" if query else ""))[:2048]
