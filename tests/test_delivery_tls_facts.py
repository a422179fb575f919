"""What TLS protected each delivery, as the metrics and the delivery log line report it: "none",
"tls1.2", "tls1.3", verified or not.

Real next hops: sinks on loopback offering STARTTLS with a certificate from a test CA (a self-signed
certificate the test makes and then trusts), one limited to TLS 1.2, one plaintext; direct MX delivery
through the loopback DNS server.  The metric is read from the relay's registry and from its /metrics
endpoint; the log line from its JSON log file.
"""
from __future__ import annotations

import json
import os

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, ssl
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from mailrelay import tls
from mailrelay.config import DeliveryConfig
from mailrelay.outbound.dns import MXResolver
from mailrelay.outbound.mx import MXDelivery
from tests.support.dnsserver import DNSServer
from tests.support.polling import until
from tests.support.relay import RelayFixture, free_port
from tests.support.sink import Sink
from tests.support.esmtp import FAST
from tests.support.messages import message_to

MESSAGE = b"From: <app@example.org>\r\nTo: <a@v.example>\r\nSubject: tls facts\r\n\r\nhello\r\n"
RESULTS = "mailrelay_delivery_results_total"


class TestCA:
    """A certificate for `name`, self-signed: the CA file that trusts it is the certificate itself."""

    def __init__(self, test: unittest.TestCase, name: str):
        cert_pem, key_pem = tls.generate_self_signed(name)
        self.ca_file = os.path.abspath(test.mktemp())
        with open(self.ca_file, "wb") as f:
            f.write(cert_pem)
        self.trust_root = ssl.Certificate.loadPEM(cert_pem)
        self.private = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)

    def server_options(self, highest: ssl.TLSVersion | None = None) -> ssl.CertificateOptions:
        """Server TLS options, offering at most `highest` (default: whatever OpenSSL does best)."""
        extra = {"lowerMaximumSecurityTo": highest} if highest is not None else {}
        return ssl.CertificateOptions(privateKey=self.private.privateKey.original,
                                      certificate=self.private.original, **extra)


class RelayTLSFactsTests(unittest.TestCase):
    """Through the whole relay: three smarthosts, each protected differently."""
    timeout = 120

    def sink(self, options=None) -> tuple[Sink, int]:
        sink = Sink()
        port = sink.start(reactor, tls_options=options)
        self.addCleanup(sink.stop)
        return sink, port

    @defer.inlineCallbacks
    def setUp(self):
        ca = TestCA(self, "localhost")
        self.verified, verified_port = self.sink(ca.server_options())
        self.tls12, tls12_port = self.sink(ca.server_options(ssl.TLSVersion.TLSv1_2))
        self.plain, plain_port = self.sink()
        self.metrics_port = free_port()
        extra = f'''[transports.checked]
host = "localhost"
port = {verified_port}
security = "starttls"
verify = true
ca_file = "{ca.ca_file}"
[transports.unchecked]
host = "localhost"
port = {tls12_port}
security = "starttls"
verify = false
[transports.plain]
host = "127.0.0.1"
port = {plain_port}
security = "none"
[[route]]
recipients = ["v.example"]
transport = "checked"
[[route]]
recipients = ["u.example"]
transport = "unchecked"
[[route]]
recipients = ["p.example"]
transport = "plain"
[metrics]
endpoint = "tcp:{self.metrics_port}:interface=127.0.0.1"
[log]
format = "json"
file = "relay.log"
'''
        # It reads the counters from this process's registry: the scheduler must run here.
        self.relay = RelayFixture(self.mktemp(), extra=extra, process="inline")
        self.service = self.relay.start(reactor)
        self.addCleanup(self.relay.stop)
        code, _ = yield self.relay.submit("relay", "app@example.org", ["a@v.example", "b@u.example", "c@p.example"],
                                          MESSAGE)
        self.assertEqual(code, 250)
        for sink in (self.verified, self.tls12, self.plain):
            yield sink.wait_for(1)
        yield self.counted(3)

    @defer.inlineCallbacks
    def counted(self, n: int):
        """Wait (bounded) until `n` delivered recipients are counted: the sink's 250 comes first."""
        def total() -> float:
            return sum(s.value for f in self.service.metrics.registry.collect()
                       if f.name == "mailrelay_delivery_results"
                       for s in f.samples if s.name == RESULTS and s.labels["result"] == "delivered")
        yield until(lambda: total() >= n, f"{n} deliveries to be counted", timeout=10, interval=0.05)

    def value(self, **labels) -> float:
        return self.service.metrics.registry.get_sample_value(RESULTS, dict(labels, result="delivered")) or 0.0

    def test_each_smarthost_is_counted_with_what_it_negotiated(self):
        self.assertTrue(self.verified.messages[0].tls and self.tls12.messages[0].tls)
        self.assertFalse(self.plain.messages[0].tls)
        self.assertEqual(self.value(transport="checked", tls="tls1.3", verified="true"), 1)
        self.assertEqual(self.value(transport="unchecked", tls="tls1.2", verified="false"), 1)
        self.assertEqual(self.value(transport="plain", tls="none", verified="false"), 1)
        self.assertEqual(self.value(transport="checked", tls="unknown", verified="false"), 0)

    @defer.inlineCallbacks
    def test_the_metrics_endpoint_shows_the_labels(self):
        response = yield Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/metrics" % self.metrics_port)
        body = (yield readBody(response)).decode()
        samples = {(s.labels["transport"], s.labels["tls"], s.labels["verified"]): s.value
                   for f in text_string_to_metric_families(body) for s in f.samples
                   if s.name == RESULTS and s.labels["result"] == "delivered"}
        self.assertEqual(samples, {("checked", "tls1.3", "true"): 1, ("unchecked", "tls1.2", "false"): 1,
                                   ("plain", "none", "false"): 1})

    def test_the_delivery_log_line_names_the_tls(self):
        events = [json.loads(line) for line in (self.relay.dir / "relay.log").read_text().splitlines()]
        delivered = {e["recipient"]: e.get("tls") for e in events if e.get("stage") == "delivered"}
        self.assertEqual(delivered, {"a@v.example": "tls1.3 verified", "b@u.example": "tls1.2 unverified",
                                     "c@p.example": "none"})


