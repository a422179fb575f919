"""MTA-STS and DANE through a real twistd process with its delivery process (the default mode): the
loopback DNS server, a real HTTPS policy host and TLS exchangers; the relay trusts the test CA through
`[delivery] ca_file`.  What an operator sees: the message delivered over verified TLS, or waiting in the
queue with the policy's reason (`mailrelay queue list`), the policy cached under the spool, the outcome
counted in the metrics.
"""
from __future__ import annotations

import subprocess
import sys

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from tests.support.relay import SEPARATE, RelayFixture, free_port
from tests.support.tlsworld import World, record, sink_cert

MESSAGE = b"From: <app@example.org>\r\nTo: <b@example.net>\r\nSubject: policy\r\n\r\nhello\r\n"


class TLSPolicyEndToEndTests(unittest.TestCase):
    timeout = 180

    def relay(self, world: World) -> RelayFixture:
        self.metrics_port = free_port()
        extra = f'''[delivery]
nameservers = ["127.0.0.1:{world.nameservers[0][1]}"]
mx_port = {world.mx_port}
mta_sts_port = {world.policy_port}
ca_file = "{world.ca_file}"

[queue]
first_retry = "1s"
max_retry = "2s"

[metrics]
endpoint = "tcp:{self.metrics_port}:interface=127.0.0.1"
'''
        relay = RelayFixture(self.mktemp(), extra=extra, process=SEPARATE)
        self.addCleanup(relay.kill)
        return relay

    @defer.inlineCallbacks
    def submit(self, relay: RelayFixture):
        yield threads.deferToThread(relay.spawn)
        code, _ = yield relay.submit("relay", "app@example.org", ["b@example.net"], MESSAGE)
        self.assertEqual(code, 250)

    def queue(self, relay: RelayFixture, *argv: str) -> str:
        return subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "queue", *argv, "--config",
                               str(relay.path)], capture_output=True, text=True, timeout=60).stdout

    @defer.inlineCallbacks
    def metrics(self) -> defer.Deferred:
        response = yield Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/metrics" % self.metrics_port)
        return (yield readBody(response)).decode()

    @defer.inlineCallbacks
    def test_enforced_mta_sts_delivers_over_verified_tls(self):
        world = World(self)
        world.zone(("example.net", "MX"), ["10 mx1.example.net."])
        sink = world.exchanger("mx1.example.net", "127.0.0.2", tls="good")
        world.publish("example.net", "enforce", ["mx1.example.net"])
        relay = self.relay(world)
        yield self.submit(relay)
        [delivered] = yield sink.wait_for(1)
        self.assertTrue(delivered.tls)
        self.assertTrue((relay.dir / "spool" / "mta-sts" / "example.net.json").exists())
        text = yield self.metrics()
        self.assertIn('mailrelay_tls_policy_results_total{policy="sts",result="success"} 1.0', text)

    @defer.inlineCallbacks
    def test_a_wrong_certificate_under_enforce_keeps_the_mail_queued_with_the_reason(self):
        world = World(self)
        world.zone(("example.net", "MX"), ["10 mx1.example.net."])
        sink = world.exchanger("mx1.example.net", "127.0.0.2", tls="wrong-name")
        world.publish("example.net", "enforce", ["mx1.example.net"])
        relay = self.relay(world)
        yield self.submit(relay)
        listing = ""
        for _ in range(300):
            listing = yield threads.deferToThread(self.queue, relay, "list")
            if "4.7.5" in listing:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertIn("4.7.5", listing)
        shown = yield threads.deferToThread(self.queue, relay, "show", listing.split()[0])
        self.assertIn("refused by the MTA-STS policy of example.net", shown)
        self.assertIn("certificate-host-mismatch", shown)
        self.assertEqual(sink.messages, [])
        self.assertTrue(sink.sessions)          # it was asked, over TLS, and refused before MAIL FROM
        self.assertFalse(any(line.startswith(b"MAIL") for s in sink.sessions for _, line in s.commands))

    @defer.inlineCallbacks
    def test_dane_ee_authenticates_a_self_signed_exchanger(self):
        world = World(self, authenticated=True)
        world.zone(("example.net", "MX"), ["10 mx1.example.net."])
        sink = world.exchanger("mx1.example.net", "127.0.0.2", tls="self-signed")
        from cryptography import x509
        world.zone((f"_{world.mx_port}._tcp.mx1.example.net", "TLSA"),
                   [record(3, 1, 1, x509.load_pem_x509_certificate(sink_cert(sink))).text()])
        relay = self.relay(world)
        yield self.submit(relay)
        [delivered] = yield sink.wait_for(1)
        self.assertTrue(delivered.tls)
        text = yield self.metrics()
        self.assertIn('mailrelay_tls_policy_results_total{policy="tlsa",result="success"} 1.0', text)
