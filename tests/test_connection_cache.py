"""mailrelay.outbound.pool and the client's idle connections: batches that follow one another reuse one
connection to the next hop.

Three layers: the pool alone with stand-in clients over task.Clock (parking, bounds, expiry, close);
the delivery client over a StringTransport (no QUIT when parked, MAIL FROM first on reuse, when a
connection is not fit to park, a dead parked connection); and real deliveries to the loopback sink
(tests.support.sink), whose recorded sessions show how many connections carried the messages —
plaintext, STARTTLS with AUTH, and direct MX delivery.
"""
from __future__ import annotations

import time

from twisted.internet import defer, error, reactor, task
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailrelay import config
from mailrelay.config import DeliveryConfig, QueueConfig, Route
from mailrelay.outbound.client import DeliveryClient
from mailrelay.outbound.connect import deliver_over
from mailrelay.queue.job import Job, SessionParams
from mailrelay.outbound.dns import MXResolver
from mailrelay.outbound.mx import MXDelivery
from mailrelay.queue.routes import Router
from mailrelay.queue.scheduler import Scheduler
from mailrelay.outbound.pool import IDLE_TIME, MAX_IDLE_PER_KEY, REUSE_TIME_LIMIT, ConnectionPool, PoolKey
from mailrelay.outbound.smarthost import SmarthostTransport
from mailrelay.envelope import Envelope
from mailrelay.spool.store import Spool
from tests.support.sink import Sink
from tests.support.esmtp import FAST, Certificates, Conversation, TLSStringTransport, message
from tests.support.fakes import StandInClient
from tests.support.polling import until
from tests.support.sink import mails, verbs

KEY = PoolKey("127.0.0.1", 25, "none")


# -- the pool, with stand-in clients ------------------------------------------------------------------

class PoolTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.pool = ConnectionPool(self.clock)

    def test_a_parked_connection_is_taken_back_for_the_same_key_only(self):
        client = StandInClient()
        self.assertTrue(self.pool.park(KEY, client))
        self.assertIsNone(self.pool.take(PoolKey("127.0.0.1", 25, "starttls")))
        self.assertIsNone(self.pool.take(PoolKey("127.0.0.1", 25, "none", username="someone")))
        self.assertIs(self.pool.take(KEY), client)
        self.assertIsNone(self.pool.take(KEY))
        self.assertEqual(self.clock.getDelayedCalls(), [])      # its idle timer went with it

    def test_the_most_recently_parked_connection_is_taken_first(self):
        older, newer = StandInClient(), StandInClient()
        self.pool.park(KEY, older)
        self.pool.park(KEY, newer)
        self.assertIs(self.pool.take(KEY), newer)

    def test_after_the_idle_time_the_connection_gets_quit_and_leaves_the_pool(self):
        client = StandInClient()
        self.pool.park(KEY, client)
        self.clock.advance(IDLE_TIME - 0.1)
        self.assertEqual((client.quits, len(self.pool)), (0, 1))
        self.clock.advance(0.1)
        self.assertEqual((client.quits, len(self.pool)), (1, 0))
        self.assertIsNone(self.pool.take(KEY))

    def test_no_more_than_the_bound_wait_per_destination(self):
        for _ in range(MAX_IDLE_PER_KEY):
            self.assertTrue(self.pool.park(KEY, StandInClient()))
        self.assertFalse(self.pool.park(KEY, StandInClient()))
        self.assertTrue(self.pool.park(PoolKey("127.0.0.2", 25, "none"), StandInClient()))

    def test_an_old_connection_is_not_parked(self):
        self.assertFalse(self.pool.park(KEY, StandInClient(age=REUSE_TIME_LIMIT)))
        self.assertEqual(len(self.pool), 0)

    def test_a_forgotten_connection_is_never_handed_out_nor_quit(self):
        client = StandInClient()
        self.pool.park(KEY, client)
        self.pool.forget(KEY, client)
        self.assertIsNone(self.pool.take(KEY))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(client.quits, 0)

    def test_close_quits_every_idle_connection_and_parks_none_after(self):
        clients = [StandInClient() for _ in range(3)]
        for n, client in enumerate(clients):
            self.pool.park(PoolKey("127.0.0.1", 25 + n % 2, "none"), client)
        self.successResultOf(self.pool.close())
        self.assertEqual([c.quits for c in clients], [1, 1, 1])
        self.assertEqual((len(self.pool), self.clock.getDelayedCalls()), (0, []))
        self.assertFalse(self.pool.park(KEY, StandInClient()))


