# -*- test-case-name: tests.test_scheduler_parts -*-
"""The delivery scheduler's collaborators, each on its own over task.Clock: the queue state, the spool
reader and the start-up scan, the throttle gate and the connection slots — each built from what it is
given, with nothing of a Scheduler around it (the outcomes, reports and control: test_scheduler_outcomes).
"""
from __future__ import annotations

from twisted.internet import defer
from zope.interface.verify import verifyObject

from mailrelay.config import Throttle
from mailrelay.queue.attempts import _Job
from mailrelay.queue.concurrency import Slots
from mailrelay.queue.queuestate import ACTIVE_HARD_LIMIT, ACTIVE_MIN, ACTIVE_PER_SLOT, QueueState, active_limit
from mailrelay.queue.recovery import SpoolReader, StartupScan
from mailrelay.queue.results import RecipientResult
from mailrelay.queue.shaping import Shaper
from mailrelay.queue.state import MessageState, RecipientState
from mailrelay.queue.throttle import LocalThrottle, ThrottleRules
from mailrelay.queue.timetable import Timetable
from mailrelay.interfaces import IThrottle
from tests.support.parts import SLOW, PartsTestCase, RecordingThrottle, attempt_of, job, message
from tests.support.scheduling import NOW, ManualHop, MemorySpool


class QueueStateTests(PartsTestCase):
    def test_the_active_set_is_bounded_by_the_concurrency(self):
        self.assertEqual(active_limit(10), ACTIVE_MIN)
        self.assertEqual(active_limit(500), 500 * ACTIVE_PER_SLOT)
        work = QueueState(concurrency=10)
        for n in range(ACTIVE_MIN - 1):
            attempt_of(work, f"q{n}")
        self.assertTrue(work.has_room())
        attempt_of(work, "last")
        self.assertFalse(work.has_room())
        work.set_concurrency(ACTIVE_MIN)              # a reload with more slots: more room at once
        self.assertTrue(work.has_room())

    def test_deliveries_held_back_by_a_throttle_do_not_count_up_to_the_hard_limit(self):
        work = QueueState(concurrency=1)
        attempts = [attempt_of(work, f"q{n}", "x@slow.test") for n in range(ACTIVE_MIN)]
        self.assertFalse(work.has_room())
        work.queue(job(attempts[0], destination="slow.test"))
        self.assertTrue(work.has_room())              # one of them only waits for its destination
        work.queue(job(attempts[1]))                  # an unthrottled wait counts as work
        self.assertTrue(work.has_room())
        for n in range(ACTIVE_MIN, ACTIVE_HARD_LIMIT):
            work.queue(job(attempt_of(work, f"q{n}", "x@slow.test"), destination="slow.test"))
        self.assertFalse(work.has_room())             # never more than the hard limit in memory

    def test_queue_and_drop_count_the_outstanding_deliveries_and_keep_the_line_order(self):
        work = QueueState()
        first, second = attempt_of(work, "Q1"), attempt_of(work, "Q2")
        for one in (job(first), job(second), job(first, key="transport:t")):
            work.queue(one)
        self.assertEqual((first.outstanding, second.outstanding), (2, 1))
        self.assertEqual([line for line, _ in work.lines()], [("domain:example.net", None), ("transport:t", None)])
        self.assertEqual(work.drop_waiting(first), 2)
        self.assertEqual(first.outstanding, 0)
        self.assertEqual([[j.attempt.queue_id for j in jobs] for _, jobs in work.lines()], [["Q2"]])
        self.assertEqual(work.drop_waiting(first), 0)

    def test_drop_all_waiting_lets_go_of_messages_with_nothing_in_flight(self):
        work = QueueState()
        idle, busy = attempt_of(work, "idle"), attempt_of(work, "busy")
        work.queue(job(idle))
        work.queue(job(busy))
        busy.outstanding += 1                          # one delivery of it is in flight
        work.drop_all_waiting()
        self.assertEqual(list(work.attempts), ["busy"])
        self.assertEqual((busy.outstanding, list(work.lines())), (1, []))

    def test_line_changes_follow_throttled_lines_and_every_drop(self):
        work = QueueState()
        attempt = attempt_of(work, "Q1", "x@slow.test")
        work.queue(job(attempt))
        self.assertEqual(work.line_changes, 0)
        work.queue(job(attempt, key="transport:t", destination="slow.test"))
        self.assertEqual(work.line_changes, 1)
        work.drop_waiting(attempt)
        self.assertEqual(work.line_changes, 2)

    def test_waiting_per_destination_ids_and_counts(self):
        work = QueueState()
        a, b = attempt_of(work, "A", "x@slow.test"), attempt_of(work, "B", "y@slow.test")
        work.queue(job(a, destination="slow.test"))
        work.queue(job(b, destination="slow.test"))
        work.queue(job(a, key="transport:t", destination="slow.test"))
        work.queue(job(b, key="domain:other.test"))
        self.assertEqual(work.waiting_for("slow.test"), 3)
        self.assertEqual(work.waiting_ids("slow.test"), ["A", "B"])
        self.assertEqual(work.waiting_per_destination(), {"slow.test": 3})

    def test_the_snapshot_counts_messages_their_oldest_and_the_held(self):
        work = QueueState()
        self.assertEqual(work.snapshot(NOW), (0, 0.0, 0))
        work.track(message("old", received_at=NOW - 600))
        work.track(message("held", held=True))
        work.seen("new", NOW)
        work.seen("old", NOW)                          # already known: its time stays
        self.assertEqual(work.snapshot(NOW + 10), (3, 610.0, 1))
        work.release("held")
        work.forget("old")
        self.assertEqual(work.snapshot(NOW + 10), (2, 10.0, 0))
        work.hold("unknown")                           # not in the queue: not counted as held
        self.assertEqual(work.snapshot(NOW + 10)[2], 0)


