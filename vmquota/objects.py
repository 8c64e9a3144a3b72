"""The kinds vmquota serves and the Kubernetes conventions they share.

Bottom layer, pure: the kind table (what `api.py` and `server.py` route on),
metadata checks, and JSON merge patch. Per-kind spec rules live in
`validation.py`; the VM spec itself in `vmspec.py`.
"""

from __future__ import annotations

import copy
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vmquota import errors

Obj = dict[str, Any]

PROJECT_LABEL = "vmquota.io/project"
DEFAULT_QUOTA_NAME = "default"


READ_VERBS = ("get", "list", "watch")
WRITE_VERBS = ("create", "delete", "patch", "update")
ALL_VERBS = tuple(sorted(READ_VERBS + WRITE_VERBS))


@dataclass(frozen=True)
class Kind:
    """One entry of the registry of served kinds: routing, discovery, OpenAPI and tables all follow from it."""
    kind: str
    group: str  # "" for the core group
    version: str
    plural: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def resource(self) -> str:
        """The name Kubernetes uses in messages: `virtualmachines.kubevirt.io`, `resourcequotas`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        """`VirtualMachine.kubevirt.io`, as in Kubernetes' "is invalid" messages."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    @property
    def writable(self) -> bool:
        return "create" in self.verbs


@dataclass(frozen=True)
class Subresource:
    """A subresource served beside its kind's objects, as discovery lists it (`virtualmachines/start`)."""
    parent: Kind
    name: str
    group: str
    version: str
    verbs: tuple[str, ...]
    kind: str = "Status"  # what a request to it answers with
    path_parameters: tuple[str, ...] = ()  # segments after its name in the path (a port forward's `{port}`)

    @property
    def resource(self) -> str:
        return f"{self.parent.plural}/{self.name}"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


PROJECT = Kind("Project", "vmquota.io", "v1", "projects", namespaced=False, short_names=("proj",))
NAMESPACE = Kind("Namespace", "", "v1", "namespaces", namespaced=False, short_names=("ns",))
RESOURCE_QUOTA = Kind("ResourceQuota", "", "v1", "resourcequotas", namespaced=True, short_names=("quota",))
VIRTUAL_MACHINE = Kind("VirtualMachine", "kubevirt.io", "v1", "virtualmachines", namespaced=True,
                       short_names=("vm", "vms"), categories=("all",))
VIRTUAL_MACHINE_CLONE = Kind("VirtualMachineClone", "clone.kubevirt.io", "v1beta1", "virtualmachineclones",
                             namespaced=True, short_names=("vmclone", "vmclones"), categories=("all",),
                             verbs=("create", "delete", "get", "list", "watch"))
EVENT = Kind("Event", "", "v1", "events", namespaced=True, short_names=("ev",), verbs=READ_VERBS)
# The hosts (issue 13): a libvirt host is a Node; a VM holding a runtime has a VirtualMachineInstance, which the
# controller writes (as KubeVirt's virt-controller does) and users only read.
NODE = Kind("Node", "", "v1", "nodes", namespaced=False, short_names=("no",))
VIRTUAL_MACHINE_INSTANCE = Kind("VirtualMachineInstance", "kubevirt.io", "v1", "virtualmachineinstances",
                                namespaced=True, short_names=("vmi", "vmis"), categories=("all",), verbs=READ_VERBS)
# A live migration of a running VM to another node; deleting one cancels it (KubeVirt's virtctl migrate makes one).
VIRTUAL_MACHINE_INSTANCE_MIGRATION = Kind(
    "VirtualMachineInstanceMigration", "kubevirt.io", "v1", "virtualmachineinstancemigrations", namespaced=True,
    short_names=("vmim", "vmims"), categories=("all",), verbs=("create", "delete", "get", "list", "watch"))

# Who may do what (RBAC, `rbac.py`), and the identities of scripts (ServiceAccounts, with tokens from TokenRequest).
SERVICE_ACCOUNT = Kind("ServiceAccount", "", "v1", "serviceaccounts", namespaced=True, short_names=("sa",))
ROLE = Kind("Role", "rbac.authorization.k8s.io", "v1", "roles", namespaced=True)
CLUSTER_ROLE = Kind("ClusterRole", "rbac.authorization.k8s.io", "v1", "clusterroles", namespaced=False)
ROLE_BINDING = Kind("RoleBinding", "rbac.authorization.k8s.io", "v1", "rolebindings", namespaced=True)
CLUSTER_ROLE_BINDING = Kind("ClusterRoleBinding", "rbac.authorization.k8s.io", "v1", "clusterrolebindings",
                            namespaced=False)
RBAC_KINDS = (ROLE, CLUSTER_ROLE, ROLE_BINDING, CLUSTER_ROLE_BINDING)

KINDS = (PROJECT, NAMESPACE, RESOURCE_QUOTA, VIRTUAL_MACHINE, VIRTUAL_MACHINE_CLONE, EVENT, SERVICE_ACCOUNT,
         *RBAC_KINDS, NODE, VIRTUAL_MACHINE_INSTANCE, VIRTUAL_MACHINE_INSTANCE_MIGRATION)
