"""RelayServerFactory on real loopback sockets with real TLS (certificates from generate_self_signed)."""
from __future__ import annotations

import base64
from pathlib import Path

from twisted.internet import defer, protocol, reactor, ssl
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from mailrelay import config
from mailrelay.server.factory import RelayServerFactory
from mailrelay.server.session import RelaySession
from mailrelay.tls import generate_self_signed, server_options
from tests.support.fakes import AllowAllPolicy, FakeQueue, memory_portal

HOSTNAME = "relay.test"


class TrackedSession(RelaySession):
    """Fires `lost` when the server side of the connection is gone, so tests can clean up fully."""

    def __init__(self, factory):
        super().__init__(factory)
        self.lost = defer.Deferred()
        factory.sessions.append(self)

    def connectionLost(self, reason=None):
        super().connectionLost(reason)
        self.lost.callback(None)


class SMTPTestClient(protocol.Protocol):
    """A deliberately dumb client: sends raw bytes, reads whole replies (multi-line joined)."""

    def __init__(self):
        self.buffer = b""
        self.replies: list[str] = []
        self.waiting: list[defer.Deferred] = []
        self.connected_d = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.connected_d.callback(self)

    def dataReceived(self, data):
        self.buffer += data
        while b"\r\n" in self.buffer:
            end = 0
            lines = []
            while True:
                nl = self.buffer.find(b"\r\n", end)
                if nl < 0:
                    return
                line = self.buffer[end:nl].decode("latin-1")
                lines.append(line)
                end = nl + 2
                if line[3:4] != "-":
                    break
            self.buffer = self.buffer[end:]
            self.replies.append("\n".join(lines))
            self._deliver()

    def _deliver(self):
        while self.waiting and self.replies:
            self.waiting.pop(0).callback(self.replies.pop(0))

    def reply(self) -> defer.Deferred:
        d = defer.Deferred()
        self.waiting.append(d)
        self._deliver()
        return d

    def send(self, data: bytes | str) -> defer.Deferred:
        self.transport.write(data.encode() if isinstance(data, str) else data)
        return self.reply()

    def connectionLost(self, reason):
        self.lost.callback(None)


class NetworkTestBase(unittest.TestCase):
    def setUp(self):
        cert_pem, key_pem = generate_self_signed(HOSTNAME)
        pem = Path(self.mktemp())
        pem.write_bytes(cert_pem + key_pem)
        self.server_tls = server_options(pem)
        self.client_tls = ssl.optionsForClientTLS(HOSTNAME, trustRoot=ssl.Certificate.loadPEM(cert_pem))
        self.queue, self.policy = FakeQueue(), AllowAllPolicy()

    def listen(self, kind="relay", implicit_tls=False, portal=None, limits=None):
        factory = RelayServerFactory(
            hostname=HOSTNAME, listener=config.Listener(kind, "tcp:0"), limits=limits or config.Limits(),
            portal=portal, mechanisms=("PLAIN", "LOGIN"), policy=self.policy, queue=self.queue,
            tls_options=None if implicit_tls else self.server_tls,
        )
        factory.protocol = TrackedSession
        factory.sessions = []
        listening = TLSMemoryBIOFactory(self.server_tls, False, factory) if implicit_tls else factory
        # A burst of 400 connects overflows the default accept backlog (50): the kernel then drops
        # handshakes and the test would measure TCP retransmission, not the server.
        port = reactor.listenTCP(0, listening, backlog=1024, interface="127.0.0.1")
        self.addCleanup(self._stop, port, factory)
        self.port_number = port.getHost().port
        return factory

    @defer.inlineCallbacks
    def _stop(self, port, factory):
        yield port.stopListening()
        yield defer.gatherResults([s.lost for s in factory.sessions])

    @defer.inlineCallbacks
    def connect(self, implicit_tls=False):
        """Connect a new SMTPTestClient; returns (client, greeting)."""
        client = SMTPTestClient()
        factory = protocol.ClientFactory.forProtocol(lambda: client)
        if implicit_tls:
            factory = TLSMemoryBIOFactory(self.client_tls, True, factory)
        reactor.connectTCP("127.0.0.1", self.port_number, factory)
        yield client.connected_d
        self.addCleanup(self._close_client, client)
        greeting = yield client.reply()
        return client, greeting

    def _close_client(self, client):
        if client.transport is not None and client.transport.connected:
            client.transport.loseConnection()
        return client.lost


