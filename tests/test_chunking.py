"""Outgoing CHUNKING (RFC 3030): mailrelay.outbound.chunking.  The chunk reader's edges, the BDAT
conversation (pipelined with MAIL and RCPT, chunk windows, a refused chunk, LMTP's per-recipient replies
after BDAT LAST), and deliveries to the real loopback sink offering CHUNKING, byte for byte, directly
and through the relay.
"""
from __future__ import annotations

import io

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailrelay.outbound import chunking
from mailrelay.outbound.chunking import ChunkingClient, ChunkReader
from mailrelay.queue.job import Job
from mailrelay.outbound.lmtp import LMTPClient
from mailrelay.outbound.smarthost import deliver_to_host
from tests.support.conversation import Conversation, message
from tests.support.relay import RelayFixture
from tests.support.sink import DEFAULT_EXTENSIONS, Sink

CHUNKING = DEFAULT_EXTENSIONS + ("CHUNKING", "PIPELINING")
TRICKY = (b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\n\r\n.\r\nCRLF.CRLF inside: \r\n.\r\n"
          b"BDAT 5 LAST\r\nQUIT\r\nend")     # no final CRLF


def chunks_of(data: bytes, size: int) -> list[tuple[bytes, bool]]:
    reader, out = ChunkReader(io.BytesIO(data), size), []
    while not reader.done:
        out.append(reader.next())
    return out


class ChunkReaderTests(unittest.TestCase):
    def test_chunks_of_at_most_the_size_and_the_last_one_marked(self):
        self.assertEqual(chunks_of(b"ab\r\nCD\r\n", 4), [(b"ab\r\n", False), (b"CD\r\n", True)])
        self.assertEqual(chunks_of(b"ab\r\nCD\r\nx\r\n", 4),
                         [(b"ab\r\n", False), (b"CD\r\n", False), (b"x\r\n", True)])

    def test_an_empty_message_is_one_empty_last_chunk(self):
        self.assertEqual(chunks_of(b"", 4), [(b"", True)])

    def test_a_message_without_a_final_crlf_gets_one_as_data_would_give_it(self):
        self.assertEqual(chunks_of(b"abc", 4), [(b"abc\r\n", True)])
        self.assertEqual(chunks_of(b"abcd", 4), [(b"abcd\r\n", True)])
        self.assertEqual(chunks_of(b"ab\r", 4), [(b"ab\r\r\n", True)])     # as the DATA terminator does
        # a CRLF split across two chunks is a final CRLF all the same
        self.assertEqual(chunks_of(b"abc\r\n", 4), [(b"abc\r", False), (b"\n", True)])


