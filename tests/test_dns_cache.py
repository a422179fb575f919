"""The MX resolver's DNS cache: one dnspython resolver per configuration, answers kept for their TTL,
negative answers for the RFC 2308 negative TTL, SERVFAIL never kept; a reload keeps the cache unless
`[delivery] nameservers` change.

Real DNS over loopback: tests/support/dnsserver.py counts every question it is asked.
"""
from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailrelay.config import load
from mailrelay.delivery.dns import MXHost, MXResolver, ResolutionFailed
from mailrelay.service import build_delivery_parts, make_service
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


class ReloadTests(unittest.TestCase):
    """A reload keeps the resolver (and its cache) unless `nameservers` change."""

    def setUp(self):
        self.dns = DNSServer(ZONE)
        self.port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        self.path = self.dir / "tap.conf"

    def write(self, nameserver: str, concurrency: int = 100) -> Path:
        self.path.write_text(f'''hostname = "relay.test"
spool = "spool"
[[listen]]
kind = "relay"
endpoint = "tcp:0:interface=127.0.0.1"
[delivery]
process = "inline"
concurrency = {concurrency}
nameservers = ["{nameserver}"]
''')
        return self.path

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
