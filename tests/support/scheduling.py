"""In-memory doubles for driving the delivery scheduler over task.Clock: a spool and a next hop.

`BodyMessage` is a spooled message a real next hop can read.  `MemorySpool` provides ISpool (plus the
hold/release/take_requests the scheduler's control part uses); states go through JSON as a real spool
stores them.  `ManualHop` provides INextHop: each deliver() is recorded with the clock's time and
waits until the test answers it (`answer_next`, `answer_all`), so the deliveries in flight can be
counted; replies are the next hop's own (`remote_reply=True`) unless the test says they are the
relay's verdict.  `FakeHop` answers from a script (or, manual, when told), `FakeRouter` matches routes as
the config does, `FakeReporter` and `RecordingReporter` record the DSNs asked for, and `SchedulerTestCase`
builds a Scheduler over all of them on a task.Clock set to NOW.
"""
from __future__ import annotations

import copy
import io
import json
import random
from dataclasses import dataclass
from typing import Optional

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.trial import unittest
from zope.interface import implementer

from mailrelay.config import DeliveryConfig, QueueConfig
from mailrelay.queue.results import RecipientResult
from mailrelay.queue.scheduler import STOP_TIMEOUT, Scheduler
from mailrelay.queue.state import MessageState, RecipientState
from mailrelay.envelope import Envelope, domain_of
from mailrelay.interfaces import IDeliveryReporter, INextHop, IRouter, ISpool, ISpoolControl, ISpooledMessage

NOW = 1_767_225_600.0    # 2026-01-01T00:00:00Z


@implementer(ISpooledMessage)
@dataclass
class MemoryMessage:
    queue_id: str
    envelope: Envelope
    state: dict
    held: bool
    size: int = 100
    path = None           # not read from a spool file

    def open(self):
        raise NotImplementedError("the scheduler never reads the body")


@implementer(ISpooledMessage)
@dataclass
class BodyMessage:
    """A message a real next hop can send (it reads the body): `BodyMessage.to("a@b.test")`."""
    queue_id: str
    envelope: Envelope
    data: bytes = b"From: a@example.org\r\nSubject: test\r\n\r\nbody\r\n"
    path = None           # not read from a spool file

    @classmethod
    def to(cls, *recipients: str) -> "BodyMessage":
        return cls("Q1", Envelope("a@example.org", tuple(recipients), NOW))

    @property
    def size(self) -> int:
        return len(self.data)

    def open(self):
        return io.BytesIO(self.data)


@implementer(ISpool, ISpoolControl)
class MemorySpool:
    """A spool in memory for scheduler tests: records save_state (`saves`), removals (`removed`) and the
    copies dropped from memory (`forgotten`); states go through JSON as a real spool would store them.
    `paused_saves`, when a list: each save waits there until the test fires it."""

    logs_queued = False     # IIncomingQueue (through ISpool)

    def __init__(self):
        self.envelopes: dict[str, Envelope] = {}
        self.states: dict[str, dict] = {}
        self.held: set[str] = set()
        self.saves: list[tuple[str, dict]] = []
        self.removed: list[str] = []
        self.requests: list = []
        self.forgotten: list[str] = []
        self.paused_saves: Optional[list[defer.Deferred]] = None

    def add(self, queue_id, recipients, sender="sender@example.org", received_at=NOW, state=None, held=False):
        self.envelopes[queue_id] = Envelope(sender, tuple(recipients), received_at)
        if state is not None:
            self.states[queue_id] = state
        if held:
            self.held.add(queue_id)

    def new_message(self, envelope):
        raise NotImplementedError

    def queue_ids(self):
        return list(self.envelopes)

    def load(self, queue_id):
        return MemoryMessage(queue_id, self.envelopes[queue_id], copy.deepcopy(self.states.get(queue_id, {})),
                             queue_id in self.held)

    def save_state(self, queue_id, state):
        assert queue_id in self.envelopes, f"save_state after remove: {queue_id}"
        state = json.loads(json.dumps(state))
        self.saves.append((queue_id, state))
        if self.paused_saves is None:
            self.states[queue_id] = state
            return defer.succeed(None)
        d = defer.Deferred()
        self.paused_saves.append(d)
        return d.addCallback(lambda _: self.states.__setitem__(queue_id, state))

    def remove(self, queue_id):
        self.removed.append(queue_id)
        del self.envelopes[queue_id]
        self.states.pop(queue_id, None)

    def hold(self, queue_id):
        self.held.add(queue_id)

    def release(self, queue_id):
        self.held.discard(queue_id)

    def take_requests(self):
        requests, self.requests = self.requests, []
        return requests

    def state_of(self, queue_id):
        return copy.deepcopy(self.states.get(queue_id, {}))

    def is_held(self, queue_id):
        return queue_id in self.held

    suspended: Optional[dict] = None

    def suspension(self):
        return self.suspended

    def set_suspension(self, record):
        self.suspended = record

    def take_fresh(self, queue_id):
        return None

    def forget_fresh(self, queue_id):
        self.forgotten.append(queue_id)

    def recipient_state(self, queue_id, recipient) -> RecipientState:
        return MessageState.from_dict(self.states.get(queue_id, {}), self.envelopes[queue_id].recipients).get(recipient)


