"""Who a request comes from, as Kubernetes' `user.Info` says it: a name, a uid, groups.

Bottom layer, pure. Authentication (`apiserver/authentication.py`) makes one for every request; RBAC
(`rbac.py`), audit and the per-user limits read it.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTHENTICATED = "system:authenticated"
UNAUTHENTICATED = "system:unauthenticated"
ANONYMOUS = "system:anonymous"
MASTERS = "system:masters"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
SERVICE_ACCOUNTS = "system:serviceaccounts"


@dataclass(frozen=True)
class UserInfo:
    name: str
    uid: str = ""
    groups: tuple[str, ...] = ()

    @property
    def anonymous(self) -> bool:
        return self.name == ANONYMOUS


def authenticated(name: str, groups: tuple[str, ...] = (), uid: str = "") -> UserInfo:
    """A user as every authenticator returns one: in `system:authenticated` too, once."""
    return UserInfo(name, uid, tuple(dict.fromkeys((*groups, AUTHENTICATED))))


def anonymous() -> UserInfo:
    return UserInfo(ANONYMOUS, "", (UNAUTHENTICATED,))


def service_account(namespace: str, name: str, uid: str) -> UserInfo:
    return authenticated(f"{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}",
                         (SERVICE_ACCOUNTS, f"{SERVICE_ACCOUNTS}:{namespace}"), uid)


def parse_service_account(user: str) -> tuple[str, str] | None:
    """(namespace, name) of a ServiceAccount's user name; None for any other user."""
    if not user.startswith(SERVICE_ACCOUNT_PREFIX):
        return None
    namespace, _, name = user[len(SERVICE_ACCOUNT_PREFIX):].partition(":")
    return (namespace, name) if namespace and name and ":" not in name else None