class SpoolReaderTests(PartsTestCase):
    def setUp(self):
        super().setUp()
        self.spool, self.work = MemorySpool(), QueueState()
        self.reader = SpoolReader(self.spool, self.work, self.log)

    def test_a_loaded_message_is_tracked_with_its_state(self):
        saved = MessageState((RecipientState("b@example.net", attempts=2, next_attempt=NOW + 60),)).to_dict()
        self.spool.add("Q1", ["b@example.net"], received_at=NOW - 5, state=saved)
        loaded, state = self.reader.load("Q1")
        self.assertEqual((loaded.queue_id, state.get("b@example.net").attempts), ("Q1", 2))
        self.assertEqual(self.work.received, {"Q1": NOW - 5})

    def test_an_unreadable_state_is_logged_and_the_message_left_alone(self):
        self.spool.add("Q1", ["b@example.net"], state={"version": 99})
        self.assertIsNone(self.reader.load("Q1"))
        self.assertEqual(self.stages(), ["error"])
        self.assertIn("Q1", self.spool.envelopes)
        self.assertEqual(self.spool.saves, [])

    def test_a_message_gone_is_none_and_a_held_one_is_not_delivered(self):
        self.assertIsNone(self.reader.load("missing"))
        self.spool.add("H", ["b@example.net"], held=True)
        self.assertIsNone(self.reader.load_unheld("H", "tried"))
        self.assertEqual(self.stages(), ["held"])
        self.assertEqual(self.work.held, {"H"})


class StartupScanTests(PartsTestCase):
    def setUp(self):
        super().setUp()
        self.spool, self.work = MemorySpool(), QueueState()
        self.admitted: list[str] = []
        self.timetable = Timetable(self.clock, lambda queue_id, forced: self.admitted.append(queue_id), lambda: True)
        self.timetable.start()
        self.scheduled: list[tuple[str, float]] = []
        self.scan = StartupScan(self.clock, self.spool, SpoolReader(self.spool, self.work, self.log), self.work,
                                self.timetable, self.schedule, self.log, per_turn=2)

    def schedule(self, queue_id: str, when: float) -> None:
        self.scheduled.append((queue_id, when))
        self.timetable.schedule(queue_id, when)

    def test_the_scan_schedules_by_state_file_a_few_per_turn_oldest_first(self):
        later = MessageState((RecipientState("b@example.net", attempts=1, next_attempt=NOW + 60),)).to_dict()
        for n in range(5):
            self.spool.add(f"q{n}", ["b@example.net"], state=later if n == 3 else None)
        self.patch(self.spool, "load", lambda queue_id: self.fail(f"{queue_id} opened by the scan"))
        self.scan.start()
        self.assertEqual([q for q, _ in self.scheduled], ["q0", "q1"])
        self.assertTrue(self.scan.scanning)
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(self.scheduled, [("q0", 0.0), ("q1", 0.0), ("q2", 0.0), ("q3", NOW + 60), ("q4", 0.0)])
        self.assertFalse(self.scan.scanning)
        self.assertEqual(self.stages(), ["recovered"])
        self.assertEqual(len(self.work.received), 5)

    def test_messages_already_scheduled_or_in_work_are_left_as_they_are(self):
        for queue_id in ("busy", "due", "rest"):
            self.spool.add(queue_id, ["b@example.net"])
        attempt_of(self.work, "busy")
        self.timetable.schedule("due", NOW + 999)
        self.scan.start()
        self.clock.advance(0)
        self.assertEqual(self.scheduled, [("rest", 0.0)])

    def test_a_held_message_is_loaded_for_the_gauges_and_not_scheduled(self):
        self.spool.add("H", ["b@example.net"], held=True)
        self.scan.start()
        self.assertEqual((self.scheduled, self.work.held), ([], {"H"}))

    def test_stop_ends_the_scan_and_leaves_no_timer_behind(self):
        for n in range(5):
            self.spool.add(f"q{n}", ["b@example.net"])
        self.timetable.stop()
        self.scan.start()
        self.scan.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.scheduled), 2)
        self.assertFalse(self.scan.scanning)


