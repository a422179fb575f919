"""The adversarial battery, part 2: SMTP smuggling (SEC Consult, Dec 2023; CVE-2023-51764/51765/51766,
CVE-2024-27305) through a real relay to a real next hop, over real sockets.

Every "fake" end-of-data sequence of SEC Consult's public scanner (its inbound and outbound lists) and
the other bare CR / LF / NUL forms is sent inside a message, followed by a smuggled
`MAIL FROM / RCPT TO / DATA` second message, in two shapes: the scanner's (the sequence, then CRLF and
the smuggled commands) and the classic one (the smuggled commands right after the sequence, every byte
of the sequence in its own TCP write so it also straddles read boundaries).  What must hold:

- the relay answers each DATA with exactly one reply and never answers the smuggled commands;
- every reply is clean SMTP: a code and an RFC 3463 enhanced status code of its class;
- the next hop never gets two messages from one DATA, never a smuggled envelope, and never a bare CR,
  a bare LF or a NUL (a next hop that ends data on `\\n.\\n`, or strips NULs, would split it there);
- the session still carries a control message to the next hop afterwards.

Also the real terminator and stuffed dot lines split at every position across reads, and "." lines at
every alignment of the relay's outbound chunking (the dot-stuffing of each chunk on its own is the bug in
Twisted's client: a "." line at a chunk boundary went out unstuffed, an early end of data downstream).
"""
from __future__ import annotations

import base64
import time

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from tests.support.relay import PASSWORD, RelayFixture
from tests.support.sink import Sink
from tests.support.wire import WireClient, client_context, malformed

# SEC Consult's smtp-smuggling-scanner: its inbound list and its outbound list (which adds the two
# CR CR LF forms), then the other bare forms the scanner's paper discusses.
SCANNER_SEQUENCES = ["\n.\n", "\n.\r", "\r.\n", "\r.\r", "\n.\r\n", "\r.\r\n", "\r\n\x00.\r\n",
                     "\r\n.\r\r\n", "\r\r\n.\r\r\n"]
OTHER_SEQUENCES = ["\r\n.\r", "\r\n.\n", "\n.\r\r\n", "\r\n.\x00\r\n", "\r\n\x00.\x00\r\n"]
SEQUENCES = SCANNER_SEQUENCES + OTHER_SEQUENCES

SMUGGLED = (b"MAIL FROM:<smuggled@example.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
            b"From: smuggled@example.org\r\nTo: victim@example.com\r\nSubject: SMUGGLED\r\n\r\n"
            b"SMUGGLING WORKS\r\n")


def header(subject: str) -> bytes:
    return (f"From: app@example.org\r\nTo: user@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{abs(hash(subject))}@example.org>\r\n\r\n").encode("latin-1")


def smuggling_messages(sequence: str) -> list[list[bytes]]:
    """Two messages, each as the writes to send after 354 (the real CRLF.CRLF included)."""
    inject = sequence.encode("latin-1")
    scanner = header(f"CHECK {sequence!r}") + b"TESTING the fake end of data\r\n" + inject + b"\r\n" + SMUGGLED
    classic_head = header(f"CLASSIC {sequence!r}") + b"TESTING the fake end of data"
    classic = [classic_head] + [bytes([b]) for b in inject] + [SMUGGLED + b".\r\n"]
    return [[scanner + b".\r\n"], classic]


