# -*- test-case-name: tests.test_timetable -*-
"""delivery.timetable: when each queued message is due, admitted in order, a bounded number per reactor
turn and only while the scheduler has room — over task.Clock."""
from __future__ import annotations

from twisted.internet import task
from twisted.trial import unittest

from mailrelay.queue.timetable import Timetable


class TimetableTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.admitted: list[tuple[str, bool]] = []
        self.room = 10**9
        self.table = Timetable(self.clock, self.admit, lambda: len(self.admitted) < self.room, per_turn=3)
        self.table.start()

    def admit(self, queue_id: str, forced: bool) -> None:
        self.admitted.append((queue_id, forced))

    def ids(self) -> list[str]:
        return [queue_id for queue_id, _ in self.admitted]

    def test_messages_are_admitted_when_due_in_order_of_their_time(self):
        self.table.schedule("late", 1030)
        self.table.schedule("early", 1010)
        self.table.schedule("now", 900)
        self.clock.advance(0)
        self.assertEqual(self.ids(), ["now"])
        self.clock.advance(10)
        self.assertEqual(self.ids(), ["now", "early"])
        self.clock.advance(19)
        self.assertEqual(self.ids(), ["now", "early"])
        self.clock.advance(1)
        self.assertEqual(self.ids(), ["now", "early", "late"])
        self.assertEqual(len(self.table), 0)

    def test_at_most_per_turn_admissions_in_one_reactor_turn(self):
        turns: list[int] = []
        fire = self.table._fire

        def counted():                                   # one call of _fire is one reactor turn's work
            before = len(self.admitted)
            fire()
            turns.append(len(self.admitted) - before)
        self.table._fire = counted
        for n in range(10):
            self.table.schedule(f"m{n}", 1000)
        self.clock.advance(0)
        self.assertEqual(turns, [3, 3, 3, 1])
        self.assertEqual(self.ids(), [f"m{n}" for n in range(10)])     # FIFO among equal times

    def test_no_admission_without_room_until_kicked(self):
        self.room = 2
        for n in range(5):
            self.table.schedule(f"m{n}", 1000)
        self.clock.advance(0)
        self.clock.advance(60)
        self.assertEqual(self.ids(), ["m0", "m1"])
        self.room = 4
        self.table.kick()
        self.clock.advance(0)
        self.assertEqual(self.ids(), ["m0", "m1", "m2", "m3"])

    def test_rescheduling_replaces_the_earlier_time_and_unschedule_forgets(self):
        self.table.schedule("a", 1005)
        self.table.schedule("a", 1050)
        self.table.schedule("b", 1001)
        self.table.unschedule("b")
        self.clock.advance(10)
        self.assertEqual(self.ids(), [])
        self.assertIn("a", self.table)
        self.assertNotIn("b", self.table)
        self.clock.advance(40)
        self.assertEqual(self.ids(), ["a"])

    def test_an_earlier_schedule_moves_the_timer_forward(self):
        self.table.schedule("later", 2000)
        self.table.schedule("sooner", 1001)
        self.clock.advance(1)
        self.assertEqual(self.ids(), ["sooner"])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)           # one timer, for "later"

    def test_forced_flag_is_kept_until_admitted(self):
        self.table.schedule("a", 1000, force=True)
        self.table.schedule("a", 1000)
        self.table.schedule("b", 1000)
        self.clock.advance(0)
        self.assertEqual(self.admitted, [("a", True), ("b", False)])

    def test_many_reschedules_keep_the_heap_small_and_the_answers_right(self):
        for n in range(500):
            self.table.schedule("same", 1000 + n)
        self.assertLess(len(self.table._heap), 200)
        self.clock.advance(498)
        self.assertEqual(self.ids(), [])
        self.clock.advance(1)
        self.assertEqual(self.ids(), ["same"])

    def test_stop_and_clear_cancel_the_timer(self):
        self.table.schedule("a", 1100)
        self.table.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(200)
        self.assertEqual(self.ids(), [])
