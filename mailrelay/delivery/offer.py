"""What one job's transaction looks like to one server: whether the server can take it at all, and the
MAIL FROM command with the parameters its extensions allow.  In: a Job (delivery.job) and the server's
EHLO extensions.  Used by the delivery client (delivery.client) before each transaction.

Implements RFC 1870 (SIZE: the declared size, and the server's own limit honoured before sending), RFC
6152 (BODY=8BITMIME, whenever the message has 8-bit octets, declared by its client or not) and RFC 6531
(SMTPUTF8: declared for a message that needs it; one that needs it never goes to a server without it).
"""
from __future__ import annotations

from typing import Optional

from mailrelay.delivery.job import Job, valid_address


def refusal(job: Job, extensions: dict, host: str) -> Optional[tuple[int, str, str]]:
    """A permanent reason not to try this job on this server at all, or None."""
    envelope = job.message.envelope
    if not valid_address(envelope.sender):
        return 553, "5.1.7", "invalid sender address syntax"
    limit = extensions.get(b"SIZE", b"")
    if limit.isdigit() and int(limit) and job.message.size > int(limit):
        # RFC 1870 6.1: the server told us its fixed limit; sending anyway would only waste the transfer.
        return 552, "5.3.4", f"message size {job.message.size} exceeds the limit {int(limit)} of {host}"
    if not all(a.isascii() for a in (envelope.sender, *job.recipients)) and b"SMTPUTF8" not in extensions:
        return 553, "5.6.7", f"non-ASCII address, but {host} does not offer SMTPUTF8"   # RFC 6531 3.2
    return None


def mail_command(job: Job, extensions: dict) -> bytes:
    """MAIL FROM:<sender> with SIZE, BODY=8BITMIME and SMTPUTF8 where the server offers them."""
    envelope = job.message.envelope
    line = b"MAIL FROM:<" + envelope.sender.encode("utf-8") + b">"
    if b"SIZE" in extensions:
        line += b" SIZE=%d" % job.message.size                                     # RFC 1870
    if b"8BITMIME" in extensions and (envelope.body == "8BITMIME" or envelope.octets == "8bit"):
        line += b" BODY=8BITMIME"                                        # RFC 6152, declared or not
    utf8 = envelope.smtputf8 or not all(a.isascii() for a in (envelope.sender, *job.recipients))
    if b"SMTPUTF8" in extensions and utf8:
        line += b" SMTPUTF8"                                                       # RFC 6531
    return line
