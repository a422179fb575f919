# -*- test-case-name: tests.test_server_parts -*-
"""The session's collaborators on their own: Authenticator (auth.py), TransactionHandler (transaction.py)
and its BdatReceiver (bdat.py), each driven directly and answering through a channel that writes to a
StringTransport (replies.ISessionChannel), with task.Clock for the delays.  The protocol's own channel
(session.SessionChannel) provides the same interface."""
from __future__ import annotations


from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay import config
from mailrelay.server.auth import AUTH_FAILURE_DELAY, Authenticator
from mailrelay.server.factory import RelayServerFactory
from mailrelay.server.realm import FoldedLogin, IRelayUser, RelayRealm, build_portal
from mailrelay.server.replies import SESSION_LOG_NAMESPACE, ISessionChannel
from mailrelay.server.session import SessionChannel
from mailrelay.server.state import Connection, Transaction
from mailrelay.server.transaction import TransactionHandler
from tests.support.fakes import AllowAllPolicy, FakeQueue, memory_portal
from tests.support.session import Harness, b64


@implementer(ISessionChannel)
class TransportChannel:
    """Replies go to a StringTransport, as the protocol's would; hold, release and close are recorded."""

    def __init__(self, connection: Connection):
        self.connection = connection
        self.transport = StringTransport()
        self.calls: list[str] = []
        self.held = self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.transport.write(data)

    def send(self, code: int, status: str, text: str) -> None:
        self.write(f"{code} {status} {text}\r\n".encode("ascii"))

    def reply(self, reply) -> None:
        self.calls.append(f"reply {reply.code}")
        self.send(reply.code, reply.status, reply.text)

    def hold(self) -> None:
        assert not self.held, "hold twice"
        self.held = True
        self.calls.append("hold")

    def release(self) -> None:
        self.held = False
        self.calls.append("release")

    def close(self) -> None:
        self.closed = True
        self.calls.append("close")
        self.transport.loseConnection()

    def client_info(self):
        return self.connection.client_info()

    def lines(self) -> list[str]:
        """The reply lines written since the last call."""
        value = self.transport.value().decode("ascii")
        self.transport.clear()
        return value.splitlines()


class Parts:
    """A factory with the stand-ins of tests.support.fakes, and one session's state and channel."""

    def __init__(self, kind: str = "relay", portal=None, limits=None, queue=None):
        self.clock = Clock()
        self.queue = queue or FakeQueue()
        self.factory = RelayServerFactory(
            hostname="relay.test", listener=config.Listener(kind, "tcp:0"), limits=limits or config.Limits(),
            portal=portal, mechanisms=("PLAIN", "LOGIN"), policy=AllowAllPolicy(), queue=self.queue,
            clock=self.clock,
        )
        self.connection = Connection(address="192.0.2.7", port=4100, key="192.0.2.7", listener=kind,
                                     helo="client.test", esmtp=True, tls=True)
        self.transaction = Transaction()
        self.channel = TransportChannel(self.connection)

    def authenticator(self) -> Authenticator:
        return Authenticator(self.factory, self.connection, self.transaction, self.channel, self.clock)

    def handler(self) -> TransactionHandler:
        return TransactionHandler(self.factory, self.factory.limits, self.connection, self.transaction,
                                  self.channel, self.clock)


class ChannelTests(unittest.TestCase):
    def test_the_protocols_channel_and_the_test_channel_provide_the_interface(self):
        session = Harness().connect().protocol
        self.assertTrue(verifyObject(ISessionChannel, SessionChannel(session)))
        self.assertTrue(verifyObject(ISessionChannel, Parts().channel))

    def test_the_protocols_channel_writes_its_replies(self):
        client = Harness().connect()
        channel = SessionChannel(client.protocol)
        channel.send(250, "2.0.0", "Ok")
        channel.write(b"334 \r\n")
        self.assertEqual(client.transport.value(), b"250 2.0.0 Ok\r\n334 \r\n")
        channel.close()
        self.assertTrue(client.closed)


class _Checker:
    """Accepts alice's password and gives her login as the directory would: case-folded."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials):
        if credentials.password == b"s3cret":
            return defer.succeed(FoldedLogin(credentials.username.decode().casefold()))
        return defer.fail(UnauthorizedLogin())


implementer(ICredentialsChecker)(_Checker)


@implementer(IRealm)
class _RecordingRealm(RelayRealm):
    """The relay's realm, counting the logouts it is asked for."""

    def __init__(self):
        self.logouts = 0

    def requestAvatar(self, avatarId, mind, *interfaces):
        interface, avatar, _ = super().requestAvatar(avatarId, mind, *interfaces)
        return interface, avatar, self._logout

    def _logout(self):
        self.logouts += 1


