# -*- test-case-name: tests.test_server_network, tests.test_server_bdat, tests.test_server_session -*-
"""Replies a server session shares between its parts, and the refusal reasons metrics count them by.

Its job in the message's journey: none of its own; it names the replies the session (session.py,
transaction.py) sends from more than one place.  In: a Reply.  Out: the reason label for the
mailrelay_messages_refused_total{reason} counter.  RFC 3463 enhanced status codes throughout;
RFC 5321 §3.8 for the 421 sent when the relay is stopping.
"""
from __future__ import annotations

from mailrelay.interfaces import Reply

LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
# RFC 5321 3.8 / RFC 3463 4.3.2 (system not accepting network messages): the relay is stopping.
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")


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