# -- the client over a StringTransport ------------------------------------------------------------------

class PooledConversation(Conversation):
    """A Conversation whose client parks in a pool under KEY."""

    def __init__(self, test, jobs, **params):       # pylint: disable=super-init-not-called
        params = {"helo": "relay.test", "remote_host": "mx.test", "security": "none", **params}
        self.test, self.clock, self.transport = test, task.Clock(), TLSStringTransport()
        self.pool = ConnectionPool(self.clock)
        self.client = DeliveryClient(SessionParams(**params), jobs, self.clock, self.pool, KEY)
        self.client.makeConnection(self.transport)

    def on(self, client, transport) -> PooledConversation:
        """The same conversation helpers for another connection (same clock and pool)."""
        other = PooledConversation.__new__(PooledConversation)
        other.test, other.clock, other.pool = self.test, self.clock, self.pool
        other.client, other.transport = client, transport
        return other

    def one_message(self, rcpt: str = "a@x.test", data_reply: str = "250 2.0.0 queued") -> None:
        self.expect(f"MAIL FROM:<app@example.org> SIZE={len(message().body)}")
        self.server("250 2.1.0 ok")
        self.expect(f"RCPT TO:<{rcpt}>")
        self.server("250 2.1.5 ok")
        self.expect("DATA")
        self.server("354 go")
        self.stream_body()
        self.server(data_reply)


def job(rcpt: str = "a@x.test") -> Job:
    return Job(message(recipients=(rcpt,)), (rcpt,))


