"""mailrelay.outbound.dotstuff: stateful dot-stuffing, whatever the chunk boundaries (RFC 5321 4.5.2)."""
from __future__ import annotations

import io
import itertools
import random

from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailrelay.outbound.dotstuff import CHUNK_SIZE, DotStuffer, StuffingProducer, stuff_all

TWISTED_CHUNK = 16 * 1024    # the size Twisted's FileSender stuffs independently


def reference(data: bytes) -> bytes:
    """The obvious, slow definition: every line (after any LF) starting with "." gets one more."""
    lines = data.split(b"\n")
    stuffed = b"\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    ends_clean = data == b"" or data.endswith(b"\r\n")
    return stuffed + (b".\r\n" if ends_clean else b"\r\n.\r\n")


def stuff_split(data: bytes, cuts) -> bytes:
    stuffer = DotStuffer()
    bounds = [0, *sorted(cuts), len(data)]
    return b"".join(stuffer.stuff(data[a:b]) for a, b in zip(bounds, bounds[1:])) + stuffer.terminator()


SMALL_INPUTS = [
    b"", b".", b"..", b".\r\n", b"a\r\n.\r\n", b".\r\n.\r\n", b"x\r\n..y\r\n", b"no newline at end",
    b"Subject: x\r\n\r\n.\r\n..\r\n...\r\nend", b"\r\n.", b"a\r\n.b\r\n.", b"bare\n.lf\n", b"\r\n\r\n",
    b".leading first line\r\nsecond\r\n",
]


class DotStufferTests(unittest.TestCase):
    def test_first_line_is_stuffed(self):
        self.assertEqual(stuff_all(b".hidden\r\n"), b"..hidden\r\n.\r\n")

    def test_lone_dot_line_is_stuffed_not_ending_data(self):
        self.assertEqual(stuff_all(b"a\r\n.\r\nb\r\n"), b"a\r\n..\r\nb\r\n.\r\n")

    def test_crlf_is_never_turned_into_cr_cr_lf(self):
        out = stuff_all(b"a\r\nb\r\n\r\nc\r\n")
        self.assertNotIn(b"\r\r", out)
        self.assertEqual(out, b"a\r\nb\r\n\r\nc\r\n.\r\n")

    def test_message_ending_with_crlf_gets_dot_crlf(self):
        self.assertEqual(stuff_all(b"body\r\n"), b"body\r\n.\r\n")

    def test_message_without_final_crlf_gets_crlf_dot_crlf(self):
        self.assertEqual(stuff_all(b"body"), b"body\r\n.\r\n")

    def test_empty_message_is_just_the_terminator(self):
        self.assertEqual(stuff_all(b""), b".\r\n")

    def test_dot_after_bare_lf_is_stuffed_too(self):
        # A lenient downstream server ending DATA on "\n.\n" must not see an end (SMTP smuggling).
        self.assertEqual(stuff_all(b"a\n.\nb\r\n"), b"a\n..\nb\r\n.\r\n")

    def test_every_single_and_double_split_matches_the_reference(self):
        for data in SMALL_INPUTS:
            expected = reference(data)
            positions = range(len(data) + 1)
            for cuts in itertools.chain(((),), ((i,) for i in positions), itertools.combinations(positions, 2)):
                self.assertEqual(stuff_split(data, cuts), expected, (data, cuts))

    def test_dot_lines_across_every_16k_boundary_survive_random_splits(self):
        data = b".\r\n" * 20000          # 60,000 bytes: a lone "." line straddles or starts at every boundary
        expected = reference(data)
        self.assertEqual(expected, b"..\r\n" * 20000 + b".\r\n")
        rng = random.Random(5321)
        boundaries = list(range(TWISTED_CHUNK, len(data), TWISTED_CHUNK))
        for offset in (-2, -1, 0, 1, 2):
            self.assertEqual(stuff_split(data, [b + offset for b in boundaries]), expected, offset)
        for _ in range(50):
            cuts = rng.sample(range(1, len(data)), rng.randint(1, 40))
            self.assertEqual(stuff_split(data, cuts), expected)

    def test_random_messages_match_the_reference_under_random_splits(self):
        rng = random.Random(4552)
        alphabet = [b".", b"\r\n", b"a", b"..", b"\r", b"\n"]
        for _ in range(300):
            data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
            cuts = rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 6)))
            self.assertEqual(stuff_split(data, cuts), reference(data), data)


class StuffingProducerTests(unittest.TestCase):
    def drive(self, transport: StringTransport) -> None:
        while transport.producer is not None:
            transport.producer.resumeProducing()

    def test_streams_file_stuffed_and_terminated_in_chunks(self):
        body = (b".x\r\n" + b"y" * 1000 + b"\r\n") * 300      # several chunks
        source = io.BytesIO(body)
        transport = StringTransport()
        progress = []
        done = StuffingProducer(source, transport, lambda: progress.append(1)).start()
        self.assertFalse(transport.streaming)
        self.drive(transport)
        self.assertEqual(transport.value(), stuff_all(body))
        self.assertIsNone(self.successResultOf(done))
        self.assertTrue(source.closed)
        self.assertEqual(len(progress), -(-len(body) // CHUNK_SIZE))

    def test_the_last_piece_and_the_terminator_go_in_one_write(self):
        for body in (b".short\r\n" * 100, b"z" * CHUNK_SIZE, b"x" * (CHUNK_SIZE + 5), b""):
            transport = StringTransport()
            writes = []
            write = transport.write
            transport.write = lambda data, writes=writes, write=write: (writes.append(data), write(data))[1]
            done = StuffingProducer(io.BytesIO(body), transport).start()
            self.drive(transport)
            self.assertIsNone(self.successResultOf(done))
            self.assertEqual(b"".join(writes), stuff_all(body))
            self.assertEqual(len(writes), -(-len(body) // CHUNK_SIZE) + (len(body) % CHUNK_SIZE == 0), len(body))
            self.assertTrue(writes[-1].endswith(b".\r\n"))

    def test_stop_producing_fails_the_transfer_and_closes_the_file(self):
        source = io.BytesIO(b"a\r\n" * 100000)
        transport = StringTransport()
        done = StuffingProducer(source, transport).start()
        transport.producer.resumeProducing()
        transport.producer.stopProducing()
        self.failureResultOf(done, defer.CancelledError)
        self.assertTrue(source.closed)
        self.assertIsNone(transport.producer)

    def test_read_error_fails_the_transfer(self):
        class Broken(io.BytesIO):
            def read(self, n=-1):
                raise OSError(5, "Input/output error")

        transport = StringTransport()
        done = StuffingProducer(Broken(), transport).start()
        self.drive(transport)
        self.failureResultOf(done, OSError)
        self.assertEqual(transport.value(), b"")
