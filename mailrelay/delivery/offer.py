"""What one job's transaction looks like to one server: whether the server can take it at all, and the
MAIL FROM and RCPT TO commands with the parameters its extensions allow.  In: a Job (delivery.job) and
the server's EHLO extensions.  Used by the delivery client (delivery.client) before each transaction.

Implements RFC 1870 (SIZE: the declared size, and the server's own limit honoured before sending), RFC
6152 (BODY=8BITMIME, whenever the message has 8-bit octets, declared by its client or not) and RFC 6531
(SMTPUTF8: declared for a message that needs it; one that needs it never goes to a server without it).

What needs SMTPUTF8 (RFC 6531 3.2): a UTF-8 local part in the sender or one of the job's recipients, a
header block of UTF-8 (RFC 6532) in a message its client declared SMTPUTF8 for, or a U-label domain in
an address.  To a server without SMTPUTF8 only the last can go: a domain's A-label form is the same
domain (RFC 5890 2.3.2.1), so such addresses are sent as local@A-label — no RFC 6857 downgrade of
headers or local parts is attempted; those messages fail for good with 5.6.7 (RFC 6531 3.5, X.6.7).
"""
from __future__ import annotations

from typing import Optional

from mailrelay import idn
from mailrelay.delivery.job import Job, rcpt_command, valid_address


def _addresses(job: Job) -> tuple[str, ...]:
    return (job.message.envelope.sender, *job.recipients)


def utf8_headers(job: Job) -> bool:
    """An RFC 6532 message: SMTPUTF8 declared and a header field that is UTF-8 (seen at spooling; when
    that is not known, any 8-bit content is taken to be such a field)."""
    envelope = job.message.envelope
    if not envelope.smtputf8:
        return False
    if envelope.utf8_headers is None:
        return envelope.octets != "7bit"
    return envelope.utf8_headers


def needs_smtputf8(job: Job) -> bool:
    """Whether the transaction is an SMTPUTF8 one: a UTF-8 address (local part or domain) or header."""
    return utf8_headers(job) or not all(a.isascii() for a in _addresses(job))


def _downgradable(job: Job) -> bool:
    """Whether the job can go without SMTPUTF8: ASCII headers, and every address ASCII but for its
    domain, which has an A-label form."""
    if utf8_headers(job):
        return False
    return all(a.isascii() or idn.ascii_address(a) is not None for a in _addresses(job) if a)


def refusal(job: Job, extensions: dict, host: str) -> Optional[tuple[int, str, str]]:
    """A permanent reason not to try this job on this server at all, or None."""
    envelope = job.message.envelope
    if not valid_address(envelope.sender):
        return 553, "5.1.7", "invalid sender address syntax"
    limit = extensions.get(b"SIZE", b"")
    if limit.isdigit() and int(limit) and job.message.size > int(limit):
        # RFC 1870 6.1: the server told us its fixed limit; sending anyway would only waste the transfer.
        return 552, "5.3.4", f"message size {job.message.size} exceeds the limit {int(limit)} of {host}"
    if b"SMTPUTF8" not in extensions and needs_smtputf8(job) and not _downgradable(job):
        # RFC 6531 3.5 / X.6.7: never sent to a server that cannot take it, never mangled to fit.
        what = "UTF-8 header fields" if utf8_headers(job) else "a non-ASCII local part"
        return 553, "5.6.7", f"SMTPUTF8 required ({what}) but not offered by {host}"
    return None


def _ascii_form(job: Job, extensions: dict) -> bool:
    """Whether the addresses go as local@A-label: the job needs SMTPUTF8, which the server lacks."""
    return b"SMTPUTF8" not in extensions and needs_smtputf8(job)


def _path(address: str, ascii_form: bool) -> bytes:
    if ascii_form and not address.isascii():
        address = idn.ascii_address(address) or address      # refusal() made sure there is one
    return address.encode("utf-8")


def mail_command(job: Job, extensions: dict) -> bytes:
    """MAIL FROM:<sender> with SIZE, BODY=8BITMIME and SMTPUTF8 where the server offers them."""
    envelope = job.message.envelope
    ascii_form = _ascii_form(job, extensions)
    line = b"MAIL FROM:<" + _path(envelope.sender, ascii_form) + b">"
    if b"SIZE" in extensions:
        line += b" SIZE=%d" % job.message.size                                     # RFC 1870
    if b"8BITMIME" in extensions and (envelope.body == "8BITMIME" or envelope.octets == "8bit"):
        line += b" BODY=8BITMIME"                                        # RFC 6152, declared or not
    if b"SMTPUTF8" in extensions and (envelope.smtputf8 or needs_smtputf8(job)):
        line += b" SMTPUTF8"                                                 # RFC 6531 3.4
    return line


def rcpt_line(job: Job, recipient: str, extensions: dict) -> bytes:
    """RCPT TO:<recipient>, its domain as A-labels for a server without SMTPUTF8 (see above)."""
    if _ascii_form(job, extensions) and not recipient.isascii():
        recipient = idn.ascii_address(recipient) or recipient
    return rcpt_command(recipient)
