"""`mailrelay queue throttle` and the paused destinations at the end of `queue list`, from the status
the running relay's scheduler writes (queue.shaping), and what a stopped relay's spool says."""
from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path

from twisted.trial import unittest

from mailrelay.cli import main as cli_main
from mailrelay.cli.queue_format import QueueEntry, list_line, paused_destinations, paused_note, throttle_lines
from mailrelay.queue.shaping import write_status
from mailrelay.queue.state import MessageState
from mailrelay.envelope import Envelope
from mailrelay.spool.files import acquire_lock

NOW = 1_767_225_600.0


def status_at(now: float) -> dict:
    """A status as the scheduler writes it, `now` being when it was written (2 s ago)."""
    return {"written_at": now - 2, "pid": 1, "interval": 5.0, "destinations": [
    {"destination": "gmail.test", "messages_per_minute": 120, "connections_cap": 5, "connections": 0,
     "next_start": now, "paused_until": now + 90, "pauses_in_a_row": 2,
     "reason": "421 4.7.0 \x1b]0;owned\x07 try later", "waiting": 25, "waiting_ids": ["Q1", "Q2"]},
    {"destination": "other.test", "messages_per_minute": 0, "connections_cap": 0, "connections": 3,
     "next_start": 0, "paused_until": 0, "pauses_in_a_row": 0, "reason": "", "waiting": 0, "waiting_ids": []},
    ]}


STATUS = status_at(NOW)


class FormatTests(unittest.TestCase):
    def test_one_line_per_destination_and_a_summary(self):
        lines = throttle_lines(STATUS, NOW, running=True)
        self.assertEqual(len(lines), 3)
        self.assertTrue(lines[0].startswith("gmail.test  PAUSED 1m more (until 2026-01-01T00:01:30Z, "
                                            "2 in a row, after 421 4.7.0 "), lines[0])
        self.assertIn("rate 120/min  connections 0/5  waiting 25: Q1, Q2 +23", lines[0])
        self.assertNotIn("\x1b", lines[0])                       # a remote reply never drives the terminal
        self.assertEqual(lines[1], "other.test  no rate limit  connections 3  waiting 0")
        self.assertEqual(lines[2], "2 throttled destinations with something to show, 1 paused (as of 2s ago)")

    def test_a_stopped_relay_has_no_pause(self):
        self.assertEqual(throttle_lines(STATUS, NOW, running=False),
                         ["the relay is not running: no destination is paused (pauses are not kept across a "
                          "restart)"])

    def test_list_marks_messages_waiting_for_a_paused_destination(self):
        envelope = Envelope("a@example.org", ("x@gmail.test", "y@other.test"), NOW - 60)
        entry = QueueEntry("Q1", envelope, 100, False, MessageState.fresh(envelope.recipients))
        paused = paused_destinations(STATUS, NOW)
        self.assertEqual(paused, {"gmail.test": NOW + 90})
        line = list_line(entry, NOW) + paused_note(entry, paused, NOW)
        self.assertTrue(line.endswith("  waiting: gmail.test paused 1m more"), line)
        later = NOW + 100                                                         # the pause is over
        self.assertNotIn("waiting:", list_line(entry, later) + paused_note(entry, paused, later))


class CommandTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()
        (self.dir / "spool").mkdir(parents=True)
        self.config = self.dir / "tap.conf"
        self.config.write_text('hostname = "relay.test"\nspool = "spool"\n\n'
                               '[[throttle]]\ndomains = ["gmail.test"]\npause = "1m"\n')
        write_status(self.dir / "spool" / "throttle.json", status_at(time.time()))

    def queue(self, *argv: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(cli_main.main(["queue", *argv, "--config", str(self.config)]), 0)
        return out.getvalue()

    def test_a_file_left_by_a_relay_that_is_not_running_says_nothing(self):
        self.assertIn("the relay is not running", self.queue("throttle"))
        self.assertEqual(json.loads(self.queue("throttle", "--json"))["running"], False)
        self.assertEqual(self.queue("list"), "queue is empty\n")

    def test_a_running_relay_shows_its_status(self):
        fd = acquire_lock(self.dir / "spool" / "lock")      # as a running relay holds it
        self.addCleanup(os.close, fd)
        text = self.queue("throttle")
        self.assertIn("gmail.test  PAUSED", text)
        detail = json.loads(self.queue("throttle", "--json"))
        self.assertEqual((detail["running"], detail["rules"]), (True, 1))
        self.assertEqual(detail["status"]["destinations"][0]["waiting"], 25)
