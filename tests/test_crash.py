"""Crash safety with a real twistd process: whatever got a 250 is delivered after kill -9 and a restart."""
from __future__ import annotations

import signal
import smtplib
import threading

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from tests.support.polling import eventually
from tests.support.relay import SEPARATE, RelayFixture, free_port
from tests.support.sink import Sink


def message(n: int) -> bytes:
    return (f"From: app@example.org\r\nTo: user@example.com\r\nMessage-ID: <crash-{n}@example.org>\r\n"
            f"Subject: crash test {n}\r\n\r\nbody {n}\r\n").encode()


class KillNine(unittest.TestCase):
    timeout = 300

    def setUp(self):
        self.sink_port = free_port()      # nothing listens here until the sink starts: the next hop is down
        self.relay = RelayFixture(self.mktemp(), extra=(
            f'[transports.sink]\nhost = "127.0.0.1"\nport = {self.sink_port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n'
            '[queue]\nfirst_retry = "1s"\nmax_retry = "2s"\n'
        ), process=SEPARATE)
        self.addCleanup(self.relay.kill)

    def start_sink(self) -> Sink:
        sink = Sink()
        sink.start(reactor, port=self.sink_port)
        self.addCleanup(sink.stop)
        return sink

    @defer.inlineCallbacks
    def test_message_accepted_before_kill_is_delivered_after_restart(self):
        yield threads.deferToThread(self.relay.spawn)
        code, _ = yield self.relay.submit("relay", "app@example.org", ["user@example.com"], message(1))
        self.assertEqual(code, 250)
        self.relay.kill(signal.SIGKILL)
        sink = self.start_sink()
        yield threads.deferToThread(self.relay.spawn)
        delivered = yield sink.wait_for(1)
        self.assertIn(b"<crash-1@example.org>", delivered[0].data)

    @defer.inlineCallbacks
    def test_hundreds_of_messages_survive_a_kill_in_the_middle(self):
        yield threads.deferToThread(self.relay.spawn)
        accepted: set[int] = set()
        lock = threading.Lock()
        killed = threading.Event()

        def send(worker: int):
            for n in range(worker, 400, 4):
                if killed.is_set():
                    return
                try:
                    code, _ = self.relay.submit_sync("relay", "app@example.org", ["user@example.com"], message(n))
                except (smtplib.SMTPException, OSError):
                    return          # the relay died under us: this one was never acknowledged
                if code == 250:
                    with lock:
                        accepted.add(n)
                        if len(accepted) >= 250 and not killed.is_set():
                            killed.set()
                            self.relay.kill(signal.SIGKILL)

        yield defer.gatherResults([threads.deferToThread(send, w) for w in range(4)])
        self.assertTrue(killed.is_set(), "the relay was never killed")
        self.assertGreaterEqual(len(accepted), 250)
        sink = self.start_sink()
        yield threads.deferToThread(self.relay.spawn)

        # Messages committed but not yet acknowledged when the relay died are delivered too (they were
        # durable), so the sink may see more than `accepted`: wait for every acknowledged one by its id.
        def seen() -> set[int]:
            return {n for m in sink.messages for n in [_crash_number(m.data)] if n is not None}
        yield eventually(lambda: accepted <= seen(), timeout=60, interval=0.1)
        self.assertEqual(accepted - seen(), set())


def _crash_number(data: bytes):
    start = data.find(b"<crash-")
    return int(data[start + 7:data.index(b"@", start)]) if start >= 0 else None
