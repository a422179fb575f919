"""The Lua scripts of mailrelay.cluster.gcra, run by a real redis-server, with the time passed in: the
GCRA rate (the token bucket of server/ratelimit.py, counted in Redis), and the AUTH sliding log."""
from __future__ import annotations

import tempfile

from twisted.trial import unittest

from mailrelay.cluster import gcra
from mailrelay.server.ratelimit import RateLimiter
from tests.support import redisserver


class _Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def seconds(self) -> float:
        return self.now


class ScriptTestCase(unittest.TestCase):
    def setUp(self):
        if not redisserver.available():
            raise unittest.SkipTest("redis-server is not installed")
        self.redis = redisserver.RedisServer(tempfile.mkdtemp(prefix="mailrelay-redis-")).start()
        self.addCleanup(self.redis.stop)

    def run_script(self, script: str, key: str, *args) -> list[str]:
        return self.redis.command("EVAL", script, "1", key, *map(str, args)).splitlines()

    def gcra(self, key: str, now: float, limit: int, period: float = 60, burst: int | None = None):
        allowed, wait = self.run_script(gcra.GCRA, key, now, limit, period, limit if burst is None else burst, 1)
        return allowed == "1", int(wait)


class GCRATests(ScriptTestCase):
    def test_a_full_bucket_allows_the_limit_at_once_then_one_per_interval(self):
        for _ in range(5):
            self.assertEqual(self.gcra("k", 1000.0, 5), (True, 0))
        allowed, wait = self.gcra("k", 1000.0, 5)
        self.assertFalse(allowed)
        self.assertEqual(wait, 12000)                # 60 s / 5: the next one in 12 s
        self.assertFalse(self.gcra("k", 1011.9, 5)[0])
        self.assertTrue(self.gcra("k", 1012.0, 5)[0])
        self.assertFalse(self.gcra("k", 1012.0, 5)[0])

    def test_the_same_answers_as_the_local_token_bucket(self):
        clock = _Clock()
        local = RateLimiter(3, 60.0, clock)
        times = [1000, 1000, 1000, 1000, 1010, 1020, 1020, 1040, 1041, 1100, 1100, 1100, 1100, 1100]
        for t in times:
            clock.now = float(t)
            self.assertEqual(self.gcra("same", float(t), 3)[0], local.allow("same"), f"at {t}")

    def test_a_change_of_rate_keeps_the_debt_in_events_as_the_local_bucket_does(self):
        clock = _Clock()
        local = RateLimiter(10, 60.0, clock)
        answers = []
        for rate in (10, 2, 2, 2):
            answers.append((self.gcra("r", 1000.0, rate)[0], local.allow("r", rate)))
        self.assertEqual(answers, [(True, True), (True, True), (True, True), (False, False)])

    def test_burst_one_is_one_every_interval_no_burst(self):
        self.assertTrue(self.gcra("t", 1000.0, 120, burst=1)[0])
        self.assertFalse(self.gcra("t", 1000.0, 120, burst=1)[0])
        self.assertTrue(self.gcra("t", 1000.5, 120, burst=1)[0])

    def test_the_key_expires_when_the_bucket_is_full_again(self):
        self.gcra("ttl", 1000.0, 5)
        ttl = int(self.redis.command("PTTL", "ttl"))
        self.assertTrue(0 < ttl <= 12000, ttl)
        self.assertFalse(self.gcra("refused-writes-nothing", 1000.0, 1, burst=0)[0])
        self.assertEqual(self.redis.command("EXISTS", "refused-writes-nothing"), "0")

    def test_an_empty_now_reads_the_servers_clock(self):
        allowed, _ = self.gcra("server-time", "", 5)
        self.assertTrue(allowed)
        tat = float(self.redis.command("GET", "server-time").split()[0])
        server = int(self.redis.command("TIME").splitlines()[0])
        self.assertLess(abs(tat - 12 - server), 5)


class SlidingLogTests(ScriptTestCase):
    def record(self, now: float, member: str, limit: int = 3, window: float = 60) -> int:
        return int(self.run_script(gcra.RECORD, "ip", now, window, limit, member)[0])

    def test_attempts_are_counted_over_the_last_window_like_the_local_one(self):
        from mailrelay.server.factory import FailureWindow

        clock = _Clock()
        local = FailureWindow(3, clock)
        for i, t in enumerate([1000, 1001, 1002, 1003, 1030, 1061, 1062, 1200]):
            clock.now = float(t)
            self.assertEqual(self.record(float(t), f"m{i}"), local.record("ip"), f"at {t}")
        count = int(self.run_script(gcra.COUNT, "ip", 1300.0, 60)[0])
        clock.now = 1300.0
        self.assertEqual(count, local.count("ip"))

    def test_at_most_limit_plus_one_attempts_are_kept_and_the_key_expires(self):
        for i in range(10):
            count = self.record(1000.0 + i * 0.1, f"m{i}")
        self.assertEqual(count, 4)
        self.assertEqual(self.redis.command("ZCARD", "ip"), "4")
        self.assertTrue(0 < int(self.redis.command("PTTL", "ip")) <= 60000)

    def test_a_refund_takes_back_that_attempt_or_else_the_latest(self):
        self.record(1000.0, "a")
        self.record(1001.0, "b")
        self.assertEqual(self.run_script(gcra.REFUND, "ip", "a"), ["1"])
        self.assertEqual(self.redis.command("ZRANGE", "ip", "0", "-1"), "b")
        self.record(1002.0, "c")
        self.assertEqual(self.run_script(gcra.REFUND, "ip", "gone"), ["1"])
        self.assertEqual(self.redis.command("ZRANGE", "ip", "0", "-1"), "b")


class LeaseTests(ScriptTestCase):
    def acquire(self, now: float, member: str, limit: int = 2, lease: float = 30) -> bool:
        return self.run_script(gcra.ACQUIRE, "conns", now, limit, lease, member) == ["1"]

    def test_at_most_limit_leases_and_a_released_one_is_free_again(self):
        self.assertTrue(self.acquire(1000.0, "a"))
        self.assertTrue(self.acquire(1000.0, "b"))
        self.assertFalse(self.acquire(1000.0, "c"))
        self.assertTrue(self.acquire(1001.0, "a"))                 # renewing one's own lease
        self.assertEqual(self.run_script(gcra.RELEASE, "conns", "b"), ["1"])
        self.assertTrue(self.acquire(1002.0, "c"))

    def test_a_lease_not_renewed_lapses_and_the_key_expires(self):
        self.assertTrue(self.acquire(1000.0, "a", limit=1))
        self.assertFalse(self.acquire(1029.0, "b", limit=1))
        self.assertTrue(self.acquire(1030.0, "b", limit=1))        # a's holder died: its lease lapsed
        self.assertTrue(0 < int(self.redis.command("PTTL", "conns")) <= 30000)
