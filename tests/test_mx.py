"""Direct MX delivery: resolution against a real loopback DNS server, delivery to real loopback sinks.

DNS: tests/support/dnsserver.py on 127.0.0.1 (UDP + TCP, OS-chosen port), queried by the real dnspython
resolver on MXResolver's thread pool.  SMTP: tests/support/sink.py on 127.0.0.2 and 127.0.0.3, both on
one OS-chosen port (`[delivery] mx_port` is one port for every exchanger).
"""
from __future__ import annotations

import random

from twisted.internet import defer, reactor, ssl
from twisted.internet.error import CannotListenError
from twisted.trial import unittest

from mailrelay import tls
from mailrelay.config import DeliveryConfig
from mailrelay.queue.job import Timeouts
from mailrelay.outbound.dns import (
    MXHost, MXResolver, ResolutionFailed, make_resolver, resolve_sync, shuffle_equal_preferences,
)
from mailrelay.outbound.mx import MXDelivery
from tests.support.dnsserver import DNSServer
from tests.support.sink import Sink
from tests.support.messages import BODY, message_to

FAST = Timeouts(connect=5.0, reply=10.0, data_end=10.0)


class DNSTestCase(unittest.TestCase):
    """Starts a DNSServer with `zone` and an MXResolver pointed at it; both stopped after the test."""

    zone: dict = {}
    servfail: tuple = ()
    silent: tuple = ()

    def setUp(self):
        self.dns = DNSServer(self.zone, servfail=self.servfail, silent=self.silent)
        port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.nameservers = (("127.0.0.1", port),)
        self.resolver = MXResolver(self.nameservers, reactor, timeout=1.0, rng=random.Random(7))
        self.addCleanup(self.resolver.stop)

    @defer.inlineCallbacks
    def assertFails(self, domain: str, code: int, status: str):
        try:
            hosts = yield self.resolver.resolve(domain)
        except ResolutionFailed as e:
            self.assertEqual((e.reply.code, e.reply.status), (code, status), str(e))
            return e
        self.fail(f"{domain} resolved to {hosts}")


ZONE = {
    ("example.net", "MX"): ["20 mx2.example.net.", "10 mx1.example.net."],
    ("mx1.example.net", "A"): ["127.0.0.2"],
    ("mx1.example.net", "AAAA"): ["::1"],
    ("mx2.example.net", "A"): ["127.0.0.3"],
    ("equal.example", "MX"): ["10 a.equal.example.", "10 b.equal.example.", "10 c.equal.example.",
                              "5 first.equal.example."],
    ("a.equal.example", "A"): ["127.0.0.11"],
    ("b.equal.example", "A"): ["127.0.0.12"],
    ("c.equal.example", "A"): ["127.0.0.13"],
    ("first.equal.example", "A"): ["127.0.0.10"],
    ("implicit.example", "A"): ["127.0.0.4"],
    ("implicit.example", "AAAA"): ["::1"],
    ("null.example", "MX"): ["0 ."],
    ("nomail.example", "TXT"): ["no addresses here"],
    ("dangling.example", "MX"): ["10 nowhere.dangling.example."],
    ("halfbroken.example", "MX"): ["10 broken.halfbroken.example.", "20 ok.halfbroken.example."],
    ("ok.halfbroken.example", "A"): ["127.0.0.5"],
    ("allbroken.example", "MX"): ["10 broken.halfbroken.example."],
    ("big.example", "TXT"): ["k=" + "x" * 3000],
}


