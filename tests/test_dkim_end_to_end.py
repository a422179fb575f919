"""DKIM through the whole relay: messages signed by the relay verify at a real SMTP peer with dkimpy, keys
served by a real DNS server on loopback; upstream signatures pass through byte for byte."""
from __future__ import annotations

import io

import dkim
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from mailrelay.dkim import keys
from mailrelay.dkim.keys import SigningKey
from mailrelay.dkim.signer import Signer
from mailrelay.dkim.verifier import make_resolver, txt_lookup
from tests.support.dnsserver import DNSServer
from tests.support.relay import SEPARATE, RelayFixture
from tests.support.sink import Sink
from tests.support.messages import strip_received

RSA = keys.generate("rsa", 2048)
ED = keys.generate("ed25519")
PARTNER = keys.generate("rsa", 2048)

MESSAGES = [
    b"From: App <app@example.org>\r\nTo: u@example.com\r\nSubject: caf\xc3\xa9\r\n\r\ngr\xc3\xbc\xc3\x9fe\r\n",
    b"From: app@example.org\r\nTo: a@example.com,\r\n  b@example.com,\r\n\tc@example.com\r\nSubject: "
    + b"folded " * 30 + b"\r\n continued\r\n\r\nbody\r\n",
    b"From: app@example.org\r\nSubject: empty body\r\n\r\n",
    b"From: app@sub.example.org\r\nSubject: trailing\r\n\r\nlast\r\n\r\n\r\n\r\n",
]

# Signed upstream with simple/simple, odd whitespace everywhere: any change of a byte would break it.
UPSTREAM = (b"From:  Partner\t<news@partner.example> \r\nTo: u@example.com\r\nSubject:\tspaced   out  \r\n\r\n"
            b"  indented\t\tline  \r\n\r\ntrailing spaces   \r\n")