class ClientParkingTests(unittest.TestCase):
    def test_a_clean_session_is_parked_without_quit_and_its_result_delivered_at_once(self):
        c = PooledConversation(self, [job()])
        c.greet("SIZE 1000")
        c.one_message()
        c.expect()                                           # no QUIT
        self.assertFalse(c.transport.disconnecting)
        result = self.successResultOf(c.client.finished)
        self.assertEqual([(r.code, r.status) for r in result.results], [(250, "2.0.0")])
        self.assertIs(c.pool.take(KEY), c.client)

    def test_a_reused_connection_goes_straight_to_mail_from(self):
        c = PooledConversation(self, [job()])
        c.greet("SIZE 1000")
        c.one_message()
        d = c.pool.take(KEY).reuse([job("b@x.test"), job("c@x.test")])
        c.one_message("b@x.test", "250 2.0.0 second")
        c.one_message("c@x.test", "250 2.0.0 third")
        c.expect()
        result = self.successResultOf(d)
        self.assertEqual([r.text for r in result.results], ["second", "third"])
        self.assertFalse(c.client.stale)
        self.assertEqual(c.pool.idle_count(KEY), 1)          # parked again

    def test_after_the_idle_time_the_parked_connection_says_quit(self):
        c = PooledConversation(self, [job()])
        c.greet("SIZE 1000")
        c.one_message()
        c.clock.advance(IDLE_TIME)
        c.expect("QUIT")
        c.server("221 2.0.0 bye")
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(len(c.pool), 0)

    def test_a_421_while_idle_drops_the_connection_without_quit(self):
        c = PooledConversation(self, [job()])
        c.greet("SIZE 1000")
        c.one_message()
        c.server("421 4.4.2 idle too long")
        c.expect()
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual((len(c.pool), c.clock.getDelayedCalls()), (0, []))

    def test_a_connection_closed_by_the_server_while_idle_leaves_the_pool(self):
        c = PooledConversation(self, [job()])
        c.greet("SIZE 1000")
        c.one_message()
        c.client.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual((len(c.pool), c.clock.getDelayedCalls()), (0, []))

    def test_421_after_the_end_of_data_is_never_parked(self):
        c = PooledConversation(self, [job()])
        c.greet("SIZE 1000")
        c.one_message(data_reply="421 4.7.0 too many messages on this connection")
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(len(c.pool), 0)
        [r] = c.close().results
        self.assertEqual((r.code, r.status), (421, "4.7.0"))

    def test_a_per_connection_limit_reply_means_quit_not_park(self):
        # RFC 3463 X.5.3: 452 4.5.3 is a server saying "enough on this connection".
        c = PooledConversation(self, [job(), job("b@x.test")])
        c.greet("SIZE 1000")
        c.one_message()
        c.expect(f"MAIL FROM:<app@example.org> SIZE={len(message().body)}")
        c.server("250 2.1.0 ok")
        c.expect("RCPT TO:<b@x.test>")
        c.server("452 4.5.3 too many messages on this connection")
        c.expect("RSET")
        c.server("250 2.0.0 ok")
        c.expect("QUIT")
        self.assertEqual(len(c.pool), 0)
        result = c.close()
        self.assertEqual([[(r.code, r.status) for r in j] for j in result.jobs], [[(250, "2.0.0")], [(452, "4.5.3")]])

    def test_a_refused_mail_from_means_quit_not_park(self):
        c = PooledConversation(self, [job()])
        c.greet("SIZE 1000")
        c.expect(f"MAIL FROM:<app@example.org> SIZE={len(message().body)}")
        c.server("451 4.7.1 slow down")
        c.expect("QUIT")
        self.assertEqual(len(c.pool), 0)

    def test_a_permanent_recipient_refusal_still_parks(self):
        c = PooledConversation(self, [job()])
        c.greet("SIZE 1000")
        c.expect(f"MAIL FROM:<app@example.org> SIZE={len(message().body)}")
        c.server("250 2.1.0 ok")
        c.expect("RCPT TO:<a@x.test>")
        c.server("550 5.1.1 no such user")
        c.expect("RSET")
        c.server("250 2.0.0 ok")
        c.expect()
        self.assertEqual(c.pool.idle_count(KEY), 1)
        self.assertEqual([r.code for r in self.successResultOf(c.client.finished).results], [550])

    def test_a_reused_connection_that_is_found_dead_is_stale_not_a_failure(self):
        c = PooledConversation(self, [job()])
        c.greet("SIZE 1000")
        c.one_message()
        client = c.pool.take(KEY)
        d = client.reuse([job("b@x.test")])
        c.sent()
        client.connectionLost(Failure(error.ConnectionLost()))
        self.successResultOf(d)
        self.assertTrue(client.stale)

    def test_a_reused_connection_answering_421_first_is_stale(self):
        c = PooledConversation(self, [job()])
        c.greet("SIZE 1000")
        c.one_message()
        client = c.pool.take(KEY)
        d = client.reuse([job("b@x.test")])
        c.sent()
        c.server("421 4.4.2 closing idle connection")
        self.assertTrue(c.transport.disconnecting)
        client.connectionLost(Failure(error.ConnectionDone()))
        self.successResultOf(d)
        self.assertTrue(client.stale)

    def test_a_reply_after_the_first_on_a_reused_connection_is_a_real_answer(self):
        c = PooledConversation(self, [job()])
        c.greet("SIZE 1000")
        c.one_message()
        client = c.pool.take(KEY)
        d = client.reuse([job("b@x.test")])
        c.sent()
        c.server("250 2.1.0 ok")
        c.sent()
        client.connectionLost(Failure(error.ConnectionLost()))
        [r] = self.successResultOf(d).results
        self.assertEqual((r.code, r.status), (421, "4.4.2"))
        self.assertFalse(client.stale)


