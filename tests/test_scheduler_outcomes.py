# -*- test-case-name: tests.test_scheduler_outcomes -*-
"""The delivery scheduler's collaborators that act on what happened, each on its own over task.Clock:
the outcomes (results recorded, attempts settled), the DSN reports and the queue CLI's control; then the
wiring — a Scheduler hands its parts the IThrottle and the logger it was given.
"""
from __future__ import annotations

import random
from typing import Optional

from twisted.internet import defer
from zope.interface.verify import verifyObject

from mailrelay.config import DeliveryConfig, QueueConfig
from mailrelay.queue.attempts import _Job
from mailrelay.queue.backoff import Backoff
from mailrelay.queue.control import Control
from mailrelay.queue.outcomes import Outcomes
from mailrelay.queue.queuestate import QueueState
from mailrelay.queue.recovery import SpoolReader, StartupScan
from mailrelay.queue.reports import Reports
from mailrelay.queue.results import RecipientResult
from mailrelay.queue.scheduler import Scheduler
from mailrelay.queue.shaping import Shaper
from mailrelay.queue.state import MessageState, RecipientState
from mailrelay.queue.throttle import LocalThrottle, ThrottleRules
from mailrelay.queue.timetable import Timetable
from mailrelay.interfaces import IRecipientResult
from tests.support.parts import SLOW, PartsTestCase, RecordingThrottle, attempt_of, job, message
from tests.support.scheduling import NOW, ManualHop, MemorySpool


class FakeReporter:
    def __init__(self):
        self.bounces: list[tuple[str, list[str]]] = []
        self.delays: list[str] = []
        self.successes: list[tuple[str, str]] = []

    def bounce(self, message, results):
        self.bounces.append((message.queue_id, [r.recipient for r in results]))

    def delay(self, message, recipients):
        self.delays.append(message.queue_id)

    def success(self, message, results, action):
        self.successes.append((message.queue_id, action))


class OutcomesTests(PartsTestCase):
    def setUp(self):
        super().setUp()
        self.spool, self.work, self.reporter = MemorySpool(), QueueState(), FakeReporter()
        self.scheduled: list[tuple[str, float, bool]] = []
        self.over = 0
        queue = QueueConfig(first_retry=300.0, max_retry=1200.0, lifetime=3600.0, delay_warning=0.0)
        shaper = Shaper(ThrottleRules(), LocalThrottle(), self.work, self.clock, lambda: None, self.log)
        self.outcomes = Outcomes(self.spool, self.work, shaper, Reports(self.reporter, queue, self.log), self.clock,
                                 queue, Backoff(300.0, 1200.0, jitter=0.0, rng=random.Random(1)),
                                 lambda *args: self.scheduled.append(args), self.count_over, self.log)

    def count_over(self) -> None:
        self.over += 1

    def sent(self, queue_id: str, *recipients: str) -> _Job:
        self.spool.add(queue_id, recipients)
        attempt = self.work.begin(*self.load(queue_id))
        one = job(attempt)
        attempt.outstanding += 1
        return one

    def load(self, queue_id: str):
        loaded = self.spool.load(queue_id)
        return loaded, MessageState.from_dict(loaded.state, loaded.envelope.recipients)

    def test_results_declare_what_the_scheduler_reads(self):
        self.assertTrue(verifyObject(IRecipientResult, RecipientResult("a@b.test", 250, "2.0.0", "ok")))

    def test_a_deferral_is_saved_and_scheduled_after_the_backoff(self):
        one = self.sent("Q1", "b@example.net")
        self.successResultOf(self.outcomes.record([RecipientResult("b@example.net", 451, "4.3.0", "busy")], one))
        self.assertEqual(self.spool.recipient_state("Q1", "b@example.net").next_attempt, NOW + 300.0)
        self.assertEqual(self.scheduled, [("Q1", NOW + 300.0, False)])
        self.assertEqual((self.work.attempts, self.over), ({}, 1))
        self.assertEqual(self.stages(), ["deferred"])

    def test_the_last_delivery_of_a_finished_message_removes_it_without_a_save(self):
        one = self.sent("Q1", "b@example.net")
        self.successResultOf(self.outcomes.record([RecipientResult("b@example.net", 250, "2.0.0", "ok")], one))
        self.assertEqual((self.spool.saves, self.spool.removed), ([], ["Q1"]))
        self.assertEqual(self.stages(), ["delivered", "removed"])
        self.assertEqual(self.over, 1)

    def test_a_refusal_is_saved_before_its_dsn_and_the_removal(self):
        one = self.sent("Q1", "b@example.net")
        order: list[str] = []
        self.patch(self.reporter, "bounce", lambda message, results: order.append(f"dsn after {len(self.spool.saves)}"))
        self.successResultOf(self.outcomes.record([RecipientResult("b@example.net", 550, "5.1.1", "unknown")], one))
        self.assertEqual(order, ["dsn after 1"])
        self.assertEqual(self.spool.removed, ["Q1"])
        self.assertEqual(self.spool.saves[-1][1]["recipients"]["b@example.net"]["reported"], True)

    def test_a_recipient_the_hop_did_not_answer_is_retried(self):
        one = self.sent("Q1", "b@example.net")
        self.successResultOf(self.outcomes.record([], one))
        self.assertEqual(self.spool.recipient_state("Q1", "b@example.net").last_reply.status, "4.4.0")

    def test_a_message_past_its_lifetime_expires_and_bounces(self):
        self.spool.add("Q1", ["b@example.net"], received_at=NOW - 3600)
        attempt = self.work.begin(*self.load("Q1"))
        self.successResultOf(self.outcomes.finish(attempt))
        self.assertEqual(self.reporter.bounces, [("Q1", ["b@example.net"])])
        self.assertEqual(self.spool.removed, ["Q1"])

    def test_a_failed_save_leaves_the_message_to_its_saved_state(self):
        one = self.sent("Q1", "b@example.net")
        self.patch(self.spool, "save_state", lambda queue_id, state: defer.fail(OSError("disk full")))
        self.outcomes.record([RecipientResult("b@example.net", 451, "4.3.0", "busy")], one)
        self.assertEqual(self.scheduled, [("Q1", NOW + 300.0, False)])      # retried as saved, not lost
        self.assertEqual(self.spool.removed, [])
        self.flushLoggedErrors(OSError, RuntimeError)


