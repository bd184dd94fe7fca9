"""The per-VM replication key file: one PEM file, mode 0600, the same on both nodes.

It holds an ECDSA P-256 private key and a self-signed certificate for it.
Each node presents that certificate and trusts nothing else, so a TLS 1.3
handshake with mutual authentication succeeds only between holders of the
file (docs/crypto.md explains the choice).
"""

from __future__ import annotations

import datetime
import os
import secrets
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class KeyFileError(Exception):
    """The key file is missing, unreadable, too widely readable or malformed."""


def keygen(path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Write a new key file at `path` (mode 0600). Refuses to replace an existing
    file unless `overwrite`: losing the old key silently would cut off the peer."""
    path = Path(path)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                         f"kemari-replication-{secrets.token_hex(8)}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365 * 100))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pem += cert.public_bytes(serialization.Encoding.PEM)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
        os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with FileExistsError instead of replacing
    finally:
        tmp.unlink(missing_ok=True)


def check_key_file(path: str | os.PathLike[str]) -> bytes:
    """Validate the key file like ssh does its keys; return the certificate (DER).

    Group- or world-readable files are refused: anyone who can read the file
    can impersonate either node.
    """
    path = Path(path)
    try:
        st = path.stat()
        pem = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror})") from None
    if st.st_uid != os.geteuid():
        raise KeyFileError(f"{path}: owned by uid {st.st_uid}, not by this user "
                           f"(uid {os.geteuid()}): another user could replace it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise KeyFileError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o} is too open, "
                           "must be 0600 (chmod 600)")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a Kemari key file ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or \
            cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise KeyFileError(f"{path}: certificate does not belong to the private key")
    return cert.public_bytes(serialization.Encoding.DER)
