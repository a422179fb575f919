"""[[webhook]] end to end: a real relay delivering to a real SMTP sink, events POSTed to a real HTTPS
receiver on loopback whose certificate comes from a test CA; and a real twistd killed with -9 while
the receiver is down, restarted, and every event arriving once the receiver is up."""
from __future__ import annotations

import json
import signal
from pathlib import Path

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from mailrelay.events.store import read_backlog
from tests.support.pki import TestCA
from tests.support.polling import until
from tests.support.ports import free_port
from tests.support.relay import SEPARATE, RelayFixture
from tests.support.sink import Sink
from tests.support.webhookserver import WebhookReceiver

MESSAGE = b"From: app@example.org\r\nTo: someone@example.com\r\nSubject: hook\r\n\r\nbody\r\n"
SECRET = b"webhook-test-secret"


class _Relay(unittest.TestCase):
    """A sink, a test CA, a receiver (not yet listening) and a relay config naming both."""
    timeout = 120

    def setUp(self):
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        self.ca = TestCA()
        self.receiver = WebhookReceiver(self.ca, secret=SECRET)
        self.hook_port = free_port()

    def start_receiver(self):
        self.receiver.start(reactor, self.hook_port)
        self.addCleanup(self.receiver.stop)

    def fixture(self, queue: str = 'first_retry = "1s"', webhook: str = "", **kwargs) -> RelayFixture:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        self.ca.write(directory)
        (directory / "hook.secret").write_bytes(b"  " + SECRET + b"\n")
        extra = (f'[transports.sink]\nhost = "127.0.0.1"\nport = {self.sink_port}\nsecurity = "none"\n\n'
                 f'[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n[queue]\n{queue}\n\n'
                 f'[[webhook]]\nurl = "{self.receiver.url(self.hook_port)}"\nsecret_file = "hook.secret"\n'
                 f'ca_file = "ca.pem"\ntimeout = "2s"\n{webhook}\n')
        return RelayFixture(str(directory), extra=extra, **kwargs)

    def start_relay(self, **kwargs) -> RelayFixture:
        relay = self.fixture(**kwargs)
        relay.start(reactor)
        self.addCleanup(relay.stop)
        return relay

    def events_for(self, recipient: str) -> list[dict]:
        return [e for e in self.receiver.events if e["recipient"] == recipient]

    def check_signatures(self):
        self.assertTrue(self.receiver.posts)
        for post in self.receiver.posts:
            self.assertTrue(self.receiver.signature_ok(post), post.headers)
            self.assertEqual(post.headers["content-type"], "application/json")


class Receiving(_Relay):
    @defer.inlineCallbacks
    def test_delivered_bounced_and_deferred_events_reach_the_receiver_signed(self):
        self.sink.rcpt_replies = {"gone@example.com": "550 5.1.1 no such user",
                                  "later@example.com": "451 4.2.0 mailbox busy"}
        self.start_receiver()
        relay = self.start_relay()
        code, _ = yield relay.submit("relay", "app@example.org",
                                     ["ok@example.com", "gone@example.com", "later@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        yield until(lambda: all(self.events_for(r) for r in ("ok@example.com", "gone@example.com",
                                                                 "later@example.com")), "three events")
        [delivered], [bounced] = self.events_for("ok@example.com"), self.events_for("gone@example.com")
        deferred = self.events_for("later@example.com")[0]
        self.assertEqual((delivered["event"], delivered["reply"]["code"], delivered["attempt"]), ("delivered", 250, 1))
        self.assertEqual((bounced["event"], bounced["reply"]["enhanced"], bounced["reply"]["text"]),
                         ("bounced", "5.1.1", "no such user"))
        self.assertEqual((deferred["event"], deferred["reply"]["code"], deferred["reply"]["enhanced"]),
                         ("deferred", 451, "4.2.0"))
        for event in (delivered, bounced, deferred):
            self.assertEqual((event["sender"], event["next_hop"], event["transport"]),
                             ("app@example.org", "127.0.0.1", "sink"))
            self.assertEqual(event["queue_id"], delivered["queue_id"])
            self.assertTrue(event["time"].endswith("Z"))
        self.assertEqual(len({e["id"] for e in self.receiver.events}), len(self.receiver.events))
        self.check_signatures()

    @defer.inlineCallbacks
    def test_expiry_produces_an_expired_event(self):
        self.sink.rcpt_replies = {"late@example.com": "451 4.2.0 mailbox busy"}
        self.start_receiver()
        relay = self.start_relay(queue='first_retry = "1s"\nlifetime = "2s"\nbounces = false',
                                 webhook='events = ["expired"]')
        yield relay.submit("relay", "app@example.org", ["late@example.com"], MESSAGE)
        yield self.receiver.wait_for_events(1)
        [expired] = self.receiver.events
        self.assertEqual((expired["event"], expired["recipient"], expired["reply"]["enhanced"]),
                         ("expired", "late@example.com", "4.4.7"))
        self.assertIn("451 4.2.0 mailbox busy", expired["reply"]["text"])
        self.assertGreaterEqual(expired["attempt"], 1)
        self.check_signatures()

    @defer.inlineCallbacks
    def test_a_receiver_that_hangs_does_not_hold_up_delivery(self):
        self.receiver.mode = "hang"
        self.start_receiver()
        relay = self.start_relay()
        for i in range(3):
            yield relay.submit("relay", "app@example.org", [f"r{i}@example.com"], MESSAGE)
        yield self.sink.wait_for(3)
        queue = relay.dir / "spool" / "queue"
        yield until(lambda: not any(queue.iterdir()), "the spool to empty while the receiver hangs")
        yield self.receiver.wait_for_posts(1)
        self.assertEqual(self.receiver.events, [])                 # nothing was answered ...
        [backlog] = read_backlog(relay.dir / "spool")
        self.assertEqual(backlog.pending, 3)                        # ... so all three wait, durable
        self.receiver.mode = "ok"
        self.receiver.release()                                     # the hung POSTs fail; retried after a pause
        yield self.receiver.wait_for_events(3)
        self.assertEqual({e["recipient"] for e in self.receiver.events}, {f"r{i}@example.com" for i in range(3)})

    @defer.inlineCallbacks
    def test_the_delivery_process_sends_events_too(self):
        self.start_receiver()
        relay = self.start_relay(process=SEPARATE)
        yield relay.submit("relay", "app@example.org", ["ok@example.com"], MESSAGE)
        yield self.receiver.wait_for_events(1)
        self.assertEqual(self.receiver.events[0]["event"], "delivered")
        self.check_signatures()


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


