"""Message content through the whole relay over real sockets: a real client (smtplib) submits, the relay
built by `make_service` spools and delivers to a real SMTP sink (tests.support.sink) as next hop.

NUL octets are refused at the door and never reach the next hop (SMTP smuggling); 8-bit content reaches a
next hop without 8BITMIME only converted to 7-bit MIME (signed after converting), and one with 8BITMIME
gets the original bytes."""
from __future__ import annotations

import email
import io
import smtplib

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from mailrelay.dkim.keys import SigningKey
from mailrelay.dkim.signer import Signer
from tests.support.sink import DEFAULT_EXTENSIONS, Sink
from tests.support.messages import strip_received
from tests.support.content import PARTNER, DKIMRelayTestCase, start_relay

CLEAN = b"From: app@example.org\r\nTo: u@example.com\r\nSubject: clean\r\n\r\nfine\r\n"
SMUGGLED = (b"From: app@example.org\r\nTo: u@example.com\r\nSubject: one\r\n\r\nbody\r\n\x00.\r\n"
            b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
            b"From: ceo@example.org\r\nSubject: smuggled\r\n\r\npay now\r\n")


class NulEndToEnd(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)

    def session(self, port: int) -> list:
        """One SMTP session: the smuggling payload, then a clean message; each DATA's (code, text)."""
        replies = []
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            for data in (SMUGGLED, CLEAN):
                smtp.mail("app@example.org")
                smtp.rcpt("u@example.com")
                try:
                    replies.append(smtp.data(data))
                except smtplib.SMTPDataError as e:
                    replies.append((e.smtp_code, e.smtp_error))
        return replies

    @defer.inlineCallbacks
    def test_crlf_nul_dot_crlf_is_refused_and_nothing_of_it_reaches_the_next_hop(self):
        relay = start_relay(self, self.sink_port)
        replies = yield threads.deferToThread(self.session, relay.ports["relay"])
        self.assertEqual(replies[0], (550, b"5.6.0 Message refused: NUL octet in message content"))
        self.assertEqual(replies[1][0], 250)          # the session stayed in step: the next message works
        [arrived] = yield self.sink.wait_for(1)
        yield task.deferLater(reactor, 0.5, lambda: None)     # a smuggled second message would be here by now
        self.assertEqual(len(self.sink.transactions), 1)
        self.assertTrue(arrived.data.endswith(CLEAN), arrived.data[-200:])
        self.assertEqual(arrived.rcpt_tos, ["u@example.com"])
        self.assertNotIn(b"\x00", b"".join(t.data_raw for t in self.sink.transactions))
        self.assertNotIn(b"smuggled", b"".join(t.data_raw for t in self.sink.transactions))


TEXT = "Grüße aus Köln, ½ €\r\n.\r\n--not-a-boundary\r\n" + "é" * 300 + "\r\ntrailing \r\n"
# 8-bit body, nothing declared: smtplib sends no BODY= parameter, as a careless client would not.
EIGHT_BIT = (b"From: App <app@example.org>\r\nTo: u@example.com\r\nSubject: greetings\r\n"
             b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + TEXT.encode("utf-8"))
MULTIPART = (b"From: app@example.org\r\nTo: u@example.com\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
             b"ascii part\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
             b"\r\n" + TEXT.encode("utf-8") + b"--b--\r\n")


def texts(data: bytes) -> list:
    return [p.get_payload(decode=True) for p in email.message_from_bytes(data).walk()
            if p.get_content_maintype() == "text"]


