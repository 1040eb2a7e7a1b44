"""The HMI over HTTPS: a self-signed server certificate for the line PC (`sorter hmi certs`) and the
server's TLS context made from the config's `hmi.certificate` and `hmi.private_key`.

What a browser on a panel accepts, once the certificate is trusted there (docs/hmi.md):

* an end-entity certificate: basicConstraints cA false. Firefox refuses a CA certificate as a server's
  own (MOZILLA_PKIX_ERROR_CA_CERT_USED_AS_END_ENTITY), which is why this is not the OPC UA certificate
  of sorter/north/opcua/pki.py (a self-signed OPC UA application certificate is a CA);
* every name and address the panels type as a subjectAltName (browsers ignore the common name);
* extendedKeyUsage serverAuth, and no keyUsage extension: OpenSSL then takes the certificate for its own
  issuer, so a client given it as its trust anchor (Python's ssl, curl --cacert) verifies it;
* at most 825 days of validity (Apple's limit for TLS server certificates, even locally trusted ones).

RSA 2048 / SHA-256 like the OPC UA certificates; the certificate in PEM (what Python's ssl loads), the
key unencrypted PEM readable by its owner only (mode 0600), because the service starts unattended.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from sorter.north.keyfiles import self_signed, write_private

CERT_FILE = "hmi-cert.pem"
KEY_FILE = "hmi-key.pem"
DEFAULT_DAYS = 825  # the longest validity every browser accepts for a TLS server certificate (Safari)


class TlsError(Exception):
    """A certificate or key cannot be made, read or used; str() says which file and why."""


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_server_certificate(
    cert_path: str | Path,
    key_path: str | Path,
    *,
    hostnames: Iterable[str],
    days: int = DEFAULT_DAYS,
    common_name: str = "magnet-sorter HMI",
    organization: str = "magnet-sorter",
    overwrite: bool = False,
) -> x509.Certificate:
    """Write a new self-signed TLS server certificate (PEM) for `hostnames` and its key (PEM, mode 0600).

    Refuses (TlsError) to replace an existing file unless `overwrite`: the panels trust this certificate,
    and silently replacing it locks them out until the new one is trusted there.
    """
    cert_path, key_path = Path(cert_path), Path(key_path)
    if not overwrite:
        for p in (cert_path, key_path):
            if p.exists():
                raise TlsError(f"{p} exists; use --force (overwrite=True) to replace it")
    if days < 1:
        raise TlsError(f"validity must be at least one day, got {days}")
    hosts = list(dict.fromkeys(h.strip() for h in hostnames if h and h.strip()))
    if not hosts:
        raise TlsError("at least one hostname or IP address is needed")
    try:
        names = [_general_name(h) for h in hosts]
    except ValueError as exc:  # e.g. a name that is not ASCII (give its xn-- form)
        raise TlsError(f"not a host name or IP address: {exc}") from exc

    key, builder = self_signed(common_name, organization, days)
    cert = (
        builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
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
        write_private(key_path, key_pem, overwrite)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        raise TlsError(f"cannot write certificate/key: {exc}") from exc
    return cert


def load_certificate(path: str | Path) -> x509.Certificate:
    """The certificate of a PEM file (the first one, the server's own, if it holds a chain)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read the certificate {path}: {exc.strerror or exc}") from exc
    if not data.lstrip().startswith(b"-----BEGIN"):
        raise TlsError(
            f"{path} is not a PEM certificate (a DER one? `openssl x509 -inform der -in {path.name} -out cert.pem`)"
        )
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise TlsError(f"{path} is not a PEM certificate: {exc}") from exc


def server_context(cert_path: str | Path, key_path: str | Path) -> tuple[ssl.SSLContext, x509.Certificate]:
    """The HMI's TLS server context (TLS 1.2 and 1.3, Python's default ciphers, HTTP/1.1) and its certificate.

    TlsError names the file and the problem (unreadable, not PEM, key not matching the certificate).
    """
    cert_path, key_path = Path(cert_path), Path(key_path)
    cert = load_certificate(cert_path)
    try:
        key_path.read_bytes()  # a readable file: its problem named plainly, not as an OpenSSL library error
    except OSError as exc:
        raise TlsError(f"cannot read the private key {key_path}: {exc.strerror or exc}") from exc
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_alpn_protocols(["http/1.1"])  # uvicorn speaks HTTP/1.1
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        why = "the key does not belong to the certificate" if "mismatch" in str(exc).lower() else str(exc)
        raise TlsError(f"cannot use the certificate {cert_path} with the key {key_path}: {why}") from exc
    except (OSError, ValueError) as exc:
        raise TlsError(f"cannot use the certificate {cert_path} with the key {key_path}: {exc}") from exc
    return ctx, cert


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as browsers show it (AB:CD:...), to compare on a panel before trusting it."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def subject_names(cert: x509.Certificate) -> list[str]:
    """The certificate's DNS names and IP addresses (subjectAltName)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(a) for a in san.get_values_for_type(x509.IPAddress))]
