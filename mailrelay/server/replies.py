# -*- test-case-name: tests.test_server_parts, tests.test_server_bdat, tests.test_server_session -*-
"""What a server session's parts share: the channel they answer the client through, the replies sent
from more than one place, and the refusal reasons metrics count them by.

Its job in the message's journey: none of its own.  The protocol (session.py) owns its collaborators —
the AUTH exchange (auth.py), the transaction (transaction.py) and BDAT (bdat.py) — and gives each an
`ISessionChannel`: the one way back to the client (replies, holding input while a check or a commit is
pending, closing) and the client's description for the policy.  They never touch the protocol itself.
In: a Reply.  Out: the reason label for the mailrelay_messages_refused_total{reason} counter.
RFC 3463 enhanced status codes throughout; RFC 5321 §3.8 for the 421 sent when the relay is stopping.
"""
from __future__ import annotations

from zope.interface import Interface

from mailrelay.interfaces import Reply

# Every line the session and its parts log carries the protocol's namespace, wherever it is written.
SESSION_LOG_NAMESPACE = "mailrelay.server.session.RelaySession"

LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
# RFC 5321 3.8 / RFC 3463 4.3.2 (system not accepting network messages): the relay is stopping.
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")


class ISessionChannel(Interface):
    """What a session's collaborator may ask of the protocol that owns it.  Replies keep their order
    (RFC 2920): while `hold()` is in force no further input is read, so no later command is answered
    before the pending one."""

    def write(data):
        """Send bytes as they are: a reply of several lines, a 334 challenge, the 354."""

    def send(code, status, text):
        """Send one reply line `<code> <status> <text>` (RFC 3463 enhanced status code)."""

    def reply(reply):
        """Send a Reply; a 4xx or 5xx one is counted as a refusal (metrics, by `refusal_reason`)."""

    def hold():
        """A check or a commit is pending: read no further input until `release()`."""

    def release():
        """The pending check or commit is answered: go on with the input that waited."""

    def close():
        """Close the connection once what was written is sent; no further input is read."""

    def client_info():
        """The envelope.ClientInfo the relay policy is told about this client now."""


def count(metrics, event: str, *args) -> None:
    """Tell the metrics (mailrelay.metrics.Metrics), when the relay has them."""
    if metrics is not None:
        getattr(metrics, event)(*args)


# Refusals by enhanced status code, for the mailrelay_messages_refused_total{reason} counter.
_REFUSAL_REASONS = {
    "5.7.1": "policy", "5.3.4": "size", "5.6.11": "bare_cr", "5.6.0": "line_length", "4.7.1": "rate",
    "4.5.3": "recipients", "4.3.0": "local_error", "5.6.7": "syntax", "4.7.0": "connection_limit",
}


def refusal_reason(reply: Reply) -> str:
    if reply.code == 530:
        return "tls_required" if "STARTTLS" in reply.text else "auth_required"
    if reply.status.startswith("5.5.") or reply.status.startswith("5.1."):
        return "syntax"
    return _REFUSAL_REASONS.get(reply.status, "other")
