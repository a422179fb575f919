"""REQUIRETLS (RFC 8689) through the whole relay over real sockets and real TLS: certificates from a test
CA made here (tests/support/pki.py), scripted next hops (tests/support/sink.py) that offer STARTTLS and
REQUIRETLS or not, smarthost transports that verify or not, direct delivery under `tls = "verify"` with
a loopback DNS server, and `TLS-Required: No`.  Reports are parsed with the email package."""
from __future__ import annotations

import email
import io
from pathlib import Path

from twisted.internet import defer, reactor, ssl, task, threads
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.config import DeliveryConfig
from mailrelay.outbound.dns import MXResolver
from mailrelay.outbound.mx import MXDelivery
from mailrelay.envelope import Envelope
from mailrelay.interfaces import ISpooledMessage

from tests.support.dnsserver import DNSServer
from tests.support.logcapture import LogLines
from tests.support.pki import TestCA
from tests.support.polling import until
from tests.support.ports import free_port
from tests.support.relay import RelayFixture
from tests.support.sink import Sink
from tests.support.wire import WireClient

SECRET = b"the secret body line"
MESSAGE = (b"From: App <app@example.org>\r\nTo: <user@example.com>\r\nSubject: secret\r\n"
           b"Message-ID: <rt1@example.org>\r\n\r\n" + SECRET + b"\r\n")
TLS_NO = MESSAGE.replace(b"Subject: secret\r\n", b"Subject: report\r\nTLS-Required: No\r\n")


def report_blocks(data: bytes) -> tuple:
    report = email.message_from_bytes(data)
    status = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"][0]
    return report, status.get_payload()[1:]