class AuthenticatorTests(unittest.TestCase):
    def test_plain_sets_the_user_and_holds_input_while_checking(self):
        parts = Parts(portal=memory_portal(alice="s3cret"))
        auth = parts.authenticator()
        auth.command("PLAIN " + b64(b"\0alice\0s3cret"))
        self.assertEqual(parts.channel.lines(), ["235 2.7.0 Authentication successful"])
        self.assertEqual(parts.channel.calls, ["hold", "release"])
        self.assertEqual((parts.connection.user, parts.connection.user_folded, parts.connection.mechanism),
                         ("alice", False, "PLAIN"))
        self.assertFalse(auth.in_progress)

    def test_a_folded_login_is_known_as_folded_from_the_avatar(self):
        parts = Parts(portal=build_portal([_Checker()]))
        parts.authenticator().command("PLAIN " + b64(b"\0Alice\0s3cret"))
        self.assertEqual(parts.channel.lines(), ["235 2.7.0 Authentication successful"])
        self.assertEqual((parts.connection.user, parts.connection.user_folded), ("alice", True))

    def test_the_avatar_declares_what_the_session_reads(self):
        for login in (FoldedLogin("alice"), b"alice"):
            interface, avatar, _ = RelayRealm().requestAvatar(login, None, IRelayUser)
            self.assertTrue(verifyObject(IRelayUser, avatar))
            self.assertEqual(avatar.folded, isinstance(login, FoldedLogin))

    def test_login_prompts_twice_then_checks(self):
        parts = Parts(portal=memory_portal(alice="s3cret"))
        auth = parts.authenticator()
        auth.command("LOGIN")
        self.assertEqual(parts.channel.lines(), ["334 VXNlcm5hbWU6"])
        self.assertTrue(auth.in_progress)
        auth.response(b64(b"alice"))
        self.assertEqual(parts.channel.lines(), ["334 UGFzc3dvcmQ6"])
        auth.response(b64(b"s3cret"))
        self.assertEqual(parts.channel.lines(), ["235 2.7.0 Authentication successful"])
        self.assertEqual(parts.connection.user, "alice")

    def test_a_star_cancels_the_exchange(self):
        parts = Parts(portal=memory_portal(alice="s3cret"))
        auth = parts.authenticator()
        auth.command("PLAIN")
        self.assertEqual(parts.channel.lines(), ["334 "])
        auth.response("*")
        self.assertEqual(parts.channel.lines(), ["501 5.7.0 Authentication cancelled"])
        self.assertFalse(auth.in_progress)
        self.assertIsNone(parts.connection.user)

    def test_a_wrong_password_is_answered_after_the_delay_and_input_waits_until_then(self):
        parts = Parts(portal=memory_portal(alice="s3cret"))
        parts.authenticator().command("PLAIN " + b64(b"\0alice\0wrong"))
        self.assertEqual(parts.channel.lines(), [])
        self.assertTrue(parts.channel.held)
        parts.clock.advance(AUTH_FAILURE_DELAY)
        self.assertEqual(parts.channel.lines(), ["535 5.7.8 Authentication credentials invalid"])
        self.assertEqual(parts.channel.calls, ["hold", "release"])
        self.assertIsNone(parts.connection.user)

    def test_connection_lost_cancels_the_pending_refusal_and_logs_out_once(self):
        realm = _RecordingRealm()
        portal = Portal(realm, [_Checker()])
        parts = Parts(portal=portal)
        auth = parts.authenticator()
        auth.command("PLAIN " + b64(b"\0alice\0s3cret"))
        auth.connection_lost()
        auth.connection_lost()
        self.assertEqual(realm.logouts, 1)
        other = Parts(portal=portal)
        failing = other.authenticator()
        failing.command("PLAIN " + b64(b"\0alice\0wrong"))
        self.assertEqual(len(other.clock.getDelayedCalls()), 1)
        failing.connection_lost()
        self.assertEqual(other.clock.getDelayedCalls(), [])
        other.clock.advance(AUTH_FAILURE_DELAY)
        self.assertEqual(other.channel.lines(), [])

    def test_refusals_in_their_order(self):
        parts = Parts(portal=memory_portal(alice="s3cret"))
        auth = parts.authenticator()
        parts.transaction.mail = object()
        auth.command("PLAIN")
        parts.connection.user = "bob"
        auth.command("PLAIN")
        parts.connection.helo = None
        auth.command("PLAIN")
        parts.connection.tls = False
        auth.command("PLAIN")
        self.assertEqual([" ".join(line.split()[:2]) for line in parts.channel.lines()],
                         ["503 5.5.1", "503 5.5.1", "503 5.5.1", "538 5.7.11"])
        self.assertEqual(parts.channel.calls, ["reply 503", "reply 503", "reply 503", "reply 538"])

    def test_too_many_failures_close_the_connection(self):
        parts = Parts(portal=memory_portal(alice="s3cret"), limits=config.Limits(auth_failures_per_minute=1))
        auth = parts.authenticator()
        auth.command("PLAIN " + b64(b"\0alice\0wrong"))
        parts.clock.advance(AUTH_FAILURE_DELAY)
        parts.channel.lines()
        auth.command("PLAIN " + b64(b"\0alice\0s3cret"))
        self.assertEqual(parts.channel.lines(),
                         ["421 4.7.0 relay.test Too many authentication failures, closing connection"])
        self.assertTrue(parts.channel.closed)
        self.assertIsNone(parts.connection.user)


