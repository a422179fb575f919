"""`[cluster] redis` end to end: two relays naming one real redis-server share one messages_per_minute,
one AUTH-failure budget and the suppression list; with Redis killed mid-run mail still flows on each
relay's own counters (logged once, shown in the metrics), and once Redis is back they share again.
In-process relays (delivery inline), and a pair of real twistd processes with a password'd Redis."""
from __future__ import annotations

import base64
import http.client
import json
import smtplib
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from mailrelay.server import apikeys
from tests.support import polling, redisserver
from tests.support.logcapture import LogLines
from tests.support.relay import RelayFixture, free_port
from tests.support.sink import Sink

# A look may cost an SMTP conversation with a relay: one every 0.1 s, for at most 20 s unless told.
eventually = partial(polling.eventually, timeout=20.0, interval=0.1)

MESSAGE = b"From: app@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\nbody\r\n"
RATE_LIMITED = (450, "4.7.1 Too many messages from this client, try again later")


def cluster_config(sink_port: int, url: str, rate: int = 5, auth_failures: int = 3,
                   process: str = "inline") -> str:
    return (f'[transports.sink]\nhost = "127.0.0.1"\nport = {sink_port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n'
            f'[delivery]\nprocess = "{process}"\n\n'
            f'[limits]\nmessages_per_minute = {rate}\nauth_failures_per_minute = {auth_failures}\n\n'
            '[suppression]\nenabled = true\nduration = "7d"\n\n'
            f'[cluster]\nredis = "{url}"\ntimeout = "0.1s"\n')


def send_sync(relay: RelayFixture) -> tuple[int, str]:
    """One message over port 25 from 127.0.0.1 (the network rule): the MAIL refusal, or the final reply."""
    try:
        code, text = relay.submit_sync("relay", "app@example.org", ["bob@example.net"], MESSAGE)
    except smtplib.SMTPSenderRefused as e:
        code, text = e.smtp_code, e.smtp_error
    return code, text.decode("ascii", "replace") if isinstance(text, bytes) else text


def bad_login_sync(relay: RelayFixture) -> tuple[int, str]:
    """One AUTH PLAIN with a wrong password over submission (STARTTLS first): the reply."""
    with smtplib.SMTP("127.0.0.1", relay.ports["submission"], timeout=30) as smtp:
        smtp.ehlo("client.test")
        smtp.starttls(context=relay.tls_context())
        smtp.ehlo("client.test")
        blob = base64.b64encode(b"\0app1\0wrong password").decode("ascii")
        try:
            code, text = smtp.docmd("AUTH", "PLAIN " + blob)
        except smtplib.SMTPServerDisconnected:
            return 0, "disconnected"
        return code, text.decode("ascii", "replace")


def rcpt_sync(relay: RelayFixture, recipient: str) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", relay.ports["relay"], timeout=30) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("app@example.org")
        code, text = smtp.rcpt(recipient)
        return code, text.decode("ascii", "replace")


