# -*- test-case-name: tests.test_sevenbit, tests.test_queue_front, tests.test_policy -*-
"""Plain values that travel between the stages: who the client is, and a message's envelope.

Frozen dataclasses, no behaviour beyond (de)serialisation, so every stage may hold them safely.
The spool stores `Envelope.to_json()`; nothing here is pickled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Optional

from mailrelay.idn import domain_key


@dataclass(frozen=True)
class ClientInfo:
    """What the session knows about its peer when it asks the policy for a decision."""
    address: str                      # peer IP as text ("127.0.0.2", "::1"); IPv4-mapped already unmapped
    port: int = 0
    helo: str = ""                    # the EHLO/HELO argument (validated: no CR/LF/controls)
    listener: str = "relay"           # "relay" | "submission" | "submissions"
    user: Optional[str] = None        # authenticated user name, None when not authenticated
    user_folded: bool = False         # `user` is a case-insensitive (LDAP) login, case-folded
    tls: Optional[str] = None         # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384", None in plaintext


@dataclass(frozen=True)
class Envelope:
    """One accepted message's envelope, as written to the spool before the body."""
    sender: str                       # "" is the null reverse-path <>
    recipients: tuple[str, ...]
    received_at: float                # unix time the DATA phase began
    client_address: str = ""
    client_helo: str = ""
    identity: Optional[str] = None    # authenticated user, or the permit rule that matched ("permit[0]")
    body: str = "7BIT"                # BODY= parameter: "7BIT" | "8BITMIME" (what the client declared)
    # What the content holds, seen as it was spooled: "7bit" (ASCII only) | "8bit".  None: not known (a
    # spool file from before the field existed): trust `body`.  Every value has OCTETS_WIDTH characters,
    # so the spool can patch it in place at commit (spool/writer.py).
    octets: Optional[str] = None
    # Whether a line of the content is longer than 998 octets (RFC 5321 4.5.3.1.6), seen as it was
    # spooled: such a message is re-encoded before it leaves (outbound/sevenbit.py).  None: not known (a
    # spool file from before the field existed, when such lines were refused at the door): taken as False.
    long_lines: Optional[bool] = None
    # The client declared SMTPUTF8 (RFC 6531 3.4: `MAIL FROM:<...> SMTPUTF8`; for the HTTP API and a DSN:
    # an address or a header needs it), so its addresses and header fields may be UTF-8 (RFC 6532).
    smtputf8: bool = False
    # Whether the header block holds a non-ASCII octet, seen as it was spooled.  With `smtputf8` it is an
    # RFC 6532 message that only a next hop offering SMTPUTF8 may take; without, legacy 8-bit headers
    # (sent as 8BITMIME content, never converted).  None: not known (written before the field existed, or
    # an envelope made without the spool): with `smtputf8`, 8-bit content is then taken to be such headers.
    utf8_headers: Optional[bool] = None
    tls: Optional[str] = None
    # Other ESMTP parameters worth keeping: the DSN (RFC 3461) and REQUIRETLS (RFC 8689) requests, with
    # per-recipient NOTIFY / ORCPT under "RCPT" (layout and readers: mailrelay/dsnparams.py).  Kept in
    # this one dict, which every version loads, so a downgrade still reads the spool.
    params: dict = field(default_factory=dict)
    # The `senders` patterns of the permit decision that accepted the message: DKIM signs only a From:
    # they cover. () = never sign (an `anyone` rule, the postmaster exception); None = not recorded
    # (a spool file written before this field existed): see mailrelay.dkim.permission.
    dkim_senders: Optional[tuple[str, ...]] = None

    def to_json(self) -> bytes:
        cached = self.__dict__.get("_json")
        if cached is None:
            d = {name: getattr(self, name) for name in _ENVELOPE_FIELDS}   # asdict() deep-copies: slow
            d["recipients"] = list(self.recipients)
            cached = _COMPACT.encode(d).encode("utf-8")
            # Frozen: the value cannot change, so the spool header and the delivery process's pipe share one.
            object.__setattr__(self, "_json", cached)
        return cached

    @classmethod
    def from_json(cls, data: bytes | str) -> "Envelope":
        d = json.loads(data)
        # A field this version does not know comes from a newer one: left aside, so a downgrade still
        # delivers what the spool holds (without whatever that field meant).
        d = {k: v for k, v in d.items() if k in _ENVELOPE_NAMES}
        d["recipients"] = tuple(d["recipients"])
        if not isinstance(d.get("params", {}), dict):
            raise ValueError("params must be a JSON object")
        if d.get("dkim_senders") is not None:
            d["dkim_senders"] = _strings(d["dkim_senders"])
        return cls(**d)


OCTETS_WIDTH = 4
_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope))
_ENVELOPE_NAMES = frozenset(_ENVELOPE_FIELDS)
_COMPACT = json.JSONEncoder(separators=(",", ":"), sort_keys=True)   # what json.dumps(...) builds per call


def _strings(value) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("dkim_senders must be a list of strings")
    return tuple(value)


def domain_of(address: str) -> str:
    """The domain of `local@domain` as it is compared and looked up: lower case, internationalised
    domains as A-labels (mailrelay.idn); '' for the null path or a bare local part."""
    _, at, domain = address.rpartition("@")
    return domain_key(domain) if at else ""
