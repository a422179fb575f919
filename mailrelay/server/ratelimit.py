# -*- test-case-name: tests.test_policy, tests.test_cluster_gcra, tests.test_cluster_redis -*-
"""Per-identity rate limiting: how many messages one client identity may start per minute.

Where it sits in the journey: the relay policy (mailrelay.server.policy) asks it at MAIL FROM, once the
client has been identified (a user name, or the permit rule that matched, e.g. "permit[0]").
In: an identity string and the time from an injected clock.  Out: allowed or not (the policy turns "not"
into a temporary 450 4.7.1, RFC 3463 §3.8, so a well-behaved client retries later).

The limiter is a token bucket per key: `rate` tokens, refilled continuously over `per` seconds, one taken
per message.  Each check is O(1).  Memory is bounded: keys live in least-recently-used order, a key whose
bucket has refilled completely is indistinguishable from a key never seen and is dropped, and beyond
`max_keys` the least recently used key is dropped even if its bucket is not yet full.

A reload keeps the limiter (and so every identity's spent budget) and only changes the rate: `allow`
takes the rate in force, so a policy built from a new config uses the buckets the old one filled.

`client_key` is how every per-IP count (connections per IP, AUTH attempts, the messages of clients
no rule names) keys a peer: an IPv4 address as it is, an IPv6 address by its /64.
"""
from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mailrelay.interfaces import IRateCounter


IPV6_CLIENT_PREFIX = 64


@functools.lru_cache(maxsize=4096)     # asked at every connection, AUTH and MAIL: parse once per peer
def client_key(address: str) -> str:
    """The key per-IP limits count `address` under: an IPv4 address (IPv4-mapped IPv6 unmapped) as it is,
    an IPv6 address as its /64 ("2001:db8::/64").  RFC 4291 §2.5.4 / RFC 6177: a /64 is one subnet, the
    smallest a site gets, and any host in it can pick fresh addresses from it at will (RFC 8981), so
    counting per address would give one client 2**64 budgets.  Text that is no IP address is its own key."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 4:
        return str(ip)
    return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))


@dataclass
class _Bucket:
    tokens: float
    updated: float


@implementer(IRateCounter)
class RateLimiter:
    """At most `rate` events per `per` seconds for each key (token bucket), on `clock`.  `rate` is the
    default; `allow(key, rate)` may name the rate in force (after a reload) without losing any bucket."""

    def __init__(self, rate: int, per: float = 60.0, clock: Optional[IReactorTime] = None,
                 max_keys: int = 10_000):
        if rate <= 0 or per <= 0 or max_keys <= 0:
            raise ValueError("rate, per and max_keys must be positive")
        if clock is None:
            from twisted.internet import reactor
            clock = reactor
        self._rate = rate
        self._per = per
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        """How many keys are being remembered now (for tests and metrics)."""
        return len(self._buckets)

    @property
    def rate(self) -> int:
        """The rate of the last check (the constructor's until then)."""
        return self._rate

    def allow(self, key: str, rate: Optional[int] = None) -> bool:
        """Take one token for `key`; False (and nothing taken) when its bucket is empty.  `rate`: the
        rate in force now (default: the last one).  A bucket keeps what it holds across a change of
        rate, capped at the new rate, and refills at the new rate from then on: an identity at its
        limit stays at its limit."""
        if rate is not None:
            if rate <= 0:
                raise ValueError("rate must be positive")
            self._rate = rate
        now = self._clock.seconds()
        self._forget_full(now)
        bucket = self._buckets.pop(key, None) or _Bucket(float(self._rate), now)
        bucket.tokens = self._refilled(bucket, now)
        bucket.updated = now
        allowed = bucket.tokens >= 1.0
        if allowed:
            bucket.tokens -= 1.0
        self._buckets[key] = bucket          # most recently used goes last
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def _refilled(self, bucket: _Bucket, now: float) -> float:
        elapsed = max(0.0, now - bucket.updated)   # a clock that steps back refills nothing
        return min(float(self._rate), bucket.tokens + elapsed * self._rate / self._per)

    def _forget_full(self, now: float) -> None:
        # Least recently used keys come first.  Stop at the first one still refilling: amortised O(1)
        # per call.  A full bucket left behind it costs memory only (a full bucket behaves exactly like
        # an absent one), and that memory is bounded by max_keys.
        while self._buckets:
            key, bucket = next(iter(self._buckets.items()))
            if self._refilled(bucket, now) < self._rate:
                return
            del self._buckets[key]
