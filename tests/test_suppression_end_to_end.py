"""`[suppression]` end to end over real sockets: a next hop refuses a recipient with 550 5.1.1, the DSN goes
out, and the relay's next RCPT to that address gets 550 5.1.1 with the reason; 5.7.1 and 4xx refusals
suppress nothing; the real `mailrelay suppression` program lifts and adds entries on the running relay.
With delivery inline and in a separate delivery process."""
from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

import mailrelay
from tests.support.logcapture import LogLines
from tests.support.polling import eventually
from tests.support.relay import RelayFixture, free_port
from tests.support.sink import Sink

MESSAGE = b"From: app@example.org\r\nTo: several@example.net\r\nSubject: hello\r\n\r\nbody\r\n"
ROOT = Path(mailrelay.__file__).resolve().parents[1]


def config_for(port: int, process: str) -> str:
    return (f'[transports.sink]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n'
            f'[delivery]\nprocess = "{process}"\n\n[queue]\nfirst_retry = "1s"\n\n'
            '[suppression]\nenabled = true\nduration = "7d"\n')


def rcpt_sync(relay: RelayFixture, recipient: str, source: str | None = None) -> tuple[int, str]:
    """MAIL and one RCPT to the relay's port 25 listener; the RCPT reply (code, text)."""
    with smtplib.SMTP("127.0.0.1", relay.ports["relay"], timeout=30,
                      source_address=(source, 0) if source else None) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("app@example.org")
        code, text = smtp.rcpt(recipient)
        smtp.rset()
        return code, text.decode("ascii", "replace")


def rcpt(relay: RelayFixture, recipient: str, source: str | None = None) -> defer.Deferred:
    return threads.deferToThread(rcpt_sync, relay, recipient, source)


def rcpt_until(relay: RelayFixture, recipient: str, code: int, seconds: float = 15.0) -> defer.Deferred:
    """The RCPT reply to `recipient`, asked again until it has `code` (or the time is up)."""
    replies: list = []

    def asked() -> defer.Deferred:
        return rcpt(relay, recipient).addCallback(lambda reply: replies.append(reply) or reply[0] == code)
    return eventually(asked, timeout=seconds, interval=0.2).addCallback(lambda _: replies[-1])


