# -*- test-case-name: tests.test_twistd_log -*-
"""twistd's own log under `twistd -n mailrelay`: mailrelay's observer, installed through twistd's hook
(the application's ILogObserver), in twistd's line format, with the delivery process's events in it."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from tests.support.relay import RelayFixture
from tests.support.sink import Sink

MESSAGE = b"From: app@example.org\r\nTo: user@example.com\r\nSubject: logged\r\n\r\nbody\r\n"
# `<time> [<namespace>#<level>] <text>`, as twisted.logger.formatEventAsClassicLogText writes it; a line
# starting with a tab continues the one before it.
CLASSIC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]\s]+\] .*|\t.*")


def sink_config(port: int) -> str:
    return (f'[transports.sink]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n[delivery]\nprocess = "separate"\n')


class ApplicationObserver(unittest.TestCase):
    """What twistd does with the plugin, in this process: makeService, an Application, AppLogger.start."""

    def test_twistd_s_app_logger_starts_mailrelay_s_observer(self):
        from twisted.application import app, service
        from twisted.logger import Logger
        from twisted.scripts.twistd import ServerOptions

        relay = RelayFixture(self.mktemp())
        relay.settle_process()
        path = relay.dir / "relay.log"
        options = ServerOptions()
        options.parseOptions(["-n", f"--logfile={path}", "mailrelay", "--config", str(relay.path)])
        maker = options.loadedPlugins["mailrelay"]
        application = service.Application(maker.tapname)
        maker.makeService(options.subOptions).setServiceParent(application)      # built, not started
        logger = app.AppLogger(options)
        logger.start(application)          # beside trial's own observer: the global log has begun already
        try:
            Logger(namespace="mailrelay.test").info("login {user} with {password}", user="bob",
                                                    password="hunter2-secret")
        finally:
            logger.stop()
        text = path.read_text()
        lines = text.splitlines()
        for line in lines:
            self.assertRegex(line, CLASSIC)
        self.assertTrue(any("[twisted.application.app.AppLogger#info] twistd " in line for line in lines), text)
        # Twisted's own observer would have written the password: the file is mailrelay's observer's.
        self.assertTrue(any(line.endswith("[mailrelay.test#info] login bob with [redacted]") for line in lines),
                        text)
        self.assertNotIn("hunter2", text)


class RealTwistd(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        self.relay = RelayFixture(self.mktemp(), extra=sink_config(self.sink_port))

    @defer.inlineCallbacks
    def delivered_line(self, read_log) -> defer.Deferred:
        """Submit one message; the lines of the log once the delivery process's 'delivered' line is in."""
        code, text = yield threads.deferToThread(self.relay.submit_sync, "relay", "app@example.org",
                                                 ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        queue_id = text.decode().rsplit(" ", 1)[1]
        yield self.sink.wait_for(1)
        for _ in range(100):
            lines = read_log().splitlines()
            if any(f"{queue_id}: delivered" in line for line in lines):
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        return queue_id, lines

    def check(self, queue_id: str, lines: list[str]) -> None:
        for line in lines:
            self.assertRegex(line, CLASSIC)
        self.assertTrue(any(re.search(r"\[twisted\.[\w.]*AppLogger#info\] twistd ", line) for line in lines))
        [delivered] = [line for line in lines if f"{queue_id}: delivered" in line]
        self.assertRegex(delivered, r"\[mailrelay\.delivery\.scheduler[\w.]*#info\] " + queue_id
                         + ": delivered user@example.com via sink")
        queued = [line for line in lines if f"{queue_id}: " in line and "(queue active)" in line]
        self.assertEqual(len(queued), 1)              # written by the delivery process, published here
        self.assertIn("[mailrelay.queue#info] ", queued[0])
        self.assertIn("from=<app@example.org>", queued[0])
        self.assertTrue(any("delivery process started" in line for line in lines))      # the main's own

    @defer.inlineCallbacks
    def test_the_default_command_writes_twistd_s_log_file_with_the_child_s_events(self):
        """`twistd -n --logfile=relay.log mailrelay --config tap.conf`: no flag for the observer."""
        yield threads.deferToThread(self.relay.spawn, "relay.log")
        self.addCleanup(self.relay.kill, signal.SIGTERM)
        queue_id, lines = yield self.delivered_line(lambda: (self.relay.dir / "relay.log").read_text())
        self.check(queue_id, lines)
        self.assertNotIn(queue_id, (self.relay.dir / "twistd.log").read_text())       # not on stdout

    @defer.inlineCallbacks
    def test_the_logger_option_names_mailrelay_s_factory(self):
        """`twistd -n --logger mailrelay.logger.observer mailrelay ...`: the same lines, on stdout."""
        process = yield threads.deferToThread(self.spawn_with_logger)
        self.addCleanup(self.stop, process)
        out = self.relay.dir / "stdout.log"
        queue_id, lines = yield self.delivered_line(out.read_text)
        self.check(queue_id, lines)

    def spawn_with_logger(self) -> subprocess.Popen:
        self.relay.settle_process()
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        with open(self.relay.dir / "stdout.log", "ab") as out:
            process = subprocess.Popen(
                [str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile=",
                 "--logger=mailrelay.logger.observer", "mailrelay", "--config", str(self.relay.path)],
                cwd=self.relay.dir, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError((self.relay.dir / "stdout.log").read_text()[-2000:])
            try:
                socket.create_connection(("127.0.0.1", self.relay.ports["relay"]), timeout=1).close()
                return process
            except OSError:
                time.sleep(0.1)
        self.stop(process)
        raise RuntimeError("twistd did not start listening within 30 s")

    @staticmethod
    def stop(process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
