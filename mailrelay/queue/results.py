# -*- test-case-name: tests.test_suppression, tests.test_webhook_scheduler, tests.test_dsn -*-
"""What a delivery attempt answers, per recipient (RFC 5321 section 4.2, RFC 3463 enhanced status codes).

Journey: the delivery client and the next hops (smarthost, MX) produce these; the scheduler reads them to
mark a recipient delivered (2xx), retry it later (4xx) or bounce it with a DSN (5xx, RFC 3464).
In: SMTP replies, or connection-level failures.  Out: frozen `RecipientResult` (IRecipientResult) /
`SessionResult` values.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from zope.interface import implementer

from mailrelay.interfaces import IRecipientResult

# RFC 3463 section 2: class "." subject "." detail, at the start of the reply text (RFC 2034 section 4).
_ENHANCED = re.compile(rb"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


@implementer(IRecipientResult)
@dataclass(frozen=True)
class RecipientResult:
    """The reply that settles one recipient on one attempt, e.g. (rcpt, 550, "5.1.1", "User unknown", host).
    `tls` and `tls_verified` say what protected the session that gave it (outbound.tlsinfo: "none",
    "tls1.3", ...; None when no SMTP session said, e.g. a DNS failure); they take no part in equality.
    `sender_refused`: settled by the next hop's refusal of MAIL FROM, a verdict on the sender, not on
    this recipient (so it never suppresses the recipient: spool.suppression).  `remote_reply`: the code
    and status are the next hop's own reply, not the relay's verdict on a failed connection, timeout or
    handshake (queue.throttle pauses a destination only for what it said itself).
    `dsn_passed`: delivered to a hop that offers DSN (RFC 3461), which got the recipient's NOTIFY and
    reports on its own; `final`: delivered into the mailbox itself (no further hop), so NOTIFY=SUCCESS
    gets a "delivered" DSN rather than a "relayed" one (RFC 3464 2.3.3).
    `next_host`: a permanent answer from this server only (REQUIRETLS, RFC 8689 4.2.1): direct delivery
    tries the domain's other exchangers before it stands."""
    recipient: str
    code: int
    status: str          # RFC 3463 enhanced status code, its class agreeing with `code`
    text: str
    remote_host: str = ""
    tls: Optional[str] = field(default=None, compare=False)
    tls_verified: bool = field(default=False, compare=False)
    tls_verified_by: Optional[str] = field(default=None, compare=False)   # ITLSVerification.tls_verified_by
    sender_refused: bool = field(default=False, compare=False)
    remote_reply: bool = field(default=False, compare=False)
    dsn_passed: bool = field(default=False, compare=False)
    final: bool = field(default=False, compare=False)
    next_host: bool = field(default=False, compare=False)

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        where = f" ({self.remote_host})" if self.remote_host else ""
        return f"{self.recipient}: {self.code} {self.status} {self.text}{where}"


@dataclass(frozen=True)
class SessionResult:
    """Everything one connection settled: one tuple of results per job, in the order the jobs were given.

    `tls` names the negotiated protocol ("TLSv1.3") or is None in plaintext.  `tls_failed` says a TLS
    handshake (STARTTLS or implicit) failed, so an opportunistic caller may retry in plaintext.
    `before_mail` says the session failed before the first MAIL FROM was answered (connect, greeting,
    EHLO, TLS, AUTH): nothing was said about any recipient, so an MX loop should try the next host.
    `tls_verdict`: the TLS policy's judgement of the peer (outbound.tlsverify.Verdict) when the session's
    STARTTLS options check one; `starttls_missing`: TLS was wanted but the server did not offer it;
    `reused`: the session ran on a parked connection (its TLS was judged when it was made)."""
    jobs: tuple[tuple[RecipientResult, ...], ...]
    tls: Optional[str] = None
    tls_failed: bool = False
    before_mail: bool = False
    tls_verdict: Any = None
    starttls_missing: bool = False
    reused: bool = False

    @property
    def results(self) -> tuple[RecipientResult, ...]:
        return tuple(r for job in self.jobs for r in job)


def parse_reply(code: int, text: bytes) -> tuple[str, str]:
    """(enhanced status, text) from a reply's code and text; a status whose class disagrees with the code,
    or none at all, is replaced by the generic X.0.0 of the code's class (RFC 3463 section 3.1)."""
    first = text.split(b"\n", 1)[0]
    match = _ENHANCED.match(first)
    klass = str(code)[0] if 200 <= code < 600 else "4"
    if match and match.group(1).decode() == klass:
        status = b".".join(match.groups()).decode("ascii")
        first = first[match.end():]
    else:
        status = f"{klass}.0.0"
    return status, printable(first)


def printable(text: bytes, limit: int = 300) -> str:
    """Server text made safe for logs and DSNs: ASCII printable only, bounded length."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit].decode("ascii", "replace"))


def from_reply(recipient: str, code: int, text: bytes, remote_host: str) -> RecipientResult:
    """A result for `recipient` from a server reply."""
    status, clean = parse_reply(code, text)
    if not 200 <= code < 600:
        # A reply code outside 2xx-5xx is a protocol error: never a delivery, never a bounce.
        return RecipientResult(recipient, 451, status, f"unexpected reply code {code}: {clean}", remote_host)
    return RecipientResult(recipient, code, status, clean, remote_host, remote_reply=True)


def settle_all(
    recipients: Iterable[str], code: int, status: str, text: str, remote_host: str = ""
) -> tuple[RecipientResult, ...]:
    """The same result for every recipient (a connection-level failure, a MAIL FROM refusal)."""
    return tuple(RecipientResult(r, code, status, text, remote_host) for r in recipients)


def describe_tls(label: Optional[str], verified: bool) -> Optional[str]:
    """The log line's `tls` field: "tls1.3 verified", "tls1.2 unverified", "none"; None when unknown."""
    if label is None or label == "none":
        return label
    return f"{label} {'verified' if verified else 'unverified'}"

