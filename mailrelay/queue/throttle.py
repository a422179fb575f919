# -*- test-case-name: tests.test_throttle, tests.test_throttle_config, tests.test_throttle_end_to_end -*-
"""Per-destination traffic shaping (`[[throttle]]`): a smooth message rate, a cap on connections at once,
and pauses after a destination says "slow down".

Part of the delivery stage, beside the scheduler (queue.scheduler, queue.concurrency).  In: the
recipient domain of a delivery that is about to start, and the replies of the deliveries that ended.
Out: when that delivery may start, and whether the destination is paused.  A destination is one
recipient domain that a rule matches — also when a route sends it through a smarthost — and every
domain a rule matches is a destination of its own, with its own rate, connections and pauses.

- `ThrottleRules`: the configured rules, first match wins; domain patterns as `[[route]] recipients`
  ("example.com" the domain itself, "*.example.com" its subdomains, "*" any).
- `slows_down`: whether a reply asks the relay to slow down: a 421 from the next hop at any stage (RFC 5321
  §3.8, §4.2.3: the server is closing the transmission channel) or a temporary reply with an RFC 3463 X.7.x
  (security or policy) status, the class the large providers use for their rate limits (421 4.7.0,
  450 4.7.28, 451 4.7.1 ...).  Only what the next hop itself said counts: the relay's own verdicts (no
  connection, a timeout, a failed TLS handshake, no OAuth2 token) never pause a destination.
- `LocalThrottle`: the state, for one relay, behind the IThrottle seam (mailrelay.interfaces).  The rate is
  GCRA with no burst: the destination's "theoretical arrival time" moves 60/N seconds on with each
  message, and a message may start once that time has come.  A pause lasts `pause`, doubling for each
  pause in a row (at most 1 h); a delivery that started after the latest pause began and was accepted
  ends the row.  Replies from deliveries that were already under way when a pause began belong to that
  pause: they neither extend nor double it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from zope.interface import implementer

from mailrelay.config import Throttle
from mailrelay.config.model import MAX_THROTTLE_PAUSE
from mailrelay.interfaces import IThrottle
from mailrelay.crossthread import read_unlocked

PRUNE_EVERY = 256          # starts between two sweeps of destinations that have nothing left to remember
QUIET_AFTER = 2 * MAX_THROTTLE_PAUSE   # seconds after a pause ended with no news: the row is forgotten
SAME_PAUSE = 1.0           # seconds: pauses another relay reports this close to ours are ours (adopt)


def _normalise(pattern: str) -> str:
    return pattern.strip().lower().rstrip(".")


def _matches(pattern: str, domain: str) -> bool:
    # As queue.routes.domain_matches: "*" any, "*.example.com" subdomains only, else the domain itself.
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


class ThrottleRules:
    """First-match lookup of the `[[throttle]]` rule for a recipient domain."""

    def __init__(self, rules: tuple[Throttle, ...] = ()):
        self.rules = tuple(rules)
        self._patterns = tuple((rule, tuple(map(_normalise, rule.domains))) for rule in self.rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def match(self, domain: str) -> Optional[Throttle]:
        domain = _normalise(domain)
        if not domain:
            return None
        for rule, patterns in self._patterns:
            if any(_matches(p, domain) for p in patterns):
                return rule
        return None


def slows_down(result) -> bool:
    """Whether a RecipientResult is the next hop asking us to slow down (see the module's docstring)."""
    if not getattr(result, "remote_reply", False):
        return False
    # RFC 5321 §3.8: 421 closes the channel, "try again later"; RFC 3463 §3.8: 4.7.x, temporary policy.
    return result.code == 421 or (400 <= result.code < 500 and result.status.startswith("4.7."))


@dataclass(frozen=True)
class DestinationStatus:
    """What the queue CLI and the metrics show of one destination."""
    destination: str
    messages_per_minute: int
    connections_cap: int           # 0: no cap of its own
    connections: int               # open now
    next_start: float              # the rate's next free start (<= now: at once)
    paused_until: float            # > now: paused
    pauses_in_a_row: int
    reason: str                    # the reply that began the latest pause

    def paused(self, now: float) -> bool:
        return self.paused_until > now


@dataclass
class _Destination:
    rule: Throttle
    tat: float = 0.0                       # GCRA: when the next message may start
    connections: int = 0
    paused_at: Optional[float] = None      # when the latest pause began
    paused_until: float = 0.0
    in_a_row: int = 0                      # pauses since the last accepted delivery
    reason: str = field(default="")

    def idle(self, now: float) -> bool:
        """Nothing here that an absent entry would not say just as well."""
        if self.connections or self.tat > now or self.paused_until > now:
            return False
        return not self.in_a_row or now > self.paused_until + QUIET_AFTER


@implementer(IThrottle)
class LocalThrottle:
    """IThrottle for one relay, in memory.  Memory is bounded by the destinations with something to
    remember: an idle one (no connection, its rate position passed, no pause in force or recent) is
    dropped, as it behaves exactly like one never seen."""

    def __init__(self) -> None:
        self._destinations: dict[str, _Destination] = {}
        self._starts = 0

    def _get(self, destination: str, rule: Throttle) -> _Destination:
        entry = self._destinations.get(destination)
        if entry is None:
            entry = self._destinations[destination] = _Destination(rule)
        entry.rule = rule                    # a reload's rule applies at once, to the state kept
        return entry

    def ready_at(self, destination: str, rule: Throttle, now: float) -> Optional[float]:
        entry = self._destinations.get(destination)
        if entry is None:
            return now
        if entry.paused_until > now:
            return max(entry.paused_until, entry.tat if rule.interval else 0.0)
        if rule.connections and entry.connections >= rule.connections:
            return None
        if rule.interval and entry.tat > now:
            return entry.tat
        return now

    def start(self, destination: str, rule: Throttle, now: float) -> None:
        entry = self._get(destination, rule)
        entry.connections += 1
        if rule.interval:
            # GCRA, no burst tolerance: one message per interval, however long the destination was idle.
            entry.tat = max(entry.tat, now) + rule.interval
        self._starts += 1
        if self._starts % PRUNE_EVERY == 0:
            self._prune(now)

    def finish(self, destination: str) -> None:
        entry = self._destinations.get(destination)
        if entry is not None and entry.connections:
            entry.connections -= 1

    def slowed(self, destination: str, rule: Throttle, started: float, now: float,
               reply: str) -> tuple[float, bool]:
        entry = self._get(destination, rule)
        if entry.paused_at is not None and started <= entry.paused_at:
            return entry.paused_until, False           # under way when the pause began: the same news
        if rule.pause <= 0:
            return now, False
        entry.in_a_row += 1
        length = min(rule.pause * 2 ** min(entry.in_a_row - 1, 32), MAX_THROTTLE_PAUSE)
        entry.paused_at, entry.paused_until, entry.reason = now, now + length, reply
        return entry.paused_until, True

    def succeeded(self, destination: str, started: float) -> None:
        entry = self._destinations.get(destination)
        if entry is not None and (entry.paused_at is None or started > entry.paused_at):
            entry.in_a_row = 0

    def pauses_in_a_row(self, destination: str) -> int:
        """The pauses in a row this relay counts for `destination` (0: none, or ended by a success)."""
        entry = self._destinations.get(destination)
        return entry.in_a_row if entry is not None else 0

    def adopt(self, destination: str, rule: Throttle, began: float, until: float, in_a_row: int,
              reason: str, now: float) -> None:
        """A pause that began at `began` and lasts until `until` (times on this clock) as another relay
        sharing the destination reports it (mailrelay.cluster.throttle): from now on this relay holds
        the destination back until then, and a reply to a delivery that began before it belongs to it.
        A pause this relay knows already (it began within SAME_PAUSE of this one's start) keeps its
        start; an older one keeps this relay's start and row.  Either way the later end holds."""
        entry = self._destinations.get(destination)
        if entry is None:
            if until <= now and not in_a_row:
                return                        # nothing to remember
            entry = self._get(destination, rule)
        if entry.paused_at is None or began > entry.paused_at + SAME_PAUSE:
            entry.paused_at, entry.in_a_row = began, in_a_row
        elif began >= entry.paused_at - SAME_PAUSE:
            entry.in_a_row = max(entry.in_a_row, in_a_row)
        if until > entry.paused_until:          # in force for the cluster: held back here too, to its end
            entry.paused_until, entry.reason = until, reason or entry.reason

    def status(self, now: float) -> list[DestinationStatus]:
        entries = read_unlocked(lambda: list(self._destinations.items()), None)
        if entries is None:
            return []
        return [DestinationStatus(name, e.rule.messages_per_minute, e.rule.connections, e.connections, e.tat,
                                  e.paused_until, e.in_a_row, e.reason)
                for name, e in sorted(entries) if not e.idle(now)]

    def _prune(self, now: float) -> None:
        for name in [name for name, entry in self._destinations.items() if entry.idle(now)]:
            del self._destinations[name]
