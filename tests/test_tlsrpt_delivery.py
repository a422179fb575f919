"""TLS outcomes of direct MX delivery, as the TLS report store hears them (RFC 8460 4.3).

Real sockets throughout: a loopback DNS server (tests/support/dnsserver.py) gives the MX, a loopback
sink (tests/support/sink.py) on 127.0.0.2 is the exchanger — offering STARTTLS or not, with a
certificate from a test CA (tests/support/pki.py) for the right name, another name, or expired — and
MXDelivery delivers to it under each `[delivery] tls` policy.  The sink handed to MXDelivery records
every call, so each test reads as the outcome the session produced.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from twisted.internet import defer, reactor, ssl, task
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.config import DeliveryConfig
from mailrelay.outbound.dns import MXResolver
from mailrelay.queue.job import Timeouts
from mailrelay.outbound.mx import MXDelivery
from mailrelay.outbound.tlsrpt_store import TLSReportStore
from mailrelay.envelope import Envelope
from mailrelay.interfaces import ISpooledMessage, ITLSReportSink
from tests.support.dnsserver import DNSServer
from tests.support.pki import TestCA
from tests.support.sink import Sink

BODY = b"From: a@example.org\r\nTo: b@tls.example\r\nSubject: tls report\r\n\r\nHello.\r\n"
FAST = Timeouts(connect=5.0, reply=10.0, data_end=10.0)


@implementer(ISpooledMessage)
@dataclass(frozen=True)
class Message:
    queue_id: str
    envelope: Envelope
    path = None           # not read from a spool file

    @property
    def size(self) -> int:
        return len(BODY)

    def open(self):
        return io.BytesIO(BODY)


def message(n: int = 1) -> Message:
    return Message(f"Q{n}", Envelope(sender="a@example.org", recipients=("b@tls.example",),
                                     received_at=1_700_000_000.0))


@implementer(ITLSReportSink)
class Recorder:
    def __init__(self):
        self.calls = []

    def record(self, policy_domain, policy_type, policy_strings, mx_host, result_type, success, detail):
        self.calls.append((policy_domain, policy_type, tuple(policy_strings), mx_host, result_type, success,
                           dict(detail)))


class TLSOutcomeTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.dns = DNSServer({("tls.example", "MX"): ["10 mx.tls.example."],
                              ("mx.tls.example", "A"): ["127.0.0.2"]})
        self.nameservers = (("127.0.0.1", self.dns.start(reactor)),)
        self.addCleanup(self.dns.stop)
        self.ca = TestCA()
        self.recorder = Recorder()

    def exchanger(self, **options) -> int:
        sink = Sink(hostname="mx.tls.example", **{k: v for k, v in options.items() if k != "tls_options"})
        port = sink.start(reactor, interface="127.0.0.2", tls_options=options.get("tls_options"))
        self.addCleanup(sink.stop)
        self.sink = sink
        return port

    def mx(self, port: int, tls: str, sink=None) -> MXDelivery:
        resolver = MXResolver(self.nameservers, reactor, timeout=2.0)
        self.addCleanup(resolver.stop)
        delivery = MXDelivery(DeliveryConfig(mx_port=port, nameservers=self.nameservers, tls=tls),
                              "relay.example.org", reactor, resolver=resolver, timeouts=FAST,
                              trust_root=ssl.Certificate.loadPEM(self.ca.pem),
                              tls_reports=sink if sink is not None else self.recorder)
        self.addCleanup(delivery.close_idle)
        return delivery

    def assertOne(self, result_type, success):
        self.assertEqual(len(self.recorder.calls), 1, self.recorder.calls)
        domain, kind, strings, host, got_type, got_success, detail = self.recorder.calls[0]
        self.assertEqual((domain, kind, strings, host), ("tls.example", "no-policy-found", (), "mx.tls.example"))
        self.assertEqual((got_type, got_success), (result_type, success))
        return detail

    @defer.inlineCallbacks
    def test_no_starttls_offered_is_starttls_not_supported(self):
        mx = self.mx(self.exchanger(), "opportunistic")
        results = yield mx.deliver(message(), ["b@tls.example"])
        self.assertTrue(results[0].delivered, results)           # opportunistic: delivered in plaintext
        detail = self.assertOne("starttls-not-supported", False)
        self.assertIn("did not offer STARTTLS", detail["failure-reason-code"])

    @defer.inlineCallbacks
    def test_required_tls_without_starttls_is_starttls_not_supported(self):
        mx = self.mx(self.exchanger(), "required")
        results = yield mx.deliver(message(), ["b@tls.example"])
        self.assertEqual(results[0].status, "4.7.4")
        self.assertOne("starttls-not-supported", False)

    @defer.inlineCallbacks
    def test_completed_handshake_is_a_success(self):
        mx = self.mx(self.exchanger(tls_options=self.ca.server_options("mx.tls.example")), "opportunistic")
        results = yield mx.deliver(message(), ["b@tls.example"])
        self.assertTrue(results[0].delivered, results)
        self.assertTrue(self.sink.messages[0].tls)
        detail = self.assertOne(None, True)
        self.assertNotIn("failure-reason-code", detail)

    @defer.inlineCallbacks
    def test_verify_with_a_good_certificate_is_a_success(self):
        mx = self.mx(self.exchanger(tls_options=self.ca.server_options("mx.tls.example")), "verify")
        results = yield mx.deliver(message(), ["b@tls.example"])
        self.assertTrue(results[0].delivered, results)
        self.assertOne(None, True)

    @defer.inlineCallbacks
    def test_verify_certificate_for_another_name_is_a_host_mismatch(self):
        mx = self.mx(self.exchanger(tls_options=self.ca.server_options("other.example")), "verify")
        results = yield mx.deliver(message(), ["b@tls.example"])
        self.assertEqual(results[0].status, "4.7.5", results)
        self.assertOne("certificate-host-mismatch", False)

    @defer.inlineCallbacks
    def test_verify_expired_certificate_is_certificate_expired(self):
        options = self.ca.server_options("mx.tls.example", expired=True)
        mx = self.mx(self.exchanger(tls_options=options), "verify")
        results = yield mx.deliver(message(), ["b@tls.example"])
        self.assertEqual(results[0].status, "4.7.5", results)
        detail = self.assertOne("certificate-expired", False)
        self.assertIn("certificate has expired", detail["failure-reason-code"])

    @defer.inlineCallbacks
    def test_verify_certificate_of_an_unknown_ca_is_not_trusted(self):
        stranger = TestCA("someone else's CA")
        mx = self.mx(self.exchanger(tls_options=stranger.server_options("mx.tls.example")), "verify")
        results = yield mx.deliver(message(), ["b@tls.example"])
        self.assertEqual(results[0].status, "4.7.5", results)
        self.assertOne("certificate-not-trusted", False)

    @defer.inlineCallbacks
    def test_broken_handshake_is_a_validation_failure_and_the_plaintext_retry_is_not_counted(self):
        mx = self.mx(self.exchanger(tls_options=self.ca.server_options("mx.tls.example"), fail_tls=True),
                     "opportunistic")
        results = yield mx.deliver(message(), ["b@tls.example"])
        self.assertEqual(mx.plaintext_fallbacks, 1)
        self.assertTrue(results[0].delivered, results)
        self.assertOne("validation-failure", False)

    @defer.inlineCallbacks
    def test_tls_none_records_nothing(self):
        mx = self.mx(self.exchanger(tls_options=self.ca.server_options("mx.tls.example")), "none")
        results = yield mx.deliver(message(), ["b@tls.example"])
        self.assertTrue(results[0].delivered, results)
        self.assertEqual(self.recorder.calls, [])

    @defer.inlineCallbacks
    def test_a_reused_connection_is_not_a_new_session(self):
        mx = self.mx(self.exchanger(tls_options=self.ca.server_options("mx.tls.example")), "opportunistic")
        for n in (1, 2, 3):
            results = yield mx.deliver(message(n), ["b@tls.example"])
            self.assertTrue(results[0].delivered, results)
        self.assertEqual(len(self.sink.sessions), 1)             # one connection carried all three
        self.assertOne(None, True)

    @defer.inlineCallbacks
    def test_the_store_counts_what_delivery_records(self):
        clock = task.Clock()
        store = TLSReportStore(self.mktemp(), clock=clock)
        verifyObject(ITLSReportSink, store)
        mx = self.mx(self.exchanger(), "opportunistic", sink=store)
        yield mx.deliver(message(), ["b@tls.example"])
        self.assertEqual(store.recorded, 1)
        (tallies,) = store._pending.values()
        ((key, tally),) = tallies.items()
        self.assertEqual(key, ("tls.example", "no-policy-found", (), "mx.tls.example"))
        self.assertEqual((tally.successes, tally.failures), (0, 1))
        ((row, count),) = tally.details.items()
        self.assertEqual(row[:2], ("starttls-not-supported", "mx.tls.example"))
        self.assertEqual(count, 1)


class TestDoubleTests(unittest.TestCase):
    def test_the_message_double_is_an_ispooledmessage(self):
        """What the hops here are given provides the interface they rely on (no probing)."""
        self.assertTrue(verifyObject(ISpooledMessage, message()))
