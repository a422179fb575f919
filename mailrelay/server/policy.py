# -*- test-case-name: tests.test_policy, tests.test_source_routes, tests.test_open_relay -*-
"""The relay policy: who may relay what, from the `[[permit]]` rules of tap.conf.

Where it sits in the journey: the SMTP session asks it at MAIL FROM, at each RCPT TO and after DATA,
before anything reaches the spool.  In: an envelope.ClientInfo (peer address, authenticated user), the
envelope addresses, the header block.  Out: None (accepted) or an interfaces.Reply with an RFC 3463
enhanced status code.  Implements the relay decision of RFC 5321 §3.6 (never an open relay), the
sender binding of authenticated clients (RFC 6409 §6.1, "enforce submission rights") and the refusal of
routing forms that could carry mail past the rules (RFC 5321 §3.6.1; source routes are dropped, §4.1.1.3).

Decisions (the contract, docs/config.md, leaves these to us):
- Which rule applies: the first, in file order, whose "who" matches the client.  An authenticated client
  matches only rules with `users` ("*" or its name); if such a rule also lists `networks`, the client
  must connect from one of them too (more fields, narrower rule; config.load refuses such rules, but
  a Permit built in code gets the safe reading).  An unauthenticated client matches only rules
  without `users`, by `anyone` or by its address in `networks` (IPv4-mapped IPv6 unmapped).
  A login never falls back to an IP rule: once a client says who it is, its sender binding applies.
- No rule matches: MAIL is accepted and every RCPT gets 550 5.7.1 "Relay access denied" (the contract
  says "at RCPT"; like Postfix, the refusal comes where relaying is decided, per recipient).
- The null sender <> (bounces, RFC 3464; auto-replies, RFC 3834) is allowed for every client
  a rule matches, whatever its `senders`: it impersonates nobody, and an inbound gateway (`anyone`)
  must accept bounces.  It still counts against the rate limit, its recipients are still limited by
  `recipients`, and the From: header is still held to `senders` where the rule holds it.
- The From: header is held to `senders` when the rule's `check_from_header` says so: by default on
  `users` rules (a login is bound to its senders, RFC 6409 §6.1), not on `networks` rules (a host
  trusted by address, e.g. an application sending on behalf of its customers); `check_from_header = true`
  on a network rule holds it too.  Refused: `550 5.7.1` at the end of data.  A From: its rule's
  `senders` do not cover is relayed when not held, but never signed with our keys (dkim/permission.py).
  `anyone` rules (inbound gateways) never check it: mail from the world carries the world's addresses.
- The rate limit (`messages_per_minute`) is charged at MAIL, after the sender check passed, per
  identity (user name, or the rule for network/anyone clients: all of 10.0.0.0/8 share one budget).
  A client no rule matches is charged too, per IP (IPv6 per /64, ratelimit.client_key): its only
  mail that can be accepted goes to the postmaster, and that must not be a free flood.
- With `[cluster] redis` the limiter is cluster.shared.SharedRateLimiter: one budget per identity for
  every relay naming that Redis, and `check_sender` returns a Deferred (fired within the link's
  bounded wait) with the same answer.
- Budgets outlive a reload: the service hands each new policy the limiter of the old one
  (`limiter=`), and the new `messages_per_minute` applies to the buckets already spent.
- LDAP logins are case-insensitive (the directory compares them so): such a user arrives case-folded
  (`ClientInfo.user_folded`) and a `users` entry matches it when the entry case-folds to it.
  Password-file names compare exactly.
- Routing tricks (`%`, `!`, several `@`, quoted local parts hiding them, address literals, malformed
  domains) are refused for every client, whatever its `recipients`: legitimate mail does not need them
  and their only use left is to smuggle mail through a relay.  A source route never gets here: the
  parser (server.addresses) drops the route, and the mailbox after it is judged like any other.
"""
from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from email import policy as email_policy
from email.errors import NonASCIILocalPartDefect
from email.parser import Parser
from typing import Iterable, Optional

from twisted.internet import defer
from zope.interface import implementer

from mailrelay import config, idn
from mailrelay.envelope import ClientInfo
from mailrelay.interfaces import IRateCounter, IRelayPolicy, Reply
from mailrelay.server.ratelimit import RateLimiter, client_key

RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
SENDER_DENIED = Reply(553, "5.7.1", "Sender address not allowed for this client")
FROM_DENIED = Reply(550, "5.7.1", "From header not allowed for this user")
FROM_DENIED_NETWORK = Reply(550, "5.7.1", "From header not allowed for clients of this network")
RATE_LIMITED = Reply(450, "4.7.1", "Too many messages from this client, try again later")

# RFC 5322 §3.2.3 atext, which RFC 6531 §3.3 extends with any non-ASCII UTF-8 character.
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_LDH = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
# Characters that separate or route once a quoted local part is unquoted by some later hop.
_QUOTED_SPECIALS = frozenset(',;:<>()[]"\\')
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


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


def _mapped_to_ipv4(net: config.IPNetwork) -> config.IPNetwork:
    """`::ffff:10.0.0.0/104` in the config means 10.0.0.0/8: client addresses are unmapped too."""
    if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(_IPV4_MAPPED):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


