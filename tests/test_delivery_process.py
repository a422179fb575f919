"""`[delivery] process = "separate"`: delivery runs in a second process, fed by the main one over a pipe."""
from __future__ import annotations

import json
import os
import signal

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from tests.support.polling import eventually
from tests.support.relay import RelayFixture
from tests.support.sink import Sink

MESSAGE = b"From: app@example.org\r\nTo: user@example.com\r\nSubject: two processes\r\n\r\nbody\r\n"


def config_for(port: int) -> str:
    return (f'[transports.sink]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n[delivery]\nprocess = "separate"\n\n'
            '[queue]\nfirst_retry = "1s"\n\n[log]\nformat = "json"\nfile = "relay.json"\n')


class SeparateDeliveryProcess(unittest.TestCase):
    timeout = 90

    def setUp(self):
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        self.relay = RelayFixture(self.mktemp(), extra=config_for(self.sink_port))
        self.service = self.relay.start(reactor)
        self.addCleanup(self.relay.stop)

    def child_pid(self) -> int:
        return self.service.scheduler._transport.pid

    @defer.inlineCallbacks
    def test_messages_are_delivered_by_the_child_whose_log_lines_join_ours(self):
        code, text = yield self.relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        queue_id = text.decode().rsplit(" ", 1)[1]
        arrived = yield self.sink.wait_for(1)
        self.assertTrue(arrived[0].data.endswith(MESSAGE))
        self.assertNotEqual(self.child_pid(), os.getpid())
        log_file = self.relay.dir / "relay.json"

        def logged() -> list[dict]:
            return [json.loads(line) for line in log_file.read_text().splitlines()]
        yield eventually(lambda: any(e.get("queue_id") == queue_id and e.get("stage") == "delivered" for e in logged()),
                         timeout=5, interval=0.1)
        events = logged()
        stages = [e.get("stage") for e in events if e.get("queue_id") == queue_id]
        self.assertIn("delivered", stages)       # written by the delivery process, to the same file
        # "queued" once, also by the delivery process (as Postfix's qmgr), before the delivery, with all
        # the session knew: the receiving process spends nothing on it.
        queued = [e for e in events if e.get("queue_id") == queue_id and e.get("stage") == "queued"]
        self.assertEqual(len(queued), 1)
        self.assertEqual(queued[0]["namespace"], "mailrelay.queue")
        self.assertEqual((queued[0]["client"], queued[0]["identity"], queued[0]["sender"]),
                         ("127.0.0.1", "permit[0]", "app@example.org"))
        self.assertGreater(queued[0]["size"], len(MESSAGE))          # as spooled, with our Received
        self.assertLess(stages.index("queued"), stages.index("delivered"))

    @defer.inlineCallbacks
    def test_the_child_never_preempts_the_receiving_process(self):
        if not hasattr(os, "sched_getscheduler"):
            raise unittest.SkipTest("no sched_getscheduler on this platform")
        code, _ = yield self.relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        yield self.sink.wait_for(1)            # the child is up and has delivered
        self.assertEqual(os.sched_getscheduler(self.child_pid()), os.SCHED_BATCH)
        self.assertNotEqual(os.sched_getscheduler(0), os.SCHED_BATCH)     # we are left as we were
        # [delivery] process_nice, default 10: ten steps nicer than this process
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        self.assertEqual(os.getpriority(os.PRIO_PROCESS, self.child_pid()), min(ours + 10, 19))

    @defer.inlineCallbacks
    def kill_the_child_and_submit(self):
        """SIGKILL the delivery process, wait for its successor, then submit one message (250)."""
        first = self.child_pid()
        os.kill(first, signal.SIGKILL)

        def successor() -> bool:
            transport = self.service.scheduler._transport
            return transport is not None and transport.pid not in (None, first)
        yield eventually(successor, timeout=10, interval=0.1)
        code, _ = yield self.relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)

    @defer.inlineCallbacks
    def test_a_killed_child_is_started_again_and_nothing_is_lost(self):
        yield self.kill_the_child_and_submit()
        yield self.sink.wait_for(1)
        self.assertEqual(self.service.scheduler.restarts, 1)

    @defer.inlineCallbacks
    def test_a_child_started_again_runs_the_config_the_main_process_validated_not_the_file(self):
        original = self.relay.path.read_text()
        self.relay.path.write_text(original + "\n[limits\n")          # half edited, never reloaded
        yield self.kill_the_child_and_submit()
        yield self.sink.wait_for(1)            # delivered by the new child, on the config in force
        self.assertEqual(self.service.scheduler.restarts, 1)

    @defer.inlineCallbacks
    def test_a_receiving_side_file_gone_since_the_start_does_not_stop_delivery(self):
        """[tls] cert and key (and [auth.ldap] files) are the main process's: a child started again does
        not open them, so a certificate being replaced (or a directory CA removed) cannot stop delivery."""
        from mailrelay import tls

        yield self.relay.stop()
        (self.relay.dir / "cert.pem").write_bytes(b"".join(tls.generate_self_signed("relay.test")))
        self.relay.path.write_text(self.relay.path.read_text().replace(
            'spool = "spool"\n', 'spool = "spool"\n[tls]\ncert = "cert.pem"\nkey = "cert.pem"\n', 1))
        self.service = self.relay.start(reactor)
        (self.relay.dir / "cert.pem").unlink()
        yield self.kill_the_child_and_submit()
        yield self.sink.wait_for(1)
        self.assertEqual(self.service.scheduler.restarts, 1)

    @defer.inlineCallbacks
    def test_stopping_the_relay_stops_the_child(self):
        pid = self.child_pid()
        yield self.relay.stop()
        with self.assertRaises(ProcessLookupError):
            os.kill(pid, 0)


