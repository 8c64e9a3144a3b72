"""ServiceAccount tokens: bound, expiring JWTs, as Kubernetes' TokenRequest issues them.

Beside the store (it keeps its signing key in the data dir). `Api.create_token` issues one for a ServiceAccount
(`POST .../serviceaccounts/{name}/token`, what `kubectl create token` sends); the authenticator verifies it.
The signing is PyJWT's (ES256 with `cryptography`'s keys). A token names the ServiceAccount's namespace, name
and uid in Kubernetes' private claim, so it stops working when its ServiceAccount is deleted, even if one of
the same name is made again.

    <data-dir>/pki/sa.key   the signing key (0600), shared by every API process of the server
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vmquota import pki

ISSUER = "https://vmquota.local"
API_AUDIENCES = (ISSUER, "https://kubernetes.default.svc.cluster.local", "https://kubernetes.default.svc")
DEFAULT_EXPIRATION_SECONDS = 3600  # kube-apiserver's default for a TokenRequest without expirationSeconds
MIN_EXPIRATION_SECONDS = 600  # as Kubernetes: a shorter one is refused
MAX_EXPIRATION_SECONDS = 365 * 24 * 3600
ALGORITHM = "ES256"
MAX_TOKEN_LENGTH = 8192  # far beyond any token issued here; longer ones are not parsed at all


class InvalidToken(Exception):
    """Not a token of this server, or no longer valid; the message is for the server's log, never a client."""


@dataclass(frozen=True)
class Binding:
    """Whom a valid token is for."""
    namespace: str
    name: str
    uid: str
    expires: int  # seconds since the epoch


class Signer:
    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key
        self._public = key.public_key()

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Signer:
        path = pki.pki_dir(data_dir) / "sa.key"
        if not path.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            pki.write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()).decode())
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an ECDSA key")
        return cls(loaded)

    def issue(self, *, namespace: str, name: str, uid: str, audiences: tuple[str, ...],
              expiration_seconds: int, now: float | None = None) -> tuple[str, int]:
        """(token, expiry in seconds since the epoch)."""
        issued = int(time.time() if now is None else now)
        expires = issued + expiration_seconds
        claims: dict[str, Any] = {
            "iss": ISSUER, "sub": f"system:serviceaccount:{namespace}:{name}", "aud": list(audiences),
            "iat": issued, "nbf": issued, "exp": expires,
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}},
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM), expires

    def verify(self, token: str) -> Binding:
        """Whom `token` is for, if this server signed it for one of its own audiences and it has not expired."""
        if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
            raise InvalidToken("not a JWT")
        try:
            claims = jwt.decode(token, self._public, algorithms=[ALGORITHM], audience=list(API_AUDIENCES),
                                issuer=ISSUER, options={"require": ["exp", "iat", "nbf", "sub", "aud"]})
        except jwt.PyJWTError as e:
            raise InvalidToken(str(e)) from e
        private = claims.get("kubernetes.io")
        account = private.get("serviceaccount") if isinstance(private, dict) else None
        if not isinstance(private, dict) or not isinstance(account, dict):
            raise InvalidToken("no ServiceAccount claim")
        namespace, name, uid = private.get("namespace"), account.get("name"), account.get("uid")
        if not all(isinstance(v, str) and v for v in (namespace, name, uid)):
            raise InvalidToken("an incomplete ServiceAccount claim")
        assert isinstance(namespace, str) and isinstance(name, str) and isinstance(uid, str)
        if claims["sub"] != f"system:serviceaccount:{namespace}:{name}":
            raise InvalidToken("the subject does not match the ServiceAccount claim")
        return Binding(namespace, name, uid, int(claims["exp"]))