def post_sync(port: int, key: str) -> tuple[int, dict]:
    """One message through the HTTP injection API: (status, JSON body)."""
    body = json.dumps({"from": "app@example.org", "to": ["bob@example.net"],
                       "message": MESSAGE.decode("ascii")}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/v1/messages", body=body, headers={"Authorization": f"Bearer {key}",
                                                                        "Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


class TwoRelaysTestCase(unittest.TestCase):
    rate = 5
    http_on_a = False

    @defer.inlineCallbacks
    def setUp(self):
        if not redisserver.available():
            raise unittest.SkipTest("redis-server is not installed")
        self.redis = redisserver.RedisServer(tempfile.mkdtemp(prefix="mailrelay-redis-")).start()
        self.addCleanup(self.redis.stop)
        self.sink = Sink()
        sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        self.logs = LogLines(self)
        self.relays = []
        for name in ("a", "b"):
            extra = cluster_config(sink_port, self.redis.url, self.rate)
            if name == "a" and self.http_on_a:
                self.http_port = free_port()
                extra += (f'\n[[listen]]\nkind = "http"\nendpoint = "tcp:{self.http_port}:interface=127.0.0.1"\n\n'
                          '[http]\napi_keys_file = "apikeys"\n')
            relay = RelayFixture(self.mktemp() + name, extra=extra)
            if name == "a" and self.http_on_a:
                self.api_key = apikeys.set_key(relay.dir / "apikeys", "app1")
            relay.start(reactor)
            self.addCleanup(relay.stop)
            self.relays.append(relay)
        self.a, self.b = self.relays
        up = yield eventually(lambda: all(r.service.cluster.up for r in self.relays))
        self.assertTrue(up, "the relays did not reach Redis")

    def send(self, relay):
        return threads.deferToThread(send_sync, relay)

    def metric(self, relay, name: str, labels: dict | None = None):
        return relay.service.metrics.registry.get_sample_value(name, labels or {})


class SharedLimitTests(TwoRelaysTestCase):
    @defer.inlineCallbacks
    def test_one_messages_per_minute_for_both_relays(self):
        for relay in (self.a, self.a, self.a, self.b, self.b):
            code, _ = yield self.send(relay)
            self.assertEqual(code, 250)
        refused = yield self.send(self.b)
        self.assertEqual(refused, RATE_LIMITED)            # the very reply of the local limiter
        refused = yield self.send(self.a)
        self.assertEqual(refused, RATE_LIMITED)
        self.assertEqual(self.metric(self.a, "mailrelay_cluster_redis_up"), 1)
        self.assertIsNone(self.metric(self.a, "mailrelay_cluster_redis_fallbacks_total", {"what": "rate"}))
        self.assertNotEqual(self.redis.command("PTTL", "mailrelay:rate:permit[0]"), "-1")   # it expires

    @defer.inlineCallbacks
    def test_one_auth_failure_budget_for_both_relays(self):
        for relay in (self.a, self.a, self.b):
            code, _ = yield threads.deferToThread(bad_login_sync, relay)
            self.assertEqual(code, 535)
        code, text = yield threads.deferToThread(bad_login_sync, self.a)
        self.assertEqual(code, 421)
        self.assertIn("4.7.0", text)
        self.assertTrue(self.logs.take("refused unchecked: 4 attempts"))

    @defer.inlineCallbacks
    def test_a_suppression_on_one_relay_is_refused_at_rcpt_on_the_other(self):
        self.a.service.suppression.journal.add("gone@example.net", reason="left the company")
        reply = yield eventually(lambda: threads.deferToThread(rcpt_sync, self.b, "gone@example.net")
                                 .addCallback(lambda r: r if r[0] == 550 else None))
        self.assertEqual(reply[0], 550)
        self.assertIn("5.1.1 <gone@example.net>: suppressed since", reply[1])
        self.assertIn("added by an operator: left the company", reply[1])
        self.a.service.suppression.journal.remove("gone@example.net")
        reply = yield eventually(lambda: threads.deferToThread(rcpt_sync, self.b, "gone@example.net")
                                 .addCallback(lambda r: r if r[0] == 250 else None))
        self.assertEqual(reply[0], 250)


class HTTPTests(TwoRelaysTestCase):
    http_on_a = True

    @defer.inlineCallbacks
    def test_the_http_api_and_smtp_auth_share_one_budget_per_identity(self):
        for _ in range(3):
            status, body = yield threads.deferToThread(post_sync, self.http_port, self.api_key)
            self.assertEqual(status, 202, body)
        for _ in range(2):
            code, _ = yield threads.deferToThread(self.b.submit_sync, "submission", "app@example.org",
                                                  ["bob@example.net"], MESSAGE, user="app1")
            self.assertEqual(code, 250)
        status, body = yield threads.deferToThread(post_sync, self.http_port, self.api_key)
        self.assertEqual(status, 429, body)
        self.assertIn("450 4.7.1", body["smtp"])


class SuppressionCommandTests(TwoRelaysTestCase):
    def cli(self, relay, *words) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).with_name("mailrelay")), "suppression", *words,
                               "--config", str(relay.path)], capture_output=True, text=True, timeout=60)

    @defer.inlineCallbacks
    def test_the_command_adds_lists_and_removes_in_redis(self):
        added = yield threads.deferToThread(self.cli, self.a, "add", "carol@example.net", "--reason", "asked")
        self.assertEqual(added.returncode, 0, added.stderr)
        reply = yield threads.deferToThread(rcpt_sync, self.b, "carol@example.net")
        self.assertEqual(reply[0], 550)                    # at once: the command wrote Redis itself
        listed = yield threads.deferToThread(self.cli, self.b, "list")
        self.assertIn("carol@example.net", listed.stdout)
        self.assertIn("1 address suppressed", listed.stdout)
        removed = yield threads.deferToThread(self.cli, self.b, "remove", "carol@example.net")
        self.assertEqual(removed.returncode, 0, removed.stderr)
        for relay in (self.a, self.b):                    # A's own journal entry is lifted by the removal
            reply = yield threads.deferToThread(rcpt_sync, relay, "carol@example.net")
            self.assertEqual(reply[0], 250)
        listed = yield threads.deferToThread(self.cli, self.a, "list")
        self.assertIn("0 addresses suppressed", listed.stdout)
        self.assertNotIn("redis://", listed.stdout + listed.stderr)


