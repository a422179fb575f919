"""Connection reuse: messages waiting for the same next hop go over one connection.

Three layers: the batching arithmetic (queue.batch); the scheduler over task.Clock with scripted
hops (one slot per batch, per-message outcomes, fallbacks); and a real spool, a real smarthost
transport and a real SMTP sink on loopback, where the sink's recorded sessions show how many
connections carried the messages — including refusals in the middle of a batch and a connection
dropped part-way through one.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from twisted.internet import defer, reactor
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay import config
from mailrelay.config import DeliveryConfig, QueueConfig, Route
from mailrelay.queue.batch import MAX_BATCH, batch_size, can_batch, take_batch
from mailrelay.queue.job import Job
from mailrelay.queue.results import RecipientResult
from mailrelay.queue.routes import Router
from mailrelay.queue.scheduler import Scheduler
from mailrelay.outbound.smarthost import SmarthostTransport
from mailrelay.queue.state import MessageState
from mailrelay.outbound.signing import DKIMHop
from mailrelay.envelope import Envelope
from mailrelay.interfaces import IBatchNextHop, ISpooledMessage
from mailrelay.spool.store import Spool
from tests.support.relay import SEPARATE, RelayFixture, free_port
from tests.support.sink import Sink
from tests.support.polling import until
from tests.support.scheduling import FakeHop, RecordingReporter, SchedulerTestCase


# -- the arithmetic -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Waiting:
    name: str
    hop: object


@implementer(IBatchNextHop)
class BatchHopMarker:
    def deliver(self, message, recipients):
        raise NotImplementedError

    def deliver_batch(self, jobs, on_settled=None):
        raise NotImplementedError


class BatchArithmeticTests(unittest.TestCase):
    def test_one_free_slot_takes_everything_up_to_the_bound(self):
        self.assertEqual(batch_size(20, 1), 20)
        self.assertEqual(batch_size(500, 1), MAX_BATCH)

    def test_waiting_deliveries_are_spread_over_the_free_slots(self):
        self.assertEqual(batch_size(20, 4), 5)
        self.assertEqual(batch_size(21, 4), 6)
        self.assertEqual(batch_size(3, 10), 1)

    def test_nothing_waiting_means_an_empty_batch(self):
        self.assertEqual(batch_size(0, 3), 0)

    def test_batch_takes_only_jobs_for_the_same_hop_object_and_keeps_the_others_in_order(self):
        old, new = BatchHopMarker(), BatchHopMarker()
        waiting = deque([Waiting("a", new), Waiting("b", old), Waiting("c", new), Waiting("d", old),
                         Waiting("e", new), Waiting("f", new)])
        taken = take_batch(waiting, 3, lambda job: job.hop)
        self.assertEqual([j.name for j in taken], ["a", "c", "e"])
        self.assertEqual([j.name for j in waiting], ["b", "d", "f"])

    def test_a_hop_without_deliver_batch_always_gets_one_message(self):
        hop = FakeHop()
        self.assertFalse(can_batch(hop))
        waiting = deque([Waiting("a", hop), Waiting("b", hop)])
        self.assertEqual([j.name for j in take_batch(waiting, 2, lambda job: job.hop)], ["a"])
        self.assertEqual(len(waiting), 1)


# -- the scheduler, over task.Clock -----------------------------------------------------------------

@implementer(IBatchNextHop)
class FakeBatchHop(FakeHop):
    """FakeHop that also takes batches; `batches` records the queue ids of each deliver_batch call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[list[str]] = []
        self.pending_batches: list[tuple[defer.Deferred, list]] = []
        self.batches_in_flight = self.max_batches_in_flight = 0
        self.explode = False
        self.short_answer = False

    def deliver_batch(self, jobs, on_settled=None):
        self.batches.append([job.message.queue_id for job in jobs])
        if self.explode:
            raise RuntimeError("the hop blew up")
        results = [[self._answer(r) for r in job.recipients] for job in jobs]
        if self.short_answer:
            results = results[:1]
        if not self.manual:
            return defer.succeed(results)
        self.batches_in_flight += 1
        self.max_batches_in_flight = max(self.max_batches_in_flight, self.batches_in_flight)
        d = defer.Deferred()
        self.pending_batches.append((d, results))
        return d

    def finish_batch(self):
        d, results = self.pending_batches.pop(0)
        self.batches_in_flight -= 1
        d.callback(results)


