"""The duplicate window of batched delivery is one message per connection (docs/crash-safety.md §2).

Three layers: the delivery client over a StringTransport (a job is reported right after the reply
that settles it, and the next MAIL FROM waits for the caller's record); the scheduler with a real
spool, a real smarthost transport and a real sink on loopback, where the spool's save_state and remove
are held by the test (the sink sees message 2's MAIL FROM only after message 1's record is durable);
and a real twistd relay killed with SIGKILL while a sink stalls on message 5's end of data — after the
restart messages 1-4 are not sent again, and only message 5 is.
"""
from __future__ import annotations

import re
import signal
import time
from pathlib import Path

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from mailrelay import config
from mailrelay.config import DeliveryConfig, QueueConfig, Route
from mailrelay.queue.job import Job, report_once
from mailrelay.outbound.dns import MXHost
from mailrelay.outbound.mx import MXDelivery
from mailrelay.queue.routes import Router
from mailrelay.queue.scheduler import Scheduler
from mailrelay.outbound.smarthost import SmarthostTransport
from mailrelay.envelope import Envelope
from mailrelay.spool.store import Spool
from tests.support.relay import RelayFixture, free_port
from tests.support.sink import Sink, SinkProtocol
from tests.support.esmtp import Conversation, message
from tests.support.polling import until
from tests.support.scheduling import RecordingReporter


def mail_froms(sink: Sink) -> int:
    return sum(1 for s in sink.sessions for _, line in s.commands if line.startswith(b"MAIL FROM"))


def turns(n: int = 5):
    """Let the reactor run a few turns (network round trips on loopback) — no timing is asserted."""
    return task.deferLater(reactor, 0.05 * n, lambda: None)


# -- the client ------------------------------------------------------------------------------------

class SettledConversation(Conversation):
    def __init__(self, test, jobs, **params):
        super().__init__(test, jobs, **params)
        self.settled: list[tuple[int, list]] = []
        self.records: list[defer.Deferred] = []
        self.client._on_settled = self.on_settled

    def on_settled(self, index, results):
        self.settled.append((index, [(r.recipient, r.code) for r in results]))
        self.records.append(defer.Deferred())
        return self.records[-1]

    def transaction(self, rcpt: str, data_reply: str = "250 2.0.0 queued") -> None:
        self.expect("MAIL FROM:<app@example.org>")
        self.server("250 2.1.0 ok")
        self.expect(f"RCPT TO:<{rcpt}>")
        self.server("250 2.1.5 ok")
        self.expect("DATA")
        self.server("354 go ahead")
        self.stream_body()
        self.server(data_reply)


def two_jobs():
    return [Job(message(recipients=("a@x.test",)), ("a@x.test",)),
            Job(message(recipients=("b@x.test",)), ("b@x.test",))]


class ClientTests(unittest.TestCase):
    def test_a_job_is_reported_after_its_data_reply_and_the_next_mail_from_waits_for_the_record(self):
        c = SettledConversation(self, two_jobs())
        c.greet("8BITMIME")
        c.transaction("a@x.test")
        self.assertEqual(c.settled, [(0, [("a@x.test", 250)])])
        c.expect()                                   # no MAIL FROM for job 1 yet
        c.records[0].callback(None)
        c.transaction("b@x.test")
        self.assertEqual(c.settled[1], (1, [("b@x.test", 250)]))
        c.expect()                                   # no QUIT before the last record either
        c.records[1].callback(None)
        c.expect("QUIT")

    def test_a_refused_mail_from_reports_the_job_at_once(self):
        c = SettledConversation(self, two_jobs())
        c.greet()
        c.expect("MAIL FROM:<app@example.org>")
        c.server("550 5.7.1 sender refused")
        self.assertEqual(c.settled, [(0, [("a@x.test", 550)])])
        c.expect()
        c.records[0].callback(None)
        c.expect("MAIL FROM:<app@example.org>")

    def test_a_job_whose_every_rcpt_failed_is_reported_before_rset(self):
        c = SettledConversation(self, two_jobs())
        c.greet()
        c.expect("MAIL FROM:<app@example.org>")
        c.server("250 2.1.0 ok")
        c.expect("RCPT TO:<a@x.test>")
        c.server("452 4.2.2 mailbox full")
        self.assertEqual(c.settled, [(0, [("a@x.test", 452)])])
        c.expect()
        c.records[0].callback(None)
        c.expect("RSET")

    def test_connection_lost_while_recording_still_returns_every_job(self):
        c = SettledConversation(self, two_jobs())
        c.greet()
        c.transaction("a@x.test")
        result = c.close()
        c.records[0].callback(None)                  # the record finishes after the loss: nothing is sent
        c.expect()
        self.assertEqual([r.code for r in result.results], [250, 421])

    def test_an_unasked_reply_while_recording_ends_the_session(self):
        c = SettledConversation(self, two_jobs())
        c.greet()
        c.transaction("a@x.test")
        c.server("421 4.3.2 shutting down")
        self.assertTrue(c.transport.disconnecting)
        result = c.close()
        c.records[0].callback(None)
        c.expect()
        self.assertEqual([r.code for r in result.results], [250, 421])

    def test_a_failing_record_does_not_stop_the_session(self):
        c = SettledConversation(self, two_jobs())
        c.greet()
        c.transaction("a@x.test")
        c.records[0].errback(RuntimeError("disk full"))
        c.expect("MAIL FROM:<app@example.org>")
        self.flushLoggedErrors(RuntimeError)

    def test_report_once_passes_each_index_once(self):
        seen = []
        report = report_once(lambda index, results: seen.append(index))
        for index in (0, 1, 0, 1, 2):
            report(index, [])
        self.assertEqual(seen, [0, 1, 2])
        self.assertIsNone(report_once(None))


