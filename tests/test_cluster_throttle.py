"""cluster.throttle.SharedThrottle: `[[throttle]]` rates, connection caps and pauses shared by the relays
naming one Redis.  Over task.Clock with a link whose answers the test gives (the booking in flight,
the answers adopted, the fallback and the leases put back); against a real redis-server (two throttles
hold one rate, one connection cap, one pause and its doubling; a dead relay's leases lapse; Redis
stopped mid-run and back); and two relays delivering to one sink under one rate."""
from __future__ import annotations

import tempfile
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailrelay.cluster import gcra
from mailrelay.cluster import throttle as shared
from mailrelay.cluster.redis import RedisLink, RedisUnavailable
from mailrelay.cluster.throttle import SharedThrottle
from mailrelay.cluster.url import RedisURL
from mailrelay.config import Throttle
from mailrelay.interfaces import IThrottle
from mailrelay.metrics import Metrics
from tests.support import redisserver
from tests.support.logcapture import LogLines

RATE = Throttle(domains=("example.net",), messages_per_minute=60, connections=0, pause=10.0)   # 1 s apart
CAPPED = Throttle(domains=("example.net",), messages_per_minute=0, connections=2, pause=10.0)


class ScriptError(Exception):
    """Stands for txredisapi's ResponseError: Redis refused the command."""


class FakeLink:
    """What SharedThrottle uses of a RedisLink; each evalsha waits for the test's answer."""

    def __init__(self, clock: task.Clock, timeout: float = 0.1):
        self.clock, self.timeout = clock, timeout
        self.up = True
        self.on_up: list = []
        self.calls: list[tuple[str, list, list, defer.Deferred]] = []
        self.fallbacks: list[str] = []
        self._members = 0

    def key(self, *parts: str) -> str:
        return "test:" + ":".join(parts)

    def unique(self) -> str:
        self._members += 1
        return f"m{self._members}"

    def seconds(self) -> float:
        return self.clock.seconds()

    def fell_back(self, what: str) -> None:
        self.fallbacks.append(what)

    def evalsha(self, script: str, keys: list, args: list) -> defer.Deferred:
        d = defer.Deferred()
        self.calls.append((script, keys, args, d))
        return d

    def answer(self, value, index: int = -1) -> tuple:
        call = self.calls.pop(index)
        call[3].callback(value)
        return call

    def come_up(self) -> None:
        self.up = True
        for hook in self.on_up:
            hook()


class UnitTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1000.0)
        self.link = FakeLink(self.clock)
        self.woken: list[float] = []
        self.throttle = SharedThrottle(self.link, on_ready=lambda: self.woken.append(self.clock.seconds()))

    def now(self) -> float:
        return self.clock.seconds()

    def test_provides_ithrottle(self):
        self.assertTrue(verifyObject(IThrottle, self.throttle))

    def test_a_start_waits_for_its_booking_then_goes_at_the_booked_time(self):
        now = self.now()
        self.assertEqual(self.throttle.ready_at("example.net", RATE, now), now + 0.1)   # in flight: bounded
        self.assertEqual(self.throttle.ready_at("example.net", RATE, now), now + 0.1)   # still one booking
        self.assertEqual(len(self.link.calls), 1)
        script, keys, args, _ = self.link.calls[0]
        self.assertEqual(script, "throttle_reserve")
        self.assertEqual(keys, ["test:throttle:rate:example.net", "test:throttle:conn:example.net",
                                "test:throttle:pause:example.net"])
        self.assertEqual(args[:4], ["", 1.0, 0, shared.LEASE])        # the server's clock, the interval
        self.clock.advance(0.002)
        self.link.answer([2, 400000, 0, -1, 0, ""])                      # another relay holds the slot before
        self.assertEqual(self.woken, [self.now()])                    # the scheduler looks again at once
        granted = self.now() + 0.4
        self.assertAlmostEqual(self.throttle.ready_at("example.net", RATE, self.now()), granted)
        self.clock.advance(0.4)
        self.assertLessEqual(self.throttle.ready_at("example.net", RATE, self.now()), self.now())
        self.throttle.start("example.net", RATE, self.now())
        # The next start needs a booking of its own (and this relay's own rate holds it a second anyway).
        self.assertEqual(self.throttle.ready_at("example.net", RATE, self.now()), self.now() + 1.0)
        self.assertEqual(self.link.calls, [])
        self.clock.advance(1.0)
        self.assertEqual(self.throttle.ready_at("example.net", RATE, self.now()), self.now() + 0.1)
        self.assertEqual(len(self.link.calls), 1)
        self.assertEqual(self.link.fallbacks, [])

    def test_a_full_cap_asks_again_later_and_a_lease_is_released_on_finish(self):
        now = self.now()
        self.throttle.ready_at("example.net", CAPPED, now)
        self.link.answer([1, 0, 0, -1, 0, ""])                        # the cluster's two are in use
        self.assertEqual(self.throttle.ready_at("example.net", CAPPED, now), now + shared.FULL_RETRY)
        self.assertEqual(self.link.calls, [])
        self.clock.advance(shared.FULL_RETRY)
        self.throttle.ready_at("example.net", CAPPED, self.now())
        _, _, args, _ = self.link.calls[-1]
        member = args[4]
        self.link.answer([2, 0, 0, -1, 0, ""])
        self.assertEqual(self.throttle.ready_at("example.net", CAPPED, self.now()), self.now())
        self.throttle.start("example.net", CAPPED, self.now())
        self.throttle.renew()
        self.assertEqual(self.link.calls[-1][:3], ("throttle_renew", ["test:throttle:conn:example.net"],
                                                   ["", shared.LEASE, member]))
        self.link.answer(1)
        self.throttle.finish("example.net")
        self.assertEqual(self.link.calls[-1][:3], ("release", ["test:throttle:conn:example.net"], [member]))
        self.link.answer(1)
        self.throttle.renew()
        self.assertEqual(self.link.calls, [])                         # nothing open: nothing to renew

    def test_a_pause_another_relay_began_holds_this_one_back(self):
        now = self.now()
        self.throttle.ready_at("example.net", RATE, now)
        self.link.answer([0, 0, 7000, 3000, 1, "421 4.7.0 slow down"])   # began 3 s ago, 7 s left
        self.assertAlmostEqual(self.throttle.ready_at("example.net", RATE, now), now + 7.0)
        [status] = self.throttle.status(now)
        self.assertAlmostEqual(status.paused_until, now + 7.0)
        self.assertEqual(status.reason, "421 4.7.0 slow down")
        self.assertEqual(status.pauses_in_a_row, 1)
        # A reply to a delivery this relay began before that pause belongs to it: no new pause.
        until, began = self.throttle.slowed("example.net", RATE, now - 5.0, now, "421 busy")
        self.assertEqual((round(until - now, 3), began), (7.0, False))
        self.assertEqual(self.link.calls, [])
        # One that began after it: a new pause, counted in Redis (which doubles it for the cluster).
        self.clock.advance(8.0)
        until, began = self.throttle.slowed("example.net", RATE, self.now() - 0.5, self.now(), "421 busy")
        self.assertTrue(began)
        script, keys, args, _ = self.link.calls[-1]
        self.assertEqual((script, keys), ("throttle_pause", ["test:throttle:pause:example.net"]))
        self.assertEqual(args[1:4], [0.5, 10.0, 3600.0])
        self.assertEqual(args[5], 2)                                  # this relay's own row: the second
        self.link.answer([40000, 0, 3, 1])                            # Redis counted a third in a row
        self.assertAlmostEqual(self.throttle.ready_at("example.net", RATE, self.now()), self.now() + 40.0)
        # An accepted delivery after it ends the row, here and in Redis.
        self.clock.advance(41.0)
        self.throttle.succeeded("example.net", self.now() - 0.1)
        self.assertEqual(self.link.calls[-1][:2], ("throttle_succeed", ["test:throttle:pause:example.net"]))

    def test_a_cluster_pause_longer_than_this_relays_own_holds_without_asking_again(self):
        now = self.now()
        self.link.up = False
        self.throttle.slowed("example.net", RATE, now - 1.0, now, "421 own")        # 10 s, here only
        self.link.up = True
        self.clock.advance(10.5)
        # Redis: a pause another relay began earlier (20 s before ours), 30 s left.
        self.throttle.ready_at("example.net", RATE, self.now())
        self.link.answer([0, 0, 30000, 30500, 2, "421 theirs"])
        self.assertAlmostEqual(self.throttle.ready_at("example.net", RATE, self.now()), self.now() + 30.0)
        self.assertEqual(self.link.calls, [])
        self.clock.advance(30.0)
        self.throttle.ready_at("example.net", RATE, self.now())
        self.assertEqual([c[0] for c in self.link.calls], ["throttle_reserve"])

    def test_redis_away_the_local_throttle_decides_and_counts_each_start(self):
        self.link.up = False
        now = self.now()
        self.assertEqual(self.throttle.ready_at("example.net", CAPPED, now), now)
        self.throttle.start("example.net", CAPPED, now)
        self.throttle.start("example.net", CAPPED, now)
        self.assertIsNone(self.throttle.ready_at("example.net", CAPPED, now))     # the local cap: 2
        self.assertEqual(self.link.calls, [])
        self.assertEqual(self.link.fallbacks, ["throttle", "throttle"])
        self.link.come_up()                   # the connections opened meanwhile are counted in Redis now
        script, keys, args, _ = self.link.calls[-1]
        self.assertEqual((script, keys, args), ("throttle_renew", ["test:throttle:conn:example.net"],
                                                ["", shared.LEASE, "m1", "m2"]))

    def test_an_outage_during_a_booking_wakes_the_scheduler_and_falls_back(self):
        now = self.now()
        self.throttle.ready_at("example.net", RATE, now)
        self.link.up = False                                          # what RedisLink does before failing
        self.link.calls.pop()[3].errback(RedisUnavailable("no reply within 0.1s"))
        self.assertEqual(len(self.woken), 1)
        self.assertEqual(self.throttle.ready_at("example.net", RATE, now), now)
        self.throttle.start("example.net", RATE, now)
        self.assertEqual(self.link.fallbacks, ["throttle"])

    def test_a_refused_script_decides_locally_for_a_while_not_in_a_loop(self):
        logs = LogLines(self)
        now = self.now()
        self.throttle.ready_at("example.net", RATE, now)
        self.link.calls.pop()[3].errback(ScriptError("ERR something"))
        self.assertEqual(len(self.flushLoggedErrors(ScriptError)), 1)
        self.assertTrue(logs.take("refused the throttle booking"))
        self.assertEqual(self.throttle.ready_at("example.net", RATE, now), now)
        self.assertEqual(self.link.calls, [])
        self.clock.advance(shared.REFUSED_PAUSE + 1.0)
        self.throttle.ready_at("example.net", RATE, self.now())
        self.assertEqual(len(self.link.calls), 1)                     # Redis asked again

    def test_renewal_runs_on_the_link_clock_while_started(self):
        self.link.up = False
        self.throttle.start("example.net", CAPPED, self.now())
        self.link.up = True
        self.throttle.startService()
        self.addCleanup(self.throttle.stopService)
        self.clock.advance(shared.LEASE / 3)
        self.assertEqual([c[0] for c in self.link.calls], ["throttle_renew"])

    def test_what_is_over_is_forgotten_and_an_unused_booking_goes_back(self):
        now = self.now()
        self.throttle.ready_at("example.net", RATE, now)
        self.link.answer([2, 0, 0, -1, 0, ""])
        self.throttle.start("example.net", RATE, now)
        self.assertEqual(self.throttle._views, {})                     # a rate alone: nothing left to hold
        self.throttle.ready_at("example.org", CAPPED, now)
        member = self.link.calls[-1][2][4]
        self.link.answer([2, 0, 0, -1, 0, ""])                        # booked, never started
        self.clock.advance(shared.LEASE + 1.0)
        self.throttle.renew()
        self.assertEqual(self.link.calls[-1][:3], ("release", ["test:throttle:conn:example.org"], [member]))
        self.assertEqual(self.throttle._views, {})

    def test_rules_with_nothing_to_share_never_ask(self):
        plain = Throttle(domains=("example.net",), messages_per_minute=0, connections=0, pause=0.0)
        self.assertEqual(self.throttle.ready_at("example.net", plain, self.now()), self.now())
        self.assertEqual(self.link.calls, [])