class DKIMEndToEnd(unittest.TestCase):
    timeout = 90

    def setUp(self):
        self.dns = DNSServer({
            ("rsa._domainkey.example.org", "TXT"): [keys.txt_record(RSA)],
            ("ed._domainkey.example.org", "TXT"): [keys.txt_record(ED)],
            ("up._domainkey.partner.example", "TXT"): [keys.txt_record(PARTNER)],
        })
        self.dns_port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.lookup = txt_lookup(make_resolver([("127.0.0.1", self.dns_port)]))
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)

    def start_relay(self, dkim: str) -> RelayFixture:
        relay = RelayFixture(self.mktemp(), process=SEPARATE)     # signed in the delivery process
        (relay.dir / "rsa.pem").write_bytes(keys.private_pem(RSA))
        (relay.dir / "ed.pem").write_bytes(keys.private_pem(ED))
        relay.path.write_text(relay.path.read_text() + (
            f'[transports.sink]\nhost = "127.0.0.1"\nport = {self.sink_port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n'
            f'[delivery]\nnameservers = ["127.0.0.1:{self.dns_port}"]\n\n' + dkim))
        relay.start(reactor)
        self.addCleanup(relay.stop)
        return relay

    def verify(self, message: bytes):
        def run():
            checker = dkim.DKIM(message)
            count = sum(1 for k, _ in checker.headers if k.lower() == b"dkim-signature")
            results = []
            for index in range(count):
                try:
                    results.append(checker.verify(idx=index, dnsfunc=self.lookup))
                except dkim.ValidationError:
                    results.append(False)
            return results
        return threads.deferToThread(run)

    SIGN = ('[dkim]\nmode = "sign"\n[[dkim.key]]\ndomain = "example.org"\nselector = "rsa"\nkey_file = "rsa.pem"\n'
            '[[dkim.key]]\ndomain = "example.org"\nselector = "ed"\nkey_file = "ed.pem"\n')

    @defer.inlineCallbacks
    def test_relay_signatures_verify_at_the_peer(self):
        relay = self.start_relay(self.SIGN)
        for message in MESSAGES:
            code, _ = yield relay.submit("relay", "app@example.org", ["u@example.com"], message)
            self.assertEqual(code, 250)
        arrived = yield self.sink.wait_for(len(MESSAGES))
        for transaction in arrived:
            self.assertTrue(transaction.data.startswith(b"DKIM-Signature: "), transaction.data[:80])
            results = yield self.verify(transaction.data)
            self.assertEqual(results, [True, True], transaction.data[:300])
            received_at = transaction.data.index(b"\r\nReceived: ") + 2
            self.assertIn(strip_received(transaction.data[received_at:]), MESSAGES)   # the body is untouched

    @defer.inlineCallbacks
    def test_passthrough_keeps_an_upstream_signature_byte_exact(self):
        relay = self.start_relay('[dkim]\nmode = "passthrough"\n')
        signed = Signer([SigningKey("partner.example", "up", PARTNER)],
                        canonicalization=(b"simple", b"simple")).sign(io.BytesIO(UPSTREAM)) + UPSTREAM
        code, _ = yield relay.submit("relay", "news@partner.example", ["u@example.com"], signed)
        self.assertEqual(code, 250)
        arrived = yield self.sink.wait_for(1)
        self.assertEqual(strip_received(arrived[0].data), signed)
        results = yield self.verify(arrived[0].data)
        self.assertEqual(results, [True])

    @defer.inlineCallbacks
    def test_sign_mode_leaves_other_domains_signatures_verifying(self):
        relay = self.start_relay(self.SIGN)
        signed = Signer([SigningKey("partner.example", "up", PARTNER)],
                        canonicalization=(b"simple", b"simple")).sign(io.BytesIO(UPSTREAM)) + UPSTREAM
        code, _ = yield relay.submit("relay", "news@partner.example", ["u@example.com"], signed)
        self.assertEqual(code, 250)
        arrived = yield self.sink.wait_for(1)
        self.assertFalse(arrived[0].data.startswith(b"DKIM-Signature"))    # not ours to sign
        self.assertEqual(strip_received(arrived[0].data), signed)
        results = yield self.verify(arrived[0].data)
        self.assertEqual(results, [True])

    @defer.inlineCallbacks
    def test_verify_removes_results_forged_in_our_name_and_keeps_the_signature_valid(self):
        relay = self.start_relay('[dkim]\nmode = "passthrough"\nverify = true\n')
        signed = Signer([SigningKey("partner.example", "up", PARTNER)]).sign(io.BytesIO(UPSTREAM)) + UPSTREAM
        forged = (b"Authentication-Results: relay.test;\r\n\tdkim=pass header.d=bank.example\r\n"
                  b"Authentication-Results: mx.partner.example; spf=pass\r\n")
        code, _ = yield relay.submit("relay", "news@partner.example", ["u@example.com"], forged + signed)
        self.assertEqual(code, 250)
        arrived = yield self.sink.wait_for(1)
        head = arrived[0].data.split(b"\r\n\r\n")[0]
        self.assertNotIn(b"bank.example", head)                   # the forged verdict is gone
        self.assertIn(b"Authentication-Results: mx.partner.example; spf=pass\r\n", head)   # others stay
        self.assertEqual(head.count(b"Authentication-Results: relay.test;"), 1)           # only ours
        self.assertIn(b"dkim=pass header.d=partner.example", head)
        results = yield self.verify(arrived[0].data)
        self.assertEqual(results, [True])

    @defer.inlineCallbacks
    def test_verify_adds_authentication_results(self):
        relay = self.start_relay('[dkim]\nmode = "passthrough"\nverify = true\n')
        signed = Signer([SigningKey("partner.example", "up", PARTNER)]).sign(io.BytesIO(UPSTREAM)) + UPSTREAM
        code, _ = yield relay.submit("relay", "news@partner.example", ["u@example.com"], signed)
        self.assertEqual(code, 250)
        code, _ = yield relay.submit("relay", "news@partner.example", ["u@example.com"],
                                     signed.replace(b"indented", b"changed!"))
        arrived = yield self.sink.wait_for(2)
        first, second = sorted(arrived, key=lambda t: b"changed!" in t.data)
        self.assertTrue(first.data.startswith(b"Authentication-Results: relay.test;"))
        self.assertIn(b"dkim=pass header.d=partner.example header.s=up", first.data.split(b"\r\n\r\n")[0])
        self.assertIn(b"dkim=fail", second.data.split(b"\r\n\r\n")[0])
