"""[[webhook]] delivery events, in pieces: the config, the event document, the outbox on disk and the
sender's retry logic over task.Clock (HMAC checked with the stdlib hmac module, independently)."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from datetime import datetime
from pathlib import Path

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailrelay.config import ConfigError, WebhookConfig, load
from mailrelay.events import store
from mailrelay.events.event import event_body, rfc3339
from mailrelay.events.sender import RETRY_FIRST, WebhookSender
from mailrelay.events.service import DeliveryEvents
from mailrelay.events.store import Outbox, read_backlog
from mailrelay.interfaces import IDeliveryEvents, Reply
from mailrelay.metrics import Metrics
from tests.support.pki import TestCA

SECRET = b"s3cret-webhook-key"


def run_now(f, *args) -> defer.Deferred:
    """The outbox's thread runner, done at once in this thread (unit tests)."""
    return defer.maybeDeferred(f, *args)


class NoJitter:
    def random(self) -> float:
        return 0.0


class Config(unittest.TestCase):
    def load(self, table: str, files: dict | None = None):
        directory = Path(self.mktemp())
        directory.mkdir()
        for name, content in (files or {}).items():
            (directory / name).write_bytes(content)
        (directory / "tap.conf").write_text('hostname = "relay.test"\n' + table)
        return load(directory / "tap.conf")

    def refused(self, table: str, files: dict | None = None) -> ConfigError:
        with self.assertRaises(ConfigError) as caught:
            self.load(table, files)
        self.assertNotIn("\n", str(caught.exception))
        return caught.exception

    def test_defaults(self):
        config = self.load('[[webhook]]\nurl = "https://hooks.example.org/mail"\n')
        self.assertEqual(config.webhooks, (WebhookConfig("https://hooks.example.org/mail"),))
        self.assertEqual(config.webhooks[0].events, ("delivered", "deferred", "bounced", "expired"))

    def test_every_key(self):
        ca = TestCA()
        config = self.load('[[webhook]]\nurl = "http://127.0.0.1:8080/a"\n[[webhook]]\n'
                           'url = "https://hooks.example.org/mail"\nevents = ["bounced", "expired"]\n'
                           'secret_file = "secret"\nca_file = "ca.pem"\ntimeout = "3s"\nmax_pending = 10\n'
                           'concurrency = 2\n', {"secret": b"  key\n", "ca.pem": ca.pem})
        second = config.webhooks[1]
        self.assertEqual((second.events, second.timeout, second.max_pending, second.concurrency),
                         (("bounced", "expired"), 3.0, 10, 2))
        self.assertEqual(second.secret_file.name, "secret")

    def test_refusals_name_the_file_and_key(self):
        cases = [
            ('url = "ftp://h.example/x"', "webhook[0].url", "http:// or https://"),
            ('url = "https://"', "webhook[0].url", "http:// or https://"),
            ('url = "https://user:pw@h.example/x"', "webhook[0].url", "credentials"),
            ('url = "https://h.example:99999/x"', "webhook[0].url", "not a URL"),
            ('url = "https://h.example/x"\nevents = ["sent"]', "webhook[0].events[0]", '"sent" is not one of'),
            ('url = "https://h.example/x"\nevents = []', "webhook[0].events", "empty"),
            ('url = "https://h.example/x"\nevents = ["bounced", "bounced"]', "webhook[0].events[1]", "twice"),
            ('url = "https://h.example/x"\nsecret_file = "missing"', "webhook[0].secret_file", "cannot read"),
            ('url = "https://h.example/x"\nsecret_file = "blank"', "webhook[0].secret_file", "empty"),
            ('url = "https://h.example/x"\nca_file = "blank"', "webhook[0].ca_file", "cannot load"),
            ('url = "https://h.example/x"\nconcurrency = 0', "webhook[0].concurrency", "out of range"),
            ('url = "https://h.example/x"\nretries = 3', "webhook[0].retries", "unknown key"),
            ('events = ["bounced"]', "webhook[0].url", "missing"),
        ]
        for body, key, words in cases:
            error = self.refused("[[webhook]]\n" + body + "\n", {"blank": b" \n"})
            self.assertEqual(error.key, key, body)
            self.assertIn(words, error.message, body)
            self.assertIn("tap.conf", str(error))

    def test_one_url_twice_is_refused(self):
        error = self.refused('[[webhook]]\nurl = "https://h.example/x?t=1"\n[[webhook]]\nurl = "https://h.example/x?t=1"\n')
        self.assertEqual(error.key, "webhook[1].url")
        self.assertIn("webhook[0]", error.message)
        self.assertNotIn("t=1", str(error))      # a query may carry a token: never shown

    def test_the_secret_never_appears_in_an_error(self):
        error = self.refused('[[webhook]]\nurl = "https://h.example/x"\nsecret_file = "s"\nbogus = 1\n',
                             {"s": b"TOPSECRETVALUE\n"})
        self.assertNotIn("TOPSECRETVALUE", str(error))
        self.assertNotIn("TOPSECRETVALUE", repr(self.load('[[webhook]]\nurl = "https://h.example/x"\n'
                                                          'secret_file = "s"\n', {"s": b"TOPSECRETVALUE"})))


