# -*- test-case-name: tests.test_dns_cache, tests.test_mtasts, tests.test_mx -*-
"""Where a recipient domain's mail goes: MX resolution for direct delivery, off the reactor thread.

Job in the journey: the scheduler hands direct delivery (outbound.mx) one recipient domain; this module
turns it into the ordered list of mail exchangers and their addresses to try.  In: a domain (or an
address literal).  Out: a Deferred firing with a list of `MXHost` — by preference, shuffled among equal
preferences, each with all its A then AAAA addresses — or failing with `ResolutionFailed`, whose
`reply` (code + RFC 3463 status) settles every recipient of that domain.

RFCs: RFC 5321 §5.1 (MX ordering, random among equal preferences, implicit MX from the domain's own
address records), RFC 5321 §4.1.3 (address literals), RFC 7505 (null MX), RFC 3463 (status codes).
dnspython does the queries (it keeps the AD bit and knows TLSA, unlike twisted.names); a lookup that must
ask a nameserver runs on a small dedicated thread pool so a slow nameserver never blocks the reactor.  One
the cache can answer whole (every answer it needs still there) is answered at once, on the calling
thread, as dnspython would answer it from that cache: no thread hop for the common case of a warm cache.

Caching: one `MXResolver` keeps one dnspython resolver with a bounded LRU answer cache (`[delivery]
dns_cache_size` answers; 0: none) for as long as the configuration's `nameservers` and that size stay
the same (a reload hands it on: `serves`).  Answers are kept for
their TTL; NXDOMAIN and NODATA for the negative TTL of RFC 2308 section 5 (the lesser of the SOA's TTL
and MINIMUM, as dnspython computes it), and not at all without an SOA (dnspython would keep those 300 s;
RFC 2308 section 5 says they SHOULD NOT be cached).  A SERVFAIL, a REFUSED or a timeout is never cached:
the next lookup asks again (RFC 2308 section 7 allows a short cache of those; none is simpler and safe).
Every kept answer's lifetime is clamped: at most MAX_TTL (a day) for an answer, MAX_NEGATIVE_TTL (three
hours, RFC 2308 section 5) for a negative one, at least MIN_TTL (none: a TTL of 0 means "do not cache",
RFC 1035 section 3.2.1).  An answer is kept whole, its response flags included, so one that came with the
AD bit is still authenticated when read from the cache, and one that came without it never becomes so.
Lookups answered from the cache and lookups that went to a nameserver are counted (`hits`, `misses`,
and mailrelay.metrics' `dns_cache` when a Metrics is given).
"""
from __future__ import annotations

import ipaddress
import random
import threading
import time
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Callable, Optional

import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from zope.interface import implementer

from mailrelay import idn
from mailrelay.interfaces import IDNSLookup, Reply

DEFAULT_TIMEOUT = 10.0      # seconds for one query, all nameservers and retries included
DOMAIN_BUDGET = 30.0        # seconds for all the queries about one domain (MX, then A/AAAA per exchanger)
MAX_MX_HOSTS = 16           # a domain with more MX hosts than this is not worth more DNS work
DNS_THREADS = 4
CACHE_SIZE = 10_000         # answers kept (least recently used out): MX, A and AAAA per destination
MIN_TTL = 0.0               # seconds an answer is kept at least (0: a TTL of 0 is not cached, RFC 1035 3.2.1)
MAX_TTL = 86_400.0          # ... at most, however long its TTL
MAX_NEGATIVE_TTL = 10_800.0     # ... at most for NXDOMAIN/NODATA (RFC 2308 section 5: one to three hours)


@dataclass(frozen=True)
class MXHost:
    """One mail exchanger to try: its name (for TLS and logs), preference, and addresses in order.
    `secure`: the MX answer and every address answer for this host came marked authenticated (the AD
    bit of a validating resolver): RFC 7672 section 2.2's condition for looking up its TLSA records."""
    name: str
    preference: int
    addresses: tuple[str, ...]
    secure: bool = False


@dataclass(frozen=True)
class Lookup:
    """The records of one (name, type) as text (TXT strings joined), and whether the answer came
    with the AD bit (RFC 4035 section 3.2.3); `exists` is False for NXDOMAIN."""
    records: tuple
    authenticated: bool
    exists: bool = True


