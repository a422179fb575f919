"""The MX resolver's DNS cache: one dnspython resolver per configuration, answers kept for their TTL
(clamped), negative answers for the RFC 2308 negative TTL, SERVFAIL never kept, the AD bit kept, a
bound with LRU eviction, hits and misses counted; a reload keeps the cache unless
`[delivery] nameservers` change.

Real DNS over loopback: tests/support/dnsserver.py counts every question it is asked.
"""
from __future__ import annotations

import time
from pathlib import Path

import dns.name
import dns.rdataclass
import dns.rdatatype
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailrelay.config import ConfigError, load
from mailrelay.outbound.dns import (
    MAX_NEGATIVE_TTL, MAX_TTL, AnswerCache, MXHost, MXResolver, ResolutionFailed, make_resolver,
)
from mailrelay.metrics import Metrics
from mailrelay.service import make_service
from mailrelay.wiring import build_delivery_parts
from tests.support.dnsserver import DNSServer

ZONE = {
    # With an SOA, as every real zone has: its NODATA answers (mx1's AAAA) are cached too (RFC 2308).
    ("example.net", "SOA"): ["ns.example.net. admin.example.net. 1 3600 600 86400 300"],
    ("example.net", "MX"): ["10 mx1.example.net."],
    ("mx1.example.net", "A"): ["127.0.0.2"],
    ("neg.example", "SOA"): ["ns.neg.example. admin.neg.example. 1 3600 600 86400 1"],
    ("neg.example", "TXT"): ["a zone with an SOA whose MINIMUM (negative TTL) is 1 s"],
}


class _DNSCase(unittest.TestCase):
    ttl = 300

    def setUp(self):
        self.dns = DNSServer(ZONE, servfail={"broken.example"}, ttl=self.ttl)
        self.nameservers = (("127.0.0.1", self.dns.start(reactor)),)
        self.addCleanup(self.dns.stop)
        self.resolver = MXResolver(self.nameservers, reactor, timeout=2.0)
        self.addCleanup(self.resolver.stop)

    def asked(self, name: str) -> list[str]:
        return [rtype for qname, rtype, _ in self.dns.queries if qname == name]

    @defer.inlineCallbacks
    def failure(self, domain: str) -> defer.Deferred:
        try:
            hosts = yield self.resolver.resolve(domain)
        except ResolutionFailed as e:
            return e
        self.fail(f"{domain} resolved to {hosts}")


class CacheTests(_DNSCase):
    @defer.inlineCallbacks
    def test_a_second_lookup_of_the_same_domain_asks_nothing(self):
        first = yield self.resolver.resolve("example.net")
        queries = len(self.dns.queries)
        self.assertEqual(self.asked("example.net"), ["MX"])
        self.assertEqual(self.asked("mx1.example.net"), ["A", "AAAA"])
        second = yield self.resolver.resolve("Example.NET")
        self.assertEqual(first, second)
        self.assertEqual(second, [MXHost("mx1.example.net", 10, ("127.0.0.2",))])
        self.assertEqual(len(self.dns.queries), queries)

    @defer.inlineCallbacks
    def test_a_warm_cache_answers_at_once_without_the_thread_pool(self):
        first = yield self.resolver.resolve("example.net")
        txt = yield self.resolver.lookup("neg.example", "TXT")
        gone = yield self.failure("gone.neg.example")
        asked = len(self.dns.queries)
        # Answered on this thread: the Deferreds have fired before resolve() and lookup() return.
        second = self.resolver.resolve("example.net")
        self.assertEqual(self.successResultOf(second), first)
        again = self.resolver.lookup("neg.example", "TXT")
        self.assertEqual(self.successResultOf(again), txt)
        nx = self.failureResultOf(self.resolver.resolve("gone.neg.example"), ResolutionFailed)
        self.assertEqual(nx.value.reply.status, gone.reply.status)
        self.assertEqual(len(self.dns.queries), asked)
        self.assertEqual(self.resolver._in_flight, 0)     # nothing was handed to the pool

    @defer.inlineCallbacks
    def test_a_partly_warm_cache_asks_the_rest_through_the_pool(self):
        yield self.resolver.resolve("example.net")
        cache = self.resolver.cache
        cache.flush((dns.name.from_text("mx1.example.net"), dns.rdatatype.A, dns.rdataclass.IN))
        d = self.resolver.resolve("example.net")
        self.assertNoResult(d)          # the exchanger's address is gone: the thread asks for it
        hosts = yield d
        self.assertEqual(hosts, [MXHost("mx1.example.net", 10, ("127.0.0.2",))])
        self.assertEqual(self.asked("example.net"), ["MX"])
        self.assertEqual(self.asked("mx1.example.net"), ["A", "AAAA", "A"])

    @defer.inlineCallbacks
    def test_servfail_is_temporary_every_time_and_never_cached(self):
        for _ in range(2):
            e = yield self.failure("broken.example")
            self.assertEqual((e.reply.code, e.reply.status), (451, "4.4.3"))
        self.assertEqual(self.asked("broken.example"), ["MX", "MX"])
        # The nameserver recovers: the very next lookup gets the real answer, no remembered failure.
        self.dns.servfail.clear()
        self.dns.set("broken.example", "MX", ["10 mx1.example.net."])
        hosts = yield self.resolver.resolve("broken.example")
        self.assertEqual([h.name for h in hosts], ["mx1.example.net"])

    @defer.inlineCallbacks
    def test_nxdomain_without_an_soa_is_not_cached(self):
        # RFC 2308 section 5: no SOA in the answer, no negative TTL: ask again next time.
        for _ in range(2):
            e = yield self.failure("gone.example")
            self.assertEqual(e.reply.status, "5.1.2")
        self.assertEqual(self.asked("gone.example"), ["MX", "MX"])


