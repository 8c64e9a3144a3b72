"""How one server is secured: TLS, authentication, authorization, audit and limits, and the filters they make.

Secure by default, as kube-apiserver: `Options()` serves TLS with vmquota's CA, refuses requests without
credentials (but `/healthz` and `/version`), authorizes with RBAC and audits. Tests opt out explicitly with the
same switches kube-apiserver has (`tls=False`, `anonymous_auth=True`, `authorization_mode="AlwaysAllow"`).
Plain HTTP, or no authentication, are refused on any address but loopback (`check_listen`).

`Options` travels to the other API processes as JSON (`workers.py`); each process then builds its own
`Security` from it: its TLS context, its authenticator, its policy cache, its audit file descriptor.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from OpenSSL import SSL

from vmquota import errors, objects, pki, tokens
from vmquota.api import Api
from vmquota.apiserver import audit, authentication, authorization, limits, reviews, tls
from vmquota.apiserver.filters import Filter


@dataclass(frozen=True)
class Options:
    tls: bool = True
    tls_cert_file: str | None = None  # bring your own; else vmquota's CA makes one in <data-dir>/pki
    tls_private_key_file: str | None = None
    anonymous_auth: bool = False  # requests without credentials are system:anonymous instead of a 401
    token_auth_file: str | None = None
    authorization_mode: str = authorization.RBAC
    audit: bool = True
    max_requests_inflight_per_user: int = limits.DEFAULT_PER_USER

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Options:
        return cls(**json.loads(text))

    @property
    def authenticates(self) -> bool:
        """Whether a request without credentials is refused (not everyone may do everything)."""
        return not (self.anonymous_auth and self.authorization_mode == authorization.ALWAYS_ALLOW)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(options: Options, host: str) -> None:
    """Refuse to serve beyond loopback without TLS or without authentication."""
    if is_loopback(host):
        return
    if not options.tls:
        raise errors.VmquotaError(f"refusing to serve plain HTTP on {host}: anyone on the network could read and "
                                  f"change everything; serve TLS (the default) or listen on 127.0.0.1")
    if not options.authenticates:
        raise errors.VmquotaError(f"refusing to serve {host} with anonymous requests allowed to do anything: drop "
                                  f"--anonymous-auth or --authorization-mode AlwaysAllow, or listen on 127.0.0.1")


@dataclass(frozen=True)
class Security:
    """What one API process builds from the options."""
    options: Options
    tls_context: SSL.Context | None
    authority: pki.Authority | None
    filters: tuple[Filter, ...]
    authorizer: authorization.Authorizer


def build(options: Options, *, api: Api, data_dir: Path, listen_host: str) -> Security:
    """The TLS context and the filter chain of one process (the CA and certificates are made if missing)."""
    authority: pki.Authority | None = None
    context = None
    if options.tls:
        if options.tls_cert_file and options.tls_private_key_file:
            authority = pki.Authority.load_or_create(data_dir)  # still the CA of the client certificates
            files = pki.ServingFiles(Path(options.tls_cert_file), Path(options.tls_private_key_file),
                                     authority.cert_file)
        elif options.tls_cert_file or options.tls_private_key_file:
            raise errors.VmquotaError("--tls-cert-file and --tls-private-key-file go together")
        else:
            authority, files = pki.ensure_serving(data_dir, listen_host)
        try:
            context = tls.server_context(files)
        except (SSL.Error, OSError) as e:
            raise errors.VmquotaError(f"cannot use the TLS certificate {files.cert_file} and key "
                                      f"{files.key_file}: {e}") from e
    signer = tokens.Signer.load_or_create(data_dir)
    api.tokens = signer
    token_file = None
    if options.token_auth_file:
        try:
            token_file = authentication.TokenFile(Path(options.token_auth_file))
        except authentication.TokenFileError as e:
            raise errors.VmquotaError(str(e)) from e

    def service_account_uid(namespace: str, name: str) -> str | None:
        account = api.store.reader().get(objects.SERVICE_ACCOUNT, namespace, name)
        return str(account["metadata"]["uid"]) if account else None

    authenticator = authentication.Authenticator(token_file, signer, service_account_uid,
                                                 anonymous=options.anonymous_auth)
    authorizer = authorization.Authorizer(api.store, options.authorization_mode)
    chain: list[Filter] = []
    if options.audit:
        chain.append(audit.Auditor(audit.AuditLog(audit.audit_dir(data_dir)), api))
    chain += [authentication.filter_for(authenticator), limits.InFlight(options.max_requests_inflight_per_user),
              authorizer, reviews.Reviews(authorizer)]
    return Security(options, context, authority, tuple(chain), authorizer)


def insecure() -> Options:
    """What tests that predate tenants run with: plain HTTP on loopback, everyone anonymous and allowed."""
    return Options(tls=False, anonymous_auth=True, authorization_mode=authorization.ALWAYS_ALLOW, audit=False)


def describe(options: Options) -> dict[str, Any]:
    return asdict(options)
