# -*- test-case-name: tests.test_capabilities -*-
"""Optional capabilities are declared on interfaces (mailrelay.interfaces), not probed: the real next
hops provide what they do, and the DKIM wrapper passes on exactly what the hop behind it has; every
incoming queue and scheduler says whether it writes the "queued" log line (logs_queued), and every
message writer how many octets it took (IMessageWriter.size)."""
from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay import config
from mailrelay.config import DeliveryConfig
from mailrelay.outbound.mx import MXDelivery
from mailrelay.outbound.smarthost import SmarthostTransport
from mailrelay.outbound.signing import DKIMHop
from mailrelay.queue.process import DeliveryProcess
from mailrelay.envelope import Envelope
from mailrelay.interfaces import (
    IBatchNextHop, IIncomingQueue, IMessageWriter, INextHop, IPooledNextHop, IScheduler, ISpoolControl,
)
from mailrelay.wiring import QueueFront
from mailrelay.spool.store import Spool
from tests.support.fakes import FakeQueue
from tests.support.scheduling import MemorySpool


@implementer(INextHop)
class PlainHop:
    def deliver(self, message, recipients):
        return defer.succeed([])


class NextHopCapabilities(unittest.TestCase):
    def test_smarthost_and_mx_delivery_batch_and_keep_idle_connections(self):
        clock = task.Clock()
        smarthost = SmarthostTransport(config.Transport("relay", "smtp.example.net", security="none", verify=False),
                                       "relay.example.org", clock=clock)
        mx = MXDelivery(DeliveryConfig(nameservers=(("127.0.0.1", 53),)), "relay.example.org", clock)
        self.addCleanup(mx.stop)
        for hop in (smarthost, mx):
            self.assertTrue(verifyObject(IBatchNextHop, hop))
            self.assertTrue(verifyObject(IPooledNextHop, hop))

    def test_the_dkim_wrapper_provides_what_the_hop_behind_it_provides(self):
        clock = task.Clock()
        pooled = SmarthostTransport(config.Transport("relay", "smtp.example.net", security="none", verify=False),
                                    "relay.example.org", clock=clock)
        wrapped = DKIMHop(pooled, threadpool=object(), reactor=clock)
        self.assertTrue(IPooledNextHop.providedBy(wrapped))
        self.assertTrue(IBatchNextHop.providedBy(wrapped))
        plain = DKIMHop(PlainHop(), threadpool=object(), reactor=clock)
        self.assertFalse(IPooledNextHop.providedBy(plain))
        self.assertFalse(IBatchNextHop.providedBy(plain))
        self.assertIsNone(self.successResultOf(plain.close_idle()))


@implementer(IScheduler)
class _Scheduler:
    def __init__(self, logs_queued: bool):
        self.logs_queued = logs_queued

    def enqueue(self, queue_id):
        pass

    def flush(self, queue_id=None):
        pass


class QueueCapabilities(unittest.TestCase):
    """Who writes a message's "queued" line is declared (IIncomingQueue.logs_queued, IScheduler.logs_queued):
    the server reads the attribute of whatever queue it was given."""

    def test_every_queue_declares_whether_it_logs_the_queued_line(self):
        spool = Spool(Path(self.mktemp()))
        for queue in (spool, FakeQueue(), QueueFront(spool, _Scheduler(False))):
            self.assertTrue(verifyObject(IIncomingQueue, queue))
            self.assertIs(queue.logs_queued, False)
        self.assertTrue(verifyObject(ISpoolControl, MemorySpool()))
        self.assertIs(MemorySpool().logs_queued, False)

    @defer.inlineCallbacks
    def test_every_writer_declares_the_octets_it_took(self):
        spool = Spool(Path(self.mktemp()))
        envelope = Envelope("app@example.org", ("a@example.net",), 0.0)
        for queue in (spool, FakeQueue(), QueueFront(spool, _Scheduler(False))):
            writer = queue.new_message(envelope)
            self.assertTrue(verifyObject(IMessageWriter, writer))
            self.assertEqual(writer.size, 0)
            chunks = (b"Subject: size\r\n\r\n", b"body\r\n")
            for chunk in chunks:
                writer.write(chunk)
            self.assertEqual(writer.size, len(b"".join(chunks)), queue)
            yield writer.commit()
            self.assertEqual(writer.size, len(b"".join(chunks)), queue)

    def test_the_front_passes_on_what_its_scheduler_declares(self):
        spool = Spool(Path(self.mktemp()))
        process = DeliveryProcess(self.mktemp(), reactor=task.Clock())
        for scheduler, expected in ((_Scheduler(False), False), (_Scheduler(True), True), (process, True)):
            self.assertTrue(verifyObject(IScheduler, scheduler))
            self.assertIs(QueueFront(spool, scheduler).logs_queued, expected)