class StaleFallbackTests(unittest.TestCase):
    """deliver_over: a dead parked connection gives way to a fresh one for the same jobs."""

    def test_the_jobs_go_over_a_new_connection_when_the_parked_one_is_dead(self):
        c = PooledConversation(self, [job()])
        c.greet("SIZE 1000")
        c.one_message()
        fresh = []

        class Endpoint:
            def connect(self, factory):
                protocol = factory.buildProtocol(None)
                transport = TLSStringTransport()
                protocol.makeConnection(transport)
                fresh.append((protocol, transport))
                return defer.succeed(protocol)

        params = SessionParams(helo="relay.test", remote_host="mx.test", security="none")
        d = deliver_over(Endpoint(), params, [job("b@x.test")], c.clock, pool=c.pool, key=KEY)
        self.assertEqual(c.sent(), [f"MAIL FROM:<app@example.org> SIZE={len(message().body)}".encode()])
        c.client.connectionLost(Failure(error.ConnectionLost()))     # the server had gone
        self.assertNoResult(d)
        [(protocol, transport)] = fresh
        new = c.on(protocol, transport)
        new.greet("SIZE 1000")
        new.one_message("b@x.test")
        [r] = self.successResultOf(d).results
        self.assertEqual((r.recipient, r.code), ("b@x.test", 250))
        self.assertEqual(c.pool.stale, 1)


# -- real deliveries to the loopback sink ----------------------------------------------------------------