class Base(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.ca = TestCA()
        self.ca_file = self.ca.write(Path(self.mktemp()).absolute())

    def sink(self, tls: bool = True, requiretls: bool = False, ca: TestCA | None = None) -> tuple[Sink, int]:
        sink = Sink(requiretls=requiretls)
        options = (ca or self.ca).server_options("127.0.0.1") if tls else None
        port = sink.start(reactor, tls_options=options)
        self.addCleanup(sink.stop)
        return sink, port

    def transport(self, name: str, port: int, verify: bool = True, tls: bool = True) -> str:
        security = "starttls" if tls else "none"
        return (f'[transports.{name}]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "{security}"\n'
                f'verify = {"true" if verify else "false"}\nca_file = "{self.ca_file}"\n\n')

    def relay(self, extra: str) -> RelayFixture:
        relay = RelayFixture(self.mktemp(), extra=extra + '[queue]\nfirst_retry = "1s"\n')
        relay.start(reactor)
        self.addCleanup(relay.stop)
        return relay


class Receiving(Base):
    def conversation(self, relay: RelayFixture) -> list:
        client = WireClient("127.0.0.1", relay.ports["relay"])
        try:
            client.reply()
            before = client.command("EHLO client.test")
            refused = client.command("MAIL FROM:<app@example.org> REQUIRETLS")
            client.starttls(relay.tls_context())
            after = client.command("EHLO client.test")
            taken = client.command("MAIL FROM:<app@example.org> REQUIRETLS")
            bad = client.command("MAIL FROM:<app@example.org> REQUIRETLS=YES")
            return [before, refused, after, taken, bad]
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_refused_before_starttls_offered_after(self):
        relay = self.relay("")
        before, refused, after, taken, bad = yield threads.deferToThread(self.conversation, relay)
        self.assertNotIn(b"REQUIRETLS", [line[4:] for line in before.lines])
        self.assertIn(b"DSN", [line[4:] for line in before.lines])
        self.assertEqual(refused.code, 530)
        self.assertTrue(refused.text.startswith(b"5.7.10 "), refused.text)
        self.assertIn(b"REQUIRETLS", [line[4:] for line in after.lines])
        self.assertEqual(taken.code, 250)
        self.assertEqual(bad.code, 503)               # nested MAIL: the first one stands

    @defer.inlineCallbacks
    def test_offered_on_implicit_tls(self):
        relay = self.relay("")

        def ehlo():
            context = relay.tls_context()
            client = WireClient("127.0.0.1", relay.ports["submissions"], implicit_tls=context)
            try:
                client.reply()
                return client.command("EHLO client.test")
            finally:
                client.close()
        reply = yield threads.deferToThread(ehlo)
        self.assertIn(b"REQUIRETLS", [line[4:] for line in reply.lines])


class Relaying(Base):
    @defer.inlineCallbacks
    def test_only_a_verified_hop_with_requiretls_gets_it_and_the_others_bounce(self):
        good, good_port = self.sink(requiretls=True)
        lacking, lacking_port = self.sink(requiretls=False)
        unverified, unverified_port = self.sink(requiretls=True)
        home, home_port = self.sink(requiretls=True)
        relay = self.relay(
            self.transport("good", good_port) + self.transport("lacking", lacking_port)
            + self.transport("unverified", unverified_port, verify=False) + self.transport("home", home_port)
            + '[[route]]\nrecipients = ["good.example"]\ntransport = "good"\n\n'
            + '[[route]]\nrecipients = ["lacking.example"]\ntransport = "lacking"\n\n'
            + '[[route]]\nrecipients = ["unverified.example"]\ntransport = "unverified"\n\n'
            + '[[route]]\nrecipients = ["*"]\ntransport = "home"\n\n')
        code, _ = yield relay.submit("relay", "app@example.org",
                                     ["x@good.example", "y@lacking.example", "z@unverified.example"], MESSAGE,
                                     mail_options=("REQUIRETLS", "RET=FULL"), starttls=True)
        self.assertEqual(code, 250)
        arrived = (yield good.wait_for(1))[0]
        self.assertTrue(arrived.tls)
        self.assertIn("REQUIRETLS", arrived.mail_params)             # RFC 8689 4.2.1: passed on
        seen = {}
        yield until(lambda: self._collect(home, seen) >= 2, "reports for both refused recipients")
        self.assertEqual(seen["y@lacking.example"]["Status"], "5.7.30")
        self.assertEqual(seen["z@unverified.example"]["Status"], "5.7.10")
        self.assertEqual({b["Action"] for b in seen.values()}, {"failed"})
        self.assertEqual((lacking.transactions, unverified.transactions), ([], []))   # never sent there
        for dsn in home.messages:
            # RFC 8689 5: the report goes with REQUIRETLS, and as RET=HDRS whatever RET said.
            self.assertEqual(dsn.mail_from, "")
            self.assertIn("REQUIRETLS", dsn.mail_params)
            self.assertTrue(dsn.tls)
            self.assertNotIn(SECRET, dsn.data)
            self.assertIn(b"Content-Type: text/rfc822-headers", dsn.data)

    @staticmethod
    def _collect(sink: Sink, seen: dict) -> int:
        for dsn in sink.messages:
            for block in report_blocks(dsn.data)[1]:
                seen[block["Final-Recipient"].split(";", 1)[1].strip()] = block
        return len(seen)

    @defer.inlineCallbacks
    def test_the_report_of_a_requiretls_message_is_not_held_back(self):
        # RFC 8689 5: a bounce (from <>) SHOULD NOT be discarded because the next hop lacks REQUIRETLS.
        lacking, lacking_port = self.sink(requiretls=False)
        home, home_port = self.sink(tls=False)
        relay = self.relay(self.transport("lacking", lacking_port) + self.transport("home", home_port, tls=False)
                           + '[[route]]\nrecipients = ["lacking.example"]\ntransport = "lacking"\n\n'
                           + '[[route]]\nrecipients = ["*"]\ntransport = "home"\n\n')
        code, _ = yield relay.submit("relay", "app@example.org", ["y@lacking.example"], MESSAGE,
                                     mail_options=("REQUIRETLS",), starttls=True)
        self.assertEqual(code, 250)
        dsn = (yield home.wait_for(1))[0]
        self.assertEqual((dsn.mail_from, dsn.tls), ("", False))
        self.assertNotIn("REQUIRETLS", dsn.mail_params)
        self.assertEqual(report_blocks(dsn.data)[1][0]["Status"], "5.7.30")

    @defer.inlineCallbacks
    def test_a_message_without_requiretls_goes_anywhere(self):
        lacking, lacking_port = self.sink(requiretls=False)
        relay = self.relay(self.transport("lacking", lacking_port, verify=False)
                           + '[[route]]\nrecipients = ["*"]\ntransport = "lacking"\n\n')
        code, _ = yield relay.submit("relay", "app@example.org", ["y@lacking.example"], MESSAGE)
        self.assertEqual(code, 250)
        arrived = (yield lacking.wait_for(1))[0]
        self.assertNotIn("REQUIRETLS", arrived.mail_params)


class TLSRequiredNo(Base):
    """Direct delivery under `tls = "verify"` to exchangers that cannot meet it: a message tagged
    `TLS-Required: No` goes anyway (RFC 8689 4.2.2), the others wait."""

    @defer.inlineCallbacks
    def deliver(self, mx: Sink, mx_port: int):
        self.dns = DNSServer({("far.example", "MX"): ["10 mx.far.example."],
                              ("mx.far.example", "A"): ["127.0.0.1"]})
        dns_port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        home, home_port = self.sink(tls=False)
        logs = LogLines(self)
        relay = self.relay(self.transport("home", home_port, tls=False)
                           + '[[route]]\nrecipients = ["example.org"]\ntransport = "home"\n\n'
                           + f'[delivery]\ntls = "verify"\nmx_port = {mx_port}\n'
                           f'nameservers = ["127.0.0.1:{dns_port}"]\n\n')
        for body in (MESSAGE, TLS_NO):
            code, _ = yield relay.submit("relay", "app@example.org", ["u@far.example"], body)
            self.assertEqual(code, 250)
        arrived = (yield mx.wait_for(1))[0]
        yield until(lambda: "deferred u@far.example" in logs.text(), "the other message to be deferred")
        yield task.deferLater(reactor, 1.5, lambda: None)        # a retry of the other one, if any, is due
        self.assertEqual(len(mx.messages), 1)
        self.assertEqual(home.messages, [])                          # no bounce: the other one waits
        return arrived, logs.text()

    @defer.inlineCallbacks
    def test_no_starttls_offered(self):
        mx, port = self.sink(tls=False)
        arrived, logs = yield self.deliver(mx, port)
        self.assertIn(b"TLS-Required: No", arrived.data)
        self.assertFalse(arrived.tls)
        self.assertIn("4.7.4", logs)

    @defer.inlineCallbacks
    def test_certificate_not_verified(self):
        stranger = TestCA("a CA nobody trusts")
        mx, port = self.sink(tls=True, ca=stranger)
        arrived, logs = yield self.deliver(mx, port)
        self.assertIn(b"TLS-Required: No", arrived.data)
        self.assertTrue(arrived.tls)                 # RFC 8689 4.2.2: STARTTLS still, if it can be had
        self.assertIn("4.7.5", logs)


class DirectDelivery(Base):
    """RFC 8689 4.2.1 under `tls = "verify"`: an exchanger without REQUIRETLS is left for the next one;
    only when none can take the message does it bounce (5.7.30)."""

    @defer.inlineCallbacks
    def deliver(self, second_offers: bool):
        port = free_port()
        sinks = []
        for address, name, offers in (("127.0.0.2", "mx1.rt.example", False),
                                      ("127.0.0.3", "mx2.rt.example", second_offers)):
            sink = Sink(requiretls=offers)
            sink.start(reactor, port=port, interface=address, tls_options=self.ca.server_options(name))
            self.addCleanup(sink.stop)
            sinks.append(sink)
        dns = DNSServer({("rt.example", "MX"): ["10 mx1.rt.example.", "20 mx2.rt.example."],
                         ("mx1.rt.example", "A"): ["127.0.0.2"], ("mx2.rt.example", "A"): ["127.0.0.3"]})
        dns_port = dns.start(reactor)
        self.addCleanup(dns.stop)
        resolver = MXResolver((("127.0.0.1", dns_port),), reactor, timeout=2.0)
        self.addCleanup(resolver.stop)
        mx = MXDelivery(DeliveryConfig(tls="verify", mx_port=port), "relay.test", reactor, resolver=resolver,
                        trust_root=ssl.Certificate.loadPEM(self.ca.pem))
        self.addCleanup(mx.close_idle)
        envelope = Envelope(sender="app@example.org", recipients=("u@rt.example",), received_at=0.0,
                            params={"REQUIRETLS": True})
        results = yield mx.deliver(SpoolLike("Q1", envelope, MESSAGE), ["u@rt.example"])
        return results[0], sinks

    @defer.inlineCallbacks
    def test_the_next_exchanger_that_offers_it_gets_the_message(self):
        result, (first, second) = yield self.deliver(second_offers=True)
        self.assertEqual(result.code, 250, result)
        self.assertEqual(first.transactions, [])
        self.assertIn("REQUIRETLS", second.messages[0].mail_params)

    @defer.inlineCallbacks
    def test_none_offers_it_bounces(self):
        result, (first, second) = yield self.deliver(second_offers=False)
        self.assertEqual((result.code, result.status), (550, "5.7.30"), result)
        self.assertIn("mx2.rt.example", result.remote_host)          # the last one asked
        self.assertEqual((first.transactions, second.transactions), ([], []))


@implementer(ISpooledMessage)
class SpoolLike:
    """A spooled message as the next hops see it: queue id, envelope, size, open()."""
    path = None           # not read from a spool file

    def __init__(self, queue_id: str, envelope: Envelope, data: bytes):
        self.queue_id, self.envelope, self.data = queue_id, envelope, data
        self.size = len(data)

    def open(self):
        return io.BytesIO(self.data)


class TestDoubleTests(unittest.TestCase):
    def test_the_message_double_is_an_ispooledmessage(self):
        """What the hops here are given provides the interface they rely on (no probing)."""
        envelope = Envelope("a@example.org", ("b@example.net",), 0.0)
        self.assertTrue(verifyObject(ISpooledMessage, SpoolLike("Q1", envelope, b"Subject: x\r\n\r\ny\r\n")))