# -- the scheduler over a real sink ----------------------------------------------------------------

class GatedSpool:
    """A real Spool whose save_state and remove wait until the test lets them through."""

    def __init__(self, spool: Spool):
        self._spool = spool
        self.held: list[tuple[str, str, defer.Deferred]] = []     # (operation, queue id, release)

    def __getattr__(self, name):
        return getattr(self._spool, name)

    def _gate(self, operation: str, queue_id: str, do):
        release = defer.Deferred()
        self.held.append((operation, queue_id, release))
        return release.addCallback(lambda _: do())

    def save_state(self, queue_id, state):
        return self._gate("save", queue_id, lambda: self._spool.save_state(queue_id, state))

    def remove(self, queue_id):
        return self._gate("remove", queue_id, lambda: self._spool.remove(queue_id))

    def release(self, index: int = 0) -> None:
        self.held[index][2].callback(None)


class SchedulerOverSinkTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.sink = Sink(rcpt_replies={f"full{n}@example.com": "452 4.2.2 mailbox full" for n in range(3)})
        port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        self.real = Spool(self.mktemp(), reactor=reactor)
        self.real.startService()
        self.addCleanup(self.real.stopService)
        self.spool = GatedSpool(self.real)
        self.transport = SmarthostTransport(
            config.Transport("sink", "127.0.0.1", port, security="none", verify=False), "relay.test",
            reactor=reactor)
        self.addCleanup(self.transport.close_idle)

    @defer.inlineCallbacks
    def queue(self, recipients) -> list[str]:
        ids = []
        for n, rcpts in enumerate(recipients):
            writer = self.real.new_message(Envelope("app@example.org", rcpts, time.time()))
            writer.write(b"Subject: %d\r\nMessage-ID: <dup-%d@example.org>\r\n\r\nbody\r\n" % (n, n))
            ids.append((yield writer.commit()))
        return ids

    def start(self) -> Scheduler:
        scheduler = Scheduler(self.spool, Router((Route("sink"),)), {"sink": self.transport}, direct=None,
                              queue=QueueConfig(first_retry=3600.0, max_retry=3600.0, delay_warning=0.0),
                              delivery=DeliveryConfig(concurrency=10, concurrency_per_domain=1),
                              reporter=RecordingReporter(), clock=reactor)
        scheduler.startService()
        self.addCleanup(self._stop, scheduler)
        return scheduler

    def _stop(self, scheduler):
        for _, _, release in self.spool.held:        # let anything still held finish, then stop
            if not release.called:
                release.callback(None)
        return scheduler.stopService()

    @defer.inlineCallbacks
    def test_the_sink_sees_message_2s_mail_from_only_after_message_1s_save(self):
        # One recipient of each message gets 452: the message stays queued, so its record is a save.
        ids = yield self.queue([(f"user{n}@example.com", f"full{n}@example.com") for n in range(3)])
        self.start()
        yield until(lambda: self.spool.held, "message 1's save")
        self.assertEqual([(op, q) for op, q, _ in self.spool.held], [("save", ids[0])])
        yield turns()
        self.assertEqual(mail_froms(self.sink), 1)
        self.assertEqual(len(self.sink.messages), 1)
        self.spool.release(0)
        yield until(lambda: len(self.spool.held) == 2, "message 2's save")
        self.assertEqual(mail_froms(self.sink), 2)
        self.assertEqual(self.spool.held[1][:2], ("save", ids[1]))
        self.spool.release(1)
        yield until(lambda: len(self.spool.held) == 3, "message 3's save")
        self.spool.release(2)
        yield until(lambda: all(self.real.load(q).state for q in ids), "every state on disk")
        self.assertEqual(len(self.sink.sessions), 1)       # still one connection for the three

    @defer.inlineCallbacks
    def test_a_delivered_message_is_removed_before_the_next_one_is_offered(self):
        ids = yield self.queue([(f"user{n}@example.com",) for n in range(2)])
        self.start()
        yield until(lambda: self.spool.held, "message 1's removal")
        self.assertEqual([(op, q) for op, q, _ in self.spool.held], [("remove", ids[0])])
        yield turns()
        self.assertEqual(mail_froms(self.sink), 1)
        self.spool.release(0)
        yield until(lambda: len(self.spool.held) == 2, "message 2's removal")
        self.assertEqual(mail_froms(self.sink), 2)
        self.assertFalse(self.real.exists(ids[0]))
        self.spool.release(1)
        yield until(lambda: not self.real.queue_ids(), "the spool to empty")


