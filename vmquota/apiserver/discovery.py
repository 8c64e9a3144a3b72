"""Discovery and version: what kubectl and client-go ask before anything else, all from the kind registry.

    /version                       version.Info; its minor picks the kubectl the `kubectl` dispatcher runs
    /api, /apis                    APIVersions and APIGroupList, or aggregated discovery (apidiscovery.k8s.io/v2
                                   APIGroupDiscoveryList, every resource of every group in one answer) when the
                                   Accept header asks for it, as kubectl 1.32 does
    /api/v1, /apis/{group}/{version}   APIResourceList: each resource's name, singularName, namespaced, kind,
                                   verbs, shortNames, categories; subresources as `virtualmachines/start`

A VM's lifecycle actions live in KubeVirt's `subresources.kubevirt.io/v1`, a group of subresources whose parent
resource lives elsewhere; aggregated discovery gives such a parent no kind (as kube-apiserver converts an
aggregated server's discovery), so clients list only its subresources.

Pure: the documents are built once, at import; `handlers.py` serves them.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable
from typing import Any

import vmquota
from vmquota import objects
from vmquota.objects import Kind, Subresource

MAJOR, MINOR = "1", "32"
GIT_VERSION = f"v{MAJOR}.{MINOR}.0+vmquota.{vmquota.__version__}"

AGGREGATED_V2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"


def version_info() -> dict[str, str]:
    """version.Info. gitVersion is semver with vmquota's own version as build metadata, as distributions
    (k3s, GKE) mark theirs."""
    return {"major": MAJOR, "minor": MINOR, "gitVersion": GIT_VERSION, "gitCommit": "", "gitTreeState": "clean",
            "buildDate": "", "goVersion": f"python{platform.python_version()}", "compiler": "cpython",
            "platform": f"{platform.system().lower()}/{_arch()}"}


def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


# -- the registry by group-version ----------------------------------------------------------------------------

def _group_version(group: str, version: str) -> str:
    return f"{group}/{version}" if group else version


def _group_versions() -> dict[tuple[str, str], tuple[list[Kind], list[Subresource]]]:
    found: dict[tuple[str, str], tuple[list[Kind], list[Subresource]]] = {}
    for kind in (*objects.KINDS, *objects.REVIEWS):
        found.setdefault((kind.group, kind.version), ([], []))[0].append(kind)
    for sub in objects.SUBRESOURCES:
        found.setdefault((sub.group, sub.version), ([], []))[1].append(sub)
    return found


GROUP_VERSIONS = _group_versions()


def _groups() -> dict[str, list[str]]:
    """Named groups (not the core one) to their versions."""
    found: dict[str, list[str]] = {}
    for group, version in GROUP_VERSIONS:
        if group:
            found.setdefault(group, []).append(version)
    return found


# -- legacy discovery -----------------------------------------------------------------------------------------

def api_versions() -> dict[str, Any]:
    """`/api`: the core group's versions."""
    return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
        {"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}


def _api_group(group: str, versions: Iterable[str]) -> dict[str, Any]:
    listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": listed, "preferredVersion": listed[0]}


def api_group_list() -> dict[str, Any]:
    """`/apis`: every named group."""
    return {"kind": "APIGroupList", "apiVersion": "v1",
            "groups": [_api_group(group, versions) for group, versions in sorted(_groups().items())]}


def api_group(group: str) -> dict[str, Any] | None:
    """`/apis/{group}`: one group, None when there is no such group."""
    versions = _groups().get(group)
    return None if versions is None else {"kind": "APIGroup", "apiVersion": "v1", **_api_group(group, versions)}


def _resource(kind: Kind) -> dict[str, Any]:
    out: dict[str, Any] = {"name": kind.plural, "singularName": kind.singular, "namespaced": kind.namespaced,
                           "kind": kind.kind, "verbs": list(kind.verbs)}
    if kind.short_names:
        out["shortNames"] = list(kind.short_names)
    if kind.categories:
        out["categories"] = list(kind.categories)
    return out


def _subresource(sub: Subresource) -> dict[str, Any]:
    out: dict[str, Any] = {"name": sub.resource, "singularName": "", "namespaced": sub.parent.namespaced,
                           "kind": sub.kind, "verbs": list(sub.verbs)}
    if sub.kind != "Status":
        out.update(group=sub.group, version=sub.version)
    return out


def api_resource_list(group: str, version: str) -> dict[str, Any] | None:
    """`/api/v1` or `/apis/{group}/{version}`; None for a group-version vmquota does not serve."""
    found = GROUP_VERSIONS.get((group, version))
    if found is None:
        return None
    kinds, subs = found
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": _group_version(group, version),
            "resources": [*(_resource(k) for k in kinds), *(_subresource(s) for s in subs)]}


