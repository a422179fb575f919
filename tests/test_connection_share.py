# -*- test-case-name: tests.test_connection_share -*-
"""Direct delivery shares idle connections by address: two domains whose MX names differ but resolve to
one address use one connection — when that is safe.  A connection whose TLS was checked for one name
(DANE, MTA-STS, "verify") never carries mail whose policy wants another name or TLSA set, and an
unauthenticated one never carries mail whose policy wants a check.

Two layers: ByAddress and the pool's take_any with stand-in clients; then real deliveries over loopback
DNS (tests/support/tlsworld.py: a DNS server with the AD bit on cue, a test CA) to one real sink on
127.0.0.2, whose recorded sessions count the connections.
"""
from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.internet.error import CannotListenError
from twisted.trial import unittest

from mailrelay.outbound.pool import UNAUTHENTICATED, ByAddress, ConnectionPool, PoolKey
from tests.support.sink import Sink
from tests.support.tlsworld import World
from tests.support.fakes import StandInClient
from tests.support.sink import mails, verbs
from tests.support.polling import until
from tests.support.tlsworld import record
from tests.support.messages import message_to

ADDRESS = "127.0.0.2"


class ByAddressTests(unittest.TestCase):
    def setUp(self):
        self.pool = ConnectionPool(task.Clock())
        self.addCleanup(self.pool.close)

    def test_a_key_per_address_in_order_one_spelling_per_address(self):
        keys = ByAddress(("2001:db8:0::1", "192.0.2.1"), 25, "opportunistic", UNAUTHENTICATED, "192.0.2.9").keys()
        self.assertEqual(keys, [PoolKey("2001:db8::1", 25, "opportunistic", UNAUTHENTICATED, None, "192.0.2.9"),
                                PoolKey("192.0.2.1", 25, "opportunistic", UNAUTHENTICATED, None, "192.0.2.9")])

    def test_take_any_takes_from_the_first_address_that_has_an_idle_connection(self):
        near, far = StandInClient(), StandInClient()
        hop = ByAddress(("192.0.2.1", "192.0.2.2", "192.0.2.3"), 25, "none")
        self.assertTrue(self.pool.park(hop.at("192.0.2.3"), far))
        self.assertTrue(self.pool.park(hop.at("192.0.2.2"), near))
        self.assertIs(self.pool.take_any(hop.keys()), near)
        self.assertIs(self.pool.take_any(hop.keys()), far)
        self.assertIsNone(self.pool.take_any(hop.keys()))

    def test_another_port_source_address_security_or_tls_check_takes_nothing(self):
        parked = ByAddress((ADDRESS,), 25, "starttls", UNAUTHENTICATED, "127.0.0.9")
        self.assertTrue(self.pool.park(parked.at(ADDRESS), StandInClient()))
        checked = object()       # stands for a verifying TLS options object (one name, one TLSA set)
        for other in (ByAddress((ADDRESS,), 2525, "starttls", UNAUTHENTICATED, "127.0.0.9"),
                      ByAddress((ADDRESS,), 25, "starttls", UNAUTHENTICATED, "127.0.0.8"),
                      ByAddress((ADDRESS,), 25, "starttls", UNAUTHENTICATED, None),
                      ByAddress((ADDRESS,), 25, "opportunistic", UNAUTHENTICATED, "127.0.0.9"),
                      ByAddress((ADDRESS,), 25, "starttls", checked, "127.0.0.9")):
            self.assertIsNone(self.pool.take_any(other.keys()), other)
        self.assertIsNotNone(self.pool.take_any(parked.keys()))