class ReportsTests(PartsTestCase):
    def setUp(self):
        super().setUp()
        self.reporter = FakeReporter()
        self.reports = Reports(self.reporter, QueueConfig(delay_warning=600.0), self.log)
        self.work = QueueState()

    def test_never_a_dsn_to_the_null_sender_or_with_bounces_off(self):
        self.assertEqual(self.reports.no_dsn_reason(message("Q1", sender="")), "null reverse-path")
        self.assertIsNone(self.reports.no_dsn_reason(message("Q1")))
        off = Reports(self.reporter, QueueConfig(bounces=False), self.log)
        self.assertEqual(off.no_dsn_reason(message("Q1")), "bounces are disabled")
        self.assertEqual(Reports(None, QueueConfig(), self.log).no_dsn_reason(message("Q1")), "bounces are disabled")

    def test_the_delay_warning_is_due_once_after_delay_warning(self):
        attempt = attempt_of(self.work, "Q1")
        self.assertFalse(self.reports.delay_warning_due(attempt, NOW + 599))
        self.assertTrue(self.reports.delay_warning_due(attempt, NOW + 600))
        self.successResultOf(self.reports.report_delay(attempt))
        self.assertEqual(self.reporter.delays, ["Q1"])
        self.reports.reconfigure(QueueConfig(delay_warning=0.0))
        self.assertFalse(self.reports.delay_warning_due(attempt, NOW + 600))

    def test_settled_reports_mark_the_recipients_reported_and_a_failed_one_stays(self):
        attempt = attempt_of(self.work, "Q1", "b@example.net")
        attempt.state = attempt.state.with_recipient(RecipientState("b@example.net", attempts=1, done="bounced"))
        self.assertTrue(self.successResultOf(self.reports.report_settled(attempt)))
        self.assertTrue(attempt.state.get("b@example.net").reported)
        self.assertEqual(self.reporter.bounces, [("Q1", ["b@example.net"])])
        again = attempt_of(self.work, "Q2", "b@example.net")
        again.state = again.state.with_recipient(RecipientState("b@example.net", attempts=1, done="bounced"))
        self.patch(self.reporter, "bounce", lambda message, results: defer.fail(RuntimeError("down")))
        self.assertFalse(self.successResultOf(self.reports.report_settled(again)))
        self.assertFalse(again.state.get("b@example.net").reported)
        self.flushLoggedErrors(RuntimeError)