class TickBuffering(unittest.TestCase):
    def test_log_lines_of_one_turn_are_written_together_at_its_end(self):
        import io

        from mailrelay.queue.worker import TickBufferedStream

        clock, out = task.Clock(), io.StringIO()
        stream = TickBufferedStream(out, clock)
        stream.write("one\n")
        stream.flush()
        stream.write("two\n")
        self.assertEqual(out.getvalue(), "")
        clock.advance(0)
        self.assertEqual(out.getvalue(), "one\ntwo\n")

    def test_lines_for_the_main_process_wait_for_the_batch_delay(self):
        import io

        from mailrelay.queue.worker import LOG_BATCH_DELAY, TickBufferedStream

        clock, out = task.Clock(), io.StringIO()
        stream = TickBufferedStream(out, clock, LOG_BATCH_DELAY)
        stream.write("one\n")
        clock.advance(LOG_BATCH_DELAY / 2)
        stream.write("two\n")
        self.assertEqual(out.getvalue(), "")
        clock.advance(LOG_BATCH_DELAY / 2)
        self.assertEqual(out.getvalue(), "one\ntwo\n")


class EnqueueDescriptions(unittest.TestCase):
    def test_a_fresh_commit_travels_down_the_pipe_and_is_taken_without_reading_the_file(self):
        from pathlib import Path

        from mailrelay.queue.process import enqueue_line
        from mailrelay.queue.worker import Commands, DeliveryWorker
        from mailrelay.envelope import Envelope
        from mailrelay.spool.message import SpooledMessage
        from mailrelay.spool.store import Spool

        spool = Spool(Path(self.mktemp()), owner=False)
        envelope = Envelope("a@example.org", ("b@example.com", "c@example.net"), 1.5, identity="permit[0]",
                            params={"ENVID": "x y"})
        sent = SpooledMessage("0123456789ABCDEF", envelope, 2048, spool.paths.message("0123456789ABCDEF"), 123)
        enqueued = []

        class Worker:
            remember = DeliveryWorker.remember

            def __init__(self):
                self.spool = spool
                self.scheduler = type("S", (), {"enqueue": staticmethod(enqueued.append)})()

        Commands(Worker(), reactor).lineReceived(enqueue_line(sent.queue_id, sent).rstrip("\n").encode())
        self.assertEqual(enqueued, [sent.queue_id])
        self.assertEqual(spool.take_fresh(sent.queue_id), sent)

    def test_a_bare_id_is_enqueued_to_be_read_from_the_spool(self):
        from mailrelay.queue.process import enqueue_line

        self.assertEqual(enqueue_line("0123456789ABCDEF"), "enqueue 0123456789ABCDEF\n")