class SuppressionEndToEnd:
    process = "inline"
    timeout = 120

    def setUp(self):
        self.sink = Sink(rcpt_replies={
            "gone@example.net": "550 5.1.1 <gone@Example.NET>: no such user",
            "policy@example.net": "550 5.7.1 we do not take mail from you",
            "later@example.net": "450 4.2.1 mailbox busy, try later",
        })
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        self.relay = RelayFixture(self.mktemp(), extra=config_for(self.sink_port, self.process))
        self.service = self.relay.start(reactor)
        self.addCleanup(self.relay.stop)

    def rcpt(self, recipient: str, source: str | None = None) -> defer.Deferred:
        return rcpt(self.relay, recipient, source)

    def rcpt_until(self, recipient: str, code: int) -> defer.Deferred:
        return rcpt_until(self.relay, recipient, code)

    def cli(self, *args: str) -> defer.Deferred:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        return threads.deferToThread(
            subprocess.run, [sys.executable, "-m", "mailrelay.cli.main", "suppression", *args,
                             "--config", str(self.relay.path)],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)

    def metric(self, name: str, labels: dict | None = None):
        return self.service.metrics.registry.get_sample_value(name, labels or {})

    @defer.inlineCallbacks
    def test_a_550_5_1_1_suppresses_the_address_until_an_operator_removes_it(self):
        # gone@ last: its suppression is written after anything the other two could have written.
        code, _ = yield self.relay.submit("relay", "app@example.org",
                                          ["policy@example.net", "later@example.net", "gone@Example.NET"], MESSAGE)
        self.assertEqual(code, 250)
        dsn = (yield self.sink.wait_for(1))[0]
        self.assertEqual(dsn.rcpt_tos, ["app@example.org"])
        self.assertIn(b"gone@Example.NET", dsn.data)             # the DSN goes out as always
        self.assertIn(b"policy@example.net", dsn.data)

        code, text = yield self.rcpt_until("gone@example.net", 550)
        self.assertEqual(code, 550, text)
        self.assertTrue(text.startswith("5.1.1 <gone@example.net>: suppressed since "), text)
        self.assertIn('after "550 5.1.1 <gone@Example.NET>: no such user" from 127.0.0.1; until ', text)
        # A policy refusal (5.7.1) and a temporary one (4xx) suppress nothing; the local part is exact.
        attempted = [c for s in self.sink.sessions for _, c in s.commands]
        self.assertIn(b"RCPT TO:<later@example.net>", attempted)
        for other in ("policy@example.net", "later@example.net", "Gone@example.net"):
            code, text = yield self.rcpt(other)
            self.assertEqual(code, 250, (other, text))
        # A client that may not relay there learns nothing of the list: the policy answers first.
        code, text = yield self.rcpt("gone@example.net", source="127.0.0.2")
        self.assertEqual((code, text), (550, "5.7.1 Relay access denied"))
        self.assertGreaterEqual(self.metric("mailrelay_messages_refused_total", {"reason": "suppressed"}), 1)
        self.assertEqual(self.metric("mailrelay_suppressed_addresses"), 1)

        listed = yield self.cli("list", "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        entries = json.loads(listed.stdout)
        self.assertEqual([(e["address"], e["source"], e["reply"]) for e in entries],
                         [("gone@Example.NET", "bounce", "550 5.1.1 <gone@Example.NET>: no such user")])

        removed = yield self.cli("remove", "gone@example.net")
        self.assertEqual(removed.returncode, 0, removed.stderr)
        self.assertIn("gone@example.net is no longer suppressed", removed.stdout)
        code, text = yield self.rcpt_until("gone@example.net", 250)
        self.assertEqual(code, 250, text)
        again = yield self.cli("remove", "gone@example.net")
        self.assertEqual((again.returncode, again.stdout), (1, ""))
        self.assertEqual(again.stderr, "mailrelay suppression: gone@example.net is not suppressed\n")

    @defer.inlineCallbacks
    def test_an_operator_adds_an_address_to_the_running_relay(self):
        added = yield self.cli("add", "trap@example.net", "--reason", "a known spam trap")
        self.assertEqual(added.returncode, 0, added.stderr)
        code, text = yield self.rcpt_until("trap@example.net", 550)
        self.assertEqual(code, 550, text)
        self.assertIn("suppressed since ", text)
        self.assertIn("added by an operator: a known spam trap; until ", text)
        listed = yield self.cli("list")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertIn("trap@example.net  since ", listed.stdout)
        self.assertTrue(listed.stdout.endswith("1 address suppressed; suppression is on: 7d per address\n"),
                        listed.stdout)
        refused = yield self.cli("add", "not an address")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("is not an address (local@domain)", refused.stderr)


class Inline(SuppressionEndToEnd, unittest.TestCase):
    process = "inline"


class SeparateDeliveryProcess(SuppressionEndToEnd, unittest.TestCase):
    process = "separate"


class UnderTwistd(unittest.TestCase):
    """The real program: twistd with the delivery process, the list surviving a restart."""
    timeout = 180

    @defer.inlineCallbacks
    def test_twistd_suppresses_and_the_list_outlives_a_restart(self):
        sink = Sink(rcpt_replies={"gone@example.net": "550 5.2.1 mailbox disabled"})
        port = sink.start(reactor)
        self.addCleanup(sink.stop)
        relay = RelayFixture(self.mktemp(), extra=config_for(port, "separate"))
        self.addCleanup(relay.kill)
        yield threads.deferToThread(relay.spawn)
        code, _ = yield relay.submit("relay", "app@example.org", ["gone@example.net"], MESSAGE)
        self.assertEqual(code, 250)
        yield sink.wait_for(1)                                       # the DSN
        code, text = yield rcpt_until(relay, "gone@example.net", 550)
        self.assertEqual(code, 550, text)
        self.assertIn('after "550 5.2.1 mailbox disabled" from 127.0.0.1', text)
        yield threads.deferToThread(relay.kill, signal.SIGTERM)
        yield threads.deferToThread(relay.spawn)
        code, text = yield rcpt(relay, "gone@example.net")
        self.assertEqual(code, 550, text)                            # read back from the spool at start
        self.assertIn("mailrelay.suppression", (relay.dir / "twistd.log").read_text())


class SenderRefused(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_5_1_x_refusal_of_mail_from_suppresses_no_recipient(self):
        sink = Sink(mail_reply="550 5.1.0 <app@example.org>: sender address rejected")
        port = sink.start(reactor)
        self.addCleanup(sink.stop)
        relay = RelayFixture(self.mktemp(), extra=config_for(port, "inline"))
        service = relay.start(reactor)
        self.addCleanup(relay.stop)
        code, _ = yield relay.submit("relay", "app@example.org", ["gone@example.net"], MESSAGE)
        self.assertEqual(code, 250)
        # bounced, its DSN (from <>) refused the same way and dropped
        yield eventually(lambda: not service.spool.queue_ids() and len(sink.sessions) >= 2, timeout=10, interval=0.1)
        self.assertEqual(service.spool.queue_ids(), [])
        yield service.scheduler._suppression.wait()
        self.assertFalse((relay.dir / "spool" / "suppression.jsonl").exists())
        code, text = yield rcpt(relay, "gone@example.net")
        self.assertEqual(code, 250, text)


class Postmaster(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_mail_to_the_postmaster_is_taken_even_when_its_mailbox_is_suppressed(self):
        relay = RelayFixture(self.mktemp(), top='postmaster = "admin@example.org"\n',
                             extra=config_for(free_port(), "inline"))
        service = relay.start(reactor)
        self.addCleanup(relay.stop)
        service.suppression.journal.add("admin@example.org", reason="testing")
        code, text = yield rcpt_until(relay, "admin@example.org", 550)
        self.assertEqual(code, 550, text)
        for source in ("127.0.0.1", "127.0.0.2"):          # RFC 5321 4.5.1: from anyone, whatever the list
            code, text = yield rcpt(relay, "postmaster", source=source)
            self.assertEqual(code, 250, (source, text))


class Reload(unittest.TestCase):
    def test_a_changed_suppression_section_waits_for_a_restart_and_says_so(self):
        relay = RelayFixture(self.mktemp(), extra=config_for(free_port(), "inline"))
        service = relay.start(reactor)
        self.addCleanup(relay.stop)
        lines = LogLines(self)
        relay.path.write_text(relay.path.read_text().replace('duration = "7d"', 'duration = "1d"'))
        self.assertTrue(service.reload())
        self.assertEqual(lines.take("takes effect"),
                         ["reload: suppression changed; that takes effect only after a restart"])
        self.assertEqual(service.suppression.journal.duration, 7 * 86400)


class Disabled(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_with_suppression_off_a_550_5_1_1_suppresses_nothing(self):
        sink = Sink(rcpt_replies={"gone@example.net": "550 5.1.1 no such user"})
        port = sink.start(reactor)
        self.addCleanup(sink.stop)
        relay = RelayFixture(self.mktemp(), extra=config_for(port, "inline").replace("enabled = true",
                                                                                   "enabled = false"))
        relay.start(reactor)
        self.addCleanup(relay.stop)
        code, _ = yield relay.submit("relay", "app@example.org", ["gone@example.net"], MESSAGE)
        self.assertEqual(code, 250)
        yield sink.wait_for(1)                                       # the DSN
        code, _ = yield relay.submit("relay", "app@example.org", ["gone@example.net"], MESSAGE)
        self.assertEqual(code, 250)
        self.assertFalse((relay.dir / "spool" / "suppression.jsonl").exists())
