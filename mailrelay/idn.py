# -*- test-case-name: tests.test_smtputf8, tests.test_smtputf8_end_to_end -*-
"""Internationalised domain names and UTF-8 addresses: one form to compare, look up and send them in.

At the side of the journey, used by every stage that looks at a domain: the config (patterns and keys
are written in either form and stored as A-labels), the server (a U-label domain in MAIL/RCPT is checked
here), the policy, the routes, the suppression list, DKIM key lookup and the MX lookup (DNS is asked for
the A-label), and delivery (a domain-only downgrade for a next hop without SMTPUTF8).  In: a domain or
an address as text (Unicode).  Out: the A-label form, or ValueError with the precise reason.

Implements IDNA2008 (RFC 5890, 5891, 5892, 5893) with the UTS #46 mapping (non-transitional: "ß" stays
"ß", as the registries of .de and others want) through the `idna` package, and the rule of RFC 6531
3.3 / RFC 6532 3.2 that a UTF-8 address is `local@domain` with a UTF-8 local part and a domain of
U-labels or A-labels.  The U-label and the A-label form of a domain are the same domain (RFC 5890 2.3.2.1):
wherever two domains are compared they are compared as A-labels, lower case, without a trailing dot.

A local part is never changed here (RFC 5321 2.4: only the destination interprets it; RFC 6532 3.1
recommends NFC but an MTA that normalised silently could deliver to someone else).
"""
from __future__ import annotations

import functools
import unicodedata
from typing import Optional

import idna

MAX_CACHED = 4096


def to_ascii(domain: str) -> str:
    """`domain` as A-labels, lower case: UTS #46 mapped (non-transitional), checked under IDNA2008.
    An all-ASCII domain without A-labels is only lower-cased (its syntax is the caller's check).
    ValueError says exactly what is wrong (RFC 5891 4: a name that fails is not registrable and
    cannot be looked up)."""
    name = domain[:-1] if domain.endswith(".") else domain
    if not name:
        raise ValueError("empty domain")
    if name.isascii() and "xn--" not in name.lower():
        return name.lower()
    try:
        encoded = idna.encode(name, uts46=True, std3_rules=True, transitional=False)
    except idna.IDNAError as e:
        raise ValueError(f"{domain!r} is not a valid internationalised domain name (IDNA2008): {e}") from None
    except UnicodeError as e:         # a lone surrogate and the like
        raise ValueError(f"{domain!r} is not a valid internationalised domain name: {e}") from None
    return encoded.decode("ascii").lower()


@functools.lru_cache(maxsize=MAX_CACHED)
def _key(domain: str) -> str:
    try:
        return to_ascii(domain)
    except ValueError:
        return domain.lower()


def domain_key(domain: str) -> str:
    """How two domains are compared: A-labels, lower case, no trailing dot.  A domain IDNA refuses is
    lower-cased as it is (it can then only ever equal itself)."""
    domain = domain.rstrip(".")
    if domain.isascii() and "xn--" not in domain:
        return domain.lower()             # the common case: no IDNA work, no cache
    return _key(domain)


def to_unicode(domain: str) -> str:
    """The U-label form of `domain` for people to read (a DSN's text); `domain` itself if not valid."""
    try:
        return idna.decode(domain, uts46=True, std3_rules=True)
    except (idna.IDNAError, UnicodeError):
        return domain


def ascii_address(address: str) -> Optional[str]:
    """`local@A-label` when the local part is ASCII (the same mailbox in a form any SMTP server takes,
    RFC 6531 3.3 / RFC 5890), else None: a UTF-8 local part has no ASCII form."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address if address.isascii() else None
    if not local.isascii():
        return None
    try:
        return f"{local}@{to_ascii(domain)}"
    except ValueError:
        return None


def needs_utf8(address: str) -> bool:
    """Whether an envelope address is non-ASCII: SMTPUTF8 or a domain-only downgrade must carry it."""
    return not address.isascii()


def local_needs_utf8(address: str) -> bool:
    """Whether the local part is non-ASCII: only an SMTPUTF8 server can take such an address."""
    return not address.rpartition("@")[0].isascii()


# RFC 6530 10.1 / RFC 6532 3.2: no control characters, C0 or C1 (U+0080-U+009F), in a UTF-8 address;
# U+2028/U+2029 (line and paragraph separators) would break a header line for some readers.
_FORBIDDEN_CATEGORIES = frozenset(("Cc", "Zl", "Zp", "Cs"))


def utf8_problem(text: str) -> Optional[str]:
    """Why a UTF-8 address (already decoded strictly) is unacceptable, or None: a control character
    (C0, C1), a line or paragraph separator, a surrogate."""
    for c in text:
        if not c.isascii() and unicodedata.category(c) in _FORBIDDEN_CATEGORIES:
            return f"the character U+{ord(c):04X} is not allowed in an address"
    return None
