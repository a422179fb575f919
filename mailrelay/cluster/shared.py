# -*- test-case-name: tests.test_cluster_redis, tests.test_cluster_session, tests.test_cluster_link -*-
"""The limits every relay naming one Redis shares, each with this relay's own counters behind it.

Where it sits: at the side of the journey; the receiving side holds these where it held the local
ones (server/policy.py's limiter, server/factory.py's AUTH window, spool/suppression.py's list).

- `SharedRateLimiter` (IRateCounter): `messages_per_minute`, one GCRA key per identity
  (`<prefix>rate:<identity key>`) with burst = the rate: the same token bucket as
  server/ratelimit.RateLimiter, counted once for the cluster.
- `SharedFailureWindow` (IAttemptWindow): `auth_failures_per_minute`, a sliding log per client key
  (`<prefix>auth:<ip or /64>`): an attempt counted when its check starts, a success refunding its own.
- `SharedSuppression` (ISuppressionCheck): the suppression list, one key per address
  (`<prefix>suppression:<address>`), expiring with its entry.

While Redis answers, it decides; the local counters are charged too, so a fallback starts from this
relay's own share rather than from a fresh budget.  While it does not (RedisLink: down, or no reply
within the bounded wait), the local counters decide alone, and each such decision is counted in
`mailrelay_cluster_redis_fallbacks_total`.  Every method either answers at once (down) or returns a
Deferred that fires within the bounded wait; none ever fails.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Optional

from twisted.internet import defer
from zope.interface import implementer

from mailrelay.cluster.redis import RedisLink, RedisUnavailable
from mailrelay.interfaces import IAttemptWindow, IRateCounter, ISuppressionCheck, Reply
from mailrelay.logger import Logger
from mailrelay.spool.suppression import Entry, address_key

RATE_PERIOD = 60.0
MAX_TRACKED = 10000

log = Logger(namespace="mailrelay.cluster")


def _fallback(link: RedisLink, what: str, failure) -> None:
    if not failure.check(RedisUnavailable):
        log.failure("cluster: Redis refused the {what} call; decided locally", failure, what=what)
    link.fell_back(what)


@implementer(IRateCounter)
class SharedRateLimiter:
    """`messages_per_minute` for the cluster (module docstring); `local` a RateLimiter."""

    def __init__(self, link: RedisLink, local):
        self.link, self.local = link, local

    @property
    def rate(self) -> int:
        return self.local.rate

    def allow(self, key: str, rate: Optional[int] = None):
        rate = rate if rate is not None else self.local.rate
        if not self.link.up:
            self.link.fell_back("rate")
            return self.local.allow(key, rate)
        d = self.link.evalsha("gcra", [self.link.key("rate", key)], ["", rate, RATE_PERIOD, rate, 1])

        def decided(reply):
            allowed = bool(reply[0])
            if allowed:
                self.local.allow(key, rate)       # this relay's share, for a fallback
            return allowed

        def local(failure):
            _fallback(self.link, "rate", failure)
            return self.local.allow(key, rate)
        return d.addCallbacks(decided, local)


@implementer(IAttemptWindow)
class SharedFailureWindow:
    """`auth_failures_per_minute` for the cluster (module docstring); `local` a server.factory.FailureWindow.
    `exhausted` (asked before an AUTH exchange starts) is answered from what this relay knows: the
    local window and the last shared count seen for the key; the shared count itself is checked when
    the attempt is recorded, before any password is."""

    def __init__(self, link: RedisLink, local, window: float = 60.0, max_keys: int = MAX_TRACKED):
        self.link, self.local = link, local
        self._window = window
        self._max_keys = max_keys
        self._members: OrderedDict[str, list] = OrderedDict()     # key -> our attempts' members, newest last
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()   # key -> (shared count, when)

    @property
    def limit(self) -> int:
        return self.local.limit

    def set_limit(self, limit: int) -> None:
        self.local.set_limit(limit)

    def over_limit(self, count: int) -> bool:
        return self.local.over_limit(count)

    def count(self, key: str) -> int:
        return max(self.local.count(key), self._shared_count(key))

    def exhausted(self, key: str) -> bool:
        return self.local.limit > 0 and self.count(key) >= self.local.limit

    def record(self, key: str):
        local_count = self.local.record(key)
        if self.local.limit <= 0:
            return local_count          # no limit: nothing to share
        if not self.link.up:
            self.link.fell_back("auth")
            return local_count
        member = self.link.unique()
        d = self.link.evalsha("record", [self.link.key("auth", key)], ["", self._window, self.local.limit, member])

        def counted(count):
            count = int(count)
            self._remember(self._members, key, member)
            self._note(key, count)
            return count

        def local(failure):
            _fallback(self.link, "auth", failure)
            return local_count
        return d.addCallbacks(counted, local)

    def refund(self, key: str) -> None:
        self.local.refund(key)
        members = self._members.get(key)
        member = members.pop() if members else ""
        if members is not None and not members:
            del self._members[key]
        seen = self._seen.get(key)
        if seen is not None:
            self._seen[key] = (max(0, seen[0] - 1), seen[1])
        if not self.link.up or not member:
            return      # an attempt Redis never counted (it was away) takes nothing back there
        d = self.link.evalsha("refund", [self.link.key("auth", key)], [member])
        d.addErrback(lambda failure: _fallback(self.link, "auth", failure))

    def _shared_count(self, key: str) -> int:
        seen = self._seen.get(key)
        if seen is None:
            return 0
        count, when = seen
        if self.link.seconds() - when >= self._window:
            del self._seen[key]
            return 0
        return count

    def _note(self, key: str, count: int) -> None:
        self._seen.pop(key, None)
        self._seen[key] = (count, self.link.seconds())
        while len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)

    def _remember(self, table: OrderedDict, key: str, member: str) -> None:
        members = table.pop(key, None) or []
        members.append(member)
        del members[:-(self.local.limit + 1)]
        table[key] = members
        while len(table) > self._max_keys:
            table.popitem(last=False)


@implementer(ISuppressionCheck)
class SharedSuppression:
    """The suppression list for the cluster: `journal` (spool.suppression.SuppressionList) is this relay's
    own, Redis the cluster's.  How they combine at RCPT (docs/config.md, `[cluster]`): an address is
    refused when either holds an entry in force for it, except that a removal recorded in Redis lifts
    every entry older than the removal (so `mailrelay suppression remove` on one relay lifts it on all);
    an address that bounced again after the removal is refused again.  Redis down: the journal alone."""

    def __init__(self, link: RedisLink, journal):
        self.link, self.journal = link, journal

    def refusal(self, address: str):
        """None, a Reply (550 5.1.1), or a Deferred firing with one of them."""
        if not self.link.up:
            self.link.fell_back("suppression")
            return self.journal.refusal(address)
        d = self.link.call("GET", self.link.key("suppression", address_key(address)))
        d.addCallback(lambda raw: self._combine(address, raw))

        def local(failure):
            _fallback(self.link, "suppression", failure)
            return self.journal.refusal(address)
        return d.addErrback(local)

    def _combine(self, address: str, raw) -> Optional[Reply]:
        local = self.journal.lookup(address)
        record = _record(raw)
        if record is None:
            return self.journal.refusal(address)
        if record.get("op") == "remove":
            lifted = float(record.get("time", 0))
            return self.journal.refusal(address) if local is not None and local.since > lifted else None
        try:
            shared = Entry.from_record(record)
        except (KeyError, TypeError, ValueError):
            return self.journal.refusal(address)
        if self.journal.expires(shared) <= self.link.seconds():
            return self.journal.refusal(address)
        newest = shared if local is None or shared.since >= local.since else local
        return self.journal.refusal_for(address, newest)

    def publish(self, record: dict) -> defer.Deferred:
        """Put one journal record ("add" or "remove") into Redis, expiring with it; never fails."""
        return publish(self.link, record, self.journal.duration)

    def size(self) -> int:
        return self.journal.size()


def _record(raw) -> Optional[dict]:
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def redis_record(record: dict, duration: float, now: float) -> Optional[tuple[str, str, int]]:
    """(address key, JSON value, TTL in ms) for one journal record, or None when it is over already.
    An add lives until its entry expires; a removal as long as an entry it lifts could (`duration`)."""
    address = address_key(str(record.get("address", "")))
    if record.get("op") == "add":
        ttl = float(record.get("since", now)) + duration - now
    elif record.get("op") == "remove":
        ttl = duration
    else:
        return None
    if ttl <= 0 or not address:
        return None
    return address, json.dumps(record, ensure_ascii=False, separators=(",", ":")), max(1, int(ttl * 1000))


def share_journal(link: RedisLink, journal) -> defer.Deferred:
    """Each entry in force in this relay's journal, put into Redis unless Redis already holds a record
    for its address (SET NX: a newer entry or a removal there wins).  Run whenever the link comes up:
    entries from before the cluster, or from while Redis was away or restarted empty, are shared."""
    return defer.DeferredList([publish(link, entry.record(), journal.duration, only_new=True)
                               for entry in journal.entries()], consumeErrors=True)


def publish(link: RedisLink, record: dict, duration: float, only_new: bool = False) -> defer.Deferred:
    """SET `record` under its address key with its TTL (with `only_new`, only where Redis holds none);
    a failure is counted as a fallback, never raised."""
    value = redis_record(record, duration, link.seconds())
    if value is None:
        return defer.succeed(None)
    address, text, ttl = value
    if not link.up:
        link.fell_back("suppression")
        return defer.succeed(None)
    d = link.call("SET", link.key("suppression", address), text, "PX", ttl, *(["NX"] if only_new else []))
    return d.addErrback(lambda failure: _fallback(link, "suppression", failure))
