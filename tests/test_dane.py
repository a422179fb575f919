"""DANE (RFC 7672, RFC 6698) in direct delivery: TLSA matching on certificates a test CA makes, then real
deliveries — the loopback DNS server setting the AD bit as a validating resolver would (or not, or not
for some names), SMTP sinks with the certificates the records name or others.
"""
from __future__ import annotations


from cryptography import x509
from twisted.internet import defer
from twisted.trial import unittest

from mailrelay.outbound import dane
from mailrelay.outbound.dane import TLSA
from tests.support.pki import TestCA
from tests.support.tlsworld import World, record, sink_cert
from tests.support.messages import message_to

RCPT = "b@example.net"


def leaf(ca: TestCA, name: str, **options) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.issue(name, **options)[0])


class MatchTests(unittest.TestCase):
    """delivery.dane.match on chains as a server would present them (leaf first)."""

    def setUp(self):
        self.ca = TestCA()
        self.leaf = leaf(self.ca, "mx.example.net")

    def test_dane_ee_matches_the_key_or_the_certificate_with_every_matching_type(self):
        for selector in (0, 1):
            for mtype in (0, 1, 2):
                self.assertIsNone(dane.match([record(3, selector, mtype, self.leaf)], [self.leaf], "mx.example.net"))

    def test_dane_ee_ignores_names_and_dates(self):
        expired = leaf(self.ca, "elsewhere.example", expired=True)
        self.assertIsNone(dane.match([record(3, 1, 1, expired)], [expired], "mx.example.net"))

    def test_dane_ee_for_another_key_does_not_match(self):
        other = leaf(self.ca, "mx.example.net")
        self.assertEqual(dane.match([record(3, 1, 1, other)], [self.leaf], "mx.example.net")[0], "validation-failure")

    def test_dane_ta_matches_the_issuer_in_the_chain_and_checks_the_name(self):
        chain = [self.leaf, self.ca.cert]
        for selector in (0, 1):
            self.assertIsNone(dane.match([record(2, selector, 1, self.ca.cert)], chain, "mx.example.net"))
        self.assertEqual(dane.match([record(2, 0, 1, self.ca.cert)], chain, "mx2.example.net")[0],
                         "certificate-host-mismatch")

    def test_dane_ta_needs_the_anchor_in_the_presented_chain(self):
        self.assertEqual(dane.match([record(2, 0, 1, self.ca.cert)], [self.leaf], "mx.example.net")[0],
                         "validation-failure")

    def test_dane_ta_of_a_ca_that_did_not_sign_the_leaf_does_not_match(self):
        stranger = TestCA("another CA")
        problem = dane.match([record(2, 0, 1, stranger.cert)], [self.leaf, stranger.cert], "mx.example.net")
        self.assertEqual(problem[0], "validation-failure")
        self.assertIn("does not chain", problem[1])

    def test_dane_ta_checks_dates(self):
        expired = leaf(self.ca, "mx.example.net", expired=True)
        self.assertEqual(dane.match([record(2, 0, 1, self.ca.cert)], [expired, self.ca.cert], "mx.example.net")[0],
                         "validation-failure")

    def test_pkix_usages_and_unknown_parameters_are_unusable(self):
        records = [record(0, 0, 1, self.ca.cert), record(1, 1, 1, self.leaf), TLSA(3, 2, 1, b"x"),
                   TLSA(3, 1, 9, b"x"), TLSA(4, 1, 1, b"x")]
        self.assertEqual(dane.usable(records), ())
        self.assertEqual(dane.match(records, [self.leaf, self.ca.cert], "mx.example.net")[0], "validation-failure")

    def test_presentation_form(self):
        self.assertEqual(TLSA(3, 1, 1, bytes.fromhex("ab01")).text(), "3 1 1 ab01")


