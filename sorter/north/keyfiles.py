"""Certificate and key files of the north side (the OPC UA server's, the HMI's): a self-signed base, private keys."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def write_private(path: Path, data: bytes, overwrite: bool) -> None:
    """Write a key file with mode 0600 from the start (no window in which another user could open it).

    Without `overwrite`, O_EXCL keeps the "never overwrite" promise even if the file appeared since a check.
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an overwritten file keeps its old mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)


def self_signed(common_name: str, organization: str, days: int) -> tuple[rsa.RSAPrivateKey, x509.CertificateBuilder]:
    """A new RSA 2048 key and a self-signed certificate builder for it (extensions are the caller's)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        ]
    )
    # a day of slack before "now": a client or panel whose clock is a little behind must not see a future certificate
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    return key, builder
