"""Authentication: who sent a request, as kube-apiserver's authenticators decide it. A filter (`filters.py`).

Any of these authenticates a request, tried in kube-apiserver's order:
    x509 client certificates   verified against vmquota's CA during the TLS handshake (`tls.py`): CN the user,
                               each O a group
    a static token file        `--token-auth-file`, Kubernetes' CSV `token,user,uid,"group1,group2"`, read
                               again whenever the file changes
    ServiceAccount tokens      bound JWTs from the TokenRequest subresource (`tokens.py`), valid only while
                               their ServiceAccount (the same uid) exists
Every authenticated user is in `system:authenticated`. Credentials that are presented but not valid (a wrong or
expired token, a certificate from another CA) are always a 401 Status "Unauthorized", never a hint of why. A
request with no credentials at all is anonymous (`system:anonymous`, `system:unauthenticated`) when the server
allows anonymous requests (`--anonymous-auth`, for tests), else a 401 too, except on the few paths that
kube-apiserver's public-info-viewer role opens to anyone (`/healthz`, `/version`; here the dashboard's files too).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import hmac
import io
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmquota import errors, identity, pki, tokens
from vmquota.apiserver import dashboard
from vmquota.apiserver.request import Request, Response
from vmquota.identity import UserInfo

log = logging.getLogger(__name__)

# kube-apiserver's AnonymousAuthConfigurableEndpoints with anonymous requests limited to health and version,
# and the dashboard's files, which hold no data: a browser loads them before it can present a token.
PUBLIC_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/version"}) | dashboard.PATHS
MAX_AUTHORIZATION_LENGTH = 16384

Handler = Callable[[Request], Response]


class TokenFileError(Exception):
    """A token file that cannot be read or parsed; names the file and line, never a token."""


def parse_token_file(text: str, source: str) -> dict[bytes, UserInfo]:
    """The users of a token file, by the SHA-256 of their token (so that no token is kept as a dict key)."""
    users: dict[bytes, UserInfo] = {}
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or (len(row) == 1 and not row[0].strip()) or row[0].lstrip().startswith("#"):
            continue
        if len(row) < 3:
            raise TokenFileError(f"{source}, line {number}: expected token,user,uid[,\"group1,group2\"]")
        token, user, uid = (field.strip() for field in row[:3])
        if not token or not user:
            raise TokenFileError(f"{source}, line {number}: the token and the user must not be empty")
        groups = tuple(g.strip() for g in row[3].split(",") if g.strip()) if len(row) > 3 else ()
        users[_digest(token)] = identity.authenticated(user, groups, uid)
    return users


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class TokenFile:
    """A static token file, read again when its size, time or inode changes (one stat per token request)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._users: dict[bytes, UserInfo] = {}
        self._reload(initial=True)

    def _reload(self, *, initial: bool = False) -> None:
        try:
            status = os.stat(self.path)
            stamp = (status.st_ino, status.st_size, status.st_mtime_ns)
            if stamp == self._seen:
                return
            users = parse_token_file(self.path.read_text(), str(self.path))
        except (OSError, UnicodeDecodeError, TokenFileError) as e:
            if initial:
                raise TokenFileError(f"cannot use the token file {self.path}: {e}") from e
            log.error("keeping the token file's previous contents: %s", e)
            return
        self._users, self._seen = users, stamp

    def lookup(self, token: str) -> UserInfo | None:
        with self._lock:
            self._reload()
            users = self._users
        digest = _digest(token)
        user = users.get(digest)
        # The dict found it by digest; comparing the digest in constant time too costs nothing.
        return user if user is not None and hmac.compare_digest(digest, _digest(token)) else None


@dataclass(frozen=True)
class Authenticator:
    token_file: TokenFile | None
    signer: tokens.Signer | None
    # The uid of a ServiceAccount that exists now, or None: a token of a deleted one must fail.
    service_account_uid: Callable[[str, str], str | None]
    anonymous: bool = False

    def authenticate(self, request: Request) -> UserInfo:
        """The request's user; Unauthorized when it presents credentials that are not valid, or none where
        they are needed."""
        if request.client_certificate is not None:
            if not request.client_certificate_trusted:
                raise errors.Unauthorized()
            user_info = _certificate_user(request.client_certificate)
            if user_info is None:
                raise errors.Unauthorized()
            return user_info
        header = request.headers.get("Authorization")
        if header is not None:
            return self._bearer(header)
        if self.anonymous or (request.path.rstrip("/") or "/") in PUBLIC_PATHS:
            return identity.anonymous()
        raise errors.Unauthorized()

    def _bearer(self, header: str) -> UserInfo:
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(header) > MAX_AUTHORIZATION_LENGTH:
            raise errors.Unauthorized()
        if self.token_file is not None:
            user = self.token_file.lookup(token)
            if user is not None:
                return user
        if self.signer is not None:
            try:
                binding = self.signer.verify(token)
            except tokens.InvalidToken as e:
                log.debug("a bearer token was refused: %s", e)
                raise errors.Unauthorized() from None
            if self.service_account_uid(binding.namespace, binding.name) != binding.uid:
                raise errors.Unauthorized()  # its ServiceAccount was deleted (perhaps made again: a new uid)
            return identity.service_account(binding.namespace, binding.name, binding.uid)
        raise errors.Unauthorized()


@functools.lru_cache(maxsize=1024)
def _certificate_user(cert: Any) -> UserInfo | None:
    """The user of a (verified) client certificate; a kept-alive connection presents the same one each time."""
    user, groups = pki.subject_identity(cert)
    return identity.authenticated(user, groups) if user else None


def filter_for(authenticator: Authenticator) -> Callable[[Request, Handler], Response]:
    def authenticate(request: Request, handler: Handler) -> Response:
        request.user = authenticator.authenticate(request)
        return handler(request)
    return authenticate
