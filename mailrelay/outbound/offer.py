# -*- test-case-name: tests.test_dsn_params, tests.test_smtputf8 -*-
"""What one job's transaction looks like to one server: whether the server can take it at all, and the
MAIL FROM and RCPT TO commands with the parameters its extensions allow.  In: a Job (queue.job), the
server's EHLO extensions and what protects the session (outbound.tlsinfo).  Used by the delivery client
(outbound.client) before each transaction; `mail_parameters` / `rcpt_parameters` are also what any
other sender of a spooled message (a queue transfer to another relay) uses to pass its envelope on.

Implements RFC 1870 (SIZE: the declared size, and the server's own limit honoured before sending), RFC
6152 (BODY=8BITMIME, whenever the message has 8-bit octets, declared by its client or not), RFC 6531
(SMTPUTF8: declared for a message that needs it; one that needs it never goes to a server without it),
RFC 3461 (RET, ENVID, NOTIFY, ORCPT passed on, xtext-encoded, to a server that offers DSN; to one
without, nothing: the scheduler then answers NOTIFY=SUCCESS itself with a "relayed" DSN, 6.2.1) and RFC
8689 (REQUIRETLS: a message that needs it goes only over verified TLS to a server offering it, 4.2.1).

`ehlo_extensions` reads the EHLO reply those checks and commands go by.

What needs SMTPUTF8 (RFC 6531 3.2): a UTF-8 local part in the sender or one of the job's recipients, a
header block of UTF-8 (RFC 6532) in a message its client declared SMTPUTF8 for, or a U-label domain in
an address.  To a server without SMTPUTF8 only the last can go: a domain's A-label form is the same
domain (RFC 5890 2.3.2.1), so such addresses are sent as local@A-label — no RFC 6857 downgrade of
headers or local parts is attempted; those messages fail for good with 5.6.7 (RFC 6531 3.5, X.6.7).
"""
from __future__ import annotations

from typing import Optional

from mailrelay import dsnparams, idn
from mailrelay.queue.job import Job, valid_address


def ehlo_extensions(ehlo_reply: bytes) -> dict[bytes, bytes]:
    """The server's EHLO keywords (upper case) and their parameters, from the reply's lines after the
    first (RFC 5321 4.1.1.1: "250-domain", then one "250-KEYWORD params" line per extension)."""
    offered = {}
    for line in ehlo_reply.split(b"\n")[1:]:
        keyword, _, value = line.strip().partition(b" ")
        offered[keyword.upper()] = value.strip()
    return offered


def _addresses(job: Job) -> tuple[str, ...]:
    return (job.message.envelope.sender, *job.recipients)


def utf8_headers(job: Job) -> bool:
    """An RFC 6532 message: SMTPUTF8 declared and a header field that is UTF-8 (seen at spooling; when
    that is not known, any 8-bit content is taken to be such a field)."""
    return _utf8_headers(job.message.envelope)


def _utf8_headers(envelope) -> bool:
    if not envelope.smtputf8:
        return False
    if envelope.utf8_headers is None:
        return envelope.octets != "7bit"
    return envelope.utf8_headers


def needs_smtputf8(job: Job) -> bool:
    """Whether the transaction is an SMTPUTF8 one: a UTF-8 address (local part or domain) or header."""
    return _needs_smtputf8(job.message.envelope, job.recipients)


def _needs_smtputf8(envelope, recipients) -> bool:
    return _utf8_headers(envelope) or not all(a.isascii() for a in (envelope.sender, *recipients))


def _downgradable(job: Job) -> bool:
    """Whether the job can go without SMTPUTF8: ASCII headers, and every address ASCII but for its
    domain, which has an A-label form."""
    if utf8_headers(job):
        return False
    return all(a.isascii() or idn.ascii_address(a) is not None for a in _addresses(job) if a)


REQUIRETLS_STATUSES = ("5.7.10", "5.7.30")     # what requiretls_refusal answers for good


def refusal(job: Job, extensions: dict, host: str, tls=None,
            after_tls_failure: bool = False) -> Optional[tuple[int, str, str]]:
    """A reason not to try this job on this server at all, or None.  `tls`: the session's
    tlsinfo.Negotiated, None in plaintext; `after_tls_failure`: this plaintext session follows a failed
    handshake with the same server."""
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
    return requiretls_refusal(job, extensions, host, tls, after_tls_failure)


