"""What TLS protected a delivery session, in the small fixed vocabulary that metrics and logs use.

Journey: the delivery client (delivery.client) reads it from the connection when its TLS handshake
completes (STARTTLS, RFC 3207, or implicit TLS, RFC 8314) and stamps it on every RecipientResult the
session settles; the scheduler hands it to the delivery metrics and log line (delivery.outcomes).
In: a TLS transport.  Out: a `Negotiated` (protocol label, verified or not); `PLAIN` for a session that
stayed in plaintext.

Labels: "none" (plaintext), "tls1.0", "tls1.1", "tls1.2", "tls1.3", or "tls" for a version with no name
here.  `verified` is true when the handshake completed under certificate verification (OpenSSL
VERIFY_PEER): the next hops build verifying options only with Twisted's optionsForClientTLS, which also
checks the host name (RFC 6125), and a handshake that fails either check never completes.  Every other
session (opportunistic or "required" TLS, `verify = false`) encrypts without authenticating (RFC 7435).

`verified_by` says what a verified handshake proved, for REQUIRETLS (RFC 8689 4.2.1) and the logs:
"pkix" (chain to a trusted root and the host name, RFC 6125: a transport's `verify = true`, direct
delivery's `tls = "verify"`), or the name a recipient-domain policy gives its own verifying options
("mta-sts", RFC 8461; "dane", RFC 7672) through `SessionParams.tls_verification`; "" when not verified.
It is the one answer to "was this connection's TLS verified, and by what".
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Optional

from OpenSSL import SSL

from mailrelay.delivery.results import RecipientResult

VERSION_LABELS = {"TLSv1": "tls1.0", "TLSv1.1": "tls1.1", "TLSv1.2": "tls1.2", "TLSv1.3": "tls1.3"}
LABELS = ("none", *VERSION_LABELS.values(), "tls")


@dataclass(frozen=True)
class Negotiated:
    """One session's protection: `label` from LABELS, `verified`, and OpenSSL's names for logs."""
    label: str
    verified: bool = False
    version: str = ""          # "TLSv1.3"
    cipher: str = ""           # "TLS_AES_256_GCM_SHA384"
    verified_by: str = ""      # VERIFIERS: what verified it; "" when not verified

    @property
    def name(self) -> Optional[str]:
        """"TLSv1.3 TLS_AES_256_GCM_SHA384" (results.SessionResult.tls), or None in plaintext."""
        if self.label == "none":
            return None
        return " ".join(part for part in (self.version, self.cipher) if part) or "TLS"


PLAIN = Negotiated("none")
PKIX = "pkix"
VERIFIERS = (PKIX, "mta-sts", "dane")


def negotiated(transport: Any, verification: str = PKIX) -> Negotiated:
    """The TLS a transport whose handshake has just completed negotiated (never raises); `verification`
    is what a verified handshake on it proves (VERIFIERS)."""
    try:
        handle = transport.getHandle()
        version = handle.get_protocol_version_name() or ""
        cipher = handle.get_cipher_name() or ""
        verified = bool(handle.get_verify_mode() & SSL.VERIFY_PEER)
    except Exception:
        return Negotiated("tls")
    return Negotiated(VERSION_LABELS.get(version, "tls"), verified, version, cipher,
                      verification if verified else "")


def stamped(results: Iterable[RecipientResult], tls: Optional[Negotiated]) -> list[RecipientResult]:
    """`results` carrying the session's protection (`tls` None: plaintext); one already stamped keeps
    its own (it was settled on an earlier connection)."""
    tls = tls or PLAIN
    return [r if r.tls is not None else replace(r, tls=tls.label, tls_verified=tls.verified) for r in results]


def describe(label: Optional[str], verified: bool) -> Optional[str]:
    """The log line's `tls` field: "tls1.3 verified", "tls1.2 unverified", "none"; None when unknown."""
    if label is None or label == "none":
        return label
    return f"{label} {'verified' if verified else 'unverified'}"
