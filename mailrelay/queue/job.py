# -*- test-case-name: tests.test_mx, tests.test_delivery_client, tests.test_chunking -*-
"""What one outgoing SMTP session is asked to do: the jobs (a spooled message and the recipients to try),
how to talk to the remote host (`SessionParams`, `Timeouts`), and how settled jobs are reported
(`OnSettled`, `report_once`).  Plain values and small helpers shared by the client (outbound.client), the
connection step (outbound.connect) and the next hops (outbound.mx, outbound.smarthost, outbound.signing).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from twisted.internet import defer

# on_settled(index, results): job `index` has its final per-recipient results; the next job waits for
# the Deferred it may return.
OnSettled = Callable[[int, list], Optional[defer.Deferred]]
@dataclass(frozen=True)
class Timeouts:
    """Seconds; RFC 5321 4.5.3.2 asks for 5 minutes per reply and 10 for the reply to the final dot."""
    connect: float = 30.0
    reply: float = 300.0
    data_end: float = 600.0


@dataclass(frozen=True)
class Job:
    """One message to send on a connection: a spooled message (queue_id, envelope, size, open()) and the
    recipients to try for it (a subset of its envelope's)."""
    message: Any
    recipients: tuple[str, ...]


def report_once(on_settled: Optional[OnSettled]) -> Optional[OnSettled]:
    """`on_settled` called at most once per job index, however many connections the jobs are tried on
    (a stale cached connection, a plaintext retry after a failed handshake); repeats return None."""
    if on_settled is None:
        return None
    reported: set[int] = set()

    def report(index: int, results: list) -> Optional[defer.Deferred]:
        if index in reported:
            return None
        reported.add(index)
        return on_settled(index, results)
    return report


@dataclass(frozen=True)
class SessionParams:
    """How to talk to one remote host.  `security`: "none"; "opportunistic" (STARTTLS when offered);
    "starttls" (STARTTLS required, else 4.7.4); "tls" (the transport is already TLS from the first byte).
    `tls_options`: the client TLS connection creator used for STARTTLS."""
    helo: str
    remote_host: str
    security: str = "opportunistic"
    tls_options: Any = None
    username: Optional[str] = None
    password: Optional[bytes] = field(default=None, repr=False)
    timeouts: Timeouts = Timeouts()
    login: Any = field(default=None, repr=False)    # an outbound.sasl login; default: PLAIN/LOGIN with the above
    protocol: str = "smtp"         # "lmtp": RFC 2033 (outbound.lmtp)
    # This plaintext session follows a failed TLS handshake with the same server (an opportunistic
    # fallback): what needs TLS waits instead of bouncing (outbound.offer.requiretls_refusal).
    after_tls_failure: bool = False


def temporary_status(status: str) -> str:
    """The same RFC 3463 subject and detail in the temporary class: "5.7.8" -> "4.7.8"."""
    return "4" + status[1:]


def valid_address(address: str) -> bool:
    """No control characters and no angle brackets: an address can never inject a command line."""
    return all(c >= " " and c != "\x7f" for c in address) and "<" not in address and ">" not in address


def rcpt_command(recipient: str) -> bytes:
    return b"RCPT TO:<" + recipient.encode("utf-8") + b">"