class ExpiryTests(_DNSCase):
    """The same zone with a TTL of 1 s: after it, the next lookup asks again."""
    ttl = 1

    @defer.inlineCallbacks
    def test_an_answer_is_asked_again_after_its_ttl(self):
        yield self.resolver.resolve("example.net")
        yield self.resolver.resolve("example.net")
        self.assertEqual(self.asked("example.net"), ["MX"])
        yield task.deferLater(reactor, 1.3, lambda: None)     # dnspython's cache runs on time.time()
        yield self.resolver.resolve("example.net")
        self.assertEqual(self.asked("example.net"), ["MX", "MX"])

    @defer.inlineCallbacks
    def test_nxdomain_is_cached_for_the_soa_negative_ttl(self):
        for _ in range(2):
            e = yield self.failure("gone.neg.example")
            self.assertEqual(e.reply.status, "5.1.2")
        self.assertEqual(self.asked("gone.neg.example"), ["MX"])
        yield task.deferLater(reactor, 1.3, lambda: None)
        yield self.failure("gone.neg.example")
        self.assertEqual(self.asked("gone.neg.example"), ["MX", "MX"])


class _ConfigCase(unittest.TestCase):
    """A loopback DNS server with ZONE and a configuration file naming it."""

    def setUp(self):
        self.dns = DNSServer(ZONE)
        self.port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        self.path = self.dir / "tap.conf"

    def write(self, nameserver: str, concurrency: int = 100, cache: str = "") -> Path:
        self.path.write_text(f'''hostname = "relay.test"
spool = "spool"
[[listen]]
kind = "relay"
endpoint = "tcp:0:interface=127.0.0.1"
[delivery]
process = "inline"
concurrency = {concurrency}
nameservers = ["{nameserver}"]
{cache}
''')
        return self.path


class ReloadTests(_ConfigCase):
    """A reload keeps the resolver (and its cache) unless `nameservers` change."""

    @defer.inlineCallbacks
    def test_same_nameservers_keep_the_cache_other_nameservers_get_a_new_resolver(self):
        first = build_delivery_parts(load(self.write(f"127.0.0.1:{self.port}")), reactor)
        self.addCleanup(first.resolver.stop)
        yield first.resolver.resolve("example.net")
        asked = len(self.dns.queries)
        second = build_delivery_parts(load(self.write(f"127.0.0.1:{self.port}", concurrency=5)), reactor, first)
        self.assertIs(second.resolver, first.resolver)
        self.assertIs(second.direct.resolver, first.resolver)
        yield second.direct.resolver.resolve("example.net")
        self.assertEqual(len(self.dns.queries), asked)
        third = build_delivery_parts(load(self.write(f"127.0.0.2:{self.port}")), reactor, second)
        self.addCleanup(third.resolver.stop)
        self.assertIsNot(third.resolver, first.resolver)
        self.assertTrue(third.resolver.serves([("127.0.0.2", self.port)]))

    @defer.inlineCallbacks
    def test_relay_reload_hands_the_resolver_on_and_retires_a_replaced_one(self):
        relay = make_service(load(self.write(f"127.0.0.1:{self.port}")), reactor=reactor)
        kept = relay.delivery.resolver
        self.addCleanup(kept.stop)
        yield kept.resolve("example.net")
        self.assertIsNotNone(kept._pool)
        self.write(f"127.0.0.1:{self.port}", concurrency=7)
        self.assertTrue(relay.reload())
        self.assertIs(relay.delivery.resolver, kept)
        self.write(f"127.0.0.2:{self.port}")
        self.assertTrue(relay.reload())
        self.addCleanup(relay.delivery.resolver.stop)
        self.assertIsNot(relay.delivery.resolver, kept)
        self.assertIsNone(kept._pool)        # nothing in flight: its threads are stopped at once


