# -*- test-case-name: tests.test_tls_policy, tests.test_dsn_params, tests.test_delivery_tls_facts -*-
"""What TLS protected a delivery session, in the small fixed vocabulary that metrics and logs use.

Journey: the delivery client (outbound.client) reads it from the connection when its TLS handshake
completes (STARTTLS, RFC 3207, or implicit TLS, RFC 8314) and stamps it on every RecipientResult the
session settles; the scheduler hands it to the delivery metrics and log line (queue.outcomes).
In: a TLS transport.  Out: a `Negotiated` (protocol label, verified or not); `PLAIN` for a session that
stayed in plaintext.

Labels: "none" (plaintext), "tls1.0", "tls1.1", "tls1.2", "tls1.3", or "tls" for a version with no name
here.  `verified` is true when the handshake completed under certificate verification (OpenSSL
VERIFY_PEER) with Twisted's optionsForClientTLS (a smarthost with `verify = true`), which also checks the
host name (RFC 6125) and never completes a handshake that fails either check; or when a TLS policy's
check after the handshake (outbound.tlsverify: DANE, MTA-STS, `tls = "verify"`) passed (`judged`).
`tls_verified_by` names which.  Every other session (opportunistic or "required" TLS, `verify = false`)
encrypts without authenticating (RFC 7435).
It is the one answer to "was this connection's TLS verified, and by what" (REQUIRETLS, RFC 8689
4.2.1, asks it too).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Optional

from OpenSSL import SSL
from zope.interface import implementer

from mailrelay.queue.results import RecipientResult
from mailrelay.interfaces import ITLSVerification

VERSION_LABELS = {"TLSv1": "tls1.0", "TLSv1.1": "tls1.1", "TLSv1.2": "tls1.2", "TLSv1.3": "tls1.3"}
LABELS = ("none", *VERSION_LABELS.values(), "tls")


@implementer(ITLSVerification)
@dataclass(frozen=True)
class Negotiated:
    """One session's protection: `label` from LABELS, `verified`, and OpenSSL's names for logs;
    `tls_verified_by`: which policy authenticated the peer (ITLSVerification)."""
    label: str
    verified: bool = False
    version: str = ""          # "TLSv1.3"
    cipher: str = ""           # "TLS_AES_256_GCM_SHA384"
    tls_verified_by: Optional[str] = None

    @property
    def name(self) -> Optional[str]:
        """"TLSv1.3 TLS_AES_256_GCM_SHA384" (results.SessionResult.tls), or None in plaintext."""
        if self.label == "none":
            return None
        return " ".join(part for part in (self.version, self.cipher) if part) or "TLS"


PLAIN = Negotiated("none")


def negotiated(transport: Any) -> Negotiated:
    """The TLS a transport whose handshake has just completed negotiated (never raises)."""
    try:
        handle = transport.getHandle()
        version = handle.get_protocol_version_name() or ""
        cipher = handle.get_cipher_name() or ""
        verified = bool(handle.get_verify_mode() & SSL.VERIFY_PEER)
    except Exception:
        return Negotiated("tls")
    # A verifying handshake (Twisted's optionsForClientTLS: chain and name) completes only when both hold.
    return Negotiated(VERSION_LABELS.get(version, "tls"), verified, version, cipher, "verify" if verified else None)


def judged(tls: Negotiated, verdict) -> Negotiated:
    """`tls` as a TLS policy's check (outbound.tlsverify.Verdict) found it: verified only when it passed."""
    return replace(tls, verified=verdict.verified_by is not None, tls_verified_by=verdict.verified_by)


def stamped(results: Iterable[RecipientResult], tls: Optional[Negotiated]) -> list[RecipientResult]:
    """`results` carrying the session's protection (`tls` None: plaintext); one already stamped keeps
    its own (it was settled on an earlier connection)."""
    tls = tls or PLAIN
    return [r if r.tls is not None else replace(r, tls=tls.label, tls_verified=tls.verified,
                                                tls_verified_by=tls.tls_verified_by) for r in results]
