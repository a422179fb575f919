"""mailrelay.logrelay: the delivery process's events, one JSON line each up the pipe, published again in
the main process with their namespace, level, time, queue id and fields."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from twisted.logger import LogLevel, LogPublisher, formatEvent, formatEventAsClassicLogText
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailrelay import config
from mailrelay.logger import Logger, text_observer
from mailrelay.logrelay import PipeObserver, event_from_line, event_line, publish_lines
from mailrelay.logs import log_message, make_observer


class Lines(io.StringIO):
    def lines(self) -> list[str]:
        return self.getvalue().splitlines()


def child_lines(emit) -> str:
    """What the delivery process's PipeObserver writes for the events `emit(log)` logs."""
    out = io.StringIO()
    publisher = LogPublisher()
    publisher.addObserver(PipeObserver(out))
    emit(Logger(namespace="mailrelay.delivery.scheduler", observer=publisher))
    return out.getvalue()


class Wire(unittest.TestCase):
    def test_one_json_object_a_line_with_namespace_level_time_text_and_fields(self):
        text = child_lines(lambda log: log.warn("{queue_id}: deferred {rcpt!r}: {reply}", queue_id="Q1",
                                                 rcpt=("a@b",), reply="451 4.3.0 later\nsecond line"))
        [line] = text.splitlines()
        record = json.loads(line)
        self.assertEqual(record["log_namespace"], "mailrelay.delivery.scheduler")
        self.assertEqual(record["log_level"], "warn")
        self.assertIsInstance(record["log_time"], float)
        self.assertEqual(record["log_text"], "Q1: deferred ('a@b',): 451 4.3.0 later\nsecond line")
        self.assertEqual((record["queue_id"], record["rcpt"]), ("Q1", ["a@b"]))
        self.assertNotIn("log_format", record)
        self.assertNotIn("log_logger", record)

    def test_an_event_comes_back_with_its_queue_id_level_time_and_fields(self):
        events = []
        log_time = []

        def emit(log):
            log_message(log, "delivered", "1K19VKAPNF18XVGA", recipient="user@example.com", remote="mx.test",
                        delay=1.5, reply="250 2.0.0 Ok")
        publisher = LogPublisher()
        publisher.addObserver(events.append)
        publisher.addObserver(lambda e: log_time.append(e["log_time"]))
        text = child_lines(emit)
        publish_lines(publisher, text)
        [event] = events
        self.assertEqual((event["queue_id"], event["stage"], event["recipient"], event["delay"]),
                         ("1K19VKAPNF18XVGA", "delivered", "user@example.com", 1.5))
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["log_namespace"], "mailrelay.delivery.scheduler")
        self.assertEqual(event["log_time"], json.loads(text)["log_time"])      # the child's own instant
        self.assertEqual(formatEvent(event), "1K19VKAPNF18XVGA: to=<user@example.com>, relay=mx.test, "
                                             "delay=1.5, status=sent (250 2.0.0 Ok)")

    def test_twistd_s_log_has_the_line_the_child_would_have_written(self):
        def emit(log):
            log.info("{queue_id}: delivered {rcpt} via {hop} ({code}) {{literal}}", queue_id="Q2", rcpt="a@b",
                     hop="sink", code=250)
            log.warn("two\nlines")
        here = LogPublisher()
        here_out = Lines()
        here.addObserver(text_observer(here_out))
        original = []
        child = LogPublisher()
        child.addObserver(lambda e: original.append(dict(e)))
        child.addObserver(PipeObserver(out := io.StringIO()))
        emit(Logger(namespace="mailrelay.delivery.scheduler", observer=child))
        publish_lines(here, out.getvalue())
        self.assertEqual(here_out.getvalue(), "".join(formatEventAsClassicLogText(e) for e in original))

    def test_a_failure_is_one_event_with_its_traceback(self):
        def emit(log):
            try:
                {}["missing key"]
            except KeyError:
                log.failure("{queue_id}: delivery broke", queue_id="Q3")
        text = child_lines(emit)
        self.flushLoggedErrors(KeyError)
        self.assertEqual(len(text.splitlines()), 1)
        events = []
        publish_lines(events.append, text)
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.critical)
        self.assertEqual(event["queue_id"], "Q3")
        self.assertNotIn("log_failure", event)      # not a Failure of this process
        out = Lines()
        text_observer(out)(event)
        lines = out.lines()
        self.assertTrue(lines[0].endswith("[mailrelay.delivery.scheduler#critical] Q3: delivery broke"))
        self.assertEqual(lines[1], "\tTraceback (most recent call last):")
        self.assertIn("KeyError: 'missing key'", out.getvalue())
        [record] = [json.loads(line) for line in self.json_lines(event)]
        self.assertEqual(record["message"], "Q3: delivery broke")
        self.assertEqual(record["error"], "KeyError: 'missing key'")
        self.assertIn("Traceback (most recent call last):", record["traceback"])
        [text_line] = self.text_lines(event)
        self.assertTrue(text_line.endswith(": Q3: delivery broke [KeyError: 'missing key']"), text_line)

    def json_lines(self, event) -> list[str]:
        out = Lines()
        make_observer(config.LogConfig(format="json"), out)(event)
        return out.lines()

    def text_lines(self, event) -> list[str]:
        out = Lines()
        make_observer(config.LogConfig(format="text"), out)(event)
        return out.lines()

    def test_a_legacy_err_in_the_child_is_one_event_here_that_legacy_observers_can_write(self):
        from twisted.logger import LegacyLogObserverWrapper
        from twisted.python import log as legacy

        out = io.StringIO()
        publisher = LogPublisher()
        publisher.addObserver(PipeObserver(out))
        try:
            raise ValueError("legacy")
        except ValueError:      # what twisted.python.log.err publishes
            legacy.LogPublisher(publisher, publisher).msg(failure=Failure(), isError=1, why="it failed")
        [line] = out.getvalue().splitlines()
        self.assertNotIn('"failure"', line)
        event = event_from_line(line)
        self.assertIn("ValueError: legacy", event["log_text"])
        written = []         # e.g. twistd --syslog: a legacy observer in the main process
        LegacyLogObserverWrapper(lambda legacy_event: written.append(legacy.textFromEventDict(legacy_event)))(event)
        self.assertIn("ValueError: legacy", written[0])

    def test_secrets_never_go_up_the_pipe(self):
        def emit(log):
            log.info("login {user} with {password}", user="bob", password="hunter2-secret")
            log.warn("{queue_id}: peer said {reply}", queue_id="Q4", reply="535 hunter2-secret no",
                     transport={"name": "ses", "password": "hunter2-secret"})
            try:
                raise ValueError("token hunter2-secret refused")
            except ValueError:
                log.failure("auth failed", api_token="hunter2-secret")
        text = child_lines(emit)
        self.flushLoggedErrors(ValueError)
        self.assertNotIn("hunter2", text)
        self.assertEqual(len(text.splitlines()), 3)
        records = [json.loads(line) for line in text.splitlines()]
        self.assertEqual(records[0]["log_text"], "login bob with [redacted]")
        self.assertEqual(records[1]["transport"], {"name": "ses", "password": "[redacted]"})
        self.assertIn("token [redacted] refused", records[2]["log_failure"]["traceback"])

    def test_values_json_cannot_hold_are_their_repr(self):
        text = child_lines(lambda log: log.info("{queue_id}: {thing}", queue_id="Q5", thing=object,
                                                 raw=b"\xff", path=Path("/x")))
        [event] = [event_from_line(line) for line in text.splitlines()]
        self.assertEqual(event["thing"], repr(object))
        self.assertEqual(event["raw"], repr(b"\xff"))
        self.assertEqual(event["log_text"], f"Q5: {object}")

    def test_a_line_in_no_known_shape_is_kept_whole(self):
        for line in ("something odd", "[1, 2]", '{"no": "text"}'):
            event = event_from_line(line)
            self.assertEqual((event["log_namespace"], event["log_level"], formatEvent(event)),
                             ("mailrelay.delivery.worker", LogLevel.info, line))

    def test_a_field_that_cannot_be_written_leaves_the_text(self):
        class Unprintable:
            def __repr__(self):
                raise RuntimeError("no")

        text = event_line({"log_format": "{queue_id}: odd", "queue_id": "Q6", "odd": Unprintable(),
                           "log_namespace": "mailrelay.x", "log_level": LogLevel.warn, "log_time": 1.0})
        event = event_from_line(text.rstrip("\n"))
        self.assertEqual((formatEvent(event), event["log_level"], event["log_time"]), ("Q6: odd", LogLevel.warn, 1.0))
        self.assertNotIn("odd", event)

    def test_a_loop_is_written_down_to_a_bound(self):
        from mailrelay.redaction import MAX_DEPTH

        loop: list = []
        loop.append(loop)
        text = event_line({"log_format": "{queue_id}: looped", "queue_id": "Q7", "loop": loop,
                           "log_namespace": "mailrelay.x", "log_level": LogLevel.info, "log_time": 1.0})
        event = event_from_line(text.rstrip("\n"))
        self.assertEqual(formatEvent(event), "Q7: looped")
        self.assertEqual(json.dumps(event["loop"]), "[" * MAX_DEPTH + '"[redacted]"' + "]" * MAX_DEPTH)