class ResolutionFailed(Exception):
    """No exchanger can be tried; `reply` is the answer for every recipient of the domain."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply

    @property
    def temporary(self) -> bool:
        return 400 <= self.reply.code < 500


class _NameNotFound(Exception):
    """NXDOMAIN: the name does not exist."""


class _LookupTemporary(Exception):
    """SERVFAIL, REFUSED, a timeout, no nameserver answering: the answer is unknown, not negative."""


def temporary(domain: str, why: str) -> ResolutionFailed:
    # A failed lookup is never read as "no such record": SERVFAIL and timeouts are 4.4.3, retried later.
    return ResolutionFailed(Reply(451, "4.4.3", f"DNS lookup for {domain} failed temporarily: {why}"))


def permanent(status: str, text: str, code: int = 550) -> ResolutionFailed:
    return ResolutionFailed(Reply(code, status, text))


def make_resolver(nameservers=(), timeout: float = DEFAULT_TIMEOUT, cache=None) -> dns.resolver.Resolver:
    """A dnspython resolver for `[delivery] nameservers` ((host, port) pairs), or the system's; with
    `cache` (a dns.resolver.Cache or LRUCache, thread-safe) answers are reused until their TTL ends."""
    if nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers]
    else:
        resolver = dns.resolver.Resolver()
    resolver.lifetime = timeout
    resolver.timeout = min(timeout, 3.0)     # per nameserver try; `lifetime` bounds the whole query
    # RFC 6840 section 5.7: a validating resolver sets AD in its answer only when the query asked for it
    # (AD or DO); DANE (RFC 7672 section 2.1) reads that bit, so every query sets AD.
    resolver.flags = dns.flags.RD | dns.flags.AD
    resolver.cache = cache
    return resolver


class AnswerCache(dns.resolver.LRUCache):
    """dnspython's LRU cache (thread-safe, `max_size` answers, least recently used out) with the rules of
    the module docstring: a negative answer without an SOA is not kept, every lifetime is clamped, and
    each lookup is counted as a hit or a miss (`on_lookup(hit)` is told too, from the resolver thread)."""

    def __init__(self, max_size: int = CACHE_SIZE, *, min_ttl: float = MIN_TTL, max_ttl: float = MAX_TTL,
                 max_negative_ttl: float = MAX_NEGATIVE_TTL,
                 on_lookup: Optional[Callable[[bool], None]] = None):
        super().__init__(max_size)
        self.min_ttl, self.max_ttl, self.max_negative_ttl = min_ttl, max_ttl, max_negative_ttl
        self.on_lookup = on_lookup
        self.lookups_hit = self.lookups_missed = 0

    def put(self, key, value) -> None:
        negative = value.rrset is None
        # RFC 2308 section 5: "Negative responses without SOA records SHOULD NOT be cached".
        if negative and not any(r.rdtype == dns.rdatatype.SOA for r in value.response.authority):
            return
        now = time.time()
        ttl = value.expiration - now    # dnspython's: the least TTL of the answer (RFC 2308: the SOA's, negative)
        ttl = min(max(ttl, self.min_ttl), self.max_negative_ttl if negative else self.max_ttl)
        if ttl <= 0:
            return              # RFC 1035 3.2.1: a zero TTL is for the transaction in progress only
        value.expiration = now + ttl
        super().put(key, value)

    def get(self, key):
        value = super().get(key)
        # dnspython asks for (name, type), then on a miss for (name, ANY), where it keeps NXDOMAIN: one
        # lookup is a hit when either answers, a miss when the second does not.
        if value is not None or key[1] == dns.rdatatype.ANY:
            self._count(value is not None)
        return value

    def _count(self, hit: bool) -> None:
        with self.lock:
            if hit:
                self.lookups_hit += 1
            else:
                self.lookups_missed += 1
        if self.on_lookup is not None:
            self.on_lookup(hit)


NegativeAwareCache = AnswerCache     # the name it had before it clamped and counted


class _CacheMiss(Exception):
    """The cache cannot answer this: the lookup has to ask a nameserver (on the thread pool)."""


class _CacheOnly:
    """What `_lookup_secure` needs of a dnspython resolver, answered from an AnswerCache alone, as
    dnspython reads its cache: the (name, type) answer (NODATA included), else an NXDOMAIN kept under
    (name, ANY); where dnspython would go on to ask a nameserver, `_CacheMiss`.  Hits are counted only
    once the whole question was answered (`commit`): after a miss the thread pool asks it all again
    and counts it itself."""

    lifetime = DEFAULT_TIMEOUT

    def __init__(self, cache: AnswerCache):
        self._cache = cache
        self._hits = 0

    def resolve(self, qname: str, rdtype, search: bool = False, raise_on_no_answer: bool = False,
                lifetime: Optional[float] = None) -> dns.resolver.Answer:
        name = dns.name.from_text(qname)
        kept = dns.resolver.LRUCache.get       # the uncounted read: AnswerCache.get counts
        answer = kept(self._cache, (name, dns.rdatatype.RdataType.make(rdtype), dns.rdataclass.IN))
        if answer is not None:
            self._hits += 1
            return answer
        answer = kept(self._cache, (name, dns.rdatatype.ANY, dns.rdataclass.IN))
        if answer is not None and answer.response.rcode() == dns.rcode.NXDOMAIN:
            self._hits += 1
            raise dns.resolver.NXDOMAIN(qnames=[name], responses={name: answer.response})
        raise _CacheMiss(qname)

    def commit(self) -> None:
        for _ in range(self._hits):
            self._cache._count(True)


def _from_cache(cache: Optional[AnswerCache], work: Callable[..., Any], *args: Any) -> defer.Deferred | None:
    """`work(resolver, *args)` answered from `cache` on this thread (a fired Deferred, holding its result
    or its ResolutionFailed), or None when the cache cannot answer all of it."""
    if cache is None:
        return None
    reader = _CacheOnly(cache)
    try:
        result = work(reader, *args)
    except ResolutionFailed as e:
        reader.commit()
        return defer.fail(e)
    except Exception:        # a miss, or anything unexpected: the thread pool does it the long way
        return None
    reader.commit()
    return defer.succeed(result)


class _Budget:
    """What is left of the time allowed for one domain: no query may outlive it (a slow zone must not
    hold a resolver thread for minutes)."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def lifetime(self, cap: float) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _LookupTemporary("time allowed for this domain's lookups ran out")
        return min(cap, left)