class ResolutionTests(DNSTestCase):
    zone = ZONE
    servfail = ("servfail.example", "broken.halfbroken.example")
    silent = ("silent.example",)

    @defer.inlineCallbacks
    def test_exchangers_come_in_preference_order_with_every_address(self):
        hosts = yield self.resolver.resolve("example.net")
        self.assertEqual(hosts, [MXHost("mx1.example.net", 10, ("127.0.0.2", "::1")),
                                 MXHost("mx2.example.net", 20, ("127.0.0.3",))])

    @defer.inlineCallbacks
    def test_domain_is_case_insensitive_and_may_end_with_a_dot(self):
        hosts = yield self.resolver.resolve("Example.NET.")
        self.assertEqual([h.name for h in hosts], ["mx1.example.net", "mx2.example.net"])

    @defer.inlineCallbacks
    def test_equal_preferences_are_tried_in_random_order(self):
        orders = set()
        for _ in range(12):
            hosts = yield self.resolver.resolve("equal.example")
            self.assertEqual(hosts[0].name, "first.equal.example")    # lower preference always first
            orders.add(tuple(h.name for h in hosts[1:]))
        self.assertEqual({frozenset(o) for o in orders}, {frozenset({"a.equal.example", "b.equal.example",
                                                                     "c.equal.example"})})
        self.assertGreater(len(orders), 1)

    @defer.inlineCallbacks
    def test_no_mx_means_the_domain_itself_is_the_implicit_mx(self):
        hosts = yield self.resolver.resolve("implicit.example")
        self.assertEqual(hosts, [MXHost("implicit.example", 0, ("127.0.0.4", "::1"))])

    @defer.inlineCallbacks
    def test_null_mx_fails_permanently_at_once_without_address_lookups(self):
        e = yield self.assertFails("null.example", 556, "5.1.10")
        self.assertFalse(e.temporary)
        self.assertEqual([q[:2] for q in self.dns.queries], [("null.example", "MX")])

    def test_nxdomain_fails_permanently(self):
        return self.assertFails("nosuch.example", 550, "5.1.2")

    def test_no_mx_and_no_address_fails_permanently(self):
        return self.assertFails("nomail.example", 550, "5.1.2")

    def test_exchangers_without_addresses_fail_permanently(self):
        return self.assertFails("dangling.example", 550, "5.4.4")

    def test_servfail_is_temporary(self):
        return self.assertFails("servfail.example", 451, "4.4.3")

    @defer.inlineCallbacks
    def test_a_nameserver_that_never_answers_is_temporary(self):
        e = yield self.assertFails("silent.example", 451, "4.4.3")
        self.assertTrue(e.temporary)

    @defer.inlineCallbacks
    def test_an_exchanger_whose_address_lookup_fails_is_skipped(self):
        hosts = yield self.resolver.resolve("halfbroken.example")
        self.assertEqual(hosts, [MXHost("ok.halfbroken.example", 20, ("127.0.0.5",))])

    def test_address_lookup_failing_for_every_exchanger_is_temporary_not_permanent(self):
        return self.assertFails("allbroken.example", 451, "4.4.3")

    def test_a_domain_whose_time_budget_is_spent_fails_temporarily_without_querying(self):
        resolver = make_resolver(self.nameservers, 1.0)
        with self.assertRaises(ResolutionFailed) as caught:
            resolve_sync(resolver, "example.net", budget=0)
        self.assertEqual((caught.exception.reply.code, caught.exception.reply.status), (451, "4.4.3"))
        self.assertEqual(self.dns.queries, [])

    @defer.inlineCallbacks
    def test_address_literal_needs_no_dns(self):
        hosts = yield self.resolver.resolve("[127.0.0.9]")
        self.assertEqual(hosts, [MXHost("[127.0.0.9]", 0, ("127.0.0.9",))])
        hosts = yield self.resolver.resolve("[IPv6:::1]")
        self.assertEqual(hosts[0].addresses, ("::1",))
        self.assertEqual(self.dns.queries, [])

    @defer.inlineCallbacks
    def test_malformed_domains_fail_permanently_without_dns(self):
        for domain in ("a..b", "", "[not-an-ip]", "x" * 64 + ".example"):
            yield self.assertFails(domain, 553, "5.1.2")
        self.assertEqual(self.dns.queries, [])