@functools.lru_cache(maxsize=4096)    # asked at MAIL and at every RCPT of every session: parse once per peer
def client_ip(address: str) -> Optional[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The peer address as an ipaddress object, IPv4-mapped IPv6 (`::ffff:10.1.2.3`) unmapped."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class _Rule:
    index: int
    permit: config.Permit
    networks: tuple
    senders: AddressPatterns
    recipients: AddressPatterns
    folded_users: frozenset

    def matches(self, client: ClientInfo) -> bool:
        if client.user is not None:
            users = self.permit.users
            named = client.user in users or (client.user_folded and client.user in self.folded_users)
            return ("*" in users or named) and (not self.networks or self._near(client))
        if self.permit.users:
            return False
        return self.permit.anyone or self._near(client)

    def _near(self, client: ClientInfo) -> bool:
        ip = client_ip(client.address)
        return ip is not None and any(ip in net for net in self.networks)   # False across versions


@implementer(IRelayPolicy)
class PermitPolicy:
    """IRelayPolicy over the `[[permit]]` rules and `limits.messages_per_minute` (see module docstring)."""

    def __init__(self, permits: tuple[config.Permit, ...], limits: config.Limits, clock=None,
                 limiter: Optional[IRateCounter] = None):
        """`limiter`: the budgets to charge (those of the policy this one replaces at a reload, so a
        reload hands nobody a fresh budget); a new one when None."""
        self._rules = tuple(
            _Rule(i, p, tuple(_mapped_to_ipv4(n) for n in p.networks),
                  AddressPatterns.parse(p.senders), AddressPatterns.parse(p.recipients),
                  frozenset(u.casefold() for u in p.users))
            for i, p in enumerate(permits))
        self._rate = limits.messages_per_minute
        if self._rate > 0 and limiter is None:
            limiter = RateLimiter(self._rate, 60.0, clock)
        self.limiter = limiter                       # kept even while the limit is off, for the next reload
        self._limiter = limiter if self._rate > 0 else None

    def _rule_for(self, client: ClientInfo) -> Optional[_Rule]:
        return next((rule for rule in self._rules if rule.matches(client)), None)

    def identify(self, client: ClientInfo) -> Optional[str]:
        rule = self._rule_for(client)
        if rule is None:
            return None
        return client.user if client.user is not None else f"permit[{rule.index}]"

    def check_sender(self, client: ClientInfo, sender: str) -> Optional[Reply]:
        rule = self._rule_for(client)
        if rule is not None and sender and not rule.senders.allows(sender):
            return SENDER_DENIED
        # User names cannot contain ':', so "user:x" never collides with a rule's or an address's key.
        if client.user is not None:
            key = f"user:{client.user}"
        elif rule is not None:
            key = f"permit[{rule.index}]"
        else:
            # No rule: every RCPT but the postmaster's gets 550 5.7.1 (relay access denied), and the
            # postmaster's is counted here, per IP (IPv6 per /64), like any other client's mail.
            key = f"ip:{client_key(client.address)}"
        if self._limiter is None:
            return None
        allowed = self._limiter.allow(key, self._rate)
        if isinstance(allowed, defer.Deferred):        # a shared limiter (cluster.shared): bounded wait
            return allowed.addCallback(lambda ok: None if ok else RATE_LIMITED)
        return None if allowed else RATE_LIMITED

    def check_recipient(self, client: ClientInfo, sender: str, recipient: str) -> Optional[Reply]:
        rule = self._rule_for(client)
        if rule is None:
            return RELAY_DENIED
        trick = routing_trick(recipient)
        if trick is not None:
            return Reply(550, "5.7.1", f"Relay access denied ({trick})")
        if not rule.recipients.allows(recipient):
            return RELAY_DENIED
        return None

    def check_message(self, client: ClientInfo, sender: str, headers: bytes) -> Optional[Reply]:
        rule = self._rule_for(client)
        if rule is None:
            # A login no rule names is refused; a stranger got here only through the postmaster exception.
            return RELAY_DENIED if client.user is not None else None
        if not rule.permit.holds_from_header or rule.senders.anything:
            return None
        # No From: at all (RFC 5322 §3.6 requires one), a group with no address, or a header we
        # cannot parse cleanly: nothing we could hold to `senders`, so refused.
        addresses = from_addresses(headers)
        if not addresses or not all(rule.senders.allows(a) for a in addresses):
            return FROM_DENIED if client.user is not None else FROM_DENIED_NETWORK
        return None

    def signing_senders(self, client: ClientInfo) -> tuple[str, ...]:
        """The `senders` of the rule that accepts `client`'s mail, whose From: addresses it covers are
        ours to DKIM-sign; () for an `anyone` rule or no rule: a stranger's mail is never signed."""
        rule = self._rule_for(client)
        if rule is None or rule.permit.anyone:
            return ()
        return rule.permit.senders


def from_addresses(headers: bytes) -> Optional[list[str]]:
    """Every address in every From: header, or None when a From: header does not parse cleanly.

    Junk never raises.  A header the stdlib parser had to guess at (`a@ok.example)<b@evil.example>`,
    two angle addresses, obsolete routes) is refused: a mail reader may show the address it did not
    pick (CVE-2023-27043 class), so such a From: cannot be checked."""
    try:
        text = headers.decode("utf-8", "surrogateescape")    # RFC 6532: UTF-8 headers
        message = Parser(policy=email_policy.default).parsestr(text, headersonly=True)
        found = []
        for header in message.get_all("From", []):
            if any(not isinstance(d, NonASCIILocalPartDefect) for d in header.defects):
                return None
            found.extend(a.addr_spec for a in header.addresses)
        return found
    except Exception:       # the email package can raise on pathological input; refuse, never crash
        return None
