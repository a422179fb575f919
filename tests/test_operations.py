"""Operations end to end: metrics scraped over HTTP after real traffic, JSON log lines followed by queue id
from receipt to delivery, and configuration reload (in process, and by SIGHUP to a real twistd)."""
from __future__ import annotations

import json
import signal
import smtplib
import urllib.request

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from tests.support.relay import RelayFixture, free_port
from tests.support.sink import Sink

MESSAGE = b"From: app@example.org\r\nTo: user@example.com\r\nSubject: ops\r\n\r\nbody\r\n"


def route_to(port: int) -> str:
    return (f'[transports.sink]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n')


class Observability(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)

    @defer.inlineCallbacks
    def test_metrics_and_json_logs_follow_a_message(self):
        metrics_port = free_port()
        relay = RelayFixture(self.mktemp(), extra=route_to(self.sink_port) + (
            f'[metrics]\nendpoint = "tcp:{metrics_port}:interface=127.0.0.1"\n\n'
            '[log]\nformat = "json"\nfile = "relay.json"\n'))
        relay.start(reactor)
        self.addCleanup(relay.stop)
        code, text = yield relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        queue_id = text.decode().rsplit(" ", 1)[1]
        yield self.sink.wait_for(1)
        yield task.deferLater(reactor, 0.3, lambda: None)   # the scheduler records the result

        body = yield threads.deferToThread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode())
        self.assertIn('mailrelay_messages_accepted_total{listener="relay"} 1.0', body)
        self.assertIn('mailrelay_connections_total{listener="relay"} 1.0', body)
        self.assertIn('mailrelay_delivery_results_total{result="delivered",tls="none",transport="sink",'
                      'verified="false"} 1.0', body)        # the sink is plaintext
        self.assertIn("mailrelay_queue_messages 0.0", body)

        lines = [json.loads(line) for line in (relay.dir / "relay.json").read_text().splitlines()]
        stages = [e.get("stage") for e in lines if e.get("queue_id") == queue_id]
        self.assertIn("queued", stages)
        self.assertIn("delivered", stages)
        self.assertLess(stages.index("queued"), stages.index("delivered"))
        queued = [e for e in lines if e.get("queue_id") == queue_id and e.get("stage") == "queued"][0]
        self.assertEqual((queued["sender"], queued["client"]), ("app@example.org", "127.0.0.1"))
        self.assertNotIn("correct horse", (relay.dir / "relay.json").read_text())


class Reload(unittest.TestCase):
    timeout = 90

    def setUp(self):
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)

    def write(self, relay: RelayFixture, text: str) -> None:
        relay.path.write_text(text)

    @defer.inlineCallbacks
    def test_reload_applies_new_permit_rules_and_refuses_a_broken_config(self):
        relay = RelayFixture(self.mktemp(), extra=route_to(self.sink_port))
        service = relay.start(reactor)
        self.addCleanup(relay.stop)
        original = relay.path.read_text()
        code, _ = yield relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)

        self.write(relay, original + "\n[limits\n")                 # broken TOML
        self.assertFalse(service.reload())
        code, _ = yield relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)                                 # the old rules are still in force

        self.write(relay, original.replace('networks = ["127.0.0.1/32"]', 'networks = ["192.0.2.0/24"]'))
        self.assertTrue(service.reload())
        failure = yield self.assertFailure(
            relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE), smtplib.SMTPRecipientsRefused)
        (code, _), = failure.recipients.values()
        self.assertEqual(code, 550)
        code, _ = yield relay.submit("submission", "app@example.org", ["user@example.com"], MESSAGE, user="app1")
        self.assertEqual(code, 250)                                 # AUTH still works after the reload

    @defer.inlineCallbacks
    def test_sighup_to_twistd_reloads_routes(self):
        other = Sink()
        other_port = other.start(reactor)
        self.addCleanup(other.stop)
        relay = RelayFixture(self.mktemp(), extra=route_to(self.sink_port))
        self.addCleanup(relay.kill)
        yield threads.deferToThread(relay.spawn)
        code, _ = yield relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        yield self.sink.wait_for(1)

        relay.path.write_text(relay.path.read_text().replace(f"port = {self.sink_port}", f"port = {other_port}"))
        relay.process.send_signal(signal.SIGHUP)
        for _ in range(100):
            if "applied" in (relay.dir / "twistd.log").read_text():
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        code, _ = yield relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        yield other.wait_for(1)
        self.assertEqual(len(self.sink.messages), 1)
        self.assertIsNone(relay.process.poll())                     # still running: SIGHUP did not kill it
