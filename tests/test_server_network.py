"""RelayServerFactory on real loopback sockets with real TLS (certificates from generate_self_signed)."""
from __future__ import annotations

import base64
import socket

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from mailrelay import config
from tests.support.fakes import memory_portal
from tests.support.network import NetworkTestBase


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


class CloseNetworkTests(NetworkTestBase):
    """The close after QUIT (and after a 421): the last reply first, then the FIN, nothing after it."""

    @defer.inlineCallbacks
    def raw_session(self, **listen):
        """A blocking client socket, its greeting read, and the server's session for it."""
        factory = self.listen(**listen)
        client = socket.create_connection(("127.0.0.1", self.port_number), timeout=10)
        self.addCleanup(client.close)
        while not factory.sessions:
            yield deferLater(reactor, 0.001, lambda: None)
        greeting = client.recv(512)
        return client, factory.sessions[0], greeting

    @staticmethod
    def read_to_eof(client: socket.socket) -> bytes:
        data = b""
        while chunk := client.recv(65536):
            data += chunk
        return data

    @defer.inlineCallbacks
    def test_the_221_and_the_fin_are_sent_while_quit_is_handled(self):
        client, session, greeting = yield self.raw_session()
        self.assertEqual(greeting, b"220 relay.test ESMTP mailrelay\r\n")
        # QUIT handed to the session directly: the reactor does not turn before the client reads the close.
        session.dataReceived(b"QUIT\r\n")
        self.assertEqual(self.read_to_eof(client), b"221 2.0.0 relay.test Bye\r\n")
        yield session.lost

    @defer.inlineCallbacks
    def test_a_421_for_a_line_too_long_is_followed_by_the_close(self):
        client, session, _ = yield self.raw_session()
        session.dataReceived(b"X" * 20_000)    # unread input left: the 421 is buffered, sent on the next turn
        yield session.lost
        self.assertEqual(self.read_to_eof(client),
                         b"421 4.5.2 relay.test Line too long, closing connection\r\n")

    @defer.inlineCallbacks
    def test_pipelined_commands_before_quit_are_all_answered_before_the_close(self):
        self.listen()
        client, _ = yield self.connect()
        client.transport.write(b"EHLO client.test\r\nNOOP\r\nRSET\r\nQUIT\r\n")
        yield client.lost
        self.assertEqual([reply[:3] for reply in client.replies], ["250", "250", "250", "221"])
        self.assertEqual(client.replies[-1], "221 2.0.0 relay.test Bye")

    @defer.inlineCallbacks
    def test_nothing_pipelined_after_quit_is_answered(self):
        self.listen()
        client, _ = yield self.connect()
        client.transport.write(b"QUIT\r\nNOOP\r\nMAIL FROM:<a@example.org>\r\n")
        yield client.lost
        self.assertEqual(client.replies, ["221 2.0.0 relay.test Bye"])

    @defer.inlineCallbacks
    def test_quit_after_a_committed_message(self):
        self.listen()
        client, _ = yield self.connect()
        yield client.send("EHLO client.test\r\n")
        replies = yield StartTLSNetworkTests._transaction(self, client)
        self.assertEqual(replies[-1], "250 2.0.0 Ok: queued as Q000001")
        reply = yield client.send("QUIT\r\n")
        self.assertEqual(reply, "221 2.0.0 relay.test Bye")
        yield client.lost
        self.assertEqual(len(self.queue.messages), 1)

    @defer.inlineCallbacks
    def test_quit_after_starttls_closes_through_tls(self):
        self.listen()
        client, _ = yield self.connect()
        yield client.send("EHLO client.test\r\n")
        yield client.send("STARTTLS\r\n")
        client.transport.startTLS(self.client_tls)
        yield client.send("EHLO client.test\r\n")
        reply = yield client.send("QUIT\r\n")
        self.assertEqual(reply, "221 2.0.0 relay.test Bye")
        yield client.lost