@implementer(INextHop)
class ManualHop:
    """deliver() waits for the test.  `replies`: recipient domain -> list of (code, status), one per
    delivery, the last repeating; default 250 2.0.0."""

    def __init__(self, clock, name="mx.example.net"):
        self.clock, self.name = clock, name
        self.replies: dict[str, list[tuple[int, str]]] = {}
        self.calls: list[tuple[float, str, tuple[str, ...]]] = []     # (time, queue id, recipients)
        self.pending: list[tuple[defer.Deferred, str, tuple[str, ...]]] = []
        self.max_in_flight: dict[str, int] = {}

    def deliver(self, message, recipients):
        self.calls.append((self.clock.seconds(), message.queue_id, tuple(recipients)))
        d = defer.Deferred()
        self.pending.append((d, message.queue_id, tuple(recipients)))
        for domain in {domain_of(r) for r in recipients}:
            self.max_in_flight[domain] = max(self.max_in_flight.get(domain, 0), self.in_flight(domain))
        return d

    def in_flight(self, domain: str) -> int:
        return sum(1 for _, _, rcpts in self.pending if any(domain_of(r) == domain for r in rcpts))

    def answer_next(self, code=None, status=None, remote=True):
        d, _, recipients = self.pending.pop(0)
        d.callback([self._reply(r, code, status, remote) for r in recipients])

    def answer_all(self):
        while self.pending:
            self.answer_next()

    def _reply(self, recipient, code, status, remote):
        if code is None:
            script = self.replies.get(domain_of(recipient), [(250, "2.0.0")])
            code, status = script.pop(0) if len(script) > 1 else script[0]
        return RecipientResult(recipient, code, status, f"reply {code}", self.name, remote_reply=remote)

    def queue_ids(self, domain: str) -> list[str]:
        return [q for _, q, rcpts in self.calls if any(domain_of(r) == domain for r in rcpts)]


@implementer(INextHop)
class FakeHop:
    """Answers from a script (recipient -> replies, one per attempt, the last repeating; default 250).
    manual=True: answers wait until finish_one()/finish_all(), so in-flight deliveries can be counted."""

    def __init__(self, name="mx.example.net", script=None, manual=False, clock=None):
        self.name, self.script, self.manual, self.clock = name, dict(script or {}), manual, clock
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.call_times: list[float] = []
        self.pending: list[tuple[defer.Deferred, list, str]] = []
        self.in_flight: dict[str, int] = {}
        self.max_in_flight = 0
        self.max_in_flight_per_domain = 0

    def deliver(self, message, recipients):
        self.calls.append((message.queue_id, tuple(recipients)))
        if self.clock is not None:
            self.call_times.append(self.clock.seconds())
        results = [self._answer(r) for r in recipients]
        if not self.manual:
            return defer.succeed(results)
        domain = domain_of(recipients[0])
        self.in_flight[domain] = self.in_flight.get(domain, 0) + 1
        self.max_in_flight = max(self.max_in_flight, sum(self.in_flight.values()))
        self.max_in_flight_per_domain = max(self.max_in_flight_per_domain, self.in_flight[domain])
        d = defer.Deferred()
        self.pending.append((d, results, domain))
        return d

    def _answer(self, recipient):
        replies = self.script.get(recipient, [(250, "2.0.0")])
        code, status = replies.pop(0) if len(replies) > 1 else replies[0]
        return RecipientResult(recipient, code, status, f"reply {code}", self.name)

    def finish_one(self):
        d, results, domain = self.pending.pop(0)
        self.in_flight[domain] -= 1
        d.callback(results)

    def finish_all(self):
        while self.pending:
            self.finish_one()