class RedisGoneTests(TwoRelaysTestCase):
    rate = 3

    @defer.inlineCallbacks
    def test_killed_mail_flows_on_local_counters_and_shared_again_when_back(self):
        code, _ = yield self.send(self.a)
        self.assertEqual(code, 250)
        self.redis.kill()
        for _ in range(2):
            code, _ = yield self.send(self.a)
            self.assertEqual(code, 250)               # the bounded wait, then A's own bucket (3 a minute)
        refused = yield self.send(self.a)
        self.assertEqual(refused, RATE_LIMITED)       # A's share: its own 3 messages
        code, _ = yield self.send(self.b)
        self.assertEqual(code, 250)                   # B counts on its own meanwhile
        self.assertEqual(len(self.logs.take("unreachable")), 2, "once per relay")
        self.assertEqual(self.metric(self.a, "mailrelay_cluster_redis_up"), 0)
        self.assertGreaterEqual(self.metric(self.a, "mailrelay_cluster_redis_fallbacks_total", {"what": "rate"}), 3)

        self.redis.start()
        back = yield eventually(lambda: self.a.service.cluster.up and self.b.service.cluster.up, timeout=40)
        self.assertTrue(back)
        self.assertEqual(len(self.logs.take("reachable again")), 2)
        for _ in range(3):
            code, _ = yield self.send(self.b)
            self.assertEqual(code, 250)               # a fresh Redis: a fresh shared budget
        refused = yield self.send(self.a)
        self.assertEqual(refused, RATE_LIMITED)       # shared again: B's three count for A too
        self.assertEqual(self.metric(self.a, "mailrelay_cluster_redis_up"), 1)


    @defer.inlineCallbacks
    def test_entries_noted_while_redis_was_away_are_shared_once_it_is_back(self):
        self.redis.kill()
        yield eventually(lambda: not self.a.service.cluster.up)
        self.a.service.suppression.journal.add("away@example.net", reason="noted while Redis was down")
        yield task.deferLater(reactor, 1.5, lambda: None)        # A's watcher read it; Redis was not there
        reply = yield threads.deferToThread(rcpt_sync, self.b, "away@example.net")
        self.assertEqual(reply[0], 250)                            # B on its own journal: not suppressed
        reply = yield threads.deferToThread(rcpt_sync, self.a, "away@example.net")
        self.assertEqual(reply[0], 550)                            # A's journal is in force on A
        self.redis.start()                                         # back, and empty
        reply = yield eventually(lambda: threads.deferToThread(rcpt_sync, self.b, "away@example.net")
                                 .addCallback(lambda r: r if r[0] == 550 else None), timeout=40)
        self.assertEqual(reply[0], 550)
        self.assertIn("noted while Redis was down", reply[1])


class TwistdPairTests(unittest.TestCase):
    """Two real twistd processes (delivery in its separate process) and a Redis with a password."""

    @defer.inlineCallbacks
    def test_two_twistd_relays_share_one_limit_and_never_log_the_password(self):
        if not redisserver.available():
            raise unittest.SkipTest("redis-server is not installed")
        redis = redisserver.RedisServer(tempfile.mkdtemp(prefix="mailrelay-redis-"), password="s3cret-pw").start()
        self.addCleanup(redis.stop)
        sink = Sink()
        sink_port = sink.start(reactor)
        self.addCleanup(sink.stop)
        relays = []
        for name in ("a", "b"):
            relay = RelayFixture(self.mktemp() + name, process=None,
                                 extra=cluster_config(sink_port, redis.url, 5, process="separate"))
            yield threads.deferToThread(relay.spawn)
            self.addCleanup(relay.kill)
            relays.append(relay)
        a, b = relays
        ready = yield eventually(lambda: all("reachable: limits" in (r.dir / "twistd.log").read_text()
                                             for r in relays), timeout=30)
        self.assertTrue(ready)
        for relay in (a, b, a, b, a):
            code, _ = yield threads.deferToThread(send_sync, relay)
            self.assertEqual(code, 250)
        refused = yield threads.deferToThread(send_sync, b)
        self.assertEqual(refused, RATE_LIMITED)
        for relay in relays:
            log = (relay.dir / "twistd.log").read_text()
            self.assertIn("redis://:***@127.0.0.1", log)
            self.assertNotIn("s3cret-pw", log)
