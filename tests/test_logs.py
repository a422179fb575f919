"""Structured logs: Postfix-like text lines and JSON lines for representative events, redaction of
credentials in both, namespace filtering, and the observer installed and removed with its service."""
from __future__ import annotations

import io
import json
import random

from twisted.internet import task
from twisted.logger import ILogObserver, Logger, LogPublisher, formatEvent
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailrelay import logs
from mailrelay.config import DeliveryConfig, LogConfig, QueueConfig
from mailrelay.queue.scheduler import STOP_TIMEOUT, Scheduler
from tests.support.scheduling import NOW, FakeHop, FakeReporter, FakeRouter, MemorySpool

SECRET = "hunter2"


class Capture:
    """A publisher with the observer under test writing into a StringIO, and a Logger on it."""

    def __init__(self, kind: str, namespace: str = "mailrelay.server.session"):
        self.stream = io.StringIO()
        self.publisher = LogPublisher()
        self.observer = logs.make_observer(LogConfig(kind), self.stream)
        self.publisher.addObserver(self.observer)
        self.log = Logger(namespace=namespace, observer=self.publisher)

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def body(self) -> str:
        """The only line written, without its time, level and namespace prefix."""
        (line,) = self.lines()
        return line.split(": ", 1)[1]

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.lines()]


def queued(log: Logger, **extra) -> None:
    logs.log_message(log, "queued", "3F2A9C", client="203.0.113.5", identity="alice",
                     sender="alice@example.org", recipients=["bob@example.net", "carol@example.net"],
                     size=1234, tls="TLSv1.3", **extra)


def delivered(log: Logger, stage: str = "delivered", code: int = 250, status: str = "2.0.0") -> None:
    # The fields the scheduler logs for every recipient's outcome.
    log.info("{queue_id}: {stage} {recipient} via {hop} ({remote}): {code} {status} {text}",
             queue_id="3F2A9C", stage=stage, recipient="bob@example.net", hop="direct",
             remote="mx.example.net[127.0.0.2]:25", code=code, status=status, text="ok", attempts=1,
             next_attempt=NOW, delay=1.2)


