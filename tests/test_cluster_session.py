"""SMTP sessions over StringTransport and task.Clock with the limits shared through Redis: a check that
waits on Redis holds the pipelined commands behind it (replies keep their order, RFC 2920), and a Redis
that does not answer costs the session one bounded wait, after which the local counters decide."""
from __future__ import annotations

import base64
import ipaddress

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailrelay import config
from mailrelay.cluster.shared import SharedFailureWindow, SharedRateLimiter, SharedSuppression
from mailrelay.server.factory import FailureWindow, RelayServerFactory
from mailrelay.server.policy import PermitPolicy
from mailrelay.server.ratelimit import RateLimiter
from mailrelay.spool.suppression import SuppressionList
from tests.support.fakes import FakeQueue, TLSStringTransport, memory_portal, silent_redis_link

PERMITS = (config.Permit(networks=(ipaddress.ip_network("127.0.0.0/8"),)), config.Permit(users=("*",)))


class SessionTestCase(unittest.TestCase):
    rate = 2

    def setUp(self):
        self.clock = Clock()
        self.link, self.conn = silent_redis_link(self.clock)
        limits = config.Limits(messages_per_minute=self.rate, auth_failures_per_minute=2)
        self.limiter = SharedRateLimiter(self.link, RateLimiter(self.rate, 60.0, self.clock))
        self.journal = SuppressionList(self.mktemp(), 86400.0, self.clock)
        self.journal.directory.mkdir()
        self.window = SharedFailureWindow(self.link, FailureWindow(2, self.clock))
        self.factory = RelayServerFactory(
            hostname="relay.test", listener=config.Listener("relay", "tcp:0", False), limits=limits,
            portal=memory_portal(alice="s3cret"), mechanisms=("PLAIN",),
            policy=PermitPolicy(PERMITS, limits, clock=self.clock, limiter=self.limiter), queue=FakeQueue(),
            tls_options=object(), clock=self.clock, auth_failures=self.window,
            suppression=SharedSuppression(self.link, self.journal))

    def connect(self, tls: bool = False):
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        if tls:
            from twisted.internet.interfaces import ISSLTransport
            from zope.interface import alsoProvides

            alsoProvides(transport, ISSLTransport)
        session = self.factory.buildProtocol(transport.getPeer())
        session.makeConnection(transport)
        transport.clear()
        return session, transport

    def send(self, session, transport, data: bytes) -> list[str]:
        transport.clear()
        session.dataReceived(data)
        return self.lines(transport)

    @staticmethod
    def lines(transport) -> list[str]:
        return transport.value().decode("latin-1").splitlines()


