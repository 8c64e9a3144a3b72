"""RBAC, as Kubernetes evaluates it: rules, roles, bindings, and whether a request's attributes are allowed.

Bottom layer, pure. `Policy` is built from the stored Roles, ClusterRoles, RoleBindings and ClusterRoleBindings
(`rbac.authorization.k8s.io/v1`) and answers `authorize(attributes)`; `apiserver/authorization.py` derives the
attributes of each request and keeps one Policy per process, built again only when an RBAC object changes.
Bindings are indexed by subject, so a decision costs the same with 10 or 10,000 RoleBindings in the store.

The rules match as Kubernetes' `rbac/v1` helpers do (`*` wildcards, `virtualmachines/start` and `*/start`
subresources, resourceNames, nonResourceURLs with a trailing `*`), aggregated ClusterRoles collect the rules of
the ClusterRoles their selectors name, and `covers` is the escalation check: nobody may grant, by a role or a
binding, what they do not hold themselves (unless they have the `escalate` or `bind` verb).

`bootstrap()` is what kube-apiserver and KubeVirt install: cluster-admin (bound to system:masters), admin, edit
and view with KubeVirt's VM rules aggregated in, discovery and self-reviews for everyone authenticated, health
and version for anyone.
"""

from __future__ import annotations

import contextvars
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from vmquota import identity
from vmquota.identity import UserInfo

GROUP = "rbac.authorization.k8s.io"
AGGREGATE_LABEL = "rbac.authorization.k8s.io/aggregate-to-"
AUTOUPDATE = "rbac.authorization.kubernetes.io/autoupdate"


@dataclass(frozen=True)
class Attributes:
    """What a request asks to do, as Kubernetes' `authorizer.Attributes`."""
    user: UserInfo
    verb: str
    resource_request: bool = True
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""  # of a non-resource request


@dataclass(frozen=True)
class Rule:
    verbs: tuple[str, ...] = ()
    api_groups: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    resource_names: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, rule: Any) -> Rule:
        """A stored rule; anything malformed in it matches nothing (validation refuses it at write)."""
        if not isinstance(rule, dict):
            return cls()

        def strings(key: str) -> tuple[str, ...]:
            value = rule.get(key)
            return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()

        return cls(strings("verbs"), strings("apiGroups"), strings("resources"), strings("resourceNames"),
                   strings("nonResourceURLs"))

    def to_json(self) -> dict[str, list[str]]:
        fields = {"verbs": self.verbs, "apiGroups": self.api_groups, "resources": self.resources,
                  "resourceNames": self.resource_names, "nonResourceURLs": self.non_resource_urls}
        return {key: list(value) for key, value in fields.items() if value or key == "verbs"}

    def allows(self, a: Attributes) -> bool:
        if not _verb_matches(self.verbs, a.verb):
            return False
        if not a.resource_request:
            return any(_url_matches(url, a.path) for url in self.non_resource_urls)
        return (("*" in self.api_groups or a.api_group in self.api_groups)
                and _resource_matches(self.resources, a.resource, a.subresource)
                and (not self.resource_names or a.name in self.resource_names))


def _verb_matches(verbs: Iterable[str], verb: str) -> bool:
    return any(v == "*" or v == verb for v in verbs)


def _resource_matches(resources: Iterable[str], resource: str, subresource: str) -> bool:
    combined = f"{resource}/{subresource}" if subresource else resource
    for candidate in resources:
        if candidate == "*" or candidate == combined:
            return True
        if subresource and candidate == f"*/{subresource}":
            return True
    return False


def _url_matches(rule_url: str, path: str) -> bool:
    if rule_url == "*" or rule_url == path:
        return True
    return rule_url.endswith("*") and path.startswith(rule_url[:-1])


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""  # which binding allowed it, as kube-apiserver's audit annotations say


@dataclass(frozen=True)
class _Grant:
    """One binding's role, for the subjects it names."""
    binding: str  # `RoleBinding "edit-alice/dev"` (name/namespace, as Kubernetes), for the reasons
    role_kind: str  # Role or ClusterRole
    role_name: str
    namespace: str  # of a RoleBinding; "" for a ClusterRoleBinding


