"""Prometheus metrics: the counters each call site moves, the queue gauges read at scrape time, the
scheduler and DSN reporter feeding them, and /metrics scraped over a real loopback socket."""
from __future__ import annotations

import random

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import error, reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from mailrelay.config import DeliveryConfig, QueueConfig
from mailrelay.queue.scheduler import STOP_TIMEOUT, Scheduler
from mailrelay.dsn import DSNReporter
from mailrelay.metrics import Metrics, metrics_service
from tests.support.fakes import FakeQueue
from tests.support.dsn import BOUNCED, original
from tests.support.scheduling import NOW, FakeHop, FakeReporter, FakeRouter, MemorySpool


def value(metrics: Metrics, name: str, **labels) -> float:
    """A sample's value, 0.0 when the series does not exist (yet)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


class CounterTests(unittest.TestCase):
    def setUp(self):
        self.metrics = Metrics()

    def test_connections_are_counted_by_listener(self):
        self.metrics.connection("relay")
        self.metrics.connection("relay")
        self.metrics.connection("submission")
        self.assertEqual(value(self.metrics, "mailrelay_connections_total", listener="relay"), 2)
        self.assertEqual(value(self.metrics, "mailrelay_connections_total", listener="submission"), 1)

    def test_auth_results_are_counted_by_mechanism_and_result(self):
        self.metrics.auth("success", "plain")
        self.metrics.auth("failure", "LOGIN")
        self.metrics.auth("temporary", "PLAIN")
        self.assertEqual(value(self.metrics, "mailrelay_auth_total", mechanism="PLAIN", result="success"), 1)
        self.assertEqual(value(self.metrics, "mailrelay_auth_total", mechanism="LOGIN", result="failure"), 1)
        self.assertEqual(value(self.metrics, "mailrelay_auth_total", mechanism="PLAIN", result="temporary"), 1)

    def test_accepted_message_counts_by_listener_and_observes_its_size(self):
        self.metrics.accepted("submission", 3000)
        self.metrics.accepted("submission", 5_000_000)
        self.assertEqual(value(self.metrics, "mailrelay_messages_accepted_total", listener="submission"), 2)
        self.assertEqual(value(self.metrics, "mailrelay_message_size_bytes_count"), 2)
        self.assertEqual(value(self.metrics, "mailrelay_message_size_bytes_sum"), 5_003_000)
        self.assertEqual(value(self.metrics, "mailrelay_message_size_bytes_bucket", le="4096.0"), 1)

    def test_refusals_are_counted_by_reason(self):
        for reason in ("size", "size", "bare_cr", "policy"):
            self.metrics.refused(reason)
        self.assertEqual(value(self.metrics, "mailrelay_messages_refused_total", reason="size"), 2)
        self.assertEqual(value(self.metrics, "mailrelay_messages_refused_total", reason="bare_cr"), 1)
        self.assertEqual(value(self.metrics, "mailrelay_messages_refused_total", reason="policy"), 1)

    def test_label_values_from_outside_fold_into_other_so_series_stay_bounded(self):
        for i in range(50):
            self.metrics.refused(f"made-up-{i}")
            self.metrics.auth("failure", f"X-MECH-{i}")
            self.metrics.connection(f"listener{i}")
        self.assertEqual(value(self.metrics, "mailrelay_messages_refused_total", reason="other"), 50)
        self.assertEqual(value(self.metrics, "mailrelay_auth_total", mechanism="other", result="failure"), 50)
        self.assertEqual(value(self.metrics, "mailrelay_connections_total", listener="other"), 50)
        refused = [s for f in self.metrics.registry.collect() if f.name == "mailrelay_messages_refused"
                   for s in f.samples if s.name.endswith("_total")]
        self.assertEqual(len(refused), 1)

    def test_delivery_results_carry_transport_tls_and_result(self):
        self.metrics.delivery_started("direct")
        self.metrics.delivery_result("direct", "delivered", "TLSv1.3", latency=12.0)
        self.metrics.delivery_result("direct", "delivered", "tls1.2", verified=True)
        self.metrics.delivery_result("ses", "deferred", None)
        self.metrics.delivery_result("ses", "deferred", "none", verified=True)   # plaintext is never verified
        self.metrics.delivery_result("ses", "bounced")
        self.metrics.delivery_result("ses", "bounced", "SSLv3 RC4-MD5")
        self.assertEqual(value(self.metrics, "mailrelay_delivery_attempts_total", transport="direct"), 1)
        results = "mailrelay_delivery_results_total"
        self.assertEqual(value(self.metrics, results, transport="direct", tls="tls1.3", verified="false",
                               result="delivered"), 1)
        self.assertEqual(value(self.metrics, results, transport="direct", tls="tls1.2", verified="true",
                               result="delivered"), 1)
        self.assertEqual(value(self.metrics, results, transport="ses", tls="none", verified="false",
                               result="deferred"), 2)
        self.assertEqual(value(self.metrics, results, transport="ses", tls="unknown", verified="false",
                               result="bounced"), 1)
        self.assertEqual(value(self.metrics, results, transport="ses", tls="tls", verified="false",
                               result="bounced"), 1)

    def test_latency_is_observed_for_deliveries_only(self):
        self.metrics.delivery_result("direct", "delivered", "", latency=30.0)
        self.metrics.delivery_result("direct", "deferred", "", latency=99.0)
        self.assertEqual(value(self.metrics, "mailrelay_delivery_latency_seconds_count"), 1)
        self.assertEqual(value(self.metrics, "mailrelay_delivery_latency_seconds_sum"), 30.0)

    def test_dsns_are_counted_by_kind(self):
        self.metrics.dsn("failed")
        self.metrics.dsn("delayed")
        self.metrics.dsn("delayed")
        self.assertEqual(value(self.metrics, "mailrelay_dsn_sent_total", kind="failed"), 1)
        self.assertEqual(value(self.metrics, "mailrelay_dsn_sent_total", kind="delayed"), 2)

    def test_each_metrics_object_has_its_own_registry_and_the_global_one_is_untouched(self):
        other = Metrics()
        self.metrics.refused("size")
        self.assertEqual(value(other, "mailrelay_messages_refused_total", reason="size"), 0)
        global_names = {f.name for f in prometheus_client.REGISTRY.collect()}
        self.assertFalse([n for n in global_names if n.startswith("mailrelay")])


class QueueGaugeTests(unittest.TestCase):
    def setUp(self):
        self.metrics = Metrics()

    def test_gauges_are_zero_before_a_snapshot_is_watched(self):
        self.assertEqual(value(self.metrics, "mailrelay_queue_messages"), 0)

    def test_gauges_read_the_snapshot_at_each_scrape(self):
        state = {"now": (3, 120.5, 1)}
        self.metrics.watch_queue(lambda: state["now"])
        self.assertEqual(value(self.metrics, "mailrelay_queue_messages"), 3)
        self.assertEqual(value(self.metrics, "mailrelay_queue_oldest_message_age_seconds"), 120.5)
        self.assertEqual(value(self.metrics, "mailrelay_queue_held_messages"), 1)
        state["now"] = (7, 4.0, 0)
        self.assertEqual(value(self.metrics, "mailrelay_queue_messages"), 7)

    def test_a_failing_snapshot_gives_zeros_and_the_scrape_still_works(self):
        def broken():
            raise RuntimeError("no queue")
        self.metrics.watch_queue(broken)
        self.metrics.refused("rate")
        body = prometheus_client.generate_latest(self.metrics.registry).decode()
        self.assertIn("mailrelay_queue_messages 0.0", body)
        self.assertIn('mailrelay_messages_refused_total{reason="rate"} 1.0', body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class SchedulerMetricsTests(unittest.TestCase):
    """The real scheduler over the in-memory spool of its own tests, with task.Clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.spool = MemorySpool()
        self.direct = FakeHop(clock=self.clock)
        self.metrics = Metrics()

    def start(self, **queue) -> Scheduler:
        scheduler = Scheduler(
            self.spool, FakeRouter(), {}, self.direct,
            QueueConfig(**{"first_retry": 300.0, "max_retry": 1200.0, "lifetime": 86400.0,
                           "delay_warning": 0.0, **queue}),
            DeliveryConfig(concurrency=10, concurrency_per_domain=5), FakeReporter(),
            clock=self.clock, rng=random.Random(1), metrics=self.metrics)
        scheduler.startService()
        self.addCleanup(self.stop, scheduler)
        return scheduler

    def stop(self, scheduler):
        d = scheduler.stopService()
        self.clock.advance(STOP_TIMEOUT)
        return d

    def test_delivery_attempts_and_results_are_counted_per_recipient(self):
        self.direct.script = {"b@example.net": [(451, "4.4.1")], "c@example.net": [(550, "5.1.1")]}
        self.spool.add("q1", ["a@example.net", "b@example.net", "c@example.net"])
        self.start()
        self.clock.advance(0)
        results = "mailrelay_delivery_results_total"
        self.assertEqual(value(self.metrics, "mailrelay_delivery_attempts_total", transport="direct"), 1)
        for result in ("delivered", "deferred", "bounced"):
            self.assertEqual(value(self.metrics, results, transport="direct", tls="unknown", verified="false",
                                   result=result), 1)

    def test_latency_runs_from_receipt_to_delivery(self):
        self.direct.script = {"a@example.net": [(451, "4.4.1"), (250, "2.0.0")]}
        self.spool.add("q1", ["a@example.net"], received_at=NOW - 60)
        self.start()
        self.clock.advance(0)
        self.clock.advance(1200)
        self.assertEqual(self.spool.removed, ["q1"])
        self.assertEqual(value(self.metrics, "mailrelay_delivery_latency_seconds_count"), 1)
        latency = value(self.metrics, "mailrelay_delivery_latency_seconds_sum")
        self.assertTrue(60 + 300 <= latency <= 60 + 1200, latency)

    def test_queue_snapshot_counts_messages_held_ones_and_the_oldest_age(self):
        self.direct.script = {"a@example.net": [(451, "4.4.1")]}
        self.spool.add("q1", ["a@example.net"], received_at=NOW - 3600)
        self.spool.add("q2", ["b@example.net"], received_at=NOW - 60, held=True)
        scheduler = self.start()
        self.clock.advance(0)
        self.assertEqual(scheduler.queue_snapshot(), (2, 3600.0, 1))
        self.assertEqual(value(self.metrics, "mailrelay_queue_messages"), 2)
        self.assertEqual(value(self.metrics, "mailrelay_queue_held_messages"), 1)
        self.assertEqual(value(self.metrics, "mailrelay_queue_oldest_message_age_seconds"), 3600.0)

    def test_queue_snapshot_follows_enqueue_hold_release_and_removal(self):
        self.direct.script = {"a@example.net": [(451, "4.4.1"), (250, "2.0.0")]}
        scheduler = self.start()
        self.assertEqual(scheduler.queue_snapshot(), (0, 0.0, 0))
        self.spool.add("q1", ["a@example.net"])
        scheduler.enqueue("q1")
        self.clock.advance(0)
        self.assertEqual(scheduler.queue_snapshot()[0], 1)
        self.spool.requests.append(("hold", "q1"))
        self.clock.advance(1)
        self.assertEqual(scheduler.queue_snapshot()[::2], (1, 1))
        self.spool.requests.append(("release", "q1"))
        self.clock.advance(1)
        self.assertEqual(scheduler.queue_snapshot()[::2], (1, 0))
        self.clock.advance(1200)
        self.assertEqual(self.spool.removed, ["q1"])
        self.assertEqual(scheduler.queue_snapshot(), (0, 0.0, 0))

    def test_scheduler_without_metrics_still_works(self):
        self.spool.add("q1", ["a@example.net"])
        self.metrics = None
        scheduler = Scheduler(self.spool, FakeRouter(), {}, self.direct, QueueConfig(), DeliveryConfig(),
                              None, clock=self.clock)
        scheduler.startService()
        self.addCleanup(self.stop, scheduler)
        self.clock.advance(0)
        self.assertEqual(self.spool.removed, ["q1"])