BY_KIND = {k.kind: k for k in KINDS}

# KubeVirt serves a VM's lifecycle actions in an API group of their own; vmquota's views of its accounting
# are subresources of its own group.
VM_ACTIONS = ("start", "stop", "restart", "migrate")
VMI_ACTIONS = ("pause", "unpause", "softreboot")  # KubeVirt's paths name the VMI; vmquota's VMI is its VM
# KubeVirt's websocket subresources (`apiserver/streams.py`): a VMI's serial console and its ports; virtctl's
# `port-forward vm/NAME` names the VM instead. Their paths go on past the name: `portforward/{port}[/tcp]`.
VMI_STREAMS = ("console", "portforward")
VM_STREAMS = ("portforward",)
SUBRESOURCES = (
    *(Subresource(VIRTUAL_MACHINE, action, "subresources.kubevirt.io", "v1", ("update",)) for action in VM_ACTIONS),
    *(Subresource(VIRTUAL_MACHINE_INSTANCE, action, "subresources.kubevirt.io", "v1", ("update",))
      for action in VMI_ACTIONS),
    Subresource(PROJECT, "usage", "vmquota.io", "v1", ("get",), kind="ProjectUsage"),
    Subresource(SERVICE_ACCOUNT, "token", "", "v1", ("create",), kind="TokenRequest"),
    # Usage over time: every change of used, rolled up per minute and per hour (`history.py`).
    Subresource(PROJECT, "history", "vmquota.io", "v1", ("get",), kind="UsageHistory"),
    Subresource(RESOURCE_QUOTA, "history", "vmquota.io", "v1", ("get",), kind="UsageHistory"),
    *(Subresource(VIRTUAL_MACHINE_INSTANCE, stream, "subresources.kubevirt.io", "v1", ("get",),
                  path_parameters=("port",) if stream == "portforward" else ()) for stream in VMI_STREAMS),
    *(Subresource(VIRTUAL_MACHINE, stream, "subresources.kubevirt.io", "v1", ("get",), path_parameters=("port",))
      for stream in VM_STREAMS),
)

# The reviews `kubectl auth can-i` and `auth whoami` create (`apiserver/reviews.py`): answered, never stored, so
# they are no kinds of the registry (no routes, tables or watches), but discovery lists them as kube-apiserver
# does, so that `kubectl create -f` of a SelfSubjectAccessReview and `kubectl api-resources` find them.
REVIEWS = (
    Kind("SelfSubjectAccessReview", "authorization.k8s.io", "v1", "selfsubjectaccessreviews", namespaced=False,
         verbs=("create",)),
    Kind("SelfSubjectRulesReview", "authorization.k8s.io", "v1", "selfsubjectrulesreviews", namespaced=False,
         verbs=("create",)),
    Kind("SelfSubjectReview", "authentication.k8s.io", "v1", "selfsubjectreviews", namespaced=False,
         verbs=("create",)),
)

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def name_problem(name: object) -> str | None:
    """Why `name` is not a DNS-1123 label, in Kubernetes' words; None when it is one."""
    if not isinstance(name, str) or not name:
        return "a lowercase RFC 1123 label must not be empty"
    if len(name) > 63:
        return "must be no more than 63 characters"
    if not _DNS1123_LABEL.match(name):
        return ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
                "and must start and end with an alphanumeric character (e.g. 'my-name', or '123-abc', "
                "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")
    return None


# RBAC objects are named as Kubernetes names them (`system:basic-user`, `kubevirt.io:admin`): any path segment.
_PATH_SEGMENT_NAMED = frozenset({"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"})
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9.\-_:@]{1,253}$")


def name_problem_for(kind: Kind, name: object) -> str | None:
    """Why `name` cannot name an object of `kind`; None when it can."""
    if kind.kind not in _PATH_SEGMENT_NAMED:
        return name_problem(name)
    if not isinstance(name, str) or name in (".", "..") or not _PATH_SEGMENT.match(name):
        return "may not be '.' or '..' and must be 1 to 253 letters, digits or any of '.-_:@'"
    return None


def check_name(kind: Kind, name: object) -> str:
    """`name` when it is a valid object name; otherwise Invalid, quoting it."""
    problem = name_problem_for(kind, name)
    if problem:
        raise errors.Invalid(f"{kind.qualified_kind} {_quote(name)} is invalid: metadata.name: "
                             f"Invalid value: {_quote(name)}: {problem}")
    assert isinstance(name, str)
    return name


def _quote(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote(value: object) -> str:
    return _quote(value)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_uid() -> str:
    return str(uuid.uuid4())


def meta(obj: Obj) -> dict[str, Any]:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


def labels(obj: Obj) -> dict[str, str]:
    value = meta(obj).get("labels")
    return value if isinstance(value, dict) else {}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: null deletes, objects merge, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
