"""The suppression list (spool/suppression.py): the journal, expiry, removal, torn lines, several writers,
compaction, the RCPT refusal, which failures suppress, and the delivery side's batched recorder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from twisted.internet import defer, task
from twisted.trial import unittest

import mailrelay
from mailrelay.queue.results import RecipientResult
from mailrelay.spool import suppression
from mailrelay.spool.suppression import (JOURNAL, TEXT_LIMIT, SuppressionList, SuppressionRecorder,
                                         SuppressionWatcher, address_key, suppresses)

DAY = 86400.0


class ListTestCase(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.clock = task.Clock()
        self.clock.advance(1_767_225_600)      # 2026-01-01 00:00:00 UTC
        self.journal = self.new()

    def new(self, duration: float = 30 * DAY) -> SuppressionList:
        return SuppressionList(self.dir, duration, self.clock)

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in (self.dir / JOURNAL).read_text().splitlines() if line]


class Journal(ListTestCase):
    def test_an_added_address_is_seen_by_another_reader_and_survives_a_new_one(self):
        self.journal.add("bob@example.net", source="bounce", reply="550 5.1.1 User unknown",
                         remote_host="mx.example.net", queue_id="Q1")
        reader = self.new()
        self.assertTrue(reader.refresh())
        entry = reader.lookup("bob@example.net")
        self.assertEqual((entry.reply, entry.remote_host, entry.queue_id, entry.since),
                         ("550 5.1.1 User unknown", "mx.example.net", "Q1", self.clock.seconds()))
        self.assertIsNone(reader.lookup("alice@example.net"))
        self.assertFalse(reader.refresh())          # nothing new: nothing read
        self.assertEqual(reader.size(), 1)

    def test_domain_compares_case_insensitively_local_part_exactly(self):
        self.journal.add("Bob@Example.NET")
        self.journal.refresh()
        self.assertIsNotNone(self.journal.lookup("Bob@example.net"))
        self.assertIsNotNone(self.journal.lookup("Bob@EXAMPLE.net"))
        self.assertIsNone(self.journal.lookup("bob@example.net"))
        self.assertEqual(address_key("Bob@Bücher.Example"), "Bob@xn--bcher-kva.example")

    def test_an_entry_expires_after_the_duration_and_a_longer_duration_applies_to_it(self):
        self.journal.add("bob@example.net")
        self.journal.refresh()
        self.clock.advance(30 * DAY - 1)
        self.assertIsNotNone(self.journal.lookup("bob@example.net"))
        self.clock.advance(1)
        self.assertIsNone(self.journal.lookup("bob@example.net"))
        self.assertEqual((self.journal.entries(), self.journal.size()), ([], 0))
        longer = self.new(duration=60 * DAY)
        longer.refresh()
        self.assertIsNotNone(longer.lookup("bob@example.net"))

    def test_remove_lifts_it_durably_and_says_what_was_there(self):
        self.journal.add("bob@example.net", reason="typo in the list")
        removed = self.new().remove("bob@EXAMPLE.net")
        self.assertEqual(removed.reason, "typo in the list")
        self.assertIsNone(self.new().remove("bob@example.net"))       # not listed any more: nothing written
        self.assertEqual([r["op"] for r in self.lines()], ["add", "remove"])
        self.journal.refresh()
        self.assertIsNone(self.journal.lookup("bob@example.net"))
        self.journal.add("bob@example.net")        # bounced again later: listed again
        self.journal.refresh()
        self.assertIsNotNone(self.journal.lookup("bob@example.net"))

    def test_a_torn_or_foreign_line_is_skipped_and_the_next_record_is_kept(self):
        self.journal.add("one@example.net")
        with open(self.dir / JOURNAL, "ab") as f:
            f.write(b'{"v":1,"op":"add","address":"torn@exa')       # a crash in the middle of a write
        reader = self.new()
        reader.refresh()
        self.assertEqual(reader.size(), 1)                            # the torn line waits: no newline yet
        self.journal.add("two@example.net")                           # starts a line of its own
        reader.refresh()
        self.assertIsNotNone(reader.lookup("two@example.net"))
        self.assertIsNone(reader.lookup("torn@example.net"))
        self.assertEqual(reader.skipped, 1)
        with open(self.dir / JOURNAL, "ab") as f:
            f.write(b'not json\n{"op":"frobnicate","address":"x@y.z"}\n[1]\n')
        self.journal.add("three@example.net")
        fresh = self.new()
        fresh.refresh()
        self.assertEqual(sorted(e.address for e in fresh.entries()),
                         ["one@example.net", "three@example.net", "two@example.net"])
        self.assertEqual(fresh.skipped, 4)

    def test_a_missing_journal_is_an_empty_list_and_a_deleted_one_empties_it(self):
        self.assertFalse(self.journal.refresh())
        self.assertEqual(self.journal.entries(), [])
        self.journal.add("bob@example.net")
        self.journal.refresh()
        os.unlink(self.dir / JOURNAL)
        self.assertTrue(self.journal.refresh())
        self.assertIsNone(self.journal.lookup("bob@example.net"))

    def test_the_journal_and_its_lock_are_private_to_the_relay(self):
        self.journal.add("bob@example.net")
        self.assertEqual(os.stat(self.dir / JOURNAL).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(self.dir / suppression.LOCK).st_mode & 0o777, 0o600)


class Compaction(ListTestCase):
    def test_compaction_keeps_only_entries_in_force_and_a_reader_follows_the_new_file(self):
        reader = self.new()
        self.journal.add("old@example.net")
        self.clock.advance(20 * DAY)
        self.journal.add("gone@example.net")
        self.journal.add("kept@example.net")
        self.journal.remove("gone@example.net")
        reader.refresh()
        self.clock.advance(11 * DAY)       # old@ expired, kept@ not
        inode = os.stat(self.dir / JOURNAL).st_ino
        self.assertEqual(self.new().compact(), 1)
        self.assertNotEqual(os.stat(self.dir / JOURNAL).st_ino, inode)
        self.assertEqual([r["address"] for r in self.lines()], ["kept@example.net"])
        self.assertFalse((self.dir / (JOURNAL + ".new")).exists())
        self.journal.add("after@example.net")       # a writer after the compaction appends to the new file
        self.assertTrue(reader.refresh())           # replaced: read again from its start
        self.assertEqual(sorted(e.address for e in reader.entries()), ["after@example.net", "kept@example.net"])
        self.assertEqual(reader.records, 2)

    def test_compaction_is_wanted_once_dead_records_outnumber_the_live_ones(self):
        records = [{"v": 1, "op": "add", "address": f"a{i}@example.net", "since": self.clock.seconds()}
                   for i in range(suppression.COMPACT_MIN_RECORDS)]
        records += [{"v": 1, "op": "remove", "address": f"a{i}@example.net"} for i in range(600)]
        self.journal.append(records)
        self.journal.refresh()
        self.assertTrue(self.journal.wants_compaction())
        self.assertEqual(self.journal.compact(), suppression.COMPACT_MIN_RECORDS - 600)
        self.assertFalse(self.journal.wants_compaction())

    def test_the_watcher_compacts_at_start_and_polls_once_a_second(self):
        self.journal.add("old@example.net")
        self.clock.advance(31 * DAY)
        watcher = SuppressionWatcher(self.new(), self.clock)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        self.assertEqual(self.lines(), [])                 # compacted: the expired entry is gone
        self.journal.add("new@example.net")
        self.assertIsNone(watcher.journal.refusal("new@example.net"))
        self.clock.advance(suppression.REFRESH_INTERVAL)
        self.assertIsNotNone(watcher.journal.refusal("new@example.net"))


_WRITER = """
import sys
from pathlib import Path
from mailrelay.spool.suppression import SuppressionList
class Clock:
    @staticmethod
    def seconds():
        return 1767225600.0
