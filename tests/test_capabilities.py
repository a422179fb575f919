# -*- test-case-name: tests.test_capabilities -*-
"""Optional capabilities of the next hops are declared on interfaces (mailrelay.interfaces), not probed:
the real hops provide what they do, and the DKIM wrapper passes on exactly what the hop behind it has."""
from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay import config
from mailrelay.config import DeliveryConfig
from mailrelay.delivery.mx import MXDelivery
from mailrelay.delivery.smarthost import SmarthostTransport
from mailrelay.dkim.hop import DKIMHop
from mailrelay.interfaces import IBatchNextHop, INextHop, IPooledNextHop


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
