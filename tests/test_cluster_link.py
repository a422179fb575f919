"""The fallback logic of mailrelay.cluster over task.Clock: a Redis that does not answer costs one
bounded wait, the local counters decide, the change is logged once, the metrics show it, and the link
reconnects in the background with backoff.  Plus the URL's password never being shown, and the
interfaces the local and shared counters provide."""
from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailrelay.cluster import redis as link_module
from mailrelay.cluster.redis import RedisLink, RedisUnavailable
from mailrelay.cluster.shared import SharedFailureWindow, SharedRateLimiter, SharedSuppression
from mailrelay.cluster.url import RedisURL, masked
from mailrelay.interfaces import IAttemptWindow, IRateCounter, ISuppressionCheck
from mailrelay.metrics import Metrics
from mailrelay.server.factory import FailureWindow
from mailrelay.server.ratelimit import RateLimiter
from mailrelay.spool.suppression import SuppressionList
from tests.support.fakes import SilentRedisConnection
from tests.support.logcapture import LogLines


class RefusingEndpoint:
    def __init__(self):
        self.attempts = 0

    def connect(self, factory):
        self.attempts += 1
        return defer.fail(ConnectionRefusedError("connection refused"))


class FallbackTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.metrics = Metrics()
        self.endpoint = RefusingEndpoint()
        self.link = RedisLink(RedisURL.parse("redis://:s3cret@127.0.0.1:6390/0"), self.clock, timeout=0.1,
                              metrics=self.metrics, endpoint=self.endpoint)
        self.logs = LogLines(self)
        self.link.running = True          # as started, without connecting: the test hands it a connection
        self.conn = SilentRedisConnection()
        self.link._conn, self.link.up = self.conn, True
        self.link._announced = True

    def metric(self, name: str, labels: dict | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {})

    def test_a_silent_redis_costs_one_bounded_wait_then_the_local_bucket_decides(self):
        limiter = SharedRateLimiter(self.link, RateLimiter(2, 60.0, self.clock))
        results = []
        limiter.allow("user:alice", 2).addCallback(results.append)
        self.assertEqual(results, [])
        self.assertEqual(self.conn.sent[0][0], "EVALSHA")
        self.clock.advance(0.1)
        self.assertEqual(results, [True])                   # decided locally after 100 ms
        self.assertFalse(self.link.up)
        self.assertTrue(self.conn.aborted)
        # Down now: answered at once, without waiting, from the same local bucket.
        self.assertEqual(limiter.allow("user:alice", 2), True)
        self.assertEqual(limiter.allow("user:alice", 2), False)
        self.assertEqual(self.metric("mailrelay_cluster_redis_up"), 0)
        self.assertEqual(self.metric("mailrelay_cluster_redis_fallbacks_total", {"what": "rate"}), 3)

    def test_the_fallback_is_logged_once_and_the_password_never(self):
        limiter = SharedRateLimiter(self.link, RateLimiter(5, 60.0, self.clock))
        limiter.allow("k")
        self.clock.advance(0.1)
        for _ in range(3):
            limiter.allow("k")
        for _ in range(5):
            self.clock.advance(30)                         # reconnect attempts, refused
        self.assertGreater(self.endpoint.attempts, 1)
        lines = self.logs.take("unreachable")
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("redis://:***@127.0.0.1:6390/0", lines[0])
        self.assertIn("no reply within 0.1s", lines[0])
        self.assertNotIn("s3cret", self.logs.text())

    def test_reconnects_back_off_and_double(self):
        self.link._down("test")
        delays = []
        for _ in range(6):
            call = self.link._retry
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        for before, after in zip(delays, delays[1:]):
            self.assertGreater(after, before * 1.3)
        self.assertEqual(self.endpoint.attempts, 6)
        self.link._attempt = 40
        self.link._retry.cancel()
        self.link._retry = None
        self.link._schedule()
        self.assertLessEqual(self.link._retry.getTime() - self.clock.seconds(), link_module.RECONNECT_MAX * 1.2)

    def test_auth_attempts_fall_back_to_the_local_window(self):
        window = SharedFailureWindow(self.link, FailureWindow(2, self.clock))
        counted = []
        window.record("192.0.2.1").addCallback(counted.append)
        self.clock.advance(0.1)
        self.assertEqual(counted, [1])
        self.assertEqual(window.record("192.0.2.1"), 2)
        self.assertTrue(window.exhausted("192.0.2.1"))
        window.refund("192.0.2.1")
        self.assertFalse(window.exhausted("192.0.2.1"))
        self.assertEqual(self.metric("mailrelay_cluster_redis_fallbacks_total", {"what": "auth"}), 2)

    def test_the_suppression_check_falls_back_to_the_journal(self):
        journal = SuppressionList(self.mktemp(), 86400.0, self.clock)
        journal.directory.mkdir()
        journal.add("bob@example.net", reason="test")
        journal.refresh()
        check = SharedSuppression(self.link, journal)
        replies = []
        check.refusal("bob@example.net").addCallback(replies.append)
        self.clock.advance(0.1)
        self.assertEqual(replies[0].status, "5.1.1")
        self.assertIsNone(check.refusal("alice@example.net"))

    def test_a_call_while_down_fails_at_once(self):
        self.link._down("test")
        failures = []
        self.link.call("PING").addErrback(failures.append)
        self.assertTrue(failures[0].check(RedisUnavailable))


