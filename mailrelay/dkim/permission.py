# -*- test-case-name: tests.test_dsn, tests.test_dkim -*-
"""May the relay sign this message with our keys?  The permit decision, carried in the envelope.

In: a spooled message's envelope (`dkim_senders`, `identity`) and the From: addresses the signer parsed
from its header at send time.  Out: True only when the client that handed us the message was allowed to
use every one of those addresses.  A signature of ours tells every mailbox provider that the domain
vouches for the mail (RFC 6376 §1, DMARC RFC 7489 §3.1): it is lent only where the permit rules lent
the domain.

- `dkim_senders` is the `senders` list of the rule (authenticated user or network) that accepted the
  transaction, as the server recorded it (server/transaction.py): a From: address is covered as
  `senders` cover an envelope sender ("*" anything, "example.org" that domain, "*.example.org" its
  subdomains, "user@example.org" that address).
- `()`: never signed: mail accepted through an `anyone` rule or the postmaster exception.
- Missing (`None`: a spool file written before the field existed, or an envelope built without a
  decision): signed as before only when its identity is an authenticated user; mail a network or
  `anyone` rule accepted (`permit[N]`), or no rule at all (the postmaster exception), is not signed.
"""
from __future__ import annotations

import functools
from typing import Iterable, Optional

from mailrelay.envelope import Envelope
from mailrelay.mailboxes import AddressPatterns, from_addresses


@functools.lru_cache(maxsize=256)     # a handful of rules: parse each list once, not per message
def _patterns(senders: tuple[str, ...]) -> AddressPatterns:
    return AddressPatterns.parse(senders)


def signing_senders(envelope: Optional[Envelope]) -> tuple[str, ...]:
    """The sender patterns the relay may sign for: recorded, or the missing-field rule above."""
    if envelope is None:
        return ()
    if envelope.dkim_senders is not None:
        return envelope.dkim_senders
    identity = envelope.identity
    if identity is None or identity.startswith("permit["):
        return ()
    return ("*",)          # an authenticated user's mail, queued before the decision was recorded


def may_sign(envelope: Optional[Envelope], addresses: Iterable[str], header_block: Optional[bytes] = None) -> bool:
    """True when every From: address (there must be at least one) is one the client could use.

    With `header_block`, a client held to particular senders must also have a From: that the strict
    parser of server/policy.py reads as the same addresses: where two parsers disagree about a From:
    (CVE-2023-27043 class), a mail reader may show the one we did not check, so it is not signed."""
    senders = signing_senders(envelope)
    addresses = list(addresses)
    if not senders or not addresses:
        return False
    patterns = _patterns(senders)
    if patterns.anything:
        return True
    if header_block is not None:
        strict = from_addresses(header_block)
        if strict is None or [a.lower() for a in strict] != [a.lower() for a in addresses]:
            return False
    return all(patterns.allows(a) for a in addresses)