class QueuedLines(unittest.TestCase):
    """Each message gets exactly one "queued" line: from the child when it is told of the message, from
    the main process when it cannot be (the child is restarting, or the description is missing)."""

    def setUp(self):
        from pathlib import Path

        from twisted.logger import globalLogPublisher

        from mailrelay.queue.process import DeliveryProcess
        from mailrelay.envelope import Envelope
        from mailrelay.spool.message import SpooledMessage
        from mailrelay.spool.store import Spool

        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.spool = Spool(Path(self.mktemp()), owner=False)
        self.clock = task.Clock()
        self.process = DeliveryProcess("tap.conf", self.clock, spool=self.spool)
        envelope = Envelope("a@example.org", ("b@example.com",), 1.5, client_address="192.0.2.7",
                            identity="permit[0]")
        self.message = SpooledMessage("0123456789ABCDEF", envelope, 2048,
                                      self.spool.paths.message("0123456789ABCDEF"), 123)

    def queued(self):
        return [e for e in self.events if e.get("stage") == "queued"]

    def test_a_described_message_is_left_to_the_child(self):
        written = []

        class Pipe:
            pipes: dict = {}

            def write(self, data):
                written.append(data)

        self.process._transport = Pipe()
        self.spool.remember_fresh(self.message)
        self.process.enqueue(self.message.queue_id)
        self.clock.advance(0)
        self.assertEqual(self.queued(), [])
        self.assertTrue(written[0].startswith(b"enqueue 0123456789ABCDEF 2048 123 {"))

    def test_while_the_child_is_restarting_the_main_process_writes_the_line(self):
        self.process._transport = None
        self.spool.remember_fresh(self.message)
        self.process.enqueue(self.message.queue_id)
        [line] = self.queued()
        self.assertEqual((line["queue_id"], line["client"], line["size"]), ("0123456789ABCDEF", "192.0.2.7", 2048))
        self.assertEqual(line["log_namespace"], "mailrelay.delivery.process")

    def test_the_child_s_side_writes_it_from_the_description(self):
        from mailrelay.queue.process import enqueue_line
        from mailrelay.queue.worker import Commands, DeliveryWorker

        spool = self.spool

        class Worker:
            remember = DeliveryWorker.remember

            def __init__(self):
                self.spool = spool
                self.scheduler = type("S", (), {"enqueue": staticmethod(lambda queue_id: None)})()

        Commands(Worker(), reactor).lineReceived(enqueue_line("0123456789ABCDEF", self.message).rstrip("\n").encode())
        [line] = self.queued()
        self.assertEqual((line["client"], line["identity"], line["sender"], line["recipients"], line["size"]),
                         ("192.0.2.7", "permit[0]", "a@example.org", ["b@example.com"], 2048))
        self.assertEqual(line["log_namespace"], "mailrelay.queue")


