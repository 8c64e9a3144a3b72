"""Every error vmquota raises on purpose, and how each reaches a user.

    VmquotaError
     ├── ApiError                    a request is refused; becomes a Kubernetes Status
     │    ├── BadRequest        400  the body is not JSON/YAML, the path is wrong
     │    ├── Invalid           422  a field breaks a rule (names the field)
     │    ├── QuotaExceeded     403  admission refused (names quota, resource, requested/used/limited)
     │    ├── Unauthorized      401  no valid credentials (the message is always "Unauthorized")
     │    ├── Forbidden         403  any other refusal
     │    ├── TooManyRequests   429  a user has too many requests in flight
     │    ├── NotFound          404
     │    ├── MethodNotAllowed  405
     │    ├── NotAcceptable     406  no answer in a media type the Accept header takes
     │    ├── AlreadyExists     409
     │    ├── Conflict          409  stale resourceVersion, or a state that forbids the action
     │    │    └── ApplyConflict      a server-side apply would change fields other managers own
     │    ├── Expired           410  a continue token older than the change log keeps
     │    ├── RequestEntityTooLarge 413  a body larger than its target may take (an upload)
     │    └── UnsupportedMediaType 415  a body or patch type this path does not take
     └── HypervisorError              libvirt or qemu-img failed (wraps the library error)
          └── HypervisorUnavailable   temporary: the daemon does not answer; retry later

Errors carry their context (the object, the quota) in the message, Kubernetes-style,
and wrap the error they came from (`raise ... from e`).
"""

from __future__ import annotations


class VmquotaError(Exception):
    """Base of every error vmquota raises on purpose."""


class ApiError(VmquotaError):
    code = 500
    reason = "InternalError"

    def __init__(self, message: str, *, details: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details  # Kubernetes' StatusDetails (name, group, kind), where it gives them

    def status(self) -> dict[str, object]:
        """The Kubernetes `Status` object an HTTP client receives."""
        status: dict[str, object] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details is not None:
            status["details"] = self.details
        status["code"] = self.code
        return status


class BadRequest(ApiError):
    code = 400
    reason = "BadRequest"


class Invalid(ApiError):
    code = 422
    reason = "Invalid"


class Unauthorized(ApiError):
    """Kubernetes' 401: it never says why (a wrong token and an unknown one look the same to a client)."""
    code = 401
    reason = "Unauthorized"

    def __init__(self) -> None:
        super().__init__("Unauthorized")


class TooManyRequests(ApiError):
    code = 429
    reason = "TooManyRequests"


class Forbidden(ApiError):
    code = 403
    reason = "Forbidden"


class QuotaExceeded(Forbidden):
    """Admission refused; `quota` is the quota's name (`project/<name>` for a project).

    `namespace` is where the refused request was, `resources` the names it would have pushed over hard, and
    `quota_ref` the quota's (kind, namespace, name): what the refusal is counted and reported under.
    """

    def __init__(self, message: str, *, quota: str, namespace: str = "", resources: tuple[str, ...] = (),
                 quota_ref: tuple[str, str, str] | None = None) -> None:
        super().__init__(message)
        self.quota = quota
        self.namespace = namespace
        self.resources = resources
        self.quota_ref = quota_ref


class NotFound(ApiError):
    code = 404
    reason = "NotFound"


class MethodNotAllowed(ApiError):
    code = 405
    reason = "MethodNotAllowed"


class NotAcceptable(ApiError):
    code = 406
    reason = "NotAcceptable"


class AlreadyExists(ApiError):
    code = 409
    reason = "AlreadyExists"


class Conflict(ApiError):
    code = 409
    reason = "Conflict"


class ApplyConflict(Conflict):
    """`causes` are Kubernetes' `details.causes`: one FieldManagerConflict per field and manager."""

    def __init__(self, message: str, *, causes: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.causes = causes

    def status(self) -> dict[str, object]:
        return {**super().status(), "details": {"causes": self.causes}}


class UnsupportedMediaType(ApiError):
    code = 415
    reason = "UnsupportedMediaType"

    def __init__(self, accepted: list[str]) -> None:
        super().__init__("the body of the request was in an unknown format - accepted media types include: "
                         + ", ".join(accepted))


class StoreError(VmquotaError):
    """The store could not commit (its disk is full or failing): nothing of the request was kept."""


class HypervisorError(VmquotaError):
    """libvirt or qemu-img failed; the message names the VM or file."""


class HypervisorUnavailable(HypervisorError):
    """The hypervisor does not answer now; the caller may retry later."""


class RequestEntityTooLarge(ApiError):
    code = 413
    reason = "RequestEntityTooLarge"


class Expired(ApiError):
    """410: what the request names is older than the server keeps (a continue token, a resourceVersion).
    `continue_token`, when set, lets the client go on without a consistent snapshot, as Kubernetes offers."""
    code = 410
    reason = "Expired"

    def __init__(self, message: str, *, continue_token: str | None = None) -> None:
        super().__init__(message)
        self.continue_token = continue_token

    def status(self) -> dict[str, object]:
        body = super().status()
        if self.continue_token:
            body["metadata"] = {"continue": self.continue_token}
        return body
