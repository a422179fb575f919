# -*- test-case-name: tests.test_routes, tests.test_throttle, tests.test_connection_reuse -*-
"""Routes: which next hop a recipient's delivery attempt goes to (config.md `[[route]]`).

Journey: the scheduler asks `Router.route(sender, recipient, attempts)` before each attempt.
In: the envelope sender ("" for the null reverse-path), one recipient, the failed attempts so far.
Out: the first matching config.Route (its `transport` names a smarthost), or None for direct MX delivery
(RFC 5321 section 5.1).  Like mox's routes and Postfix's transport_maps, first match wins, and
`after_attempts` lets a route apply only once direct delivery has failed that many times.

Patterns (case-insensitive, trailing dots ignored; a U-label and its A-label are one domain, RFC 5890,
so both sides are compared as A-labels):
  recipients: "example.com" the domain itself; "*.example.com" its subdomains only; "*" any.
  senders:    the same, plus an exact address "user@example.com"; the null sender matches only "*".
"""
from __future__ import annotations

from typing import Optional

from zope.interface import implementer

from mailrelay import config
from mailrelay.envelope import domain_of
from mailrelay.idn import domain_key
from mailrelay.interfaces import IRouter


def domain_matches(pattern: str, domain: str) -> bool:
    """Whether `domain` (lower-case) matches a domain pattern: "*", "*.example.com" or "example.com"."""
    if pattern == "*":
        return True
    if not domain:
        return False
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


def sender_matches(pattern: str, sender: str) -> bool:
    """Whether the envelope sender matches a sender pattern (domain pattern or exact address)."""
    if pattern == "*":
        return True
    if not sender:
        return False                      # the null reverse-path <> has no domain: only "*" takes it
    if "@" in pattern:
        local, _, domain = sender.rpartition("@")
        return f"{local.lower()}@{domain_key(domain)}" == pattern
    return domain_matches(pattern, domain_of(sender))


def _normalise(pattern: str) -> str:
    pattern = pattern.strip()
    local, at, domain = pattern.rpartition("@")
    wild = domain.startswith("*.")
    domain = domain_key(domain[2:] if wild else domain)
    if domain == "*":
        return "*"
    domain = ("*." if wild else "") + domain
    return f"{local.lower()}@{domain}" if at else domain


@implementer(IRouter)
class Router:
    """First-match routing over the configured routes (patterns normalised once, here)."""

    def __init__(self, routes: tuple[config.Route, ...]):
        self._routes = tuple(
            (route, tuple(map(_normalise, route.recipients)), tuple(map(_normalise, route.senders)))
            for route in routes
        )

    def route(self, sender: str, recipient: str, attempts: int) -> Optional[config.Route]:
        """The first route matching this sender, recipient and attempt count; None means direct MX."""
        domain = domain_of(recipient)
        for route, recipients, senders in self._routes:
            if attempts < route.after_attempts:
                continue
            if any(domain_matches(p, domain) for p in recipients) and any(sender_matches(p, sender) for p in senders):
                return route
        return None
