"""Operations end to end: metrics scraped over HTTP after real traffic, JSON log lines followed by queue id
from receipt to delivery, and configuration reload (in process, and by SIGHUP to a real twistd): what it
applies, the limits' state it keeps, and the restart-only keys it warns about."""
from __future__ import annotations

import base64
import json
import signal
import smtplib
import urllib.request

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from tests.support.logcapture import LogLines
from tests.support.polling import eventually
from tests.support.relay import SEPARATE, RelayFixture, free_port
from tests.support.sink import Sink

MESSAGE = b"From: app@example.org\r\nTo: user@example.com\r\nSubject: ops\r\n\r\nbody\r\n"


def route_to(port: int) -> str:
    return (f'[transports.sink]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n')


class Observability(unittest.TestCase):
    """In the default mode: the delivery process counts the delivery, the main endpoint shows it."""
    timeout = 60
    PROCESS = SEPARATE

    def setUp(self):
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)

    @defer.inlineCallbacks
    def test_metrics_and_json_logs_follow_a_message(self):
        metrics_port = free_port()
        relay = RelayFixture(self.mktemp(), extra=route_to(self.sink_port) + (
            f'[metrics]\nendpoint = "tcp:{metrics_port}:interface=127.0.0.1"\n\n'
            '[log]\nformat = "json"\nfile = "relay.json"\n'), process=self.PROCESS)
        relay.start(reactor)
        self.addCleanup(relay.stop)
        code, text = yield relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        queue_id = text.decode().rsplit(" ", 1)[1]
        yield self.sink.wait_for(1)
        log = relay.dir / "relay.json"

        def removed() -> bool:      # the scheduler logs "removed" once it has forgotten the message too
            return log.exists() and f'"queue_id":"{queue_id}"' in log.read_text().replace(" ", "") and any(
                '"stage":"removed"' in line.replace(" ", "") and queue_id in line
                for line in log.read_text().splitlines())
        yield eventually(removed, timeout=10, interval=0.05)

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


class InlineObservability(Observability):
    """The same with `[delivery] process = "inline"`: one process counts everything."""
    PROCESS = "inline"


def auth_attempt(relay: RelayFixture, source: str, password: str) -> int:
    """Blocking: one AUTH PLAIN for app1 on the implicit-TLS port from `source`; the reply code."""
    smtp = smtplib.SMTP_SSL("127.0.0.1", relay.ports["submissions"], context=relay.tls_context(), timeout=30,
                            source_address=(source, 0))
    try:
        smtp.ehlo("client.test")
        code, _ = smtp.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0app1\0{password}".encode()).decode())
        return code
    finally:
        smtp.close()


def rate_refused(relay: RelayFixture, kind: str = "relay") -> int:
    """Blocking: one message as in `relay.submit`; 250, or the code it was refused with at MAIL."""
    try:
        code, _ = relay.submit_sync(kind, "app@example.org", ["user@example.com"], MESSAGE)
    except smtplib.SMTPSenderRefused as e:
        code = e.smtp_code
    return code




