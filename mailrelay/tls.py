# -*- test-case-name: tests.test_tls_listeners, tests.test_delivery_tls_facts, tests.test_config -*-
"""The relay's own certificate and TLS policy, for STARTTLS (ports 25/587) and implicit TLS (port 465).

In: `[tls] cert/key` paths, or none, and the listener kind.  Out: one `ServerTLS` per listener kind,
built once at start (the certificate is restart-only).  Without a configured certificate, a self-signed
one for `hostname` is generated once into the spool (`<spool>/tls/selfsigned.pem`) and reused on later
starts; the caller logs a warning.

The OpenSSL context is built here, not by Twisted's CertificateOptions, so that what a listener
negotiates does not depend on the Twisted version pip picks (Twisted 26.4+ installs an ALPN callback
that aborts every handshake offering ALPN).  Policy per kind:

- all: TLS 1.2 minimum, server cipher order, no compression, no renegotiation (secure renegotiation
  is still signalled), a server-side session cache for resumption, ALPN declined when offered.
- "submission"/"submissions": forward-secret AEAD suites only (ECDHE, then DHE with ffdhe2048, with
  AES-GCM or ChaCha20-Poly1305; the TLS 1.3 suites).
- "relay": those first, then ECDHE with AES-CBC and static-RSA AES for old senders (opportunistic TLS
  beats plaintext), never export, NULL, anonymous, RC4, DES/3DES or MD5 suites.

`handshake_failure(reason)` renders why a handshake failed, for the session's log line.
"""
from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import error, ssl
from twisted.internet.interfaces import IOpenSSLContextFactory, IOpenSSLServerConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