class TransactionHandlerTests(unittest.TestCase):
    BODY = b"Subject: hi\r\n\r\nHello\r\n"

    def begin(self, parts: Parts) -> TransactionHandler:
        handler = parts.handler()
        handler.mail("FROM:<a@example.org>")
        handler.rcpt("TO:<b@example.net>")
        self.assertEqual(parts.channel.lines(), ["250 2.1.0 Sender ok", "250 2.1.5 Recipient ok"])
        return handler

    def test_mail_rcpt_data_and_the_commit(self):
        parts = Parts()
        handler = self.begin(parts)
        self.assertEqual((parts.transaction.sender, parts.transaction.recipients),
                         ("a@example.org", ["b@example.net"]))
        handler.data("")
        self.assertEqual(parts.channel.lines(), ["354 End data with <CR><LF>.<CR><LF>"])
        self.assertTrue(handler.reading_data and handler.receiving and handler.writing)
        self.assertIsNone(handler.feed_data(self.BODY[:9]))
        self.assertEqual(handler.feed_data(self.BODY[9:] + b".\r\nQUIT\r\n"), b"QUIT\r\n")
        handler.data_done()
        self.assertEqual(parts.channel.lines(), ["250 2.0.0 Ok: queued as Q000001"])
        self.assertEqual(parts.channel.calls, ["hold", "release"])
        message = parts.queue.messages[0]
        received = message.data.split(b"\r\n")[0]
        self.assertTrue(received.startswith(b"Received: from client.test (") and b"192.0.2.7" in received, received)
        self.assertTrue(message.data.endswith(b"\r\n" + self.BODY))
        self.assertEqual((message.envelope.sender, message.envelope.recipients, message.envelope.client_address),
                         ("a@example.org", ("b@example.net",), "192.0.2.7"))
        self.assertEqual(parts.connection.accepted, 1)
        self.assertEqual(parts.transaction, Transaction())
        self.assertFalse(handler.reading_data or handler.receiving or handler.writing)

    def test_input_waits_while_the_commit_is_pending(self):
        parts = Parts(queue=FakeQueue(commit_mode="pending"))
        handler = self.begin(parts)
        handler.data("")
        handler.feed_data(self.BODY + b".\r\n")
        handler.data_done()
        self.assertEqual(parts.channel.lines(), ["354 End data with <CR><LF>.<CR><LF>"])
        self.assertTrue(parts.channel.held and handler.writing)
        parts.queue.writers[0].pending.callback("Q000001")
        self.assertEqual(parts.channel.lines(), ["250 2.0.0 Ok: queued as Q000001"])
        self.assertFalse(parts.channel.held or handler.writing)

    def test_a_failed_commit_is_451_and_the_writer_aborted(self):
        parts = Parts(queue=FakeQueue(commit_mode="fail"))
        handler = self.begin(parts)
        handler.data("")
        handler.feed_data(self.BODY + b".\r\n")
        handler.data_done()
        self.assertEqual(parts.channel.lines()[-1], "451 4.3.0 Could not queue the message, try again later")
        self.assertTrue(parts.queue.writers[0].aborted)
        self.assertEqual((parts.connection.accepted, parts.transaction.open), (0, False))
        self.flushLoggedErrors(OSError)

    def test_the_queued_line_is_written_unless_the_queue_says_it_is_written_behind_it(self):
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for logs_queued in (False, True):
            queue = FakeQueue()
            queue.logs_queued = logs_queued
            parts = Parts(queue=queue)
            handler = self.begin(parts)
            handler.data("")
            handler.feed_data(self.BODY + b".\r\n")
            handler.data_done()
            self.assertEqual(parts.channel.lines()[-1], "250 2.0.0 Ok: queued as Q000001")
        queued = [e for e in events if e.get("stage") == "queued"]
        self.assertEqual([(e["queue_id"], e["log_namespace"]) for e in queued], [("Q000001", SESSION_LOG_NAMESPACE)])

    def test_a_queue_that_refuses_the_message_gets_451_at_the_end_of_data(self):
        parts = Parts()
        parts.queue.new_message = lambda envelope: 1 / 0
        handler = self.begin(parts)
        handler.data("")
        self.assertFalse(handler.writing)
        self.assertTrue(handler.write_failed)
        self.assertEqual(handler.feed_data(self.BODY + b".\r\n"), b"")
        handler.data_done()
        self.assertEqual(parts.channel.lines(), ["354 End data with <CR><LF>.<CR><LF>",
                                                 "451 4.3.0 Local error in processing, try again later"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_order_and_abort(self):
        parts = Parts()
        parts.connection.helo = None
        handler = parts.handler()
        handler.mail("FROM:<a@example.org>")
        handler.rcpt("TO:<b@example.net>")
        handler.data("")
        self.assertEqual([" ".join(line.split()[:2]) for line in parts.channel.lines()], ["503 5.5.1"] * 3)
        parts.connection.helo = "client.test"
        handler = self.begin(parts)
        handler.data("")
        handler.feed_data(b"Subject: partial\r\n")
        writer = parts.queue.writers[0]
        handler.abort()
        self.assertTrue(writer.aborted)
        self.assertFalse(handler.receiving or parts.transaction.open)
        self.assertEqual(parts.queue.messages, [])


class BdatReceiverTests(unittest.TestCase):
    def test_chunks_are_read_by_count_wherever_they_sit_in_the_buffer(self):
        parts = Parts()
        handler = TransactionHandlerTests.begin(self, parts)
        handler.bdat("13")
        self.assertTrue(handler.reading_chunk)
        buffer = b"NOOP\r\nSubject: a"
        self.assertEqual(handler.feed_chunk(buffer, 6), (len(buffer), False))      # 10 of its 13 octets
        self.assertEqual(parts.channel.lines(), [])
        self.assertEqual(handler.feed_chunk(b"b\r\nNOOP\r\n", 0), (3, True))       # the rest is a command
        handler.chunk_done()
        self.assertEqual(parts.channel.lines(), ["250 2.0.0 Ok: 13 octets"])
        self.assertFalse(handler.reading_chunk)
        handler.bdat("8 LAST")
        self.assertEqual(handler.feed_chunk(b"\r\nbody\r\n", 0), (8, True))
        handler.chunk_done()
        self.assertEqual(parts.channel.lines(), ["250 2.0.0 Ok: queued as Q000001"])
        self.assertTrue(parts.queue.messages[0].data.endswith(b"\r\nSubject: ab\r\n\r\nbody\r\n"))
        self.assertEqual(parts.channel.calls, ["hold", "release"])
        self.assertFalse(handler.receiving or parts.transaction.open)

    def test_a_chunk_without_a_transaction_is_read_then_refused(self):
        parts = Parts()
        handler = parts.handler()
        handler.bdat("4 LAST")
        self.assertTrue(handler.reading_chunk)
        self.assertEqual(handler.feed_chunk(b"DATA", 0), (4, True))
        handler.chunk_done()
        self.assertEqual(parts.channel.lines(), ["503 5.5.1 Need MAIL and RCPT before BDAT"])
        self.assertEqual(parts.queue.writers, [])

    def test_an_unreadable_size_closes_the_connection(self):
        parts = Parts()
        handler = TransactionHandlerTests.begin(self, parts)
        handler.bdat("ten LAST")
        self.assertEqual(parts.channel.lines(),
                         ["501 5.5.4 Syntax: BDAT <size> [LAST]; the chunk size is unreadable, closing connection"])
        self.assertTrue(parts.channel.closed)
        self.assertFalse(handler.reading_chunk or parts.transaction.open)

    def test_data_and_rcpt_after_a_chunk_are_refused(self):
        parts = Parts()
        handler = TransactionHandlerTests.begin(self, parts)
        handler.bdat("0")
        handler.data("")
        handler.rcpt("TO:<c@example.net>")
        self.assertEqual(parts.channel.lines(), ["250 2.0.0 Ok: 0 octets", "503 5.5.1 DATA after BDAT: send RSET first",
                                                 "503 5.5.1 RCPT after BDAT: send RSET first"])
        self.assertEqual(parts.transaction.recipients, ["b@example.net"])