def _left(resolver: MXResolver, name: str, rdtype: str) -> float:
    """Seconds the cache still keeps the answer for (name, type); ANY is where NXDOMAIN is kept."""
    key = (dns.name.from_text(name), dns.rdatatype.from_text(rdtype), dns.rdataclass.IN)
    node = resolver.cache.data[key]
    return node.value.expiration - time.time()


class ClampTests(_DNSCase):
    """A zone whose TTLs (and SOA MINIMUM) are far longer than anything worth keeping."""
    ttl = 30 * 86400

    def setUp(self):
        super().setUp()
        self.dns.set("long.example", "SOA", [f"ns.long.example. admin.long.example. 1 3600 600 86400 {self.ttl}"])

    @defer.inlineCallbacks
    def test_a_long_ttl_is_kept_no_longer_than_the_maximum(self):
        yield self.resolver.resolve("example.net")
        for name, rdtype in (("example.net", "MX"), ("mx1.example.net", "A")):
            left = _left(self.resolver, name, rdtype)
            self.assertLessEqual(left, MAX_TTL)
            self.assertGreater(left, MAX_TTL - 60)

    @defer.inlineCallbacks
    def test_a_long_negative_ttl_is_kept_no_longer_than_the_negative_maximum(self):
        e = yield self.failure("gone.long.example")
        self.assertEqual(e.reply.status, "5.1.2")
        left = _left(self.resolver, "gone.long.example", "ANY")
        self.assertLessEqual(left, MAX_NEGATIVE_TTL)
        self.assertGreater(left, MAX_NEGATIVE_TTL - 60)
        nodata = yield self.resolver.lookup("long.example", "TXT")     # NODATA: the same bound
        self.assertEqual(nodata.records, ())
        self.assertLessEqual(_left(self.resolver, "long.example", "TXT"), MAX_NEGATIVE_TTL)


class ZeroTTLTests(_DNSCase):
    """TTL 0 answers: not kept (RFC 1035 3.2.1) unless a minimum says otherwise."""
    ttl = 0

    @defer.inlineCallbacks
    def test_a_zero_ttl_answer_is_asked_again_every_time(self):
        for _ in range(2):
            yield self.resolver.lookup("mx1.example.net", "A")
        self.assertEqual(self.asked("mx1.example.net"), ["A", "A"])

    @defer.inlineCallbacks
    def test_a_minimum_keeps_even_a_zero_ttl_answer(self):
        resolver = make_resolver(self.nameservers, 2.0, cache=AnswerCache(10, min_ttl=60))
        for _ in range(2):
            answer = yield deferToThread(resolver.resolve, "mx1.example.net", "A")
            self.assertEqual([r.address for r in answer], ["127.0.0.2"])
        self.assertEqual(self.asked("mx1.example.net"), ["A"])


class AuthenticatedTests(unittest.TestCase):
    """The AD bit of a validating resolver's answer is kept with the answer: DANE reads it (RFC 7672
    2.1), so a cached answer is authenticated exactly when the nameserver's answer was."""

    def setUp(self):
        zone = dict(ZONE)
        zone[("example.net", "MX")] = ["10 mx1.example.net.", "20 mx2.example.net."]
        zone[("mx2.example.net", "A")] = ["127.0.0.3"]
        zone[("_25._tcp.mx1.example.net", "TLSA")] = ["3 1 1 " + "ab" * 32]
        self.dns = DNSServer(zone, authenticated_data=True, insecure={"mx2.example.net"})
        self.addCleanup(self.dns.stop)
        self.resolver = MXResolver((("127.0.0.1", self.dns.start(reactor)),), reactor, timeout=2.0)
        self.addCleanup(self.resolver.stop)

    @defer.inlineCallbacks
    def test_cached_answers_keep_their_ad_bit_and_unsigned_ones_stay_unsigned(self):
        first = yield self.resolver.resolve("example.net")
        asked = len(self.dns.queries)
        second = yield self.resolver.resolve("example.net")
        self.assertEqual(len(self.dns.queries), asked)
        for hosts in (first, second):
            self.assertEqual({h.name: h.secure for h in hosts}, {"mx1.example.net": True, "mx2.example.net": False})
        for _ in range(2):
            tlsa = yield self.resolver.lookup("_25._tcp.mx1.example.net", "TLSA")
            self.assertTrue(tlsa.authenticated)
            self.assertEqual(len(tlsa.records), 1)
        self.assertEqual([q for q in self.dns.queries if q[1] == "TLSA"][1:], [])

    @defer.inlineCallbacks
    def test_a_cached_nxdomain_keeps_its_ad_bit(self):
        for _ in range(2):
            gone = yield self.resolver.lookup("_25._tcp.gone.example.net", "TLSA")
            self.assertFalse(gone.exists)
            self.assertTrue(gone.authenticated)
        self.assertEqual(len(self.dns.queries), 1)