@implementer(IRouter)
class FakeRouter:
    """config-like matching: a route's recipients are domains or "*"; after_attempts honoured."""

    def __init__(self, routes=()):
        self.routes = tuple(routes)
        self.calls: list[tuple[str, int]] = []

    def route(self, sender, recipient, attempts):
        self.calls.append((recipient, attempts))
        for route in self.routes:
            if attempts >= route.after_attempts and (
                    "*" in route.recipients or domain_of(recipient) in route.recipients):
                return route
        return None


@implementer(IDeliveryReporter)
class FakeReporter:
    def __init__(self):
        self.bounces: list[tuple[str, list[RecipientResult]]] = []
        self.delays: list[tuple[str, list[RecipientResult]]] = []
        self.successes: list[tuple[str, list[str], str]] = []
        self.fail_next_bounce = self.fail_next_success = False

    def bounce(self, message, results):
        if self.fail_next_bounce:
            self.fail_next_bounce = False
            return defer.fail(ReporterDown())
        self.bounces.append((message.queue_id, list(results)))
        return defer.succeed(None)

    def delay(self, message, recipients):
        self.delays.append((message.queue_id, list(recipients)))

    def success(self, message, results, action):
        if self.fail_next_success:
            self.fail_next_success = False
            return defer.fail(ReporterDown())
        self.successes.append((message.queue_id, [r.recipient for r in results], action))


class ReporterDown(Exception):
    pass


class SchedulerTestCase(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.spool = MemorySpool()
        self.direct = FakeHop(clock=self.clock)
        self.router = FakeRouter()
        self.reporter = FakeReporter()
        self.transports: dict[str, FakeHop] = {}
        self.queue = QueueConfig(first_retry=300.0, max_retry=1200.0, lifetime=86400.0, delay_warning=0.0)
        self.delivery = DeliveryConfig(concurrency=10, concurrency_per_domain=5)
        self.events: list[dict] = []

    def make(self, start=True, reporter="default", **queue_changes) -> Scheduler:
        queue = QueueConfig(**{**self.queue.__dict__, **queue_changes})
        scheduler = Scheduler(self.spool, self.router, self.transports, self.direct, queue, self.delivery,
                              self.reporter if reporter == "default" else reporter,
                              clock=self.clock, rng=random.Random(1))
        scheduler.log = Logger(observer=self.events.append)
        if start:
            scheduler.startService()
            self.addCleanup(self.stop, scheduler)
        return scheduler

    def stop(self, scheduler):
        if not scheduler.running:
            return None
        d = scheduler.stopService()
        self.clock.advance(STOP_TIMEOUT)
        return d

    def logged_failures(self, exception_type) -> int:
        return sum(1 for e in self.events if "log_failure" in e and e["log_failure"].check(exception_type))

    def stages(self, queue_id):
        return [e["stage"] for e in self.events if e.get("queue_id") == queue_id and "stage" in e]


@implementer(IDeliveryReporter)
class RecordingReporter:
    def __init__(self):
        self.bounces: list[tuple[str, list[tuple[str, int]]]] = []

    def bounce(self, message, results):
        self.bounces.append((message.queue_id, [(r.recipient, r.code) for r in results]))

    def delay(self, message, recipients):
        pass