class TextFormatTests(unittest.TestCase):
    def test_observer_provides_ilogobserver(self):
        self.assertTrue(verifyObject(ILogObserver, Capture("text").observer))

    def test_queued_message_reads_like_postfix(self):
        capture = Capture("text")
        queued(capture.log)
        self.assertEqual(capture.body(), "3F2A9C: client=203.0.113.5, identity=alice, from=<alice@example.org>, "
                                         "size=1234, nrcpt=2, tls=TLSv1.3 (queue active)")

    def test_line_starts_with_utc_time_level_and_namespace(self):
        capture = Capture("text")
        queued(capture.log)
        stamp, level, namespace = capture.lines()[0].split(" ")[:3]
        self.assertRegex(stamp, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual((level, namespace), ("info", "mailrelay.server.session:"))

    def test_delivery_reads_like_postfix_with_relay_delay_and_reply(self):
        capture = Capture("text", "mailrelay.delivery.scheduler")
        delivered(capture.log)
        self.assertEqual(capture.body(), "3F2A9C: to=<bob@example.net>, relay=mx.example.net[127.0.0.2]:25, "
                                         "transport=direct, delay=1.2, attempts=1, status=sent (250 2.0.0 ok)")

    def test_deferred_and_bounced_recipients_say_so(self):
        capture = Capture("text")
        delivered(capture.log, "deferred", 451, "4.4.1")
        delivered(capture.log, "bounced", 550, "5.1.1")
        self.assertIn("status=deferred (451 4.4.1 ok)", capture.lines()[0])
        self.assertIn("status=bounced (550 5.1.1 ok)", capture.lines()[1])

    def test_event_without_queue_id_is_just_its_message(self):
        capture = Capture("text")
        capture.log.info("connection from {ip} refused: connection limit", ip="198.51.100.7")
        self.assertEqual(capture.body(), "connection from 198.51.100.7 refused: connection limit")

    def test_other_message_events_keep_their_text_prefixed_once_with_the_queue_id(self):
        capture = Capture("text")
        capture.log.info("{queue_id}: held, not tried", queue_id="Q1", stage="held")
        capture.log.info("control request {verb}", queue_id="Q2", verb="flush", stage="control")
        self.assertEqual([line.split(": ", 1)[1] for line in capture.lines()],
                         ["Q1: held, not tried", "Q2: control request flush"])

    def test_a_failure_is_summarised_on_the_same_line(self):
        capture = Capture("text")
        try:
            raise OSError("disk full")
        except OSError:
            capture.log.failure("{queue_id}: cannot save", queue_id="Q3")
        self.assertEqual(capture.body(), "Q3: cannot save [OSError: disk full]")

    def test_line_breaks_in_fields_cannot_forge_a_second_line(self):
        capture = Capture("text")
        logs.log_message(capture.log, "received", "Q4", client="203.0.113.5",
                         sender="x@example.org\r\n2026-01-01T00:00:00.000Z info mailrelay: Q9: status=sent")
        self.assertEqual(len(capture.lines()), 1)
        self.assertIn("from=<x@example.org??2026", capture.lines()[0])

    def test_log_message_gives_twisted_its_own_text_so_twistds_log_reads_the_same(self):
        events: list[dict] = []
        logs.log_message(Logger(namespace="mailrelay.x", observer=events.append), "queued", "Q5",
                         sender="a@example.org", recipients=["b@example.net"], size=10)
        self.assertEqual(formatEvent(events[0]), "Q5: from=<a@example.org>, size=10, nrcpt=1 (queue active)")
        self.assertEqual((events[0]["queue_id"], events[0]["stage"]), ("Q5", "queued"))


class JSONFormatTests(unittest.TestCase):
    def test_each_line_is_one_json_object_with_time_level_namespace_message_and_fields(self):
        capture = Capture("json")
        queued(capture.log)
        (record,) = capture.records()
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "mailrelay.server.session")
        self.assertTrue(record["message"].startswith("3F2A9C: client=203.0.113.5"))
        self.assertEqual(record["queue_id"], "3F2A9C")
        self.assertEqual(record["stage"], "queued")
        self.assertEqual(record["recipients"], ["bob@example.net", "carol@example.net"])
        self.assertEqual(record["size"], 1234)
        self.assertFalse([k for k in record if k.startswith("log_")])

    def test_values_json_cannot_hold_are_written_as_repr(self):
        capture = Capture("json")
        capture.log.info("odd values", when=object, ratio=float("nan"), raw=b"\x00\xff", ok=[1, "a"])
        (record,) = capture.records()
        self.assertEqual(record["when"], repr(object))
        self.assertEqual(record["ratio"], "nan")
        self.assertEqual(record["raw"], repr(b"\x00\xff"))
        self.assertEqual(record["ok"], [1, "a"])

    def test_fields_named_like_the_header_do_not_overwrite_it(self):
        capture = Capture("json")
        capture.log.info("hello", time="noon", message="field")
        (record,) = capture.records()
        self.assertEqual((record["message"], record["_message"], record["_time"]), ("hello", "field", "noon"))

    def test_a_failure_carries_error_and_traceback(self):
        capture = Capture("json")
        try:
            raise ValueError("bad state")
        except ValueError:
            capture.log.failure("{queue_id}: unreadable", queue_id="Q6")
        (record,) = capture.records()
        self.assertEqual(record["level"], "critical")
        self.assertEqual(record["error"], "ValueError: bad state")
        self.assertIn("Traceback", record["traceback"])

    def test_a_field_that_cannot_even_be_repred_does_not_break_logging(self):
        class Hostile:
            def __repr__(self):
                raise RuntimeError("no repr")
        capture = Capture("json")
        capture.log.info("about {queue_id}", queue_id="Q7", thing=Hostile())
        capture.log.info("next event")
        self.assertEqual(len(capture.lines()), 2)
        self.assertIn("could not be formatted", capture.lines()[0])
        self.assertEqual(json.loads(capture.lines()[1])["message"], "next event")

    def test_one_message_is_followed_by_queue_id_through_the_real_scheduler(self):
        capture = Capture("json", "mailrelay.delivery.scheduler")
        clock = task.Clock()
        clock.advance(NOW)
        spool, direct = MemorySpool(), FakeHop(script={"b@example.net": [(451, "4.4.1"), (250, "2.0.0")]})
        spool.add("Q8", ["b@example.net"], received_at=NOW)
        scheduler = Scheduler(spool, FakeRouter(), {}, direct, QueueConfig(first_retry=300.0, max_retry=600.0),
                              DeliveryConfig(), FakeReporter(), clock=clock, rng=random.Random(1))
        scheduler.log = capture.log
        scheduler.startService()
        clock.advance(0)
        clock.advance(600)
        stopped = scheduler.stopService()
        clock.advance(STOP_TIMEOUT)
        self.successResultOf(stopped)
        stages = [r["stage"] for r in capture.records() if r.get("queue_id") == "Q8"]
        self.assertEqual(stages, ["attempt", "deferred", "attempt", "delivered", "removed"])
        final = [r for r in capture.records() if r.get("stage") == "delivered"][0]
        self.assertEqual((final["recipient"], final["code"]), ("b@example.net", 250))
        self.assertTrue(300.0 <= final["delay"] <= 600.0, final["delay"])


