"""Lines over 998 octets through the whole relay over real sockets: a real client (smtplib) submits a
message with a 3,000-octet line, the relay built by `make_service` accepts and spools it, and delivers it
to a real SMTP sink (tests.support.sink) that offers 8BITMIME and to one that does not.  Neither ever
sees a line over 998 octets (RFC 5322 2.1.1); what it decodes is what the client sent; with DKIM on,
the signature (made after re-encoding) verifies at the hop."""
from __future__ import annotations

import email
import smtplib

from twisted.internet import defer, threads

from tests.support.content import WITHOUT_8BITMIME, DKIMRelayTestCase, start_relay
from tests.support.messages import strip_received
from tests.support.sink import DEFAULT_EXTENSIONS

HTML = b"<html><body>" + b"".join(b"<tr><td>row %d</td><td>ok</td></tr>" % i for i in range(90)) + b"</body></html>"
assert len(HTML) > 3000
LOG = b" ".join(b"2026-12-03T12:00:%02d app[42]: request id=%d done in 3ms" % (i % 60, i) for i in range(60))
assert len(LOG) > 3000
PLAIN = (b"From: App <app@example.org>\r\nTo: u@example.com\r\nSubject: report\r\n"
         b"Content-Type: text/html; charset=us-ascii\r\n\r\n" + HTML + b"\r\n")
MIXED = (b"From: app@example.org\r\nTo: u@example.com\r\nSubject: logs\r\nMIME-Version: 1.0\r\n"
         b"References: " + b" ".join(b"<%d.thread@example.org>" % i for i in range(120)) + b"\r\n"
         b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
         b"--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
         + "Grüße, das Protokoll:\r\n".encode("utf-8") +
         b"--b\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n" + LOG + b"\r\n.\r\n--b--\r\n")
DKIM = '[dkim]\nmode = "sign"\n[[dkim.key]]\ndomain = "example.org"\nselector = "rsa"\nkey_file = "rsa.pem"\n'


def parts(data: bytes) -> list:
    return [(p.get_content_type(), p.get_payload(decode=True)) for p in email.message_from_bytes(data).walk()
            if not p.is_multipart()]


class LongLinesEndToEnd(DKIMRelayTestCase):
    timeout = 120

    def assertNoLongLine(self, data_raw: bytes) -> None:
        longest = max(len(line) for line in data_raw.split(b"\r\n"))
        self.assertLessEqual(longest, 998, data_raw[:400])

    @defer.inlineCallbacks
    def deliver(self, extensions, dkim_section: str = "") -> defer.Deferred:
        relay = self.relay(self.sink(extensions), dkim_section)
        for message in (PLAIN, MIXED):
            code, _ = yield relay.submit("relay", "app@example.org", ["u@example.com"], message)
            self.assertEqual(code, 250)               # accepted: no more 554 for a line over 998 octets
        arrived = yield self.next_hop.wait_for(2)
        return sorted(arrived, key=lambda t: b"Subject: logs" in t.data)

    def assertSameContent(self, arrived) -> None:
        for transaction, message in zip(arrived, (PLAIN, MIXED)):
            self.assertNoLongLine(transaction.data_raw)
            self.assertEqual(parts(transaction.data), parts(message))
            got = email.message_from_bytes(transaction.data)
            self.assertEqual(got["Subject"], email.message_from_bytes(message)["Subject"])
        references = email.message_from_bytes(arrived[1].data)["References"]
        self.assertEqual(references.replace("\r\n", ""), email.message_from_bytes(MIXED)["References"])

    @defer.inlineCallbacks
    def test_a_next_hop_with_8bitmime_never_sees_a_line_over_998(self):
        arrived = yield self.deliver(DEFAULT_EXTENSIONS)
        self.assertSameContent(arrived)
        plain, mixed = arrived
        self.assertTrue(strip_received(plain.data).startswith(
            PLAIN.split(b"\r\n\r\n")[0] + b"\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable"
            b"\r\n\r\n<html>"), plain.data[:400])
        # The hop takes 8-bit: the 8-bit part goes as it is, declared BODY=8BITMIME; only the long one changed.
        self.assertIn("Grüße, das Protokoll:\r\n".encode("utf-8"), mixed.data)
        self.assertIn("BODY=8BITMIME", mixed.mail_params)

    @defer.inlineCallbacks
    def test_a_next_hop_without_8bitmime_gets_7bit_mime_without_long_lines(self):
        arrived = yield self.deliver(WITHOUT_8BITMIME)
        self.assertSameContent(arrived)
        for transaction in arrived:
            self.assertTrue(transaction.data_raw.isascii())
            self.assertFalse(any(p.startswith("BODY=") for p in transaction.mail_params))

    @defer.inlineCallbacks
    def test_with_dkim_the_signature_is_made_after_reencoding_and_verifies_at_either_hop(self):
        for extensions in (DEFAULT_EXTENSIONS, WITHOUT_8BITMIME):
            arrived = yield self.deliver(extensions, DKIM)
            self.assertSameContent(arrived)
            for transaction in arrived:
                self.assertTrue(transaction.data.startswith(b"DKIM-Signature: "), transaction.data[:80])
                results = yield self.verify(transaction.data)
                self.assertEqual(results, [True], transaction.data[:600])

    @defer.inlineCallbacks
    def test_a_line_over_the_bound_is_refused_and_the_session_goes_on(self):
        relay = self.relay(self.sink(DEFAULT_EXTENSIONS), "[limits]\nmax_line_length = 2000\n")

        def session():
            replies = []
            with smtplib.SMTP("127.0.0.1", relay.ports["relay"], timeout=30) as smtp:
                smtp.ehlo("client.test")
                for message in (PLAIN, b"Subject: short\r\n\r\n" + b"s" * 1500 + b"\r\n"):
                    smtp.mail("app@example.org")
                    smtp.rcpt("u@example.com")
                    try:
                        replies.append(smtp.data(message))
                    except smtplib.SMTPDataError as e:
                        replies.append((e.smtp_code, e.smtp_error))
            return replies

        replies = yield threads.deferToThread(session)
        self.assertEqual(replies[0], (554, b"5.6.0 Message refused: a text line is longer than 2000 octets, "
                                           b"the most this relay accepts"))
        self.assertEqual(replies[1][0], 250)
        [arrived] = yield self.next_hop.wait_for(1)
        self.assertIn(b"Subject: short", arrived.data)
        self.assertNoLongLine(arrived.data_raw)

    @defer.inlineCallbacks
    def test_a_separate_delivery_process_knows_the_long_lines_too(self):
        relay = start_relay(self, self.sink(DEFAULT_EXTENSIONS), '[delivery]\nprocess = "separate"\n')
        code, _ = yield relay.submit("relay", "app@example.org", ["u@example.com"], PLAIN)
        self.assertEqual(code, 250)
        [arrived] = yield self.next_hop.wait_for(1)
        self.assertNoLongLine(arrived.data_raw)
        self.assertEqual(parts(arrived.data), parts(PLAIN))