class EightBitEndToEnd(DKIMRelayTestCase):
    timeout = 90

    def assertPure7Bit(self, data: bytes) -> None:
        self.assertTrue(data.isascii(), data[:400])
        self.assertTrue(all(len(line) <= 78 for line in data.split(b"\r\n")))

    @defer.inlineCallbacks
    def test_a_next_hop_without_8bitmime_gets_7bit_mime_that_decodes_to_the_original(self):
        relay = self.relay(self.sink())
        for message in (EIGHT_BIT, MULTIPART):
            code, _ = yield relay.submit("relay", "app@example.org", ["u@example.com"], message)
            self.assertEqual(code, 250)
        arrived = yield self.next_hop.wait_for(2)
        for transaction, message in zip(sorted(arrived, key=lambda t: b"parts" in t.data), (EIGHT_BIT, MULTIPART)):
            self.assertPure7Bit(transaction.data_raw)
            self.assertFalse(any(p.startswith("BODY=") for p in transaction.mail_params), transaction.mail_params)
            self.assertEqual(texts(transaction.data), texts(message))
            self.assertIn(TEXT.encode("utf-8").rstrip(b"\r\n"), texts(transaction.data)[-1])
        single = strip_received(sorted(arrived, key=lambda t: b"parts" in t.data)[0].data)
        self.assertTrue(single.startswith(EIGHT_BIT.split(b"\r\n\r\n")[0] + b"\r\nMIME-Version: 1.0\r\n"
                                          b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"), single[:400])

    @defer.inlineCallbacks
    def test_with_dkim_the_signature_is_made_after_converting_and_verifies(self):
        relay = self.relay(self.sink(), '[dkim]\nmode = "sign"\n[[dkim.key]]\ndomain = "example.org"\n'
                                        'selector = "rsa"\nkey_file = "rsa.pem"\n')
        for message in (EIGHT_BIT, MULTIPART):
            code, _ = yield relay.submit("relay", "app@example.org", ["u@example.com"], message)
            self.assertEqual(code, 250)
        arrived = yield self.next_hop.wait_for(2)
        for transaction in arrived:
            self.assertTrue(transaction.data.startswith(b"DKIM-Signature: "), transaction.data[:80])
            self.assertPure7Bit(transaction.data_raw)
            results = yield self.verify(transaction.data)
            self.assertEqual(results, [True], transaction.data[:600])

    @defer.inlineCallbacks
    def test_verification_results_are_those_of_the_message_as_received(self):
        relay = self.relay(self.sink(), '[dkim]\nmode = "passthrough"\nverify = true\n')
        body = EIGHT_BIT.replace(b"app@example.org", b"news@partner.example")
        signed = Signer([SigningKey("partner.example", "up", PARTNER)]).sign(io.BytesIO(body)) + body
        code, _ = yield relay.submit("relay", "news@partner.example", ["u@example.com"], signed)
        self.assertEqual(code, 250)
        [arrived] = yield self.next_hop.wait_for(1)
        self.assertPure7Bit(arrived.data_raw)
        self.assertIn(b"dkim=pass header.d=partner.example", arrived.data.split(b"\r\n\r\n")[0])

    @defer.inlineCallbacks
    def test_a_next_hop_with_8bitmime_gets_the_original_bytes_declared_8bitmime(self):
        relay = self.relay(self.sink(DEFAULT_EXTENSIONS))
        code, _ = yield relay.submit("relay", "app@example.org", ["u@example.com"], EIGHT_BIT)
        self.assertEqual(code, 250)
        [arrived] = yield self.next_hop.wait_for(1)
        self.assertEqual(strip_received(arrived.data), EIGHT_BIT)
        self.assertIn("BODY=8BITMIME", arrived.mail_params)      # known from receiving, though undeclared

    @defer.inlineCallbacks
    def test_an_8bit_header_is_never_sent_to_a_next_hop_without_8bitmime(self):
        relay = self.relay(self.sink())
        message = EIGHT_BIT.replace(b"Subject: greetings", "Subject: Grüße".encode("utf-8"))
        code, _ = yield relay.submit("relay", "app@example.org", ["u@example.com"], message)
        self.assertEqual(code, 250)
        code, _ = yield relay.submit("relay", "app@example.org", ["u@example.com"], CLEAN)
        self.assertEqual(code, 250)
        arrived = yield self.next_hop.wait_for(2)          # the clean message, and the bounce to the sender
        self.assertTrue(all(t.data_raw.isascii() for t in self.next_hop.transactions))
        by_subject = {email.message_from_bytes(t.data)["Subject"]: t for t in arrived}
        self.assertEqual(sorted(by_subject), ["Undelivered Mail Returned to Sender", "clean"])
        bounce = by_subject["Undelivered Mail Returned to Sender"]
        self.assertEqual(bounce.rcpt_tos, ["app@example.org"])
        self.assertIn(b"Status: 5.6.3", bounce.data)
        self.assertIn(b"8-bit octets in a header field cannot be converted", bounce.data)