class WithOtherObservers(unittest.TestCase):
    def test_json_and_twistd_s_text_both_get_the_child_s_events(self):
        # e.g. [log] format = "json" with no file: JSON on standard output beside twistd's text log.
        publisher, text_out, json_out = LogPublisher(), Lines(), Lines()
        publisher.addObserver(text_observer(text_out))
        publisher.addObserver(make_observer(config.LogConfig(format="json"), json_out))

        def emit(log):
            log_message(log, "delivered", "1K19VKAPNF18XVGA", recipient="sink@example.net", remote="127.0.0.1",
                        reply="250 2.0.0 Ok")
            log.warn("a warning {{with braces}}")
        publish_lines(publisher, child_lines(emit))
        records = [json.loads(line) for line in json_out.lines()]
        self.assertEqual([r.get("queue_id") for r in records], ["1K19VKAPNF18XVGA", None])
        self.assertEqual((records[0]["stage"], records[0]["recipient"], records[0]["remote"]),
                         ("delivered", "sink@example.net", "127.0.0.1"))
        self.assertEqual(records[0]["namespace"], "mailrelay.delivery.scheduler")
        self.assertEqual(records[1]["level"], "warn")
        self.assertNotIn("log_text", records[0])
        text = text_out.lines()
        self.assertEqual(len(text), 2)
        self.assertIn("[mailrelay.delivery.scheduler#info] 1K19VKAPNF18XVGA: to=<sink@example.net>", text[0])
        self.assertTrue(text[1].endswith("[mailrelay.delivery.scheduler#warn] a warning {with braces}"))


