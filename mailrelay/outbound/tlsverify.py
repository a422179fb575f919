# -*- test-case-name: tests.test_tls_policy -*-
"""Client TLS that judges the exchanger after the handshake: DANE (RFC 7672), MTA-STS (RFC 8461 4.2) and
`[delivery] tls = "verify"` — with the reason a check failed, in RFC 8460's words, for the delivery
reply, the log and TLS reporting.

Job in the journey: outbound.tlspolicy builds one `PolicyTLS` per exchanger and policy; the delivery
client (outbound.client) uses it for STARTTLS and, once the handshake completes and before EHLO is
answered (so before MAIL FROM), calls `check(connection)`, which returns a `Verdict`.  A failed verdict
of an enforcing policy ends the session with 4.7.5; one of MTA-STS "testing" is only recorded.

How: the handshake runs with OpenSSL's chain verification on (the trust of `[delivery] ca_file`, else
the system's), but its verify callback never refuses: it notes the first error instead, so the check
can say "certificate-expired" or "certificate-not-trusted" rather than the handshake dying with an
alert.  The name check is service_identity's (RFC 6125: DNS names only, a wildcard only as the whole
leftmost label).  DANE reads the chain the server presented and asks outbound.dane.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from mailrelay.outbound import dane
from mailrelay.interfaces import ITLSPeerCheck

# OpenSSL X509_V_ERR_* codes the verify callback may report (x509_vfy.h), in words for replies and logs.
_EXPIRED = {9, 10}           # CERT_NOT_YET_VALID, CERT_HAS_EXPIRED
_REASONS = {
    2: "unable to get issuer certificate", 7: "certificate signature failure", 9: "certificate is not yet valid",
    10: "certificate has expired", 18: "self-signed certificate", 19: "self-signed certificate in the chain",
    20: "unable to get local issuer certificate", 21: "unable to verify the first certificate",
    24: "invalid CA certificate", 26: "unsupported certificate purpose", 27: "certificate not trusted",
    28: "certificate rejected",
}


@dataclass(frozen=True)
class Verdict:
    """One session's TLS judgement: `verified_by` ("dane", "mta-sts", "verify") when the peer was
    authenticated; else `result_type` (RFC 8460 4.3) and `detail`; `enforce`: a failure defers."""
    verified_by: Optional[str]
    result_type: Optional[str] = None
    detail: str = ""
    enforce: bool = True

    @property
    def ok(self) -> bool:
        return self.result_type is None


class _Seen:
    """What the verify callback saw on one connection: the first chain error."""
    __slots__ = ("error", "depth")

    def __init__(self) -> None:
        self.error: Optional[int] = None
        self.depth = 0


def _noting(seen: _Seen):
    """A verify callback for one connection that records the first chain error in `seen`."""
    def note_error(connection: SSL.Connection, cert, errno: int, depth: int, ok: int) -> bool:
        if not ok and seen.error is None:
            seen.error, seen.depth = errno, depth
        return True      # never refuse here: check() decides, with the reason (see the module docstring)
    return note_error


def load_trust(ca_file: Optional[Path]) -> Any:
    """An IOpenSSLTrustRoot: every certificate in `ca_file`, else the platform's store."""
    if ca_file is None:
        return ssl.platformTrust()
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    certs = x509.load_pem_x509_certificates(Path(ca_file).read_bytes())
    return ssl.trustRootFromCertificates(
        [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in certs])


