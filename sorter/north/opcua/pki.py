"""Self-signed X.509 certificates for OPC UA applications (the line's server, SCADA/test clients), and the
server's certificate folders: `trusted/` (accepted clients) and `rejected/` (refused ones, kept for an
administrator to trust).

OPC 10000-6 6.2.2 asks of an application instance certificate: the application URI as a URI
subjectAltName, the host's DNS names / IP addresses as further subjectAltNames, and key usages
digitalSignature, nonRepudiation, keyEncipherment, dataEncipherment (plus keyCertSign for a
self-signed one, which signs itself). The certificate is written as DER, the form OPC UA
exchanges; the key as unencrypted PEM readable by its owner only, because the service must
start unattended.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sorter.north.keyfiles import self_signed, write_private

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

    key, builder = self_signed(common_name, organization, days)
    cert = (
        builder.add_extension(
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
        write_private(key_path, key_pem, overwrite)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    except OSError as exc:
        raise PkiError(f"cannot write certificate/key: {exc}") from exc
    return cert_path, key_path


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


# --- the trusted/ and rejected/ folders (docs/opcua-server.md, "Trusting a client") ---

CERT_SUFFIXES = (".der", ".pem")  # what the server reads from the trust folder (as asyncua's TrustStore does)
REJECTED_MAX = 100  # certificates kept in rejected/: past this the oldest go (a client making a new one per try)


def leaf_der(data: bytes) -> bytes:
    """The first certificate of a DER blob: a client may send its chain (leaf first, then its CAs) concatenated.

    Raises PkiError when the blob does not start with a complete DER SEQUENCE.
    """
    if len(data) < 2 or data[0] != 0x30:
        raise PkiError("not a DER certificate")
    first = data[1]
    if first < 0x80:
        size, header = first, 2
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or len(data) < 2 + n:
            raise PkiError("not a DER certificate (bad length)")
        size, header = int.from_bytes(data[2 : 2 + n], "big"), 2 + n
    if header + size > len(data):
        raise PkiError("truncated DER certificate")
    return data[: header + size]


def thumbprint(cert: x509.Certificate) -> str:
    """The certificate's SHA-1 thumbprint (of its DER), lower-case hex: what OPC UA tools show to identify it."""
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def subject_text(cert: x509.Certificate, limit: int = 200) -> str:
    """The subject as text in the certificate's order (`CN=..., O=...`), printable and bounded: it comes from
    the client."""
    try:
        text = ", ".join(attr.rfc4514_string() for attr in cert.subject)
    except ValueError:
        text = "(unreadable subject)"
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def _file_stem(cert: x509.Certificate) -> str:
    """`<common name>_<thumbprint>`: readable in a listing, unique, safe as a file name whatever the client wrote."""
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(cn[0].value) if cn else "").strip("-.")[:40] or "client"
    return f"{name}_{thumbprint(cert)}"


def store_rejected(data: bytes, rejected_dir: str | Path, keep: int = REJECTED_MAX) -> tuple[Path, bool]:
    """Keep a refused client's certificate (its leaf, as DER) in the rejected folder; (the file, whether it is new).

    A certificate already there is not written again, so the file's time is when it was first refused. At most
    `keep` certificates stay: the oldest go first.
    """
    rejected_dir = Path(rejected_dir)
    try:
        cert = x509.load_der_x509_certificate(leaf_der(data))
    except ValueError as exc:
        raise PkiError(f"not a DER certificate: {exc}") from exc
    target = rejected_dir / f"{_file_stem(cert)}.der"
    if target.exists():
        return target, False
    try:
        rejected_dir.mkdir(parents=True, exist_ok=True)
        files = sorted(_cert_files(rejected_dir), key=_mtime)
        for old in files[: max(0, len(files) - keep + 1)]:
            old.unlink(missing_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        tmp.replace(target)  # never a half-written certificate in the folder
    except OSError as exc:
        raise PkiError(f"cannot keep the refused certificate in {rejected_dir}: {exc.strerror or exc}") from exc
    return target, True


def _cert_files(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.suffix.lower() in CERT_SUFFIXES and p.is_file()]
    except OSError:
        return []


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@dataclass(frozen=True)
class StoredCertificate:
    """A certificate file in a trust or rejected folder, as `sorter opcua trust --list` shows it."""

    path: Path
    subject: str
    thumbprint: str
    application_uri: str | None
    first_seen: dt.datetime  # the file's time: when the server first refused it (for rejected/)
    not_after: dt.datetime


def list_certificates(folder: str | Path) -> list[StoredCertificate]:
    """The readable certificates of a folder, oldest first; unreadable files are skipped."""
    out = []
    for path in _cert_files(Path(folder)):
        try:
            cert = load_certificate(path)
        except PkiError:
            continue
        out.append(
            StoredCertificate(
                path=path,
                subject=subject_text(cert),
                thumbprint=thumbprint(cert),
                application_uri=application_uri(cert),
                first_seen=dt.datetime.fromtimestamp(_mtime(path), dt.UTC),
                not_after=cert.not_valid_after_utc,
            )
        )
    return sorted(out, key=lambda c: (c.first_seen, c.path.name))


def find_rejected(rejected_dir: str | Path, wanted: str) -> StoredCertificate:
    """The certificate in the rejected folder with this thumbprint (hex, any case, `:` allowed; a unique prefix of
    at least 8 digits will do) or file name; PkiError naming what is there otherwise."""
    rejected_dir = Path(rejected_dir)
    key = wanted.strip().lower().replace(":", "").replace(" ", "")
    stored = list_certificates(rejected_dir)
    if re.fullmatch(r"[0-9a-f]{8,40}", key):
        found = [c for c in stored if c.thumbprint.startswith(key)]
    else:
        found = [c for c in stored if wanted in (c.path.name, c.path.stem)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise PkiError(
            f"no refused certificate {wanted!r} in {rejected_dir} "
            f"({len(stored)} there; `sorter opcua trust --list` shows them)"
        )
    raise PkiError(f"{wanted!r} matches {len(found)} certificates in {rejected_dir}: give more of the thumbprint")


def trust_rejected(cert: StoredCertificate, trust_dir: str | Path) -> Path:
    """Move a refused certificate from the rejected folder into the trust folder; returns its new path."""
    target = Path(trust_dir) / f"{cert.path.stem}.der"
    try:
        data = load_certificate(cert.path).public_bytes(serialization.Encoding.DER)
        Path(trust_dir).mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
        cert.path.unlink(missing_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot move {cert.path} into {trust_dir}: {exc.strerror or exc}") from exc
    return target
