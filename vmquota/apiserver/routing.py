"""Kubernetes paths to what they name: a kind, a namespace, an object, a subresource.

Pure. Every path segment is checked before it is used, so no name that could not be an object's reaches the
handlers (or a query, or a path on the disk). A path that names nothing is Kubernetes' NotFound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vmquota import errors, objects
from vmquota.objects import Kind

_SEGMENT = re.compile(r"^[A-Za-z0-9.\-_:@]{1,253}$")  # ':' and '@' in RBAC objects' names only
_BY_GROUP_PLURAL = {(k.group, k.version, k.plural): k for k in objects.KINDS}
# Subresources served under their kind's own group (a ServiceAccount's token); KubeVirt's VM actions have a
# group of their own, below.
_OWN_GROUP_SUBRESOURCES = {(s.parent.kind, s.name) for s in objects.SUBRESOURCES if s.group == s.parent.group}
SUBRESOURCES_GROUP = ("subresources.kubevirt.io", "v1")
VMQUOTA_GROUP = ("vmquota.io", "v1")
UPLOAD_GROUP = ("upload.cdi.kubevirt.io", "v1beta1")  # CDI's: an image into an upload data volume (`upload.py`)


@dataclass(frozen=True)
class Route:
    kind: Kind | None
    namespace: str | None  # None: all namespaces (lists) or a cluster-scoped kind
    name: str | None
    subresource: str | None = None  # start, stop, restart; usage, history, charges (vmquota.io views); upload


def route(path: str) -> Route:
    """Map a path to what it names; NotFound for anything else."""
    segments = [s for s in path.split("/") if s]
    for segment in segments:
        if not _SEGMENT.match(segment):
            raise errors.NotFound("the server could not find the requested resource")
    if segments[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", segments[2:]
    elif len(segments) >= 3 and segments[0] == "apis":
        group, version, rest = segments[1], segments[2], segments[3:]
    else:
        raise errors.NotFound("the server could not find the requested resource")

    if (group, version) == SUBRESOURCES_GROUP:
        if len(rest) == 5 and rest[0] == "namespaces" and rest[2] == "virtualmachines" and \
                rest[4] in objects.VM_ACTIONS:
            return Route(objects.VIRTUAL_MACHINE, rest[1], rest[3], rest[4])
        if len(rest) == 5 and rest[0] == "namespaces" and rest[2] == "virtualmachineinstances" and \
                rest[4] in objects.VMI_ACTIONS:
            return Route(objects.VIRTUAL_MACHINE, rest[1], rest[3], rest[4])
        raise errors.NotFound("the server could not find the requested resource")
    if (group, version) == UPLOAD_GROUP:
        if len(rest) == 5 and rest[0] == "namespaces" and rest[2] == "datavolumes" and rest[4] == "upload" \
                and not objects.name_problem(rest[1]) and not objects.name_problem(rest[3]):
            return Route(None, rest[1], rest[3], "upload")
        raise errors.NotFound("the server could not find the requested resource")
    if (group, version) == VMQUOTA_GROUP:
        # vmquota's own read-only views: who is charged how much.
        if rest == ["charges"]:
            return Route(None, None, None, "charges")
        if len(rest) in (3, 4) and rest[0] == "namespaces" and rest[2] == "charges":
            return Route(None, rest[1], rest[3] if len(rest) == 4 else None, "charges")
        if len(rest) == 3 and rest[0] == "projects" and rest[2] in ("usage", "history"):
            return Route(objects.PROJECT, None, rest[1], rest[2])
        if len(rest) == 5 and rest[0] == "namespaces" and rest[2] == "resourcequotas" and rest[4] == "history":
            return Route(objects.RESOURCE_QUOTA, rest[1], rest[3], "history")

    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and (group, version, rest[2]) in _BY_GROUP_PLURAL:
        namespace, rest = rest[1], rest[2:]
    if namespace is not None and len(rest) == 3 and (group, version, rest[0]) in _BY_GROUP_PLURAL:
        kind = _BY_GROUP_PLURAL[(group, version, rest[0])]
        if (kind.kind, rest[2]) in _OWN_GROUP_SUBRESOURCES and not objects.name_problem(rest[1]) \
                and not objects.name_problem(namespace):
            return Route(kind, namespace, rest[1], rest[2])
    if not rest or len(rest) > 2 or (group, version, rest[0]) not in _BY_GROUP_PLURAL:
        raise errors.NotFound("the server could not find the requested resource")
    kind = _BY_GROUP_PLURAL[(group, version, rest[0])]
    if kind.namespaced and namespace is None and len(rest) == 2:
        raise errors.NotFound("the server could not find the requested resource")
    if not kind.namespaced and namespace is not None:
        raise errors.NotFound("the server could not find the requested resource")
    name = rest[1] if len(rest) == 2 else None
    if name is not None and kind is not objects.EVENT and objects.name_problem_for(kind, name):
        raise errors.NotFound(f'{kind.resource} "{name[:80]}" not found')
    if namespace is not None and objects.name_problem(namespace):
        raise errors.NotFound(f'namespaces "{namespace}" not found')
    return Route(kind, namespace, name)