class SighupHandler(unittest.TestCase):
    """twistd binds the listeners in privilegedStartService, before startService: the SIGHUP handler must
    be in place by then, or a SIGHUP in between kills the relay."""

    def test_the_handler_is_installed_before_the_listeners_are_bound(self):
        from twisted.application import service as twisted_service

        from mailrelay.service import make_service

        relay = RelayFixture(self.mktemp())
        installed, bound = [], []
        self.patch(signal, "signal", lambda signum, handler: installed.append(signum))
        self.patch(twisted_service.MultiService, "privilegedStartService",
                   lambda self: bound.append(list(installed)))
        make_service(relay.config(), handle_sighup=True).privilegedStartService()
        self.assertEqual(bound, [[signal.SIGHUP]])

    def test_no_handler_unless_asked(self):
        from twisted.application import service as twisted_service

        from mailrelay.service import make_service

        relay = RelayFixture(self.mktemp())
        installed = []
        self.patch(signal, "signal", lambda signum, handler: installed.append(signum))
        self.patch(twisted_service.MultiService, "privilegedStartService", lambda self: None)
        make_service(relay.config()).privilegedStartService()
        self.assertEqual(installed, [])


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
        yield eventually(lambda: "applied" in (relay.dir / "twistd.log").read_text(), timeout=10, interval=0.1)
        code, _ = yield relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        yield other.wait_for(1)
        self.assertEqual(len(self.sink.messages), 1)
        self.assertIsNone(relay.process.poll())                     # still running: SIGHUP did not kill it

    @defer.inlineCallbacks
    def test_reload_keeps_spent_budgets_and_applies_new_limits_to_them(self):
        limits = "[limits]\nmessages_per_minute = {rate}\nauth_failures_per_minute = {auth}\n"
        relay = RelayFixture(self.mktemp(), extra=route_to(self.sink_port) + limits.format(rate=2, auth=2))
        service = relay.start(reactor)
        self.addCleanup(relay.stop)
        original = relay.path.read_text()
        codes = yield threads.deferToThread(lambda: [rate_refused(relay) for _ in range(3)])
        self.assertEqual(codes, [250, 250, 450])
        codes = yield threads.deferToThread(lambda: [auth_attempt(relay, "127.0.0.2", "wrong") for _ in range(3)])
        self.assertEqual(codes, [535, 535, 421])
        yield threads.deferToThread(auth_attempt, relay, "127.0.0.3", "wrong")      # one failure counted

        # Raised limits: the identity at its limit stays there (no fresh budget), and 127.0.0.2 may
        # try exactly two more times (a window sized for the old limit would never say 421 again).
        self.write(relay, original.replace(limits.format(rate=2, auth=2), limits.format(rate=3, auth=4)))
        self.assertTrue(service.reload())
        self.assertEqual((yield threads.deferToThread(rate_refused, relay)), 450)
        codes = yield threads.deferToThread(lambda: [auth_attempt(relay, "127.0.0.2", "wrong") for _ in range(3)])
        self.assertEqual(codes, [535, 535, 421])

        # A lowered AUTH limit applies at once to 127.0.0.3, already counted once.
        self.write(relay, original.replace(limits.format(rate=2, auth=2), limits.format(rate=3, auth=1)))
        self.assertTrue(service.reload())
        code = yield threads.deferToThread(auth_attempt, relay, "127.0.0.3", relay.users["app1"])
        self.assertEqual(code, 421)
        code = yield threads.deferToThread(auth_attempt, relay, "127.0.0.4", relay.users["app1"])
        self.assertEqual(code, 235)

    @defer.inlineCallbacks
    def test_restart_only_keys_warn_while_they_differ_from_what_is_bound(self):
        relay = RelayFixture(self.mktemp(), extra=route_to(self.sink_port) + '[delivery]\nprocess = "inline"\n')
        service = relay.start(reactor)
        self.addCleanup(relay.stop)
        original = relay.path.read_text()
        lines = LogLines(self)

        self.write(relay, original.replace('process = "inline"', 'process = "separate"'))
        self.assertTrue(service.reload())
        self.assertEqual(lines.take("changed"),
                         ["reload: delivery.process changed; that takes effect only after a restart"])
        self.write(relay, original.replace('hostname = "relay.test"', 'hostname = "other.test"'))
        self.assertTrue(service.reload())
        self.assertEqual(lines.take("changed"),
                         ["reload: hostname changed; that takes effect only after a restart"])
        self.assertTrue(service.reload())                       # still not in force: still said
        self.assertEqual(len(lines.take("hostname changed")), 1)

        self.write(relay, original)                             # changed back: what is bound again
        for _ in range(2):
            self.assertTrue(service.reload())
            self.assertEqual(lines.take("changed"), [])
        code, _ = yield relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        yield self.sink.wait_for(1)                             # still delivering inline

    @defer.inlineCallbacks
    def test_sighup_to_twistd_keeps_an_identity_at_its_limit(self):
        relay = RelayFixture(self.mktemp(), extra=route_to(self.sink_port) + "[limits]\nmessages_per_minute = 1\n")
        self.addCleanup(relay.kill)
        yield threads.deferToThread(relay.spawn)
        codes = yield threads.deferToThread(lambda: [rate_refused(relay) for _ in range(2)])
        self.assertEqual(codes, [250, 450])

        relay.path.write_text(relay.path.read_text().replace("messages_per_minute = 1", "messages_per_minute = 2"))
        relay.process.send_signal(signal.SIGHUP)
        yield eventually(lambda: "applied" in (relay.dir / "twistd.log").read_text(), timeout=10, interval=0.1)
        self.assertIn("applied", (relay.dir / "twistd.log").read_text())
        self.assertEqual((yield threads.deferToThread(rate_refused, relay)), 450)   # no fresh budget
        self.assertIsNone(relay.process.poll())