class DANEDeliveryTests(unittest.TestCase):
    timeout = 60

    def world(self, **options) -> World:
        world = World(self, authenticated=True, **options)
        world.zone(("example.net", "MX"), ["10 mx1.example.net.", "20 mx2.example.net."])
        return world

    def tlsa(self, world: World, host: str, *records: TLSA) -> None:
        world.zone((f"_{world.mx_port}._tcp.{host}", "TLSA"), [r.text() for r in records])

    @defer.inlineCallbacks
    def deliver(self, world: World, **keys):
        [result] = yield world.mx(**keys).deliver(message_to(RCPT), [RCPT])
        return result

    @defer.inlineCallbacks
    def test_dane_ee_match_delivers_verified_by_dane_without_any_ca_trust(self):
        world = self.world()
        sink = world.exchanger("mx1.example.net", "127.0.0.2", tls="self-signed")
        cert = x509.load_pem_x509_certificate(sink_cert(sink))
        self.tlsa(world, "mx1.example.net", record(3, 1, 1, cert))
        result = yield self.deliver(world)
        self.assertTrue(result.delivered, result)
        self.assertEqual((result.tls_verified, result.tls_verified_by), (True, "dane"))
        self.assertEqual(world.reports.results(), [("tlsa", "mx1.example.net", None, True)])
        self.assertEqual(world.reports.records[0]["strings"][0][:6], "3 1 1 ")

    @defer.inlineCallbacks
    def test_dane_ee_mismatch_defers_with_4_7_5_and_sends_nothing(self):
        world = self.world()
        sink = world.exchanger("mx1.example.net", "127.0.0.2", tls="good")
        self.tlsa(world, "mx1.example.net", record(3, 1, 1, leaf(world.ca, "mx1.example.net")))
        world.zone(("example.net", "MX"), ["10 mx1.example.net."])
        result = yield self.deliver(world)
        self.assertEqual((result.code, result.status), (421, "4.7.5"), result)
        self.assertIn("refused by DANE", result.text)
        self.assertEqual(sink.messages, [])
        self.assertEqual(world.reports.results(), [("tlsa", "mx1.example.net", "validation-failure", False)])

    @defer.inlineCallbacks
    def test_dane_mismatch_on_the_first_mx_moves_on_to_the_second(self):
        world = self.world()
        first = world.exchanger("mx1.example.net", "127.0.0.2", tls="good")
        second = world.exchanger("mx2.example.net", "127.0.0.3", tls="good")
        self.tlsa(world, "mx1.example.net", record(3, 1, 1, leaf(world.ca, "mx1.example.net")))
        result = yield self.deliver(world)
        self.assertTrue(result.delivered, result)
        self.assertEqual((first.messages, len(second.messages)), ([], 1))

    @defer.inlineCallbacks
    def test_dane_ta_match_with_the_right_name_delivers(self):
        world = self.world()
        world.exchanger("mx1.example.net", "127.0.0.2", tls="good")     # sends the CA after the leaf
        self.tlsa(world, "mx1.example.net", record(2, 0, 1, world.ca.cert))
        result = yield self.deliver(world)
        self.assertEqual(result.tls_verified_by, "dane", result)

    @defer.inlineCallbacks
    def test_dane_ta_with_a_wrong_name_defers(self):
        world = self.world()
        world.zone(("example.net", "MX"), ["10 mx1.example.net."])
        world.exchanger("mx1.example.net", "127.0.0.2", tls="wrong-name")
        self.tlsa(world, "mx1.example.net", record(2, 1, 1, world.ca.cert))
        result = yield self.deliver(world)
        self.assertEqual(result.status, "4.7.5", result)
        self.assertIn("certificate-host-mismatch", result.text)

    @defer.inlineCallbacks
    def test_no_starttls_with_dane_defers_with_4_7_5(self):
        world = self.world()
        world.zone(("example.net", "MX"), ["10 mx1.example.net."])
        sink = world.exchanger("mx1.example.net", "127.0.0.2", tls=None)
        self.tlsa(world, "mx1.example.net", record(3, 1, 1, leaf(world.ca, "mx1.example.net")))
        result = yield self.deliver(world)
        self.assertEqual((result.code, result.status), (451, "4.7.5"), result)
        self.assertEqual(sink.messages, [])
        self.assertEqual(world.reports.results(), [("tlsa", "mx1.example.net", "starttls-not-supported", False)])

    @defer.inlineCallbacks
    def test_unauthenticated_tlsa_records_are_ignored(self):
        world = World(self, authenticated=False)
        world.zone(("example.net", "MX"), ["10 mx1.example.net."])
        world.exchanger("mx1.example.net", "127.0.0.2", tls="good")
        self.tlsa(world, "mx1.example.net", record(3, 1, 1, leaf(world.ca, "mx1.example.net")))
        result = yield self.deliver(world)
        self.assertTrue(result.delivered, result)
        self.assertEqual(result.tls_verified_by, None)
        self.assertFalse(any(q[1] == "TLSA" for q in world.dns.queries))      # MX insecure: not even asked

    @defer.inlineCallbacks
    def test_an_insecure_address_answer_means_no_dane_for_that_host(self):
        world = self.world(insecure=("mx1.example.net",))
        world.zone(("example.net", "MX"), ["10 mx1.example.net."])
        world.exchanger("mx1.example.net", "127.0.0.2", tls="good")
        self.tlsa(world, "mx1.example.net", record(3, 1, 1, leaf(world.ca, "mx1.example.net")))
        result = yield self.deliver(world)
        self.assertTrue(result.delivered, result)
        self.assertFalse(any(q[1] == "TLSA" for q in world.dns.queries))    # RFC 7672 2.2.2

    @defer.inlineCallbacks
    def test_an_insecure_tlsa_answer_is_ignored(self):
        world = self.world()
        world.zone(("example.net", "MX"), ["10 mx1.example.net."])
        world.exchanger("mx1.example.net", "127.0.0.2", tls="good")
        name = f"_{world.mx_port}._tcp.mx1.example.net"
        world.dns.insecure.add(name)
        self.tlsa(world, "mx1.example.net", record(3, 1, 1, leaf(world.ca, "mx1.example.net")))
        result = yield self.deliver(world)
        self.assertTrue(result.delivered, result)
        self.assertIsNone(result.tls_verified_by)

    @defer.inlineCallbacks
    def test_a_failed_tlsa_lookup_skips_the_host(self):
        world = self.world()
        first = world.exchanger("mx1.example.net", "127.0.0.2", tls="good")
        world.exchanger("mx2.example.net", "127.0.0.3", tls="good")
        world.dns.servfail.add(f"_{world.mx_port}._tcp.mx1.example.net")
        result = yield self.deliver(world)
        self.assertTrue(result.delivered, result)
        self.assertEqual(first.sessions, [])
        self.assertEqual(world.reports.results()[0][:3], ("tlsa", "mx1.example.net", "dnssec-invalid"))

    @defer.inlineCallbacks
    def test_only_unusable_records_still_require_tls_without_authentication(self):
        world = self.world()
        world.zone(("example.net", "MX"), ["10 mx1.example.net."])
        sink = world.exchanger("mx1.example.net", "127.0.0.2", tls="self-signed")
        self.tlsa(world, "mx1.example.net", record(1, 1, 1, leaf(world.ca, "mx1.example.net")))
        result = yield self.deliver(world)
        self.assertTrue(result.delivered, result)
        self.assertTrue(sink.messages[0].tls)
        self.assertIsNone(result.tls_verified_by)
        self.assertEqual(world.reports.results()[0][:3], ("tlsa", "mx1.example.net", "tlsa-invalid"))

    @defer.inlineCallbacks
    def test_dane_off_ignores_tlsa(self):
        world = self.world()
        world.zone(("example.net", "MX"), ["10 mx1.example.net."])
        world.exchanger("mx1.example.net", "127.0.0.2", tls="good")
        self.tlsa(world, "mx1.example.net", record(3, 1, 1, leaf(world.ca, "mx1.example.net")))
        result = yield self.deliver(world, dane=False)
        self.assertTrue(result.delivered, result)

    @defer.inlineCallbacks
    def test_dane_takes_precedence_over_mta_sts(self):
        # The MTA-STS policy lists neither exchanger and the certificate is self-signed: under MTA-STS
        # alone nothing could be delivered; DANE authenticates mx1, so mx1 gets the mail.
        world = self.world()
        sink = world.exchanger("mx1.example.net", "127.0.0.2", tls="self-signed")
        world.exchanger("mx2.example.net", "127.0.0.3", tls="good")
        self.tlsa(world, "mx1.example.net", record(3, 1, 1, x509.load_pem_x509_certificate(sink_cert(sink))))
        world.publish("example.net", "enforce", ["mx9.example.net"])
        result = yield self.deliver(world)
        self.assertTrue(result.delivered, result)
        self.assertEqual(result.tls_verified_by, "dane")
        self.assertEqual(len(sink.messages), 1)


