"""`[[throttle]]`: the rate, the connection cap and the pauses, over task.Clock.

First the state on its own (LocalThrottle, the IThrottle seam), then the scheduler driving it: which
deliveries start when, what a "slow down" reply does to its destination and to the others, and that a
message waiting for a throttle is never a failed attempt.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from twisted.internet import task
from twisted.logger import Logger
from twisted.trial import unittest
from zope.interface.verify import verifyObject
from prometheus_client.exposition import generate_latest

from mailrelay.config import DeliveryConfig, QueueConfig, Route, Throttle
from mailrelay.queue.results import RecipientResult
from mailrelay.queue.routes import Router
from mailrelay.queue.scheduler import STOP_TIMEOUT, Scheduler
from mailrelay.queue.shaping import read_status
from mailrelay.queue.throttle import LocalThrottle, slows_down
from mailrelay.interfaces import IThrottle
from mailrelay.metrics import Metrics
from tests.support.scheduling import NOW, ManualHop, MemorySpool

GMAIL = Throttle(("gmail.test",), messages_per_minute=60, connections=0, pause=60.0)


class SlowsDownTests(unittest.TestCase):
    def result(self, code, status, remote=True):
        return RecipientResult("a@b.test", code, status, "text", "mx", remote_reply=remote)

    def test_what_the_next_hop_said_decides(self):
        self.assertTrue(slows_down(self.result(421, "4.7.0")))
        self.assertTrue(slows_down(self.result(421, "4.3.2")))        # 421 at any stage, any status
        self.assertTrue(slows_down(self.result(451, "4.7.1")))
        self.assertTrue(slows_down(self.result(450, "4.7.28")))
        self.assertFalse(slows_down(self.result(451, "4.3.0")))       # another temporary failure
        self.assertFalse(slows_down(self.result(550, "5.7.1")))       # a refusal is no deferral
        self.assertFalse(slows_down(self.result(250, "2.0.0")))

    def test_the_relays_own_verdicts_never_slow_down(self):
        self.assertFalse(slows_down(self.result(421, "4.4.2", remote=False)))   # timeout, lost connection
        self.assertFalse(slows_down(self.result(421, "4.7.5", remote=False)))   # TLS handshake failed
        self.assertFalse(slows_down(self.result(451, "4.7.4", remote=False)))   # TLS required, not offered
        self.assertFalse(slows_down(RecipientResult("a@b.test", 454, "4.7.0", "no OAuth2 token", "")))


class LocalThrottleTests(unittest.TestCase):
    def setUp(self):
        self.throttle = LocalThrottle()

    def test_provides_ithrottle(self):
        self.assertTrue(verifyObject(IThrottle, self.throttle))

    def test_the_rate_is_smooth_one_message_per_interval_and_no_burst_after_a_quiet_time(self):
        rule = Throttle(("*",), messages_per_minute=120)
        self.assertEqual(self.throttle.ready_at("a.test", rule, 0.0), 0.0)
        self.throttle.start("a.test", rule, 0.0)
        self.throttle.finish("a.test")
        self.assertEqual(self.throttle.ready_at("a.test", rule, 0.1), 0.5)
        self.throttle.start("a.test", rule, 0.5)
        self.throttle.finish("a.test")
        # An hour of nothing earns no burst: the next one starts at once, the one after 0.5 s later.
        self.assertEqual(self.throttle.ready_at("a.test", rule, 3600.0), 3600.0)
        self.throttle.start("a.test", rule, 3600.0)
        self.assertEqual(self.throttle.ready_at("a.test", rule, 3600.0), 3600.5)
        self.assertEqual(self.throttle.ready_at("b.test", rule, 3600.0), 3600.0)   # every domain its own

    def test_the_connection_cap_holds_until_a_connection_ends(self):
        rule = Throttle(("*",), connections=2)
        self.throttle.start("a.test", rule, 0.0)
        self.throttle.start("a.test", rule, 0.0)
        self.assertIsNone(self.throttle.ready_at("a.test", rule, 0.0))
        self.throttle.finish("a.test")
        self.assertEqual(self.throttle.ready_at("a.test", rule, 0.0), 0.0)

    def test_a_pause_doubles_while_it_goes_on_up_to_an_hour(self):
        rule = Throttle(("*",), pause=600.0)
        now, lengths = 0.0, []
        for _ in range(5):
            self.throttle.start("a.test", rule, now)
            until, began = self.throttle.slowed("a.test", rule, now, now + 1, "421 4.7.0 slow down")
            self.throttle.finish("a.test")
            self.assertTrue(began)
            lengths.append(until - (now + 1))
            self.assertEqual(self.throttle.ready_at("a.test", rule, now + 2), until)
            now = until
        self.assertEqual(lengths, [600.0, 1200.0, 2400.0, 3600.0, 3600.0])

    def test_replies_from_deliveries_under_way_when_the_pause_began_change_nothing(self):
        rule = Throttle(("*",), pause=60.0)
        until, _ = self.throttle.slowed("a.test", rule, 10.0, 11.0, "421 first")
        self.assertEqual(self.throttle.slowed("a.test", rule, 10.0, 12.0, "421 second"), (until, False))
        self.assertEqual(self.throttle.slowed("a.test", rule, 11.0, 13.0, "421 same instant"), (until, False))
        # The next delivery, started after the pause, doubles it.
        self.assertEqual(self.throttle.slowed("a.test", rule, until, until + 1, "421 again"), (until + 121, True))

    def test_an_accepted_delivery_ends_the_row_but_not_one_older_than_the_pause(self):
        rule = Throttle(("*",), pause=60.0)
        self.throttle.slowed("a.test", rule, 0.0, 1.0, "421")
        self.throttle.succeeded("a.test", 0.5)                  # under way before the pause: old news
        until, _ = self.throttle.slowed("a.test", rule, 61.0, 62.0, "421")
        self.assertEqual(until, 182.0)                          # doubled
        self.throttle.succeeded("a.test", 183.0)                # started after it, accepted
        until, _ = self.throttle.slowed("a.test", rule, 200.0, 201.0, "421")
        self.assertEqual(until, 261.0)                          # back to `pause`

    def test_pause_zero_never_pauses(self):
        rule = Throttle(("*",), pause=0.0)
        self.assertEqual(self.throttle.slowed("a.test", rule, 0.0, 1.0, "421"), (1.0, False))
        self.assertEqual(self.throttle.ready_at("a.test", rule, 1.0), 1.0)

    def test_status_shows_what_matters_and_idle_destinations_are_forgotten(self):
        rule = Throttle(("*",), messages_per_minute=60, pause=60.0)
        self.throttle.slowed("p.test", rule, 0.0, 0.0, "421 4.7.0 slow down")
        self.throttle.start("c.test", rule, 0.0)
        status = {s.destination: s for s in self.throttle.status(1.0)}
        self.assertTrue(status["p.test"].paused(1.0))
        self.assertEqual((status["p.test"].reason, status["p.test"].pauses_in_a_row), ("421 4.7.0 slow down", 1))
        self.assertEqual((status["c.test"].connections, status["c.test"].next_start), (1, 1.0))
        self.throttle.finish("c.test")
        for i in range(256):                                    # enough starts for a sweep
            self.throttle.start(f"d{i}.test", Throttle(("*",)), 10_000.0)
            self.throttle.finish(f"d{i}.test")
        self.assertEqual([s.destination for s in self.throttle.status(10_000.0)], [])
        self.assertNotIn("p.test", self.throttle._destinations)     # swept: nothing left to remember
        self.assertNotIn("c.test", self.throttle._destinations)


class ThrottledSchedulerTestCase(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.spool = MemorySpool()
        self.direct = ManualHop(self.clock)
        self.smarthost = ManualHop(self.clock, name="smarthost.test")
        self.events: list[dict] = []

    def make(self, throttles, routes=(), delivery=None, queue=None, **kwargs) -> Scheduler:
        scheduler = Scheduler(self.spool, Router(tuple(routes)), {"smart": self.smarthost}, self.direct,
                              queue or QueueConfig(first_retry=300.0, max_retry=1200.0, lifetime=86400.0,
                                                   delay_warning=0.0),
                              delivery or DeliveryConfig(concurrency=20, concurrency_per_domain=10), None,
                              clock=self.clock, rng=random.Random(1), throttles=tuple(throttles), **kwargs)
        scheduler.log = Logger(observer=self.events.append)
        scheduler.startService()
        self.addCleanup(self.stop, scheduler)
        self.scheduler = scheduler
        return scheduler

    def stop(self, scheduler):
        d = scheduler.stopService()
        self.direct.answer_all()
        self.smarthost.answer_all()
        self.clock.advance(STOP_TIMEOUT)
        return d

    def add(self, count, domain, start=0):
        ids = [f"q{domain.split('.')[0]}{i:03d}" for i in range(start, start + count)]
        for queue_id in ids:
            self.spool.add(queue_id, [f"user@{domain}"])
        return ids

    def stages(self, stage):
        return [e for e in self.events if e.get("stage") == stage]

    def attempts(self, queue_id, domain):
        return self.spool.recipient_state(queue_id, f"user@{domain}").attempts


class RateAndCapTests(ThrottledSchedulerTestCase):
    def test_the_rate_lets_one_message_start_per_interval(self):
        self.add(5, "gmail.test")
        self.make([GMAIL])
        self.clock.advance(0)
        self.assertEqual(len(self.direct.calls), 1)              # no burst: one, then one a second
        for second in range(1, 5):
            self.direct.answer_all()
            self.clock.advance(1.0)
            self.assertEqual(len(self.direct.calls), second + 1)
        starts = [t - NOW for t, _, _ in self.direct.calls]
        self.assertEqual(starts, sorted(starts))
        self.assertTrue(all(b - a >= 1.0 for a, b in zip(starts, starts[1:])), starts)

    def test_the_rate_holds_with_every_connection_free_and_one_message_per_connection(self):
        self.add(4, "gmail.test")
        self.make([GMAIL])
        self.clock.advance(0)
        self.clock.advance(0.5)
        self.assertEqual(len(self.direct.calls), 1)              # the first still in flight, others wait
        self.clock.advance(0.5)
        self.assertEqual(len(self.direct.calls), 2)              # in flight or not: the rate decides
        self.assertTrue(all(len(rcpts) == 1 for _, _, rcpts in self.direct.calls))

    def test_the_connection_cap_is_on_top_of_concurrency_per_domain(self):
        self.add(8, "cap.test")
        self.add(3, "free.test")
        self.make([Throttle(("cap.test",), connections=2)])
        self.clock.advance(0)
        self.assertEqual(self.direct.in_flight("cap.test"), 2)
        self.assertEqual(self.direct.in_flight("free.test"), 3)    # an unthrottled domain is not held
        while self.direct.pending:
            self.direct.answer_next()
            self.clock.advance(0)
        self.assertEqual(self.direct.max_in_flight["cap.test"], 2)
        self.assertEqual(len(self.spool.removed), 11)

    def test_waiting_for_the_rate_is_no_attempt(self):
        ids = self.add(3, "gmail.test")
        self.make([GMAIL])
        self.clock.advance(0)
        self.assertEqual([self.attempts(q, "gmail.test") for q in ids], [0, 0, 0])
        self.assertEqual(self.spool.states, {})                  # nothing saved for the waiting ones


class PauseTests(ThrottledSchedulerTestCase):
    def test_a_421_pauses_the_destination_and_the_waiting_messages_are_not_attempts(self):
        ids = self.add(4, "slow.test")
        self.make([Throttle(("slow.test",), connections=1, pause=60.0)])
        self.clock.advance(0)
        self.direct.answer_next(421, "4.7.0")                    # the first message: "slow down"
        self.clock.advance(0)
        self.assertEqual(len(self.direct.calls), 1)
        self.clock.advance(59)
        self.assertEqual(len(self.direct.calls), 1)              # paused for a minute
        self.assertEqual([self.attempts(q, "slow.test") for q in ids], [1, 0, 0, 0])
        self.assertEqual(self.spool.recipient_state(ids[0], "user@slow.test").next_attempt, NOW + 60)
        paused = self.stages("throttle-paused")
        self.assertEqual(len(paused), 1)
        self.assertEqual((paused[0]["queue_id"], paused[0]["destination"], paused[0]["waiting"]),
                         (ids[0], "slow.test", 3))
        self.clock.advance(1)
        self.assertEqual(len(self.direct.calls), 2)              # resumed, in order
        resumed = self.stages("throttle-resumed")
        self.assertEqual(len(resumed), 1)
        self.assertIn(ids[1], resumed[0]["queue_ids"])
        while self.direct.pending:
            self.direct.answer_next()
            self.clock.advance(0)
        self.assertEqual(sorted(self.spool.removed), sorted(ids))  # the first too, when the pause ended
        # The ones that waited go first, in order; the one that got the reply joins the line behind them.
        self.assertEqual(self.direct.queue_ids("slow.test"), [ids[0], ids[1], ids[2], ids[3], ids[0]])

    def test_a_pause_does_not_stop_another_destination(self):
        slow = self.add(3, "slow.test")
        self.make([Throttle(("*",), connections=1, pause=60.0)])
        self.clock.advance(0)
        self.direct.answer_next(451, "4.7.1")                    # slow.test's first: a 4.7.x deferral
        self.clock.advance(0)
        other = self.add(3, "other.test")
        for queue_id in other:
            self.scheduler.enqueue(queue_id)
        for _ in range(3):
            self.clock.advance(0)
            self.direct.answer_all()
            self.clock.advance(0)
        self.assertEqual(sorted(q for q in self.spool.removed), sorted(other))
        self.assertEqual([self.attempts(q, "slow.test") for q in slow], [1, 0, 0])

    def test_the_pause_doubles_while_it_goes_on_and_a_success_resets_it(self):
        (queue_id,) = self.add(1, "slow.test")
        self.make([Throttle(("slow.test",), pause=60.0)])
        self.clock.advance(0)
        lengths = []
        for _ in range(3):
            self.direct.answer_next(421, "4.7.0")
            self.clock.advance(0)
            paused = self.stages("throttle-paused")[-1]
            lengths.append(paused["seconds"])
            self.clock.advance(paused["seconds"])                # the retry comes when the pause ends
            self.assertEqual(len(self.direct.pending), 1)
        self.assertEqual(lengths, [60, 120, 240])
        self.assertEqual(self.attempts(queue_id, "slow.test"), 3)
        self.direct.answer_next()                                # accepted: the row ends
        self.clock.advance(0)
        (second,) = self.add(1, "slow.test", start=1)
        self.scheduler.enqueue(second)
        self.clock.advance(0)
        self.direct.answer_next(421, "4.7.0")
        self.clock.advance(0)
        self.assertEqual(self.stages("throttle-paused")[-1]["seconds"], 60)

    def test_a_local_failure_does_not_pause(self):
        ids = self.add(2, "slow.test")
        self.make([Throttle(("slow.test",), connections=1, pause=60.0)])
        self.clock.advance(0)
        self.direct.answer_next(421, "4.4.2", remote=False)      # e.g. our own timeout
        self.clock.advance(0)
        self.assertEqual(len(self.direct.calls), 2)              # the next one goes at once
        self.assertEqual(self.stages("throttle-paused"), [])
        self.assertGreater(self.spool.recipient_state(ids[0], "user@slow.test").next_attempt, NOW + 200)  # backoff

    def test_waiting_out_a_pause_sends_no_delay_dsn_sooner(self):
        reporter = _Reporter()
        ids = self.add(2, "slow.test")
        queue = QueueConfig(first_retry=300.0, max_retry=1200.0, lifetime=86400.0, delay_warning=30.0)
        scheduler = Scheduler(self.spool, Router(()), {}, self.direct, queue,
                              DeliveryConfig(concurrency=20, concurrency_per_domain=1), reporter,
                              clock=self.clock, throttles=(Throttle(("slow.test",), pause=600.0),))
        scheduler.log = Logger(observer=self.events.append)
        scheduler.startService()
        self.addCleanup(self.stop, scheduler)
        self.clock.advance(0)
        self.direct.answer_next(421, "4.7.0")
        self.clock.advance(0)
        self.clock.advance(599)
        # Ten minutes past delay_warning: the message that only waited has had no attempt and no DSN.
        self.assertEqual(reporter.delays, [])
        self.assertEqual(self.attempts(ids[1], "slow.test"), 0)
        self.clock.advance(1)
        self.direct.answer_all()
        self.clock.advance(0)
        self.assertEqual(sorted(self.spool.removed), sorted(ids))
        self.assertEqual(reporter.delays, [])


class _Reporter:
    def __init__(self):
        self.delays, self.bounces = [], []

    def bounce(self, message, results):
        self.bounces.append((message.queue_id, results))

    def delay(self, message, recipients):
        self.delays.append((message.queue_id, recipients))


class SmarthostDestinationTests(ThrottledSchedulerTestCase):
    ROUTE = Route("smart", recipients=("*",))

    def test_the_destination_is_the_recipient_domain_through_a_smarthost(self):
        self.spool.add("q1", ["a@slow.test", "b@other.test", "c@slow.test"])
        self.make([Throttle(("slow.test",), pause=60.0)], routes=[self.ROUTE])
        self.clock.advance(0)
        # One transaction per throttled destination: slow.test's recipients apart from the rest.
        self.assertEqual(sorted(rcpts for _, _, rcpts in self.smarthost.calls),
                         [("a@slow.test", "c@slow.test"), ("b@other.test",)])

    def test_a_smarthost_slow_down_pauses_only_that_destination(self):
        self.add(2, "slow.test")
        self.make([Throttle(("*",), pause=60.0)], routes=[self.ROUTE],
                  delivery=DeliveryConfig(concurrency=20, concurrency_per_domain=1))
        self.clock.advance(0)
        self.smarthost.answer_next(421, "4.7.0")
        self.clock.advance(0)
        self.spool.add("qo", ["user@other.test"])
        self.scheduler.enqueue("qo")
        self.clock.advance(0)
        self.assertEqual(self.smarthost.pending[0][1], "qo")     # same transport, other destination: goes
        self.smarthost.answer_all()
        self.clock.advance(0)
        self.assertIn("qo", self.spool.removed)
        self.assertEqual(len(self.smarthost.queue_ids("slow.test")), 1)


class ThrottleStatusTests(ThrottledSchedulerTestCase):
    def test_metrics_show_the_paused_destination_and_what_waits(self):
        metrics = Metrics()
        self.add(3, "slow.test")
        self.make([Throttle(("slow.test",), connections=1, pause=60.0)], metrics=metrics)
        self.clock.advance(0)
        self.direct.answer_next(421, "4.7.0")
        self.clock.advance(0)
        text = generate_latest(metrics.registry).decode()
        self.assertIn('mailrelay_throttle_paused{destination="slow.test"} 1.0', text)
        self.assertIn('mailrelay_throttle_waiting{destination="slow.test"} 2.0', text)
        self.clock.advance(60)
        text = generate_latest(metrics.registry).decode()
        self.assertIn('mailrelay_throttle_paused{destination="slow.test"} 0.0', text)
        self.assertIn('mailrelay_throttle_connections{destination="slow.test"} 1.0', text)

    def test_the_status_file_says_who_is_paused_and_goes_when_the_scheduler_stops(self):
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = self.add(3, "slow.test")
        scheduler = self.make([Throttle(("slow.test",), connections=1, pause=60.0)], status_path=path)
        self.clock.advance(0)
        self.direct.answer_next(421, "4.7.0")
        self.clock.advance(0)
        status = read_status(path)
        (row,) = status["destinations"]
        self.assertEqual((row["destination"], row["paused_until"], row["waiting"]), ("slow.test", NOW + 60, 2))
        self.assertEqual(row["waiting_ids"], ids[1:])
        self.assertIn("421 4.7.0", row["reason"])
        self.assertEqual(json.loads(path.read_text())["written_at"], NOW)
        self.clock.advance(5)
        self.assertEqual(read_status(path)["written_at"], NOW + 5)      # rewritten every few seconds
        self.stop(scheduler)
        self.assertFalse(path.exists())

    def test_a_reload_keeps_the_pause_and_applies_new_rules(self):
        self.add(2, "slow.test")
        scheduler = self.make([Throttle(("slow.test",), connections=1, pause=60.0)])
        self.clock.advance(0)
        self.direct.answer_next(421, "4.7.0")
        self.clock.advance(0)
        scheduler.reconfigure(scheduler._router, scheduler._transports, self.direct, scheduler._queue,
                              scheduler._delivery, throttles=(Throttle(("slow.test",), connections=1, pause=5.0),))
        self.clock.advance(30)
        self.assertEqual(len(self.direct.calls), 1)              # the pause in force stays
        self.clock.advance(30)
        self.assertEqual(len(self.direct.calls), 2)


class ThrottleGaugeTests(unittest.TestCase):
    def test_a_failing_snapshot_costs_the_gauges_not_the_scrape(self):
        metrics = Metrics()

        def broken():
            raise RuntimeError("snapshot exploded")
        metrics.watch_throttles(broken)
        text = generate_latest(metrics.registry).decode()
        self.assertIn("# TYPE mailrelay_throttle_paused gauge", text)
        self.assertIn("mailrelay_queue_messages 0.0", text)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
