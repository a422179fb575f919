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
from typing import Optional

from twisted.internet import defer
from zope.interface import implementer

from mailrelay import config
from mailrelay.envelope import ClientInfo
from mailrelay.interfaces import IRateCounter, IRelayPolicy, Reply
from mailrelay.mailboxes import AddressPatterns, from_addresses, routing_trick
from mailrelay.server.ratelimit import RateLimiter, client_key

RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
SENDER_DENIED = Reply(553, "5.7.1", "Sender address not allowed for this client")
FROM_DENIED = Reply(550, "5.7.1", "From header not allowed for this user")
FROM_DENIED_NETWORK = Reply(550, "5.7.1", "From header not allowed for clients of this network")
RATE_LIMITED = Reply(450, "4.7.1", "Too many messages from this client, try again later")

_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


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

    def check_sender(self, client: ClientInfo, sender: str) -> Optional[Reply] | defer.Deferred[Optional[Reply]]:
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