class EventDocument(unittest.TestCase):
    def test_fields(self):
        body = event_body("abc", "bounced", "Q1", "a@example.org", "b@example.net", 1767225600.25,
                          Reply(550, "5.1.1", "no such user"), 2, "mx.example.net", "direct")
        self.assertNotIn(b"\n", body)
        self.assertEqual(json.loads(body), {
            "id": "abc", "event": "bounced", "queue_id": "Q1", "sender": "a@example.org",
            "recipient": "b@example.net", "time": "2026-01-01T00:00:00.250Z",
            "reply": {"code": 550, "enhanced": "5.1.1", "text": "no such user"}, "attempt": 2,
            "next_hop": "mx.example.net", "transport": "direct"})

    def test_time_is_rfc3339(self):
        text = rfc3339(1767225600.9996)
        self.assertEqual(text, "2026-01-01T00:00:01.000Z")
        self.assertEqual(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp(), 1767225601.0)


def body(event_id: str, when: float = 1767225600.0) -> bytes:
    return event_body(event_id, "delivered", "Q", "a@example.org", "b@example.net", when,
                      Reply(250, "2.0.0", "ok"), 1, "sink", "sink")


class OutboxOnDisk(unittest.TestCase):
    def setUp(self):
        self.spool = Path(self.mktemp())
        self.ready = []

    def outbox(self, max_pending: int = 100) -> Outbox:
        box = Outbox(self.spool, "https://h.example/hook?token=x", max_pending, run_now,
                     lambda: self.ready.append(1))
        box.load()
        self.addCleanup(box.close)
        return box

    def test_an_event_is_on_disk_before_it_can_be_taken(self):
        box = self.outbox()
        d = box.append("e1", body("e1"), 1.0)
        self.assertTrue(self.successResultOf(d))
        lines = (box.directory / "0000000001.events").read_bytes().splitlines()
        self.assertEqual([json.loads(line)["id"] for line in lines], ["e1"])
        self.assertEqual(box.take().id, "e1")
        self.assertEqual((box.directory / "url").read_text().strip(), "https://h.example/hook?…")

    def test_unacknowledged_events_come_back_after_a_restart_and_a_torn_line_is_skipped(self):
        box = self.outbox()
        for i in range(3):
            box.append(f"e{i}", body(f"e{i}"), 1.0)
        box.ack(box.take())
        with open(box.directory / "0000000001.events", "ab") as f:
            f.write(b'{"id": "torn", "ev')          # a crash in the middle of a write
        box.close()                                  # the process is gone: so is its lock
        again = self.outbox()
        self.assertEqual(again.live, 2)
        self.assertEqual([again.take().id, again.take().id], ["e1", "e2"])
        again.append("e3", body("e3"), 1.0)         # a new segment: never after the torn line
        self.assertTrue((again.directory / "0000000002.events").exists())

    def test_a_segment_another_process_still_writes_is_left_alone(self):
        ending = self.outbox()                       # e.g. a delivery process finishing after its parent died
        ending.append("e1", body("e1"), 1.0)
        starting = self.outbox()
        self.assertEqual(starting.live, 0)           # not read now: read at the next start
        starting.append("n1", body("n1"), 1.0)
        self.assertTrue((starting.directory / "0000000002.events").exists())
        ending.append("e2", body("e2"), 1.0)
        ending.close()
        starting.close()
        later = self.outbox()
        self.assertEqual({later.take().id for _ in range(3)}, {"e1", "e2", "n1"})

    def test_a_fully_acknowledged_segment_is_removed(self):
        self.patch(store, "SEGMENT_EVENTS", 2)
        box = self.outbox()
        for i in range(3):
            box.append(f"e{i}", body(f"e{i}"), 1.0)
        for _ in range(2):
            box.ack(box.take())
        self.assertFalse((box.directory / "0000000001.events").exists())
        self.assertTrue((box.directory / "0000000002.events").exists())

    def test_at_the_bound_new_events_are_dropped_without_waiting(self):
        drops = []
        box = Outbox(self.spool, "https://h.example/x", 2, run_now, lambda: None, on_drop=drops.append)
        box.load()
        self.addCleanup(box.close)
        results = [self.successResultOf(box.append(f"e{i}", body(f"e{i}"), 1.0)) for i in range(4)]
        self.assertEqual(results, [True, True, False, False])
        self.assertEqual((box.live, box.dropped, drops), (2, 2, ["full", "full"]))

    def test_a_write_failure_drops_the_batch_and_never_fails_the_caller(self):
        def broken(f, *args):
            return defer.fail(OSError(28, "No space left on device"))
        box = Outbox(self.spool, "https://h.example/x", 10, broken, lambda: None)
        box.directory.mkdir(parents=True)
        self.assertFalse(self.successResultOf(box.append("e1", body("e1"), 1.0)))
        self.assertEqual(box.live, 0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_the_backlog_as_the_cli_reads_it(self):
        box = self.outbox()
        box.append("e1", body("e1", 1000.0), 1000.0)
        box.append("e2", body("e2", 2000.0), 2000.0)
        box.ack(box.take())
        box.note(last_error="HTTP 503", last_error_at=2500.0)
        [backlog] = read_backlog(self.spool)
        self.assertEqual((backlog.url, backlog.pending, backlog.oldest, backlog.last_error),
                         ("https://h.example/hook?…", 1, 2000.0, "HTTP 503"))


class FakePoster:
    """Records POSTs; each answer is a Deferred the test fires."""

    def __init__(self):
        self.requests: list[tuple[str, bytes, dict, defer.Deferred]] = []
        self.closed = 0

    def post(self, url, body, headers):
        d = defer.Deferred()
        self.requests.append((url, body, headers, d))
        return d

    def close(self):
        self.closed += 1

    def answer(self, code: int, index: int = 0):
        url, body, headers, d = self.requests.pop(index)
        d.callback(code)
        return body, headers


class Sending(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1767225600)
        self.spool = Path(self.mktemp())
        self.poster = FakePoster()
        self.metrics = Metrics()

    def sender(self, events: int, concurrency: int = 2, drop_after: float = 86400.0) -> WebhookSender:
        config = WebhookConfig("https://h.example/hook", concurrency=concurrency, timeout=10.0)
        box = Outbox(self.spool, config.url, 1000, run_now, lambda: None)
        box.load()
        self.addCleanup(box.close)
        for i in range(events):
            box.append(f"e{i}", body(f"e{i}", self.clock.seconds()), self.clock.seconds())
        sender = WebhookSender(box, config, self.clock, self.poster.post, SECRET, drop_after, rng=NoJitter(),
                               metrics=self.metrics)
        sender.start()
        return sender

    def posts(self, result: str) -> float:
        return self.metrics.registry.get_sample_value(
            "mailrelay_webhook_posts_total", {"url": "https://h.example/hook", "result": result}) or 0.0

    def test_signed_json_post_and_ack(self):
        sender = self.sender(1)
        url, sent, headers, _ = self.poster.requests[0]
        self.assertEqual(url, "https://h.example/hook")
        self.assertEqual(headers["Content-Type"], "application/json")
        expected = "sha256=" + hmac.new(SECRET, sent, hashlib.sha256).hexdigest()
        self.assertEqual(headers["X-Mailrelay-Signature"], expected)
        self.assertEqual(headers["X-Mailrelay-Event"], json.loads(sent)["id"])
        self.poster.answer(204)
        self.assertEqual((sender.outbox.live, self.posts("ok")), (0, 1.0))
        self.assertEqual((sender.outbox.directory / "0000000001.done").read_text(), "e0\n")

    def test_at_most_concurrency_posts_in_flight(self):
        self.sender(5, concurrency=2)
        self.assertEqual(len(self.poster.requests), 2)
        self.poster.answer(200)
        self.assertEqual(len(self.poster.requests), 2)

    def test_failures_pause_with_doubling_backoff_then_one_probe_then_full_concurrency(self):
        sender = self.sender(4, concurrency=2)
        self.poster.answer(503)
        self.poster.answer(503)              # in flight when the pause began: adds nothing
        self.assertEqual((sender.failures, self.poster.requests), (1, []))
        self.clock.advance(RETRY_FIRST - 0.1)
        self.assertEqual(self.poster.requests, [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.poster.requests), 1)      # one probe, the oldest event first
        self.assertEqual(json.loads(self.poster.requests[0][1])["id"], "e0")
        self.poster.answer(500)
        self.clock.advance(2 * RETRY_FIRST - 0.1)
        self.assertEqual(self.poster.requests, [])
        self.clock.advance(0.1)
        self.poster.answer(200)
        self.assertEqual(len(self.poster.requests), 2)      # answering again: full concurrency
        self.assertEqual((sender.failures, sender.outbox.live), (0, 3))
        self.assertEqual(sender.outbox.status["last_error"], "HTTP 500")
        self.assertEqual(self.posts("server_error"), 3.0)

    def test_the_first_connection_failure_is_retried_at_once_the_second_pauses(self):
        from twisted.web.client import ResponseNeverReceived

        sender = self.sender(1, concurrency=1)
        self.poster.requests.pop()[3].errback(ResponseNeverReceived([]))
        self.assertEqual((len(self.poster.requests), sender.paused), (1, False))   # a closed keep-alive
        self.poster.requests.pop()[3].errback(ConnectionRefusedError("refused"))
        self.assertEqual((len(self.poster.requests), sender.paused), (0, True))
        self.assertEqual(self.posts("error"), 2.0)
        self.clock.advance(RETRY_FIRST)
        self.poster.answer(200)
        self.assertEqual(sender.outbox.live, 0)

    def test_a_post_without_answer_times_out_and_is_retried(self):
        sender = self.sender(1, concurrency=1)
        self.clock.advance(10.0)
        self.assertEqual(self.posts("timeout"), 1.0)
        self.assertEqual(sender.outbox.status["last_error"], "no answer within 10s")
        self.assertEqual(len(self.poster.requests), 1)       # cancelled; nothing new until the pause ends
        self.clock.advance(RETRY_FIRST)
        self.assertEqual(len(self.poster.requests), 2)
        self.poster.answer(200, index=1)
        self.assertEqual(sender.outbox.live, 0)

    def test_a_4xx_is_retried_until_the_event_outlives_the_message_lifetime(self):
        sender = self.sender(1, concurrency=1, drop_after=60.0)
        self.poster.answer(400)
        self.assertEqual(sender.outbox.live, 1)
        self.clock.advance(61.0)
        self.poster.answer(422)
        self.assertEqual((sender.outbox.live, self.posts("dropped")), (0, 1.0))
        self.assertEqual(self.metrics.registry.get_sample_value(
            "mailrelay_webhook_dropped_total", {"url": "https://h.example/hook", "reason": "refused"}), 1.0)

    def test_429_and_408_are_never_given_up(self):
        sender = self.sender(1, concurrency=1, drop_after=60.0)
        for code in (429, 408):
            self.clock.advance(3600.0)
            self.poster.answer(code)
            self.assertEqual(sender.outbox.live, 1)
            self.clock.advance(3600.0)
        self.assertEqual(len(self.poster.requests), 1)

    def test_stop_abandons_posts_in_flight_and_keeps_their_events(self):
        sender = self.sender(2, concurrency=2)
        sender.stop()
        self.assertEqual((sender.outbox.live, sender.outbox.waiting), (2, 2))
        self.assertEqual(sender.outbox.take().id, "e0")


class Service(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.spool = Path(self.mktemp())
        self.posters: list[FakePoster] = []

    def poster(self, config):
        self.posters.append(FakePoster())
        return self.posters[-1]

    def service(self, *webhooks: WebhookConfig) -> DeliveryEvents:
        events = DeliveryEvents(self.spool, webhooks, self.clock, drop_after=86400.0, poster=self.poster)
        events._threads.start = lambda: None        # no thread: the unit test writes in this one
        events._threads.run = run_now
        events._threads.stop = lambda: None
        events.startService()
        self.addCleanup(events.stopService)
        return events

    def test_provides_the_interface(self):
        self.assertTrue(verifyObject(IDeliveryEvents, self.service()))

    def test_only_subscribed_urls_get_an_event(self):
        events = self.service(WebhookConfig("https://a.example/"),
                              WebhookConfig("https://b.example/", events=("bounced",)))
        self.successResultOf(events.emit("delivered", "Q", "a@example.org", "b@example.net",
                                         Reply(250, "2.0.0", "ok"), 1, "mx", "direct"))
        self.assertEqual([len(p.requests) for p in self.posters], [1, 0])
        self.successResultOf(events.emit("bounced", "Q", "a@example.org", "c@example.net",
                                         Reply(550, "5.1.1", "no"), 1, "mx", "direct"))
        self.assertEqual([len(p.requests) for p in self.posters], [2, 1])
        self.assertEqual(self.posters[0].requests[1][1], self.posters[1].requests[0][1])   # one document

    def test_a_url_removed_by_reload_keeps_its_backlog_and_sends_it_when_it_returns(self):
        first = WebhookConfig("https://a.example/")
        events = self.service(first)
        events.emit("deferred", "Q", "a@example.org", "b@example.net", Reply(451, "4.0.0", "later"), 1, "mx", "d")
        events.reconfigure((), 86400.0)
        self.assertEqual(events.backlog(), [])
        self.assertEqual(self.successResultOf(events.emit("delivered", "Q", "a", "b", Reply(250, "2.0.0", ""),
                                                          2, "mx", "d")), None)
        [on_disk] = read_backlog(self.spool)
        self.assertEqual(on_disk.pending, 1)
        events.reconfigure((first,), 86400.0)
        self.assertEqual(len(self.posters[-1].requests), 1)
        self.assertEqual(json.loads(self.posters[-1].requests[0][1])["event"], "deferred")


class CostPerEvent(unittest.TestCase):
    """Not a timing assertion: proves the real outbox (a real thread, a real fsync) is what emit uses."""

    @defer.inlineCallbacks
    def test_events_are_fsynced_in_batches_by_the_outbox_thread(self):
        from twisted.internet import reactor

        synced = []
        real_fsync = os.fsync
        self.patch(store.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
        poster = FakePoster()
        events = DeliveryEvents(Path(self.mktemp()), (WebhookConfig("https://a.example/"),), reactor,
                                drop_after=60.0, poster=lambda config: poster)
        events.startService()
        results = yield defer.DeferredList([
            events.emit("delivered", "Q", "a@example.org", f"r{i}@example.net", Reply(250, "2.0.0", "ok"), 1,
                        "mx", "direct") for i in range(200)])
        self.assertTrue(all(ok and value for ok, value in results))
        self.assertLess(len(synced), 200)          # group commit: far fewer fsyncs than events
        yield events.stopService()


class Operations(unittest.TestCase):
    """`mailrelay queue list|webhooks` read the outboxes from the spool; metrics show the backlog."""

    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.config = self.dir / "tap.conf"
        self.config.write_text('hostname = "relay.test"\nspool = "spool"\n'
                               '[[webhook]]\nurl = "https://h.example/hook?token=SECRETTOKEN"\n')
        now = 1767225600.0
        box = Outbox(self.dir / "spool", "https://h.example/hook?token=SECRETTOKEN", 100, run_now, lambda: None)
        box.load()
        for i in range(2):
            box.append(f"e{i}", body(f"e{i}", now - 600), now - 600)
        box.note(last_error="HTTP 503", last_error_at=now - 60)
        gone = Outbox(self.dir / "spool", "https://old.example/x", 100, run_now, lambda: None)
        gone.load()
        gone.append("g1", body("g1", now - 3600), now - 3600)
        box.close()
        gone.close()
        self.clock = task.Clock()
        self.clock.advance(now)

    def run_queue(self, *argv: str) -> str:
        import argparse
        import contextlib
        import io

        from mailrelay.cli import queue as cli_queue

        out = io.StringIO()
        args = argparse.Namespace(action=argv[0], config=str(self.config), json="--json" in argv)
        with contextlib.redirect_stdout(out):
            self.assertEqual(cli_queue.run(args, clock=self.clock), 0)
        return out.getvalue()

    def test_queue_list_ends_with_each_webhook_backlog(self):
        text = self.run_queue("list")
        self.assertIn("queue is empty", text)
        self.assertIn("webhook https://h.example/hook?…: 2 events waiting, oldest 10m, last error 1m ago: HTTP 503",
                      text)
        self.assertIn("webhook https://old.example/x (not configured: kept, not sent): 1 event waiting, oldest 1h",
                      text)
        self.assertNotIn("SECRETTOKEN", text)

    def test_queue_webhooks_json(self):
        rows = json.loads(self.run_queue("webhooks", "--json"))
        self.assertEqual({(r["url"], r["configured"], r["pending"], r["last_error"]) for r in rows},
                         {("https://h.example/hook?…", True, 2, "HTTP 503"), ("https://old.example/x", False, 1, None)})

    def test_metrics_show_the_backlog_of_every_configured_url(self):
        from mailrelay.metrics import delivery_text

        metrics = Metrics()
        events = DeliveryEvents(self.dir / "spool", load(self.config).webhooks, self.clock, drop_after=60.0,
                                metrics=metrics, poster=lambda config: FakePoster())
        events._threads.start = lambda: None
        events._threads.run = run_now
        events._threads.stop = lambda: None
        events.startService()
        self.addCleanup(events.stopService)
        labels = {"url": "https://h.example/hook?…"}
        self.assertEqual(metrics.registry.get_sample_value("mailrelay_webhook_pending", labels), 2.0)
        self.assertEqual(metrics.registry.get_sample_value("mailrelay_webhook_oldest_event_age_seconds", labels),
                         600.0)
        text = delivery_text(metrics)          # counted in the delivery process, handed up per scrape
        self.assertIn(b"mailrelay_webhook_pending{", text)
        self.assertNotIn(b"SECRETTOKEN", text)


class Check(unittest.TestCase):
    def test_mailrelay_check_lists_each_webhook_without_its_query_or_secret(self):
        from mailrelay.cli.check import describe

        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "s").write_bytes(b"TOPSECRETVALUE")
        (directory / "tap.conf").write_text('hostname = "relay.test"\n[[webhook]]\nurl = "https://h.example/x?t=TOKEN"\n'
                                            'secret_file = "s"\nevents = ["bounced"]\n')
        lines = dict(describe(load(directory / "tap.conf")))
        self.assertEqual(lines["webhook[0]"], "bounced to https://h.example/x?…, signed (HMAC-SHA256)")
        self.assertNotIn("TOKEN", repr(lines))
