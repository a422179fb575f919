"""Small builders for the scheduler collaborators' unit tests (tests.test_scheduler_parts,
tests.test_scheduler_outcomes): messages and attempts in a QueueState, deliveries, an IThrottle that
records what it is asked, and a test case with a clock at NOW and a logger whose events it keeps.
"""
from __future__ import annotations

from typing import Optional

from twisted.internet import task
from twisted.logger import Logger
from twisted.trial import unittest
from zope.interface import implementer

from mailrelay.config import Throttle
from mailrelay.queue.attempts import _Job
from mailrelay.queue.queuestate import QueueState
from mailrelay.queue.state import MessageState
from mailrelay.queue.throttle import LocalThrottle
from mailrelay.envelope import Envelope
from mailrelay.interfaces import IThrottle
from tests.support.scheduling import NOW, MemoryMessage


def message(queue_id: str, *recipients: str, sender: str = "a@example.org", received_at: float = NOW,
            held: bool = False) -> MemoryMessage:
    return MemoryMessage(queue_id, Envelope(sender, tuple(recipients or ("b@example.net",)), received_at), {},
                         held)


def attempt_of(work: QueueState, queue_id: str, *recipients: str, **kwargs):
    loaded = message(queue_id, *recipients, **kwargs)
    return work.begin(loaded, MessageState.fresh(loaded.envelope.recipients))


def job(attempt, hop=None, key: Optional[str] = None, destination: Optional[str] = None,
        recipients: Optional[tuple[str, ...]] = None) -> _Job:
    recipients = recipients or attempt.message.envelope.recipients
    return _Job(attempt, hop, "direct", key or f"domain:{recipients[0].split('@')[1]}", tuple(recipients),
                destination=destination)


@implementer(IThrottle)
class RecordingThrottle:
    """An IThrottle that records every call and answers as a LocalThrottle would: what any other
    implementation (one shared between relays) is handed by the scheduler's gate."""

    def __init__(self):
        self.inner, self.calls = LocalThrottle(), []

    def ready_at(self, destination, rule, now):
        self.calls.append(("ready_at", destination))
        return self.inner.ready_at(destination, rule, now)

    def start(self, destination, rule, now):
        self.calls.append(("start", destination))
        self.inner.start(destination, rule, now)

    def finish(self, destination):
        self.calls.append(("finish", destination))
        self.inner.finish(destination)

    def slowed(self, destination, rule, started, now, reply):
        self.calls.append(("slowed", destination, reply))
        return self.inner.slowed(destination, rule, started, now, reply)

    def succeeded(self, destination, started):
        self.calls.append(("succeeded", destination))
        self.inner.succeeded(destination, started)

    def status(self, now):
        return self.inner.status(now)


class PartsTestCase(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.events: list[dict] = []
        self.log = Logger(observer=self.events.append)

    def stages(self) -> list[str]:
        return [e["stage"] for e in self.events if "stage" in e]


SLOW = Throttle(("slow.test",), messages_per_minute=60, connections=0, pause=30.0)
