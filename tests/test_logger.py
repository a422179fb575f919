"""mailrelay.logger: the cheaper Logger and classic_text change nothing in what is logged."""
from __future__ import annotations

import time

from twisted.logger import LogLevel, LogPublisher, formatEventAsClassicLogText
from twisted.logger import Logger as TwistedLogger
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailrelay.logger import Logger, classic_text


def _events(logger_class, emit):
    publisher, seen = LogPublisher(), []
    publisher.addObserver(seen.append)
    emit(logger_class(namespace="mailrelay.test", observer=publisher))
    return seen


class LoggerTests(unittest.TestCase):

    def test_events_are_those_twisted_s_logger_makes(self):
        def emit(log):
            log.info("{queue_id}: {stage}", queue_id="Q1", stage="delivered")
            log.warn("plain text")
            log.debug("{n} things", n=3)

        ours, theirs = _events(Logger, emit), _events(TwistedLogger, emit)
        self.assertEqual(len(ours), 3)
        for mine, twisted_event in zip(ours, theirs):
            self.assertEqual(set(mine), set(twisted_event))
            for key in mine:
                if key not in ("log_logger", "log_time"):
                    self.assertEqual(mine[key], twisted_event[key], key)
            self.assertIsInstance(mine["log_logger"], Logger)
            self.assertLess(abs(mine["log_time"] - time.time()), 5)

    def test_an_invalid_level_is_reported_as_twisted_does(self):
        seen = _events(Logger, lambda log: log.emit("loud", "hello"))
        self.assertEqual(len(seen), 1)
        self.assertIn("invalid log level", seen[0]["log_format"])
        self.assertEqual(seen[0]["log_level"], LogLevel.critical)

    def test_trace_is_kept(self):
        ours, theirs = [], []
        _events(Logger, lambda log: log.info("traced", log_trace=ours))
        _events(TwistedLogger, lambda log: log.info("traced", log_trace=theirs))
        self.assertEqual(len(ours), len(theirs))
        self.assertIsInstance(ours[0][0], Logger)


class ClassicTextTests(unittest.TestCase):

    def event(self, **fields):
        event = dict(log_time=1795834572.25, log_level=LogLevel.info, log_namespace="mailrelay.delivery")
        event.update(fields)
        return event

    def assertSameAsTwisted(self, event):
        self.assertEqual(classic_text(dict(event)), formatEventAsClassicLogText(dict(event)))

    def test_ordinary_events_give_twisted_s_line(self):
        for event in (
            self.event(log_format="{queue_id}: {stage} {rcpt!r} via {hop:>6} ({code})", queue_id="Q",
                       stage="sent", rcpt="a@b", hop="sink", code=250),
            self.event(log_format="literal {{braces}} and text"),
            self.event(log_format="two\nlines {x}", x="here"),
            self.event(log_format="{d[key]} {o.real}", d={"key": "v"}, o=3),
            self.event(log_format="warned", log_level=LogLevel.warn),
            self.event(log_format="no namespace", log_namespace="-"),
        ):
            self.assertSameAsTwisted(event)

    def test_the_time_stamp_follows_the_second(self):
        first = classic_text(self.event(log_format="a", log_time=1795834572.1))
        same = classic_text(self.event(log_format="a", log_time=1795834572.9))
        later = classic_text(self.event(log_format="a", log_time=1795834573.0))
        self.assertEqual(first, same)
        self.assertNotEqual(first, later)
        self.assertEqual(later, formatEventAsClassicLogText(self.event(log_format="a", log_time=1795834573.0)))

    def test_what_it_cannot_render_identically_goes_to_twisted(self):
        try:
            _ = 1 / 0
        except ZeroDivisionError:
            failure = Failure()
        for event in (
            self.event(log_format="{missing}"),
            self.event(log_format="{obj.method()}", obj="x"),
            self.event(log_format="failed", log_failure=failure),
            self.event(log_format="system", log_system="custom"),
            self.event(log_format="no time", log_time=None),
            self.event(log_format=""),
            self.event(),
        ):
            self.assertSameAsTwisted(event)


class TwistdObserverTests(unittest.TestCase):
    """twistd's own log observer, sped up: the file it writes must not change by a byte."""

    def emit_all(self, publisher):
        log = Logger(namespace="mailrelay.test", observer=publisher)
        log.info("{queue_id}: client={client}, from=<{sender}> (queue active)", queue_id="Q1",
                 client="127.0.0.1", sender="a@example.org")
        log.warn("literal {{braces}}")
        log.info("{missing}")
        try:
            _ = 1 / 0
        except ZeroDivisionError:
            log.failure("it broke: {why}", why="division")

    def run_publisher(self, speed_up: bool, time_format=None):
        import io

        from twisted.logger import textFileLogObserver

        from mailrelay.logger import restore_observers, speed_up_text_observers

        publisher, out = LogPublisher(), io.StringIO()
        observer = textFileLogObserver(out) if time_format is None else textFileLogObserver(out, time_format)
        publisher.addObserver(observer)
        changed = speed_up_text_observers(publisher) if speed_up else []
        self.patch(time, "time", lambda: 1795834572.5)       # both runs log at the same instant
        self.emit_all(publisher)
        restore_observers(changed)
        return out.getvalue(), changed, observer

    def test_the_lines_are_byte_for_byte_twisted_s(self):
        fast, changed, _ = self.run_publisher(True)
        slow, _, _ = self.run_publisher(False)
        self.assertEqual(len(changed), 1)
        self.assertEqual(fast, slow)
        self.assertIn("Q1: client=127.0.0.1, from=<a@example.org> (queue active)", fast)
        self.assertIn("ZeroDivisionError", fast)
        self.flushLoggedErrors(ZeroDivisionError)

    def test_an_observer_with_its_own_time_format_is_left_alone(self):
        _, changed, observer = self.run_publisher(True, time_format="%H:%M")
        self.assertEqual(changed, [])
        self.assertIsNot(observer.formatEvent, classic_text)
        self.flushLoggedErrors(ZeroDivisionError)

    def test_the_log_service_speeds_up_while_running_and_restores_on_stop(self):
        import io

        from twisted.logger import textFileLogObserver

        from mailrelay.config import LogConfig
        from mailrelay.logs import LogService

        publisher = LogPublisher()
        observer = textFileLogObserver(io.StringIO())
        original = observer.formatEvent
        publisher.addObserver(observer)
        service = LogService(LogConfig(), publisher)
        service.startService()
        self.assertIs(observer.formatEvent, classic_text)
        service.stopService()
        self.assertIs(observer.formatEvent, original)
