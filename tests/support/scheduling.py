"""In-memory doubles for driving the delivery scheduler over task.Clock: a spool and a next hop.

`BodyMessage` is a spooled message a real next hop can read.  `MemorySpool` provides ISpool (plus the
hold/release/take_requests the scheduler's control part uses); states go through JSON as a real spool
stores them.  `ManualHop` provides INextHop: each deliver() is recorded with the clock's time and
waits until the test answers it (`answer_next`, `answer_all`), so the deliveries in flight can be
counted; replies are the next hop's own (`remote_reply=True`) unless the test says they are the
relay's verdict.
"""
from __future__ import annotations

import copy
from typing import Optional
import io
import json
from dataclasses import dataclass

from twisted.internet import defer
from zope.interface import implementer

from mailrelay.delivery.results import RecipientResult
from mailrelay.delivery.state import MessageState, RecipientState
from mailrelay.envelope import Envelope, domain_of
from mailrelay.interfaces import INextHop, ISpool, ISpoolControl

NOW = 1_767_225_600.0    # 2026-01-01T00:00:00Z


@dataclass
class MemoryMessage:
    queue_id: str
    envelope: Envelope
    state: dict
    held: bool
    size: int = 100

    def open(self):
        raise NotImplementedError("the scheduler never reads the body")


@dataclass
class BodyMessage:
    """A message a real next hop can send (it reads the body): `BodyMessage.to("a@b.test")`."""
    queue_id: str
    envelope: Envelope
    data: bytes = b"From: a@example.org\r\nSubject: test\r\n\r\nbody\r\n"

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