class ShaperTests(PartsTestCase):
    def setUp(self):
        super().setUp()
        self.throttle, self.work, self.woken = RecordingThrottle(), QueueState(), []
        self.shaper = Shaper(ThrottleRules((SLOW, Throttle(("capped.test",), connections=2, pause=0.0))), self.throttle,
                             self.work, self.clock, lambda: self.woken.append(self.clock.seconds()), self.log)
        self.shaper.start()
        self.addCleanup(self.shaper.stop)

    def test_the_recording_throttle_is_an_ithrottle(self):
        self.assertTrue(verifyObject(IThrottle, self.throttle))

    def test_unthrottled_lines_go_unasked(self):
        attempt = attempt_of(self.work, "Q1")
        self.assertIsNone(self.shaper.destination_of("example.net"))
        self.assertEqual(self.shaper.gate(job(attempt), 5, NOW), (5, -1))
        self.assertIsNone(self.shaper.started(job(attempt), NOW))
        self.assertEqual(self.throttle.calls, [])

    def test_the_rate_holds_the_next_start_and_wakes_the_scheduler_when_it_may_go(self):
        attempt = attempt_of(self.work, "Q1", "x@slow.test")
        first = job(attempt, destination=self.shaper.destination_of("slow.test"))
        self.assertEqual(self.shaper.gate(first, 5, NOW), (5, 1))          # one message per start
        self.assertEqual(self.shaper.started(first, NOW), "slow.test")
        self.shaper.finished("slow.test")
        self.assertEqual(self.shaper.gate(first, 5, NOW), (0, 0))
        self.clock.advance(0.5)
        self.assertEqual(self.woken, [])
        self.clock.advance(0.5)
        self.assertEqual(self.woken, [NOW + 1.0])                          # 60 a minute
        self.assertEqual([c[0] for c in self.throttle.calls], ["ready_at", "start", "finish", "ready_at"])

    def test_the_connection_cap_narrows_the_free_slots(self):
        attempt = attempt_of(self.work, "Q1", "x@capped.test")
        line = job(attempt, destination="capped.test")
        self.assertEqual(self.shaper.gate(line, 5, NOW), (2, -1))
        self.shaper.started(line, NOW)
        self.assertEqual(self.shaper.gate(line, 5, NOW), (1, -1))
        self.shaper.started(line, NOW)
        self.assertEqual(self.shaper.gate(line, 5, NOW), (0, 0))           # only a finish helps: no timer
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_slow_down_reply_pauses_the_destination_and_its_end_is_announced(self):
        attempt = attempt_of(self.work, "Q1", "x@slow.test")
        self.work.queue(job(attempt, destination="slow.test"))
        line = job(attempt, destination="slow.test")
        reply = RecipientResult("x@slow.test", 421, "4.7.0", "slow down", "mx", remote_reply=True)
        self.assertEqual(self.shaper.outcome(line, [reply], NOW), NOW + 30.0)
        self.assertEqual(self.throttle.calls, [("slowed", "slow.test", "421 4.7.0 slow down")])
        paused = [e for e in self.events if e.get("stage") == "throttle-paused"][0]
        self.assertEqual((paused["destination"], paused["waiting"]), ("slow.test", 1))
        self.clock.advance(30)
        self.assertEqual(self.woken, [NOW + 30.0])
        self.shaper.announce_resumed(self.clock.seconds())
        resumed = [e for e in self.events if e.get("stage") == "throttle-resumed"][0]
        self.assertEqual(resumed["queue_ids"], "Q1")

    def test_the_relays_own_failure_and_an_acceptance_are_no_pause(self):
        attempt = attempt_of(self.work, "Q1", "x@slow.test")
        line = job(attempt, destination="slow.test")
        own = RecipientResult("x@slow.test", 421, "4.4.2", "timeout", "mx")          # not the hop's reply
        self.assertIsNone(self.shaper.outcome(line, [own], NOW))
        self.assertIsNone(self.shaper.outcome(line, [RecipientResult("x@slow.test", 250, "2.0.0", "ok")], NOW))
        self.assertEqual(self.throttle.calls, [("succeeded", "slow.test")])

    def test_the_snapshot_is_none_without_rules_and_counts_the_waiting_with_them(self):
        attempt = attempt_of(self.work, "Q1", "x@slow.test")
        self.work.queue(job(attempt, destination="slow.test"))
        statuses, waiting, now = self.shaper.snapshot()
        self.assertEqual((statuses, waiting, now), ([], {"slow.test": 1}, NOW))
        self.shaper.set_rules(ThrottleRules(()))
        self.assertIsNone(self.shaper.snapshot())