class AcrossARestart(_Relay):
    """A real twistd (the default mode: a delivery process), killed with -9."""

    def tearDown(self):
        if getattr(self, "relay", None) is not None:
            self.relay.kill(signal.SIGTERM)

    @defer.inlineCallbacks
    def test_events_recorded_while_the_receiver_is_down_arrive_after_kill_9_and_restart(self):
        self.relay = relay = self.fixture(process=SEPARATE)
        yield threads.deferToThread(relay.spawn)
        recipients = [f"r{i}@example.com" for i in range(3)]
        for recipient in recipients:
            code, _ = yield relay.submit("relay", "app@example.org", [recipient], MESSAGE)
            self.assertEqual(code, 250)
        yield self.sink.wait_for(3)
        spool = relay.dir / "spool"

        def recorded():
            backlog = read_backlog(spool)
            return backlog and backlog[0].pending == 3 and backlog[0].last_error
        yield until(recorded, "three events in the outbox and a failed POST")
        on_disk = set()
        for path in read_backlog(spool)[0].directory.glob("*.events"):
            on_disk |= {json.loads(line)["id"] for line in path.read_bytes().splitlines()}
        children = _children(relay.process.pid)
        relay.kill(signal.SIGKILL)
        yield until(lambda: all(_gone(child) for child in children), "the old delivery process to exit")

        self.start_receiver()                 # up only now, on the URL the relay was given
        yield threads.deferToThread(relay.spawn)
        yield self.receiver.wait_for_events(3)
        self.assertEqual(self.receiver.ids(), on_disk)
        self.assertEqual({e["recipient"] for e in self.receiver.events}, set(recipients))
        self.assertEqual({e["event"] for e in self.receiver.events}, {"delivered"})
        # No POST was answered before the kill (the receiver was down): each id arrived exactly once.
        self.assertEqual(len(self.receiver.events), 3)
        self.check_signatures()
        yield until(lambda: read_backlog(spool)[0].pending == 0, "the outbox to empty")
        log = (relay.dir / "twistd.log").read_text()
        self.assertNotIn(SECRET.decode(), log)
        self.assertIn("3 events waiting from before", log)


class Reload(_Relay):
    @defer.inlineCallbacks
    def test_a_url_removed_on_reload_stops_receiving_and_its_backlog_stays(self):
        self.start_receiver()
        relay = self.start_relay()
        yield relay.submit("relay", "app@example.org", ["one@example.com"], MESSAGE)
        yield self.receiver.wait_for_events(1)
        text = relay.path.read_text()
        relay.path.write_text(text[:text.index("[[webhook]]")])
        self.assertTrue(relay.service.reload())
        self.assertEqual(relay.service.events.backlog(), [])
        yield relay.submit("relay", "app@example.org", ["two@example.com"], MESSAGE)
        yield self.sink.wait_for(2)
        self.assertEqual(len(self.receiver.events), 1)