def policy_context(kind: str, trust: Any = None) -> SSL.Context:
    """The SSL context of PolicyTLS of `kind`: TLS 1.2 at least, the chain verified against `trust` (the
    system's when None; none for DANE, which reads the chain itself) with every error only noted."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)     # RFC 8996
    context.set_options(SSL.OP_NO_COMPRESSION)             # CRIME (CVE-2012-4929)
    if kind != "dane":
        IOpenSSLTrustRoot(trust if trust is not None else ssl.platformTrust())._addCACertsToContext(context)
    context.set_verify(SSL.VERIFY_PEER, _noting(_Seen()))
    return context


@implementer(IOpenSSLClientConnectionCreator, ITLSPeerCheck)
class PolicyTLS:
    """STARTTLS options for one exchanger under one policy.  `kind`: "dane" (with `records`),
    "mta-sts" or "verify" (PKIX against `trust`); `enforce`: whether a failed check defers;
    `policy`: how replies name the policy ("the MTA-STS policy of example.net")."""

    def __init__(self, hostname: str, kind: str, *, trust: Any = None, records: Sequence[dane.TLSA] = (),
                 enforce: bool = True, policy: str = "", context: Optional[SSL.Context] = None):
        self.hostname = hostname.rstrip(".").strip("[]")
        self.kind = kind
        self.records = tuple(records)
        self.enforce = enforce
        self.policy = policy or {"dane": "DANE", "verify": 'tls = "verify"'}.get(kind, kind)
        # `context`: one policy_context(kind, trust) shared by many exchangers (loading the system's
        # trust costs tens of milliseconds); nothing in it names a host: SNI, the verify callback and
        # the checks are per connection.
        self._context = context if context is not None else policy_context(kind, trust)
        self._seen: "weakref.WeakKeyDictionary[SSL.Connection, _Seen]" = weakref.WeakKeyDictionary()

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        seen = self._seen[connection] = _Seen()     # app data is Twisted's (its TLS transport)
        connection.set_verify(SSL.VERIFY_PEER, _noting(seen))
        if not _is_literal(self.hostname):
            connection.set_tlsext_host_name(self.hostname.encode("idna"))   # RFC 6066 3 (SNI)
        connection.set_connect_state()
        return connection

    def without_starttls(self, host: str) -> tuple[str, str]:
        # RFC 7672 2.2 / RFC 8461 5: the policy needs TLS; no STARTTLS is no delivery here.
        return "4.7.5" if self.kind == "dane" else "4.7.4", \
            f"TLS is required by {self.policy}, but {host} does not offer STARTTLS"

    def refusal(self, host: str, verdict: Verdict) -> str:
        """The reply text for a session this policy ends after the handshake."""
        return f"TLS with {host} refused by {self.policy}: {verdict.detail} ({verdict.result_type})"

    def check(self, connection: SSL.Connection) -> Verdict:
        try:
            problem = self._judge(connection)
        except Exception as e:          # a certificate the libraries cannot read is not authenticated
            problem = ("validation-failure", f"cannot check the certificate: {type(e).__name__}")
        if problem is None:
            return Verdict(self.kind)
        return Verdict(None, problem[0], problem[1], self.enforce)

    def _judge(self, connection: SSL.Connection) -> Optional[tuple[str, str]]:
        chain = [c.to_cryptography() for c in (connection.get_peer_cert_chain() or [])]
        if self.kind == "dane":
            return dane.match(self.records, chain, self.hostname)
        seen = self._seen.get(connection)
        if seen is None or seen.error is not None:
            if seen is None:
                return "certificate-not-trusted", "the chain was not checked on this connection"
            assert seen.error is not None
            reason = _REASONS.get(seen.error, f"verify error {seen.error}")
            kind = "certificate-expired" if seen.error in _EXPIRED else "certificate-not-trusted"
            return kind, f"certificate chain: {reason} (depth {seen.depth})"
        if not chain:
            return "certificate-not-trusted", "no certificate presented"
        if not _names(connection, self.hostname):
            return "certificate-host-mismatch", f"the certificate is not valid for {self.hostname}"
        return None


@implementer(IOpenSSLClientConnectionCreator)
class UnverifiedTLS:
    """Client TLS that encrypts without authenticating (RFC 7435 opportunistic security), with SNI.

    Every instance shares one SSL context (unverified_context): it holds nothing of the exchanger —
    the host name goes into each connection's SNI — and building one costs more than a whole
    delivery on a reused connection."""

    def __init__(self, hostname: str):
        self._hostname = hostname
        self._context = unverified_context()

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if not _is_literal(self._hostname.strip("[]")):
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        connection.set_connect_state()
        return connection


_UNVERIFIED_CONTEXT: list[SSL.Context] = []     # the one shared context, built on first use


def unverified_context() -> SSL.Context:
    """The SSL context of every UnverifiedTLS: TLS 1.2 at least, no certificate checked, no per-host
    setting (the client never offers a session for resumption, so nothing of one host reaches another)."""
    if not _UNVERIFIED_CONTEXT:
        _UNVERIFIED_CONTEXT.append(ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2).getContext())
    return _UNVERIFIED_CONTEXT[0]


def _names(connection: SSL.Connection, hostname: str) -> bool:
    from service_identity import VerificationError
    from service_identity.pyopenssl import verify_hostname

    try:
        verify_hostname(connection, hostname)
    except VerificationError:
        return False
    except Exception:      # CertificateError: the certificate has no DNS name at all
        return False
    return True


def _is_literal(text: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
