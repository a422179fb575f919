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
    """twistd's own log observer, written by classic_text: the file it writes must not change by a byte."""

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

    def write(self, observer_for) -> str:
        import io

        publisher, out = LogPublisher(), io.StringIO()
        publisher.addObserver(observer_for(out))
        self.patch(time, "time", lambda: 1795834572.5)       # both runs log at the same instant
        self.emit_all(publisher)
        self.flushLoggedErrors(ZeroDivisionError)
        return out.getvalue()

    def test_the_lines_are_byte_for_byte_twisted_s(self):
        from twisted.logger import textFileLogObserver

        from mailrelay.logger import text_observer

        fast, slow = self.write(text_observer), self.write(textFileLogObserver)
        self.assertEqual(fast, slow)
        self.assertIn("Q1: client=127.0.0.1, from=<a@example.org> (queue active)", fast)
        self.assertIn("ZeroDivisionError", fast)

    def test_a_credential_never_reaches_twistd_s_log(self):
        from mailrelay.logger import text_observer

        def emit_all(publisher):
            log = Logger(namespace="mailrelay.test", observer=publisher)
            log.info("login {user} with {password}", user="bob", password="hunter2-secret")
            log.warn("peer said {reply}", reply="535 hunter2-secret rejected", auth_token="hunter2-secret")
        self.emit_all = emit_all
        out = self.write(text_observer)
        self.assertNotIn("hunter2", out)
        self.assertIn("login bob with [redacted]", out)
        self.assertIn("peer said 535 [redacted] rejected", out)


class TwistdHookTests(unittest.TestCase):
    """The observer is installed the way twistd lets one: as the application's ILogObserver."""

    def options(self, *argv):
        from twisted.scripts.twistd import ServerOptions

        options = ServerOptions()
        options.parseOptions([*argv, "mailrelay", "--config", "tap.conf"])
        return options

    def test_standard_output_for_nodaemon_without_a_file_or_with_a_dash(self):
        import io
        import sys

        from mailrelay.logger import twistd_observer

        for argv in (["-n"], ["-n", "--logfile=-"]):
            out = io.StringIO()
            self.patch(sys, "stdout", out)
            observer = twistd_observer(self.options(*argv))
            Logger(namespace="mailrelay.test", observer=observer).info("{queue_id}: hi", queue_id="Q8")
            self.assertRegex(out.getvalue(), r"^\S+ \[mailrelay.test#info\] Q8: hi\n$")

    def test_a_log_file_rotated_on_sigusr1(self):
        import signal

        from mailrelay.logger import twistd_observer

        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        path = self.mktemp()
        observer = twistd_observer(self.options("-n", f"--logfile={path}"))
        Logger(namespace="mailrelay.test", observer=observer).info("{queue_id}: hello", queue_id="Q7")
        with open(path) as f:
            self.assertRegex(f.read(), r"^\S+ \[mailrelay.test#info\] Q7: hello\n$")
        self.assertTrue(callable(signal.getsignal(signal.SIGUSR1)))

    def test_syslog_logger_and_a_daemon_on_stdout_are_left_to_twistd(self):
        from mailrelay.logger import twistd_observer

        self.assertIsNone(twistd_observer(None))
        self.assertIsNone(twistd_observer(self.options("-n", "--logger=mailrelay.logger.observer")))
        self.assertIsNone(twistd_observer(self.options("--logfile=-")))
        self.assertIsNone(twistd_observer({"syslog": True, "nodaemon": True}))

    def test_the_application_twistd_makes_gets_the_observer(self):
        import io

        from twisted.application import service
        from twisted.logger import ILogObserver

        from mailrelay.logger import TwistdLog, text_observer

        relay, observer = service.MultiService(), text_observer(io.StringIO())
        relay.setName("mailrelay")
        application = service.Application("mailrelay")
        TwistdLog(relay, observer).setServiceParent(application)      # what twistd does with makeService's
        self.assertIs(application.getComponent(ILogObserver), observer)
        self.assertIs(relay.parent.parent, service.IServiceCollection(application))

    def test_an_application_that_has_an_observer_keeps_it(self):
        import io

        from twisted.application import service
        from twisted.logger import ILogObserver

        from mailrelay.logger import TwistdLog, text_observer

        application, theirs = service.Application("mailrelay"), text_observer(io.StringIO())
        application.setComponent(ILogObserver, theirs)
        TwistdLog(service.MultiService(), text_observer(io.StringIO())).setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), theirs)

    def test_the_logger_option_factory_writes_twistd_s_lines_on_standard_output(self):
        import io
        import sys

        from twisted.logger import ILogObserver

        from mailrelay.logger import observer

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        made = observer()
        self.assertTrue(ILogObserver.providedBy(made))
        made({"log_format": "{x}", "x": "hello", "log_namespace": "mailrelay.test", "log_level": LogLevel.info,
              "log_time": 0.0})
        self.assertEqual(out.getvalue(), formatEventAsClassicLogText(
            {"log_format": "{x}", "x": "hello", "log_namespace": "mailrelay.test", "log_level": LogLevel.info,
             "log_time": 0.0}))