class RedactionTests(unittest.TestCase):
    def both(self, emit) -> str:
        out = ""
        for kind in ("text", "json"):
            capture = Capture(kind)
            emit(capture.log)
            out += capture.stream.getvalue()
        self.assertTrue(out)
        return out

    def test_a_password_field_never_appears_in_either_format(self):
        out = self.both(lambda log: log.info("AUTH for {user} with {password}", user="bob", password=SECRET))
        self.assertNotIn(SECRET, out)
        self.assertIn("AUTH for bob with [redacted]", out)

    def test_every_sensitive_word_is_redacted_whatever_its_case(self):
        fields = {"Password": "p-value-1", "client_secret": "p-value-2", "PASSWD": "p-value-3",
                  "credentials": "p-value-4", "auth_data": "p-value-5", "api_token": "p-value-6"}
        out = self.both(lambda log: log.info("login", **fields))
        self.assertNotIn("p-value", out)
        self.assertEqual(out.count("[redacted]"), 6)

    def test_nested_and_bytes_secrets_are_redacted(self):
        out = self.both(lambda log: log.info("bind", ldap={"dn": "uid=bob", "bind_password": SECRET},
                                             auth_data=SECRET.encode()))
        self.assertNotIn(SECRET, out)
        self.assertIn("uid=bob", out)

    def test_a_secret_value_is_scrubbed_from_other_fields_and_failures(self):
        def emit(log):
            try:
                raise RuntimeError(f"server said: 535 bad {SECRET}")
            except RuntimeError:
                log.failure("AUTH failed: {transcript}", transcript=f"AUTH PLAIN {SECRET}", password=SECRET)
        self.assertNotIn(SECRET, self.both(emit))

    def test_log_message_never_puts_a_secret_into_twisteds_own_text(self):
        events: list[dict] = []
        logs.log_message(Logger(namespace="mailrelay.x", observer=events.append), "received", "Q9",
                         identity="bob", password=SECRET)
        self.assertNotIn(SECRET, events[0]["log_format"])


class FilterTests(unittest.TestCase):
    def test_only_mailrelay_namespaces_are_written(self):
        capture = Capture("text")
        for namespace in ("mailrelay", "mailrelay.outbound.mx", "twisted.web.server", "mailrelayish", "stdout"):
            Logger(namespace=namespace, observer=capture.publisher).info("from {ns}", ns=namespace)
        self.assertEqual([line.split(": ", 1)[1] for line in capture.lines()],
                         ["from mailrelay", "from mailrelay.outbound.mx"])

    def test_debug_events_are_left_out(self):
        capture = Capture("json")
        capture.log.debug("protocol detail")
        capture.log.warn("worth knowing")
        self.assertEqual([r["level"] for r in capture.records()], ["warn"])

    def test_unknown_format_is_refused(self):
        self.assertRaises(ValueError, logs.make_observer, LogConfig("xml"), io.StringIO())


class ServiceTests(unittest.TestCase):
    def test_file_observer_is_added_on_start_and_removed_on_stop_of_the_global_publisher(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("an older line\n")
        service = logs.install(LogConfig("json", path))
        log = Logger(namespace="mailrelay.test")      # publishes to twisted.logger's global publisher
        log.info("before start", queue_id="Q0")
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        log.info("while running", queue_id="Q1", stage="queued", sender="a@example.org")
        service.stopService()
        log.info("after stop", queue_id="Q2")
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(lines[0], "an older line")
        self.assertEqual([json.loads(line)["queue_id"] for line in lines[1:]], ["Q1"])

    def test_lines_reach_the_file_while_it_is_open(self):
        path = self.mktemp()
        publisher = LogPublisher()
        service = logs.install(LogConfig("text", path), publisher=publisher)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        logs.log_message(Logger(namespace="mailrelay.test", observer=publisher), "queued", "Q1",
                         sender="a@example.org", size=5)
        with open(path) as f:      # line-buffered: visible before the service stops
            self.assertIn("Q1: from=<a@example.org>, size=5 (queue active)", f.read())
        service.stopService()
        self.assertIsNone(service.observer)

    def test_text_without_file_adds_nothing_because_twistd_already_logs(self):
        publisher = LogPublisher()
        stream = io.StringIO()
        service = logs.install(LogConfig("text", ""), publisher=publisher, stream=stream)
        service.startService()
        Logger(namespace="mailrelay.test", observer=publisher).info("hello")
        service.stopService()
        self.assertIsNone(service.observer)
        self.assertEqual(stream.getvalue(), "")

    def test_json_without_file_goes_to_standard_output(self):
        publisher = LogPublisher()
        stream = io.StringIO()
        service = logs.install(LogConfig("json", ""), publisher=publisher, stream=stream)
        service.startService()
        log = Logger(namespace="mailrelay.test", observer=publisher)
        log.info("hello", queue_id="Q1")
        service.stopService()
        log.info("gone", queue_id="Q2")
        self.assertEqual([json.loads(line)["queue_id"] for line in stream.getvalue().splitlines()], ["Q1"])
        self.assertFalse(stream.closed)

    def test_an_unwritable_file_fails_at_start(self):
        service = logs.install(LogConfig("text", self.mktemp() + "/missing/dir/relay.log"))
        self.assertRaises(OSError, service.startService)
        self.assertFalse(service.running)

