"""cluster.redis.RedisLink against a real redis-server: it connects and runs the scripts; a wrong password,
a Redis that hangs (SIGSTOP) and a Redis that is killed put it down with one log line each way and
never the password; it comes back by itself; and `rediss://` (TLS, name checked against a test CA)."""
from __future__ import annotations

import signal
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailrelay.cluster.redis import RedisLink, RedisUnavailable
from mailrelay.cluster.shared import SharedRateLimiter
from mailrelay.cluster.url import RedisURL
from mailrelay.metrics import Metrics
from mailrelay.server.ratelimit import RateLimiter
from tests.support import redisserver
from tests.support.logcapture import LogLines
from tests.support.pki import TestCA
from tests.support.polling import eventually


class LinkTestCase(unittest.TestCase):
    password = "pa55-w0rd"

    def setUp(self):
        if not redisserver.available():
            raise unittest.SkipTest("redis-server is not installed")
        self.logs = LogLines(self)
        self.metrics = Metrics()

    def server(self, **kwargs) -> redisserver.RedisServer:
        server = redisserver.RedisServer(tempfile.mkdtemp(prefix="mailrelay-redis-"), **kwargs).start()
        self.addCleanup(server.stop)
        return server

    def link(self, url: str, **kwargs) -> RedisLink:
        link = RedisLink(RedisURL.parse(url), reactor, metrics=self.metrics, **kwargs)
        link.startService()
        self.addCleanup(link.stopService)
        return link


class RealRedisTests(LinkTestCase):
    @defer.inlineCallbacks
    def test_up_with_the_password_and_the_scripts_answer(self):
        server = self.server(password=self.password)
        link = self.link(server.url)
        self.assertTrue((yield eventually(lambda: link.up)))
        limiter = SharedRateLimiter(link, RateLimiter(2, 60.0, reactor))
        answers = []
        for _ in range(3):
            answers.append((yield limiter.allow("user:alice", 2)))
        self.assertEqual(answers, [True, True, False])
        self.assertEqual(link.fallbacks, 0)
        self.assertEqual(self.logs.take("reachable: limits"), [
            "cluster: Redis redis://:***@127.0.0.1:%d/0 reachable: limits and the suppression list are shared"
            % server.port])
        self.assertNotIn(self.password, self.logs.text())

    @defer.inlineCallbacks
    def test_a_wrong_password_is_an_outage_logged_once_without_the_password(self):
        server = self.server(password=self.password)
        link = self.link(f"redis://:not-{self.password}@127.0.0.1:{server.port}/0")
        self.assertTrue((yield eventually(lambda: any("unreachable" in x for x in self.logs.lines))))
        yield task.deferLater(reactor, 1.0, lambda: None)            # a retry or two meanwhile
        self.assertFalse(link.up)
        lines = self.logs.take("unreachable")
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("redis://:***@127.0.0.1", lines[0])
        self.assertNotIn(self.password, "\n".join(lines) + self.logs.text())
        self.assertEqual(self.metrics.registry.get_sample_value("mailrelay_cluster_redis_up"), 0)

    @defer.inlineCallbacks
    def test_a_hung_redis_costs_one_bounded_wait_and_the_link_comes_back(self):
        server = self.server()
        link = self.link(server.url, timeout=0.1)
        self.assertTrue((yield eventually(lambda: link.up)))
        limiter = SharedRateLimiter(link, RateLimiter(5, 60.0, reactor))
        server.process.send_signal(signal.SIGSTOP)
        self.addCleanup(lambda: server.process and server.process.send_signal(signal.SIGCONT))
        allowed = yield limiter.allow("k")                         # the bounded wait (task.Clock tests time it)
        self.assertTrue(allowed)                                   # decided locally
        self.assertFalse(link.up)
        self.assertEqual(link.fallbacks, 1)
        allowed = yield limiter.allow("k")                         # down: answered at once
        self.assertTrue(allowed)
        self.assertEqual(len(self.logs.take("no reply within 0.1s")), 1)
        server.process.send_signal(signal.SIGCONT)
        self.assertTrue((yield eventually(lambda: link.up, timeout=40)))
        self.assertEqual(len(self.logs.take("reachable again")), 1)
        self.assertEqual(self.metrics.registry.get_sample_value("mailrelay_cluster_redis_fallbacks_total",
                                                                {"what": "rate"}), 2)

    @defer.inlineCallbacks
    def test_a_lost_script_cache_is_loaded_again(self):
        server = self.server()
        link = self.link(server.url)
        self.assertTrue((yield eventually(lambda: link.up)))
        server.command("SCRIPT", "FLUSH")
        reply = yield link.evalsha("gcra", ["mailrelay:rate:x"], ["", 5, 60, 5, 1])
        self.assertEqual(reply, [1, 0])
        self.assertTrue(link.up)

    @defer.inlineCallbacks
    def test_nothing_listening_fails_at_once(self):
        server = self.server()
        server.stop()
        link = self.link(server.url)
        yield eventually(lambda: any("unreachable" in x for x in self.logs.lines))
        with self.assertRaises(RedisUnavailable):
            yield link.call("PING")


class TLSTests(LinkTestCase):
    @defer.inlineCallbacks
    def test_rediss_checks_the_certificate_against_ca_file(self):
        directory = Path(tempfile.mkdtemp(prefix="mailrelay-redis-tls-"))
        ca = TestCA()
        ca_file = ca.write(directory)
        cert, key = ca.write_pair(directory, "localhost", "redis")
        server = self.server(password=self.password, tls=(cert, key, ca_file))
        self.assertTrue(server.url.startswith("rediss://"))
        link = self.link(server.url, ca_file=ca_file)
        self.assertTrue((yield eventually(lambda: link.up)))
        self.assertEqual((yield link.call("PING")), "PONG")
        untrusted = self.link(server.url)                          # the system's CAs: refused
        yield task.deferLater(reactor, 1.0, lambda: None)
        self.assertFalse(untrusted.up)