class SchedulerBatchingTests(SchedulerTestCase):
    def setUp(self):
        super().setUp()
        self.direct = FakeBatchHop(clock=self.clock)
        self.delivery = DeliveryConfig(concurrency=10, concurrency_per_domain=1)   # one connection each

    def test_messages_due_together_for_one_domain_go_in_one_batch(self):
        for n in range(20):
            self.spool.add(f"q{n:02d}", [f"u{n}@example.net"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.direct.batches, [[f"q{n:02d}" for n in range(20)]])
        self.assertEqual(self.direct.calls, [])
        self.assertEqual(sorted(self.spool.removed), [f"q{n:02d}" for n in range(20)])

    def test_enqueued_in_one_turn_they_share_the_connection(self):
        scheduler = self.make()
        for n in range(5):
            self.spool.add(f"q{n}", [f"u{n}@example.net"])
            scheduler.enqueue(f"q{n}")
        self.clock.advance(0)
        self.assertEqual(self.direct.batches, [["q0", "q1", "q2", "q3", "q4"]])

    def test_different_domains_never_share_a_batch(self):
        for n in range(4):
            self.spool.add(f"q{n}", [f"u{n}@d{n % 2}.example"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(sorted(self.direct.batches), [["q0", "q2"], ["q1", "q3"]])

    def test_a_free_slot_per_message_means_no_batching(self):
        self.delivery = DeliveryConfig(concurrency=10, concurrency_per_domain=5)
        for n in range(3):
            self.spool.add(f"q{n}", [f"u{n}@example.net"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.direct.batches, [])
        self.assertEqual([c[0] for c in self.direct.calls], ["q0", "q1", "q2"])

    def test_one_batch_is_one_connection_slot(self):
        self.delivery = DeliveryConfig(concurrency=10, concurrency_per_domain=2)
        self.direct.manual = True
        for n in range(8):
            self.spool.add(f"q{n}", [f"u{n}@example.net"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.direct.batches, [["q0", "q1", "q2", "q3"], ["q4", "q5", "q6", "q7"]])
        self.assertEqual(self.direct.max_batches_in_flight, 2)
        self.direct.finish_batch()
        self.direct.finish_batch()
        self.assertEqual(len(self.spool.removed), 8)

    def test_messages_arriving_while_the_slot_is_busy_form_the_next_batch(self):
        self.direct.manual = True
        self.spool.add("first", ["a@example.net"])
        scheduler = self.make()
        self.clock.advance(0)
        self.assertEqual(self.direct.calls, [("first", ("a@example.net",))])   # alone: deliver()
        for n in range(3):
            self.spool.add(f"late{n}", [f"u{n}@example.net"])
            scheduler.enqueue(f"late{n}")
        self.clock.advance(0)
        self.assertEqual(self.direct.batches, [])          # the domain's one slot is taken
        self.direct.finish_one()
        self.assertEqual(self.direct.batches, [["late0", "late1", "late2"]])

    def test_each_message_in_a_batch_keeps_its_own_outcome(self):
        self.direct.script = {"bad@example.net": [(550, "5.1.1")], "later@example.net": [(451, "4.2.0")]}
        self.spool.add("ok", ["a@example.net"])
        self.spool.add("mixed", ["b@example.net", "bad@example.net"])
        self.spool.add("retry", ["later@example.net"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.direct.batches, [["ok", "mixed", "retry"]])
        self.assertEqual(sorted(self.spool.removed), ["mixed", "ok"])
        self.assertEqual(self.spool.recipient_state("retry", "later@example.net").attempts, 1)
        self.assertEqual([(q, [r.recipient for r in rs]) for q, rs in self.reporter.bounces],
                         [("mixed", ["bad@example.net"])])

    def test_a_hop_that_fails_a_batch_has_every_message_retried(self):
        self.direct.explode = True
        self.spool.add("q1", ["a@example.net"])
        self.spool.add("q2", ["b@example.net"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.logged_failures(RuntimeError), 1)
        for queue_id, rcpt in (("q1", "a@example.net"), ("q2", "b@example.net")):
            state = self.spool.recipient_state(queue_id, rcpt)
            self.assertEqual((state.attempts, state.done, state.last_reply.status), (1, None, "4.4.0"))
        self.assertEqual(self.spool.removed, [])

    def test_messages_the_hop_gave_no_result_for_are_retried(self):
        self.direct.short_answer = True
        self.spool.add("q1", ["a@example.net"])
        self.spool.add("q2", ["b@example.net"])
        self.make()
        self.clock.advance(0)
        self.assertEqual(self.spool.removed, ["q1"])
        self.assertEqual(self.spool.recipient_state("q2", "b@example.net").last_reply.status, "4.4.0")

    def test_a_hop_without_deliver_batch_gets_one_deliver_per_message(self):
        self.direct = FakeHop(clock=self.clock)
        for n in range(3):
            self.spool.add(f"q{n}", [f"u{n}@example.net"])
        self.make()
        self.clock.advance(0)
        self.assertEqual([c[0] for c in self.direct.calls], ["q0", "q1", "q2"])


# -- DKIM in front of a batching hop ---------------------------------------------------------------

class FakeSigner:
    def sign(self, f, permitted=None):
        data = f.read()
        if b"unsignable" in data:
            raise ValueError("no key for this one")
        return b"DKIM-Signature: v=1; fake\r\n"


@implementer(ISpooledMessage)
@dataclass
class BodyMessage:
    queue_id: str
    body: bytes
    envelope: Envelope = Envelope("a@example.org", ("b@example.net",), 0.0)
    path = None           # not read from a spool file

    @property
    def size(self) -> int:
        return len(self.body)

    def open(self):
        import io
        return io.BytesIO(self.body)


@implementer(IBatchNextHop)
class RecordingBatchHop:
    def __init__(self):
        self.batches: list[list[bytes]] = []

    def deliver(self, message, recipients):
        raise AssertionError("a batch must not be split into deliver() calls")

    def deliver_batch(self, jobs, on_settled=None):
        self.batches.append([job.message.open().read() for job in jobs])
        return defer.succeed([[RecipientResult(r, 250, "2.0.0", "ok") for r in job.recipients] for job in jobs])


class DKIMBatchTests(unittest.TestCase):
    def test_dkim_hop_batches_only_when_the_inner_hop_does(self):
        self.assertTrue(IBatchNextHop.providedBy(DKIMHop(RecordingBatchHop(), signer=FakeSigner())))
        self.assertFalse(IBatchNextHop.providedBy(DKIMHop(FakeHop(), signer=FakeSigner())))
        verifyObject(IBatchNextHop, DKIMHop(RecordingBatchHop(), signer=FakeSigner()))

    @defer.inlineCallbacks
    def test_each_message_is_signed_and_the_batch_goes_in_one_call(self):
        inner = RecordingBatchHop()
        hop = DKIMHop(inner, signer=FakeSigner(), reactor=reactor)
        jobs = [Job(BodyMessage(f"q{n}", b"Subject: %d\r\n\r\nbody\r\n" % n), ("b@example.net",)) for n in range(3)]
        results = yield hop.deliver_batch(jobs)
        self.assertEqual(len(inner.batches), 1)
        self.assertEqual(len(inner.batches[0]), 3)
        for n, sent in enumerate(inner.batches[0]):
            self.assertTrue(sent.startswith(b"DKIM-Signature: v=1; fake\r\nSubject: %d\r\n" % n))
        self.assertEqual([[r.code for r in rs] for rs in results], [[250]] * 3)

    @defer.inlineCallbacks
    def test_a_message_that_cannot_be_signed_is_kept_back_and_the_others_go(self):
        inner = RecordingBatchHop()
        hop = DKIMHop(inner, signer=FakeSigner(), reactor=reactor)
        jobs = [Job(BodyMessage("q0", b"Subject: 0\r\n\r\nfine\r\n"), ("b@example.net",)),
                Job(BodyMessage("q1", b"Subject: 1\r\n\r\nunsignable\r\n"), ("c@example.net",)),
                Job(BodyMessage("q2", b"Subject: 2\r\n\r\nfine\r\n"), ("d@example.net",))]
        results = yield hop.deliver_batch(jobs)
        self.assertEqual(len(inner.batches[0]), 2)
        self.assertEqual([[(r.recipient, r.code, r.status) for r in rs] for rs in results], [
            [("b@example.net", 250, "2.0.0")], [("c@example.net", 451, "4.3.0")], [("d@example.net", 250, "2.0.0")]])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


# -- a real spool, a real transport, a real sink ------------------------------------------------------


def body(n: int, lines: int = 3) -> bytes:
    text = b"".join(b"line %d of message %d\r\n" % (i, n) for i in range(lines))
    return b"Subject: reuse %d\r\nMessage-ID: <reuse-%d@example.org>\r\n\r\n" % (n, n) + text


def number_of(data: bytes) -> int:
    start = data.index(b"<reuse-") + 7
    return int(data[start:data.index(b"@", start)])


class RealSinkTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.sink = Sink()
        port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        self.spool = Spool(self.mktemp(), reactor=reactor)
        self.spool.startService()
        self.addCleanup(self.spool.stopService)
        self.reporter = RecordingReporter()
        self.transport = SmarthostTransport(config.Transport("sink", "127.0.0.1", port, security="none", verify=False),
                                            "relay.test", reactor=reactor)

    def scheduler(self, per_domain: int = 1) -> Scheduler:
        scheduler = Scheduler(self.spool, Router((Route("sink"),)), {"sink": self.transport}, direct=None,
                              queue=QueueConfig(first_retry=3600.0, max_retry=3600.0, delay_warning=0.0),
                              delivery=DeliveryConfig(concurrency=10, concurrency_per_domain=per_domain),
                              reporter=self.reporter, clock=reactor)
        self.addCleanup(lambda: scheduler.running and scheduler.stopService())
        return scheduler

    @defer.inlineCallbacks
    def queue(self, recipients: list[tuple[str, ...]], bodies=None) -> list[str]:
        ids = []
        for n, rcpts in enumerate(recipients):
            writer = self.spool.new_message(Envelope("app@example.org", rcpts, time.time()))
            writer.write(bodies[n] if bodies else body(n))
            ids.append((yield writer.commit()))
        return ids

    def state(self, queue_id: str) -> MessageState:
        message = self.spool.load(queue_id)
        return MessageState.from_dict(message.state, message.envelope.recipients)

    def settled(self, left: list[str]):
        """True once exactly `left` remain in the spool, each with its first attempt recorded."""
        return lambda: self.spool.queue_ids() == left and all(self.state(q).recipients[0].attempts for q in left)

    @defer.inlineCallbacks
    def test_twenty_queued_messages_go_over_one_connection(self):
        ids = yield self.queue([(f"user{n}@example.com",) for n in range(20)])
        self.scheduler(per_domain=1).startService()
        yield self.sink.wait_for(20)
        yield until(lambda: not self.spool.queue_ids(), "the spool to empty")
        self.assertEqual(len(self.sink.sessions), 1)
        self.assertEqual(sorted(number_of(m.data) for m in self.sink.messages), list(range(20)))
        self.assertEqual([m.rcpt_tos for m in self.sink.messages], [[f"user{n}@example.com"] for n in range(20)])
        self.assertEqual(len(ids), 20)

    @defer.inlineCallbacks
    def test_twenty_messages_enqueued_in_one_turn_are_spread_over_the_domain_slots(self):
        scheduler = self.scheduler(per_domain=4)
        scheduler.startService()
        ids = yield self.queue([(f"user{n}@example.com",) for n in range(20)])
        for queue_id in ids:
            scheduler.enqueue(queue_id)
        yield self.sink.wait_for(20)
        self.assertEqual(len(self.sink.sessions), 4)
        mails_per_session = [sum(1 for _, line in s.commands if line.startswith(b"MAIL FROM"))
                             for s in self.sink.sessions]
        self.assertEqual(mails_per_session, [5, 5, 5, 5])

    @defer.inlineCallbacks
    def test_refusals_in_the_middle_of_a_batch_settle_only_their_own_message(self):
        recipients = [(f"user{n}@example.com",) for n in range(10)]
        recipients[3] = ("user3@example.com", "gone@example.com")     # one RCPT refused for good
        recipients[5] = ("full@example.com",)                         # RCPT refused for now: no DATA
        self.sink.rcpt_replies = {"gone@example.com": "550 5.1.1 no such user",
                                  "full@example.com": "452 4.2.2 mailbox full"}
        # end-of-data replies in DATA order: messages 0-4, 6 accepted, then 7 refused for good
        self.sink.data_replies = ["250 2.0.0 ok"] * 6 + ["554 5.6.0 content refused"]
        ids = yield self.queue(recipients)
        self.scheduler(per_domain=1).startService()
        yield until(self.settled([ids[5]]), "all but the 452 to be settled")
        self.assertEqual(len(self.sink.sessions), 1)
        self.assertEqual(sorted(number_of(m.data) for m in self.sink.messages), [0, 1, 2, 3, 4, 6, 8, 9])
        self.assertEqual(sorted(self.reporter.bounces), sorted([
            (ids[3], [("gone@example.com", 550)]), (ids[7], [("user7@example.com", 554)])]))
        full = self.state(ids[5]).get("full@example.com")
        self.assertEqual((full.attempts, full.done, full.last_reply.code), (1, None, 452))

    @defer.inlineCallbacks
    def test_connection_dropped_mid_batch_retries_the_unsent_messages(self):
        bodies = [body(n, lines=40 if n == 2 else 3) for n in range(6)]
        self.sink.drop_in_data = 20          # message 2 is long enough to be cut off in its DATA
        ids = yield self.queue([(f"user{n}@example.com",) for n in range(6)], bodies)
        scheduler = self.scheduler(per_domain=1)
        scheduler.startService()
        yield until(self.settled(ids[2:]), "the first attempt to be recorded")
        self.assertEqual(len(self.sink.sessions), 1)
        self.assertEqual(sorted(number_of(m.data) for m in self.sink.messages), [0, 1])
        self.assertEqual(self.spool.queue_ids(), ids[2:])
        for queue_id in ids[2:]:
            rcpt = self.state(queue_id).recipients[0]
            self.assertEqual((rcpt.attempts, rcpt.done), (1, None))
            self.assertTrue(rcpt.last_reply.status.startswith("4."), rcpt.last_reply)
        self.assertEqual(self.reporter.bounces, [])

        self.sink.drop_in_data = None
        yield scheduler.stopService()       # a restart: no attempt is still winding down when we flush
        scheduler = self.scheduler(per_domain=1)
        scheduler.startService()
        scheduler.flush()
        yield until(lambda: not self.spool.queue_ids(), "the retried messages to be delivered")
        self.assertEqual(len(self.sink.sessions), 2)
        self.assertEqual(sorted(number_of(m.data) for m in self.sink.messages), list(range(6)))
        for queue_id in ids[2:]:
            self.assertFalse(self.spool.exists(queue_id))


class HopDownEndToEnd(unittest.TestCase):
    """Through the whole relay: messages accepted while the smarthost is down leave on one connection
    once it is back."""
    timeout = 120

    @defer.inlineCallbacks
    def test_messages_queued_while_the_hop_is_down_leave_on_one_connection(self):
        sink_port = free_port()           # nothing listens there yet: the next hop is down
        relay = RelayFixture(self.mktemp(), extra=(
            f'[transports.sink]\nhost = "127.0.0.1"\nport = {sink_port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n'
            '[queue]\nfirst_retry = "1h"\nmax_retry = "1h"\n\n'
            '[delivery]\nconcurrency_per_domain = 1\n'), process=SEPARATE)   # flush reaches the delivery process
        service = relay.start(reactor)
        self.addCleanup(relay.stop)
        for n in range(20):
            code, _ = yield relay.submit("relay", "app@example.org", [f"user{n}@example.com"], body(n))
            self.assertEqual(code, 250)
        spool = service.spool

        def all_tried():
            ids = spool.queue_ids()
            return len(ids) == 20 and all(
                MessageState.from_dict(m.state, m.envelope.recipients).recipients[0].attempts
                for m in map(spool.load, ids))
        yield until(all_tried, "every message to have failed its first attempt")
        # A restart settles the attempts still winding down (a flush would retry those on their own).
        yield relay.stop()

        sink = Sink()
        sink.start(reactor, port=sink_port)
        self.addCleanup(sink.stop)
        service = relay.start(reactor)
        service.scheduler.flush()           # the hop is back: everything is due now (`mailrelay queue flush`)
        yield sink.wait_for(20)
        self.assertEqual(len(sink.sessions), 1)
        self.assertEqual(sorted(number_of(m.data) for m in sink.messages), list(range(20)))
        yield until(lambda: not service.spool.queue_ids(), "the spool to empty")


class TestDoubleTests(unittest.TestCase):
    def test_the_message_double_is_an_ispooledmessage(self):
        """What the hops here are given provides the interface they rely on (no probing)."""
        self.assertTrue(verifyObject(ISpooledMessage, BodyMessage("q0", b"Subject: 0\r\n\r\nfine\r\n")))