class Smuggling(unittest.TestCase):
    timeout = 90

    def setUp(self):
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        extra = (f'[transports.sink]\nhost = "127.0.0.1"\nport = {self.sink_port}\nsecurity = "none"\n\n'
                 '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n[queue]\nfirst_retry = "1s"\n')
        self.relay = RelayFixture(self.mktemp(), extra=extra)
        self.relay.start(reactor)
        self.addCleanup(self.relay.stop)

    # -- the client side, in a thread ------------------------------------------------------------

    def session(self, messages: list[list[bytes]], submissions: bool = False) -> dict:
        """One connection to the relay listener (or to 465 with AUTH): each message as one transaction,
        then a control message.  Returns the DATA replies, anything the relay said beyond them, and
        every reply."""
        if submissions:
            context = client_context(self.relay.ca_file())
            client = WireClient("127.0.0.1", self.relay.ports["submissions"], implicit_tls=context)
        else:
            client = WireClient("127.0.0.1", self.relay.ports["relay"])
        try:
            client.reply()
            client.command("EHLO client.test")
            if submissions:
                login = base64.b64encode(b"\0app1\0" + PASSWORD.encode()).decode()
                if client.command("AUTH PLAIN " + login).code != 235:
                    raise AssertionError(f"AUTH: {client.replies[-1].lines}")
            data_replies, extra = [], []        # extra: replies between a DATA reply and HELP's
            for writes in messages + [[header("CONTROL") + b"control body\r\n.\r\n"]]:
                self.begin(client)
                for i, piece in enumerate(writes):
                    client.send(piece)
                    if len(writes) > 1 and i < len(writes) - 1:
                        time.sleep(0.005)      # lets each piece arrive in its own read
                data_replies.append(client.reply(b"end of data"))
                # HELP's 214 is answered by nothing else: any reply before it answered a smuggled command
                # (the relay reads its input in order, so no waiting is needed to see one).
                client.send(b"HELP\r\n")
                while (reply := client.reply(b"HELP")).code not in (214, 0, -1):
                    extra.append(reply)
            client.command("QUIT")
            return {"data": data_replies, "extra": extra, "replies": client.replies}
        finally:
            client.close()

    def begin(self, client: WireClient) -> None:
        for command, code in (("MAIL FROM:<app@example.org>", 250), ("RCPT TO:<user@example.com>", 250),
                              ("DATA", 354)):
            reply = client.command(command)
            if reply.code != code:
                raise AssertionError(f"{command}: {reply.lines}")

    # -- the judgement ---------------------------------------------------------------------------

    @defer.inlineCallbacks
    def run_session(self, messages: list[list[bytes]], submissions: bool = False):
        result = yield threads.deferToThread(self.session, messages, submissions)
        self.assertEqual(malformed(result["replies"]), [])
        self.assertEqual([r.lines for r in result["extra"]], [],
                         "the relay answered something after a DATA reply: it ran smuggled commands")
        codes = [r.code for r in result["data"]]
        self.assertEqual(codes[-1], 250, "the control message after the attempts")
        for code in codes:
            self.assertTrue(code == 250 or 550 <= code < 560, codes)
        accepted = codes.count(250)
        yield self.sink.wait_for(accepted)
        yield task.deferLater(reactor, 0.3, lambda: None)       # anything extra would arrive by now
        self.assertEqual(len(self.sink.transactions), accepted, "one DATA, one message at the next hop")
        for transaction in self.sink.transactions:
            self.assert_clean_at_next_hop(transaction)
        self.assertEqual(self.sink.transactions[-1].data.split(b"\r\n\r\n", 1)[1], b"control body\r\n")
        return codes

    def assert_clean_at_next_hop(self, transaction) -> None:
        raw = transaction.data_raw
        self.assertEqual((transaction.mail_from, transaction.rcpt_tos), ("app@example.org", ["user@example.com"]))
        self.assertNotIn(b"\x00", raw, "a NUL reached the next hop")
        self.assertEqual(raw.count(b"\n"), raw.count(b"\r\n"), "a bare LF reached the next hop")
        self.assertEqual(raw.count(b"\r"), raw.count(b"\r\n"), "a bare CR reached the next hop")
        self.assertEqual(raw.find(b"\r\n.\r\n"), len(raw) - 5, "an end of data inside the content")
        for session in self.sink.sessions:
            commands = [line for _, line in session.commands]
            self.assertFalse([c for c in commands if b"smuggled" in c.lower() or b"victim" in c.lower()])

    # -- the payloads ------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_every_sequence_through_465_after_auth(self):
        # The submission side reads DATA the same way: every sequence without a NUL (those have their
        # own tests), both shapes, one authenticated session over implicit TLS.
        messages = [m for seq in SEQUENCES if "\x00" not in seq for m in smuggling_messages(seq)]
        codes = yield self.run_session(messages, submissions=True)
        self.assertEqual(len(codes), len(messages) + 1)

    @defer.inlineCallbacks
    def test_a_stuffed_dot_and_the_terminator_split_at_every_position(self):
        body = header("split") + b"line\r\n..\r\n..MAIL FROM:<smuggled@example.org>\r\nlast\r\n.\r\n"
        tail = len(body) - len(b"\r\n..\r\n..MAIL FROM:<smuggled@example.org>\r\nlast\r\n.\r\n")
        messages = [[body[:k], body[k:]] for k in range(tail, len(body))]
        codes = yield self.run_session(messages)
        self.assertEqual(codes, [250] * len(codes))
        for transaction in self.sink.transactions[:-1]:
            self.assertEqual(transaction.data.split(b"\r\n\r\n", 1)[1],
                             b"line\r\n.\r\n.MAIL FROM:<smuggled@example.org>\r\nlast\r\n")

    @defer.inlineCallbacks
    def test_dot_lines_at_every_alignment_of_the_outbound_chunks(self):
        # ~400 KiB of lines of every length 1..97, each starting with ".": some "." line starts at, and
        # some straddles, every 16/64 KiB boundary the relay's spool reader or client may cut at.
        lines = b"".join(b"." + b"x" * (n % 97) + b"\r\n" for n in range(8000))
        body = header("alignment") + lines.replace(b"\r\n.", b"\r\n..").replace(b".", b"..", 1)
        codes = yield self.run_session([[body[:len(body) // 2], body[len(body) // 2:] + b".\r\n"]])
        self.assertEqual(codes, [250, 250])
        arrived = self.sink.transactions[0]
        self.assertEqual(arrived.data.split(b"\r\n\r\n", 1)[1], lines)
        self.assertEqual(arrived.data_raw.count(b"\r\n.."), 8000)


def _make_test(sequence: str):
    @defer.inlineCallbacks
    def test(self):
        yield self.run_session(smuggling_messages(sequence))
    test.__doc__ = f"{sequence!r} as a fake end of data, followed by a smuggled second message."
    return test


for _sequence in SEQUENCES:
    _name = "test_fake_end_of_data_" + "".join({"\r": "CR", "\n": "LF", ".": "dot", "\x00": "NUL"}[c]
                                               for c in _sequence)
    setattr(Smuggling, _name, _make_test(_sequence))
del _sequence, _name
