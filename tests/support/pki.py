"""A test certificate authority made in the test: server certificates for loopback peers (an HTTPS
token endpoint, a TLS next hop) and client certificates for the relay to present.

    ca = TestCA()
    cert_pem, key_pem = ca.issue("127.0.0.1")            # SAN: IP 127.0.0.1 (and DNS localhost)
    ca.write(directory)                                   # ca.pem, for oauth2_ca_file / ca_file
    options = ca.server_options("127.0.0.1", require_client_cert=True)
"""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class TestCA:
    """A fresh CA (P-256) that signs leaf certificates for tests."""

    def __init__(self, name: str = "mailrelay test CA"):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str, client: bool = False, expired: bool = False) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for `name`: an IP address gets an IP SAN (and DNS localhost), a name
        a DNS SAN; `client` makes it a client certificate (CN = name); `expired`: valid until yesterday."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        if expired:
            now -= datetime.timedelta(days=8)
        try:
            sans = [x509.IPAddress(ipaddress.ip_address(name)), x509.DNSName("localhost")]
        except ValueError:
            sans = [x509.DNSName(name)]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def write(self, directory: Path, name: str = "ca.pem") -> Path:
        path = Path(directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.pem)
        return path

    def write_pair(self, directory: Path, name: str, stem: str, client: bool = False) -> tuple[Path, Path]:
        """A certificate for `name` and its key as <stem>.pem and <stem>.key in `directory`."""
        cert_pem, key_pem = self.issue(name, client=client)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{stem}.pem").write_bytes(cert_pem)
        (directory / f"{stem}.key").write_bytes(key_pem)
        return directory / f"{stem}.pem", directory / f"{stem}.key"

    def server_options(self, name: str = "127.0.0.1", require_client_cert: bool = False,
                       expired: bool = False) -> ssl.CertificateOptions:
        """Server TLS options with a certificate for `name` (`expired`: one that ran out yesterday); with
        `require_client_cert`, the handshake fails unless the client presents a certificate this CA signed."""
        cert_pem, key_pem = self.issue(name, expired=expired)
        leaf = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
        extra = {}
        if require_client_cert:
            extra = dict(verify=True, requireCertificate=True, caCerts=[ssl.Certificate.loadPEM(self.pem).original])
        return ssl.CertificateOptions(privateKey=leaf.privateKey.original, certificate=leaf.original, **extra)