class RealPipe(unittest.TestCase):
    """A second Python writes events through PipeObserver on its standard output, as the delivery process
    does; this one publishes what it reads."""

    def test_events_and_a_traceback_of_another_process_arrive_whole(self):
        script = textwrap.dedent("""
            import sys
            from twisted.logger import globalLogBeginner
            from mailrelay.logger import Logger
            from mailrelay.logrelay import PipeObserver
            globalLogBeginner.beginLoggingTo([PipeObserver(sys.stdout)], redirectStandardIO=False)
            log = Logger(namespace="mailrelay.delivery.scheduler")
            log.info("{queue_id}: delivered to {rcpt}", queue_id="Q9", rcpt="a@b", stage="attempt")
            try:
                1 / 0
            except ZeroDivisionError:
                log.failure("{queue_id}: broke", queue_id="Q9", password="s3cr3t-value")
        """)
        root = str(Path(__file__).resolve().parents[1])
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"})
        self.assertEqual(done.returncode, 0, done.stderr)
        events = []
        publish_lines(events.append, done.stdout)
        self.assertEqual([(e["queue_id"], e["log_level"]) for e in events],
                         [("Q9", LogLevel.info), ("Q9", LogLevel.critical)])
        self.assertEqual(events[0]["rcpt"], "a@b")
        out = Lines()
        for event in events:
            text_observer(out)(event)
        self.assertIn("ZeroDivisionError: division by zero", out.getvalue())
        self.assertIn("[redacted]", json.dumps(events[1]["password"]))
        self.assertNotIn("s3cr3t", done.stdout)
