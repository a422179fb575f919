# -*- test-case-name: tests.test_policy, tests.test_smtputf8, tests.test_dkim_permit -*-
"""What a mailbox may look like where relaying is decided, beside the journey: the routing tricks refused
for every client (RFC 5321 §3.6.1), the `senders` / `recipients` patterns of `[[permit]]`, and the
addresses of a message's From: header.  The permit policy (server.policy) and the DKIM permission
(dkim.permission) both judge addresses with these, so neither imports the other."""
from __future__ import annotations

from dataclasses import dataclass
from email import policy as email_policy
from email.errors import NonASCIILocalPartDefect
from email.parser import Parser
from typing import Iterable, Optional

from mailrelay import idn

# RFC 5322 §3.2.3 atext, which RFC 6531 §3.3 extends with any non-ASCII UTF-8 character.
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_LDH = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
# Characters that separate or route once a quoted local part is unquoted by some later hop.
_QUOTED_SPECIALS = frozenset(',;:<>()[]"\\')


def normal_domain(domain: str) -> Optional[str]:
    """`domain` lower-cased in ASCII (IDNA2008 A-labels, mailrelay.idn), or None when it is not a valid
    host domain: LDH labels of 1-63 octets (RFC 1035 §2.3.1, RFC 5890), at most 253 octets, at least two
    labels, and a top-level label that is not all digits (RFC 3696 §2: `1.2.3.4` is not a domain)."""
    if not domain or domain.endswith("."):
        return None
    try:
        domain = idn.to_ascii(domain)
    except ValueError:
        return None
    labels = domain.split(".")
    if len(domain) > 253 or len(labels) < 2 or labels[-1].isdigit():
        return None
    for label in labels:
        if not 0 < len(label) <= 63 or label[0] == "-" or label[-1] == "-" or not _LDH.issuperset(label):
            return None
    return domain


def _split_quoted(address: str) -> tuple[Optional[str], str]:
    """`"local"@rest` → (unescaped local, rest after the closing quote), or (None, '') if unbalanced."""
    chars, i = [], 1
    while i < len(address):
        c = address[i]
        if c == "\\" and i + 1 < len(address):
            chars.append(address[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(chars), address[i + 1:]
        chars.append(c)
        i += 1
    return None, ""


def routing_trick(address: str) -> Optional[str]:
    """Why `address` must never be relayed, or None when it is a plain `local@domain`."""
    if any(ord(c) < 32 or ord(c) == 127 for c in address):
        return "control character in address"
    if address.startswith("@"):
        # A source route `@a,@b:user@c` (RFC 5321 §4.1.1.3, Appendix C): a relay that judged `a` would
        # see the mail carried on to `c`.  The SMTP parser (server.addresses) already drops a valid
        # route and hands on `user@c`; whatever still starts with "@" here is refused.
        return "source route"
    if address.startswith('"'):
        local, rest = _split_quoted(address)
        if local is None or not rest.startswith("@"):
            return "malformed quoted local part"
        domain = rest[1:]
        # `"user@evil"@allowed`, `"user%evil"@allowed`: once a later hop strips the quotes, the
        # hidden `@`, `%` or `!` routes the mail to a domain we never checked; commas and angle
        # brackets split it into several addresses (sendmail-style lists).
        if _QUOTED_SPECIALS.intersection(local):
            return "special characters in quoted local part"
    else:
        local, _, domain = address.partition("@")
        if local and not _is_dot_atom(local):
            return "malformed local part"
    if not local or not domain:
        return "malformed address"
    if "@" in local or "@" in domain:
        # `user@x@y` is no RFC 5321 §4.1.2 Mailbox: parsers disagree on which `@` counts, so we
        # would check one domain while another hop delivers to the other.
        return "more than one @"
    if "%" in local:
        # The percent hack (RFC 1123 §5.2.16): `user%evil.example@allowed` is delivered by a
        # percent-honouring host at `allowed` on to `evil.example`.
        return "'%' routing in local part"
    if "!" in local:
        # UUCP bang path (RFC 976): `evil!user@allowed` means "via allowed to host evil".
        return "'!' routing in local part"
    if domain.startswith("["):
        # An address literal (RFC 5321 §4.1.3) names a host, not a domain: it bypasses every
        # domain-based rule and route, and lets a client aim the relay at any IP (internal ones too).
        return "address literal"
    if normal_domain(domain) is None:
        # Anything else (dotless names like `localhost`, a trailing dot, bad labels, bare IPs) is
        # not a domain we could check against `recipients` or look up safely.
        return "invalid domain"
    return None


def _is_dot_atom(local: str) -> bool:
    """RFC 5322 §3.2.3 dot-atom-text (with RFC 6531 UTF-8): atoms separated by single dots."""
    return all(atom and all(c in _ATEXT or not c.isascii() for c in atom) for atom in local.split("."))


@dataclass(frozen=True)
class AddressPatterns:
    """A `senders` or `recipients` list: "*", "example.org" (the domain itself), "*.example.org" (its
    subdomains) or "user@example.org" (that address; local part exact, domain case-insensitive)."""
    anything: bool
    domains: frozenset
    parents: tuple
    addresses: frozenset

    @classmethod
    def parse(cls, patterns: Iterable[str]) -> "AddressPatterns":
        patterns = tuple(patterns)
        domains, parents, addresses = set(), [], set()
        for pattern in patterns:
            local, at, domain = pattern.rpartition("@")
            domain = _domain_key(domain.removeprefix("*."))
            if at:
                addresses.add((local, domain))
            elif pattern.startswith("*."):
                parents.append("." + domain)
            elif pattern != "*":
                domains.add(domain)
        return cls("*" in patterns, frozenset(domains), tuple(parents), frozenset(addresses))

    def allows(self, address: str) -> bool:
        if self.anything:
            return True
        local, at, domain = address.rpartition("@")
        if not at:
            return False
        domain = _domain_key(domain)
        return (domain in self.domains or (local, domain) in self.addresses
                or any(domain.endswith(parent) for parent in self.parents))


def _domain_key(domain: str) -> str:
    """How domains are compared: IDNA A-labels, lower case; left as given (lowered) if not valid."""
    return normal_domain(domain) or domain.lower()


def from_addresses(headers: bytes) -> Optional[list[str]]:
    """Every address in every From: header, or None when a From: header does not parse cleanly.

    Junk never raises.  A header the stdlib parser had to guess at (`a@ok.example)<b@evil.example>`,
    two angle addresses, obsolete routes) is refused: a mail reader may show the address it did not
    pick (CVE-2023-27043 class), so such a From: cannot be checked."""
    try:
        text = headers.decode("utf-8", "surrogateescape")    # RFC 6532: UTF-8 headers
        message = Parser(policy=email_policy.default).parsestr(text, headersonly=True)
        found: list[str] = []
        for header in message.get_all("From", []):
            if any(not isinstance(d, NonASCIILocalPartDefect) for d in header.defects):
                return None
            found.extend(a.addr_spec for a in header.addresses)
        return found
    except Exception:       # the email package can raise on pathological input; refuse, never crash
        return None