class ConversationTests(unittest.TestCase):
    def talk(self, body: bytes, recipients=("a@example.net",), client=ChunkingClient) -> Conversation:
        return Conversation(self, client, [Job(message(body, recipients=recipients), tuple(recipients))])

    def test_a_one_chunk_message_goes_in_the_same_write_as_mail_and_rcpt(self):
        talk = self.talk(TRICKY)
        talk.greet("EHLO", "CHUNKING", "PIPELINING")
        sent = talk.raw()
        self.assertEqual(sent, b"MAIL FROM:<app@example.org>\r\nRCPT TO:<a@example.net>\r\n"
                               b"BDAT %d LAST\r\n" % (len(TRICKY) + 2) + TRICKY + b"\r\n")
        talk.server("250 2.1.0 ok", "250 2.1.5 ok", "250 2.0.0 queued as X")
        talk.expect("QUIT")
        (a,) = talk.close().jobs[0]
        self.assertEqual((a.code, a.text), (250, "queued as X"))

    def test_without_pipelining_each_chunk_waits_for_the_reply_before(self):
        self.patch(chunking, "CHUNK_SIZE", 10)
        body = b"0123456789abcdefghij!\r\n"
        talk = self.talk(body)
        talk.greet("EHLO", "CHUNKING")
        talk.expect("MAIL FROM:<app@example.org>")
        talk.server("250 ok")
        talk.expect("RCPT TO:<a@example.net>")
        talk.server("250 ok")
        self.assertEqual(talk.raw(), b"BDAT 10\r\n0123456789")
        talk.server("250 2.0.0 10 octets")
        self.assertEqual(talk.raw(), b"BDAT 10\r\nabcdefghij")
        talk.server("250 2.0.0 10 octets")
        self.assertEqual(talk.raw(), b"BDAT 3 LAST\r\n!\r\n")
        talk.server("250 2.0.0 queued")
        talk.expect("QUIT")
        self.assertTrue(talk.close().results[0].delivered)

    def test_with_pipelining_up_to_the_window_of_chunks_await_their_replies(self):
        self.patch(chunking, "CHUNK_SIZE", 4)
        body = b"".join(b"%02d\r\n" % n for n in range(7))        # seven chunks of four octets
        talk = self.talk(body)
        talk.greet("EHLO", "CHUNKING", "PIPELINING")
        self.assertTrue(talk.raw().endswith(b"RCPT TO:<a@example.net>\r\nBDAT 4\r\n00\r\n"))
        talk.server("250 ok", "250 ok", "250 2.0.0 4 octets")
        self.assertEqual(talk.raw(), b"BDAT 4\r\n01\r\nBDAT 4\r\n02\r\nBDAT 4\r\n03\r\nBDAT 4\r\n04\r\n")
        talk.server("250 2.0.0 4 octets")
        self.assertEqual(talk.raw(), b"BDAT 4\r\n05\r\n")
        talk.server("250 2.0.0 4 octets")
        self.assertEqual(talk.raw(), b"BDAT 4 LAST\r\n06\r\n")
        talk.server(*["250 2.0.0 4 octets"] * 3)      # chunks 3, 4 and 5
        self.assertEqual(talk.raw(), b"")
        talk.server("250 2.0.0 queued")
        talk.expect("QUIT")
        self.assertTrue(talk.close().results[0].delivered)

    def test_a_refused_chunk_stops_the_chunks_and_the_transaction_ends_with_rset(self):
        self.patch(chunking, "CHUNK_SIZE", 4)
        body = b"".join(b"%02d\r\n" % n for n in range(9))
        talk = self.talk(body, recipients=("a@example.net", "b@example.net"))
        talk.greet("EHLO", "CHUNKING", "PIPELINING")
        talk.raw()
        talk.server("250 ok", "250 ok", "250 ok", "250 2.0.0 4 octets")
        talk.raw()                                         # chunks 2 to 5 are on their way
        talk.server("552 5.3.4 message too big")           # RFC 3030 2: no further chunk
        talk.server("554 5.5.0 failed", "554 5.5.0 failed")
        self.assertEqual(talk.raw(), b"")
        talk.server("554 5.5.0 failed")                    # the last reply owed: now RSET
        talk.expect("RSET")
        talk.server("250 2.0.0 ok")
        talk.expect("QUIT")
        results = talk.close().jobs[0]
        self.assertEqual([(r.code, r.status) for r in results], [(552, "5.3.4")] * 2)

    def test_every_recipient_refused_the_pipelined_last_chunk_is_answered_and_rset_follows(self):
        talk = self.talk(b"Subject: x\r\n\r\nbody\r\n")
        talk.greet("EHLO", "CHUNKING", "PIPELINING")
        talk.raw()
        talk.server("250 ok", "550 5.1.1 no such user", "503 5.5.1 no valid recipients")
        talk.expect("RSET")
        talk.server("250 ok")
        talk.expect("QUIT")
        (a,) = talk.close().jobs[0]
        self.assertEqual((a.code, a.status), (550, "5.1.1"))

    def test_refused_mail_from_is_the_senders_fate_and_the_chunk_reply_is_read(self):
        talk = self.talk(b"Subject: x\r\n\r\nbody\r\n")
        talk.greet("EHLO", "CHUNKING", "PIPELINING")
        talk.raw()
        talk.server("553 5.7.1 sender refused", "503 5.5.1 MAIL first", "503 5.5.1 MAIL first")
        talk.expect("QUIT")
        (a,) = talk.close().jobs[0]
        self.assertEqual((a.code, a.sender_refused), (553, True))

    def test_lmtp_answers_bdat_last_once_per_recipient(self):
        talk = self.talk(b"Subject: x\r\n\r\nbody\r\n", recipients=("a@example.net", "b@example.net"),
                         client=LMTPClient)
        talk.greet("LHLO", "CHUNKING", "PIPELINING")
        self.assertIn(b"BDAT 20 LAST\r\n", talk.raw())
        talk.server("250 ok", "250 ok", "250 ok", "550 5.2.1 <a@example.net> disabled")
        self.assertEqual(talk.sent(), [])
        talk.server("250 2.0.0 <b@example.net> saved")
        talk.expect("QUIT")
        self.assertEqual([r.code for r in talk.close().jobs[0]], [550, 250])

    def test_data_when_chunking_is_switched_off(self):
        self.patch(ChunkingClient, "use_chunking", False)
        talk = self.talk(b"Subject: x\r\n\r\nbody\r\n")
        talk.greet("EHLO", "CHUNKING", "PIPELINING")
        talk.expect("MAIL FROM:<app@example.org>", "RCPT TO:<a@example.net>", "DATA")


