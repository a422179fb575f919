"""`[[throttle]]` end to end: a real relay, real sockets, a real next hop that says "slow down" on cue.

The sink (tests/support/sink.py) counts the connections open at once, stamps each MAIL FROM, answers
421 or 451 4.7.x when told, and can hold its replies so that connections pile up.  Direct delivery
resolves through the loopback DNS server; smarthost routes go to the sink as a transport.  Timing is
asserted only as a lower bound the relay's rate guarantees, never as an exact figure.
"""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from mailrelay import config as configuration
from mailrelay.cli import main as cli_main
from mailrelay.queue.job import Timeouts
from mailrelay.outbound.smarthost import SmarthostTransport
from mailrelay.queue.state import MessageState
from mailrelay.queue.throttle import slows_down
from mailrelay.spool import Spool
from tests.support.dnsserver import DNSServer
from tests.support.polling import until
from tests.support.ports import free_port
from tests.support.relay import RelayFixture
from tests.support.scheduling import BodyMessage
from tests.support.sink import Sink

MESSAGE = b"From: app@example.org\r\nSubject: shaped\r\n\r\nbody\r\n"


def events(relay: RelayFixture) -> list[dict]:
    path = relay.dir / "relay.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class SlowDownOverTheWire(unittest.TestCase):
    """What the delivery client tells apart: the next hop's own "slow down", and the relay's verdicts."""

    @defer.inlineCallbacks
    def deliver(self, sink: Sink, reply_timeout: float = 10.0, port=None):
        if port is None:
            port = sink.start(reactor)
            self.addCleanup(sink.stop)
        hop = SmarthostTransport(configuration.Transport("sink", "127.0.0.1", port, security="none", verify=False),
                                 "relay.test", reactor=reactor, timeouts=Timeouts(5.0, reply_timeout, reply_timeout))
        self.addCleanup(hop.close_idle)
        (result,) = yield hop.deliver(BodyMessage.to("a@slow.test"), ["a@slow.test"])
        return result

    @defer.inlineCallbacks
    def test_a_421_greeting_is_the_next_hops_own_reply(self):
        result = yield self.deliver(Sink(greetings=("421 4.7.0 too many connections from your IP",)))
        self.assertEqual((result.code, result.remote_reply, slows_down(result)), (421, True, True))

    @defer.inlineCallbacks
    def test_a_451_4_7_1_to_mail_from_and_to_rcpt_slow_down(self):
        result = yield self.deliver(Sink(mail_reply="451 4.7.1 rate limited"))
        self.assertTrue(slows_down(result), result)
        result = yield self.deliver(Sink(rcpt_replies={"a@slow.test": "450 4.7.28 unusual rate"}))
        self.assertTrue(slows_down(result), result)

    @defer.inlineCallbacks
    def test_other_deferrals_and_refusals_do_not(self):
        result = yield self.deliver(Sink(data_replies=("451 4.3.0 disk full",)))
        self.assertEqual((result.code, result.remote_reply, slows_down(result)), (451, True, False))
        result = yield self.deliver(Sink(greetings=("554 5.7.1 you are not welcome",)))
        self.assertFalse(slows_down(result), result)       # a 5xx greeting, deferred by us: no pause

    @defer.inlineCallbacks
    def test_the_relays_own_verdicts_do_not(self):
        result = yield self.deliver(Sink(), port=free_port())        # nothing listens there
        self.assertEqual((result.temporary, result.remote_reply), (True, False))
        result = yield self.deliver(Sink(silent=True), reply_timeout=0.5)    # a timeout: 421 4.4.2, ours
        self.assertEqual((result.code, result.remote_reply, slows_down(result)), (421, False, False))