class MXTLSFactsTests(unittest.TestCase):
    """Direct delivery: each recipient's result says what its exchanger's session negotiated."""

    def setUp(self):
        self.dns = DNSServer({("tls.example", "MX"): ["10 mx.tls.example."],
                              ("mx.tls.example", "A"): ["127.0.0.1"]})
        self.nameservers = (("127.0.0.1", self.dns.start(reactor)),)
        self.addCleanup(self.dns.stop)
        self.ca = TestCA(self, "mx.tls.example")

    def mx(self, port: int, policy: str, trust_root=None) -> MXDelivery:
        resolver = MXResolver(self.nameservers, reactor, timeout=2.0)
        self.addCleanup(resolver.stop)
        delivery = DeliveryConfig(mx_port=port, tls=policy, nameservers=self.nameservers)
        mx = MXDelivery(delivery, "relay.test", reactor, resolver=resolver, timeouts=FAST, trust_root=trust_root)
        self.addCleanup(mx.close_idle)
        return mx

    @defer.inlineCallbacks
    def facts(self, policy: str, options=None, trust_root=None):
        sink = Sink()
        port = sink.start(reactor, tls_options=options)
        self.addCleanup(sink.stop)
        [result] = yield self.mx(port, policy, trust_root).deliver(message_to("b@tls.example"), ["b@tls.example"])
        self.assertTrue(result.delivered, result)
        return result.tls, result.tls_verified

    @defer.inlineCallbacks
    def test_plaintext_exchanger(self):
        self.assertEqual((yield self.facts("opportunistic")), ("none", False))

    @defer.inlineCallbacks
    def test_opportunistic_tls_is_encrypted_but_not_verified(self):
        self.assertEqual((yield self.facts("opportunistic", self.ca.server_options())), ("tls1.3", False))

    @defer.inlineCallbacks
    def test_tls12_exchanger(self):
        options = self.ca.server_options(ssl.TLSVersion.TLSv1_2)
        self.assertEqual((yield self.facts("required", options)), ("tls1.2", False))

    @defer.inlineCallbacks
    def test_verify_with_a_trusted_certificate_for_the_mx_name_is_verified(self):
        facts = yield self.facts("verify", self.ca.server_options(), self.ca.trust_root)
        self.assertEqual(facts, ("tls1.3", True))


class DescribeTests(unittest.TestCase):
    def test_log_text(self):
        from mailrelay.queue.results import describe_tls as describe

        self.assertEqual([describe("tls1.3", True), describe("tls1.2", False), describe("none", True),
                          describe(None, False)], ["tls1.3 verified", "tls1.2 unverified", "none", None])
