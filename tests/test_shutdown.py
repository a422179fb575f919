"""Graceful shutdown: listeners stop accepting, idle sessions get 421 4.3.2, a transaction in progress
may finish (its client still gets 250), and what is not delivered stays in the spool.

Three layers: session conversations over StringTransport and task.Clock (the grace period included);
the in-process relay's stopService over real loopback sockets; and a real twistd sent SIGTERM while a
client is in the middle of DATA.
"""
from __future__ import annotations

import signal
import socket

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from mailrelay.server.factory import CLOSE_BOUND
from tests.support.polling import eventually
from tests.support.relay import SEPARATE, RelayFixture
from tests.support.sink import Sink
from tests.support.session import Harness

GRACE = 30.0
BODY_HEAD = b"Subject: graceful\r\nMessage-ID: <graceful@example.org>\r\n\r\nfirst half\r\n"
BODY_TAIL = b"second half\r\n.\r\n"


def codes(reply: str) -> list[str]:
    return [" ".join(line.split(" ")[:2]) for line in reply.splitlines()]


class SessionShutdownTests(unittest.TestCase):
    """The factory's shut_down() and the sessions' answers, client line by server reply."""

    def setUp(self):
        self.harness = Harness()
        self.factory = self.harness.factory

    def start_data(self):
        client = self.harness.connect()
        client.cmd("EHLO client.test")
        client.cmd("MAIL FROM:<a@example.org>")
        client.cmd("RCPT TO:<b@example.org>")
        self.assertEqual(codes(client.cmd("DATA")), ["354 End"])
        self.assertEqual(client.send(BODY_HEAD), "")
        return client

    def test_idle_session_gets_421_4_3_2_and_is_closed(self):
        client = self.harness.connect()
        client.cmd("EHLO client.test")
        client.transport.clear()
        stopped = self.factory.shut_down(GRACE)
        self.assertEqual(codes(client.transport.value().decode()), ["421 4.3.2"])
        self.assertTrue(client.closed)
        self.assertNoResult(stopped)
        client.protocol.connectionLost(None)
        self.successResultOf(stopped)

    def test_shut_down_without_sessions_is_immediate(self):
        self.successResultOf(self.factory.shut_down(GRACE))

    def test_transaction_in_data_finishes_with_250_and_then_quit_gets_221(self):
        client = self.start_data()
        stopped = self.factory.shut_down(GRACE)
        self.assertEqual(client.transport.value(), b"")
        self.assertFalse(client.closed)
        self.assertEqual(codes(client.send(BODY_TAIL)), ["250 2.0.0"])
        self.assertEqual(len(self.harness.queue.messages), 1)
        self.assertIn(b"second half", self.harness.queue.messages[0].data)
        self.assertEqual(codes(client.cmd("QUIT")), ["221 2.0.0"])
        self.assertNoResult(stopped)
        client.protocol.connectionLost(None)
        self.successResultOf(stopped)

    def test_after_the_transaction_a_new_mail_gets_421_4_3_2(self):
        client = self.start_data()
        self.factory.shut_down(GRACE)
        client.send(BODY_TAIL)
        self.assertEqual(codes(client.cmd("MAIL FROM:<a@example.org>")), ["421 4.3.2"])
        self.assertTrue(client.closed)
        self.assertEqual(len(self.harness.queue.writers), 1)

    def test_pipelined_quit_after_the_final_dot_is_answered_221(self):
        client = self.start_data()
        self.factory.shut_down(GRACE)
        self.assertEqual(codes(client.send(BODY_TAIL + b"QUIT\r\n")), ["250 2.0.0", "221 2.0.0"])

    def test_session_between_mail_and_data_may_go_on(self):
        client = self.harness.connect()
        client.cmd("EHLO client.test")
        client.cmd("MAIL FROM:<a@example.org>")
        self.factory.shut_down(GRACE)
        self.assertEqual(codes(client.cmd("RCPT TO:<b@example.org>")), ["250 2.1.5"])
        self.assertEqual(codes(client.cmd("DATA")), ["354 End"])
        self.assertEqual(codes(client.send(BODY_HEAD + BODY_TAIL)), ["250 2.0.0"])

    def test_rset_ends_the_transaction_and_the_next_command_gets_421(self):
        client = self.harness.connect()
        client.cmd("EHLO client.test")
        client.cmd("MAIL FROM:<a@example.org>")
        self.factory.shut_down(GRACE)
        self.assertEqual(codes(client.cmd("RSET")), ["250 2.0.0"])
        self.assertEqual(codes(client.cmd("NOOP")), ["421 4.3.2"])
        self.assertTrue(client.closed)

    def test_transaction_outlasting_the_grace_is_closed_with_421_and_nothing_is_queued(self):
        client = self.start_data()
        stopped = self.factory.shut_down(GRACE)
        self.harness.clock.advance(GRACE - 1)
        self.assertFalse(client.closed)
        self.harness.clock.advance(1)
        self.assertEqual(codes(client.transport.value().decode()), ["421 4.3.2"])
        self.assertTrue(client.closed)
        self.assertTrue(self.harness.queue.writers[0].aborted)
        self.assertEqual(self.harness.queue.messages, [])
        self.assertNoResult(stopped)
        self.harness.clock.advance(CLOSE_BOUND)     # the connection never went away: cut, and done
        self.successResultOf(stopped)

    def test_a_commit_under_way_at_the_end_of_the_grace_still_gets_its_250(self):
        self.harness.queue.commit_mode = "pending"
        client = self.start_data()
        self.factory.shut_down(GRACE)
        client.send(BODY_TAIL)
        self.harness.clock.advance(GRACE)
        self.assertEqual(client.transport.value(), b"")
        self.assertFalse(client.closed)
        self.harness.queue.writers[0].pending.callback("Q000001")
        self.assertEqual(codes(client.transport.value().decode()), ["250 2.0.0"])

    def test_connection_arriving_during_shutdown_gets_421_4_3_2(self):
        self.factory.shut_down(GRACE)
        client = self.harness.connect()
        self.assertEqual(codes(client.greeting), ["421 4.3.2"])
        self.assertTrue(client.closed)
        self.assertEqual(self.factory.open_sessions, 0)