def _lookup(resolver: dns.resolver.Resolver, name: str, rdtype, budget: _Budget) -> list:
    """The records of (name, type): [] for NODATA; _NameNotFound for NXDOMAIN; else _LookupTemporary."""
    return _lookup_secure(resolver, name, rdtype, budget)[0]


def _lookup_secure(resolver: dns.resolver.Resolver, name: str, rdtype, budget: _Budget) -> tuple[list, bool]:
    """(records, AD bit set) of (name, type), as `_lookup`; an NXDOMAIN carries its AD bit too."""
    lifetime = budget.lifetime(resolver.lifetime)
    try:
        answer = resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False, lifetime=lifetime)
    except dns.resolver.NXDOMAIN as e:
        raise _NameNotFound(name, _nx_authenticated(e)) from None
    except dns.resolver.NoAnswer:
        return [], False          # not raised with raise_on_no_answer=False; the pair all the same
    except dns.exception.Timeout:
        raise _LookupTemporary("timed out") from None
    except dns.resolver.NoNameservers:
        raise _LookupTemporary("no nameserver answered (SERVFAIL or REFUSED)") from None
    except dns.exception.DNSException as e:
        raise _LookupTemporary(type(e).__name__) from None
    secure = bool(answer.response.flags & dns.flags.AD)
    return (list(answer.rrset) if answer.rrset is not None else []), secure


def _nx_authenticated(e: dns.resolver.NXDOMAIN) -> bool:
    try:
        return any(bool(r.flags & dns.flags.AD) for r in e.responses().values())
    except Exception:
        return False


def lookup_sync(resolver: dns.resolver.Resolver, name: str, rdtype: str, timeout: float = DEFAULT_TIMEOUT) -> Lookup:
    """Blocking lookup of one (name, type) for the TLS policies (TXT, TLSA, A, AAAA); raises
    ResolutionFailed (4.4.3) when the answer is unknown (SERVFAIL, timeout), never for NXDOMAIN/NODATA."""
    try:
        records, secure = _lookup_secure(resolver, name, dns.rdatatype.from_text(rdtype), _Budget(timeout))
    except _NameNotFound as e:
        return Lookup((), bool(e.args[1:] and e.args[1]), exists=False)
    except _LookupTemporary as e:
        raise temporary(name, str(e)) from None
    return Lookup(tuple(_as_value(r) for r in records), secure)


def _as_value(record):
    """TXT: its strings joined (RFC 7208 3.3 style); A/AAAA: the address; others: the rdata itself."""
    if record.rdtype == dns.rdatatype.TXT:
        return b"".join(record.strings).decode("utf-8", "replace")
    if record.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return record.address
    return record


def _addresses(resolver, name: str, budget: _Budget) -> tuple[tuple[str, ...], bool, bool]:
    """A then AAAA addresses of `name`, whether a lookup failed temporarily, and whether every answer
    was authenticated (RFC 7672 2.2.2: the address records too must be secure for DANE)."""
    found: list[str] = []
    failed, secure = False, True
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        try:
            records, authenticated = _lookup_secure(resolver, name, rdtype, budget)
            found.extend(r.address for r in records)
            secure &= authenticated
        except _NameNotFound:
            break          # NXDOMAIN for A means there is no AAAA either
        except _LookupTemporary:
            failed, secure = True, False
    return tuple(dict.fromkeys(found)), failed, secure


