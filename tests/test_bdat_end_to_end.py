"""CHUNKING through the whole relay over real sockets: a raw client (tests.support.wire; no stdlib or
aiosmtpd client speaks BDAT) sends messages in BDAT chunks, pipelined with MAIL and RCPT, to the relay
built by `make_service`, which spools them and delivers them to a real SMTP next hop (tests.support.sink).

What must hold: the message arrives byte for byte as the chunks carried it, under our Received header;
a chunk holding a DATA terminator and a whole second transaction is content, never a second message
(SMTP smuggling); the spool sees the content as DATA's (8-bit octets → BODY=8BITMIME at the hop, a line
over 998 octets re-encoded); a refused message leaves the session in step and nothing reaches the hop."""
from __future__ import annotations

import email

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from tests.support.sink import Sink
from tests.support.wire import WireClient, malformed
from tests.support.content import start_relay
from tests.support.messages import strip_received

MESSAGE = ("From: App <app@example.org>\r\nTo: u@example.com\r\nSubject: chunked\r\n"
           "Content-Type: text/plain; charset=utf-8\r\n\r\nGrüße aus Köln\r\n..two dots stay two\r\n.\r\n"
           "MAIL FROM:<ceo@example.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n"
           "\r\npay now\r\n.\r\nlast line\r\n").encode("utf-8")
LONG = (b"From: app@example.org\r\nTo: u@example.com\r\nSubject: long\r\n\r\n"
        + b" ".join(b"word%d" % i for i in range(600)) + b"\r\n")
assert len(LONG) > 3000


def bdat(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


class BdatEndToEnd(unittest.TestCase):
    timeout = 90

    def setUp(self):
        self.sink = Sink()
        port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        self.relay = start_relay(self, port)

    def session(self) -> list:
        """One connection: the chunked message, a refused one, a long-line one; every reply, in order."""
        client = WireClient("127.0.0.1", self.relay.ports["relay"], timeout=30)
        try:
            client.reply()
            ehlo = client.command("EHLO client.test")
            assert b"CHUNKING" in [line[4:] for line in ehlo.lines], ehlo.lines
            # One write: MAIL, RCPT, four chunks and BDAT 0 LAST (RFC 2920 pipelining), cut inside the
            # UTF-8, inside "\r\n.\r\n" and inside the smuggled commands.
            cuts = [0, MESSAGE.index(b"\xc3\xb6") + 1, MESSAGE.index(b"\r\n.\r\nMAIL") + 3,
                    MESSAGE.index(b"DATA") + 2, len(MESSAGE)]
            client.send(b"MAIL FROM:<app@example.org>\r\nRCPT TO:<u@example.com>\r\n" + b"".join(
                bdat(MESSAGE[a:b]) for a, b in zip(cuts, cuts[1:])) + b"BDAT 0 LAST\r\n")
            for _ in range(2 + 4 + 1):
                client.reply(b"first message")
            client.send(b"MAIL FROM:<app@example.org>\r\nRCPT TO:<u@example.com>\r\n"
                        + bdat(b"Subject: bare\r\n\r\nbare\rCR\r\n") + bdat(b"more\r\n", last=True))
            for _ in range(4):
                client.reply(b"bare CR")
            client.send(b"MAIL FROM:<app@example.org>\r\nRCPT TO:<u@example.com>\r\n" + bdat(LONG, last=True))
            for _ in range(3):
                client.reply(b"long line")
            client.command("QUIT")
            return client.replies
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_chunks_arrive_byte_exact_and_a_smuggled_transaction_stays_content(self):
        replies = yield threads.deferToThread(self.session)
        self.assertEqual(malformed(replies), [])
        codes = [(r.code, r.lines[-1][4:9]) for r in replies]
        self.assertEqual(codes[2:9], [(250, b"2.1.0"), (250, b"2.1.5")] + [(250, b"2.0.0")] * 5)
        self.assertIn(b"queued as", replies[8].lines[0])
        self.assertEqual(codes[9:13], [(250, b"2.1.0"), (250, b"2.1.5"), (550, b"5.6.1"), (550, b"5.6.1")])
        self.assertIn(b"5.6.11 Message refused: bare CR", replies[11].lines[0])
        self.assertEqual(codes[13:16], [(250, b"2.1.0"), (250, b"2.1.5"), (250, b"2.0.0")])
        self.assertEqual(codes[16], (221, b"2.0.0"))

        arrived = yield self.sink.wait_for(2)
        yield task.deferLater(reactor, 0.5, lambda: None)   # a smuggled or refused message would be here now
        self.assertEqual(len(self.sink.transactions), 2)
        chunked, long = sorted(arrived, key=lambda t: b"Subject: long" in t.data)
        # Byte for byte what the chunks carried, under the Received header we put on top.
        self.assertEqual(strip_received(chunked.data), MESSAGE)
        self.assertTrue(chunked.data.startswith(b"Received: from client.test ([127.0.0.1])\r\n"
                                                b"\tby relay.test (mailrelay) with ESMTP\r\n"), chunked.data[:100])
        self.assertEqual(chunked.rcpt_tos, ["u@example.com"])
        # The "." lines go out dot-stuffed (RFC 5321 4.5.2): the next hop never sees an end of data there.
        self.assertIn(b"\r\n..\r\nMAIL FROM:<ceo@example.org>\r\n", chunked.data_raw)
        self.assertIn(b"\r\n...two dots stay two\r\n", chunked.data_raw)
        # The spool saw the 8-bit octets in the chunks: declared to the hop, which offers 8BITMIME.
        self.assertIn("BODY=8BITMIME", chunked.mail_params)
        # ... and the line over 998 octets: re-encoded, none that long leaves.
        self.assertLessEqual(max(len(line) for line in long.data_raw.split(b"\r\n")), 998)
        body = email.message_from_bytes(long.data).get_payload(decode=True)
        self.assertEqual(body.rstrip(b"\r\n"), LONG.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n"))
        self.assertNotIn(b"bare", b"".join(t.data_raw for t in self.sink.transactions))