def _subject_keys(subject: Any, binding_namespace: str) -> list[tuple[str, str]]:
    """("user"|"group", name) a binding's subject stands for; a ServiceAccount is the user it authenticates as."""
    if not isinstance(subject, dict) or not isinstance(subject.get("name"), str):
        return []
    kind, name = subject.get("kind"), subject["name"]
    if kind == "User":
        return [("user", name)]
    if kind == "Group":
        return [("group", name)]
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return [("user", f"{identity.SERVICE_ACCOUNT_PREFIX}{namespace}:{name}")] if namespace else []
    return []


def _rules(obj: Mapping[str, Any]) -> tuple[Rule, ...]:
    rules = obj.get("rules")
    return tuple(Rule.from_json(rule) for rule in rules) if isinstance(rules, list) else ()


def _labels(obj: Mapping[str, Any]) -> dict[str, Any]:
    metadata = obj.get("metadata")
    labels = metadata.get("labels") if isinstance(metadata, dict) else None
    return labels if isinstance(labels, dict) else {}


def _name(obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata")
    return str(metadata.get("name", "")) if isinstance(metadata, dict) else ""


def _namespace(obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata")
    return str(metadata.get("namespace", "")) if isinstance(metadata, dict) else ""


def selector_matches(selector: Any, labels: Mapping[str, Any]) -> bool:
    """A label selector's matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist)."""
    if not isinstance(selector, dict):
        return False
    match_labels = selector.get("matchLabels") or {}
    if not isinstance(match_labels, dict) or any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        if not isinstance(expression, dict):
            return False
        key, operator, values = str(expression.get("key")), expression.get("operator"), expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False
    return bool(match_labels) or bool(selector.get("matchExpressions"))


def aggregate(cluster_roles: Iterable[Mapping[str, Any]]) -> dict[str, tuple[Rule, ...]]:
    """The rules of every ClusterRole, an aggregated one holding those of the ClusterRoles its selectors pick
    (as Kubernetes' aggregation controller writes them into it)."""
    roles = list(cluster_roles)
    result = {_name(role): _rules(role) for role in roles}
    aggregated = []
    for role in roles:
        rule = role.get("aggregationRule")
        selectors = rule.get("clusterRoleSelectors") if isinstance(rule, dict) else None
        if isinstance(selectors, list) and selectors:
            aggregated.append((role, [o for o in roles if o is not role
                                      and any(selector_matches(s, _labels(o)) for s in selectors)]))
    # Aggregated roles may aggregate others (view into edit into admin): until nothing changes.
    for _ in range(len(aggregated) + 1):
        changed = False
        for role, sources in aggregated:
            collected: list[Rule] = []
            for source in sources:
                collected += [r for r in result[_name(source)] if r not in collected]
            if tuple(collected) != result[_name(role)]:
                result[_name(role)], changed = tuple(collected), True
        if not changed:
            break
    return result


class Policy:
    """Every role and binding, indexed for decisions: by subject, then by namespace."""

    def __init__(self, *, roles: Iterable[Mapping[str, Any]] = (), cluster_roles: Iterable[Mapping[str, Any]] = (),
                 role_bindings: Iterable[Mapping[str, Any]] = (),
                 cluster_role_bindings: Iterable[Mapping[str, Any]] = ()) -> None:
        self.cluster_rules = aggregate(cluster_roles)
        self.role_rules = {(_namespace(role), _name(role)): _rules(role) for role in roles}
        # (kind, subject name) -> grants: cluster-wide ones, and per namespace.
        self._cluster: dict[tuple[str, str], list[_Grant]] = defaultdict(list)
        self._namespaced: dict[tuple[str, str, str], list[_Grant]] = defaultdict(list)
        for binding in cluster_role_bindings:
            grant = self._grant(binding, "", f'ClusterRoleBinding "{_name(binding)}"')
            if grant is not None:
                for key in _subjects(binding, ""):
                    self._cluster[key].append(grant)
        for binding in role_bindings:
            namespace = _namespace(binding)
            # name/namespace, in that order, as Kubernetes' roleBindingDescriber writes it.
            grant = self._grant(binding, namespace, f'RoleBinding "{_name(binding)}/{namespace}"')
            if grant is not None:
                for kind, name in _subjects(binding, namespace):
                    self._namespaced[(namespace, kind, name)].append(grant)

    @staticmethod
    def _grant(binding: Mapping[str, Any], namespace: str, label: str) -> _Grant | None:
        ref = binding.get("roleRef")
        if not isinstance(ref, dict) or ref.get("kind") not in ("Role", "ClusterRole") or not ref.get("name"):
            return None
        if ref["kind"] == "Role" and not namespace:
            return None
        return _Grant(label, str(ref["kind"]), str(ref["name"]), namespace)

    def _role_rules(self, grant: _Grant) -> tuple[Rule, ...]:
        if grant.role_kind == "ClusterRole":
            return self.cluster_rules.get(grant.role_name, ())
        return self.role_rules.get((grant.namespace, grant.role_name), ())

    def _grants(self, user: UserInfo, namespace: str) -> Iterator[tuple[tuple[str, str], _Grant]]:
        """Each grant the user holds in `namespace`, with the subject key ("user"|"group", name) it came by."""
        keys = [("user", user.name), *(("group", group) for group in user.groups)]
        for key in keys:
            for grant in self._cluster.get(key, ()):
                yield key, grant
        if namespace:
            for kind, name in keys:
                for grant in self._namespaced.get((namespace, kind, name), ()):
                    yield (kind, name), grant

    def authorize(self, a: Attributes) -> Decision:
        for key, grant in self._grants(a.user, a.namespace):
            if any(rule.allows(a) for rule in self._role_rules(grant)):
                return Decision(True, f'RBAC: allowed by {grant.binding} of {grant.role_kind} '
                                      f'"{grant.role_name}" to {_describe(key)}')
        return Decision(False)

    def rules_for(self, user: UserInfo, namespace: str) -> list[Rule]:
        """Every rule the user holds in `namespace` (cluster-wide ones too), as SelfSubjectRulesReview lists them."""
        rules: list[Rule] = []
        for _, grant in self._grants(user, namespace):
            rules += [r for r in self._role_rules(grant) if r not in rules]
        return rules

    def role_rules_of(self, kind: str, namespace: str, name: str) -> tuple[Rule, ...] | None:
        """The rules of a role a binding refers to; None when it does not exist."""
        if kind == "ClusterRole":
            return self.cluster_rules.get(name)
        return self.role_rules.get((namespace, name))


def _subjects(binding: Mapping[str, Any], namespace: str) -> list[tuple[str, str]]:
    subjects = binding.get("subjects")
    return [key for s in subjects for key in _subject_keys(s, namespace)] if isinstance(subjects, list) else []


def _describe(key: tuple[str, str]) -> str:
    """The subject a grant came by, as Kubernetes' describeSubject: `User "alice"`, `Group "team-a"`,
    `ServiceAccount "ci/dev"` (name/namespace)."""
    kind, name = key
    if kind == "group":
        return f'Group "{name}"'
    if name.startswith(identity.SERVICE_ACCOUNT_PREFIX):
        namespace, _, account = name.removeprefix(identity.SERVICE_ACCOUNT_PREFIX).partition(":")
        return f'ServiceAccount "{account}/{namespace}"'
    return f'User "{name}"'


# -- escalation: nobody grants what they do not hold ------------------------------------------------------

def breakdown(rule: Rule) -> Iterator[Rule]:
    """A rule as one rule per (group, resource, verb, name), or per (url, verb): what `covers` compares."""
    for verb in rule.verbs:
        for url in rule.non_resource_urls:
            yield Rule(verbs=(verb,), non_resource_urls=(url,))
        for group in rule.api_groups:
            for resource in rule.resources:
                for name in rule.resource_names or ("",):
                    yield Rule(verbs=(verb,), api_groups=(group,), resources=(resource,),
                               resource_names=(name,) if name else ())


def _covers_one(owner: Rule, servant: Rule) -> bool:
    if not _verb_matches(owner.verbs, servant.verbs[0]):
        return False
    if servant.non_resource_urls:
        return any(_url_matches(url, servant.non_resource_urls[0]) for url in owner.non_resource_urls)
    group, resource = servant.api_groups[0], servant.resources[0]
    if "*" not in owner.api_groups and group not in owner.api_groups:
        return False
    sub = resource.partition("/")[2]
    if not (resource in owner.resources or "*" in owner.resources
            or (sub and f"*/{sub}" in owner.resources)):
        return False
    if not owner.resource_names:
        return True
    return bool(servant.resource_names) and servant.resource_names[0] in owner.resource_names


def uncovered(owner: Iterable[Rule], wanted: Iterable[Rule]) -> list[Rule]:
    """The parts of `wanted` that no rule of `owner` covers (Kubernetes' `validation.Covers`)."""
    held = list(owner)
    return [part for rule in wanted for part in breakdown(rule) if not any(_covers_one(o, part) for o in held)]


# The escalation check of the request being served (set by the authorization filter, read by the Api's rules
# for RBAC objects, which see the final object a create, update or patch would store).
EscalationCheck = Callable[[str, Mapping[str, Any]], None]
escalation_check: contextvars.ContextVar[EscalationCheck | None] = contextvars.ContextVar(
    "rbac_escalation_check", default=None)


# -- what kube-apiserver and KubeVirt install ------------------------------------------------------------

def _rule(groups: Iterable[str], resources: Iterable[str], verbs: Iterable[str]) -> dict[str, list[str]]:
    return {"apiGroups": list(groups), "resources": list(resources), "verbs": list(verbs)}


READ = ("get", "list", "watch")
WRITE = ("create", "delete", "deletecollection", "patch", "update")
VM_ACTIONS = ("virtualmachines/start", "virtualmachines/stop", "virtualmachines/restart",
              "virtualmachines/migrate")
# A running guest's actions, which KubeVirt's admin and edit roles grant as `update` (view does not).
VMI_ACTIONS = ("virtualmachineinstances/pause", "virtualmachineinstances/unpause",
               "virtualmachineinstances/softreboot")
KUBEVIRT_RESOURCES = ("virtualmachines", "virtualmachineinstances", "virtualmachineinstancemigrations")
# The websocket subresources (the serial console, port forwards), which KubeVirt's admin and edit roles grant as
# `get`; view does not, as in KubeVirt: a console types into the guest.
VM_STREAMS = ("virtualmachineinstances/console", "virtualmachineinstances/portforward", "virtualmachines/portforward")


@dataclass(frozen=True)
class BootstrapObject:
    kind: str  # ClusterRole or ClusterRoleBinding
    body: dict[str, Any] = field(default_factory=dict)


def _cluster_role(name: str, rules: list[dict[str, Any]], *, labels: dict[str, str] | None = None,
                  aggregate_from: str | None = None) -> BootstrapObject:
    metadata: dict[str, Any] = {"name": name, "annotations": {AUTOUPDATE: "true"},
                                "labels": {"kubernetes.io/bootstrapping": "rbac-defaults", **(labels or {})}}
    body: dict[str, Any] = {"apiVersion": f"{GROUP}/v1", "kind": "ClusterRole", "metadata": metadata,
                            "rules": rules}
    if aggregate_from:
        body["aggregationRule"] = {"clusterRoleSelectors": [
            {"matchLabels": {f"{AGGREGATE_LABEL}{aggregate_from}": "true"}}]}
    return BootstrapObject("ClusterRole", body)


def _binding(name: str, role: str, groups: Iterable[str]) -> BootstrapObject:
    return BootstrapObject("ClusterRoleBinding", {
        "apiVersion": f"{GROUP}/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": name, "annotations": {AUTOUPDATE: "true"},
                     "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
        "roleRef": {"apiGroup": GROUP, "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": GROUP, "kind": "Group", "name": group} for group in groups]})


def _aggregate_to(*levels: str) -> dict[str, str]:
    return {f"{AGGREGATE_LABEL}{level}": "true" for level in levels}


def bootstrap() -> list[BootstrapObject]:
    """The roles and bindings every server starts with (kube-apiserver's bootstrap policy, KubeVirt's roles,
    vmquota's own views), reduced to the resources vmquota serves."""
    # The dashboard's page and files (`/`, `/ui/...`) hold no data; the page then reads the API as its user.
    public = ["/healthz", "/livez", "/readyz", "/version", "/version/", "/", "/ui/*"]
    return [
        _cluster_role("cluster-admin", [_rule(["*"], ["*"], ["*"]), {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
        _binding("cluster-admin", "cluster-admin", [identity.MASTERS]),
        _cluster_role("system:discovery", [{"nonResourceURLs": [
            "/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*", "/readyz",
            "/version", "/version/", "/openapi.json"], "verbs": ["get"]}]),
        _binding("system:discovery", "system:discovery", [identity.AUTHENTICATED]),
        _cluster_role("system:public-info-viewer", [{"nonResourceURLs": public, "verbs": ["get"]}]),
        _binding("system:public-info-viewer", "system:public-info-viewer",
                 [identity.AUTHENTICATED, identity.UNAUTHENTICATED]),
        _cluster_role("system:basic-user", [
            _rule(["authorization.k8s.io"], ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], ["create"]),
            _rule(["authentication.k8s.io"], ["selfsubjectreviews"], ["create"])]),
        _binding("system:basic-user", "system:basic-user", [identity.AUTHENTICATED]),
        _cluster_role("admin", [], labels={}, aggregate_from="admin"),
        _cluster_role("edit", [], labels=_aggregate_to("admin"), aggregate_from="edit"),
        _cluster_role("view", [], labels=_aggregate_to("edit"), aggregate_from="view"),
        _cluster_role("system:aggregate-to-admin", [
            _rule([GROUP], ["rolebindings", "roles"], (*READ, *WRITE)),
            _rule(["authorization.k8s.io"], ["localsubjectaccessreviews"], ["create"])],
            labels=_aggregate_to("admin")),
        _cluster_role("system:aggregate-to-edit", [
            _rule([""], ["serviceaccounts"], WRITE),
            _rule([""], ["serviceaccounts/token"], ["create"])],
            labels=_aggregate_to("edit")),
        _cluster_role("system:aggregate-to-view", [
            _rule([""], ["events", "resourcequotas", "resourcequotas/status", "serviceaccounts",
                         "namespaces/status"], READ),
            _rule([""], ["namespaces"], READ),
            _rule(["events.k8s.io"], ["events"], READ)],
            labels=_aggregate_to("view")),
        _cluster_role("kubevirt.io:admin", [
            _rule(["subresources.kubevirt.io"], VM_ACTIONS, ["update"]),
            _rule(["subresources.kubevirt.io"], VM_STREAMS, ["get"]),
            _rule(["subresources.kubevirt.io"], VMI_ACTIONS, ["update"]),
            _rule(["kubevirt.io"], KUBEVIRT_RESOURCES, (*READ, *WRITE)),
            _rule(["clone.kubevirt.io"], ["virtualmachineclones"], (*READ, *WRITE))],
            labels={"kubevirt.io": "", **_aggregate_to("admin")}),
        _cluster_role("kubevirt.io:edit", [
            _rule(["subresources.kubevirt.io"], VM_ACTIONS, ["update"]),
            _rule(["subresources.kubevirt.io"], VM_STREAMS, ["get"]),
            _rule(["subresources.kubevirt.io"], VMI_ACTIONS, ["update"]),
            _rule(["kubevirt.io"], KUBEVIRT_RESOURCES, ("get", "delete", "create", "update", "patch", "list",
                                                        "watch")),
            _rule(["clone.kubevirt.io"], ["virtualmachineclones"], ("get", "delete", "create", "update", "patch",
                                                                    "list", "watch"))],
            labels={"kubevirt.io": "", **_aggregate_to("edit")}),
        _cluster_role("kubevirt.io:view", [
            _rule(["kubevirt.io"], KUBEVIRT_RESOURCES, READ),
            _rule(["clone.kubevirt.io"], ["virtualmachineclones"], READ)],
            labels={"kubevirt.io": "", **_aggregate_to("view")}),
        # CDI's: an image into an upload data volume. CDI's roles grant `create` on uploadtokenrequests (the token
        # for its upload proxy); vmquota takes the upload itself under the user's credentials (`apiserver/upload.py`).
        *(_cluster_role(f"cdi.kubevirt.io:{role}", [_rule(["upload.cdi.kubevirt.io"], ["datavolumes/upload"],
                                                          ["create"])],
                        labels=_aggregate_to(role)) for role in ("admin", "edit")),
        # vmquota's views of its accounting: what each VM of a namespace charges, and how its quotas' use moved
        # (the same status a viewer reads now, over time: the dashboard's charts).
        _cluster_role("vmquota.io:view", [_rule(["vmquota.io"], ["charges", "resourcequotas/history"], READ)],
                      labels=_aggregate_to("view")),
    ]


def with_aggregated_rules(objects: list[BootstrapObject]) -> list[BootstrapObject]:
    """The bootstrap objects with the aggregated ClusterRoles' rules filled in, as the aggregation controller
    would write them (so that `kubectl get clusterrole edit -o yaml` shows them)."""
    rules = aggregate([o.body for o in objects if o.kind == "ClusterRole"])
    filled = []
    for o in objects:
        if o.kind == "ClusterRole" and "aggregationRule" in o.body:
            o = BootstrapObject(o.kind, {**o.body, "rules": [r.to_json() for r in rules[o.body["metadata"]["name"]]]})
        filled.append(o)
    return filled
