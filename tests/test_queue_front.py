"""wiring.QueueFront: what the listeners hand messages to — the spool, with the scheduler told of each
commit only after the session has had its answer."""
from __future__ import annotations

import time
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailrelay.envelope import Envelope
from mailrelay.wiring import QueueFront
from mailrelay.spool.store import Spool


class _Scheduler:
    logs_queued = False

    def __init__(self, order: list, fail: bool = False):
        self.order, self.fail = order, fail

    def enqueue(self, queue_id: str) -> None:
        self.order.append(("enqueue", queue_id))
        if self.fail:
            raise RuntimeError("scheduler broke")


class QueueFrontTests(unittest.TestCase):

    def setUp(self):
        self.spool = Spool(Path(self.mktemp()))
        self.spool.startService()
        self.addCleanup(self.spool.stopService)
        self.order: list = []

    def submit(self, scheduler) -> defer.Deferred:
        front = QueueFront(self.spool, scheduler)
        writer = front.new_message(Envelope("a@example.org", ("b@example.net",), time.time()))
        writer.write(b"Subject: t\r\n\r\nbody\r\n")
        d = writer.commit().addCallback(lambda queue_id: self.order.append(("answered", queue_id)) or queue_id)
        # Resume the test a turn later: inlineCallbacks would otherwise run it inside the callback.
        return d.addCallback(lambda queue_id: task.deferLater(reactor, 0, lambda: queue_id))

    @defer.inlineCallbacks
    def test_the_session_answers_before_the_scheduler_is_told(self):
        queue_id = yield self.submit(_Scheduler(self.order))
        self.assertEqual(self.order, [("answered", queue_id), ("enqueue", queue_id)])
        self.assertTrue(self.spool.exists(queue_id))

    @defer.inlineCallbacks
    def test_a_failing_scheduler_does_not_turn_a_durable_message_into_a_refusal(self):
        queue_id = yield self.submit(_Scheduler(self.order, fail=True))
        self.assertEqual(self.order[0], ("answered", queue_id))
        self.assertTrue(self.spool.exists(queue_id))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_a_failed_commit_reaches_the_session_and_schedules_nothing(self):
        front = QueueFront(self.spool, _Scheduler(self.order))
        writer = front.new_message(Envelope("a@example.org", ("b@example.net",), time.time()))
        writer.write(b"x" * 10)
        self.spool.paths.queue.rename(self.spool.paths.root / "queue-gone")    # the rename must fail
        with self.assertRaises(OSError):
            yield writer.commit()
        self.assertEqual(self.order, [])
        self.flushLoggedErrors(OSError)
