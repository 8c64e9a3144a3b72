"""Authorization: may this user do what the request asks? A filter (`filters.py`), before every handler.

Every request, whatever its path, gets Kubernetes' request attributes (`attributes`, as kube-apiserver's
RequestInfoFactory derives them from the URL alone: verb, API group, resource, subresource, namespace, name; or
a non-resource path) and is refused with Kubernetes' exact 403 unless RBAC (`vmquota/rbac.py`) allows it. No
handler checks permissions, so no handler, fixed path, watch or page can forget to; `tests/test_tenants.py`
walks the route table to hold that.

Beyond Kubernetes, for tenants:
- A list across namespaces (`-A`) that the user may not make cluster-wide shows the namespaces where the user
  may make it (a list of namespaces: those the user may list), instead of a 403; with none, it is the 403.
- A member reads its project: whoever may read the ResourceQuotas of a namespace may get the Project that
  namespace belongs to and its usage (other namespaces' totals, but only the VMs of namespaces it may list).
- The escalation and bind checks: a Role's rules, or a binding's role, must be held by whoever writes them
  (or they need the `escalate` / `bind` verb), as Kubernetes' RBAC storage checks; `rbac.escalation_check`
  carries the check to the Api, which calls it with the object it is about to store.

`AlwaysAllow` (kube-apiserver's `--authorization-mode=AlwaysAllow`) skips all of it: tests opt into it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

from vmquota import errors, identity, objects, rbac
from vmquota.apiserver.request import Request, Response
from vmquota.identity import UserInfo
from vmquota.store import Store

Handler = Callable[[Request], Response]

RBAC = "RBAC"
ALWAYS_ALLOW = "AlwaysAllow"
MODES = (RBAC, ALWAYS_ALLOW)
_NAMESPACE_SUBRESOURCES = ("status", "finalize")
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


def attributes(request: Request, user: UserInfo) -> rbac.Attributes:
    """The request's attributes from its method, path and query only (never from routing, which may fail)."""
    segments = [s for s in request.path.split("/") if s]
    rest: list[str] | None = None
    group = ""
    if segments[:1] == ["api"] and len(segments) >= 2:
        rest = segments[2:]
    elif segments[:1] == ["apis"] and len(segments) >= 3:
        group, rest = segments[1], segments[3:]
    if not rest:  # not under /api or /apis, or discovery (/api, /apis/{group}/{version})
        return rbac.Attributes(user, request.method.lower(), resource_request=False, path=request.path)
    legacy_watch = rest[0] == "watch" and len(rest) > 1  # /api/v1/watch/...: a watch, of one name or of a list
    if legacy_watch:
        rest = rest[1:]
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource, name = rest[0], rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    method = request.method
    if method == "GET" and legacy_watch:
        verb = "watch"
    elif method == "GET":
        verb = "get" if name else ("watch" if request.param("watch") in ("true", "1") else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = _VERBS.get(method, method.lower())
    return rbac.Attributes(user, verb, True, group, resource, subresource, namespace, name)


def forbidden(a: rbac.Attributes, reason: str = "") -> errors.Forbidden:
    """Kubernetes' 403, word for word (responsewriters.Forbidden)."""
    user = a.user.name
    details: dict[str, str] = {}
    if not a.resource_request:
        message = f'forbidden: User "{user}" cannot {a.verb} path "{a.path}"'
    else:
        details = {key: value for key, value in (("name", a.name), ("group", a.api_group), ("kind", a.resource))
                   if value}
        resource = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
        scope = f'in the namespace "{a.namespace}"' if a.namespace else "at the cluster scope"
        what = f'User "{user}" cannot {a.verb} resource "{resource}" in API group "{a.api_group}" {scope}'
        qualified = f"{a.resource}.{a.api_group}" if a.api_group else a.resource
        message = f'{qualified} "{a.name}" is forbidden: {what}' if a.name else f"{qualified} is forbidden: {what}"
    return errors.Forbidden(message + (f": {reason}" if reason else ""), details=details)


class _Snapshot:
    """The policy and the namespaces (with their projects) at one RBAC generation of the store."""

    def __init__(self, generation: int, policy: rbac.Policy, namespaces: dict[str, str | None]) -> None:
        self.generation = generation
        self.policy = policy
        self.namespaces = namespaces
        self.members: dict[str, list[str]] = {}
        for namespace, project in namespaces.items():
            if project:
                self.members.setdefault(project, []).append(namespace)


class Authorizer:
    def __init__(self, store: Store, mode: str = RBAC) -> None:
        if mode not in MODES:
            raise ValueError(f"--authorization-mode takes one of {', '.join(MODES)}, got {mode!r}")
        self.store = store
        self.mode = mode
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None

    def snapshot(self) -> _Snapshot:
        """The policy as committed now: one counter read, and a rebuild only after an RBAC change."""
        reader = self.store.reader()
        generation = reader.rbac_generation()
        current = self._snapshot
        if current is not None and current.generation == generation:
            return current
        with self._lock:
            current = self._snapshot
            if current is not None and current.generation == generation:
                return current
            with reader.snapshot():
                generation = reader.rbac_generation()
                policy = rbac.Policy(roles=reader.list(objects.ROLE), cluster_roles=reader.list(objects.CLUSTER_ROLE),
                                     role_bindings=reader.list(objects.ROLE_BINDING),
                                     cluster_role_bindings=reader.list(objects.CLUSTER_ROLE_BINDING))
                namespaces = {ns["metadata"]["name"]: objects.labels(ns).get(objects.PROJECT_LABEL)
                              for ns in reader.list(objects.NAMESPACE)}
            self._snapshot = _Snapshot(generation, policy, namespaces)
            return self._snapshot

    def authorize(self, a: rbac.Attributes) -> rbac.Decision:
        if self.mode == ALWAYS_ALLOW:
            return rbac.Decision(True, "AlwaysAllow")
        return self.snapshot().policy.authorize(a)

    # -- the tenants' additions ----------------------------------------------------------------------

    def _may(self, snapshot: _Snapshot, user: UserInfo, verb: str, group: str, resource: str, namespace: str,
             name: str = "") -> bool:
        return snapshot.policy.authorize(rbac.Attributes(user, verb, True, group, resource, "", namespace,
                                                         name)).allowed

    def member_projects(self, snapshot: _Snapshot, user: UserInfo) -> frozenset[str]:
        """The projects of the namespaces whose quotas the user may read."""
        return frozenset(project for namespace, project in snapshot.namespaces.items()
                         if project and self._may(snapshot, user, "get", "", "resourcequotas", namespace))

    def visible(self, a: rbac.Attributes) -> frozenset[str] | None:
        """What a refused cross-namespace list may show instead of a 403 (None: nothing, so the 403)."""
        snapshot = self.snapshot()
        if a.api_group == "vmquota.io" and a.resource == "projects" and not a.subresource:
            found = self.member_projects(snapshot, a.user)
        else:
            found = frozenset(namespace for namespace in snapshot.namespaces
                              if self._may(snapshot, a.user, a.verb, a.api_group, a.resource, namespace))
        return found or None

    def project_member(self, a: rbac.Attributes) -> frozenset[str] | None:
        """For a member's read of its project (or its usage): the namespaces whose VMs it may list; else None."""
        snapshot = self.snapshot()
        if a.name not in self.member_projects(snapshot, a.user):
            return None
        return frozenset(namespace for namespace in snapshot.members.get(a.name, [])
                         if self._may(snapshot, a.user, "list", "kubevirt.io", "virtualmachines", namespace))

    # -- escalation: what a role or binding grants must be held by its writer -----------------------------

    def escalation_check(self, user: UserInfo) -> rbac.EscalationCheck:
        def check(kind: str, obj: Mapping[str, Any]) -> None:
            if self.mode == ALWAYS_ALLOW or identity.MASTERS in user.groups:
                return
            snapshot = self.snapshot()
            metadata = obj.get("metadata") or {}
            namespace, name = str(metadata.get("namespace") or ""), str(metadata.get("name") or "")
            kind_obj = objects.BY_KIND[kind]
            if kind in ("Role", "ClusterRole"):
                if self._may(snapshot, user, "escalate", rbac.GROUP, kind_obj.plural, namespace, name):
                    return
                if kind == "ClusterRole" and obj.get("aggregationRule"):
                    raise errors.Forbidden(f'{kind_obj.resource} "{name}" is forbidden: must have cluster-admin '
                                           f"privileges to write aggregated clusterroles")
                wanted = [rbac.Rule.from_json(r) for r in obj.get("rules") or []]
            else:
                ref = obj.get("roleRef") or {}
                ref_kind, ref_name = str(ref.get("kind")), str(ref.get("name"))
                ref_plural = "clusterroles" if ref_kind == "ClusterRole" else "roles"
                if self._may(snapshot, user, "bind", rbac.GROUP, ref_plural, namespace, ref_name):
                    return
                rules = snapshot.policy.role_rules_of(ref_kind, namespace, ref_name)
                if rules is None:
                    raise errors.NotFound(f'{ref_plural}.{rbac.GROUP} "{ref_name}" not found')
                wanted = list(rules)
            missing = rbac.uncovered(snapshot.policy.rules_for(user, namespace), wanted)
            if missing:
                groups = " ".join(json.dumps(g) for g in user.groups)
                held = "\n".join(_describe_rule(rule) for rule in missing[:20])
                raise errors.Forbidden(f'{kind_obj.resource} "{name}" is forbidden: user "{user.name}" '
                                       f"(groups=[{groups}]) is attempting to grant RBAC permissions not currently "
                                       f"held:\n{held}")
        return check

    # -- the filter ------------------------------------------------------------------------------------

    def __call__(self, request: Request, handler: Handler) -> Response:
        user = request.user
        if user is None:  # authentication always runs first; without it, nobody is somebody
            raise errors.Unauthorized()
        if self.mode == ALWAYS_ALLOW:
            return handler(request)
        a = attributes(request, user)
        if not self.authorize(a).allowed:
            self._tenant_view(request, a)
        token = rbac.escalation_check.set(self.escalation_check(user))
        try:
            return handler(request)
        finally:
            rbac.escalation_check.reset(token)

    def _tenant_view(self, request: Request, a: rbac.Attributes) -> None:
        """Let a refused request through as a tenant's narrower view, or raise Kubernetes' 403."""
        if a.resource_request and a.verb in ("list", "watch") and not a.namespace and not a.name:
            visible = self.visible(a)
            if visible is not None:
                request.visible_namespaces = visible
                return
        if a.resource_request and a.verb == "get" and a.api_group == "vmquota.io" and a.resource == "projects" \
                and a.subresource in ("", "usage"):
            members = self.project_member(a)
            if members is not None:
                request.visible_namespaces = members
                return
        raise forbidden(a)


def _describe_rule(rule: rbac.Rule) -> str:
    """As Kubernetes prints a rule in an escalation refusal."""
    if rule.non_resource_urls:
        return f"{{NonResourceURLs:{json.dumps(list(rule.non_resource_urls))}, Verbs:{json.dumps(list(rule.verbs))}}}"
    names = f", ResourceNames:{json.dumps(list(rule.resource_names))}" if rule.resource_names else ""
    return (f"{{APIGroups:{json.dumps(list(rule.api_groups))}, Resources:{json.dumps(list(rule.resources))}"
            f"{names}, Verbs:{json.dumps(list(rule.verbs))}}}")