class ShuffleTests(unittest.TestCase):
    def test_shuffle_keeps_preference_groups_in_order(self):
        hosts = [MXHost(n, p, ("127.0.0.1",)) for n, p in [("c", 30), ("a1", 10), ("b", 20), ("a2", 10)]]
        for seed in range(20):
            ordered = shuffle_equal_preferences(hosts, random.Random(seed))
            self.assertEqual([h.preference for h in ordered], [10, 10, 20, 30])


class DNSServerTests(DNSTestCase):
    """The test DNS server itself: TXT splitting, TCP fallback for big answers, TLSA, CNAME."""
    zone = {
        ("big.example", "TXT"): ["k=" + "x" * 3000],
        ("_25._tcp.mx.example", "TLSA"): ["3 1 1 " + "ab" * 32],
        ("alias.example", "CNAME"): ["target.example."],
        ("target.example", "A"): ["127.0.0.7"],
    }

    def _query(self, name, rtype):
        from twisted.internet.threads import deferToThread
        return deferToThread(make_resolver(self.nameservers, 2.0).resolve, name, rtype)

    @defer.inlineCallbacks
    def test_big_txt_answer_is_truncated_on_udp_and_served_over_tcp(self):
        answer = yield self._query("big.example", "TXT")
        self.assertEqual(b"".join(answer.rrset[0].strings), b"k=" + b"x" * 3000)
        self.assertEqual([q[2] for q in self.dns.queries], ["udp", "tcp"])

    @defer.inlineCallbacks
    def test_tlsa_records_are_served(self):
        answer = yield self._query("_25._tcp.mx.example", "TLSA")
        record = answer.rrset[0]
        self.assertEqual((record.usage, record.selector, record.mtype, record.cert), (3, 1, 1, b"\xab" * 32))

    @defer.inlineCallbacks
    def test_cname_is_followed(self):
        answer = yield self._query("alias.example", "A")
        self.assertEqual([r.address for r in answer.rrset], ["127.0.0.7"])


def listen_pair(first: Sink, second: Sink, **second_options) -> int:
    """Start `second` on 127.0.0.3 (OS-chosen port P) and `first` on 127.0.0.2:P; return P."""
    for _ in range(10):
        port = second.start(reactor, interface="127.0.0.3", **second_options)
        if first is None:
            return port
        try:
            first.start(reactor, port=port, interface="127.0.0.2")
            return port
        except CannotListenError:
            second.stop()
    raise CannotListenError("127.0.0.2", 0, "no common port")