class StartTLSNetworkTests(NetworkTestBase):
    @defer.inlineCallbacks
    def test_mail_pipelined_behind_starttls_is_not_executed(self):
        self.listen()
        client, greeting = yield self.connect()
        self.assertTrue(greeting.startswith("220 relay.test"))
        yield client.send("EHLO client.test\r\n")
        # One packet: STARTTLS and an injected MAIL (CVE-2011-0411 class).
        reply = yield client.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
        self.assertEqual(reply, "220 2.0.0 Ready to start TLS")
        client.transport.startTLS(self.client_tls)
        reply = yield client.send("RCPT TO:<b@example.org>\r\n")
        self.assertTrue(reply.startswith("503 5.5.1"), reply)     # no MAIL, no EHLO survived
        ehlo = yield client.send("EHLO client.test\r\n")
        self.assertNotIn("STARTTLS", ehlo)
        reply = yield client.send("MAIL FROM:<a@example.org>\r\n")
        self.assertTrue(reply.startswith("250 2.1.0"))
        self.assertEqual(len(self.policy.clients), 1)
        self.assertTrue(self.policy.clients[0].tls.startswith("TLSv1."))
        yield client.send("QUIT\r\n")

    @defer.inlineCallbacks
    def test_auth_plain_after_starttls_on_submission(self):
        self.listen(kind="submission", portal=memory_portal(alice="s3cret"))
        client, _ = yield self.connect()
        ehlo = yield client.send("EHLO client.test\r\n")
        self.assertNotIn("AUTH", ehlo)
        reply = yield client.send("AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret").decode() + "\r\n")
        self.assertTrue(reply.startswith("538 5.7.11"))
        yield client.send("STARTTLS\r\n")
        client.transport.startTLS(self.client_tls)
        ehlo = yield client.send("EHLO client.test\r\n")
        self.assertIn("AUTH PLAIN LOGIN", ehlo)
        reply = yield client.send("AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret").decode() + "\r\n")
        self.assertEqual(reply, "235 2.7.0 Authentication successful")
        replies = yield self._transaction(client)
        self.assertEqual(replies[-1], "250 2.0.0 Ok: queued as Q000001")
        self.assertIn(b"with ESMTPSA (version=TLSv1.3 cipher=", self.queue.messages[0].data)
        self.assertNotIn(b"alice", self.queue.messages[0].data)        # [auth] received_shows_user = false

    @defer.inlineCallbacks
    def _transaction(self, client):
        # PIPELINING: the whole transaction in one write.
        replies = [(yield client.send("MAIL FROM:<alice@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"))]
        replies.append((yield client.reply()))
        replies.append((yield client.reply()))
        replies.append((yield client.send(b"Subject: hi\r\n\r\nHello\r\n.\r\n")))
        defer.returnValue(replies)

    @defer.inlineCallbacks
    def test_ehlo_with_embedded_lf_is_refused(self):
        self.listen()
        client, _ = yield self.connect()
        reply = yield client.send(b"EHLO evil\nX-Injected: yes\r\n")
        self.assertTrue(reply.startswith("501 5.5.4"), reply)
        reply = yield client.send("MAIL FROM:<a@example.org>\r\n")
        self.assertTrue(reply.startswith("503 5.5.1"), reply)


class ImplicitTLSNetworkTests(NetworkTestBase):
    @defer.inlineCallbacks
    def test_implicit_tls_offers_auth_not_starttls_and_accepts_mail(self):
        self.listen(kind="submissions", implicit_tls=True, portal=memory_portal(alice="s3cret"))
        client, greeting = yield self.connect(implicit_tls=True)
        self.assertEqual(greeting, "220 relay.test ESMTP mailrelay")
        ehlo = yield client.send("EHLO client.test\r\n")
        self.assertIn("AUTH PLAIN LOGIN", ehlo)
        self.assertNotIn("STARTTLS", ehlo)
        reply = yield client.send("STARTTLS\r\n")
        self.assertTrue(reply.startswith("503 5.5.1"))
        reply = yield client.send("MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(reply, "530 5.7.0 Authentication required")
        reply = yield client.send("AUTH LOGIN\r\n")
        reply = yield client.send(base64.b64encode(b"alice") + b"\r\n")
        reply = yield client.send(base64.b64encode(b"s3cret") + b"\r\n")
        self.assertEqual(reply, "235 2.7.0 Authentication successful")
        replies = yield StartTLSNetworkTests._transaction(self, client)
        self.assertEqual(replies, ["250 2.1.0 Sender ok", "250 2.1.5 Recipient ok",
                                   "354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 Ok: queued as Q000001"])
        self.assertEqual(self.queue.messages[0].envelope.tls.split()[0], "TLSv1.3")


class ManyConnectionsTests(NetworkTestBase):
    @defer.inlineCallbacks
    def test_four_hundred_simultaneous_connections_are_all_greeted(self):
        factory = self.listen(limits=config.Limits(max_connections=1000, max_connections_per_ip=1000))
        results = yield defer.gatherResults([self.connect() for _ in range(400)])
        self.assertEqual({greeting for _, greeting in results}, {"220 relay.test ESMTP mailrelay"})
        self.assertEqual(factory.connections.total, 400)

    @defer.inlineCallbacks
    def test_connection_beyond_the_per_ip_cap_is_421(self):
        self.listen(limits=config.Limits(max_connections_per_ip=2))
        first = yield self.connect()
        second = yield self.connect()
        third, greeting = yield self.connect()
        self.assertTrue(greeting.startswith("421 4.7.0"))
        yield third.lost
        self.assertEqual([first[1][:3], second[1][:3]], ["220", "220"])