class SharedAddressTests(unittest.TestCase):
    """Domains a.example, b.example, c.example; exchangers mx.a.example, mx.b.example, mx.c.example, all
    on 127.0.0.2, where one sink listens with a certificate valid for all three names."""

    timeout = 60

    def world(self, authenticated: bool = False, more: int = 0, **sink_options) -> tuple[World, Sink]:
        world = World(self, authenticated=authenticated)
        domains = ["a", "b", "c"] + [f"d{n}" for n in range(more)]
        names = [f"mx.{d}.example" for d in domains]
        for d, name in zip(domains, names):
            world.zone((f"{d}.example", "MX"), [f"10 {name}."])
            world.zone((name, "A"), [ADDRESS])
        options = world.ca.server_options(names[0], also=tuple(names[1:4]), send_ca=True)
        self.certificate = world.ca.last_issued
        sink = Sink(hostname=names[0], **sink_options)
        try:
            sink.start(reactor, port=world.mx_port, interface=ADDRESS, tls_options=options)
        except CannotListenError:
            self.skipTest(f"port {world.mx_port} is taken on {ADDRESS}")
        self.addCleanup(sink.stop)
        return world, sink

    @defer.inlineCallbacks
    def send(self, mx, *domains: str) -> defer.Deferred:
        results = []
        for domain in domains:
            [result] = yield mx.deliver(message_to(f"u@{domain}"), [f"u@{domain}"])
            self.assertTrue(result.delivered, result)
            results.append(result)
        return results

    @defer.inlineCallbacks
    def test_two_domains_whose_exchangers_share_an_address_share_one_connection(self):
        for tls, security_verbs in (("none", []), ("opportunistic", [b"STARTTLS", b"EHLO"])):
            world, sink = self.world()
            mx = world.mx(tls=tls)
            a, b = yield self.send(mx, "a.example", "b.example")
            [session] = sink.sessions
            self.assertEqual(verbs(session), [b"EHLO", *security_verbs] + [b"MAIL", b"RCPT", b"DATA"] * 2)
            # Each result names the exchanger it was sent to, at the address that answered.
            self.assertEqual((a.remote_host, b.remote_host), (f"mx.a.example[{ADDRESS}]", f"mx.b.example[{ADDRESS}]"))
            self.assertEqual([m.rcpt_tos for m in sink.messages], [["u@a.example"], ["u@b.example"]])
            self.assertEqual(mx.pool.reused, 1)
            yield mx.close_idle()
            yield sink.stop()

    @defer.inlineCallbacks
    def test_a_connection_verified_for_one_name_carries_no_mail_for_another(self):
        world, sink = self.world()
        mx = world.mx(tls="verify")
        results = yield self.send(mx, "a.example", "b.example", "a.example")
        self.assertEqual([r.tls_verified for r in results], [True, True, True])
        # Both certificates checks would pass (the certificate names both), yet mx.b's mail gets its own
        # connection and check; mx.a's second message goes on the connection checked for mx.a.
        self.assertEqual([mails(s) for s in sink.sessions], [2, 1])
        self.assertEqual([m.rcpt_tos[0] for m in sink.messages], ["u@a.example", "u@b.example", "u@a.example"])
        self.assertEqual([verbs(s).count(b"STARTTLS") for s in sink.sessions], [1, 1])

    @defer.inlineCallbacks
    def test_an_unauthenticated_connection_never_carries_mail_dane_requires(self):
        world, sink = self.world(authenticated=True)
        tlsa = [record(3, 1, 1, self.certificate).text()]
        world.zone((f"_{world.mx_port}._tcp.mx.a.example", "TLSA"), tlsa)
        world.zone((f"_{world.mx_port}._tcp.mx.c.example", "TLSA"), tlsa)
        mx = world.mx(tls="opportunistic", dane=True)
        b, a, b2 = yield self.send(mx, "b.example", "a.example", "b.example")
        self.assertEqual([(r.tls_verified, r.tls_verified_by) for r in (b, a, b2)],
                         [(False, None), (True, "dane"), (False, None)])
        # b's opportunistic connection is not DANE's: a gets a new one, checked; b's second message goes
        # back on b's (it needs nothing), not on the one DANE checked for mx.a.
        self.assertEqual([mails(s) for s in sink.sessions], [2, 1])
        self.assertEqual([m.rcpt_tos[0] for m in sink.messages], ["u@b.example", "u@a.example", "u@b.example"])
        # The same TLSA set on another name is another host to authenticate (RFC 7672 3.2.2: the name
        # checked is the exchanger's): mx.c gets a connection of its own too.
        [c] = yield self.send(mx, "c.example")
        self.assertEqual((c.tls_verified, c.tls_verified_by), (True, "dane"))
        self.assertEqual(len(sink.sessions), 3)

    @defer.inlineCallbacks
    def test_a_domain_under_mta_sts_never_takes_an_unauthenticated_connection(self):
        world, sink = self.world()
        world.publish("a.example", "enforce", ["mx.a.example"])
        # "required": b's sessions insist on STARTTLS too, as a's policy does, but check no certificate.
        mx = world.mx(tls="required", mta_sts=True)
        b, a = yield self.send(mx, "b.example", "a.example")
        self.assertEqual([r.tls_verified for r in (b, a)], [False, True])
        self.assertEqual([mails(s) for s in sink.sessions], [1, 1])

    @defer.inlineCallbacks
    def test_an_address_keeps_as_many_idle_connections_as_deliveries_may_run_at_once(self):
        world, sink = self.world(more=24, hold_data=True)     # no message is answered before release()
        mx = world.mx(tls="none", concurrency=20)
        first, second = [f"d{n}.example" for n in range(12)], [f"d{n}.example" for n in range(12, 24)]
        for batch in (first, second):      # twelve domains at once, more than a smarthost's bound of ten
            sending = defer.gatherResults([mx.deliver(message_to(f"u@{d}"), [f"u@{d}"]) for d in batch])
            yield until(lambda: len(sink.held) == 12, "every message to wait for its reply")
            sink.release(hold=True)
            results = yield sending
            self.assertTrue(all(r.delivered for [r] in results), results)
            self.assertEqual(len(mx.pool), 12)
        self.assertEqual(len(sink.sessions), 12)
        self.assertEqual(sorted(mails(s) for s in sink.sessions), [2] * 12)
