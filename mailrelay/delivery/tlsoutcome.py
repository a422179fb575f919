"""How a delivery session's TLS went, in the result types of SMTP TLS Reporting (RFC 8460 section 4.3).

Journey: the delivery client (delivery.client) notes, on every new connection where it meant to use
TLS, one `TLSOutcome` — the handshake completed, or STARTTLS was not offered (or refused), or the
handshake failed and why — and puts it on its SessionResult.  Direct MX delivery (delivery.mx) hands it
to the TLS report store (delivery.tlsrpt_store) through interfaces.ITLSReportSink.  A session that never
reached EHLO (no connection, a bad greeting) says nothing about TLS and has no outcome; neither has a
reused connection (its TLS was counted when it was made: RFC 8460 counts sessions).

Why a handshake failed (only "verify" checks certificates): Twisted checks the server's name
(service_identity) and fails the connection with a VerificationError — "certificate-host-mismatch";
OpenSSL's chain check fails it with "certificate verify failed", and the certificate the server sent
tells an expired one ("certificate-expired") from an untrusted one ("certificate-not-trusted").
Anything else (no shared protocol or cipher, a reset) is RFC 8460's general "validation-failure".
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

from twisted.python.failure import Failure

try:
    from service_identity import VerificationError as _VerificationError
except ImportError:           # a dependency of ours; without it Twisted checks no names either
    _VerificationError = None

STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
HOST_MISMATCH = "certificate-host-mismatch"
EXPIRED = "certificate-expired"
NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"

REASON_LIMIT = 200                               # characters of a failure's text kept for the report


@dataclass(frozen=True)
class TLSOutcome:
    """One session's TLS outcome: `result_type` None when the handshake completed; the addresses and the
    server's EHLO name as RFC 8460 4.4 failure details name them; `reason` the failure's own words."""
    result_type: Optional[str] = None
    sending_ip: str = ""
    receiving_ip: str = ""
    receiving_helo: str = ""
    reason: str = ""

    @property
    def success(self) -> bool:
        return self.result_type is None

    @property
    def detail(self) -> dict:
        """The ITLSReportSink.record `detail`: only the fields known."""
        fields = {"sending-mta-ip": self.sending_ip, "receiving-ip": self.receiving_ip,
                  "receiving-mx-helo": self.receiving_helo, "failure-reason-code": self.reason}
        return {k: v for k, v in fields.items() if v}


def handshake_failure(reason: Optional[Failure], peer_certificate: Any = None) -> str:
    """The RFC 8460 4.3 result type of a failed TLS handshake: `reason` why the connection ended,
    `peer_certificate` the server's certificate (a pyOpenSSL X509) when it sent one."""
    if reason is None:
        return VALIDATION_FAILURE
    if _VerificationError is not None and reason.check(_VerificationError):
        return HOST_MISMATCH        # RFC 6125 name check failed (service_identity, through Twisted)
    if "certificate verify failed" not in str(reason.value):
        return VALIDATION_FAILURE   # no shared protocol or cipher, garbage, a reset mid-handshake ...
    if peer_certificate is not None and not _valid_now(peer_certificate):
        return EXPIRED              # outside its validity period (or not yet valid)
    return NOT_TRUSTED              # self-signed, unknown issuer, untrusted root, bad chain ...


def _valid_now(certificate: Any) -> bool:
    try:
        cert = certificate.to_cryptography()
        now = datetime.now(timezone.utc)
        return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
    except Exception:
        return True


def peer_certificate(transport: Any) -> Any:
    """The certificate the server sent on this TLS transport, or None.  After a failed chain check
    OpenSSL keeps the chain the server sent, not a verified peer: its first entry is the server's."""
    try:
        handle = transport.getHandle()
        chain = handle.get_peer_cert_chain()
        return chain[0] if chain else handle.get_peer_certificate()
    except Exception:
        return None


class OutcomeNotes:
    """What one client connection learns of its TLS, as it goes (delivery.client calls each step);
    `outcome` is the TLSOutcome, or None when TLS was not meant (security "none", no TLS options,
    implicit TLS) or the session never got as far as EHLO.  The first verdict stands, except that a
    failed name check just after a completed handshake overrides its success."""

    def __init__(self, params: Any):
        self._wanted = params.security in ("opportunistic", "starttls") and params.tls_options is not None
        self._addresses = ("", "")
        self._helo = ""
        self.outcome: Optional[TLSOutcome] = None

    def connected(self, transport: Any) -> None:
        self._addresses = (getattr(transport.getHost(), "host", "") or "",
                           getattr(transport.getPeer(), "host", "") or "")

    def ehlo(self, reply: bytes) -> None:
        self._helo = self._helo or _first_word(reply)

    def no_starttls(self, helo_reply: Optional[bytes], why: str) -> None:
        """RFC 8460 4.3.1 "starttls-not-supported": not offered, refused, or no EHLO at all."""
        if helo_reply is not None:
            self._helo = _first_word(helo_reply)
        self._note(STARTTLS_NOT_SUPPORTED, why)

    def completed(self) -> None:
        self._note(None)

    def failed(self, why: str) -> None:
        self._note(VALIDATION_FAILURE, why)

    def lost(self, transport: Any, reason: Optional[Failure], tls_active: bool, pending: bool) -> None:
        """The connection ended: a handshake still under way failed; so did one whose name check failed."""
        if not tls_active:
            return
        kind = handshake_failure(reason, peer_certificate(transport))
        if pending or kind == HOST_MISMATCH and self.outcome is not None:
            why = str(reason.value) if reason is not None else ""
            self._note(kind, "".join(c if " " <= c <= "~" else "?" for c in why[:REASON_LIMIT]))

    def _note(self, result_type: Optional[str], reason: str = "") -> None:
        if not self._wanted or (self.outcome is not None and (not self.outcome.success or result_type is None)):
            return
        self.outcome = TLSOutcome(result_type, self._addresses[0], self._addresses[1], self._helo,
                                  reason[:REASON_LIMIT])


def _first_word(reply: bytes) -> str:
    """The name a server gives first in its EHLO/HELO reply (RFC 5321 4.1.1.1), printable, bounded."""
    words = reply.split(b"\n", 1)[0].split()
    return "".join(c if " " < c <= "~" else "?" for c in words[0][:255].decode("ascii", "replace")) if words else ""
