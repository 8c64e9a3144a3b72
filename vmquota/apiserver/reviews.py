"""Self reviews: what `kubectl auth can-i` and `kubectl auth whoami` ask. A filter behind authorization.

    POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews   may I do this? (`auth can-i VERB RESOURCE`)
    POST /apis/authorization.k8s.io/v1/selfsubjectrulesreviews    what may I do here? (`auth can-i --list`)
    POST /apis/authentication.k8s.io/v1/selfsubjectreviews        who am I? (`auth whoami`)

They are created and answered, never stored, as in Kubernetes. The answer is the authorizer's own, so can-i
never says yes to what a request would be refused (the tenant views of `authorization.py` included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vmquota import errors, rbac
from vmquota.apiserver import handlers
from vmquota.apiserver.authorization import Authorizer
from vmquota.apiserver.request import Request, Response
from vmquota.identity import UserInfo

Handler = Callable[[Request], Response]

ACCESS = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
RULES = "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews"
WHOAMI = ("/apis/authentication.k8s.io/v1/selfsubjectreviews", "/apis/authentication.k8s.io/v1beta1/selfsubjectreviews")
PATHS = (ACCESS, RULES, *WHOAMI)


def _spec(request: Request) -> dict[str, Any]:
    body = handlers.typed_body(request)
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise errors.BadRequest("the body must be an object")
    spec = body.get("spec") or {}
    if not isinstance(spec, dict):
        raise errors.BadRequest("spec must be an object")
    return spec


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


class Reviews:
    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    def __call__(self, request: Request, handler: Handler) -> Response:
        if request.path not in PATHS:
            return handler(request)
        if request.method != "POST":
            raise errors.MethodNotAllowed(f"only POST is supported on {request.path}")
        user = request.user
        assert user is not None  # authorization let it through
        if request.path == ACCESS:
            return Response.json(201, self.access(user, _spec(request)))
        if request.path == RULES:
            return Response.json(201, self.rules(user, _spec(request)))
        version = request.path.split("/")[3]
        return Response.json(201, {
            "kind": "SelfSubjectReview", "apiVersion": f"authentication.k8s.io/{version}",
            "metadata": {"creationTimestamp": None},
            "status": {"userInfo": {"username": user.name, "uid": user.uid or None, "groups": list(user.groups)}}})

    def access(self, user: UserInfo, spec: dict[str, Any]) -> dict[str, Any]:
        resource = spec.get("resourceAttributes")
        non_resource = spec.get("nonResourceAttributes")
        if isinstance(resource, dict):
            a = rbac.Attributes(user, _text(resource.get("verb")), True, _text(resource.get("group")),
                                _text(resource.get("resource")), _text(resource.get("subresource")),
                                _text(resource.get("namespace")), _text(resource.get("name")))
        elif isinstance(non_resource, dict):
            a = rbac.Attributes(user, _text(non_resource.get("verb")), False, path=_text(non_resource.get("path")))
        else:
            raise errors.Invalid('SelfSubjectAccessReview.authorization.k8s.io "" is invalid: spec.resourceAttributes: '
                                 "Invalid value: null: exactly one of nonResourceAttributes or resourceAttributes "
                                 "must be specified")
        decision = self.authorizer.authorize(a)
        allowed = decision.allowed or self._tenant_allows(a)
        status: dict[str, Any] = {"allowed": allowed}
        if decision.reason:
            status["reason"] = decision.reason
        return {"kind": "SelfSubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
                "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}

    def _tenant_allows(self, a: rbac.Attributes) -> bool:
        if a.resource_request and a.verb == "get" and a.api_group == "vmquota.io" and a.resource == "projects" \
                and a.subresource in ("", "usage") and a.name:
            return self.authorizer.project_member(a) is not None
        return False

    def rules(self, user: UserInfo, spec: dict[str, Any]) -> dict[str, Any]:
        namespace = _text(spec.get("namespace"))
        held = self.authorizer.snapshot().policy.rules_for(user, namespace)
        resource_rules = [{key: value for key, value in r.to_json().items()} for r in held if not r.non_resource_urls]
        non_resource = [{"verbs": list(r.verbs), "nonResourceURLs": list(r.non_resource_urls)}
                        for r in held if r.non_resource_urls]
        return {"kind": "SelfSubjectRulesReview", "apiVersion": "authorization.k8s.io/v1",
                "metadata": {"creationTimestamp": None}, "spec": spec,
                "status": {"resourceRules": resource_rules, "nonResourceRules": non_resource, "incomplete": False}}