# -- aggregated discovery (apidiscovery.k8s.io/v2) ------------------------------------------------------------

def _gvk(group: str, version: str, kind: str) -> dict[str, str]:
    return {"group": group, "version": version, "kind": kind}


def _resource_discovery(kind: Kind, subs: list[Subresource]) -> dict[str, Any]:
    out: dict[str, Any] = {"resource": kind.plural, "responseKind": _gvk(kind.group, kind.version, kind.kind),
                           "scope": "Namespaced" if kind.namespaced else "Cluster",
                           "singularResource": kind.singular, "verbs": list(kind.verbs)}
    if kind.short_names:
        out["shortNames"] = list(kind.short_names)
    if kind.categories:
        out["categories"] = list(kind.categories)
    if subs:
        out["subresources"] = [_subresource_discovery(s) for s in subs]
    return out


def _subresource_discovery(sub: Subresource) -> dict[str, Any]:
    kind = _gvk("", "v1", "Status") if sub.kind == "Status" else _gvk(sub.group, sub.version, sub.kind)
    return {"subresource": sub.name, "responseKind": kind, "verbs": list(sub.verbs)}


def _version_discovery(group: str, version: str) -> dict[str, Any]:
    kinds, subs = GROUP_VERSIONS[(group, version)]
    resources = []
    for kind in kinds:
        own = [s for s in subs if s.parent is kind]
        resources.append(_resource_discovery(kind, own))
    # Subresources whose parent lives in another group-version (KubeVirt's subresources.kubevirt.io): a parent
    # with an empty kind, which clients skip while listing its subresources.
    orphans: dict[str, list[Subresource]] = {}
    for sub in subs:
        if sub.parent not in kinds:
            orphans.setdefault(sub.parent.plural, []).append(sub)
    for plural, own in orphans.items():
        resources.append({"resource": plural, "responseKind": {"group": "", "version": "", "kind": ""},
                          "scope": "Namespaced" if own[0].parent.namespaced else "Cluster", "verbs": [],
                          "subresources": [_subresource_discovery(s) for s in own]})
    return {"version": version, "resources": resources, "freshness": "Current"}


def _group_discovery(group: str, versions: list[str]) -> dict[str, Any]:
    return {"metadata": {"name": group} if group else {},
            "versions": [_version_discovery(group, v) for v in versions]}


def aggregated(*, core: bool) -> dict[str, Any]:
    """The APIGroupDiscoveryList of `/api` (core, the core group alone) or of `/apis` (every named group)."""
    items = [_group_discovery("", ["v1"])] if core else \
        [_group_discovery(group, versions) for group, versions in sorted(_groups().items())]
    return {"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {},
            "items": items}


def wants_aggregated(accept: str) -> bool:
    """Whether an Accept header asks for aggregated discovery v2 before anything else it takes, as client-go's
    `application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,...,application/json` does."""
    for choice in accept.split(","):
        params = dict(_param(p) for p in choice.split(";")[1:])
        if params.get("g") == "apidiscovery.k8s.io" and params.get("as") == "APIGroupDiscoveryList":
            if params.get("v") == "v2":
                return True
            continue  # v2beta1, which vmquota does not serve: the next choice may be v2 or plain JSON
        return False
    return False


def _param(text: str) -> tuple[str, str]:
    name, _, value = text.strip().partition("=")
    return name.strip().lower(), value.strip().strip('"')


def encoded(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()
