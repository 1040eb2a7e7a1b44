"""Self-signed X.509 certificates for OPC UA applications (the line's server, SCADA/test clients).

OPC 10000-6 6.2.2 asks of an application instance certificate: the application URI as a URI
subjectAltName, the host's DNS names / IP addresses as further subjectAltNames, and key usages
digitalSignature, nonRepudiation, keyEncipherment, dataEncipherment (plus keyCertSign for a
self-signed one, which signs itself). The certificate is written as DER, the form OPC UA
exchanges; the key as unencrypted PEM readable by its owner only, because the service must
start unattended.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The application URI of the line server's certificate as `sorter opcua certs` makes it, and the server's
# own when its certificate names none. Here rather than with the server so that making certificates
# (the CLI, the demo) does not import asyncua.
DEFAULT_APPLICATION_URI = "urn:magnet-sorter:line-server"


class PkiError(Exception):
    """A certificate or key cannot be written or read; str() says which file and why."""


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certificate(
    cert_path: str | Path,
    key_path: str | Path,
    *,
    common_name: str,
    application_uri: str,
    hostnames: Iterable[str],
    days: int = 3650,
    organization: str = "magnet-sorter",
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write a new RSA 2048 / SHA-256 self-signed certificate (DER) and its key (PEM, mode 0600).

    Refuses (PkiError) to replace an existing file unless `overwrite`: a server's certificate is
    trusted by its clients, and silently replacing it would lock all of them out.
    """
    cert_path, key_path = Path(cert_path), Path(key_path)
    if not overwrite:
        for p in (cert_path, key_path):
            if p.exists():
                raise PkiError(f"{p} exists; use --force (overwrite=True) to replace it")
    if days < 1:
        raise PkiError(f"validity must be at least one day, got {days}")
    hosts = list(dict.fromkeys(h for h in hostnames if h))
    if not hosts:
        raise PkiError("at least one hostname or IP address is needed")

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        ]
    )
    # a day of slack before "now": a client PC whose clock is a little behind must not see a future certificate
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(application_uri), *map(_general_name, hosts)]),
            critical=False,
        )
        # self-signed: the certificate is its own issuer, hence cA with path length 0 (it signs nothing else),
        # as asyncua's own generator (asyncua.crypto.cert_gen) makes self-signed application certificates
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,  # nonRepudiation
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        key_path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(key_path, key_pem, overwrite)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    except OSError as exc:
        raise PkiError(f"cannot write certificate/key: {exc}") from exc
    return cert_path, key_path


def _write_private(path: Path, data: bytes, overwrite: bool) -> None:
    # created with mode 0600 from the start (no window in which another user could open it);
    # O_EXCL keeps the "never overwrite" promise even if the file appeared since the check
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an overwritten file keeps its old mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)


def load_certificate(path: str | Path) -> x509.Certificate:
    """A certificate from a DER or PEM file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read certificate {path}: {exc.strerror or exc}") from exc
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"{path} is not a DER or PEM certificate: {exc}") from exc


def application_uri(cert: x509.Certificate) -> str | None:
    """The certificate's URI subjectAltName (an OPC UA application's ApplicationUri), if it has one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def trust(cert_path: str | Path, trust_dir: str | Path) -> Path:
    """Put a certificate (DER or PEM, checked to be one) into a trust folder as <name>.der; returns that path.

    Always DER with a .der suffix: asyncua's TrustStore only loads *.der / *.pem files.
    """
    cert_path, trust_dir = Path(cert_path), Path(trust_dir)
    cert = load_certificate(cert_path)
    target = trust_dir / f"{cert_path.stem}.der"
    try:
        trust_dir.mkdir(parents=True, exist_ok=True)
        target.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    except OSError as exc:
        raise PkiError(f"cannot copy {cert_path} into {trust_dir}: {exc}") from exc
    return target