class ThrottleEndToEnd(unittest.TestCase):
    timeout = 120

    def start_relay(self, extra: str, sink: Sink, **kwargs) -> RelayFixture:
        self.sink_port = sink.start(reactor)
        self.addCleanup(sink.stop)
        relay = RelayFixture(self.mktemp(), extra=extra.replace("SINK_PORT", str(self.sink_port))
                             + '\n[log]\nformat = "json"\nfile = "relay.json"\n', **kwargs)
        relay.start(reactor)
        self.addCleanup(relay.stop)
        return relay

    def smarthost(self, throttle: str) -> str:
        return ('[transports.sink]\nhost = "127.0.0.1"\nport = SINK_PORT\nsecurity = "none"\n\n'
                '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n' + throttle)

    @defer.inlineCallbacks
    def submit(self, relay: RelayFixture, *recipients: str) -> defer.Deferred:
        """Each recipient in a message of its own; the queue ids, in order."""
        ids = []
        for recipient in recipients:
            code, text = yield relay.submit("relay", "app@example.org", [recipient], MESSAGE)
            self.assertEqual(code, 250, text)
            ids.append(text.decode().rsplit(" ", 1)[1])
        return ids

    def cli(self, relay: RelayFixture, *argv: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(cli_main.main(["queue", *argv, "--config", str(relay.path)]), 0)
        return out.getvalue()

    def attempts(self, relay: RelayFixture, queue_id: str) -> int:
        config = relay.config()
        message = Spool(config.spool).load(queue_id)
        state = MessageState.from_dict(message.state, message.envelope.recipients)
        return max(r.attempts for r in state.recipients)

    @defer.inlineCallbacks
    def test_the_connection_cap_holds_direct_to_mx(self):
        dns = DNSServer({("cap.test", "MX"): ["10 mx.cap.test."], ("mx.cap.test", "A"): ["127.0.0.1"]})
        dns_port = dns.start(reactor)
        self.addCleanup(dns.stop)
        sink = Sink(hold_data=True)
        relay = self.start_relay(
            '[delivery]\ntls = "none"\nmx_port = SINK_PORT\n'
            f'nameservers = ["127.0.0.1:{dns_port}"]\n\n'
            '[[throttle]]\ndomains = ["cap.test"]\nconnections = 2\n', sink)
        yield self.submit(relay, *[f"user{i}@cap.test" for i in range(6)])
        yield until(lambda: len(sink.held) == 2, "two messages held at the sink")
        yield task.deferLater(reactor, 0.5, lambda: None)     # time for a third connection, if one came
        self.assertEqual(sink.max_at_once, 2)
        self.assertEqual(len(sink.held), 2)
        sink.release()
        yield sink.wait_for(6)
        self.assertLessEqual(sink.max_at_once, 2)

    @defer.inlineCallbacks
    def test_the_rate_holds_one_message_per_interval(self):
        sink = Sink()
        relay = self.start_relay(self.smarthost('[[throttle]]\ndomains = ["rate.test"]\n'
                                                'messages_per_minute = 120\n'), sink)
        yield self.submit(relay, *[f"user{i}@rate.test" for i in range(5)])
        yield sink.wait_for(5)
        times = sorted(sink.mail_times)
        # Five starts at least 0.5 s apart: the last MAIL FROM comes 2 s after the first at the
        # soonest; asserted with room for the clocks of two processes and the first connection.
        self.assertGreaterEqual(times[-1] - times[0], 1.5)
        starts = [e for e in events(relay) if e.get("stage") == "attempt"]
        self.assertEqual(len(starts), 5)                          # each once: none was a failed attempt

    @defer.inlineCallbacks
    def test_a_pause_holds_one_destination_only_and_its_waiting_messages_are_no_attempts(self):
        # A smarthost route: the destinations are still the recipient domains.
        sink = Sink(rcpt_replies={"first@slow.test": ["421 4.7.0 slow down, too many messages"]})
        relay = self.start_relay(self.smarthost('[[throttle]]\ndomains = "*"\npause = "6s"\n'), sink)
        (first,) = yield self.submit(relay, "first@slow.test")
        yield until(lambda: any(e.get("stage") == "throttle-paused" for e in events(relay)),
                         "slow.test paused")
        paused_at = time.monotonic()
        waiting = yield self.submit(relay, "second@slow.test", "third@slow.test")
        (other,) = yield self.submit(relay, "user@other.test")
        yield sink.wait_for(1)                                    # other.test: not held by the pause
        self.assertEqual(sink.messages[0].rcpt_tos, ["user@other.test"])
        # The status file follows within a second.
        yield until(lambda: waiting[1] in self.cli(relay, "throttle") or time.monotonic() - paused_at > 5,
                         "the waiting messages in `queue throttle`")
        if time.monotonic() - paused_at < 5:                     # still within the pause (a loaded
            self.assertEqual([self.attempts(relay, q) for q in waiting], [0, 0])   # machine may be late)
            self.assertEqual(self.attempts(relay, first), 1)
            text = self.cli(relay, "throttle")
            self.assertIn("slow.test  PAUSED", text)
            self.assertIn("waiting 2", text)
            self.assertIn("421 4.7.0 slow down", text)
            self.assertIn(waiting[0], text)
            listed = self.cli(relay, "list")
            self.assertIn("waiting: slow.test paused", listed)
        yield sink.wait_for(4)
        self.assertEqual(sorted(r for m in sink.messages for r in m.rcpt_tos),
                         ["first@slow.test", "second@slow.test", "third@slow.test", "user@other.test"])
        yield until(lambda: sum(e.get("stage") == "delivered" for e in events(relay)) == 4,
                         "four deliveries logged")
        lines = events(relay)
        for queue_id in waiting:       # tried once, when the pause was over, and delivered
            stages = [e["stage"] for e in lines if e.get("queue_id") == queue_id and "stage" in e]
            self.assertEqual(stages.count("attempt"), 1, stages)
            self.assertNotIn("deferred", stages)
        first_stages = [e["stage"] for e in lines if e.get("queue_id") == first and "stage" in e]
        self.assertEqual(first_stages.count("deferred"), 1)
        self.assertIn("delivered", first_stages)
        self.assertTrue(any(e.get("stage") == "throttle-resumed" and e.get("destination") == "slow.test"
                            for e in lines))
        self.assertNotIn(other, [e.get("queue_id") for e in lines if e.get("stage") == "throttle-paused"])

    @defer.inlineCallbacks
    def test_a_local_connection_failure_does_not_pause(self):
        relay = self.start_relay(
            '[transports.gone]\nhost = "127.0.0.1"\nport = GONE_PORT\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "gone"\n\n'
            '[[throttle]]\ndomains = "*"\npause = "1m"\n'.replace("GONE_PORT", str(free_port())), Sink())
        (queue_id,) = yield self.submit(relay, "user@gone.test")
        yield until(lambda: self.attempts(relay, queue_id) == 1, "the failed attempt saved")
        self.assertTrue(any(e.get("stage") == "deferred" for e in events(relay)))
        self.assertFalse(any(e.get("stage") == "throttle-paused" for e in events(relay)))


class ThrottleThroughTwistd(unittest.TestCase):
    """The default mode: twistd, with a delivery process; metrics, log and the queue CLI from outside."""
    timeout = 180

    @defer.inlineCallbacks
    def test_a_slow_down_pauses_in_the_delivery_process_and_everything_shows_it(self):
        sink = Sink(data_replies=("451 4.7.1 slow down please",))
        sink_port = sink.start(reactor)
        self.addCleanup(sink.stop)
        metrics_port = free_port()
        relay = RelayFixture(self.mktemp(), process=None, extra=(
            f'[transports.sink]\nhost = "127.0.0.1"\nport = {sink_port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n'
            '[[throttle]]\ndomains = ["slow.test"]\npause = "5m"\nconnections = 1\n\n'
            f'[metrics]\nendpoint = "tcp:{metrics_port}:interface=127.0.0.1"\n\n'
            '[log]\nformat = "json"\nfile = "relay.json"\n'))
        yield task.deferLater(reactor, 0, relay.spawn)
        self.addCleanup(relay.kill)
        codes = []
        for recipient in ("one@slow.test", "two@slow.test"):
            code, _ = yield relay.submit("relay", "app@example.org", [recipient], MESSAGE)
            codes.append(code)
        self.assertEqual(codes, [250, 250])

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
                return response.read().decode()

        seen = {}

        @defer.inlineCallbacks
        def paused_in_metrics():
            text = yield threads.deferToThread(scrape)
            seen["metrics"] = text
            return 'mailrelay_throttle_paused{destination="slow.test"} 1.0' in text

        yield until(paused_in_metrics, "slow.test to show as paused in the metrics", timeout=60, interval=0.2)
        self.assertIn('mailrelay_throttle_waiting{destination="slow.test"} 1.0', seen["metrics"])

        def queue(*argv: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "queue", *argv, "--config",
                                   str(relay.path)], capture_output=True, text=True, timeout=60)

        result = yield threads.deferToThread(queue, "throttle")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("slow.test  PAUSED", result.stdout)
        self.assertIn("451 4.7.1 slow down please", result.stdout)
        listed = yield threads.deferToThread(queue, "list")
        self.assertIn("waiting: slow.test paused", listed.stdout)
        lines = [json.loads(line) for line in Path(relay.dir / "relay.json").read_text().splitlines()]
        paused = [e for e in lines if e.get("stage") == "throttle-paused"]
        self.assertEqual([e["destination"] for e in paused], ["slow.test"])
        self.assertEqual(len(sink.messages), 0)              # "one" was deferred, "two" never tried
        self.assertEqual(len(sink.transactions), 1)
        self.assertTrue((relay.dir / "spool" / "throttle.json").exists())
        yield threads.deferToThread(relay.kill, 15)     # SIGTERM: a clean stop (the sink answers its QUIT)
        self.assertFalse((relay.dir / "spool" / "throttle.json").exists())   # removed on a clean stop
        result = yield threads.deferToThread(queue, "throttle")
        self.assertIn("the relay is not running", result.stdout)
        # What waited was never an attempt: the state the delivery process saved says so.
        config = relay.config()
        spool = Spool(config.spool)
        attempts = {}
        for queue_id in spool.queue_ids():
            message = spool.load(queue_id)
            state = MessageState.from_dict(message.state, message.envelope.recipients)
            attempts.update({r.recipient: r.attempts for r in state.recipients})
        self.assertEqual(attempts, {"one@slow.test": 1, "two@slow.test": 0})
