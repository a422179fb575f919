"""The relay's own certificate, for STARTTLS (ports 25/587) and implicit TLS (port 465).

In: `[tls] cert/key` paths, or none.  Out: a Twisted `CertificateOptions` loaded once at start.
Without a configured certificate, a self-signed one for `hostname` is generated once into the spool
(`<spool>/tls/selfsigned.pem`) and reused on later starts; the caller logs a warning.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl


def generate_self_signed(hostname: str, days: int = 3650) -> tuple[bytes, bytes]:
    """A new (certificate PEM, PKCS#8 key PEM) pair for `hostname` (P-256, SAN = hostname)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_self_signed(spool: Path, hostname: str) -> tuple[Path, bool]:
    """The path of the spool's self-signed PEM (certificate + key), and whether it was just created."""
    directory = Path(spool) / "tls"
    path = directory / "selfsigned.pem"
    if path.exists():
        return path, False
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = generate_self_signed(hostname)
    tmp = directory / f".selfsigned.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(cert_pem + key_pem)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path, True


def server_options(cert_file: Path, key_file: Path | None = None) -> ssl.CertificateOptions:
    """Load a certificate chain (leaf first) and its key into server-side options (TLS 1.2+).

    Raises ValueError with a one-line message when the files are unreadable or do not match."""
    try:
        chain_pem = Path(cert_file).read_bytes()
        key_pem = Path(key_file).read_bytes() if key_file else chain_pem
    except OSError as e:
        raise ValueError(f"cannot read {e.filename}: {e.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
        leaf = ssl.PrivateCertificate.loadPEM(
            certs[0].public_bytes(serialization.Encoding.PEM) + key_pem
        )
        extra = [
            ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)).original for c in certs[1:]
        ]
    except Exception as e:  # pyOpenSSL and cryptography raise several types for bad PEM
        raise ValueError(f"cannot load certificate/key: {e}") from None
    options = ssl.CertificateOptions(
        privateKey=leaf.privateKey.original,
        certificate=leaf.original,
        extraCertChain=extra,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    try:
        options.getContext()   # builds the context now: a key that does not match the certificate fails here
    except Exception as e:
        raise ValueError(f"certificate and key do not match: {e}") from None
    return options