class ChildLogLines(unittest.TestCase):
    """Without `[log] file` the child's lines come up a pipe into this process's log: they reach a
    daemonised twistd's log file like the main process's own lines."""
    timeout = 90

    def setUp(self):
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)

    def relay(self) -> RelayFixture:
        extra = config_for(self.sink_port).split("[log]")[0]
        return RelayFixture(self.mktemp(), extra=extra)

    @defer.inlineCallbacks
    def test_the_childs_lines_are_events_of_this_process(self):
        """Structured: each event the child logs is published here with its queue id, namespace, level
        and fields, and written by this process's observers like its own events."""
        import io

        from twisted.logger import LogLevel, globalLogPublisher

        from mailrelay.config import LogConfig
        from mailrelay.logs import make_observer

        events, json_out, text_out = [], io.StringIO(), io.StringIO()
        json_observer = make_observer(LogConfig(format="json"), json_out)
        text_observer = make_observer(LogConfig(format="text"), text_out)      # Postfix-like, from the fields
        for observer in (events.append, json_observer, text_observer):
            globalLogPublisher.addObserver(observer)
            self.addCleanup(globalLogPublisher.removeObserver, observer)
        relay = self.relay()
        relay.start(reactor)
        self.addCleanup(relay.stop)
        code, text = yield relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        queue_id = text.decode().rsplit(" ", 1)[1]
        yield self.sink.wait_for(1)

        def delivered() -> list[dict]:
            return [e for e in events if e.get("queue_id") == queue_id and e.get("stage") == "delivered"]
        yield eventually(delivered, timeout=5, interval=0.1)
        mine = delivered()
        self.assertEqual(len(mine), 1)
        delivered = mine[0]
        self.assertTrue(delivered["log_namespace"].startswith("mailrelay.delivery.scheduler"))
        self.assertEqual(delivered["log_level"], LogLevel.info)
        self.assertEqual(delivered["recipient"], "user@example.com")
        self.assertIn("user@example.com", delivered["log_text"])
        queued = [e for e in events if e.get("queue_id") == queue_id and e.get("stage") == "queued"]
        self.assertEqual([(e["log_namespace"], e["sender"], e["client"]) for e in queued],
                         [("mailrelay.queue", "app@example.org", "127.0.0.1")])
        self.assertLessEqual(queued[0]["log_time"], delivered["log_time"])      # the child's own times
        records = [json.loads(line) for line in json_out.getvalue().splitlines()]
        [line] = [r for r in records if r.get("queue_id") == queue_id and r.get("stage") == "delivered"]
        self.assertEqual((line["recipient"], line["level"]), ("user@example.com", "info"))
        self.assertIn(f"{queue_id}: delivered user@example.com via sink", line["message"])
        [text_line] = [t for t in text_out.getvalue().splitlines() if f"{queue_id}: to=" in t and "status=sent" in t]
        self.assertIn(" info mailrelay.delivery.scheduler", text_line)
        self.assertIn(f"{queue_id}: to=<user@example.com>, relay=", text_line)
        self.assertIn("status=sent (250 ", text_line)

    @defer.inlineCallbacks
    def test_twistd_with_a_log_file_has_the_childs_lines_in_it(self):
        from twisted.internet import threads

        relay = self.relay()
        yield threads.deferToThread(relay.spawn, "relay.log")
        self.addCleanup(relay.kill, signal.SIGTERM)
        code, text = yield threads.deferToThread(relay.submit_sync, "relay", "app@example.org",
                                                 ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        queue_id = text.decode().rsplit(" ", 1)[1]
        yield self.sink.wait_for(1)
        log_file = relay.dir / "relay.log"
        yield eventually(lambda: f"{queue_id}: delivered" in log_file.read_text(), timeout=5, interval=0.1)
        lines = log_file.read_text().splitlines()
        delivered = [line for line in lines if f"{queue_id}: delivered" in line]
        self.assertEqual(len(delivered), 1)
        self.assertIn("[mailrelay.delivery.scheduler", delivered[0])
        self.assertTrue(any("delivery process started" in line for line in lines))    # the main's own
        self.assertNotIn(queue_id, (relay.dir / "twistd.log").read_text())           # not on stdout

    @defer.inlineCallbacks
    def test_what_the_child_writes_to_standard_error_is_logged_as_a_warning(self):
        from twisted.logger import LogLevel, globalLogPublisher

        from mailrelay.queue.process import DeliveryProcess

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        missing = self.mktemp() + ".conf"
        process = DeliveryProcess(missing, reactor)
        process.startService()
        ended = process._child.ended
        yield ended
        yield process.stopService()
        warnings = [e for e in events if e.get("log_namespace") == "mailrelay.delivery.process"
                    and e.get("log_level") == LogLevel.warn]
        self.assertTrue(any("mailrelay delivery process:" in e["line"] and missing in e["line"] for e in warnings),
                        [e.get("line") for e in warnings])


class ChildOutputSplitting(unittest.TestCase):
    def test_lines_are_whole_even_when_a_read_ends_inside_a_character(self):
        from mailrelay.queue.process import _ChildProtocol

        class Owner:
            def __init__(self):
                self.got = []

            def child_output(self, fd, text):
                self.got.append((fd, text))

            def child_ended(self, child, reason):
                pass

        owner = Owner()
        child = _ChildProtocol(owner)
        data = "first line\nsecond: café\nthird".encode("utf-8")
        cut = data.index("é".encode("utf-8")) + 1         # inside the two bytes of é
        child.childDataReceived(1, data[:cut])
        child.childDataReceived(1, data[cut:])
        child.childDataReceived(2, b"Traceback (most recent call last):\n")
        child.processEnded(None)
        self.assertEqual(owner.got, [(1, "first line\n"), (1, "second: café\n"),
                                     (2, "Traceback (most recent call last):\n"), (1, "third\n")])


def scrape(port: int) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()


class MetricsOfBothProcesses(unittest.TestCase):
    """`[metrics] endpoint` in the main process serves the delivery process's families too (fetched over
    its pipe at each scrape), each family once; `delivery_endpoint` still serves the child's own."""
    timeout = 90

    def setUp(self):
        from tests.support.relay import free_ports

        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        self.main_port, self.child_port = free_ports(2)
        extra = config_for(self.sink_port).split("[log]")[0] + (
            f'[metrics]\nendpoint = "tcp:{self.main_port}:interface=127.0.0.1"\n'
            f'delivery_endpoint = "tcp:{self.child_port}:interface=127.0.0.1"\n')
        self.relay = RelayFixture(self.mktemp(), extra=extra)
        self.service = self.relay.start(reactor)
        self.addCleanup(self.relay.stop)

    @defer.inlineCallbacks
    def deliver_one(self):
        code, _ = yield self.relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        yield self.sink.wait_for(1)
        queue = self.relay.dir / "spool" / "queue"
        # removed once its result is recorded (and counted)
        yield eventually(lambda: not any(queue.iterdir()), timeout=5, interval=0.05)

    @defer.inlineCallbacks
    def test_one_scrape_of_the_main_endpoint_shows_the_delivery_once(self):
        from prometheus_client.parser import text_string_to_metric_families

        from mailrelay.metrics import DELIVERY_FAMILIES, Metrics

        yield self.deliver_one()
        body = yield threads.deferToThread(scrape, self.main_port)
        delivered = ('mailrelay_delivery_results_total{result="delivered",tls="none",transport="sink",'
                     'verified="false"} 1.0')
        self.assertIn(delivered, body)
        self.assertIn('mailrelay_delivery_attempts_total{transport="sink"} 1.0', body)
        self.assertIn("mailrelay_delivery_latency_seconds_count 1.0", body)
        self.assertIn('mailrelay_messages_accepted_total{listener="relay"} 1.0', body)    # ours
        self.assertIn("mailrelay_queue_messages 0.0", body)
        self.assertIn("mailrelay_delivery_process_up 1.0", body)
        names = [family.name for family in text_string_to_metric_families(body)]
        self.assertEqual(len(names), len(set(names)), names)                              # each family once
        every = {family.name for family in Metrics().registry.collect()}
        # (the 0.0.4 text gives each counter's and histogram's `_created` samples a gauge family of its own)
        self.assertEqual({name for name in names if not name.endswith("_created")},
                         every | {"mailrelay_delivery_process_up"})
        self.assertEqual(body.count("# TYPE mailrelay_delivery_results_total "), 1)
        self.assertTrue(DELIVERY_FAMILIES < every)

        child = yield threads.deferToThread(scrape, self.child_port)     # delivery_endpoint: as before
        self.assertIn(delivered, child)
        self.assertIn("mailrelay_connections_total", child)              # its whole registry, as before
        self.assertNotIn('mailrelay_messages_accepted_total{listener="relay"} 1.0', child)

    @defer.inlineCallbacks
    def test_a_stuck_delivery_process_costs_a_scrape_its_delivery_families_not_the_scrape(self):
        import time

        from mailrelay.queue.process import METRICS_WAIT

        yield self.deliver_one()
        pid = self.child_pid()
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(os.kill, pid, signal.SIGCONT)
        started = time.monotonic()
        body = yield threads.deferToThread(scrape, self.main_port)
        waited = time.monotonic() - started
        os.kill(pid, signal.SIGCONT)
        self.assertGreaterEqual(waited, METRICS_WAIT * 0.9)
        self.assertLess(waited, METRICS_WAIT + 5)
        self.assertIn("mailrelay_delivery_process_up 0.0", body)
        self.assertIn('mailrelay_messages_accepted_total{listener="relay"} 1.0', body)
        self.assertNotIn("mailrelay_delivery_results_total", body)    # never a stale or zeroed copy
        # Its late answer is dropped; the next scrape has it again.
        body = yield threads.deferToThread(scrape, self.main_port)
        self.assertIn("mailrelay_delivery_process_up 1.0", body)
        self.assertEqual(body.count("# TYPE mailrelay_delivery_results_total "), 1)

    def child_pid(self) -> int:
        return self.service.scheduler._transport.pid


class PipeOrders(unittest.TestCase):
    """What goes down the child's stdin for a flush and a metrics request, and how answers come back."""

    def setUp(self):
        from mailrelay.queue.process import DeliveryProcess

        self.clock = task.Clock()
        self.written: list[bytes] = []
        written = self.written

        class Pipe:
            pipes: dict = {}
            pid = 4242

            def write(self, data):
                written.append(data)

        self.process = DeliveryProcess("tap.conf", self.clock)
        self.process.running = True
        self.process._transport = Pipe()

    def test_it_is_a_whole_scheduler_for_the_main_process(self):
        from zope.interface.verify import verifyObject

        from mailrelay.interfaces import IScheduler

        self.assertTrue(verifyObject(IScheduler, self.process))      # enqueue and flush

    def test_a_flush_follows_the_ids_committed_in_the_same_turn(self):
        self.process.enqueue("0123456789ABCDEF")
        self.process.flush()
        self.process.flush("FEDCBA9876543210")
        self.assertEqual(b"".join(self.written), b"enqueue 0123456789ABCDEF\nflush\nflush FEDCBA9876543210\n")

    def test_a_flush_while_the_child_restarts_goes_to_the_next_one(self):
        transport, self.process._transport = self.process._transport, None
        self.process.flush()
        self.assertEqual(self.written, [])
        self.process.reactor = type("R", (), {"seconds": staticmethod(lambda: 0.0),
                                              "spawnProcess": staticmethod(lambda *a, **k: transport)})()
        self.process._spawn()
        self.assertEqual(self.written, [b"flush\n"])

    def test_metrics_answers_are_matched_by_sequence_and_a_late_one_is_dropped(self):
        first, second = self.process.metrics_text(), self.process.metrics_text()
        self.assertEqual(self.written, [b"metrics 1\n", b"metrics 2\n"])
        got = []
        first.addCallback(got.append)
        second.addCallback(got.append)
        text = b"# TYPE x counter\nx_total 1.0\n"
        self.process.child_reply(b"metrics 2 %d\n" % len(text) + text[:5])      # in pieces
        self.assertEqual(got, [])
        self.process.child_reply(text[5:])
        self.assertEqual(got, [text])
        self.clock.advance(2.0)                               # METRICS_WAIT: the first goes without
        self.assertEqual(got, [text, None])
        self.process.child_reply(b"metrics 1 %d\n" % len(text) + text)           # too late: ignored
        self.assertEqual(got, [text, None])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_child_that_ends_answers_every_request_with_nothing(self):
        asked = self.process.metrics_text()
        self.process.child_ended(self.process._child, type("F", (), {"getErrorMessage": lambda self: "gone"})())
        self.assertIsNone(self.successResultOf(asked))
        self.assertIsNone(self.successResultOf(self.process.metrics_text()))     # no child: at once
