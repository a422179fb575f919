# -*- test-case-name: tests.test_requiretls_end_to_end, tests.test_capabilities, tests.test_mx -*-
"""Which TLS a message itself asks for (RFC 8689): REQUIRETLS, or `TLS-Required: No`.

Part of the delivery stage.  In: a spooled message (its envelope, and its header block read from the
spool file).  Out: `tls_optional(message)`, the seam every recipient-domain TLS policy asks before a
failure of that policy keeps the message back: direct delivery's `tls = "required"` / `"verify"` today,
MTA-STS "enforce" and DANE alike.  True means: RFC 8689 4.2.2, send it "regardless of its ability to
negotiate STARTTLS", i.e. as opportunistic TLS (STARTTLS when offered, any certificate, plaintext
after a failed handshake).  A smarthost's `security` and `verify` are the operator's own settings for
its own relay (with its credentials) and are never relaxed.

The field is read at delivery, not at receipt (RFC 8689 4.1 leaves the manner of tagging to us): the
spool's envelope line is written before the header block is complete, and an old spool file is read
the same way.  It is read only when a policy has failed, so a message pays nothing for it otherwise.
RFC 8689 4.1: with REQUIRETLS on MAIL FROM the field is ignored; two or more of them count as none.
"""
from __future__ import annotations

from mailrelay import dsnparams
from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.delivery")

HEADER_LIMIT = 64 * 1024      # the header block is looked at up to here


def header_block(message, limit: int = HEADER_LIMIT) -> bytes:
    """The message's header block (to the first empty line, at most `limit` bytes): a bounded read."""
    with message.open() as f:
        data = f.read(limit)
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[:end + 2]


def tls_optional(message) -> bool:
    """RFC 8689 4.2.2: the message carries one `TLS-Required: No` and no REQUIRETLS."""
    if dsnparams.requiretls(message.envelope):
        return False
    try:
        return dsnparams.tls_required_no(header_block(message))
    except OSError:
        log.failure("{queue_id}: cannot read the header block", queue_id=message.queue_id)
        return False
