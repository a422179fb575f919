"""The scheduler tells its IDeliveryEvents of every per-recipient outcome, and acts on an outcome only
once its event is durable (over task.Clock, with small in-memory doubles)."""
from __future__ import annotations

import random

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.config import DeliveryConfig, QueueConfig
from mailrelay.queue.results import RecipientResult
from mailrelay.queue.scheduler import STOP_TIMEOUT, Scheduler
from mailrelay.envelope import Envelope
from mailrelay.interfaces import IDeliveryEvents, INextHop, IRouter
from tests.support.scheduling import MemorySpool as Spool

NOW = 1_767_225_600.0


@implementer(INextHop)
class Hop:
    def __init__(self, replies):
        self.replies = replies         # recipient -> (code, status, text)

    def deliver(self, message, recipients):
        return defer.succeed([RecipientResult(r, *self.replies.get(r, (250, "2.0.0", "ok")), "mx1.example.net")
                              for r in recipients])


@implementer(IRouter)
class Direct:
    def route(self, sender, recipient, attempts):
        return None


@implementer(IDeliveryEvents)
class Recorder:
    """Records each event; `hold`: each emit's Deferred waits until the test fires it (not yet durable)."""

    def __init__(self, hold=False):
        self.events, self.waiting, self.hold = [], [], hold

    def emit(self, kind, queue_id, sender, recipient, reply, attempt, next_hop, transport):
        self.events.append(dict(kind=kind, queue_id=queue_id, sender=sender, recipient=recipient, code=reply.code,
                                status=reply.status, text=reply.text, attempt=attempt, next_hop=next_hop,
                                transport=transport))
        if not self.hold:
            return defer.succeed(True)
        d = defer.Deferred()
        self.waiting.append(d)
        return d


class Outcomes(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.spool = Spool()

    def scheduler(self, events, replies, lifetime=86400.0):
        scheduler = Scheduler(self.spool, Direct(), {}, Hop(replies),
                              QueueConfig(first_retry=300.0, max_retry=600.0, lifetime=lifetime, delay_warning=0.0,
                                          bounces=False),
                              DeliveryConfig(), None, clock=self.clock, rng=random.Random(1), events=events)
        scheduler.startService()

        def stop():
            d = scheduler.stopService()
            self.clock.advance(STOP_TIMEOUT)
            return d
        self.addCleanup(stop)
        return scheduler

    def test_the_recorder_provides_the_interface(self):
        self.assertTrue(verifyObject(IDeliveryEvents, Recorder()))

    def test_delivered_bounced_and_deferred_with_attempt_and_next_hop(self):
        events = Recorder()
        self.spool.envelopes["Q1"] = Envelope("a@example.org", ("ok@example.net", "no@example.net",
                                                                  "later@example.net"), NOW)
        self.scheduler(events, {"no@example.net": (550, "5.1.1", "no such user"),
                                "later@example.net": (451, "4.2.0", "busy")})
        self.clock.advance(0)
        kinds = {e["recipient"]: (e["kind"], e["code"], e["attempt"]) for e in events.events}
        self.assertEqual(kinds, {"ok@example.net": ("delivered", 250, 1), "no@example.net": ("bounced", 550, 1),
                                 "later@example.net": ("deferred", 451, 1)})
        self.assertEqual({(e["next_hop"], e["transport"], e["sender"]) for e in events.events},
                         {("mx1.example.net", "direct", "a@example.org")})
        self.clock.advance(300)
        self.assertEqual(events.events[-1]["recipient"], "later@example.net")
        self.assertEqual(events.events[-1]["attempt"], 2)

    def test_the_message_is_removed_only_once_its_events_are_durable(self):
        events = Recorder(hold=True)
        self.spool.envelopes["Q1"] = Envelope("a@example.org", ("ok@example.net",), NOW)
        self.scheduler(events, {})
        self.clock.advance(0)
        self.assertEqual((len(events.events), self.spool.removed), (1, []))
        events.waiting.pop().callback(True)
        self.assertEqual(self.spool.removed, ["Q1"])

    def test_a_deferral_is_acted_on_only_once_its_event_is_durable(self):
        events = Recorder(hold=True)
        self.spool.envelopes["Q1"] = Envelope("a@example.org", ("later@example.net",), NOW)
        scheduler = self.scheduler(events, {"later@example.net": (451, "4.2.0", "busy")})
        self.clock.advance(0)
        self.assertIn("Q1", scheduler._work.attempts)          # the attempt is not settled yet
        events.waiting.pop().callback(True)
        self.assertNotIn("Q1", scheduler._work.attempts)

    def test_expiry_is_an_expired_event_with_4_4_7(self):
        events = Recorder()
        self.spool.envelopes["Q1"] = Envelope("a@example.org", ("later@example.net",), NOW)
        self.scheduler(events, {"later@example.net": (451, "4.2.0", "busy")}, lifetime=500.0)
        self.clock.advance(0)
        self.clock.advance(300)
        self.clock.advance(200)
        expired = [e for e in events.events if e["kind"] == "expired"]
        self.assertEqual(len(expired), 1)
        self.assertEqual((expired[0]["status"], expired[0]["attempt"]), ("4.4.7", 2))
        self.assertIn("451 4.2.0 busy", expired[0]["text"])
        self.assertEqual(self.spool.removed, ["Q1"])

    def test_an_emit_that_raises_never_costs_the_outcome(self):
        @implementer(IDeliveryEvents)
        class Broken:
            def emit(self, *args):
                raise RuntimeError("outbox gone")
        self.spool.envelopes["Q1"] = Envelope("a@example.org", ("ok@example.net",), NOW)
        self.scheduler(Broken(), {})
        self.clock.advance(0)
        self.assertEqual(self.spool.removed, ["Q1"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