class HangingEndpoint:
    """A connect that never completes on its own: the Deferred handed out, to see it cancelled."""

    def __init__(self):
        self.attempts: list[defer.Deferred] = []

    def connect(self, factory):
        d = defer.Deferred()
        self.attempts.append(d)
        return d


class StopTests(unittest.TestCase):
    def test_a_connect_under_way_is_dropped_at_stop_and_never_reported(self):
        clock = task.Clock()
        endpoint = HangingEndpoint()
        logs = LogLines(self)
        link = RedisLink(RedisURL.parse("redis://127.0.0.1:6390/0"), clock, endpoint=endpoint)
        link.startService()
        self.assertEqual(len(endpoint.attempts), 1)
        link.stopService()
        self.assertTrue(endpoint.attempts[0].called)                  # cancelled
        self.assertFalse(logs.take("unreachable"))                    # a stopped link says nothing
        clock.advance(60)
        self.assertEqual(len(endpoint.attempts), 1)                   # and tries nothing more
        self.assertEqual(clock.getDelayedCalls(), [])


class InterfaceTests(unittest.TestCase):
    def test_local_and_shared_counters_provide_their_interfaces(self):
        clock = task.Clock()
        link = RedisLink(RedisURL.parse("redis://127.0.0.1"), clock)
        local_rate, local_window = RateLimiter(3, 60.0, clock), FailureWindow(3, clock)
        journal = SuppressionList(self.mktemp(), 60.0, clock)
        verifyObject(IRateCounter, local_rate)
        verifyObject(IRateCounter, SharedRateLimiter(link, local_rate))
        verifyObject(IAttemptWindow, local_window)
        verifyObject(IAttemptWindow, SharedFailureWindow(link, local_window))
        verifyObject(ISuppressionCheck, journal)
        verifyObject(ISuppressionCheck, SharedSuppression(link, journal))


class URLTests(unittest.TestCase):
    def test_parsed_and_shown_without_the_password(self):
        url = RedisURL.parse("rediss://mailrelay:p%40ss@redis.example:6380/3")
        self.assertEqual((url.host, url.port, url.db, url.username, url.password, url.tls),
                         ("redis.example", 6380, 3, "mailrelay", "p@ss", True))
        self.assertEqual(str(url), "rediss://mailrelay:***@redis.example:6380/3")
        self.assertEqual(str(RedisURL.parse("redis://127.0.0.1")), "redis://127.0.0.1:6379/0")
        self.assertEqual(masked("redis://:hunter2@h:1/0"), "redis://:***@h:1/0")

    def test_bad_urls_are_refused_with_the_password_masked(self):
        for bad in ("http://:pw@h/0", "redis://:pw@/0", "redis://:pw@h/db", "redis://:pw@h:99999/0"):
            with self.assertRaises(ValueError) as caught:
                RedisURL.parse(bad)
            self.assertNotIn("pw", str(caught.exception).replace("***", ""))