class MXDeliveryTests(unittest.TestCase):
    """End to end: DNS server → MXDelivery → delivery client → real sinks."""

    zone = {
        ("example.net", "MX"): ["10 mx1.example.net.", "20 mx2.example.net."],
        ("mx1.example.net", "A"): ["127.0.0.2"],
        ("mx2.example.net", "A"): ["127.0.0.3"],
        ("null.example", "MX"): ["0 ."],
        ("one.example", "MX"): ["10 mx2.example.net."],
    }

    def setUp(self):
        self.dns = DNSServer(self.zone)
        self.nameservers = (("127.0.0.1", self.dns.start(reactor)),)
        self.addCleanup(self.dns.stop)

    def sinks(self, first: Sink | None, second: Sink, **second_options) -> int:
        port = listen_pair(first, second, **second_options)
        for sink in (first, second):
            if sink is not None:
                self.addCleanup(sink.stop)
        return port

    def closed_port(self) -> int:
        """A port nothing listens on at 127.0.0.2/.3: the DNS server's, which is bound to 127.0.0.1 only."""
        return self.nameservers[0][1]

    def mx(self, port: int, **config) -> MXDelivery:
        config.setdefault("tls", "none")
        trust_root = config.pop("trust_root", None)
        delivery = DeliveryConfig(mx_port=port, nameservers=self.nameservers, **config)
        resolver = MXResolver(self.nameservers, reactor, timeout=2.0)
        self.addCleanup(resolver.stop)
        return MXDelivery(delivery, "relay.example.org", reactor, resolver=resolver, timeouts=FAST,
                          trust_root=trust_root)

    @defer.inlineCallbacks
    def test_first_mx_refusing_connections_falls_through_to_the_second(self):
        second = Sink()
        port = self.sinks(None, second)          # nothing listens on 127.0.0.2
        results = yield self.mx(port).deliver(message_to("b@example.net"), ["b@example.net"])
        self.assertEqual([(r.code, r.delivered, r.remote_host.split("[")[0]) for r in results],
                         [(250, True, "mx2.example.net")])
        self.assertEqual(second.messages[0].data, BODY)
        self.assertEqual(second.messages[0].rcpt_tos, ["b@example.net"])
        self.assertEqual(second.messages[0].helo, "relay.example.org")

    @defer.inlineCallbacks
    def test_first_mx_answering_421_falls_through_to_the_second(self):
        first, second = Sink(mail_reply="421 4.3.2 shutting down"), Sink()
        port = self.sinks(first, second)
        results = yield self.mx(port).deliver(message_to("b@example.net"), ["b@example.net"])
        self.assertTrue(results[0].delivered, results)
        verbs = [line.split(b" ")[0] for _, line in first.sessions[0].commands]
        self.assertEqual(verbs, [b"EHLO", b"MAIL"])      # 421 at MAIL: the session ends there
        self.assertEqual(first.messages, [])
        self.assertEqual(len(second.messages), 1)

    @defer.inlineCallbacks
    def test_per_recipient_answers_settle_or_move_on(self):
        first = Sink(rcpt_replies={"gone@example.net": "550 5.1.1 no such user",
                                   "grey@example.net": "450 4.2.0 greylisted"})
        second = Sink(rcpt_replies={"gone@example.net": "250 2.1.5 should never be asked"})
        port = self.sinks(first, second)
        rcpts = ["ok@example.net", "gone@example.net", "grey@example.net"]
        results = yield self.mx(port).deliver(message_to(*rcpts), rcpts)
        self.assertEqual([r.recipient for r in results], rcpts)
        self.assertEqual([(r.code, r.status) for r in results], [(250, "2.0.0"), (550, "5.1.1"), (250, "2.0.0")])
        self.assertEqual(first.messages[0].rcpt_tos, ["ok@example.net"])
        self.assertEqual(second.messages[0].rcpt_tos, ["grey@example.net"])   # only the unsettled one

    @defer.inlineCallbacks
    def test_temporary_answers_everywhere_give_the_last_4xx(self):
        first = Sink(mail_reply="451 4.3.0 try later (mx1)")
        second = Sink(mail_reply="452 4.3.1 full (mx2)")
        port = self.sinks(first, second)
        results = yield self.mx(port).deliver(message_to("b@example.net"), ["b@example.net"])
        self.assertEqual((results[0].code, results[0].status), (452, "4.3.1"))
        self.assertTrue(results[0].temporary)
        self.assertIn("full (mx2)", results[0].text)

    @defer.inlineCallbacks
    def test_nothing_listening_anywhere_is_temporary(self):
        results = yield self.mx(self.closed_port()).deliver(message_to("b@example.net"), ["b@example.net"])
        self.assertEqual([(r.code, r.status) for r in results], [(451, "4.4.1")])
        self.assertIn("mx2.example.net", results[0].remote_host)     # the last exchanger tried

    @defer.inlineCallbacks
    def test_null_mx_bounces_without_connecting(self):
        results = yield self.mx(self.closed_port()).deliver(message_to("x@null.example"), ["x@null.example"])
        self.assertEqual((results[0].code, results[0].status), (556, "5.1.10"))

    @defer.inlineCallbacks
    def test_opportunistic_tls_failure_is_retried_once_in_plaintext(self):
        second = Sink(offer_starttls=True, fail_tls=True)
        port = self.sinks(None, second)
        mx = self.mx(port, tls="opportunistic")
        results = yield mx.deliver(message_to("b@one.example"), ["b@one.example"])
        self.assertTrue(results[0].delivered, results)
        self.assertEqual(mx.plaintext_fallbacks, 1)
        self.assertEqual(len(second.sessions), 2)
        self.assertFalse(second.messages[0].tls)

    @defer.inlineCallbacks
    def test_required_tls_failure_never_falls_back_to_plaintext(self):
        second = Sink(offer_starttls=True, fail_tls=True)
        port = self.sinks(None, second)
        mx = self.mx(port, tls="required")
        results = yield mx.deliver(message_to("b@one.example"), ["b@one.example"])
        self.assertTrue(results[0].temporary, results)
        self.assertEqual(len(second.sessions), 1)
        self.assertEqual(second.messages, [])
        self.assertEqual(mx.plaintext_fallbacks, 0)

    def _server_tls(self, name: str):
        cert_pem, key_pem = tls.generate_self_signed(name)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(cert_pem + key_pem)
        return tls.server_options(path), ssl.Certificate.loadPEM(cert_pem)

    @defer.inlineCallbacks
    def test_verify_delivers_over_tls_to_a_trusted_certificate_for_the_mx_name(self):
        options, cert = self._server_tls("mx2.example.net")
        second = Sink()
        port = self.sinks(None, second, tls_options=options)
        mx = self.mx(port, tls="verify", trust_root=cert)
        results = yield mx.deliver(message_to("b@one.example"), ["b@one.example"])
        self.assertTrue(results[0].delivered, results)
        self.assertTrue(second.messages[0].tls)

    @defer.inlineCallbacks
    def test_verify_refuses_a_certificate_for_another_name(self):
        options, cert = self._server_tls("someone-else.example")
        second = Sink()
        port = self.sinks(None, second, tls_options=options)
        mx = self.mx(port, tls="verify", trust_root=cert)
        results = yield mx.deliver(message_to("b@one.example"), ["b@one.example"])
        self.assertEqual((results[0].code, results[0].status), (421, "4.7.5"), results)
        self.assertEqual(second.messages, [])
        self.assertEqual(mx.plaintext_fallbacks, 0)

    @defer.inlineCallbacks
    def test_opportunistic_tls_is_used_when_offered(self):
        options, _ = self._server_tls("anything.example")
        second = Sink()
        port = self.sinks(None, second, tls_options=options)
        results = yield self.mx(port, tls="opportunistic").deliver(message_to("b@one.example"), ["b@one.example"])
        self.assertTrue(results[0].delivered, results)
        self.assertTrue(second.messages[0].tls)

    @defer.inlineCallbacks
    def test_source_address_is_bound(self):
        second = Sink()
        port = self.sinks(None, second)
        seen = []
        mx = self.mx(port, source_address="127.0.0.1")
        original = mx._endpoint
        mx._endpoint = lambda address: seen.append(original(address)) or seen[-1]
        results = yield mx.deliver(message_to("b@one.example"), ["b@one.example"])
        self.assertTrue(results[0].delivered, results)
        self.assertEqual(seen[0]._bindAddress, ("127.0.0.1", 0))

    @defer.inlineCallbacks
    def test_an_unexpected_local_error_gives_4xx_results_never_a_failed_deferred(self):
        mx = self.mx(self.closed_port())
        mx.resolver = _ExplodingResolver()
        results = yield mx.deliver(message_to("b@example.net", "c@example.net"), ["b@example.net", "c@example.net"])
        self.assertEqual([(r.code, r.status) for r in results], [(451, "4.3.0")] * 2)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class _ExplodingResolver:
    def resolve(self, domain):
        return defer.fail(ZeroDivisionError("boom"))

    def stop(self):
        pass
