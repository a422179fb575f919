"""`mailrelay queue ...`: the operator's view of the spool and hands on it, over a real spool directory.

Messages are written with a real (unstarted, hence synchronous) Spool and given delivery states with
save_state; the CLI runs through mailrelay.cli.main.main() with stdout/stderr captured.  A started Spool
stands for a running relay (it holds <spool>/lock), and a real Scheduler over the same spool checks
that what the CLI leaves behind is what the relay acts on.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface import implementer

import mailrelay
from mailrelay.cli import main as cli_main
from mailrelay.cli import queue as cli_queue
from mailrelay.cli.queue_format import HEADER_CAP, human_duration, human_size, printable, relative_time
from mailrelay.config import DeliveryConfig, QueueConfig
from mailrelay.queue.results import RecipientResult
from mailrelay.queue.scheduler import POLL_INTERVAL, Scheduler
from mailrelay.envelope import Envelope
from mailrelay.interfaces import IDeliveryReporter, INextHop, IRouter
from mailrelay.spool import Spool

HOUR = 3600.0
HEADERS = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: quarterly report\r\n"
BODY = b"the body is never shown: s3cr3t-body-text\r\n"


def recipient_state(attempts=0, next_attempt=0.0, reply=None, done=None, reported=False, first=None):
    last = None if reply is None else dict(zip(("code", "status", "text", "remote_host"), reply))
    return {"attempts": attempts, "first_attempt": first, "next_attempt": next_attempt, "last_reply": last,
            "done": done, "reported": reported}


class QueueCLITestCase(unittest.TestCase):
    """A config and a spool directory in a fresh temp dir; stdout and stderr captured."""

    def setUp(self):
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.config = self.dir / "tap.conf"
        self.config.write_text('hostname = "relay.test.example"\nspool = "spool"\n')
        self.spool_dir = self.dir / "spool"
        self.spool = Spool(self.spool_dir)        # never started: every call is synchronous
        self.now = time.time()
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

    def add_message(self, sender="alice@example.org", recipients=("bob@example.net",), age=0.0,
                    body=HEADERS + b"\r\n" + BODY, state=None, held=False, **envelope) -> str:
        envelope = Envelope(sender, tuple(recipients), self.now - age, client_address="127.0.0.2",
                            client_helo="app1.example.org", identity="app1",
                            tls="TLSv1.3 TLS_AES_256_GCM_SHA384", **envelope)
        writer = self.spool.new_message(envelope)
        writer.write(body)
        queue_id = self.successResultOf(writer.commit())
        if state is not None:
            self.successResultOf(self.spool.save_state(queue_id, {"version": 1, "recipients": state}))
        if held:
            self.successResultOf(self.spool.hold(queue_id))
        return queue_id

    def queue(self, *argv: str) -> int:
        self.stdout.truncate(0)
        self.stdout.seek(0)
        return cli_main.main(["queue", *argv, "--config", str(self.config)])

    def saved_state(self, queue_id: str) -> dict:
        return self.spool.load(queue_id).state["recipients"]

    def assertOneLineError(self, status: int, expected_status: int, mentioning: str):
        err = self.stderr.getvalue()
        self.assertEqual(status, expected_status, err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertTrue(err.startswith("mailrelay queue: "), err)
        self.assertIn(mentioning, err)
        self.assertNotIn("Traceback", err)

    def start_relay_spool(self) -> Spool:
        """A started Spool on the same directory: what a running relay looks like to the CLI."""
        running = Spool(self.spool_dir)
        running.startService()
        self.addCleanup(running.stopService)
        return running


class ListTests(QueueCLITestCase):
    def add_three(self):
        recipients = ("bob@example.net", "carol@example.com")
        deferred = self.add_message(age=3 * HOUR + 30, recipients=recipients, state={
            "bob@example.net": recipient_state(2, self.now + 20 * 60 + 30,
                                               (451, "4.4.1", "mailbox busy, " + "try again later " * 5,
                                                "mx1.example.net"), first=self.now - HOUR),
            "carol@example.com": recipient_state(1, reply=(250, "2.0.0", "ok"), done="delivered")})
        bounce = self.add_message(sender="", recipients=[f"u{n}@example.com" for n in range(12)], age=600)
        held = self.add_message(age=60, held=True)
        return deferred, bounce, held

    def test_empty_queue_says_so(self):
        self.assertEqual(self.queue("list"), 0)
        self.assertEqual(self.stdout.getvalue(), "queue is empty\n")

    def test_a_spool_directory_that_does_not_exist_yet_is_an_empty_queue(self):
        self.assertEqual(self.queue("list"), 0)
        self.assertEqual(self.stdout.getvalue(), "queue is empty\n")
        self.assertFalse(self.spool_dir.exists(), "listing must not create the spool")

    def test_one_line_per_message_then_a_summary(self):
        deferred, bounce, held = self.add_three()
        self.assertEqual(self.queue("list"), 0)
        lines = self.stdout.getvalue().splitlines()
        self.assertEqual(len(lines), 4, lines)
        self.assertEqual(lines[3], "3 messages, 1 held, oldest 3h")
        self.assertEqual([line.split()[0] for line in lines[:3]], [deferred, bounce, held])

    def test_a_line_shows_age_size_sender_pending_recipients_attempts_next_attempt_and_last_reply(self):
        deferred, _, _ = self.add_three()
        self.queue("list")
        line = self.stdout.getvalue().splitlines()[0]
        size = len(HEADERS + b"\r\n" + BODY)
        self.assertEqual(line.split()[1:3], ["3h", f"{size}B"])
        self.assertIn("  alice@example.org -> bob@example.net  attempts 2  next in 20m  ", line)
        self.assertNotIn("carol@example.com", line, "delivered recipients are not pending")
        self.assertIn("last 451 4.4.1 mailbox busy, try again later", line)
        self.assertTrue(line.endswith("..."), "a long reply is truncated")
        self.assertNotIn("HELD", line)

    def test_null_sender_is_shown_as_angle_brackets_and_many_recipients_as_a_count(self):
        _, bounce, _ = self.add_three()
        self.queue("list")
        line = self.stdout.getvalue().splitlines()[1]
        self.assertIn("<> -> 12 recipients  attempts 0  next now  last -", line)

    def test_held_messages_are_marked(self):
        _, _, held = self.add_three()
        self.queue("list")
        self.assertTrue(self.stdout.getvalue().splitlines()[2].endswith("  HELD"))

    def test_json_lists_every_message_with_per_recipient_state(self):
        deferred, bounce, held = self.add_three()
        self.assertEqual(self.queue("list", "--json"), 0)
        listed = json.loads(self.stdout.getvalue())
        self.assertEqual([m["id"] for m in listed], [deferred, bounce, held])
        first = listed[0]
        self.assertEqual(first["sender"], "alice@example.org")
        self.assertEqual(first["size"], len(HEADERS + b"\r\n" + BODY))
        self.assertFalse(first["held"])
        self.assertAlmostEqual(first["arrival"], self.now - 3 * HOUR - 30, places=3)
        self.assertEqual(first["client_address"], "127.0.0.2")
        self.assertEqual(first["identity"], "app1")
        bob, carol = first["recipients"]
        self.assertEqual((bob["address"], bob["pending"], bob["attempts"], bob["last_reply"]["status"]),
                         ("bob@example.net", True, 2, "4.4.1"))
        self.assertEqual((carol["address"], carol["pending"], carol["done"]),
                         ("carol@example.com", False, "delivered"))
        self.assertEqual(listed[1]["sender"], "")
        self.assertEqual(len(listed[1]["recipients"]), 12)
        self.assertTrue(listed[2]["held"])

    def test_ages_are_measured_on_the_clock_given_to_run(self):
        self.add_message(age=0)
        clock = task.Clock()
        clock.advance(self.now + 5 * HOUR)
        args = cli_main.build_parser().parse_args(["queue", "list", "--config", str(self.config)])
        self.assertEqual(cli_queue.run(args, clock=clock), 0)
        self.assertEqual(self.stdout.getvalue().splitlines()[-1], "1 message, 0 held, oldest 5h")

    def test_json_of_an_empty_queue_is_an_empty_array(self):
        self.assertEqual(self.queue("list", "--json"), 0)
        self.assertEqual(json.loads(self.stdout.getvalue()), [])

    def test_control_characters_from_a_remote_reply_never_reach_the_terminal(self):
        self.add_message(state={"bob@example.net": recipient_state(
            1, self.now + 60, (451, "4.7.0", "\x1b]0;owned\x07\x1b[2J\x9b"), first=self.now)})
        self.queue("list")
        out = self.stdout.getvalue()
        self.assertNotIn("\x1b", out)
        self.assertNotIn("\x07", out)
        self.assertNotIn("\x9b", out)
        self.assertIn("\\x1b]0;owned\\x07", out)

    def test_a_message_with_a_corrupt_state_file_is_still_listed(self):
        good = self.add_message()
        bad = self.add_message()
        (self.spool_dir / "state" / f"{bad}.json").write_bytes(b"{not json")
        self.assertEqual(self.queue("list"), 0)
        lines = self.stdout.getvalue().splitlines()
        self.assertTrue(lines[0].startswith(good))
        self.assertTrue(lines[1].startswith(bad))
        self.assertIn("state unreadable", lines[1])
        self.assertEqual(lines[2], "2 messages, 0 held, oldest 0s")


class ShowTests(QueueCLITestCase):
    def test_show_prints_the_envelope_each_recipients_state_and_the_headers_but_not_the_body(self):
        queue_id = self.add_message(recipients=("bob@example.net", "carol@example.com"), age=2 * HOUR, state={
            "bob@example.net": recipient_state(3, self.now + 630, (421, "4.3.2", "shutting down",
                                                                   "mx2.example.net"), first=self.now - HOUR),
            "carol@example.com": recipient_state(1, reply=(550, "5.1.1", "no such user"), done="bounced",
                                                 reported=True)})
        self.assertEqual(self.queue("show", queue_id), 0)
        out = self.stdout.getvalue()
        for expected in (f"id:          {queue_id}\n", "(2h ago)", "sender:      alice@example.org\n",
                         "client:      127.0.0.2 (HELO app1.example.org)\n", "identity:    app1\n",
                         "tls:         TLSv1.3 TLS_AES_256_GCM_SHA384\n",
                         "recipient:   bob@example.net: pending, next attempt in 10m\n",
                         "  attempts:  3, first ", "  last:      421 4.3.2 shutting down (mx2.example.net)\n",
                         "recipient:   carol@example.com: bounced, DSN sent\n",
                         "  last:      550 5.1.1 no such user\n",
                         "Subject: quarterly report\n", "From: Alice <alice@example.org>\n"):
            self.assertIn(expected, out)
        self.assertNotIn("s3cr3t-body-text", out)
        self.assertNotIn("HELD", out)

    def test_show_marks_a_held_message(self):
        queue_id = self.add_message(held=True)
        self.queue("show", queue_id)
        self.assertIn("HELD", self.stdout.getvalue().splitlines()[0])

    def test_show_accepts_a_lower_case_id(self):
        queue_id = self.add_message()
        self.assertEqual(self.queue("show", queue_id.lower()), 0)
        self.assertIn(queue_id, self.stdout.getvalue())

    def test_a_huge_header_section_is_cut_at_the_cap_on_a_line_boundary(self):
        line = b"X-Filler: " + b"y" * 88 + b"\r\n"           # 100 bytes
        headers = line * (HEADER_CAP // len(line) + 50)
        queue_id = self.add_message(body=headers + b"\r\n" + BODY)
        self.assertEqual(self.queue("show", queue_id), 0)
        out = self.stdout.getvalue()
        shown = out.count("X-Filler: ")
        self.assertEqual(shown, HEADER_CAP // len(line))
        self.assertIn("header section longer than 64 KiB", out)
        self.assertNotIn("s3cr3t-body-text", out)

    def test_a_message_without_a_body_shows_all_of_its_headers(self):
        queue_id = self.add_message(body=HEADERS)
        self.queue("show", queue_id)
        self.assertIn("Subject: quarterly report\n", self.stdout.getvalue())

    def test_show_json_has_the_detail_and_the_headers(self):
        queue_id = self.add_message()
        self.assertEqual(self.queue("show", queue_id, "--json"), 0)
        shown = json.loads(self.stdout.getvalue())
        self.assertEqual(shown["id"], queue_id)
        self.assertEqual(shown["recipients"][0]["address"], "bob@example.net")
        self.assertEqual(shown["headers"], HEADERS.decode())
        self.assertFalse(shown["headers_truncated"])

    def test_unknown_id_is_one_line_naming_the_spool_and_exit_1(self):
        self.add_message()
        status = self.queue("show", "0000000000000000")
        self.assertOneLineError(status, 1, f"no message 0000000000000000 in {self.spool_dir}")
        self.assertEqual(self.stdout.getvalue(), "")

    def test_a_malformed_id_is_an_unknown_id_never_a_path(self):
        for bad in ("../state/x", "", "\x1b[2J"):
            self.stderr.truncate(0)
            self.stderr.seek(0)
            status = self.queue("show", bad)
            self.assertOneLineError(status, 1, "no message")
            self.assertNotIn("\x1b", self.stderr.getvalue())


class StoppedRelayTests(QueueCLITestCase):
    """No relay holds the lock: the CLI acts on the spool itself, and the effect is persisted."""

    def test_hold_and_release_are_persisted(self):
        queue_id = self.add_message()
        self.assertEqual(self.queue("hold", queue_id), 0)
        self.assertIn("held", self.stdout.getvalue())
        self.assertTrue(Spool(self.spool_dir).is_held(queue_id))
        self.assertEqual(self.queue("hold", queue_id), 0)
        self.assertIn("already held", self.stdout.getvalue())
        self.assertEqual(self.queue("release", queue_id), 0)
        self.assertFalse(Spool(self.spool_dir).is_held(queue_id))
        self.assertEqual(self.queue("release", queue_id), 0)
        self.assertIn("was not held", self.stdout.getvalue())
        self.assertEqual(os.listdir(self.spool_dir / "control"), [], "nothing posted")

    def test_the_spool_lock_is_given_back_so_the_relay_can_start_afterwards(self):
        queue_id = self.add_message()
        self.assertEqual(self.queue("hold", queue_id), 0)
        self.assertFalse(Spool.in_use(self.spool_dir))
        running = self.start_relay_spool()
        self.assertTrue(running.running)

    def test_delete_removes_the_message_and_its_state(self):
        keep = self.add_message()
        queue_id = self.add_message(state={"bob@example.net": recipient_state(1, self.now + 60)}, held=True)
        self.assertEqual(self.queue("delete", queue_id), 0)
        self.assertIn("deleted", self.stdout.getvalue())
        self.assertEqual(Spool(self.spool_dir).queue_ids(), [keep])
        self.assertEqual(os.listdir(self.spool_dir / "state"), [])
        self.assertEqual(os.listdir(self.spool_dir / "hold"), [])

    def test_hold_release_delete_of_an_unknown_id_fail_with_one_line(self):
        self.add_message()
        for verb in ("hold", "release", "delete", "bounce", "flush"):
            self.stderr.truncate(0)
            self.stderr.seek(0)
            self.assertOneLineError(self.queue(verb, "ZZZZZZZZZZZZZZZZ"), 1, "no message ZZZZZZZZZZZZZZZZ")

    def test_flush_makes_every_pending_recipient_due_now_but_leaves_held_messages_alone(self):
        later = self.now + 2 * HOUR
        deferred = self.add_message(recipients=("bob@example.net", "carol@example.com"), state={
            "bob@example.net": recipient_state(2, later, (451, "4.4.1", "later")),
            "carol@example.com": recipient_state(1, 0.0, (250, "2.0.0", "ok"), done="delivered")})
        held = self.add_message(state={"bob@example.net": recipient_state(1, later)}, held=True)
        self.assertEqual(self.queue("flush"), 0)
        self.assertIn("1 message made due now", self.stdout.getvalue())
        self.assertIn("1 held, left alone", self.stdout.getvalue())
        saved = self.saved_state(deferred)
        self.assertEqual(saved["bob@example.net"]["next_attempt"], 0.0)
        self.assertEqual(saved["bob@example.net"]["attempts"], 2, "history kept")
        self.assertEqual(saved["carol@example.com"]["done"], "delivered")
        self.assertEqual(self.saved_state(held)["bob@example.net"]["next_attempt"], later)

    def test_flush_of_an_empty_queue_says_there_is_nothing_to_do(self):
        self.assertEqual(self.queue("flush"), 0)
        self.assertIn("nothing to flush", self.stdout.getvalue())

    def test_bounce_closes_the_pending_recipients_for_a_dsn_and_lifts_the_hold(self):
        queue_id = self.add_message(recipients=("bob@example.net", "carol@example.com"), held=True, state={
            "bob@example.net": recipient_state(2, self.now + 60, (451, "4.4.1", "later")),
            "carol@example.com": recipient_state(1, 0.0, (250, "2.0.0", "ok"), done="delivered")})
        self.assertEqual(self.queue("bounce", queue_id), 0)
        self.assertIn("1 recipient bounced; the relay sends a DSN to alice@example.org",
                      self.stdout.getvalue())
        saved = self.saved_state(queue_id)
        bob = saved["bob@example.net"]
        self.assertEqual((bob["done"], bob["reported"]), ("bounced", False))
        self.assertEqual(saved["bob@example.net"]["last_reply"]["status"], "5.0.0")
        self.assertEqual(saved["bob@example.net"]["attempts"], 2)
        self.assertEqual(saved["carol@example.com"]["done"], "delivered")
        self.assertFalse(self.spool.is_held(queue_id))

    def test_bounce_of_a_null_sender_message_says_no_dsn_will_go(self):
        queue_id = self.add_message(sender="")
        self.queue("bounce", queue_id)
        self.assertIn("no DSN: null sender", self.stdout.getvalue())

    def test_a_missing_config_file_is_one_line_and_exit_2(self):
        status = cli_main.main(["queue", "list", "--config", str(self.dir / "nope.conf")])
        self.assertOneLineError(status, 2, "nope.conf")

    def test_a_bad_config_key_is_one_line_and_exit_2(self):
        self.config.write_text('spool = "spool"\nspoool = "typo"\n')
        self.assertOneLineError(self.queue("list"), 2, "spoool")


class RunningRelayTests(QueueCLITestCase):
    """A started Spool holds the lock: the CLI posts requests instead of touching the spool."""

    def test_hold_posts_a_request_the_relay_takes_and_does_not_hold_itself(self):
        queue_id = self.add_message()
        running = self.start_relay_spool()
        self.assertEqual(self.queue("hold", queue_id), 0)
        self.assertIn("requested from the running relay", self.stdout.getvalue())
        self.assertFalse(running.is_held(queue_id), "the relay acts, not the CLI")
        self.assertEqual(running.take_requests(), [("hold", queue_id)])

    def test_each_verb_is_posted_as_such(self):
        queue_id = self.add_message()
        running = self.start_relay_spool()
        for verb in ("release", "delete", "bounce"):
            self.assertEqual(self.queue(verb, queue_id), 0)
        self.assertEqual(self.queue("flush"), 0)
        self.assertEqual(running.take_requests(), [("release", queue_id), ("delete", queue_id),
                                                   ("bounce", queue_id), ("flush", None)])
        self.assertEqual(running.queue_ids(), [queue_id], "nothing was deleted by the CLI")

    def test_an_unknown_id_posts_nothing(self):
        self.add_message()
        running = self.start_relay_spool()
        self.assertOneLineError(self.queue("delete", "ZZZZZZZZZZZZZZZZ"), 1, "no message")
        self.assertEqual(running.take_requests(), [])

    def test_list_and_show_read_the_spool_of_a_running_relay(self):
        queue_id = self.add_message()
        self.start_relay_spool()
        self.assertEqual(self.queue("list"), 0)
        self.assertIn(queue_id, self.stdout.getvalue())
        self.assertEqual(self.queue("show", queue_id), 0)

    def test_the_running_scheduler_acts_on_a_posted_hold(self):
        queue_id = self.add_message(state={"bob@example.net": recipient_state(1, self.now + HOUR)})
        running = self.start_relay_spool()
        clock = task.Clock()
        clock.advance(self.now)
        scheduler = make_scheduler(running, clock)
        scheduler.startService()
        self.addCleanup(scheduler.stopService)
        self.queue("hold", queue_id)
        clock.advance(POLL_INTERVAL)
        self.assertTrue(running.is_held(queue_id))


# -- what the relay does at start with what the CLI left in a stopped spool -------------------------

@implementer(INextHop)
class RecordingHop:
    def __init__(self):
        self.calls = []

    def deliver(self, message, recipients):
        self.calls.append((message.queue_id, tuple(recipients)))
        return defer.succeed([RecipientResult(r, 250, "2.0.0", "ok", "mx.test") for r in recipients])


@implementer(IRouter)
class DirectRouter:
    def route(self, sender, recipient, attempts):
        return None


@implementer(IDeliveryReporter)
class RecordingReporter:
    def __init__(self):
        self.bounces = []

    def bounce(self, message, results):
        self.bounces.append((message.queue_id, [(r.recipient, r.code, r.status) for r in results]))
        return defer.succeed(None)

    def delay(self, message, recipients):
        return defer.succeed(None)


def make_scheduler(spool, clock, hop=None, reporter=None) -> Scheduler:
    return Scheduler(spool, DirectRouter(), {}, hop or RecordingHop(), QueueConfig(), DeliveryConfig(),
                     reporter or RecordingReporter(), clock=clock)


class SchedulerAtStartTests(QueueCLITestCase):
    """The contract this CLI relies on: the scheduler reads these states at start and acts on them."""

    def start_scheduler(self, **kwargs):
        clock = task.Clock()
        clock.advance(self.now)
        scheduler = make_scheduler(self.spool, clock, **kwargs)
        scheduler.startService()
        self.addCleanup(scheduler.stopService)
        clock.advance(0)
        return scheduler

    def test_a_flushed_message_is_tried_as_soon_as_the_relay_starts(self):
        queue_id = self.add_message(state={"bob@example.net": recipient_state(1, self.now + 2 * HOUR)})
        self.queue("flush")
        hop = RecordingHop()
        self.start_scheduler(hop=hop)
        self.assertEqual(hop.calls, [(queue_id, ("bob@example.net",))])

    def test_a_message_not_flushed_waits_for_its_next_attempt(self):
        self.add_message(state={"bob@example.net": recipient_state(1, self.now + 2 * HOUR)})
        hop = RecordingHop()
        self.start_scheduler(hop=hop)
        self.assertEqual(hop.calls, [])

    def test_a_bounced_message_gets_its_dsn_and_leaves_the_spool_when_the_relay_starts(self):
        queue_id = self.add_message(recipients=("bob@example.net", "carol@example.com"), held=True, state={
            "bob@example.net": recipient_state(2, self.now + HOUR, (451, "4.4.1", "later"))})
        self.queue("bounce", queue_id)
        hop, reporter = RecordingHop(), RecordingReporter()
        self.start_scheduler(hop=hop, reporter=reporter)
        self.assertEqual(hop.calls, [])
        self.assertEqual(reporter.bounces, [(queue_id, [("bob@example.net", 554, "5.0.0"),
                                                        ("carol@example.com", 554, "5.0.0")])])
        self.assertEqual(self.spool.queue_ids(), [])


class FormatTests(unittest.TestCase):
    def test_durations_are_rounded_down_to_two_units(self):
        seconds = (0, 45, 60, 3599, 3600, 3725, 86400 * 2 + 4 * 3600 + 59)
        self.assertEqual([human_duration(s) for s in seconds],
                         ["0s", "45s", "1m", "59m", "1h", "1h2m", "2d4h"])

    def test_sizes_are_compact(self):
        self.assertEqual([human_size(n) for n in (842, 1536, 3 * 2**20)], ["842B", "1.5K", "3.0M"])

    def test_next_attempt_in_the_past_is_now(self):
        self.assertEqual(relative_time(100.0, 200.0), "now")
        self.assertEqual(relative_time(200.0, 200.0), "now")
        self.assertEqual(relative_time(200.0 + 20 * 60, 200.0), "in 20m")

    def test_printable_escapes_controls_but_keeps_tabs_and_text(self):
        self.assertEqual(printable("a\tb\x1b[1m\r\nü"), "a\tb\\x1b[1m\\x0d\\x0aü")


class CommandLineTests(QueueCLITestCase):
    def test_queue_list_runs_as_a_program(self):
        queue_id = self.add_message(age=HOUR)
        root = Path(mailrelay.__file__).resolve().parent.parent
        env = dict(os.environ, PYTHONPATH=str(root))
        result = subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "queue", "list", "--config",
                                 str(self.config)], capture_output=True, text=True, cwd=root, env=env,
                                timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr, "")
        lines = result.stdout.splitlines()
        self.assertTrue(lines[0].startswith(queue_id + "  "))
        self.assertEqual(lines[1], "1 message, 0 held, oldest 1h")

    def test_an_unknown_id_exits_1_from_the_program(self):
        self.add_message()
        root = Path(mailrelay.__file__).resolve().parent.parent
        result = subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "queue", "show", "NOPE",
                                 "--config", str(self.config)], capture_output=True, text=True, cwd=root,
                                env=dict(os.environ, PYTHONPATH=str(root)), timeout=60)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, f"mailrelay queue: no message NOPE in {self.spool_dir}\n")
        self.assertEqual(result.stdout, "")