class SharedRateTests(SessionTestCase):
    def test_pipelined_commands_wait_behind_mail_and_keep_their_order(self):
        session, transport = self.connect()
        self.send(session, transport, b"EHLO client.test\r\n")
        replies = self.send(session, transport, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
        self.assertEqual(replies, [])                          # Redis is asked; nothing answered yet
        self.assertEqual(self.conn.sent[0][0], "EVALSHA")
        transport.clear()
        self.conn.answer(0, [1, 0])                            # Redis: allowed
        self.assertEqual(self.lines(transport), ["250 2.1.0 Sender ok"])
        transport.clear()
        self.conn.answer(1, None)                              # the RCPT's suppression GET: nothing
        self.assertEqual(self.lines(transport), ["250 2.1.5 Recipient ok"])

    def test_a_refusal_from_redis_is_the_local_limiters_reply(self):
        session, transport = self.connect()
        self.send(session, transport, b"EHLO client.test\r\n")
        self.send(session, transport, b"MAIL FROM:<a@example.org>\r\n")
        transport.clear()
        self.conn.answer(0, [0, 12000])
        self.assertEqual(self.lines(transport), ["450 4.7.1 Too many messages from this client, try again later"])

    def test_a_silent_redis_costs_one_bounded_wait_then_the_local_bucket_decides(self):
        session, transport = self.connect()
        self.send(session, transport, b"EHLO client.test\r\n")
        self.assertEqual(self.send(session, transport, b"MAIL FROM:<a@example.org>\r\n"), [])
        transport.clear()
        self.clock.advance(0.1)
        self.assertEqual(self.lines(transport), ["250 2.1.0 Sender ok"])
        # The link is down now: no wait at all, the local bucket (2 a minute) decides.
        self.assertEqual(self.send(session, transport, b"RSET\r\nMAIL FROM:<a@example.org>\r\n"),
                         ["250 2.0.0 Ok", "250 2.1.0 Sender ok"])
        self.assertEqual(self.send(session, transport, b"RSET\r\nMAIL FROM:<a@example.org>\r\n"),
                         ["250 2.0.0 Ok", "450 4.7.1 Too many messages from this client, try again later"])


class SharedSuppressionTests(SessionTestCase):
    def test_an_address_suppressed_in_redis_is_refused_and_the_next_rcpt_waits_its_turn(self):
        session, transport = self.connect()
        self.send(session, transport, b"EHLO client.test\r\n")
        self.send(session, transport, b"MAIL FROM:<a@example.org>\r\n")
        self.conn.answer(0, [1, 0])
        replies = self.send(session, transport, b"RCPT TO:<gone@example.net>\r\nRCPT TO:<ok@example.net>\r\n")
        self.assertEqual(replies, [])
        self.assertEqual(self.conn.sent[1], ("GET", "mailrelay:suppression:gone@example.net"))
        transport.clear()
        record = ('{"v":1,"op":"add","address":"gone@example.net","since":0,"reply":"550 5.1.1 no such user",'
                  '"remote_host":"mx.example.net","queue_id":"q1","source":"bounce","reason":""}')
        self.conn.answer(1, record)
        self.assertEqual(len(self.lines(transport)), 1)
        self.assertTrue(self.lines(transport)[0].startswith("550 5.1.1 <gone@example.net>: suppressed since"))
        transport.clear()
        self.conn.answer(2, None)
        self.assertEqual(self.lines(transport), ["250 2.1.5 Recipient ok"])

    def test_a_removal_in_redis_lifts_an_older_local_entry(self):
        self.journal.add("bob@example.net", reason="test", since=10.0)
        self.journal.refresh()
        session, transport = self.connect()
        self.send(session, transport, b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n")
        self.conn.answer(0, [1, 0])
        self.send(session, transport, b"RCPT TO:<bob@example.net>\r\n")
        transport.clear()
        self.conn.answer(1, '{"v":1,"op":"remove","address":"bob@example.net","time":20.0}')
        self.assertEqual(self.lines(transport), ["250 2.1.5 Recipient ok"])


class SharedAuthTests(SessionTestCase):
    def auth(self, session, transport, password: bytes) -> list[str]:
        blob = base64.b64encode(b"\0alice\0" + password).decode("ascii")
        return self.send(session, transport, f"AUTH PLAIN {blob}\r\n".encode("ascii"))

    def test_the_shared_count_is_checked_before_the_password(self):
        session, transport = self.connect(tls=True)
        self.send(session, transport, b"EHLO client.test\r\n")
        self.assertEqual(self.auth(session, transport, b"s3cret"), [])
        self.assertEqual(self.conn.sent[0][0], "EVALSHA")
        transport.clear()
        self.conn.answer(0, 3)                                # other relays' attempts: over the limit of 2
        self.assertEqual(self.lines(transport), ["421 4.7.0 relay.test Too many authentication failures, "
                                                 "closing connection"])
        self.assertTrue(transport.disconnecting)

    def test_a_good_password_refunds_its_own_attempt_in_redis(self):
        session, transport = self.connect(tls=True)
        self.send(session, transport, b"EHLO client.test\r\n")
        self.auth(session, transport, b"s3cret")
        member = self.conn.sent[0][-1]
        transport.clear()
        self.conn.answer(0, 1)
        self.assertEqual(self.lines(transport), ["235 2.7.0 Authentication successful"])
        self.assertEqual(self.conn.sent[1][0], "EVALSHA")
        self.assertEqual(self.conn.sent[1][-1], member)       # the refund names this very attempt
