"""Bad credentials against a secure server: generated and hand-made Authorization headers, client certificates
that are expired, foreign, self-signed, oddly named or not client certificates at all, and TLS handshakes that
stall or send garbage.

Whatever comes in: never a 5xx, never a bypass (a protected path answers only 401 to credentials that are not
valid), never a hung server (a well-behaved client is answered meanwhile and afterwards).
"""

from __future__ import annotations

import datetime
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import profile

from vmquota import kubeconfig, pki
from vmquota.apiserver import tls
from vmquota.app import App
from vmquota.client import Client

PROTECTED = "/api/v1/namespaces"


@pytest.fixture(scope="module")
def secure_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    app = App.open(data_dir=tmp_path_factory.mktemp("bad-credentials") / "data", hypervisor_uri="test:///default",
                   port=0, resync_interval=3600.0)
    app.serve_in_thread()
    try:
        yield app
    finally:
        app.close()


def _address(app: App) -> tuple[str, int]:
    host, port = app.url.removeprefix("https://").split(":")
    return host, int(port)


def _context(app: App, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=pki.Authority.load(app.data_dir).cert_pem)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def exchange(app: App, request: bytes, *, cert: tuple[Path, Path] | None = None) -> bytes:
    """One request on its own TLS connection; the status line's code (b"" when the server closed it)."""
    host, port = _address(app)
    with socket.create_connection((host, port), timeout=60) as raw, \
            _context(app, cert).wrap_socket(raw, server_hostname=host) as connection:
        connection.sendall(request)
        answer = b""
        try:
            while chunk := connection.recv(65536):
                answer += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
    return answer.split(b"\r\n", 1)[0].split(b" ")[1] if answer.startswith(b"HTTP/1.") else b""


def healthy(app: App) -> None:
    admin = Client(kubeconfig.load([app.kubeconfig_path]))
    try:
        assert admin.get("/healthz") == "ok"
        assert admin.get(PROTECTED)["kind"] == "NamespaceList"
    finally:
        admin.close()


HEADER_VALUES = st.one_of(
    st.binary(max_size=300).filter(lambda b: b"\r" not in b and b"\n" not in b),
    st.text(max_size=300).map(lambda t: t.replace("\r", "").replace("\n", "").encode("utf-8", "surrogatepass")),
    st.builds(lambda t: b"Bearer " + t, st.binary(max_size=2000).filter(lambda b: b"\r" not in b and b"\n" not in b)),
    st.builds(lambda a, b, c: f"Bearer {a}.{b}.{c}".encode(), st.text("abcXYZ019-_", max_size=60),
              st.text("abcXYZ019-_", max_size=200), st.text("abcXYZ019-_", max_size=90)),
)


@given(value=HEADER_VALUES)
@settings(max_examples=profile.FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_authorization_headers_are_401_never_5xx_nor_a_bypass(secure_app: App, value: bytes) -> None:
    code = exchange(secure_app, b"GET " + PROTECTED.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: " + value +
                    b"\r\nConnection: close\r\n\r\n")
    assert code in (b"401", b"400", b"431"), code


@pytest.mark.parametrize("header", [
    b"Authorization: Bearer " + b"A" * 70000,  # beyond the server's line limit: 431, never read as a token
    b"Authorization: Bearer x\r\nAuthorization: Bearer y",
    b"Authorization: \xff\xfe\x00Bearer",
    b"authorization: bEaReR secret-of-nobody",
    b"Authorization: Bearer\tsomething",
] + [b"X-Filler-%d: %s" % (i, b"v" * 60000) for i in range(1)])
def test_oversized_and_odd_headers_are_refused(secure_app: App, header: bytes) -> None:
    code = exchange(secure_app, b"GET " + PROTECTED.encode() + b" HTTP/1.1\r\nHost: x\r\n" + header +
                    b"\r\nConnection: close\r\n\r\n")
    assert code in (b"401", b"400", b"431", b""), code
    healthy(secure_app)


def _certificate(folder: Path, name: str, *, subject: x509.Name, issuer_key: ec.EllipticCurvePrivateKey | None,
                 issuer: x509.Name | None, days: tuple[int, int] = (-1, 30), ca: bool = False) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=days[0]))
            .not_valid_after(now + datetime.timedelta(days=days[1]))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key or key, hashes.SHA256()))
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()).decode())
    return cert_path, key_path


def test_bad_client_certificates_are_401(secure_app: App, tmp_path: Path) -> None:
    ca = pki.Authority.load(secure_app.data_dir)
    admin = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                       x509.NameAttribute(NameOID.COMMON_NAME, "admin")])
    cases = {
        "self-signed": _certificate(tmp_path, "self", subject=admin, issuer_key=None, issuer=None),
        "expired": _certificate(tmp_path, "expired", subject=admin, issuer_key=ca.key, issuer=ca.cert.subject,
                                days=(-30, -1)),
        "not yet valid": _certificate(tmp_path, "future", subject=admin, issuer_key=ca.key,
                                      issuer=ca.cert.subject, days=(1, 30)),
        "foreign CA": _certificate(tmp_path, "foreign", subject=admin,
                                   issuer_key=ec.generate_private_key(ec.SECP256R1()), issuer=ca.cert.subject),
        "no CN": _certificate(tmp_path, "nocn", subject=x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                                                                     "system:masters")]),
                              issuer_key=ca.key, issuer=ca.cert.subject),
    }
    for why, cert in cases.items():
        code = exchange(secure_app, b"GET " + PROTECTED.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close"
                                                                     b"\r\n\r\n", cert=cert)
        assert code in (b"401", b""), f"{why}: {code!r}"  # b"": a TLS stack that refused the handshake itself
    many_groups = ca.issue_client("crowd", [f"g{i}" for i in range(500)])
    cert, key = tmp_path / "crowd.crt", tmp_path / "crowd.key"
    cert.write_text(many_groups.cert_pem)
    pki.write_private(key, many_groups.key_pem)
    assert exchange(secure_app, b"GET " + PROTECTED.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    cert=(cert, key)) == b"403"  # authenticated, and allowed nothing
    healthy(secure_app)


@pytest.mark.parametrize("opening", [b"", b"\x16\x03\x01\x00", b"GET / HTTP/1.1\r\n\r\n", b"\x00" * 5000,
                                     b"\x16\x03\x01\xff\xff" + b"\x01" * 100])
def test_stalled_and_garbage_handshakes_never_hang_the_server(secure_app: App, opening: bytes,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls, "HANDSHAKE_TIMEOUT", 1.0)
    host, port = _address(secure_app)
    stalled = [socket.create_connection((host, port), timeout=60) for _ in range(20)]
    try:
        for connection in stalled:
            if opening:
                try:
                    connection.sendall(opening)
                except OSError:
                    pass
        healthy(secure_app)  # answered while twenty handshakes stall
        for connection in stalled:  # and each stalled one is closed by the server, at the latest on its timeout
            try:
                while connection.recv(65536):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    finally:
        for connection in stalled:
            connection.close()
    healthy(secure_app)