journal = SuppressionList(Path(sys.argv[1]), 86400.0, Clock())
for i in range(int(sys.argv[3])):
    journal.add(f"w{sys.argv[2]}-{i}@example.net", reason="x" * 300)
"""


class SeveralWriters(ListTestCase):
    def test_processes_appending_at_once_never_mix_their_records(self):
        root = Path(mailrelay.__file__).resolve().parents[1]
        env = dict(os.environ, PYTHONPATH=str(root))
        writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(self.dir), str(n), "40"], env=env)
                   for n in range(4)]
        for writer in writers:
            self.assertEqual(writer.wait(timeout=60), 0)
        self.clock = task.Clock()
        self.clock.advance(1_767_225_600)
        reader = self.new()
        reader.refresh()
        self.assertEqual(reader.skipped, 0)
        self.assertEqual(reader.size(), 160)
        self.assertEqual(len(self.lines()), 160)


class Refusal(ListTestCase):
    def test_the_reply_says_since_when_why_and_until_when(self):
        self.journal.add("bob@example.net", source="bounce", reply="550 5.1.1 User unknown",
                         remote_host="mx.example.net")
        self.journal.refresh()
        reply = self.journal.refusal("bob@example.net")
        self.assertEqual((reply.code, reply.status), (550, "5.1.1"))
        self.assertEqual(reply.text, '<bob@example.net>: suppressed since 2026-01-01 00:00:00 UTC after '
                                     '"550 5.1.1 User unknown" from mx.example.net; until 2026-01-31 00:00:00 UTC')
        self.assertIsNone(self.journal.refusal("alice@example.net"))

    def test_an_operator_entry_gives_the_operator_reason(self):
        self.journal.add("spamtrap@example.net", reason="a known spam trap")
        self.journal.refresh()
        self.assertIn("suppressed since 2026-01-01 00:00:00 UTC added by an operator: a known spam trap",
                      self.journal.refusal("spamtrap@example.net").text)

    def test_a_long_or_hostile_reply_stays_one_bounded_printable_line(self):
        self.journal.add("x" * 60 + "@example.net", source="bounce", reply="550 5.1.1 " + "\r\n\x00é" * 400,
                         remote_host="h" * 250)
        self.journal.refresh()
        text = self.journal.refusal("x" * 60 + "@example.net").text
        self.assertLessEqual(len(text), TEXT_LIMIT)
        self.assertTrue(all(" " <= c <= "~" for c in text))     # RFC 5321 §4.5.3.1.5: one line, 512 octets


class WhatSuppresses(unittest.TestCase):
    def test_address_failures_suppress_and_nothing_else_does(self):
        for code, status in [(550, "5.1.1"), (553, "5.1.3"), (550, "5.1.10"), (550, "5.1.0"), (550, "5.2.1"),
                             (556, "5.1.10")]:
            self.assertTrue(suppresses(code, status), (code, status))
        for code, status in [(550, "5.7.1"), (552, "5.2.2"), (554, "5.6.3"), (450, "4.1.1"), (451, "4.2.1"),
                             (550, "5.1.7"), (550, "5.1.8"), (550, "5.0.0"), (250, "2.1.5")]:
            self.assertFalse(suppresses(code, status), (code, status))

    def test_a_refusal_of_mail_from_never_suppresses_the_recipients(self):
        self.assertFalse(suppresses(550, "5.1.1", sender_refused=True))
        self.assertFalse(RecipientResult("a@b.c", 550, "5.1.1", "x") != RecipientResult(
            "a@b.c", 550, "5.1.1", "x", sender_refused=True))       # takes no part in equality


class Recorder(ListTestCase):
    def test_failures_are_written_in_batches_off_the_reactor_thread(self):
        runs = []

        def run(f, *args):
            d = defer.Deferred()
            runs.append((f, args, d))
            return d
        recorder = SuppressionRecorder(self.journal, run)
        self.assertTrue(recorder.note("a@example.net", 550, "5.1.1", "User unknown", "mx", "Q1"))
        self.assertTrue(recorder.note("b@example.net", 550, "5.2.1", "disabled", "mx", "Q2"))
        self.assertTrue(recorder.note("c@example.net", 550, "5.1.1", "User unknown", "mx", "Q2"))
        self.assertFalse(recorder.note("d@example.net", 550, "5.7.1", "policy", "mx", "Q3"))
        self.assertFalse(recorder.note("e@example.net", 550, "5.1.1", "sender", "mx", "Q4", sender_refused=True))
        self.assertEqual(len(runs), 1)                  # one write in flight; the others wait for it
        waited = recorder.wait()
        f, args, d = runs.pop()
        d.callback(f(*args))
        self.assertEqual(len(runs), 1)                  # then the two that waited, together
        f, args, d = runs.pop()
        self.assertEqual([r["address"] for r in args[0]], ["b@example.net", "c@example.net"])
        d.callback(f(*args))
        self.successResultOf(waited)
        self.journal.refresh()
        self.assertEqual([e.address for e in self.journal.entries()], ["a@example.net", "b@example.net",
                                                                       "c@example.net"])
        self.assertEqual(self.journal.lookup("b@example.net").reply, "550 5.2.1 disabled")

    def test_a_failed_write_is_logged_and_the_recorder_carries_on(self):
        (self.dir / JOURNAL).mkdir()          # unwritable whoever we are (root included)
        recorder = SuppressionRecorder(self.journal)
        recorder.note("a@example.net", 550, "5.1.1", "User unknown")
        self.assertEqual(len(self.flushLoggedErrors(IsADirectoryError)), 1)
        self.successResultOf(recorder.wait())
        (self.dir / JOURNAL).rmdir()
        recorder.note("b@example.net", 550, "5.1.1", "User unknown")
        self.journal.refresh()
        self.assertEqual([e.address for e in self.journal.entries()], ["b@example.net"])


class CommandOnAStoppedRelay(unittest.TestCase):
    """`mailrelay suppression` in this process (cli.suppression.run), no relay running."""

    def setUp(self):
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.config = self.dir / "tap.conf"
        self.config.write_text('spool = "var/spool"\n\n[suppression]\nenabled = false\nduration = "2d"\n')
        self.clock = task.Clock()
        self.clock.advance(1_767_225_600)

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        import contextlib
        import io

        from mailrelay.cli import suppression as cli
        from mailrelay.cli.main import build_parser

        args = build_parser().parse_args(["suppression", *argv, "--config", str(self.config)])
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.run(args, clock=self.clock)
        return status, out.getvalue(), err.getvalue()

    def test_add_creates_the_spool_list_shows_it_and_says_suppression_is_off(self):
        status, out, err = self.run_cli("add", "Bob@Example.NET", "--reason", "left\nthe company")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, "Bob@Example.NET suppressed until 2026-01-03 00:00:00 UTC; a running relay refuses "
                              "RCPT to it within a second; suppression is off in the config: listed addresses "
                              "are not refused until it is enabled\n")
        self.assertEqual(os.stat(self.dir / "var" / "spool").st_mode & 0o777, 0o700)
        status, out, _ = self.run_cli("list")
        self.assertEqual(out.splitlines()[0], "Bob@Example.NET  since 2026-01-01 00:00:00 UTC  until 2026-01-03 "
                                              "00:00:00 UTC  added by an operator: left the company")
        status, out, _ = self.run_cli("list", "--json")
        self.assertEqual(json.loads(out)[0]["until"], "2026-01-03T00:00:00Z")
        self.clock.advance(2 * DAY)
        status, out, _ = self.run_cli("list")
        self.assertEqual(out.splitlines()[0], "0 addresses suppressed; suppression is off in the config: listed "
                                              "addresses are not refused until it is enabled")

    def test_remove_of_an_address_not_listed_exits_1_and_a_bad_config_exits_2(self):
        self.assertEqual(self.run_cli("remove", "nobody@example.net"),
                         (1, "", "mailrelay suppression: nobody@example.net is not suppressed\n"))
        self.config.write_text("[suppression]\nenabled = \"yes\"\n")
        status, out, err = self.run_cli("list")
        self.assertEqual((status, out), (2, ""))
        self.assertIn("suppression.enabled", err)
        self.assertEqual(len(err.splitlines()), 1)

    def test_what_is_not_an_address_is_refused(self):
        for bad in ("bob", "@example.net", "bob@localhost", "bob@exa mple.net", "b\x00b@example.net"):
            status, out, err = self.run_cli("add", bad)
            self.assertEqual((status, out), (1, ""), bad)
            self.assertIn("is not an address (local@domain)", err)