# -- kill -9 of a real relay -----------------------------------------------------------------------

STALL = "stall"


class StallingProtocol(SinkProtocol):
    """A sink connection that, told to answer STALL, never says another word (nor does the sink)."""

    def reply(self, text: str) -> None:
        if text == STALL:
            self.sink.silent = True
            return
        super().reply(text)


def numbered(n: int) -> bytes:
    return (f"From: app@example.org\r\nTo: user@example.com\r\nMessage-ID: <dup-{n}@example.org>\r\n"
            f"Subject: duplicate window {n}\r\n\r\nbody {n}\r\n").encode()


def number(data: bytes) -> int:
    return int(re.search(rb"<dup-(\d+)@example\.org>", data).group(1))


class KillNineMidBatch(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.sink_port = free_port()          # nothing listens yet: the next hop is down
        self.relay = RelayFixture(self.mktemp(), extra=(
            f'[transports.sink]\nhost = "127.0.0.1"\nport = {self.sink_port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n'
            '[queue]\nfirst_retry = "1s"\nmax_retry = "2s"\n\n'
            '[delivery]\nconcurrency_per_domain = 1\n'))
        self.addCleanup(self.relay.kill)

    def start_sink(self, stall_at: int = 0) -> Sink:
        sink = Sink(data_replies=["250 2.0.0 queued"] * (stall_at - 1) + [STALL] if stall_at else ())
        sink.start(reactor, port=self.sink_port)
        sink._port.factory.protocol = StallingProtocol
        self.addCleanup(sink.stop)
        return sink

    def queued(self) -> list[str]:
        return sorted(p.name for p in (Path(self.relay.dir) / "spool" / "queue").iterdir())

    @defer.inlineCallbacks
    def test_after_kill_nine_only_the_message_in_flight_is_sent_again(self):
        yield threads.deferToThread(self.relay.spawn)
        for n in range(1, 21):
            code, _ = yield self.relay.submit("relay", "app@example.org", ["user@example.com"], numbered(n))
            self.assertEqual(code, 250)
        stalling = self.start_sink(stall_at=5)
        yield until(lambda: len(stalling.transactions) == 5, "message 5's end of data", timeout=60)
        self.relay.kill(signal.SIGKILL)
        first = [number(t.data) for t in stalling.transactions]
        accepted = [number(m.data) for m in stalling.messages]
        self.assertEqual(len(accepted), 4)
        yield stalling.stop()

        sink = self.start_sink()
        yield threads.deferToThread(self.relay.spawn)
        yield sink.wait_for(16)
        yield until(lambda: not self.queued(), "the relay's queue to empty", timeout=60)
        yield turns()
        again = [number(m.data) for m in sink.messages]
        self.assertEqual(len(again), len(set(again)), "a message went twice to the second sink")
        self.assertEqual(sorted(set(accepted) | set(again)), list(range(1, 21)))
        self.assertEqual(set(accepted) & set(again), set(), "a recorded message was sent again")
        self.assertEqual(set(first) & set(again), {first[4]})     # only the one in flight, exactly once more


# -- direct MX delivery ----------------------------------------------------------------------------

class FixedResolver:
    def __init__(self, hosts):
        self.hosts = hosts

    def resolve(self, domain):
        return defer.succeed(self.hosts)

    def stop(self):
        pass


class MXStreamingTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_a_message_settled_by_the_first_exchanger_is_reported_at_once_and_a_4xx_one_at_the_end(self):
        sink = Sink(rcpt_replies={"later@example.net": "452 4.2.2 try later"})
        port = sink.start(reactor)
        self.addCleanup(sink.stop)
        hosts = [MXHost("mx1.example.net", 10, ("127.0.0.1",)), MXHost("mx2.example.net", 20, ("127.0.0.1",))]
        mx = MXDelivery(DeliveryConfig(mx_port=port, tls="none"), "relay.test", reactor,
                        resolver=FixedResolver(hosts))
        self.addCleanup(mx.close_idle)
        recipients = [("a@example.net",), ("b@example.net", "later@example.net"), ("c@example.net",)]
        jobs = [Job(message(recipients=r), r) for r in recipients]
        reported = []

        def on_settled(index, results):
            reported.append((index, [r.code for r in results], len(sink.sessions)))
        results = yield mx.deliver_batch(jobs, on_settled=on_settled)
        self.assertEqual(reported, [(0, [250], 1), (2, [250], 1)])     # during the first session
        self.assertEqual([[r.code for r in job] for job in results], [[250], [250, 452], [250]])
        self.assertEqual([m.rcpt_tos for m in sink.messages],
                         [["a@example.net"], ["b@example.net"], ["c@example.net"]])
