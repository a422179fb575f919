"""DataReader and HeaderCollector: the DATA phase policy, chunk boundaries, limits, smuggling."""
from __future__ import annotations

import random

from twisted.trial import unittest

from mailrelay.server.data import (
    BARE_CR, LINE_TOO_LONG, NUL_OCTET, TOO_BIG, DataReader, HeaderCollector, line_too_long,
)


def read(chunks, max_size=10 * 1024 * 1024, **kwargs):
    """Feed chunks to a new reader; returns (content, rest, reader). rest is None if not finished."""
    out: list[bytes] = []
    reader = DataReader(out.append, max_size, **kwargs)
    rest = None
    for chunk in chunks:
        if rest is not None:
            rest += chunk             # after the end: the command stream
        else:
            rest = reader.feed(chunk)
    return b"".join(out), rest, reader


def byte_by_byte(data: bytes):
    return [data[i:i + 1] for i in range(len(data))]


def random_splits(data: bytes, rng: random.Random):
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12))))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


SMUGGLED = b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nForged\r\n"


class EndOfDataTests(unittest.TestCase):
    def test_data_ends_at_crlf_dot_crlf_and_returns_what_follows(self):
        content, rest, reader = read([b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n"])
        self.assertEqual(content, b"Subject: hi\r\n\r\nbody\r\n")
        self.assertEqual(rest, b"QUIT\r\n")
        self.assertIsNone(reader.outcome)

    def test_dot_as_first_line_is_an_empty_message(self):
        content, rest, reader = read([b".\r\n"])
        self.assertEqual((content, rest, reader.outcome), (b"", b"", None))

    def test_dot_stuffed_lines_are_unstuffed(self):
        content, rest, _ = read([b"..\r\n...x\r\n.y\r\nz.\r\n.\r\n"])
        self.assertEqual(content, b".\r\n..x\r\ny\r\nz.\r\n")
        self.assertEqual(rest, b"")

    def test_unfinished_message_returns_none(self):
        content, rest, _ = read([b"line one\r\nline two\r\n"])
        self.assertIsNone(rest)
        self.assertEqual(content, b"line one\r\nline two\r\n")

    def test_feed_after_end_is_an_error(self):
        _, _, reader = read([b".\r\n"])
        self.assertRaises(RuntimeError, reader.feed, b"x")


class SmugglingTests(unittest.TestCase):
    """CVE-2023-51764 / CVE-2024-27305 class: only CRLF.CRLF ends DATA."""

    def smuggle(self, terminator: bytes):
        data = b"Subject: one\r\n\r\nbody" + terminator + SMUGGLED + b"\r\n.\r\nQUIT\r\n"
        return read([data])

    def assertNormalisedAndContained(self, terminator):
        content, rest, reader = self.smuggle(terminator)
        self.assertIsNone(reader.outcome)
        self.assertEqual(rest, b"QUIT\r\n")
        self.assertIn(b"\r\n.\r\nMAIL FROM:<evil@example.net>\r\n", content)
        self.assertNotIn(b"\r\r", content)
        self.assertEqual(content.count(b"\n"), content.count(b"\r\n"))

    def assertRefusedAsBareCR(self, terminator):
        content, rest, reader = self.smuggle(terminator)
        self.assertEqual(reader.outcome, BARE_CR)
        self.assertEqual(rest, b"QUIT\r\n")       # read on to the real end; the smuggled lines are not commands

    def test_lf_dot_lf_is_not_the_end_and_is_normalised(self):
        self.assertNormalisedAndContained(b"\n.\n")

    def test_lf_dot_crlf_is_not_the_end_and_is_normalised(self):
        self.assertNormalisedAndContained(b"\n.\r\n")

    def test_cr_dot_cr_is_refused(self):
        self.assertRefusedAsBareCR(b"\r.\r")

    def test_crlf_dot_cr_is_refused(self):
        self.assertRefusedAsBareCR(b"\r\n.\r")

    def test_cr_dot_crlf_is_refused(self):
        self.assertRefusedAsBareCR(b"\r.\r\n")

    def test_lf_dot_cr_is_refused(self):
        self.assertRefusedAsBareCR(b"\n.\r")

    def test_bare_lf_line_is_normalised_to_crlf(self):
        content, rest, _ = read([b"a\nb\r\nc\n.\r\n"])
        self.assertEqual(content, b"a\r\nb\r\nc\r\n.\r\n")   # "c\n." is not an end; the "." line is content
        self.assertIsNone(rest)

    def test_refused_message_sends_nothing_more_to_the_sink(self):
        content, rest, reader = read([b"ok line\r\n", b"bad\rline\r\n", b"more\r\n.\r\n"])
        self.assertEqual(content, b"ok line\r\n")
        self.assertEqual(reader.outcome, BARE_CR)
        self.assertEqual(rest, b"")


class NulTests(unittest.TestCase):
    """SEC Consult's `\\r\\n\\x00.\\r\\n`: a next hop that strips NULs would see an end of data there."""

    def test_crlf_nul_dot_crlf_is_refused_after_the_real_end(self):
        data = b"Subject: one\r\n\r\nbody\r\n\x00.\r\n" + SMUGGLED + b".\r\nQUIT\r\n"
        for chunks in ([data], byte_by_byte(data), random_splits(data, random.Random(7))):
            content, rest, reader = read(chunks)
            self.assertEqual(reader.outcome, NUL_OCTET)
            self.assertEqual(rest, b"QUIT\r\n")        # the smuggled lines were content, not commands
            self.assertNotIn(b"\x00", content)
            self.assertTrue(b"Subject: one\r\n\r\nbody\r\n".startswith(content))   # nothing from the NUL on

    def test_nul_anywhere_in_a_plain_chunk_is_refused(self):
        for body in (b"\x00\r\n", b"a\x00b\r\n", (b"x" * 500 + b"\r\n") * 20 + b"end\x00\r\n"):
            _, rest, reader = read([b"Subject: x\r\n\r\n" + body + b".\r\n"])
            self.assertEqual((reader.outcome, rest), (NUL_OCTET, b""), body[-8:])
        self.assertEqual(NUL_OCTET.code, 550)
        self.assertEqual(NUL_OCTET.status, "5.6.0")


class LimitTests(unittest.TestCase):
    def test_long_line_refuses_message_after_real_end_and_never_becomes_commands(self):
        data = b"Subject: x\r\n\r\n" + b"A" * 20000 + b"\r\n" + SMUGGLED + b".\r\nNOOP\r\n"
        for chunks in ([data], byte_by_byte(data), [data[:5000], data[5000:]]):
            content, rest, reader = read(chunks)
            self.assertEqual(reader.outcome, LINE_TOO_LONG)
            self.assertEqual(rest, b"NOOP\r\n")

    def test_998_octet_line_is_accepted_999_is_not(self):
        _, _, ok = read([b"x" * 998 + b"\r\n.\r\n"])
        _, _, bad = read([b"x" * 999 + b"\r\n.\r\n"])
        self.assertIsNone(ok.outcome)
        self.assertEqual(bad.outcome, LINE_TOO_LONG)

    def test_long_line_without_lf_is_not_buffered(self):
        out: list[bytes] = []
        reader = DataReader(out.append, 10**9)
        for _ in range(100):
            self.assertIsNone(reader.feed(b"y" * 10000))
        self.assertLess(len(reader._partial), 1000)
        self.assertEqual(reader.feed(b"\r\n.\r\n"), b"")
        self.assertEqual(reader.outcome, LINE_TOO_LONG)

    def test_lines_over_998_are_taken_up_to_the_configured_bound(self):
        body = b"Subject: x\r\n\r\n" + b"h" * 5000 + b"\r\n..x\r\n" + b"i" * 65536 + b"\r\n"
        rng = random.Random(3)
        for chunks in ([body + b".\r\nNOOP\r\n"], random_splits(body + b".\r\nNOOP\r\n", rng)):
            content, rest, reader = read(chunks, max_line=65536)
            self.assertIsNone(reader.outcome)
            self.assertEqual(rest, b"NOOP\r\n")
            self.assertEqual(content, body.replace(b"..x", b".x"))

    def test_a_line_over_the_bound_is_refused_with_the_bound_in_the_reply(self):
        data = b"Subject: x\r\n\r\n" + b"A" * 65537 + b"\r\n" + SMUGGLED + b".\r\nNOOP\r\n"
        for chunks in ([data], [data[:30000], data[30000:]], random_splits(data, random.Random(5))):
            _, rest, reader = read(chunks, max_line=65536)
            self.assertEqual(reader.outcome, line_too_long(65536))
            self.assertEqual(rest, b"NOOP\r\n")
        self.assertEqual(str(line_too_long(65536)), "554 5.6.0 Message refused: a text line is longer than "
                                                    "65536 octets, the most this relay accepts")

    def test_memory_stays_bounded_by_the_configured_bound(self):
        reader = DataReader([].append, 10**9, max_line=65536)
        for _ in range(100):
            self.assertIsNone(reader.feed(b"y" * 10000))
            self.assertLessEqual(len(reader._partial), 65537)
        self.assertEqual(reader.feed(b"\r\n.\r\n"), b"")
        self.assertEqual(reader.outcome, line_too_long(65536))

    def test_a_long_line_in_tiny_pieces_costs_linear_time(self):
        # A client may send a line one octet per TCP segment; with a 512 KiB bound, copying the line so
        # far for every octet would be ~80 GB of copying for this one line.
        import time
        out: list[bytes] = []
        reader = DataReader(out.append, 10**9, max_line=512 * 1024)
        started = time.process_time()
        for _ in range(400_000):
            reader.feed(b"w")
        self.assertEqual(reader.feed(b"\r\n.\r\n"), b"")
        self.assertLess(time.process_time() - started, 3.0)         # linear: ~0.3 s; copying: ~10 s
        self.assertIsNone(reader.outcome)
        self.assertEqual(b"".join(out), b"w" * 400_000 + b"\r\n")
        self.assertTrue(all(isinstance(chunk, bytes) for chunk in out))

    def test_oversized_message_is_refused_after_the_dot_and_discarded(self):
        body = b"0123456789" * 10 + b"\r\n"
        out: list[bytes] = []
        reader = DataReader(out.append, max_size=1000)
        for _ in range(50):
            self.assertIsNone(reader.feed(body))
        self.assertEqual(reader.feed(b".\r\nQUIT\r\n"), b"QUIT\r\n")
        self.assertEqual(reader.outcome, TOO_BIG)
        self.assertLessEqual(len(b"".join(out)), 1000)

    def test_twenty_thousand_stuffed_dot_lines(self):
        data = b"..\r\n" * 20000 + b".\r\n"
        content, rest, reader = read([data])
        self.assertEqual(content, b".\r\n" * 20000)
        self.assertEqual(rest, b"")
        self.assertIsNone(reader.outcome)

    def test_twenty_thousand_lone_dot_lines_after_bare_lf_stay_in_the_message(self):
        data = b"x\n" + b".\n" * 20000 + b".\r\n"
        content, rest, reader = read([data])
        self.assertIsNone(rest)                         # none of them was CRLF.CRLF
        self.assertEqual(content, b"x\r\n" + b".\r\n" * 20001)
        self.assertEqual(reader.feed(b"\r\n.\r\n"), b"")
        self.assertIsNone(reader.outcome)

    def test_content_arrives_in_large_chunks(self):
        calls: list[bytes] = []
        reader = DataReader(calls.append, 10**9)
        reader.feed(b"line of text\r\n" * 5000)
        self.assertEqual(len(calls), 1)


class ChunkBoundaryTests(unittest.TestCase):
    MESSAGES = [
        b"Subject: a\r\n\r\n..dot\r\nbody\r\n.\r\nRSET\r\n",
        b"x\n.\nMAIL FROM:<a@b.c>\r\n.\r\n",
        b"a\r\n.\r",            # unfinished: ends in CR
        b"h: v\r\n\r\n" + b"y" * 997 + b"\r\n" + b"..\r\n" * 50 + b".\r\nQUIT\r\n",
        b"a\rb\r\n.\r\n",
        b"z" * 3000 + b"\n.\r\nok\r\n.\r\nX",
        b".\r\n",
    ]

    def outcome(self, chunks):
        content, rest, reader = read(chunks)
        # A refused message's partial content depends on where it was cut; the verdict must not.
        return (None if reader.outcome else content), rest, reader.outcome

    def test_every_single_split_point_gives_the_same_result(self):
        for message in self.MESSAGES:
            whole = self.outcome([message])
            for i in range(1, len(message)):
                self.assertEqual(self.outcome([message[:i], message[i:]]), whole, (message[:40], i))

    def test_byte_by_byte_and_random_splits_give_the_same_result(self):
        rng = random.Random(5321)
        for message in self.MESSAGES:
            whole = self.outcome([message])
            self.assertEqual(self.outcome(byte_by_byte(message)), whole)
            for _ in range(50):
                self.assertEqual(self.outcome(random_splits(message, rng)), whole)


class HeaderCollectorTests(unittest.TestCase):
    def test_header_block_ends_at_first_empty_line_across_chunks(self):
        message = b"From: a@b\r\nSubject: s\r\n\r\nbody\r\n\r\nmore\r\n"
        for i in range(1, len(message)):
            collector = HeaderCollector()
            collector.feed(message[:i])
            collector.feed(message[i:])
            self.assertEqual(collector.headers, b"From: a@b\r\nSubject: s\r\n", i)

    def test_header_block_is_bounded(self):
        collector = HeaderCollector(limit=100)
        for _ in range(100):
            collector.feed(b"X-Long: " + b"v" * 90 + b"\r\n")
        self.assertEqual(len(collector.headers), 100)
        self.assertTrue(collector.complete)

    def test_message_without_headers_has_an_empty_block(self):
        collector = HeaderCollector()
        collector.feed(b"\r\nbody\r\n")
        self.assertEqual(collector.headers, b"")


def read_bdat(chunks, max_size=10 * 1024 * 1024, **kwargs):
    """Feed BDAT content (dots=False) to a new reader, then finish it; returns (content, reader)."""
    out: list[bytes] = []
    reader = DataReader(out.append, max_size, dots=False, **kwargs)
    for chunk in chunks:
        if reader.feed(chunk) is not None:
            raise AssertionError("BDAT content never ends inside the reader")
    reader.finish()
    return b"".join(out), reader


class BdatContentTests(unittest.TestCase):
    """The reader in BDAT mode (RFC 3030): no end of data, no dot-stuffing, every other rule as DATA's."""

    def test_crlf_dot_crlf_and_stuffed_dots_are_content(self):
        data = b"Subject: a\r\n\r\nbody\r\n.\r\n" + SMUGGLED + b"..two\r\n.\r\n"
        content, reader = read_bdat([data])
        self.assertEqual(content, data)
        self.assertIsNone(reader.outcome)

    def test_bare_lf_is_normalised_and_bare_cr_and_nul_refused(self):
        self.assertEqual(read_bdat([b"a\n.\nb\n"])[0], b"a\r\n.\r\nb\r\n")
        self.assertEqual(read_bdat([b"a\r.\r\n"])[1].outcome, BARE_CR)
        self.assertEqual(read_bdat([b"a\r\n\x00.\r\n"])[1].outcome, NUL_OCTET)

    def test_the_last_line_gets_its_crlf_and_a_last_cr_is_bare(self):
        self.assertEqual(read_bdat([b"a\r\nno end"])[0], b"a\r\nno end\r\n")
        self.assertEqual(read_bdat([b"a\r\n", b"b\r"])[1].outcome, BARE_CR)
        self.assertEqual(read_bdat([])[0], b"")

    def test_line_and_size_limits_hold(self):
        self.assertEqual(read_bdat([b"x" * 999 + b"\r\n"], max_line=998)[1].outcome, LINE_TOO_LONG)
        self.assertEqual(read_bdat([b"x" * 999], max_line=998)[1].outcome, LINE_TOO_LONG)   # at finish
        self.assertEqual(read_bdat([b"x" * 50 + b"\n"] * 2, max_size=100)[1].outcome, TOO_BIG)
        self.assertIsNone(read_bdat([b"x" * 48 + b"\n"] * 2, max_size=100)[1].outcome)

    def test_every_split_point_gives_the_same_result(self):
        for message in ChunkBoundaryTests.MESSAGES:
            content, reader = read_bdat([message])
            whole = (None if reader.outcome else content, reader.outcome)
            for i in range(1, len(message)):
                content, reader = read_bdat([message[:i], message[i:]])
                self.assertEqual((None if reader.outcome else content, reader.outcome), whole, (message[:40], i))

    def test_finish_is_for_bdat_only_and_once(self):
        self.assertRaises(RuntimeError, DataReader(lambda chunk: None, 100).finish)
        _, reader = read_bdat([b"x\r\n"])
        self.assertRaises(RuntimeError, reader.finish)
