"""A throw-away certificate authority for TLS tests: a CA and a server certificate it issues (RSA or
P-256), written as PEM files a relay's [tls] cert/key can name, and the CA file a client trusts."""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key(kind: str):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class IssuedPair:
    cert: Path        # the leaf (the CA issued it directly: there is no intermediate to send)
    key: Path
    ca: Path          # what a client trusts


def issue(directory: Path, hostname: str = "relay.test", key_type: str = "rsa", days: int = 365) -> IssuedPair:
    """A new test CA and a server certificate for `hostname` and 127.0.0.1 (key_type "rsa" or "ec"),
    valid for `days` days (a year: public CAs issue at most 398 days), written into `directory`."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = _key("ec")
    ca_name = _name("mailrelay test CA")
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = _key(key_type)
    names = [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    leaf = (
        x509.CertificateBuilder().subject_name(_name(hostname)).issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pair = IssuedPair(directory / "relay.crt", directory / "relay.key", directory / "ca.crt")
    pair.cert.write_bytes(leaf.public_bytes(pem))
    pair.key.write_bytes(_pem_key(key))
    pair.key.chmod(0o600)
    pair.ca.write_bytes(ca.public_bytes(pem))
    return pair
