"""The delivery scheduler, driven by task.Clock over an in-memory spool and scripted next hops.

Every test reads as the message's life: what the spool holds, what the next hops answer, and what the
scheduler did about it (deliver calls, saved state, DSNs, removal).
"""
from __future__ import annotations

import json
from dataclasses import replace

from twisted.internet import defer
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailrelay.config import DeliveryConfig, Route
from mailrelay.queue.results import RecipientResult
from mailrelay.queue.recovery import StartupScan
from mailrelay.queue.scheduler import ACTIVE_MIN, ACTIVE_PER_SLOT, POLL_INTERVAL, STOP_TIMEOUT
from mailrelay.queue.state import MessageState, RecipientState, StateError
from mailrelay.envelope import Envelope
from mailrelay.interfaces import IScheduler, ISpoolControl
from tests.support.scheduling import (
    NOW, FakeHop, MemoryMessage, MemorySpool, ReporterDown, SchedulerTestCase,
)


# -- in-memory fakes -------------------------------------------------------------------------------

FakeMessage, FakeSpool = MemoryMessage, MemorySpool     # the shared doubles (tests/support/scheduling.py)


class HopExploded(Exception):
    pass


# -- the tests ------------------------------------------------------------------------------------

class DeliveryTests(SchedulerTestCase):
    def test_scheduler_provides_ischeduler(self):
        self.assertTrue(verifyObject(IScheduler, self.make()))

    def test_message_in_the_spool_at_start_is_delivered_and_removed(self):
        self.spool.add("q1", ["a@example.net"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.direct.calls, [("q1", ("a@example.net",))])
        self.assertEqual(self.spool.removed, ["q1"])
        self.assertEqual(self.spool.saves, [])     # all delivered at once: the removal is the record

    def test_state_is_saved_before_removal_when_a_recipient_bounced(self):
        self.spool.add("q1", ["a@example.net", "b@example.net"])
        self.direct.script["b@example.net"] = [(550, "5.1.1")]
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.spool.removed, ["q1"])
        self.assertEqual(self.spool.saves[0][1]["recipients"]["b@example.net"]["done"], "bounced")

    def test_enqueue_tries_a_newly_committed_message(self):
        scheduler = self.make()
        self.spool.add("q1", ["a@example.net"])
        scheduler.enqueue("q1")
        self.clock.advance(0)
        self.assertEqual(self.direct.calls, [("q1", ("a@example.net",))])
        self.assertEqual(self.spool.removed, ["q1"])

    def test_451_then_250_is_retried_after_the_backoff_and_delivered(self):
        self.direct.script = {"a@example.net": [(451, "4.4.1"), (250, "2.0.0")]}
        self.spool.add("q1", ["a@example.net"])
        self.make()
        self.clock.advance(0)
        first = self.spool.recipient_state("q1", "a@example.net")
        self.assertEqual((first.attempts, first.done, first.last_reply.code), (1, None, 451))
        self.assertEqual(first.first_attempt, NOW)
        # downward jitter: the first retry comes in (0.8 * first_retry, first_retry]
        self.assertGreater(first.next_attempt, NOW + 240)
        self.assertLessEqual(first.next_attempt, NOW + 300)
        self.clock.advance(first.next_attempt - NOW - 2)
        self.assertEqual(len(self.direct.calls), 1)
        self.assertEqual(self.spool.removed, [])
        self.clock.advance(2)
        self.assertEqual(len(self.direct.calls), 2)
        self.assertEqual(self.spool.removed, ["q1"])
        self.assertEqual(self.reporter.bounces, [])

    def test_retries_double_up_to_max_retry(self):
        self.direct.script = {"a@example.net": [(451, "4.4.1")]}
        self.spool.add("q1", ["a@example.net"])
        self.make()
        times = []
        for _ in range(6 * 1200):
            if len(self.direct.calls) > len(times):
                times.append(self.clock.seconds())
            self.clock.advance(1)
        gaps = [b - a for a, b in zip(times, times[1:])]
        for gap, base in zip(gaps, [300, 600, 1200, 1200, 1200]):
            self.assertGreater(gap, base * 0.8 - 1)
            self.assertLessEqual(gap, base + 1)

    def test_550_for_one_of_three_recipients_bounces_only_that_one(self):
        self.direct.script = {"b@example.net": [(550, "5.1.1")]}
        self.spool.add("q1", ["a@example.net", "b@example.net", "c@example.com"])
        self.make()
        self.clock.advance(0)
        # one transaction per recipient domain (direct delivery)
        self.assertEqual(sorted(self.direct.calls),
                         [("q1", ("a@example.net", "b@example.net")), ("q1", ("c@example.com",))])
        [(queue_id, results)] = self.reporter.bounces
        self.assertEqual(queue_id, "q1")
        self.assertEqual([(r.recipient, r.code, r.status) for r in results], [("b@example.net", 550, "5.1.1")])
        final = self.spool.saves[-1][1]["recipients"]
        self.assertEqual({r: s["done"] for r, s in final.items()},
                         {"a@example.net": "delivered", "b@example.net": "bounced", "c@example.com": "delivered"})
        self.assertTrue(final["b@example.net"]["reported"])
        self.assertEqual(self.spool.removed, ["q1"])

    def test_message_stays_until_every_recipient_is_done_and_delivered_ones_are_not_retried(self):
        self.direct.script = {"b@example.com": [(421, "4.3.2"), (250, "2.0.0")]}
        self.spool.add("q1", ["a@example.net", "b@example.com"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.spool.removed, [])
        self.assertEqual(self.spool.recipient_state("q1", "a@example.net").done, "delivered")
        self.clock.advance(300)
        self.assertEqual(self.direct.calls[-1], ("q1", ("b@example.com",)))
        self.assertEqual(len(self.direct.calls), 3)
        self.assertEqual(self.spool.removed, ["q1"])

    def test_duplicate_recipient_in_the_envelope_is_delivered_once(self):
        self.spool.add("q1", ["a@example.net", "a@example.net"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.direct.calls, [("q1", ("a@example.net",))])

    def test_state_is_saved_before_the_bounce_and_the_removal(self):
        self.spool.paused_saves = []
        self.direct.script = {"a@example.net": [(550, "5.1.1")]}
        self.spool.add("q1", ["a@example.net"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(len(self.spool.saves), 1)
        self.assertEqual(self.spool.saves[0][1]["recipients"]["a@example.net"]["done"], "bounced")
        self.assertEqual((self.reporter.bounces, self.spool.removed), ([], []))
        self.spool.paused_saves.pop(0).callback(None)
        self.assertEqual(len(self.reporter.bounces), 1)
        self.assertEqual(self.spool.removed, [])   # "reported" must be saved too, before removal
        self.spool.paused_saves.pop(0).callback(None)
        self.assertEqual(self.spool.removed, ["q1"])

    def test_saves_of_one_message_never_overlap_and_the_last_holds_every_result(self):
        self.spool.paused_saves = []
        self.direct.manual = True
        self.spool.add("q1", ["a@example.net", "b@example.com"])
        self.make()
        self.clock.advance(0)
        self.direct.finish_all()
        self.assertEqual(len(self.spool.paused_saves), 1)   # the second waits for the first
        self.spool.paused_saves.pop(0).callback(None)
        self.assertEqual(len(self.spool.paused_saves), 1)
        self.spool.paused_saves.pop(0).callback(None)
        self.assertEqual({r: s["done"] for r, s in self.spool.saves[-1][1]["recipients"].items()},
                         {"a@example.net": "delivered", "b@example.com": "delivered"})
        self.assertEqual(self.spool.removed, ["q1"])

    def test_next_hop_failure_is_retried_not_lost(self):
        self.direct.deliver = lambda message, recipients: defer.fail(HopExploded())
        self.spool.add("q1", ["a@example.net"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.logged_failures(HopExploded), 1)
        state = self.spool.recipient_state("q1", "a@example.net")
        self.assertEqual((state.done, state.last_reply.code, state.last_reply.status), (None, 451, "4.4.0"))
        self.assertEqual(self.spool.removed, [])

    def test_recipient_missing_from_the_results_is_retried(self):
        self.direct.deliver = lambda message, recipients: defer.succeed([])
        self.spool.add("q1", ["a@example.net"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.spool.recipient_state("q1", "a@example.net").last_reply.code, 451)
        self.assertEqual(self.spool.removed, [])

    def test_unreadable_state_leaves_the_message_untouched(self):
        self.spool.add("q1", ["a@example.net"], state={"version": 99})
        self.make()
        self.clock.advance(3600)
        self.assertEqual((self.direct.calls, self.spool.saves, self.spool.removed), ([], [], []))
        self.assertIn("error", self.stages("q1"))

    def test_each_step_is_logged_with_the_queue_id_and_stage(self):
        self.direct.script = {"a@example.net": [(451, "4.4.1"), (250, "2.0.0")]}
        self.spool.add("q1", ["a@example.net"])
        self.make()
        self.clock.advance(0)
        self.clock.advance(300)
        self.assertEqual(self.stages("q1"), ["attempt", "deferred", "attempt", "delivered", "removed"])


class RoutingTests(SchedulerTestCase):
    def test_recipients_of_one_route_go_in_one_transaction(self):
        self.transports["ses"] = FakeHop("ses.example")
        self.router.routes = (Route("ses"),)
        self.spool.add("q1", ["a@example.net", "b@example.com", "c@example.org"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.transports["ses"].calls,
                         [("q1", ("a@example.net", "b@example.com", "c@example.org"))])
        self.assertEqual(self.direct.calls, [])
        self.assertEqual(self.spool.removed, ["q1"])

    def test_after_attempts_route_takes_over_after_failed_direct_attempts(self):
        self.transports["smarthost"] = ses = FakeHop("smarthost.example")
        self.router.routes = (Route("smarthost", after_attempts=2),)
        self.direct.script = {"a@example.net": [(451, "4.4.1")]}
        self.spool.add("q1", ["a@example.net"])
        self.make()
        for _ in range(4):
            self.clock.advance(600)
        self.assertEqual(self.router.calls, [("a@example.net", 0), ("a@example.net", 1), ("a@example.net", 2)])
        self.assertEqual(len(self.direct.calls), 2)
        self.assertEqual(ses.calls, [("q1", ("a@example.net",))])
        self.assertEqual(self.spool.removed, ["q1"])

    def test_route_to_an_unknown_transport_is_a_temporary_failure(self):
        self.router.routes = (Route("missing"),)
        self.spool.add("q1", ["a@example.net"])
        self.make()
        self.clock.advance(0)
        state = self.spool.recipient_state("q1", "a@example.net")
        self.assertEqual((state.done, state.last_reply.code, state.last_reply.status), (None, 451, "4.3.5"))


class ExpiryAndDSNTests(SchedulerTestCase):
    def test_lifetime_expiry_bounces_the_remaining_recipients(self):
        self.direct.script = {"a@example.net": [(451, "4.4.1")]}
        self.spool.add("q1", ["a@example.net", "b@example.com"])
        self.make(lifetime=3600.0)
        for _ in range(40):
            self.clock.advance(100)
        self.assertTrue(self.direct.calls)
        [(queue_id, results)] = self.reporter.bounces
        [result] = results
        self.assertEqual((result.recipient, result.status), ("a@example.net", "4.4.7"))
        self.assertIn("451 4.4.1", result.text)
        self.assertEqual(self.spool.removed, ["q1"])
        self.assertIn("expired", self.stages("q1"))
        # no attempt after the lifetime; the last retry was scheduled no later than the expiry
        final = self.spool.saves[-1][1]["recipients"]
        self.assertEqual((final["a@example.net"]["done"], final["b@example.com"]["done"]), ("expired", "delivered"))
        self.assertLessEqual(max(self.direct.call_times), NOW + 3600)

    def test_message_past_its_lifetime_at_start_expires_without_an_attempt(self):
        self.spool.add("q1", ["a@example.net"], received_at=NOW - 2 * 86400)
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.direct.calls, [])
        [(_, [result])] = self.reporter.bounces
        self.assertEqual(result.status, "4.4.7")
        self.assertEqual(self.spool.removed, ["q1"])

    def test_exactly_one_delay_warning_even_across_a_restart(self):
        self.direct.script = {"a@example.net": [(451, "4.4.1")]}
        self.spool.add("q1", ["a@example.net"])
        first = self.make(delay_warning=1000.0)
        for _ in range(30):
            self.clock.advance(100)
        self.assertEqual(len(self.reporter.delays), 1)
        [(queue_id, [pending])] = self.reporter.delays
        self.assertEqual((queue_id, pending.recipient, pending.code), ("q1", "a@example.net", 451))
        self.assertTrue(self.spool.states["q1"]["delay_warned"])
        self.successResultOf(self.stop(first))
        second = self.make(delay_warning=1000.0)
        self.assertTrue(second.running)
        for _ in range(60):
            self.clock.advance(100)
        self.assertGreater(len(self.direct.calls), 4)
        self.assertEqual(len(self.reporter.delays), 1)

    def test_no_delay_warning_before_delay_warning_has_passed(self):
        self.direct.script = {"a@example.net": [(451, "4.4.1"), (451, "4.4.1"), (250, "2.0.0")]}
        self.spool.add("q1", ["a@example.net"])
        self.make(delay_warning=3600.0)
        for _ in range(20):
            self.clock.advance(100)
        self.assertEqual(self.spool.removed, ["q1"])
        self.assertEqual(self.reporter.delays, [])

    def test_no_dsn_for_the_null_sender(self):
        self.direct.script = {"a@example.net": [(550, "5.1.1")], "b@example.com": [(451, "4.4.1")]}
        self.spool.add("q1", ["a@example.net", "b@example.com"], sender="")
        self.make(delay_warning=200.0, lifetime=1000.0)
        for _ in range(20):
            self.clock.advance(100)
        self.assertEqual((self.reporter.bounces, self.reporter.delays), ([], []))
        self.assertEqual(self.spool.removed, ["q1"])
        self.assertIn("dsn-dropped", self.stages("q1"))

    def test_no_dsn_when_bounces_are_disabled(self):
        self.direct.script = {"a@example.net": [(550, "5.1.1")]}
        self.spool.add("q1", ["a@example.net"])
        self.make(bounces=False)
        self.clock.advance(0)
        self.assertEqual(self.reporter.bounces, [])
        self.assertEqual(self.spool.removed, ["q1"])

    def test_no_reporter_means_no_dsn_and_the_message_still_goes(self):
        self.direct.script = {"a@example.net": [(550, "5.1.1")]}
        self.spool.add("q1", ["a@example.net"])
        self.make(reporter=None)
        self.clock.advance(0)
        self.assertEqual(self.spool.removed, ["q1"])

    def test_failed_bounce_report_is_retried_and_the_message_kept_until_then(self):
        self.reporter.fail_next_bounce = True
        self.direct.script = {"a@example.net": [(550, "5.1.1")]}
        self.spool.add("q1", ["a@example.net"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.logged_failures(ReporterDown), 1)
        self.assertEqual((self.reporter.bounces, self.spool.removed), ([], []))
        self.clock.advance(300)
        self.assertEqual(len(self.reporter.bounces), 1)
        self.assertEqual(self.spool.removed, ["q1"])
        self.assertEqual(len(self.direct.calls), 1)


class ConcurrencyTests(SchedulerTestCase):
    def test_at_most_concurrency_deliveries_in_flight(self):
        self.delivery = DeliveryConfig(concurrency=3, concurrency_per_domain=10)
        self.direct.manual = True
        for n in range(10):
            self.spool.add(f"q{n}", [f"a@d{n}.example"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(len(self.direct.calls), 3)
        self.direct.finish_one()
        self.assertEqual(len(self.direct.calls), 4)   # a slot freed: the next waiting one starts
        while self.direct.pending:
            self.direct.finish_one()
        self.assertEqual(self.direct.max_in_flight, 3)
        self.assertEqual(sorted(self.spool.removed), sorted(f"q{n}" for n in range(10)))
        # FIFO-ish: started in spool order
        self.assertEqual([c[0] for c in self.direct.calls], [f"q{n}" for n in range(10)])

    def test_per_domain_limit_does_not_block_other_domains(self):
        self.delivery = DeliveryConfig(concurrency=10, concurrency_per_domain=2)
        self.direct.manual = True
        for n in range(5):
            self.spool.add(f"busy{n}", [f"u{n}@busy.example"])
        self.spool.add("other", ["x@other.example"])
        self.make()
        self.clock.advance(0)
        self.assertEqual([c[0] for c in self.direct.calls], ["busy0", "busy1", "other"])
        while self.direct.pending:
            self.direct.finish_one()
        self.assertEqual(self.direct.max_in_flight_per_domain, 2)
        self.assertEqual(len(self.spool.removed), 6)

    def test_per_transport_limit_for_routed_deliveries(self):
        self.delivery = DeliveryConfig(concurrency=10, concurrency_per_domain=2)
        self.transports["ses"] = ses = FakeHop("ses.example", manual=True)
        self.router.routes = (Route("ses"),)
        for n in range(5):
            self.spool.add(f"q{n}", [f"a@d{n}.example"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(len(ses.calls), 2)
        while ses.pending:
            ses.finish_one()
        self.assertEqual(ses.max_in_flight, 2)
        self.assertEqual(len(self.spool.removed), 5)

    def test_synchronous_next_hops_do_not_recurse_per_message(self):
        for n in range(2000):
            self.spool.add(f"q{n}", [f"a@d{n % 7}.example"])
        self.delivery = DeliveryConfig(concurrency=1, concurrency_per_domain=1)
        self.make()
        self.clock.advance(0)
        self.assertEqual(len(self.spool.removed), 2000)


class ControlTests(SchedulerTestCase):
    def test_held_message_is_never_tried_until_released(self):
        self.spool.add("q1", ["a@example.net"], held=True)
        self.make()
        self.clock.advance(3600)
        self.assertEqual(self.direct.calls, [])
        self.spool.requests.append(("release", "q1"))
        self.clock.advance(POLL_INTERVAL)
        self.clock.advance(0)
        self.assertEqual(self.direct.calls, [("q1", ("a@example.net",))])
        self.assertEqual(self.spool.removed, ["q1"])

    def test_hold_request_stops_retries_until_release(self):
        self.direct.script = {"a@example.net": [(451, "4.4.1"), (250, "2.0.0")]}
        self.spool.add("q1", ["a@example.net"])
        self.make()
        self.clock.advance(0)
        self.spool.requests.append(("hold", "q1"))
        self.clock.advance(POLL_INTERVAL)
        self.assertIn("q1", self.spool.held)
        self.clock.advance(7200)
        self.assertEqual(len(self.direct.calls), 1)
        self.spool.requests.append(("release", "q1"))
        self.clock.advance(POLL_INTERVAL)
        self.clock.advance(0)
        self.assertEqual(len(self.direct.calls), 2)
        self.assertEqual(self.spool.removed, ["q1"])

    def test_hold_while_in_flight_is_not_rescheduled(self):
        self.direct.manual = True
        self.direct.script = {"a@example.net": [(451, "4.4.1")]}
        self.spool.add("q1", ["a@example.net"])
        self.make()
        self.clock.advance(0)
        self.spool.requests.append(("hold", "q1"))
        self.clock.advance(POLL_INTERVAL)
        self.direct.finish_all()
        self.clock.advance(7200)
        self.assertEqual(len(self.direct.calls), 1)
        self.assertEqual(self.spool.recipient_state("q1", "a@example.net").attempts, 1)

    def test_flush_request_makes_deferred_messages_due_now(self):
        self.direct.script = {"a@example.net": [(451, "4.4.1"), (250, "2.0.0")]}
        self.spool.add("q1", ["a@example.net"])
        self.make()
        self.clock.advance(0)
        self.spool.requests.append(("flush", None))
        self.clock.advance(POLL_INTERVAL)
        self.clock.advance(0)
        self.assertEqual(len(self.direct.calls), 2)
        self.assertEqual(self.spool.removed, ["q1"])

    def test_delete_request_removes_without_dsn(self):
        self.direct.script = {"a@example.net": [(451, "4.4.1")]}
        self.spool.add("q1", ["a@example.net"])
        self.make()
        self.clock.advance(0)
        self.spool.requests.append(("delete", "q1"))
        self.clock.advance(POLL_INTERVAL)
        self.assertEqual(self.spool.removed, ["q1"])
        self.clock.advance(7200)
        self.assertEqual(len(self.direct.calls), 1)
        self.assertEqual(self.reporter.bounces, [])

    def test_delete_request_while_in_flight_waits_for_the_delivery(self):
        self.direct.manual = True
        self.spool.add("q1", ["a@example.net"])
        self.make()
        self.clock.advance(0)
        self.spool.requests.append(("delete", "q1"))
        self.clock.advance(POLL_INTERVAL)
        self.assertEqual(self.spool.removed, [])
        self.direct.finish_all()
        self.assertEqual(self.spool.removed, ["q1"])
        self.assertEqual(self.reporter.bounces, [])

    def test_bounce_request_bounces_pending_recipients_with_a_dsn(self):
        self.direct.script = {"a@example.net": [(451, "4.4.1")]}
        self.spool.add("q1", ["a@example.net"])
        self.make()
        self.clock.advance(0)
        self.spool.requests.append(("bounce", "q1"))
        self.clock.advance(POLL_INTERVAL)
        [(queue_id, [result])] = self.reporter.bounces
        self.assertEqual((queue_id, result.recipient, result.code, result.status),
                         ("q1", "a@example.net", 554, "5.0.0"))
        self.assertEqual(self.spool.removed, ["q1"])

    def test_unknown_or_incomplete_requests_are_ignored(self):
        self.spool.add("q1", ["a@example.net"], held=True)
        self.make()
        self.spool.requests.extend([("explode", "q1"), ("delete", None), ("release", "nosuch")])
        self.clock.advance(POLL_INTERVAL)
        self.assertEqual(self.logged_failures(KeyError), 1)   # "nosuch" is not in the spool
        self.assertEqual(self.spool.removed, [])
        self.assertIn("q1", self.spool.envelopes)


class SuspendTests(SchedulerTestCase):
    """suspend/resume: every delivery stopped for a drain (`mailrelay queue transfer --hold`)."""

    def test_spools_provide_the_control_interface(self):
        self.assertTrue(verifyObject(ISpoolControl, self.spool))

    def test_suspend_stops_every_delivery_and_new_mail_waits_until_resume(self):
        self.direct.script = {"a@example.net": [(451, "4.4.1"), (250, "2.0.0")]}
        self.spool.add("q1", ["a@example.net"])
        scheduler = self.make()
        self.clock.advance(0)
        self.spool.requests.append(("suspend", None))
        self.clock.advance(POLL_INTERVAL)
        self.assertEqual(self.spool.suspended["idle"], True)
        self.assertEqual(self.spool.suspended["in_flight"], 0)
        self.spool.add("q2", ["b@example.net"])
        scheduler.enqueue("q2")                        # accepted while suspended: spooled, not tried
        self.clock.advance(7200)
        self.assertEqual(self.direct.calls, [("q1", ("a@example.net",))])
        self.assertIn("q2", self.spool.forgotten)      # its copy in memory dropped: the files are the truth
        self.spool.requests.append(("resume", None))
        self.clock.advance(POLL_INTERVAL)
        self.clock.advance(0)
        self.assertIsNone(self.spool.suspended)
        self.assertEqual(sorted(self.spool.removed), ["q1", "q2"])

    def test_suspension_is_idle_only_once_the_delivery_in_flight_has_ended(self):
        self.direct.manual = True
        self.spool.add("q1", ["a@example.net"])
        self.make()
        self.clock.advance(0)
        self.spool.requests.append(("suspend", None))
        self.clock.advance(POLL_INTERVAL)
        self.assertEqual((self.spool.suspended["idle"], self.spool.suspended["in_flight"]), (False, 1))
        self.direct.finish_all()
        self.clock.advance(POLL_INTERVAL)
        self.assertEqual((self.spool.suspended["idle"], self.spool.suspended["in_flight"]), (True, 0))
        self.assertEqual(self.spool.removed, ["q1"])

    def test_message_removed_by_another_process_while_suspended_is_not_tried_after_resume(self):
        self.spool.add("q1", ["a@example.net"])
        self.spool.suspended = {"since": NOW, "in_flight": 0, "idle": True}    # persisted by a drain
        self.make()
        self.clock.advance(3600)
        self.assertEqual(self.direct.calls, [])        # started suspended: stays so
        self.spool.remove("q1")                        # the transfer took it
        self.spool.requests.append(("resume", None))
        self.clock.advance(POLL_INTERVAL)
        self.clock.advance(0)
        self.assertEqual(self.direct.calls, [])

    def test_held_messages_stay_held_across_suspend_and_resume(self):
        self.spool.add("q1", ["a@example.net"], held=True)
        self.make()
        self.spool.requests.extend([("suspend", None), ("resume", None)])
        self.clock.advance(POLL_INTERVAL)
        self.clock.advance(3600)
        self.assertEqual(self.direct.calls, [])


class DepthTests(SchedulerTestCase):
    """A deep queue: a flush or a restart takes messages into work in bounded steps, never all at once."""

    def fill(self, count: int, state=None) -> list[str]:
        ids = [f"q{n:05d}" for n in range(count)]
        for queue_id in ids:
            self.spool.add(queue_id, [f"user@{queue_id}.example"], state=state)
        return ids

    def test_restart_scans_a_deep_spool_in_steps_reading_state_files_only(self):
        later = {"version": 1, "recipients": {"x": {"attempts": 1, "next_attempt": NOW + 3600}}}
        self.fill(1200, state=later)
        loads = []
        self.patch(self.spool, "load", lambda q, load=self.spool.load: loads.append(q) or load(q))
        steps: list[int] = []
        step = StartupScan.step

        def counted(scan):
            before = len(scan._timetable)
            step(scan)
            steps.append(len(scan._timetable) - before)
        self.patch(StartupScan, "step", counted)
        self.make()
        self.assertEqual(loads, [])                       # nothing opened to schedule it
        self.clock.advance(0)
        self.assertEqual(steps, [500, 500, 200])          # one reactor turn each
        self.assertTrue(any(e.get("stage") == "recovered" for e in self.events))
        self.assertEqual(loads, [])
        self.assertEqual(len(self.direct.calls), 0)
        self.clock.advance(3600)
        for _ in range(20):
            self.clock.advance(0)
        self.assertEqual(len(self.direct.calls), 1200)

    def test_a_deep_queue_all_due_at_once_is_taken_into_work_a_bounded_number_at_a_time(self):
        self.direct.manual = True
        ids = self.fill(3000)
        scheduler = self.make()
        in_work = []
        for _ in range(40):
            self.clock.advance(0)
            in_work.append(len(scheduler._work.attempts))
        limit = max(ACTIVE_MIN, ACTIVE_PER_SLOT * self.delivery.concurrency)
        self.assertEqual(max(in_work), limit)             # bounded by the active set, not the depth
        self.assertEqual(len(self.direct.calls), self.delivery.concurrency)
        while self.direct.pending:
            self.direct.finish_all()
            for _ in range(5):
                self.clock.advance(0)
        self.assertEqual(sorted(self.spool.removed), ids)


class RecoveryAndShutdownTests(SchedulerTestCase):
    def test_start_schedules_each_message_by_its_persisted_state(self):
        saved = MessageState((
            RecipientState("a@example.net", attempts=1, first_attempt=NOW - 600, done="delivered"),
            RecipientState("b@example.com", attempts=2, first_attempt=NOW - 600, next_attempt=NOW + 1000),
        )).to_dict()
        self.spool.add("old", ["a@example.net", "b@example.com"], received_at=NOW - 600, state=saved)
        self.spool.add("new", ["c@example.org"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.direct.calls, [("new", ("c@example.org",))])
        self.clock.advance(999)
        self.assertEqual(len(self.direct.calls), 1)
        self.clock.advance(1)
        self.assertEqual(self.direct.calls[-1], ("old", ("b@example.com",)))
        self.assertIn(("b@example.com", 2), self.router.calls)
        self.assertEqual(sorted(self.spool.removed), ["new", "old"])

    def test_start_reports_a_bounce_saved_but_not_yet_reported(self):
        saved = MessageState((RecipientState("a@example.net", attempts=1, done="bounced"),)).to_dict()
        self.spool.add("q1", ["a@example.net"], state=saved)
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.direct.calls, [])
        self.assertEqual(len(self.reporter.bounces), 1)
        self.assertEqual(self.spool.removed, ["q1"])

    def test_stop_waits_for_deliveries_in_flight(self):
        self.direct.manual = True
        self.spool.add("q1", ["a@example.net"])
        scheduler = self.make()
        self.clock.advance(0)
        stopped = scheduler.stopService()
        self.assertNoResult(stopped)
        self.direct.finish_all()
        self.successResultOf(stopped)
        self.assertEqual(self.spool.removed, ["q1"])

    def test_stop_gives_up_waiting_after_its_bound(self):
        self.direct.manual = True
        self.spool.add("q1", ["a@example.net"])
        scheduler = self.make()
        self.clock.advance(0)
        stopped = scheduler.stopService()
        self.clock.advance(STOP_TIMEOUT - 1)
        self.assertNoResult(stopped)
        self.clock.advance(1)
        self.successResultOf(stopped)
        self.direct.finish_all()   # a late answer is still saved
        self.assertEqual(self.spool.removed, ["q1"])

    def test_no_new_attempts_start_after_stop(self):
        self.delivery = DeliveryConfig(concurrency=1, concurrency_per_domain=1)
        self.direct.manual = True
        self.direct.script = {"a@example.net": [(451, "4.4.1")]}
        self.spool.add("q1", ["a@example.net"])
        self.spool.add("q2", ["b@example.net"])
        scheduler = self.make()
        self.clock.advance(0)
        stopped = scheduler.stopService()
        self.direct.finish_all()
        self.successResultOf(stopped)
        self.clock.advance(7200)
        self.assertEqual(self.direct.calls, [("q1", ("a@example.net",))])
        self.assertNotIn("q2", self.spool.states)   # never tried: still due now at the next start

    def test_stop_with_nothing_in_flight_is_immediate(self):
        scheduler = self.make()
        self.successResultOf(scheduler.stopService())


class StateTests(unittest.TestCase):
    def test_state_round_trips_through_json(self):
        state = MessageState((RecipientState("a@example.net"),), delay_warned=True)
        result = RecipientResult("a@example.net", 451, "4.4.1", "try later", "mx.example.net")
        state = state.with_recipient(state.get("a@example.net").recorded(result, NOW, NOW + 300))
        data = json.loads(json.dumps(state.to_dict()))
        self.assertEqual(data["version"], 1)
        self.assertEqual(MessageState.from_dict(data, ["a@example.net"]), state)

    def test_empty_state_starts_every_recipient_fresh(self):
        state = MessageState.from_dict({}, ["a@example.net", "b@example.com"])
        self.assertEqual([(r.recipient, r.attempts, r.next_attempt, r.done) for r in state.recipients],
                         [("a@example.net", 0, 0.0, None), ("b@example.com", 0, 0.0, None)])

    def test_unknown_version_or_corrupt_state_is_refused(self):
        self.assertRaises(StateError, MessageState.from_dict, {"version": 2}, ["a@example.net"])
        self.assertRaises(StateError, MessageState.from_dict,
                          {"version": 1, "recipients": {"a@example.net": {"attempts": "many"}}}, ["a@example.net"])
        self.assertRaises(StateError, MessageState.from_dict,
                          {"version": 1, "recipients": {"a@example.net": {"done": "eaten"}}}, ["a@example.net"])

    def test_unexpected_reply_codes_are_retried(self):
        result = RecipientResult("a@example.net", 354, "", "odd", "mx")
        after = RecipientState("a@example.net").recorded(result, NOW, NOW + 300)
        self.assertEqual((after.done, after.next_attempt), (None, NOW + 300))


class NotifyTests(SchedulerTestCase):
    """RFC 3461 NOTIFY as the scheduler honours it (the requests as mailrelay/dsnparams.py keeps them)."""

    def add(self, recipients, notify: dict):
        self.spool.add("q1", recipients)
        envelope = self.spool.envelopes["q1"]
        self.spool.envelopes["q1"] = Envelope(envelope.sender, envelope.recipients, envelope.received_at,
                                              params={"RCPT": {r: {"NOTIFY": n} for r, n in notify.items()}})

    def test_success_to_a_hop_without_dsn_is_reported_relayed_after_a_save(self):
        self.add(["a@example.net", "b@example.net"], {"a@example.net": "SUCCESS"})
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.reporter.successes, [("q1", ["a@example.net"], "relayed")])
        self.assertEqual(self.spool.saves[0][1]["recipients"]["a@example.net"]["dsn"], "relayed")
        self.assertEqual(self.spool.removed, ["q1"])

    def test_success_to_a_hop_with_dsn_is_its_own_business(self):
        self.add(["a@example.net"], {"a@example.net": "SUCCESS"})
        answer = self.direct._answer
        self.direct._answer = lambda r: replace(answer(r), dsn_passed=True)
        self.make()
        self.clock.advance(0)
        self.assertEqual((self.reporter.successes, self.spool.saves, self.spool.removed), ([], [], ["q1"]))

    def test_never_and_delay_alone_get_no_failure_report(self):
        self.add(["a@example.net", "b@example.net", "c@example.net"],
                 {"a@example.net": "NEVER", "b@example.net": "DELAY"})
        for r in ("a@example.net", "b@example.net", "c@example.net"):
            self.direct.script[r] = [(550, "5.1.1")]
        self.make()
        self.clock.advance(0)
        self.assertEqual([[r.recipient for r in rs] for _, rs in self.reporter.bounces], [["c@example.net"]])
        self.assertEqual(self.spool.removed, ["q1"])

    def test_a_failed_success_report_is_asked_again_without_repeating_the_bounce(self):
        self.add(["a@example.net", "b@example.net"], {"a@example.net": "SUCCESS"})
        self.direct.script["b@example.net"] = [(550, "5.1.1")]
        self.reporter.fail_next_success = True
        self.make()
        self.clock.advance(0)
        self.assertEqual(len(self.reporter.bounces), 1)
        self.assertEqual((self.reporter.successes, self.spool.removed), ([], []))
        self.clock.advance(self.queue.max_retry)
        self.assertEqual(len(self.reporter.bounces), 1)                   # never twice
        self.assertEqual(self.reporter.successes, [("q1", ["a@example.net"], "relayed")])
        self.assertEqual(self.spool.removed, ["q1"])

    def test_a_due_success_report_is_sent_after_a_restart(self):
        self.add(["a@example.net"], {"a@example.net": "SUCCESS"})
        self.spool.states["q1"] = MessageState((RecipientState("a@example.net", attempts=1, done="delivered",
                                                               dsn="relayed"),)).to_dict()
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.direct.calls, [])                          # never sent again
        self.assertEqual(self.reporter.successes, [("q1", ["a@example.net"], "relayed")])
        self.assertEqual(self.spool.removed, ["q1"])