def requiretls_refusal(job: Job, extensions: dict, host: str, tls=None,
                       after_tls_failure: bool = False) -> Optional[tuple[int, str, str]]:
    """RFC 8689 4.2.1: a REQUIRETLS message is sent only over TLS whose certificate was verified, to a
    server that offers REQUIRETLS after it; otherwise it MUST NOT be sent, and the sender gets a DSN
    (5.7.10 encryption needed, 5.7.30 REQUIRETLS support required).  Permanent, because it is a fact of
    the path (no TLS offered, no verification configured, no REQUIRETLS), not of the moment — except
    after a failed handshake, which may be passing: 4.7.10, tried again later.  RFC 8689 5: a bounce
    (from <>) is never held back for REQUIRETLS."""
    envelope = job.message.envelope
    if not dsnparams.requiretls(envelope) or envelope.sender == "":
        return None
    if tls is None:
        if after_tls_failure:
            return 451, "4.7.10", f"REQUIRETLS: the TLS handshake with {host} failed; not sent in plaintext"
        return 550, "5.7.10", f"REQUIRETLS: {host} offers no TLS; the message needs encryption"
    if not tls.verified:
        return 550, "5.7.10", f"REQUIRETLS: the TLS certificate of {host} was not verified"
    if b"REQUIRETLS" not in extensions:
        return 550, "5.7.30", f"REQUIRETLS support required, but {host} does not offer it"
    return None


def mail_parameters(envelope, recipients, extensions: dict, size: Optional[int] = None) -> list[bytes]:
    """The MAIL FROM parameters for `envelope` (to `recipients`) that a server with `extensions` takes:
    SIZE (given `size`), BODY=8BITMIME, SMTPUTF8, RET and ENVID (with DSN), REQUIRETLS."""
    params = []
    if b"SIZE" in extensions and size is not None:
        params.append(b"SIZE=%d" % size)                                           # RFC 1870
    if b"8BITMIME" in extensions and (envelope.body == "8BITMIME" or envelope.octets == "8bit"):
        params.append(b"BODY=8BITMIME")                                  # RFC 6152, declared or not
    if b"SMTPUTF8" in extensions and (envelope.smtputf8 or _needs_smtputf8(envelope, recipients)):
        params.append(b"SMTPUTF8")                                                 # RFC 6531 3.4
    if b"DSN" in extensions:
        ret = dsnparams.ret(envelope)
        if ret is not None:
            params.append(b"RET=" + ret.encode("ascii"))                          # RFC 3461 4.3
        envid = dsnparams.envid(envelope)
        if envid is not None:
            params.append(b"ENVID=" + dsnparams.xtext_encode(envid).encode("ascii"))   # RFC 3461 4.4
    if b"REQUIRETLS" in extensions and dsnparams.requiretls(envelope):
        params.append(b"REQUIRETLS")                                               # RFC 8689 4.2.1
    return params


def rcpt_parameters(envelope, recipient: str, extensions: dict) -> list[bytes]:
    """The RCPT TO parameters for `recipient` to a server with `extensions`: NOTIFY and ORCPT, exactly
    as received (ORCPT re-encoded as xtext), when it offers DSN (RFC 3461 6.2.1 a)."""
    if b"DSN" not in extensions:
        return []
    params = []
    notify = dsnparams.notify_text(envelope, recipient)
    if notify is not None:
        params.append(b"NOTIFY=" + notify.encode("ascii"))                         # RFC 3461 4.1
    orcpt = dsnparams.orcpt(envelope, recipient)
    if orcpt is not None:
        addr_type, _, address = orcpt.partition(";")
        params.append(b"ORCPT=" + f"{addr_type};{dsnparams.xtext_encode(address)}".encode("ascii"))
    return params


def transaction_parameters(envelope, recipients, extensions: dict,
                           size: Optional[int] = None) -> tuple[list[bytes], dict[str, list[bytes]]]:
    """Everything a spooled envelope asks a server with `extensions` (EHLO keywords upper-cased, as
    bytes, values after them) to carry: (MAIL FROM parameters, {recipient: its RCPT TO parameters}).
    For any sender of spooled mail (the delivery client, a queue transfer to another relay); check
    `refusal` first: what this does not say (REQUIRETLS to a hop without it) may forbid sending at all."""
    return (mail_parameters(envelope, recipients, extensions, size),
            {r: rcpt_parameters(envelope, r, extensions) for r in recipients})


def mail_command(job: Job, extensions: dict) -> bytes:
    """MAIL FROM:<sender> with the parameters the server's extensions allow; the sender's domain as
    A-labels for a server without SMTPUTF8 (see above)."""
    envelope = job.message.envelope
    params = mail_parameters(envelope, job.recipients, extensions, job.message.size)
    path = _path(envelope.sender, _ascii_form(job, extensions))
    return b" ".join([b"MAIL FROM:<" + path + b">", *params])


def rcpt_command(job: Job, recipient: str, extensions: dict) -> bytes:
    """RCPT TO:<recipient> with its DSN parameters where the server takes them; its domain as A-labels
    for a server without SMTPUTF8 (see above)."""
    params = rcpt_parameters(job.message.envelope, recipient, extensions)
    path = _path(recipient, _ascii_form(job, extensions))
    return b" ".join([b"RCPT TO:<" + path + b">", *params])


def _ascii_form(job: Job, extensions: dict) -> bool:
    """Whether the addresses go as local@A-label: the job needs SMTPUTF8, which the server lacks."""
    return b"SMTPUTF8" not in extensions and needs_smtputf8(job)


def _path(address: str, ascii_form: bool) -> bytes:
    if ascii_form and not address.isascii():
        address = idn.ascii_address(address) or address      # refusal() made sure there is one
    return address.encode("utf-8")