class Recorded:
    """A Recorder for Slots: each delivery's results, as they come."""

    def __init__(self):
        self.results: list[tuple[str, list]] = []
        self.failed: list[str] = []

    def record(self, results, one: _Job) -> defer.Deferred:
        self.results.append((one.attempt.queue_id, [(r.recipient, r.code, r.status) for r in results or ()]))
        return defer.succeed(None)

    def record_failed(self, failure, one: _Job) -> None:
        self.failed.append(one.attempt.queue_id)


class BrokenHop:
    def deliver(self, message, recipients):
        raise RuntimeError("a next hop that breaks its promise")


class SlotsTests(PartsTestCase):
    def setUp(self):
        super().setUp()
        self.work, self.hop, self.recorded = QueueState(), ManualHop(self.clock), Recorded()
        shaper = Shaper(ThrottleRules(), LocalThrottle(), self.work, self.clock, lambda: None, self.log)
        self.slots = Slots(self.work, shaper, self.recorded, self.clock, concurrency=3, per_key=2, metrics=None,
                           log=self.log)
        self.slots.start()

    def wait(self, queue_id: str, domain: str = "example.net", hop=None) -> None:
        self.work.queue(job(attempt_of(self.work, queue_id, f"u@{domain}"), hop or self.hop))

    def test_the_limits_in_all_and_per_key_and_fifo_within_a_key(self):
        for n in range(4):
            self.wait(f"a{n}", "a.test")
        self.wait("b0", "b.test")
        self.slots.pump()
        self.assertEqual([q for _, q, _ in self.hop.calls], ["a0", "a1", "b0"])
        self.assertEqual(self.slots.in_flight, 3)
        self.hop.answer_next()                          # a0 done: its slot goes to a2
        self.assertEqual([q for _, q, _ in self.hop.calls][-1], "a2")
        self.assertEqual(self.recorded.results, [("a0", [("u@a.test", 250, "2.0.0")])])

    def test_pump_soon_is_one_pump_at_the_end_of_the_turn(self):
        self.slots.pump_soon()
        self.wait("Q1")
        self.slots.pump_soon()
        self.assertEqual(self.hop.calls, [])
        self.clock.advance(0)
        self.assertEqual(len(self.hop.calls), 1)

    def test_nothing_starts_once_stopped_and_what_is_in_flight_is_still_recorded(self):
        self.wait("Q1")
        self.slots.pump()
        self.wait("Q2")
        self.slots.pump_soon()
        self.slots.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.slots.pump()
        self.hop.answer_all()
        self.assertEqual([q for _, q, _ in self.hop.calls], ["Q1"])
        self.assertEqual([q for q, _ in self.recorded.results], ["Q1"])

    def test_a_next_hop_that_fails_gives_every_recipient_a_retry(self):
        self.wait("Q1", hop=BrokenHop())
        self.slots.pump()
        self.assertEqual(self.recorded.results, [("Q1", [("u@example.net", 451, "4.4.0")])])
        self.assertEqual(self.slots.in_flight, 0)
        self.flushLoggedErrors(RuntimeError)