class ControlTests(PartsTestCase):
    def setUp(self):
        super().setUp()
        self.spool, self.work = MemorySpool(), QueueState()
        self.timetable = Timetable(self.clock, lambda queue_id, forced: None, lambda: True)
        self.timetable.start()
        self.addCleanup(self.timetable.stop)
        reader = SpoolReader(self.spool, self.work, self.log)
        self.scan = StartupScan(self.clock, self.spool, reader, self.work, self.timetable,
                                lambda queue_id, when: self.timetable.schedule(queue_id, when), self.log)
        self.flushed: list[Optional[str]] = []
        self.recovered: list[str] = []
        self.finished: list[str] = []
        self.control = Control(self.spool, self.work, self.timetable, reader, self.scan, self.clock, self.log,
                               self.flushed.append, self.recovered.append, self.finish)

    def finish(self, attempt) -> defer.Deferred:
        self.finished.append(f"{attempt.queue_id}:{attempt.action}")
        self.work.end(attempt)
        return defer.succeed(None)

    def test_flush_hold_and_release_requests(self):
        self.spool.add("Q1", ["b@example.net"])
        self.timetable.schedule("Q1", NOW + 60)
        self.spool.requests = [("flush", None), ("hold", "Q1")]
        self.control.poll()
        self.assertEqual(self.flushed, [None])
        self.assertEqual((self.spool.held, "Q1" in self.timetable), ({"Q1"}, False))
        self.spool.requests = [("release", "Q1")]
        self.control.poll()
        self.assertEqual((self.spool.held, self.recovered), (set(), ["Q1"]))

    def test_hold_of_a_message_waiting_for_a_slot_drops_it_and_settles_the_attempt(self):
        attempt = attempt_of(self.work, "Q1")
        self.work.queue(job(attempt))
        self.spool.requests = [("hold", "Q1")]
        self.control.poll()
        self.assertTrue(attempt.held)
        self.assertEqual((list(self.work.lines()), self.finished), ([], ["Q1:None"]))

    def test_delete_and_bounce_of_a_message_not_in_work_settle_it_at_once(self):
        self.spool.add("D", ["b@example.net"])
        self.spool.add("B", ["b@example.net"])
        self.spool.requests = [("delete", "D"), ("bounce", "B")]
        self.control.poll()
        self.assertEqual(self.finished, ["D:delete", "B:bounce"])

    def test_a_request_without_the_id_it_needs_or_of_no_known_verb_is_ignored(self):
        self.spool.requests = [("hold", None), ("frobnicate", "Q1")]
        self.control.poll()
        self.assertEqual([e["log_level"].name for e in self.events if "verb" in e],
                         ["info", "warn", "info", "warn"])

    def test_suspend_clears_what_is_due_and_stays_until_resume(self):
        self.spool.add("Q1", ["b@example.net"])
        self.timetable.schedule("Q1", NOW)
        busy = attempt_of(self.work, "busy")
        busy.outstanding += 1                                  # in flight
        self.spool.requests = [("suspend", None)]
        self.control.poll()
        self.assertTrue(self.control.suspended)
        self.assertEqual((len(self.timetable), self.spool.suspended["in_flight"]), (0, 1))
        self.assertFalse(self.spool.suspended["idle"])
        self.assertTrue(self.control.suspended_due("Q1"))
        self.assertEqual(self.spool.forgotten, ["Q1"])
        self.work.end(busy)
        self.control.poll()                                    # the next poll sees nothing in flight
        self.assertTrue(self.spool.suspended["idle"])
        self.spool.requests = [("resume", None)]
        self.control.poll()
        self.assertFalse(self.control.suspended)
        self.assertIsNone(self.spool.suspended)
        self.assertEqual(self.timetable.ids(), ["Q1"])          # the spool read again


class RouterOfNone:
    def route(self, sender, recipient, attempts):
        return None


class WiringTests(PartsTestCase):
    """The Scheduler hands each part what it was given: an IThrottle of the caller's own, one logger."""

    def make(self, spool: MemorySpool, hop: ManualHop, **kwargs) -> Scheduler:
        scheduler = Scheduler(spool, RouterOfNone(), {}, hop, QueueConfig(first_retry=300.0, max_retry=600.0),
                              DeliveryConfig(concurrency=2, concurrency_per_domain=1), None, clock=self.clock,
                              rng=random.Random(1), **kwargs)
        return scheduler

    def run_one(self, scheduler: Scheduler, spool: MemorySpool, hop: ManualHop) -> None:
        scheduler.startService()
        self.clock.advance(0)
        hop.answer_all()
        self.assertEqual(spool.removed, ["Q1"])
        self.successResultOf(scheduler.stopService())

    def test_the_throttle_given_is_the_one_the_gate_asks(self):
        spool, hop, throttle = MemorySpool(), ManualHop(self.clock), RecordingThrottle()
        spool.add("Q1", ["x@slow.test"])
        scheduler = self.make(spool, hop, throttles=(SLOW,), throttle=throttle)
        self.run_one(scheduler, spool, hop)
        self.assertEqual([c[0] for c in throttle.calls], ["ready_at", "start", "finish", "succeeded", "succeeded"])

    def test_one_logger_for_the_scheduler_and_every_part(self):
        spool, hop = MemorySpool(), ManualHop(self.clock)
        spool.add("Q1", ["b@example.net"])
        scheduler = self.make(spool, hop)
        self.assertEqual(scheduler.log.namespace, "mailrelay.delivery.scheduler.Scheduler")
        scheduler.log = self.log
        self.run_one(scheduler, spool, hop)
        self.assertEqual(self.stages(), ["recovered", "attempt", "delivered", "removed"])