class BoundAndCountTests(_DNSCase):
    @defer.inlineCallbacks
    def test_the_least_recently_used_answer_leaves_a_full_cache(self):
        self.resolver = MXResolver(self.nameservers, reactor, timeout=2.0, cache_size=2)
        self.addCleanup(self.resolver.stop)
        for name in ("one", "two", "one", "three", "one", "two"):
            self.dns.set(f"{name}.example.net", "A", ["127.0.0.9"])
            yield self.resolver.lookup(f"{name}.example.net", "A")
        # "one" was used again before "three" came, so "two" left; then "two" was asked again.
        self.assertEqual(self.asked("one.example.net"), ["A"])
        self.assertEqual(self.asked("two.example.net"), ["A", "A"])
        self.assertEqual(len(self.resolver.cache.data), 2)

    @defer.inlineCallbacks
    def test_hits_and_misses_are_counted_in_the_metrics(self):
        metrics = Metrics()
        self.resolver = MXResolver(self.nameservers, reactor, timeout=2.0, metrics=metrics)
        self.addCleanup(self.resolver.stop)
        for _ in range(2):
            yield self.resolver.resolve("example.net")                 # MX, A, AAAA (NODATA)
            yield self.failure("gone.neg.example")                     # NXDOMAIN with an SOA
            yield self.failure("broken.example")                       # SERVFAIL: never kept
        asked = len(self.dns.queries)
        self.assertEqual(asked, 3 + 1 + 2)

        def count(result: str) -> float:
            return metrics.registry.get_sample_value("mailrelay_dns_cache_lookups_total", {"result": result})

        self.assertEqual(count("miss"), asked)
        self.assertEqual(count("hit"), 3 + 1)
        self.assertEqual((self.resolver.cache.lookups_hit, self.resolver.cache.lookups_missed), (4, asked))


class CacheSizeTests(_ConfigCase):
    """`[delivery] dns_cache_size`: how many answers are kept; 0 keeps none; a change on reload starts an
    empty cache."""

    @defer.inlineCallbacks
    def test_the_configured_size_bounds_the_cache_and_a_changed_size_gets_a_new_resolver(self):
        config = load(self.write(f"127.0.0.1:{self.port}", cache="dns_cache_size = 2"))
        self.assertEqual(config.delivery.dns_cache_size, 2)
        first = build_delivery_parts(config, reactor)
        self.addCleanup(first.resolver.stop)
        yield first.resolver.resolve("example.net")        # MX, A, AAAA: three answers for two places
        self.assertEqual(len(first.resolver.cache.data), 2)
        same = build_delivery_parts(load(self.write(f"127.0.0.1:{self.port}", 5, "dns_cache_size = 2")), reactor, first)
        self.assertIs(same.resolver, first.resolver)
        bigger = build_delivery_parts(load(self.write(f"127.0.0.1:{self.port}", cache="dns_cache_size = 50")),
                                      reactor, same)
        self.addCleanup(bigger.resolver.stop)
        self.assertIsNot(bigger.resolver, first.resolver)
        asked = len(self.dns.queries)
        yield bigger.resolver.resolve("example.net")
        self.assertEqual(len(self.dns.queries), asked + 3)      # an empty cache: asked again
        self.assertEqual(len(bigger.resolver.cache.data), 3)

    @defer.inlineCallbacks
    def test_a_size_of_zero_keeps_nothing_and_every_lookup_asks(self):
        parts = build_delivery_parts(load(self.write(f"127.0.0.1:{self.port}", cache="dns_cache_size = 0")), reactor)
        self.addCleanup(parts.resolver.stop)
        for _ in range(2):
            hosts = yield parts.resolver.resolve("example.net")
            self.assertEqual([h.name for h in hosts], ["mx1.example.net"])
        self.assertEqual([q[:2] for q in self.dns.queries], [("example.net", "MX"), ("mx1.example.net", "A"),
                                                             ("mx1.example.net", "AAAA")] * 2)
        self.assertIsNone(parts.resolver.cache)

    def test_a_negative_size_is_refused_naming_the_file_and_key(self):
        with self.assertRaises(ConfigError) as caught:
            load(self.write(f"127.0.0.1:{self.port}", cache="dns_cache_size = -1"))
        self.assertIn("dns_cache_size", str(caught.exception))
        self.assertIn(str(self.path), str(caught.exception))