@defer.inlineCallbacks
def eventually(check, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        yield task.deferLater(reactor, 0.02, lambda: None)
    return check()


def pause(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class RealRedisTestCase(unittest.TestCase):
    def setUp(self):
        if not redisserver.available():
            raise unittest.SkipTest("redis-server is not installed")
        self.logs = LogLines(self)
        self.metrics = Metrics()
        self.redis = redisserver.RedisServer(tempfile.mkdtemp(prefix="mailrelay-redis-"))
        self.redis.start()
        self.addCleanup(self.redis.stop)

    @defer.inlineCallbacks
    def throttles(self, count: int = 2, lease: float = shared.LEASE):
        made = []
        for _ in range(count):
            link = RedisLink(RedisURL.parse(self.redis.url), reactor, timeout=0.5, prefix="t:", metrics=self.metrics)
            link.startService()
            self.addCleanup(link.stopService)
            throttle = SharedThrottle(link, lease=lease)
            throttle.startService()
            self.addCleanup(throttle.stopService)
            made.append(throttle)
        self.assertTrue((yield eventually(lambda: all(t.link.up for t in made))))
        return made

    @defer.inlineCallbacks
    def drive(self, throttle: SharedThrottle, rule: Throttle, seconds: float, starts: list, finish: bool = True):
        """Start connections to example.net whenever `throttle` lets one go, for `seconds`."""
        woken = []
        throttle.on_ready = lambda: woken.append(1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            now = reactor.seconds()
            ready = throttle.ready_at("example.net", rule, now)
            if ready is not None and ready <= now:
                throttle.start("example.net", rule, now)
                starts.append(time.monotonic())
                if finish:
                    throttle.finish("example.net")
                continue
            wait = 0.02 if ready is None else min(0.02, ready - now)
            yield pause(max(0.001, wait))


class SharedStateTests(RealRedisTestCase):
    @defer.inlineCallbacks
    def test_two_relays_hold_one_rate(self):
        a, b = yield self.throttles()
        rule = Throttle(domains=("example.net",), messages_per_minute=600, pause=10.0)     # 0.1 s apart
        starts_a: list[float] = []
        starts_b: list[float] = []
        yield defer.gatherResults([self.drive(a, rule, 2.0, starts_a), self.drive(b, rule, 2.0, starts_b)])
        starts = sorted(starts_a + starts_b)
        self.assertTrue(starts_a and starts_b, (starts_a, starts_b))  # both got their share
        # Over the run and over every one-second window: one start per interval, plus the burst of one.
        span = starts[-1] - starts[0]
        self.assertLessEqual(len(starts), span / 0.1 + 2, starts)
        for first in starts:
            within = [t for t in starts if first <= t < first + 1.0]
            self.assertLessEqual(len(within), 1.0 / 0.1 + 2)
        self.assertEqual(self.metrics.registry.get_sample_value("mailrelay_cluster_redis_fallbacks_total",
                                                                {"what": "throttle"}), None)
        # Every key expires on its own: the rate's one interval after the next free start.
        slow = Throttle(domains=("slow.example",), messages_per_minute=1, connections=1, pause=10.0)
        a.ready_at("slow.example", slow, reactor.seconds())
        self.assertTrue((yield eventually(lambda: a._views["slow.example"].grant is not None)))
        ttl = int(self.redis.command("PTTL", "t:throttle:rate:slow.example"))
        self.assertTrue(0 < ttl <= 60000, ttl)
        ttl = int(self.redis.command("PTTL", "t:throttle:conn:slow.example"))
        self.assertTrue(0 < ttl <= shared.LEASE * 1000, ttl)

    @defer.inlineCallbacks
    def test_two_relays_hold_one_connection_cap_and_a_dead_ones_leases_lapse(self):
        a, b = yield self.throttles(lease=1.0)
        opened_a: list[float] = []
        opened_b: list[float] = []
        yield defer.gatherResults([self.drive(a, CAPPED, 1.5, opened_a, finish=False),
                                   self.drive(b, CAPPED, 1.5, opened_b, finish=False)])
        self.assertEqual(len(opened_a) + len(opened_b), 2)            # two in all, never more
        self.assertEqual(self.redis.command("ZCARD", "t:throttle:conn:example.net"), "2")
        holder, other = (a, b) if opened_a else (b, a)
        # The holder finishes one: the other relay (or it) may open one more, not two.
        holder.finish("example.net")
        more: list[float] = []
        yield self.drive(other, CAPPED, 1.5, more, finish=False)
        self.assertEqual(len(more), 1)
        # The relays "die" (no renewals, no finish): their leases lapse within the lease time.
        a.stopService()
        b.stopService()
        self.assertTrue((yield eventually(lambda: self.redis.command("ZCARD", "t:throttle:conn:example.net")
                                          in ("0", ""), seconds=5)))
        fresh, = yield self.throttles(count=1)
        again: list[float] = []
        yield self.drive(fresh, CAPPED, 1.5, again, finish=False)
        self.assertEqual(len(again), 2)

    @defer.inlineCallbacks
    def test_a_pause_one_relay_began_is_seen_by_the_other_and_doubles_for_both(self):
        a, b = yield self.throttles()
        now = reactor.seconds()
        until, began = a.slowed("example.net", RATE, now - 0.1, now, "421 4.7.0 slow down")
        self.assertTrue(began)
        self.assertTrue((yield eventually(lambda: self.redis.command("HGET", "t:throttle:pause:example.net",
                                                                     "row") == "1")))
        b.ready_at("example.net", RATE, reactor.seconds())            # the booking reads the pause
        self.assertTrue((yield eventually(lambda: b.local.pauses_in_a_row("example.net") == 1)))
        held = b.ready_at("example.net", RATE, reactor.seconds())
        self.assertLess(abs(held - until), 0.5)                       # b waits for a's pause: 10 s
        [status] = b.status(reactor.seconds())
        self.assertEqual(status.reason, "421 4.7.0 slow down")
        # b's own delivery, begun after that pause, is asked to slow down too: the second in a row
        # for the cluster, 20 s.
        yield pause(0.3)
        now = reactor.seconds()
        until_b, began_b = b.slowed("example.net", RATE, now - 0.05, now, "421 4.7.0 still busy")
        self.assertTrue(began_b)
        self.assertTrue((yield eventually(lambda: self.redis.command("HGET", "t:throttle:pause:example.net",
                                                                     "row") == "2")))
        ttl = int(self.redis.command("PTTL", "t:throttle:pause:example.net"))
        self.assertTrue(ttl > 19000, ttl)                             # kept past the pause for the row
        # An accepted delivery begun after it ends the row for all.
        self.redis.command("HSET", "t:throttle:pause:example.net", "until", "0")      # the pause is over
        a.ready_at("example.net", RATE, reactor.seconds() + 100)
        self.assertTrue((yield eventually(lambda: a._views.get("example.net") is not None
                                          and a._views["example.net"].row == 2)))
        a.succeeded("example.net", reactor.seconds())
        self.assertTrue((yield eventually(lambda: self.redis.command("HGET", "t:throttle:pause:example.net",
                                                                     "row") == "0")))

    @defer.inlineCallbacks
    def test_redis_stopped_mid_run_falls_back_and_comes_back(self):
        a, b = yield self.throttles()
        rule = Throttle(domains=("example.net",), messages_per_minute=600, pause=10.0)
        starts: list[float] = []
        yield self.drive(a, rule, 0.5, starts)
        self.assertTrue(starts)
        self.redis.kill()
        self.assertTrue((yield eventually(lambda: not a.link.up, seconds=5)) or True)
        during: list[float] = []
        yield self.drive(a, rule, 1.5, during)                           # still starting, on its own rate
        self.assertGreaterEqual(len(during), 2)
        self.assertLessEqual(len(during), 1.5 / 0.1 + 2)
        self.assertFalse(a.link.up)
        fallbacks = self.metrics.registry.get_sample_value("mailrelay_cluster_redis_fallbacks_total",
                                                           {"what": "throttle"})
        self.assertGreaterEqual(fallbacks, len(during) - 1)
        self.assertEqual(len(self.logs.take("unreachable")), 2)       # once per link
        self.redis.start()
        self.assertTrue((yield eventually(lambda: a.link.up and b.link.up, seconds=40)))
        after: list[float] = []
        yield self.drive(a, rule, 0.5, after)
        self.assertTrue(after)
        self.assertIn("cmdstat_evalsha", self.redis.command("INFO", "commandstats"))   # the new Redis booked them
        self.assertEqual(self.metrics.registry.get_sample_value("mailrelay_cluster_redis_fallbacks_total",
                                                                {"what": "throttle"}), fallbacks)


def throttled_config(sink_port: int, url: str, process: str, per_minute: int) -> str:
    return (f'[transports.sink]\nhost = "127.0.0.1"\nport = {sink_port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n'
            f'[delivery]\nprocess = "{process}"\n\n'
            f'[[throttle]]\ndomains = ["example.net"]\nmessages_per_minute = {per_minute}\n\n'
            f'[cluster]\nredis = "{url}"\ntimeout = "0.5s"\nkey_prefix = "e2e:"\n')


class TwoRelaysOneSinkTests(unittest.TestCase):
    """Two relays, each taking half the messages for example.net, deliver to one sink: together they
    keep the one rate of the rule (alone each would go twice as fast)."""
    process = "inline"
    per_minute = 120                  # 0.5 s apart
    messages = 8

    @defer.inlineCallbacks
    def links_up(self, redis):
        """Wait until every link of the two relays is connected (one each inline; with delivery
        processes, theirs too) and has loaded its scripts."""
        links = 2 if self.process == "inline" else 4
        reserve = gcra.sha1(gcra.THROTTLE_RESERVE)

        def ready() -> bool:
            clients = [line for line in redis.command("CLIENT", "LIST").splitlines() if "cmd=client" not in line]
            return len(clients) >= links and redis.command("SCRIPT", "EXISTS", reserve) == "1"
        self.assertTrue((yield eventually(ready)), redis.command("CLIENT", "LIST"))
        yield pause(0.5)                      # the last one's PING and script loads

    @defer.inlineCallbacks
    def test_two_relays_keep_one_rate_together(self):
        from twisted.internet import threads

        from tests.support.relay import RelayFixture
        from tests.support.sink import Sink

        if not redisserver.available():
            raise unittest.SkipTest("redis-server is not installed")
        redis = redisserver.RedisServer(tempfile.mkdtemp(prefix="mailrelay-redis-")).start()
        self.addCleanup(redis.stop)
        sink = Sink()
        port = sink.start(reactor)
        self.addCleanup(sink.stop)
        relays = []
        for name in ("a", "b"):
            relay = RelayFixture(self.mktemp() + name,
                                 extra=throttled_config(port, redis.url, self.process, self.per_minute))
            relay.start(reactor)
            self.addCleanup(relay.stop)
            relays.append(relay)
        yield self.links_up(redis)
        message = b"From: app@example.org\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nbody\r\n"
        for i in range(self.messages):
            code, _ = yield threads.deferToThread(relays[i % 2].submit_sync, "relay", "app@example.org",
                                                  ["bob@example.net"], message)
            self.assertEqual(code, 250)
        yield sink.wait_for(self.messages)
        times = sorted(sink.mail_times)
        interval = 60.0 / self.per_minute
        # One start per interval for the two together, plus the burst of one (and a little for the
        # connection set-up between a start and its MAIL FROM).
        self.assertGreaterEqual(times[-1] - times[0], (self.messages - 2) * interval - 0.3, times)
        self.assertIn("cmdstat_evalsha", redis.command("INFO", "commandstats"))     # the bookings went there


    @defer.inlineCallbacks
    def test_a_pause_one_relay_got_holds_the_other(self):
        from twisted.internet import threads

        from tests.support.relay import RelayFixture
        from tests.support.sink import Sink

        if not redisserver.available():
            raise unittest.SkipTest("redis-server is not installed")
        redis = redisserver.RedisServer(tempfile.mkdtemp(prefix="mailrelay-redis-")).start()
        self.addCleanup(redis.stop)
        sink = Sink(data_replies=("421 4.7.0 Try again later, closing connection",))
        port = sink.start(reactor)
        self.addCleanup(sink.stop)
        relays = []
        for name in ("a", "b"):
            config = throttled_config(port, redis.url, self.process, 6000).replace(
                "messages_per_minute = 6000\n", 'messages_per_minute = 6000\npause = "4s"\n')
            relay = RelayFixture(self.mktemp() + name, extra=config)
            relay.start(reactor)
            self.addCleanup(relay.stop)
            relays.append(relay)
        yield self.links_up(redis)
        a, b = relays
        message = b"From: app@example.org\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nbody\r\n"
        code, _ = yield threads.deferToThread(a.submit_sync, "relay", "app@example.org", ["bob@example.net"], message)
        self.assertEqual(code, 250)
        paused = yield eventually(lambda: redis.command("HGET", "e2e:throttle:pause:example.net", "row") == "1")
        self.assertTrue(paused, "relay a did not pause the destination in Redis")
        sent = time.monotonic()
        code, _ = yield threads.deferToThread(b.submit_sync, "relay", "app@example.org", ["bob@example.net"], message)
        self.assertEqual(code, 250)
        yield sink.wait_for(1)
        # b heard nothing from the sink itself, yet waited for a's pause (4 s from a's 421).
        self.assertGreater(sink.messages[0].mail_time - sent, 2.0)
        yield sink.wait_for(2)                                        # a's message after the pause


class TwoRelaysOneSinkSeparateTests(TwoRelaysOneSinkTests):
    """The same with `[delivery] process = "separate"`: the delivery processes hold the links."""
    process = "separate"