class DSNMetricsTests(unittest.TestCase):
    def test_each_queued_dsn_is_counted_by_kind(self):
        metrics = Metrics()
        clock = task.Clock()
        reporter = DSNReporter(FakeQueue(), "relay.example.org", clock=clock, metrics=metrics)
        self.successResultOf(reporter.bounce(original(), BOUNCED))
        self.successResultOf(reporter.delay(original(), BOUNCED[1:]))
        self.successResultOf(reporter.bounce(original(sender=""), BOUNCED))   # from <>: none sent
        self.assertEqual(value(metrics, "mailrelay_dsn_sent_total", kind="failed"), 1)
        self.assertEqual(value(metrics, "mailrelay_dsn_sent_total", kind="delayed"), 1)


class ScrapeTests(unittest.TestCase):
    """/metrics over a real loopback socket on an OS-chosen port."""

    def setUp(self):
        self.metrics = Metrics()
        self.service = metrics_service("tcp:0:interface=127.0.0.1", self.metrics, reactor=reactor)
        self.service.startService()
        self.addCleanup(self.stop_service)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)

    def stop_service(self):
        return self.service.stopService() if self.service.running else None

    def url(self, path: str) -> bytes:
        return f"http://127.0.0.1:{self.service.port.getHost().port}{path}".encode()

    @inlineCallbacks
    def get(self, path: str):
        response = yield self.agent.request(b"GET", self.url(path))
        body = yield readBody(response)
        return response, body

    def test_listens_on_loopback_only_on_an_os_chosen_port(self):
        address = self.service.port.getHost()
        self.assertEqual(address.host, "127.0.0.1")
        self.assertNotEqual(address.port, 0)

    @inlineCallbacks
    def test_scrape_shows_counters_and_gauges_in_prometheus_text_format(self):
        self.metrics.refused("size")
        self.metrics.refused("size")
        self.metrics.connection("relay")
        self.metrics.delivery_result("ses", "delivered", "TLSv1.3", latency=2.0)
        self.metrics.watch_queue(lambda: (5, 42.0, 2))
        response, body = yield self.get("/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in families.values() for s in f.samples}
        self.assertEqual(samples[("mailrelay_messages_refused_total", (("reason", "size"),))], 2)
        self.assertEqual(samples[("mailrelay_connections_total", (("listener", "relay"),))], 1)
        self.assertEqual(samples[("mailrelay_delivery_results_total",
                                  (("result", "delivered"), ("tls", "tls1.3"), ("transport", "ses"),
                                   ("verified", "false")))], 1)
        self.assertEqual(samples[("mailrelay_queue_messages", ())], 5)
        self.assertEqual(samples[("mailrelay_queue_held_messages", ())], 2)
        self.assertEqual(families["mailrelay_delivery_latency_seconds"].type, "histogram")

    @inlineCallbacks
    def test_a_second_scrape_sees_new_increments(self):
        yield self.get("/metrics")
        self.metrics.accepted("submission", 100)
        _, body = yield self.get("/metrics")
        self.assertIn(b'mailrelay_messages_accepted_total{listener="submission"} 1.0', body)

    @inlineCallbacks
    def test_other_paths_are_404(self):
        for path in ("/", "/metricsx", "/admin", "/favicon.ico"):
            response, body = yield self.get(path)
            self.assertEqual(response.code, 404, path)
            self.assertNotIn(b"mailrelay_", body)

    @inlineCallbacks
    def test_stopping_the_service_closes_the_port(self):
        url = self.url("/metrics")
        yield self.service.stopService()
        yield self.assertFailure(self.agent.request(b"GET", url), error.ConnectionRefusedError)

    def test_a_port_in_use_fails_at_start(self):
        taken = self.service.port.getHost().port
        second = metrics_service(f"tcp:{taken}:interface=127.0.0.1", Metrics(), reactor=reactor)
        self.assertRaises(error.CannotListenError, second.startService)
        self.assertFalse(second.running)

    def test_no_mailrelay_metric_leaks_into_the_global_registry(self):
        self.metrics.refused("policy")
        self.assertIsNone(prometheus_client.REGISTRY.get_sample_value(
            "mailrelay_messages_refused_total", {"reason": "policy"}))