# TLS 1.3 suites (RFC 8446 §9.1): all AEAD and forward secret; CCM is left out, as OpenSSL does by default.
TLS13_SUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
# RFC 9325 §4.2: ephemeral key exchange with an AEAD cipher (DHE after ECDHE, for Windows 7's SChannel
# with an RSA certificate).
FORWARD_SECRET_AEAD = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
# Never on any listener: export, NULL and anonymous suites, RC4 (RFC 7465), DES/3DES (SWEET32,
# CVE-2016-2183), MD5 MACs, PSK/SRP (we have no such secrets), and rarely used ciphers.
NEVER = "!aNULL:!eNULL:!EXPORT:!LOW:!RC4:!DES:!3DES:!MD5:!PSK:!SRP:!DSS:!AESCCM:!CAMELLIA:!ARIA:!SEED:!IDEA"
SESSION_TIMEOUT = 3600      # seconds a cached session may be resumed (Postfix's smtpd default)
# The DHE group: RFC 7919's ffdhe2048 (a well-known safe prime, as RFC 7919 §3 asks; 2048 bits, so no
# LOGJAM, CVE-2015-4000).  Without it OpenSSL would offer no DHE suite.
FFDHE2048_PEM = b"""\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


@dataclass(frozen=True)
class TLSPolicy:
    """What one listener kind negotiates: its TLS 1.2 cipher string and TLS 1.3 suites."""
    name: str
    tls12_ciphers: str
    tls13_suites: str = TLS13_SUITES


SUBMISSION_POLICY = TLSPolicy("submission", f"{FORWARD_SECRET_AEAD}:{NEVER}")
# Port 25: forward-secret AEAD first, then CBC and static RSA for old senders (RFC 7435: any encryption
# beats plaintext when the alternative is plaintext).
RELAY_POLICY = TLSPolicy("relay", f"{FORWARD_SECRET_AEAD}:ECDHE+AES:RSA+AESGCM:RSA+AES:{NEVER}")
POLICIES = {"relay": RELAY_POLICY, "submission": SUBMISSION_POLICY, "submissions": SUBMISSION_POLICY}


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


def _decline_alpn(connection: SSL.Connection, offered: list[bytes]) -> bytes | SSL._NoOverlappingProtocols:
    """SMTP has no ALPN protocol to pick: go on without one (RFC 7301 §3.2), never abort the handshake."""
    return SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerTLS:
    """Server-side TLS for one listener kind: usable wherever Twisted takes TLS options
    (TLSMemoryBIOFactory, listenSSL, ITLSTransport.startTLS).  The context is built once; every
    connection shares it, and so its session cache."""

    def __init__(self, certificate, private_key, chain: Sequence = (), policy: TLSPolicy = SUBMISSION_POLICY):
        """`certificate`, `private_key`, `chain`: pyOpenSSL X509 / PKey objects (chain: intermediates,
        leaf first excluded).  Raises SSL.Error when the key does not match the certificate."""
        self.policy = policy
        self._context = _make_context(certificate, private_key, chain, policy)

    def getContext(self) -> SSL.Context:
        return self._context

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def _make_context(certificate, private_key, chain: Sequence, policy: TLSPolicy) -> SSL.Context:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)     # RFC 8996: no TLS 1.0/1.1
    context.set_options(
        SSL.OP_NO_COMPRESSION              # CRIME (CVE-2012-4929)
        | SSL.OP_CIPHER_SERVER_PREFERENCE  # our order: forward-secret AEAD first
        | SSL.OP_NO_RENEGOTIATION          # client-initiated renegotiation is a DoS lever (CVE-2011-1473);
                                           # the RFC 5746 extension is still sent
        | SSL.OP_NO_TICKET                 # resume from the server's session cache (stateful tickets in
                                           # TLS 1.3): no RFC 5077 ticket key, which OpenSSL never rotates,
                                           # to undo forward secrecy
        | SSL.OP_SINGLE_DH_USE | SSL.OP_SINGLE_ECDH_USE
    )
    context.use_certificate(certificate)
    context.use_privatekey(private_key)
    for extra in chain:
        context.add_extra_chain_cert(extra)
    context.check_privatekey()
    context.set_verify(SSL.VERIFY_NONE)                   # no client certificates are asked for
    context.set_session_id(f"mailrelay-{policy.name}".encode("ascii"))
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    context.set_timeout(SESSION_TIMEOUT)
    _load_dh_group(context)
    context.set_cipher_list(policy.tls12_ciphers.encode("ascii"))
    context.set_tls13_ciphersuites(policy.tls13_suites.encode("ascii"))
    context.set_alpn_select_callback(_decline_alpn)
    return context


def _load_dh_group(context: SSL.Context) -> None:
    """Give `context` the ffdhe2048 group for the DHE suites; a pyOpenSSL without load_tmp_dh (finite-field
    DH is on its way out) leaves them unusable and ECDHE does the work."""
    with tempfile.NamedTemporaryFile(prefix="mailrelay-dh-", suffix=".pem") as f:
        f.write(FFDHE2048_PEM)
        f.flush()
        try:
            context.load_tmp_dh(f.name.encode())
        except (AttributeError, SSL.Error):
            pass


def _load_pair(cert_file: Path, key_file: Optional[Path]) -> tuple:
    """(leaf X509, PKey, [intermediate X509]) from PEM files; ValueError with a one-line message."""
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
    return leaf.original, leaf.privateKey.original, extra


def server_options(cert_file: Path, key_file: Optional[Path] = None, kind: str = "submission") -> ServerTLS:
    """Load a certificate chain (leaf first) and its key into server-side TLS for listener `kind`.

    Raises ValueError with a one-line message when the files are unreadable or do not match."""
    return listener_options(cert_file, key_file, (kind,))[kind]


def listener_options(cert_file: Path, key_file: Optional[Path], kinds: Sequence[str]) -> dict[str, ServerTLS]:
    """One ServerTLS per listener kind in `kinds`, the files read once; ValueError as server_options."""
    certificate, private_key, chain = _load_pair(cert_file, key_file)
    try:
        return {kind: ServerTLS(certificate, private_key, chain, POLICIES[kind]) for kind in dict.fromkeys(kinds)}
    except SSL.Error as e:
        raise ValueError(f"certificate and key do not match: {e}") from None


def client_certificate(cert_file: Path, key_file: Optional[Path] = None) -> dict:
    """A certificate chain (leaf first) and its key to present as a TLS client, as the keyword arguments
    Twisted's CertificateOptions takes; ValueError as server_options (the pair is checked too)."""
    certificate, private_key, chain = _load_pair(cert_file, key_file)
    probe = SSL.Context(SSL.TLS_CLIENT_METHOD)
    try:
        probe.use_certificate(certificate)
        probe.use_privatekey(private_key)
        probe.check_privatekey()
    except SSL.Error as e:
        raise ValueError(f"certificate and key do not match: {e}") from None
    return {"privateKey": private_key, "certificate": certificate, "extraCertChain": chain}


MAX_REASON = 200


def handshake_failure(reason: Optional[Failure], closed_by_us: bool = False) -> str:
    """Why a TLS handshake did not finish, in a few words: OpenSSL's reasons ("unsupported protocol",
    "no shared cipher", "tlsv1 alert unknown ca"), or how the connection ended.  Never key material:
    OpenSSL's error queue holds library, function and reason names only."""
    value = reason.value if reason is not None else None
    if isinstance(value, SSL.Error):
        parts = []
        for entry in (value.args[0] if value.args and isinstance(value.args[0], list) else []):
            text = entry[-1] if isinstance(entry, tuple) and entry else str(entry)
            if text and text not in parts:
                parts.append(str(text))
        text = "; ".join(parts) or "TLS error"
    elif closed_by_us:
        text = "closed by the relay before the handshake finished"
    elif isinstance(value, (error.ConnectionDone, error.ConnectionLost)) or value is None:
        text = "connection closed by the client"
    else:
        text = type(value).__name__
    return text[:MAX_REASON]