class SinkTests(unittest.TestCase):
    """To the real loopback sink offering CHUNKING: what it stores is exactly the message."""
    timeout = 60

    def setUp(self):
        self.sink = Sink(extensions=CHUNKING)
        self.port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)

    def send(self, body: bytes, **kwargs):
        return deliver_to_host("127.0.0.1", self.port, [Job(message(body, **kwargs), ("a@example.net",))],
                               helo="relay.test", tls_policy="none")

    @defer.inlineCallbacks
    def test_dots_commands_and_no_final_crlf_arrive_byte_for_byte(self):
        result = yield self.send(TRICKY)
        self.assertTrue(result.results[0].delivered, result)
        (got,) = self.sink.messages
        self.assertEqual(got.data, TRICKY + b"\r\n")
        self.assertEqual(got.chunks, [(len(TRICKY) + 2, True)])
        verbs = [line.split(b" ")[0] for _, line in self.sink.sessions[0].commands]
        self.assertEqual(verbs, [b"EHLO", b"MAIL", b"RCPT", b"BDAT", b"QUIT"])

    @defer.inlineCallbacks
    def test_a_message_of_several_chunks(self):
        body = b"Subject: big\r\n\r\n" + b"".join(b".%07d line of a big message\r\n" % n for n in range(20000))
        result = yield self.send(body)
        self.assertTrue(result.results[0].delivered, result)
        (got,) = self.sink.messages
        self.assertEqual(got.data, body)
        size = chunking.CHUNK_SIZE
        self.assertEqual(got.chunks, [(size, False)] * (len(body) // size) + [(len(body) % size, True)])

    @defer.inlineCallbacks
    def test_eight_bit_goes_as_7bit_to_a_chunking_hop_without_8bitmime(self):
        self.sink.extensions = ("CHUNKING", "PIPELINING")
        result = yield self.send(b"Subject: hi\r\n\r\nol\xc3\xa9\r\n", octets="8bit")
        self.assertTrue(result.results[0].delivered, result)
        (got,) = self.sink.messages
        self.assertEqual(got.data, b"Subject: hi\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: "
                                   b"quoted-printable\r\n\r\nol=C3=A9\r\n")
        self.assertEqual(got.mail_params, [])
        self.sink.extensions = CHUNKING
        yield self.send(b"Subject: hi\r\n\r\nol\xc3\xa9\r\n", octets="8bit")
        self.assertEqual(self.sink.messages[1].data, b"Subject: hi\r\n\r\nol\xc3\xa9\r\n")
        self.assertIn("BODY=8BITMIME", self.sink.messages[1].mail_params)

    @defer.inlineCallbacks
    def test_a_refused_chunk_bounces_and_the_session_goes_on(self):
        self.patch(chunking, "CHUNK_SIZE", 1024)
        self.sink.chunk_replies = ["250 2.0.0 ok", "552 5.3.4 too big for this mailbox"]
        body = b"Subject: x\r\n\r\n" + b"y" * 78 + b"\r\n"
        jobs = [Job(message(body * 100), ("a@example.net",)), Job(message(body), ("b@example.net",))]
        result = yield deliver_to_host("127.0.0.1", self.port, jobs, helo="relay.test", tls_policy="none")
        self.assertEqual([(r.code, r.status) for r in result.results], [(552, "5.3.4"), (250, "2.0.0")])
        self.assertEqual([m.rcpt_tos for m in self.sink.messages], [["b@example.net"]])
        self.assertIn(b"RSET", [line for _, line in self.sink.sessions[0].commands])
        self.assertEqual(len(self.sink.sessions), 1)


class RelayTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_through_the_relay_to_a_chunking_hop(self):
        sink = Sink(extensions=CHUNKING)
        port = sink.start(reactor)
        self.addCleanup(sink.stop)
        relay = RelayFixture(self.mktemp(), extra=(
            f'[transports.sink]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n'))
        relay.start(reactor)
        self.addCleanup(relay.stop)
        message = b"From: <app@example.org>\r\nSubject: c\r\n\r\n.one dot\r\n..two\r\n.\r\nend\r\n"
        code, _ = yield relay.submit("relay", "app@example.org", ["x@example.com"], message)
        self.assertEqual(code, 250)
        (got,) = yield sink.wait_for(1)
        self.assertTrue(got.data.endswith(b"\r\n\r\n.one dot\r\n..two\r\n.\r\nend\r\n"), got.data)
        self.assertTrue(got.data.startswith(b"Received: "))
        self.assertEqual(len(got.chunks), 1)
        self.assertTrue(got.chunks[0][1])
