"""Happy eyeballs for MX delivery over real sockets: loopback DNS (tests/support/dnsserver.py) serving MX,
A and AAAA records, real sinks (tests/support/sink.py) on ::1 and 127.0.0.x, and addresses that refuse
or hang.

A hanging address is a listening socket with a backlog of 0 whose one queue slot is taken by a
connection nobody accepts: Linux then drops every further SYN (the accept queue is full), so a connect
to it stays unanswered until its own timeout — a real "SYN never answered" on loopback.  `hanging()`
proves that with a probe first and skips the test, saying why, on a system that answers otherwise.
"""
from __future__ import annotations

import random
import socket

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.trial import unittest

from mailrelay.config import DeliveryConfig
from mailrelay.queue.job import Timeouts
from mailrelay.outbound.dns import MXResolver
from mailrelay.outbound.mx import MXDelivery
from tests.support.dnsserver import DNSServer
from tests.support.logcapture import LogLines
from tests.support.sink import Sink
from tests.support.messages import BODY, message_to

# A connect timeout far above what any test here may take: a hung address waited out would show.
SLOW_CONNECT = Timeouts(connect=10.0, reply=10.0, data_end=10.0)

ZONE = {
    ("v6only.example", "MX"): ["10 mx.v6only.example."],
    ("mx.v6only.example", "AAAA"): ["::1"],
    ("dual.example", "MX"): ["10 mx.dual.example."],
    ("mx.dual.example", "A"): ["127.0.0.1"],
    ("mx.dual.example", "AAAA"): ["::1"],
    ("two.example", "MX"): ["10 mx.two.example."],
    ("mx.two.example", "A"): ["127.0.0.2", "127.0.0.3"],
}


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def port_free(interface: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    try:
        with socket.socket(family) as s:
            s.bind((interface, port))
    except OSError:
        return False
    return True


def hanging(interface: str, port: int) -> list[socket.socket] | None:
    """A listener on (interface, port) whose SYNs go unanswered, with the sockets to close after; None
    when the port is taken.  Raises SkipTest when this system answers connects to a full queue."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    listener = socket.socket(family)
    try:
        listener.bind((interface, port))
    except OSError:
        listener.close()
        return None
    listener.listen(0)
    held, why = [listener], "every connect was accepted into the queue"
    for _ in range(4):
        probe = socket.socket(family)
        probe.settimeout(0.3)
        held.append(probe)
        try:
            probe.connect((interface, port))        # took the queue's slot: try again
        except (TimeoutError, socket.timeout):
            return held                                # a SYN went unanswered: the address hangs
        except OSError as e:
            why = f"a connect failed with {e}"
            break
    for s in held:
        s.close()
    raise unittest.SkipTest(f"connects to a full listen queue on {interface} do not hang here ({why}); "
                            "the hang is covered by tests/test_eyeballs.py over a task.Clock")

class HappyEyeballsDeliveryTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.dns = DNSServer(ZONE, shuffle=False)     # the A records of mx.two.example in zone order
        self.nameservers = (("127.0.0.1", self.dns.start(reactor)),)
        self.addCleanup(self.dns.stop)
        self.attempts: list[tuple[str, float]] = []

    def need_ipv6(self) -> None:
        if not has_ipv6_loopback():
            raise unittest.SkipTest("this machine has no ::1 (IPv6 loopback disabled)")

    def sink_with(self, sink_interface: str, other: str, hang: bool = False) -> tuple[Sink, int]:
        """A sink on sink_interface:P, and on other:P nothing (refused) or a hanging listener."""
        for _ in range(20):
            sink = Sink()
            port = sink.start(reactor, interface=sink_interface)
            if hang:
                held = hanging(other, port)
                if held is not None:
                    for s in held:
                        self.addCleanup(s.close)
                    break
            elif port_free(other, port):
                break
            sink.stop()
        else:
            raise CannotListenError(other, 0, "no port free on both addresses")
        self.addCleanup(sink.stop)
        return sink, port

    def mx(self, port: int, **config) -> MXDelivery:
        delivery = DeliveryConfig(mx_port=port, tls="none", nameservers=self.nameservers, **config)
        resolver = MXResolver(self.nameservers, reactor, timeout=2.0, rng=random.Random(3))
        self.addCleanup(resolver.stop)
        mx = MXDelivery(delivery, "relay.test", reactor, resolver=resolver, timeouts=SLOW_CONNECT)
        self.addCleanup(mx.close_idle)
        original = mx._endpoint

        def recording(address: str):
            self.attempts.append((address, reactor.seconds()))
            return original(address)
        mx._endpoint = recording
        return mx

    @defer.inlineCallbacks
    def deliver(self, mx: MXDelivery, domain: str):
        rcpt = f"b@{domain}"
        [result] = yield mx.deliver(message_to(rcpt), [rcpt])
        self.assertTrue(result.delivered, result)
        return result, reactor.seconds() - self.attempts[0][1]

    @defer.inlineCallbacks
    def test_an_exchanger_whose_only_address_is_ipv6_gets_the_message(self):
        self.need_ipv6()
        sink = Sink()
        port = sink.start(reactor, interface="::1")
        self.addCleanup(sink.stop)
        result, _ = yield self.deliver(self.mx(port), "v6only.example")
        self.assertEqual(result.remote_host, "mx.v6only.example[::1]")
        self.assertEqual(sink.messages[0].data, BODY)
        self.assertEqual(sink.sessions[0].peer, "::1")

    @defer.inlineCallbacks
    def test_ipv6_is_tried_first_and_a_refusal_moves_to_ipv4_at_once(self):
        self.need_ipv6()
        sink, port = self.sink_with("127.0.0.1", "::1")
        mx = self.mx(port)
        mx.attempt_delay = 2.0            # the longest stagger RFC 8305 allows: only a refusal explains speed
        logs = LogLines(self)
        result, took = yield self.deliver(mx, "dual.example")
        [line] = logs.take("connected to 127.0.0.1 after")     # the broken address is not hidden
        self.assertIn("mx.dual.example: connected to 127.0.0.1 after ::1: Connection was refused", line)
        self.assertEqual([a for a, _ in self.attempts], ["::1", "127.0.0.1"])
        self.assertLess(self.attempts[1][1] - self.attempts[0][1], 1.0)
        self.assertLess(took, 1.5)
        self.assertEqual(result.remote_host, "mx.dual.example[127.0.0.1]")     # the address that answered
        self.assertEqual(len(sink.messages), 1)

    @defer.inlineCallbacks
    def test_a_hanging_ipv6_address_costs_one_attempt_delay_not_the_connect_timeout(self):
        self.need_ipv6()
        sink, port = self.sink_with("127.0.0.1", "::1", hang=True)
        result, took = yield self.deliver(self.mx(port), "dual.example")
        self.assertEqual([a for a, _ in self.attempts], ["::1", "127.0.0.1"])
        self.assertGreaterEqual(self.attempts[1][1] - self.attempts[0][1], 0.24)     # staggered, not at once
        self.assertLess(took, 1.5)                 # the connect timeout is 10 s
        self.assertEqual(result.remote_host, "mx.dual.example[127.0.0.1]")
        self.assertEqual(len(sink.messages), 1)

    @defer.inlineCallbacks
    def test_a_hanging_first_ipv4_address_costs_one_attempt_delay_not_the_connect_timeout(self):
        sink, port = self.sink_with("127.0.0.3", "127.0.0.2", hang=True)
        result, took = yield self.deliver(self.mx(port), "two.example")
        self.assertEqual([a for a, _ in self.attempts], ["127.0.0.2", "127.0.0.3"])
        self.assertLess(took, 1.5)
        self.assertEqual(result.remote_host, "mx.two.example[127.0.0.3]")

    @defer.inlineCallbacks
    def test_the_connection_is_reused_for_the_next_delivery_to_the_exchanger(self):
        self.need_ipv6()
        sink, port = self.sink_with("127.0.0.1", "::1")
        mx = self.mx(port)
        yield self.deliver(mx, "dual.example")
        yield self.deliver(mx, "dual.example")
        self.assertEqual(len(self.attempts), 2)        # ::1 refused, 127.0.0.1 answered; then no connect
        self.assertEqual(len(sink.sessions), 1)
        self.assertEqual(len(sink.messages), 2)

    @defer.inlineCallbacks
    def test_an_address_failing_before_mail_leaves_the_exchangers_other_addresses(self):
        busy, port = self.sink_with("127.0.0.3", "127.0.0.2")
        greeting_421 = Sink(ehlo_reply="421 4.3.2 too busy")
        greeting_421.start(reactor, port=port, interface="127.0.0.2")
        self.addCleanup(greeting_421.stop)
        result, _ = yield self.deliver(self.mx(port), "two.example")
        self.assertEqual([a for a, _ in self.attempts], ["127.0.0.2", "127.0.0.3"])
        self.assertEqual(len(greeting_421.sessions), 1)
        self.assertEqual(result.remote_host, "mx.two.example[127.0.0.3]")
        self.assertEqual(len(busy.messages), 1)

    @defer.inlineCallbacks
    def test_a_source_address_skips_the_other_family(self):
        self.need_ipv6()
        v6 = Sink()
        sink, port = self.sink_with("127.0.0.1", "::1")
        v6.start(reactor, port=port, interface="::1")
        self.addCleanup(v6.stop)
        result, _ = yield self.deliver(self.mx(port, source_address="127.0.0.2"), "dual.example")
        self.assertEqual([a for a, _ in self.attempts], ["127.0.0.1"])
        self.assertEqual(sink.sessions[0].peer, "127.0.0.2")
        self.assertEqual(v6.sessions, [])

    @defer.inlineCallbacks
    def test_every_address_refusing_names_each_in_the_result(self):
        self.need_ipv6()
        sink, port = self.sink_with("127.0.0.1", "::1")
        yield sink.stop()                     # now nothing listens on either address of mx.dual.example
        rcpt = "b@dual.example"
        [result] = yield self.mx(port).deliver(message_to(rcpt), [rcpt])
        self.assertEqual((result.code, result.status), (451, "4.4.1"))
        self.assertIn("::1: Connection was refused", result.text)
        self.assertIn("127.0.0.1: Connection was refused", result.text)
