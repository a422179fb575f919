"""`mailrelay queue list` at depth (mailrelay.cli.queue_listing): streamed lines, and a deep queue read
in two processes whose output is the same, line for line, as one process gives.  Over a real spool
directory written by a real (unstarted, synchronous) Spool; the forked child is a real process."""
from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

from twisted.trial import unittest

from mailrelay.cli import main as cli_main
from mailrelay.cli import queue_listing
from mailrelay.cli.queue import read_entry
from mailrelay.cli.queue_format import summary_line
from mailrelay.envelope import Envelope
from mailrelay.spool import Spool
from mailrelay.spool.message import CorruptMessage, InProgress, read_header, read_header_fd

BODY = b"Subject: depth\r\n\r\nbody\r\n"


class ListingTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.spool = Spool(self.dir / "spool")            # never started: every call is synchronous
        self.now = time.time()
        self.ids = [self.add(n) for n in range(40)]

    def add(self, n: int, held: bool = False) -> str:
        envelope = Envelope(f"app{n}@example.org", (f"user{n}@example.net",), self.now - 1000 + n)
        writer = self.spool.new_message(envelope)
        writer.write(BODY)
        queue_id = self.successResultOf(writer.commit())
        if n % 3 == 0:
            state = {"version": 1, "recipients": {f"user{n}@example.net": {
                "attempts": n, "first_attempt": self.now - 900, "next_attempt": self.now + 60 * n,
                "last_reply": {"code": 451, "status": "4.4.1", "text": f"busy {n}", "remote_host": "mx"},
                "done": None}}}
            self.successResultOf(self.spool.save_state(queue_id, state))
        if held:
            self.successResultOf(self.spool.hold(queue_id))
        return queue_id

    def listing(self, parallel: bool, read=None) -> tuple[str, queue_listing.Summary]:
        out = io.StringIO()
        held = self.spool.held_ids()
        reader = read or (lambda queue_id: read_entry(self.spool, queue_id, held))
        summary = queue_listing.list_queue(self.spool.queue_ids(), reader, self.now, {}, out, parallel=parallel)
        return out.getvalue(), summary

    def test_two_processes_print_what_one_prints(self):
        self.successResultOf(self.spool.hold(self.ids[30]))
        one, one_summary = self.listing(parallel=False)
        two, two_summary = self.listing(parallel=True)
        self.assertEqual(len(one.splitlines()), 40)
        self.assertEqual(two, one)
        self.assertEqual((two_summary.count, two_summary.held, two_summary.oldest),
                         (40, 1, self.now - 1000))
        self.assertEqual(one_summary, two_summary)
        self.assertIn("attempts 3", one.splitlines()[3])
        self.assertIn("HELD", one.splitlines()[30])

    def test_a_failed_child_leaves_its_half_to_the_parent(self):
        parent = os.getpid()

        def read(queue_id):
            if os.getpid() != parent:
                raise RuntimeError("the child cannot read")       # the child exits non-zero
            return read_entry(self.spool, queue_id)

        expected, _ = self.listing(parallel=False)
        got, summary = self.listing(parallel=True, read=read)
        self.assertEqual(got, expected)
        self.assertEqual(summary.count, 40)

    def test_a_message_gone_since_the_listing_is_left_out(self):
        gone = self.ids[25]
        self.successResultOf(self.spool.remove(gone))
        ids = self.ids                                           # listed before the removal
        out = io.StringIO()
        summary = queue_listing.list_queue(ids, lambda q: read_entry(self.spool, q, set()), self.now, {}, out,
                                           parallel=True)
        self.assertEqual(summary.count, 39)
        self.assertNotIn(gone, out.getvalue())

    def test_the_cli_ends_with_the_summary(self):
        config = self.dir / "tap.conf"
        config.write_text('hostname = "relay.test.example"\nspool = "spool"\n')
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(queue_listing, "PARALLEL_FROM", 10)           # this queue counts as deep
        self.assertEqual(cli_main.main(["queue", "list", "--config", str(config)]), 0)
        lines = stdout.getvalue().splitlines()
        self.assertEqual(len(lines), 41)
        self.assertEqual([line.split()[0] for line in lines[:40]], self.ids)
        self.assertTrue(lines[-1].startswith("40 messages, 0 held, oldest 16m"), lines[-1])

    def test_summary_line(self):
        self.assertEqual(summary_line(0, 0, None, self.now), "queue is empty")
        self.assertEqual(summary_line(1, 1, self.now - 7200, self.now), "1 message, 1 held, oldest 2h")


class HeaderReadTests(unittest.TestCase):
    """read_header_fd (one pread) answers as read_header (buffered readline) does, for good and bad files."""

    def setUp(self):
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.spool = Spool(self.dir / "spool")

    def both(self, path: Path):
        answers = []
        for reader in (self._buffered, self._fd):
            try:
                header = reader(path)
                answers.append((header.envelope, header.size, header.data_offset))
            except (CorruptMessage, InProgress) as e:
                answers.append((type(e).__name__, str(e)))
        self.assertEqual(answers[0], answers[1])
        return answers[0]

    def _buffered(self, path: Path):
        with open(path, "rb") as f:
            return read_header(f)

    def _fd(self, path: Path):
        fd = os.open(path, os.O_RDONLY)
        try:
            return read_header_fd(fd)
        finally:
            os.close(fd)

    def test_an_envelope_longer_than_the_first_read(self):
        recipients = tuple(f"recipient-{n}@example.net" for n in range(2000))      # ~60 KiB of envelope
        writer = self.spool.new_message(Envelope("a@example.org", recipients, time.time()))
        writer.write(BODY)
        queue_id = self.successResultOf(writer.commit())
        envelope, size, _ = self.both(self.spool.paths.message(queue_id))
        self.assertEqual(envelope.recipients, recipients)
        self.assertEqual(size, len(BODY))

    def test_damaged_files_are_judged_alike(self):
        writer = self.spool.new_message(Envelope("a@example.org", ("b@example.net",), time.time()))
        writer.write(BODY)
        good = self.spool.paths.message(self.successResultOf(writer.commit())).read_bytes()
        cases = {
            "torn": good[:-3],
            "foreign": b"From: someone\r\n\r\nnot ours\r\n",
            "no envelope end": good[:good.index(b"\n") + 10],
            "bad size": good.replace(b"size=0", b"size=x", 1),
        }
        in_progress = {"empty": b"", "size not written": good.replace(good[23:43], b"-" * 20, 1),
                       "magic cut short": b"MAILRELAY-SPOOL/1 size=00\n"}
        for name, data in cases.items():
            path = self.dir / name.replace(" ", "-")
            path.write_bytes(data)
            answer = self.both(path)
            self.assertEqual(answer[0], "CorruptMessage", (name, answer))
        for name, data in in_progress.items():
            path = self.dir / name.replace(" ", "-")
            path.write_bytes(data)
            self.assertEqual(self.both(path)[0], "InProgress", name)
