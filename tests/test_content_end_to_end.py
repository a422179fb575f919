"""Message content through the whole relay over real sockets: a real client (smtplib) submits, the relay
built by `make_service` spools and delivers to a real SMTP sink (tests.support.sink) as next hop.

NUL octets are refused at the door and never reach the next hop (SMTP smuggling); 8-bit content reaches a
next hop without 8BITMIME only converted to 7-bit MIME (signed after converting), and one with 8BITMIME
gets the original bytes."""
from __future__ import annotations

import smtplib

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from tests.support.relay import RelayFixture
from tests.support.sink import Sink

CLEAN = b"From: app@example.org\r\nTo: u@example.com\r\nSubject: clean\r\n\r\nfine\r\n"
SMUGGLED = (b"From: app@example.org\r\nTo: u@example.com\r\nSubject: one\r\n\r\nbody\r\n\x00.\r\n"
            b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
            b"From: ceo@example.org\r\nSubject: smuggled\r\n\r\npay now\r\n")


def start_relay(test: unittest.TestCase, sink_port: int, extra: str = "") -> RelayFixture:
    relay = RelayFixture(test.mktemp(), extra=(
        f'[transports.sink]\nhost = "127.0.0.1"\nport = {sink_port}\nsecurity = "none"\n\n'
        '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n' + extra))
    relay.start(reactor)
    test.addCleanup(relay.stop)
    return relay


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