# -- real sockets ---------------------------------------------------------------------------------

class BlockingClient:
    """A plain blocking SMTP client (run in a thread): raw lines out, whole replies in."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buffer = b""

    def reply(self) -> str:
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                data = self.sock.recv(4096)
                if not data:
                    raise ConnectionError(f"closed after {lines!r}")
                self.buffer += data
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode("latin-1"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    def command(self, line: str) -> str:
        self.sock.sendall(line.encode("ascii") + b"\r\n")
        return self.reply()

    def closed_by_peer(self) -> bool:
        return self.buffer == b"" and self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


def start_transaction(port: int) -> BlockingClient:
    """Connect, and stop half-way through the body of a message."""
    client = BlockingClient(port)
    client.reply()
    client.command("EHLO client.test")
    assert client.command("MAIL FROM:<app@example.org>").startswith("250"), "MAIL refused"
    assert client.command("RCPT TO:<user@example.com>").startswith("250"), "RCPT refused"
    assert client.command("DATA").startswith("354"), "DATA refused"
    client.sock.sendall(BODY_HEAD)
    return client


def open_idle(port: int) -> BlockingClient:
    client = BlockingClient(port)
    client.reply()
    client.command("EHLO client.test")
    return client


def finish_transaction(client: BlockingClient) -> tuple[str, str]:
    client.sock.sendall(BODY_TAIL)
    final = client.reply()
    return final, client.command("QUIT")


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


class RelayShutdownTests(unittest.TestCase):
    """In the default mode (a delivery process): a delivery process still starting up when the stop
    begins may find the message in the spool and deliver it; either way it is never lost or doubled."""
    timeout = 60
    PROCESS = SEPARATE

    def setUp(self):
        self.sink = Sink()
        port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        self.relay = RelayFixture(self.mktemp(), extra=(
            f'[transports.sink]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n'), process=self.PROCESS)
        self.addCleanup(self.relay.stop)
        self.clients: list[BlockingClient] = []
        self.addCleanup(lambda: [c.close() for c in self.clients])

    def track(self, client: BlockingClient) -> BlockingClient:
        self.clients.append(client)
        return client

    @defer.inlineCallbacks
    def test_stop_service_closes_idle_sessions_lets_a_transaction_finish_and_keeps_its_message(self):
        service = self.relay.start(reactor)
        port = self.relay.ports["relay"]
        idle = self.track((yield threads.deferToThread(open_idle, port)))
        busy = self.track((yield threads.deferToThread(start_transaction, port)))

        stopped = service.stopService()
        self.assertEqual(codes((yield threads.deferToThread(idle.reply))), ["421 4.3.2"])
        self.assertTrue((yield threads.deferToThread(idle.closed_by_peer)))
        self.assertTrue((yield threads.deferToThread(refused, port)), "the listener still accepts")
        self.assertFalse(stopped.called, "stopped while a transaction was in progress")

        final, bye = yield threads.deferToThread(finish_transaction, busy)
        self.assertEqual(codes(final)[0], "250 2.0.0")
        self.assertEqual(codes(bye), ["221 2.0.0"])
        yield stopped
        kept = len(list((self.relay.dir / "spool" / "queue").iterdir()))
        self.assertEqual(kept + len(self.sink.messages), 1)       # kept for the next start, or delivered
        if self.PROCESS == "inline":
            self.assertEqual(kept, 1)                             # the scheduler stopped before the commit

        self.relay.start(reactor)
        delivered = yield self.sink.wait_for(1)
        self.assertIn(b"<graceful@example.org>", delivered[0].data)
        self.assertIn(b"second half", delivered[0].data)
        queue = self.relay.dir / "spool" / "queue"
        yield eventually(lambda: not any(queue.iterdir()), timeout=5, interval=0.05)
        self.assertEqual(len(self.sink.messages), 1)              # once


class InlineRelayShutdownTests(RelayShutdownTests):
    PROCESS = "inline"


class TwistdSigtermTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.sink = Sink()
        port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        self.relay = RelayFixture(self.mktemp(), extra=(
            f'[transports.sink]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n'), process=SEPARATE)
        self.addCleanup(self.relay.kill)
        self.clients: list[BlockingClient] = []
        self.addCleanup(lambda: [c.close() for c in self.clients])

    @defer.inlineCallbacks
    def test_sigterm_in_the_middle_of_data_still_answers_250_and_the_message_is_delivered(self):
        sink = self.sink
        process = yield threads.deferToThread(self.relay.spawn)
        port = self.relay.ports["relay"]
        idle = yield threads.deferToThread(open_idle, port)
        busy = yield threads.deferToThread(start_transaction, port)
        self.clients += [idle, busy]

        process.send_signal(signal.SIGTERM)
        # The idle connection's 421 shows the shutdown has begun; the transaction then completes.
        self.assertEqual(codes((yield threads.deferToThread(idle.reply))), ["421 4.3.2"])
        final, bye = yield threads.deferToThread(finish_transaction, busy)
        self.assertEqual(codes(final)[0], "250 2.0.0")
        self.assertEqual(codes(bye), ["221 2.0.0"])
        # twistd re-raises the signal that stopped it once shutdown is complete, so its status says SIGTERM.
        self.assertIn((yield threads.deferToThread(process.wait, 60)), (0, -signal.SIGTERM))
        log = (self.relay.dir / "twistd.log").read_text()
        self.assertIn("shutting down", log)
        self.assertNotIn("Traceback", log)

        if not sink.messages:                # accepted while stopping: kept in the spool for the next start
            yield threads.deferToThread(self.relay.spawn)
        delivered = yield sink.wait_for(1)
        self.assertIn(b"<graceful@example.org>", delivered[0].data)
        self.assertIn(b"second half", delivered[0].data)
