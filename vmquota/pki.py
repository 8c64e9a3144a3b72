"""vmquota's certificate authority: the CA, the server's certificate and client certificates, in the data dir.

Beside the store (it writes files under the data directory; nothing else). `vmquota serve` makes the CA and a
server certificate at its first start, as kubeadm does for kube-apiserver, and `vmquota kubeconfig` issues
client certificates from the same CA: the subject's CN is the user, each O a group (Kubernetes' x509
authenticator reads them so). All the X.509 work is the `cryptography` library's; keys are ECDSA P-256 (fast
handshakes, accepted by Go's and Python's TLS) and written 0600 from their first byte.

    <data-dir>/pki/ca.crt, ca.key          the authority (ten years)
    <data-dir>/pki/server.crt, server.key  the serving certificate (one year, made again when it no longer
                                           covers the listen address or is about to expire)
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PKI_DIR = "pki"
CA_LIFETIME = datetime.timedelta(days=3650)
SERVER_LIFETIME = datetime.timedelta(days=365)
RENEW_BEFORE = datetime.timedelta(days=30)  # a server certificate this close to its end is made again
DEFAULT_CLIENT_LIFETIME = datetime.timedelta(days=365)
BACKDATE = datetime.timedelta(minutes=5)  # clocks of clients a little behind still accept a new certificate


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM."""
    cert_pem: str
    key_pem: str


@dataclass(frozen=True)
class ServingFiles:
    """What a TLS server loads: its certificate (chain), its key, and the CA its clients' certificates come from."""
    cert_file: Path
    key_file: Path
    client_ca_file: Path


def pki_dir(data_dir: Path) -> Path:
    return data_dir / PKI_DIR


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def write_private(path: Path, text: str) -> None:
    """Write atomically, mode 0600 from the first byte (a key must never be readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp makes it 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


class Authority:
    """The CA: signs the server's certificate and the clients'."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_file: Path) -> None:
        self.cert = cert
        self.key = key
        self.cert_file = cert_file

    @property
    def cert_pem(self) -> str:
        return _cert_pem(self.cert)

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Authority:
        folder = pki_dir(data_dir)
        cert_file, key_file = folder / "ca.crt", folder / "ca.key"
        if cert_file.exists() and key_file.exists():
            return cls.load(data_dir)
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmquota-ca")])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE).not_valid_after(now + CA_LIFETIME)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        write_private(key_file, _key_pem(key))  # the key first: a CA certificate without its key is useless
        write_private(cert_file, _cert_pem(cert))
        return cls(cert, key, cert_file)

    @classmethod
    def load(cls, data_dir: Path) -> Authority:
        """The existing CA; FileNotFoundError when `vmquota serve` has not made one in `data_dir` yet."""
        folder = pki_dir(data_dir)
        cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{folder / 'ca.key'} is not an ECDSA key")
        return cls(cert, key, folder / "ca.crt")

    def _issue(self, subject: x509.Name, lifetime: datetime.timedelta, usage: x509.ObjectIdentifier,
               sans: Sequence[x509.GeneralName] = ()) -> KeyPair:
        key = _new_key()
        now = _now()
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - BACKDATE).not_valid_after(now + lifetime)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                                crl_sign=False, content_commitment=False, data_encipherment=False,
                                                key_agreement=False, encipher_only=False, decipher_only=False),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return KeyPair(_cert_pem(builder.sign(self.key, hashes.SHA256())), _key_pem(key))

    def issue_client(self, user: str, groups: Iterable[str] = (),
                     lifetime: datetime.timedelta = DEFAULT_CLIENT_LIFETIME) -> KeyPair:
        """A client certificate for `user` in `groups`, as Kubernetes reads them: CN the user, each O a group."""
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, group) for group in groups]
        subject = x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, user)])
        return self._issue(subject, lifetime, ExtendedKeyUsageOID.CLIENT_AUTH)

    def issue_server(self, hosts: Iterable[str]) -> KeyPair:
        return self._issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmquota")]), SERVER_LIFETIME,
                           ExtendedKeyUsageOID.SERVER_AUTH, [_general_name(host) for host in sorted(set(hosts))])


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def serving_hosts(listen_host: str) -> set[str]:
    """The names the server certificate covers: the listen address, loopback, localhost and this host's names."""
    hosts = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
    if listen_host not in ("", "0.0.0.0", "::"):
        hosts.add(listen_host)
    return {host for host in hosts if host}


def covers(cert: x509.Certificate, hosts: Iterable[str]) -> bool:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    present = {str(value) for value in sans.get_values_for_type(x509.DNSName)} | \
              {str(value) for value in sans.get_values_for_type(x509.IPAddress)}
    return {str(ipaddress.ip_address(h)) if _is_ip(h) else h for h in hosts} <= present


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def ensure_serving(data_dir: Path, listen_host: str) -> tuple[Authority, ServingFiles]:
    """The CA and a server certificate for `listen_host`, made when missing, stale or not covering it."""
    ca = Authority.load_or_create(data_dir)
    folder = pki_dir(data_dir)
    cert_file, key_file = folder / "server.crt", folder / "server.key"
    hosts = serving_hosts(listen_host)
    if not _usable(cert_file, key_file, ca, hosts):
        pair = ca.issue_server(hosts)
        write_private(key_file, pair.key_pem)
        write_private(cert_file, pair.cert_pem)
    return ca, ServingFiles(cert_file, key_file, ca.cert_file)


def _usable(cert_file: Path, key_file: Path, ca: Authority, hosts: set[str]) -> bool:
    if not (cert_file.exists() and key_file.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except ValueError:
        return False
    return (cert.issuer == ca.cert.subject and cert.not_valid_after_utc - RENEW_BEFORE > _now()
            and covers(cert, hosts))


def subject_identity(cert: x509.Certificate) -> tuple[str, tuple[str, ...]]:
    """(user, groups) of a client certificate: its CN and its Os, in order."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    user = str(names[0].value) if names else ""
    groups = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))
    return user, groups