def _exchangers(resolver, domain: str, budget: _Budget) -> tuple[list[tuple[int, str]], bool]:
    """(preference, host) from the MX records, or the implicit MX (RFC 5321 §5.1); and whether the MX
    answer was authenticated."""
    try:
        records, secure = _lookup_secure(resolver, domain, dns.rdatatype.MX, budget)
    except _NameNotFound:
        raise permanent("5.1.2", f"domain {domain} does not exist (NXDOMAIN)") from None
    except _LookupTemporary as e:
        raise temporary(domain, str(e)) from None
    if not records:
        return [(0, domain)], secure  # RFC 5321 §5.1: no MX → the domain itself is the implicit MX
    real = [r for r in records if r.exchange != dns.name.root]
    if not real:
        # RFC 7505 §3: "MX 0 ." says the domain accepts no mail at all: bounce at once, never retry.
        raise permanent("5.1.10", f"domain {domain} accepts no mail (null MX)", code=556)
    # RFC 7505 §3 forbids mixing "." with real exchangers; if it happens, the real ones are used.
    ordered = sorted(real, key=lambda r: r.preference)[:MAX_MX_HOSTS]
    return [(r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in ordered], secure


def resolve_sync(resolver: dns.resolver.Resolver, domain: str, budget: float = DOMAIN_BUDGET) -> list[MXHost]:
    """Blocking resolution of one domain (run it in a thread): exchangers sorted by preference only."""
    allowance = _Budget(budget)
    exchangers, mx_secure = _exchangers(resolver, domain, allowance)
    hosts, any_temporary = [], False
    for preference, name in exchangers:
        addresses, failed, secure = _addresses(resolver, name, allowance)
        any_temporary |= failed
        if addresses:
            hosts.append(MXHost(name, preference, addresses, mx_secure and secure))
    if hosts:
        return hosts
    if any_temporary:
        raise temporary(domain, "address lookup of its mail exchangers failed")
    if exchangers == [(0, domain)]:
        raise permanent("5.1.2", f"domain {domain} has no MX and no address records")
    raise permanent("5.4.4", f"no mail exchanger of {domain} has an address")


def shuffle_equal_preferences(hosts: list[MXHost], rng: random.Random) -> list[MXHost]:
    """RFC 5321 §5.1: exchangers of equal preference are tried in random order (load spreading)."""
    ordered = []
    for _, group in groupby(sorted(hosts, key=lambda h: h.preference), key=lambda h: h.preference):
        same = list(group)
        rng.shuffle(same)
        ordered.extend(same)
    return ordered


def address_literal(domain: str) -> list[MXHost] | None:
    """`[192.0.2.1]` / `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3): the host itself, no DNS; else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise permanent("5.1.2", f"invalid address literal {domain}", code=553) from None
    return [MXHost(domain, 0, (str(address),))]


def idna_name(domain: str) -> str:
    """The name DNS is asked for: the A-label form (mailrelay.idn); a domain IDNA2008 refuses is a
    permanent failure, never handed to the resolver's own (IDNA2003) conversion."""
    try:
        return idn.to_ascii(domain)
    except ValueError as e:
        raise permanent("5.1.2", f"invalid recipient domain: {e}", code=553) from None


def check_domain(domain: str) -> None:
    """Refuse a name DNS cannot carry (empty, bad label, too long) as permanent, not as a DNS outage."""
    try:
        name = dns.name.from_text(domain)
    except (dns.exception.DNSException, UnicodeError):
        raise permanent("5.1.2", f"invalid recipient domain {domain!r}", code=553) from None
    if len(name.labels) < 2:      # only the root: "" or "."
        raise permanent("5.1.2", f"invalid recipient domain {domain!r}", code=553)


@implementer(IDNSLookup)
class MXResolver:
    """Resolves recipient domains on a dedicated thread pool, started on first use, through one
    dnspython resolver and its answer cache (see the module docstring), also made on first use:
    `cache_size` answers at most, hits and misses told to `metrics` (a mailrelay.metrics.Metrics) if given.

    `stop()` stops the pool; it is also stopped when the reactor shuts down.  `retire()` stops it once
    the lookups in flight are answered (a reload replaced this resolver)."""

    def __init__(
        self,
        nameservers=(),
        reactor=None,
        timeout: float = DEFAULT_TIMEOUT,
        threads: int = DNS_THREADS,
        rng: random.Random | None = None,
        budget: float = DOMAIN_BUDGET,
        cache_size: int = CACHE_SIZE,
        metrics: Any = None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._nameservers = tuple(nameservers)
        self._timeout = timeout
        self._budget = budget
        self._threads = threads
        self._rng = rng or random.Random()
        self._cache_size = cache_size
        self._metrics = metrics
        self._pool: ThreadPool | None = None
        self._trigger = None
        self._resolver: dns.resolver.Resolver | None = None
        self._resolver_lock = threading.Lock()
        self._in_flight = 0
        self._retired = False

    def serves(self, nameservers, cache_size: Optional[int] = None) -> bool:
        """Whether this resolver asks exactly these nameservers (and keeps `cache_size` answers, when
        given), so that a new configuration may keep it and its cache."""
        return tuple(nameservers) == self._nameservers and cache_size in (None, self._cache_size)

    @property
    def cache(self) -> Optional[AnswerCache]:
        """The answer cache (None before the first lookup)."""
        return self._resolver.cache if self._resolver is not None else None

    def _dns(self) -> dns.resolver.Resolver:
        """The one dnspython resolver (thread-safe to share: its cache has a lock, and each lookup passes
        its own lifetime instead of changing the resolver)."""
        with self._resolver_lock:
            if self._resolver is None:
                counted = self._metrics.dns_cache if self._metrics is not None else None
                # A size of 0: no cache at all (a local caching resolver does it; every lookup asks it).
                cache = AnswerCache(self._cache_size, on_lookup=counted) if self._cache_size > 0 else None
                self._resolver = make_resolver(self._nameservers, self._timeout, cache=cache)
            return self._resolver

    def _ensure_pool(self) -> ThreadPool:
        if self._pool is None:
            self._pool = ThreadPool(0, self._threads, name="mailrelay-dns")
            self._pool.start()
            self._trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return self._pool

    def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
        trigger, self._trigger = self._trigger, None
        if trigger is not None:
            try:
                self._reactor.removeSystemEventTrigger(trigger)
            except (ValueError, KeyError):
                pass          # already fired: we are being called by it

    def retire(self) -> None:
        """Stop the threads once no lookup is in flight (now, if none is)."""
        self._retired = True
        if not self._in_flight:
            self.stop()

    def _answered(self, result):
        self._in_flight -= 1
        if self._retired and not self._in_flight:
            self.stop()
        return result

    def resolve(self, domain: str) -> defer.Deferred:
        """A Deferred firing with the exchangers to try, in order; fails only with ResolutionFailed.
        An internationalised domain is looked up by its A-labels (RFC 5890 2.3.2.1, RFC 6531 3.7.2)."""
        domain = domain.lower().rstrip(".")
        try:
            literal = address_literal(domain)
            if literal is not None:
                return defer.succeed(literal)
            domain = idna_name(domain)
            check_domain(domain)
        except ResolutionFailed as e:
            return defer.fail(e)
        d = _from_cache(self.cache, resolve_sync, domain, self._budget)
        if d is None:
            self._in_flight += 1
            d = deferToThreadPool(self._reactor, self._ensure_pool(), self._resolve_in_thread, domain)
            d.addBoth(self._answered)
        d.addCallback(shuffle_equal_preferences, self._rng)
        return d

    def lookup(self, name: str, rdtype: str) -> defer.Deferred:
        """IDNSLookup: Deferred[Lookup] for one (name, type) through the same resolver and cache; fails
        only with ResolutionFailed (a temporary failure: the answer is unknown)."""
        cached = _from_cache(self.cache, lookup_sync, name.lower().rstrip("."), rdtype, self._timeout)
        if cached is not None:
            return cached
        self._in_flight += 1
        d = deferToThreadPool(self._reactor, self._ensure_pool(), self._lookup_in_thread, name, rdtype)
        return d.addBoth(self._answered)

    def _lookup_in_thread(self, name: str, rdtype: str) -> Lookup:
        try:
            return lookup_sync(self._dns(), name.lower().rstrip("."), rdtype, self._timeout)
        except ResolutionFailed:
            raise
        except Exception as e:      # as in _resolve_in_thread
            raise temporary(name, type(e).__name__) from None

    def _resolve_in_thread(self, domain: str) -> list[MXHost]:
        try:
            return resolve_sync(self._dns(), domain, self._budget)
        except ResolutionFailed:
            raise
        except Exception as e:      # a dnspython surprise is an unknown answer: retry later, never crash
            raise temporary(domain, type(e).__name__) from None