class RealSinkTests(unittest.TestCase):
    timeout = 30

    def start_sink(self, **kw) -> tuple[Sink, int]:
        start = {k: kw.pop(k) for k in ("tls_options", "implicit_tls", "auth") if k in kw}
        sink = Sink(**kw)
        port = sink.start(reactor, **start)
        self.addCleanup(sink.stop)
        return sink, port

    def smarthost(self, port: int, clock=None, **transport) -> SmarthostTransport:
        transport.setdefault("security", "none")
        transport.setdefault("verify", False)
        pool = ConnectionPool(clock or reactor)
        hop = SmarthostTransport(config.Transport("sink", "127.0.0.1", port, **transport), "relay.test",
                                 reactor=reactor, timeouts=FAST, pool=pool)
        self.addCleanup(hop.close_idle)
        return hop

    def secret_file(self, content: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    @defer.inlineCallbacks
    def test_two_batches_half_a_second_apart_use_one_connection(self):
        sink, port = self.start_sink()
        hop = self.smarthost(port)
        first = yield hop.deliver_batch([job("a@x.test"), job("b@x.test")])
        yield task.deferLater(reactor, 0.5, lambda: None)
        second = yield hop.deliver_batch([job("c@x.test")])
        self.assertEqual([[r.code for r in j] for j in first + second], [[250], [250], [250]])
        [session] = sink.sessions
        self.assertEqual(verbs(session), [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"DATA",
                                          b"MAIL", b"RCPT", b"DATA"])
        self.assertEqual([m.rcpt_tos for m in sink.messages], [["a@x.test"], ["b@x.test"], ["c@x.test"]])

    @defer.inlineCallbacks
    def test_after_the_idle_time_the_idle_connection_gets_quit(self):
        sink, port = self.start_sink()
        clock = task.Clock()
        hop = self.smarthost(port, clock=clock)
        yield hop.deliver(message(), ["a@x.test"])
        self.assertEqual((len(hop.pool), len(sink._connections)), (1, 1))
        clock.advance(IDLE_TIME)
        yield until(lambda: not sink._connections, "the idle connection to close", timeout=10)
        self.assertEqual(verbs(sink.sessions[0])[-1], b"QUIT")
        self.assertEqual(len(hop.pool), 0)

    @defer.inlineCallbacks
    def test_a_sink_dropping_the_idle_connection_means_a_new_one_and_no_temporary_failure(self):
        sink, port = self.start_sink()
        hop = self.smarthost(port)
        yield hop.deliver(message(), ["a@x.test"])
        for connection in list(sink._connections):
            connection.transport.abortConnection()           # the client has not noticed yet
        results = yield hop.deliver_batch([job("b@x.test"), job("c@x.test")])
        self.assertEqual([[(r.code, r.status) for r in j] for j in results], [[(250, "2.0.0")], [(250, "2.0.0")]])
        self.assertEqual(len(sink.sessions), 2)
        self.assertEqual([mails(s) for s in sink.sessions], [1, 2])
        self.assertEqual(hop.pool.stale, 1)

    @defer.inlineCallbacks
    def test_a_sink_saying_421_while_idle_is_dropped_and_the_next_batch_connects_anew(self):
        sink, port = self.start_sink()
        hop = self.smarthost(port)
        yield hop.deliver(message(), ["a@x.test"])
        [connection] = sink._connections
        connection.reply("421 4.4.2 sink.test idle timeout")
        connection.transport.loseConnection()
        yield until(lambda: len(hop.pool) == 0, "the pool to drop the connection", timeout=10)
        [r] = yield hop.deliver(message(), ["b@x.test"])
        self.assertEqual(r.code, 250)
        self.assertEqual([mails(s) for s in sink.sessions], [1, 1])
        self.assertNotIn(b"QUIT", verbs(sink.sessions[0]))

    @defer.inlineCallbacks
    def test_starttls_and_auth_are_done_once_for_reused_deliveries(self):
        certs = Certificates("localhost")
        sink, port = self.start_sink(tls_options=certs.server_options, auth={"relayuser": "hunter2"})
        hop = SmarthostTransport(
            config.Transport("ses", "localhost", port, security="starttls", verify=True, username="relayuser",
                             password_file=self.secret_file(b"hunter2\n"), ca_file=certs.ca_file(self)),
            "relay.test", reactor=reactor, timeouts=FAST)
        self.addCleanup(hop.close_idle)
        for rcpt in ("a@x.test", "b@x.test", "c@x.test"):
            [r] = yield hop.deliver(message(), [rcpt])
            self.assertEqual(r.code, 250)
        [session] = sink.sessions
        self.assertEqual(verbs(session), [b"EHLO", b"STARTTLS", b"EHLO", b"AUTH"] + [b"MAIL", b"RCPT", b"DATA"] * 3)
        self.assertEqual(sink.auth_attempts, [(True, "PLAIN")])
        self.assertEqual([(m.tls, m.auth_identity) for m in sink.messages], [(True, "relayuser")] * 3)

    @defer.inlineCallbacks
    def test_close_idle_says_quit_on_every_idle_connection(self):
        sink, port = self.start_sink()
        hop = self.smarthost(port)
        yield defer.gatherResults([hop.deliver(message(), [f"u{n}@x.test"]) for n in range(3)])
        self.assertEqual((len(hop.pool), len(sink.sessions)), (3, 3))
        yield hop.close_idle()
        yield until(lambda: not sink._connections, "the sink to see every connection closed", timeout=10)
        self.assertEqual([verbs(s)[-1] for s in sink.sessions], [b"QUIT"] * 3)
        [r] = yield hop.deliver(message(), ["late@x.test"])    # after close_idle: delivered, then QUIT
        self.assertEqual(r.code, 250)
        self.assertEqual(verbs(sink.sessions[-1])[-1], b"QUIT")
        self.assertEqual(len(hop.pool), 0)

    @defer.inlineCallbacks
    def test_per_recipient_results_are_unchanged_on_a_reused_connection(self):
        sink, port = self.start_sink(rcpt_replies={"gone@x.test": "550 5.1.1 no such user",
                                                   "full@x.test": "452 4.2.2 mailbox full"})
        hop = self.smarthost(port)
        yield hop.deliver(message(), ["a@x.test"])
        results = yield hop.deliver_batch([
            Job(message(recipients=("b@x.test", "gone@x.test")), ("b@x.test", "gone@x.test")),
            job("full@x.test"), job("c@x.test")])
        self.assertEqual([[(r.recipient, r.code, r.status) for r in j] for j in results], [
            [("b@x.test", 250, "2.0.0"), ("gone@x.test", 550, "5.1.1")],
            [("full@x.test", 452, "4.2.2")],
            [("c@x.test", 250, "2.0.0")]])
        self.assertEqual(len(sink.sessions), 1)

    @defer.inlineCallbacks
    def test_a_message_limit_reached_on_the_sink_ends_the_connection(self):
        sink, port = self.start_sink(data_replies=("250 2.0.0 one", "421 4.7.0 too many messages"))
        hop = self.smarthost(port)
        results = yield hop.deliver_batch([job("a@x.test"), job("b@x.test")])
        self.assertEqual([[(r.code, r.status) for r in j] for j in results], [[(250, "2.0.0")], [(421, "4.7.0")]])
        self.assertEqual(len(hop.pool), 0)
        [r] = yield hop.deliver(message(), ["b@x.test"])
        self.assertEqual(r.code, 250)
        self.assertEqual(len(sink.sessions), 2)


class MXReuseTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_deliveries_to_one_exchanger_share_a_connection(self):
        sink = Sink()
        port = sink.start(reactor)
        self.addCleanup(sink.stop)
        resolver = MXResolver((), reactor)
        self.addCleanup(resolver.stop)
        mx = MXDelivery(DeliveryConfig(mx_port=port, tls="none"), "relay.example.org", reactor,
                        resolver=resolver, timeouts=FAST)
        self.addCleanup(mx.close_idle)
        for n in range(3):        # an address literal needs no DNS (RFC 5321 4.1.3)
            [r] = yield mx.deliver(message(recipients=(f"u{n}@[127.0.0.1]",)), [f"u{n}@[127.0.0.1]"])
            self.assertEqual(r.code, 250)
        self.assertEqual(len(sink.sessions), 1)
        self.assertEqual(mails(sink.sessions[0]), 3)
        yield mx.close_idle()
        yield until(lambda: not sink._connections, "the idle connection to close", timeout=10)
        self.assertEqual(verbs(sink.sessions[0])[-1], b"QUIT")

    def test_tls_options_are_built_once_per_exchanger_name(self):
        mx = MXDelivery(DeliveryConfig(tls="opportunistic"), "relay.example.org", reactor,
                        resolver=MXResolver((), reactor))
        self.assertIs(mx._tls_options("mx1.example.net"), mx._tls_options("mx1.example.net"))
        self.assertIsNot(mx._tls_options("mx1.example.net"), mx._tls_options("mx2.example.net"))


class SchedulerReuseTests(unittest.TestCase):
    """Through the queue: messages committed one at a time, each delivered before the next arrives."""

    timeout = 30

    @defer.inlineCallbacks
    def test_messages_trickling_in_one_by_one_share_one_connection(self):
        sink = Sink()
        port = sink.start(reactor)
        self.addCleanup(sink.stop)
        spool = Spool(self.mktemp(), reactor=reactor)
        spool.startService()
        self.addCleanup(spool.stopService)
        hop = SmarthostTransport(config.Transport("sink", "127.0.0.1", port, security="none", verify=False),
                                 "relay.test", reactor=reactor, timeouts=FAST)
        self.addCleanup(hop.close_idle)
        scheduler = Scheduler(spool, Router((Route("sink"),)), {"sink": hop}, direct=None,
                              queue=QueueConfig(first_retry=3600.0, max_retry=3600.0, delay_warning=0.0),
                              delivery=DeliveryConfig(concurrency=10, concurrency_per_domain=10),
                              reporter=None, clock=reactor)
        scheduler.startService()
        self.addCleanup(scheduler.stopService)
        for n in range(5):
            writer = spool.new_message(Envelope("app@example.org", (f"u{n}@example.com",), time.time()))
            writer.write(b"Subject: %d\r\n\r\nbody\r\n" % n)
            scheduler.enqueue((yield writer.commit()))
            yield sink.wait_for(n + 1)
            yield until(lambda: not spool.queue_ids(), "the spool to empty", timeout=10)
        self.assertEqual(len(sink.sessions), 1)
        self.assertEqual(mails(sink.sessions[0]), 5)
