"""DSNs (RFC 3464): what a bounce or delay report contains, parsed back with the stdlib email parser,
and how it enters the spool (from <>, to the original sender, then handed to the scheduler)."""
from __future__ import annotations

import email
import email.policy

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailrelay.queue.results import RecipientResult
from mailrelay.dsn import MAX_HEADER_BYTES, MAX_RETURN_BYTES, DSNReporter, read_headers
from mailrelay.dkim.permission import may_sign
from mailrelay.envelope import Envelope
from mailrelay.interfaces import IDeliveryReporter
from tests.support.fakes import FakeQueue
from tests.support.dsn import ARRIVAL, BODY, BOUNCED, HEADERS, original

NOW = ARRIVAL + 3600


class RecordingScheduler:
    logs_queued = False

    def __init__(self):
        self.enqueued: list[str] = []

    def enqueue(self, queue_id: str) -> None:
        self.enqueued.append(queue_id)


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


class ReporterTestCase(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.queue = FakeQueue()
        self.scheduler = RecordingScheduler()
        self.reporter = DSNReporter(self.queue, "relay.example.org", clock=self.clock, lifetime=5 * 86400)
        self.reporter.scheduler = self.scheduler

    def report(self, method: str, message, results):
        d = getattr(self.reporter, method)(message, results)
        return self.successResultOf(d)

    def bounce(self, message=None, results=BOUNCED):
        queue_id = self.report("bounce", message or original(), results)
        self.assertEqual(len(self.queue.messages), 1)
        writer = self.queue.messages[0]
        self.assertEqual(writer.queue_id, queue_id)
        return writer, parse(writer.data)

    @staticmethod
    def parts(dsn):
        text, status, headers = dsn.get_payload()
        return text, status, headers

    @staticmethod
    def status_blocks(dsn):
        return ReporterTestCase.parts(dsn)[1].get_payload()


class BounceTests(ReporterTestCase):
    def test_reporter_provides_the_interface(self):
        self.assertTrue(IDeliveryReporter.providedBy(self.reporter))

    def test_bounce_is_a_multipart_report_of_type_delivery_status(self):
        _, dsn = self.bounce()
        self.assertEqual(dsn.get_content_type(), "multipart/report")
        self.assertEqual(dsn.get_param("report-type"), "delivery-status")
        self.assertEqual([p.get_content_type() for p in dsn.get_payload()],
                         ["text/plain", "message/delivery-status", "text/rfc822-headers"])

    def test_bounce_goes_from_the_null_path_to_the_original_sender(self):
        writer, dsn = self.bounce()
        self.assertEqual(writer.envelope.sender, "")
        self.assertEqual(writer.envelope.recipients, ("alice@example.org",))
        self.assertEqual(writer.envelope.received_at, NOW)
        self.assertEqual(str(dsn["To"]), "alice@example.org")
        self.assertEqual(dsn["From"].addresses[0].addr_spec, "MAILER-DAEMON@relay.example.org")
        self.assertEqual(str(dsn["Auto-Submitted"]), "auto-replied")
        self.assertEqual(str(dsn["Subject"]), "Undelivered Mail Returned to Sender")
        self.assertEqual(str(dsn["Date"]), "Tue, 14 Nov 2023 23:13:20 +0000")
        self.assertTrue(str(dsn["Message-ID"]).endswith("@relay.example.org>"))

    def test_bounce_is_handed_to_the_scheduler_after_commit(self):
        writer, _ = self.bounce()
        self.assertTrue(writer.committed)
        self.assertEqual(self.scheduler.enqueued, [writer.queue_id])

    def test_per_message_fields(self):
        _, dsn = self.bounce(original(params={"ENVID": "env-42"}))
        fields = self.status_blocks(dsn)[0]
        self.assertEqual(fields["Reporting-MTA"], "dns; relay.example.org")
        self.assertEqual(fields["Arrival-Date"], "Tue, 14 Nov 2023 22:13:20 +0000")
        self.assertEqual(fields["Original-Envelope-Id"], "env-42")

    def test_per_recipient_fields(self):
        _, dsn = self.bounce()
        bob, carol = self.status_blocks(dsn)[1:]
        self.assertEqual(bob["Final-Recipient"], "rfc822; bob@example.net")
        self.assertEqual(bob["Action"], "failed")
        self.assertEqual(bob["Status"], "5.1.1")
        self.assertEqual(bob["Remote-MTA"], "dns; mx1.example.net[192.0.2.1]")
        self.assertEqual(bob["Diagnostic-Code"], "smtp; 550 5.1.1 <bob@example.net>: no such user")
        self.assertEqual(bob["Last-Attempt-Date"], "Tue, 14 Nov 2023 23:13:20 +0000")
        self.assertIsNone(bob["Will-Retry-Until"])
        self.assertEqual(carol["Final-Recipient"], "rfc822; carol@example.net")
        self.assertEqual((carol["Action"], carol["Status"]), ("failed", "4.4.7"))
        self.assertIsNone(carol["Remote-MTA"])      # no server answered: no Remote-MTA
        self.assertIn("delivery time expired", carol["Diagnostic-Code"])

    def test_human_readable_part_names_every_recipient_and_reason(self):
        _, dsn = self.bounce()
        text = self.parts(dsn)[0].get_content()
        self.assertIn("relay.example.org", text)
        self.assertIn("<bob@example.net>: 550 5.1.1", text)
        self.assertIn("<carol@example.net>: 451 4.4.7", text)

    def test_original_headers_are_returned_but_not_the_body(self):
        writer, dsn = self.bounce()
        headers = self.parts(dsn)[2].get_payload(decode=True)
        self.assertEqual(headers.replace(b"\r\n", b"\n"), HEADERS.replace(b"\r\n", b"\n"))
        self.assertNotIn(b"secret body", writer.data)

    def test_dsn_has_crlf_line_ends_only_and_short_lines(self):
        writer, _ = self.bounce()
        data = writer.data
        self.assertEqual(data.count(b"\n"), data.count(b"\r\n"))
        self.assertEqual(data.count(b"\r"), data.count(b"\r\n"))
        self.assertTrue(all(len(line) <= 998 for line in data.split(b"\r\n")))
        self.assertTrue(data.isascii())
        self.assertEqual(writer.envelope.body, "7BIT")

    def test_a_long_remote_reply_stays_readable_in_diagnostic_code(self):
        text = "rejected " + "x" * 200
        _, dsn = self.bounce(results=[RecipientResult("bob@example.net", 554, "5.7.1", text, "mx")])
        self.assertEqual(self.status_blocks(dsn)[1]["Diagnostic-Code"], f"smtp; 554 5.7.1 {text}")

    def test_remote_text_cannot_inject_status_fields(self):
        evil = RecipientResult("bob@example.net", 550, "5.1.1", "no\r\nAction: delivered\r\n\r\nX: y", "mx")
        _, dsn = self.bounce(results=[evil])
        blocks = self.status_blocks(dsn)
        self.assertEqual(len(blocks), 2)
        self.assertEqual(blocks[1].get_all("Action"), ["failed"])

    def test_a_malformed_status_is_replaced_by_the_generic_one_of_its_class(self):
        odd = RecipientResult("bob@example.net", 550, "4.1.1", "class disagrees", "mx")
        _, dsn = self.bounce(results=[odd])
        self.assertEqual(self.status_blocks(dsn)[1]["Status"], "5.0.0")

    def test_non_ascii_original_headers_keep_the_dsn_7bit(self):
        data = "Subject: Grüße\r\nFrom: a@example.org\r\n\r\nbody\r\n".encode("utf-8")
        writer, dsn = self.bounce(original(data=data))
        self.assertTrue(writer.data.isascii())
        self.assertIn("Grüße", self.parts(dsn)[2].get_content())

    def test_no_dsn_about_a_message_from_the_null_sender(self):
        result = self.report("bounce", original(sender=""), BOUNCED)
        self.assertIsNone(result)
        self.assertEqual(self.queue.writers, [])
        self.assertEqual(self.scheduler.enqueued, [])
        self.assertIsNone(self.report("delay", original(sender=""), BOUNCED))
        self.assertEqual(self.queue.writers, [])

    def test_nothing_to_report_writes_nothing(self):
        self.assertIsNone(self.report("bounce", original(), []))
        self.assertEqual(self.queue.writers, [])

    def test_a_failed_commit_fails_the_deferred_and_enqueues_nothing(self):
        self.queue.commit_mode = "fail"
        failure = self.failureResultOf(self.reporter.bounce(original(), BOUNCED), OSError)
        self.assertIn("disk full", str(failure.value))
        self.assertTrue(self.queue.writers[0].aborted)
        self.assertEqual(self.scheduler.enqueued, [])
        self.flushLoggedErrors(OSError)


class DelayTests(ReporterTestCase):
    def test_delay_report_says_delayed_with_the_last_temporary_reply(self):
        pending = [RecipientResult("bob@example.net", 451, "4.4.1", "connection refused", "mx1.example.net")]
        queue_id = self.report("delay", original(), pending)
        writer = self.queue.messages[0]
        dsn = parse(writer.data)
        self.assertEqual(self.scheduler.enqueued, [queue_id])
        self.assertEqual(str(dsn["Subject"]), "Delayed Mail (still being retried)")
        self.assertEqual(writer.envelope.sender, "")
        bob = self.status_blocks(dsn)[1]
        self.assertEqual((bob["Action"], bob["Status"]), ("delayed", "4.4.1"))
        self.assertEqual(bob["Diagnostic-Code"], "smtp; 451 4.4.1 connection refused")
        self.assertEqual(bob["Will-Retry-Until"], "Sun, 19 Nov 2023 22:13:20 +0000")   # arrival + lifetime
        self.assertIn("still trying", self.parts(dsn)[0].get_content())


class ReadHeadersTests(unittest.TestCase):
    def test_stops_at_the_blank_line(self):
        self.assertEqual(read_headers(original()), HEADERS)

    def test_a_message_without_a_body_gives_its_whole_header_block(self):
        self.assertEqual(read_headers(original(data=HEADERS)), HEADERS)

    def test_an_over_long_header_block_is_cut_at_a_line_end_within_the_bound(self):
        line = b"X-Filler: " + b"y" * 70 + b"\r\n"
        data = line * (2 * MAX_HEADER_BYTES // len(line)) + b"\r\nbody\r\n"
        headers = read_headers(original(data=data))
        self.assertLessEqual(len(headers), MAX_HEADER_BYTES)
        self.assertGreater(len(headers), MAX_HEADER_BYTES - len(line))
        self.assertTrue(headers.endswith(b"\r\n"))
        self.assertEqual(headers, line * (len(headers) // len(line)))

    def test_a_message_starting_with_a_blank_line_has_no_headers(self):
        self.assertEqual(read_headers(original(data=b"\r\nbody only\r\n")), b"")


class RealSpoolTests(unittest.TestCase):
    """The DSN goes through the real spool: committed, loadable, and its envelope is right."""

    @defer.inlineCallbacks
    def test_bounce_lands_in_the_spool_from_null_path_to_the_sender(self):
        from mailrelay.spool.store import Spool

        spool = Spool(self.mktemp(), reactor=reactor)
        spool.startService()
        self.addCleanup(spool.stopService)
        writer = spool.new_message(Envelope("alice@example.org", ("bob@example.net",), ARRIVAL))
        writer.write(HEADERS + b"\r\n" + BODY)
        original_id = yield writer.commit()
        scheduler = RecordingScheduler()
        reporter = DSNReporter(spool, "relay.example.org", clock=reactor)
        reporter.scheduler = scheduler
        dsn_id = yield reporter.bounce(spool.load(original_id), BOUNCED[:1])
        self.assertEqual(scheduler.enqueued, [dsn_id])
        spooled = spool.load(dsn_id)
        self.assertEqual((spooled.envelope.sender, spooled.envelope.recipients), ("", ("alice@example.org",)))
        with spooled.open() as f:
            dsn = parse(f.read())
        # Our own report: its From: MAILER-DAEMON@hostname is ours to DKIM-sign (dkim/permission.py).
        self.assertEqual(spooled.envelope.dkim_senders, ("relay.example.org",))
        self.assertTrue(may_sign(spooled.envelope, [dsn["From"].addresses[0].addr_spec]))
        self.assertEqual(dsn.get_content_type(), "multipart/report")
        self.assertIn(b"Subject: quarterly numbers", dsn.get_payload()[2].get_payload(decode=True))


class RequestedReportTests(ReporterTestCase):
    """What the sender's RFC 3461 / RFC 8689 requests change in a report."""

    def test_original_recipient_comes_first(self):
        params = {"RCPT": {"bob@example.net": {"ORCPT": "rfc822;Bob@Example.NET"}}}
        _, dsn = self.bounce(original(params=params))
        bob, carol = self.status_blocks(dsn)[1:]
        self.assertEqual(bob.keys()[:2], ["Original-Recipient", "Final-Recipient"])
        self.assertEqual(bob["Original-Recipient"], "rfc822;Bob@Example.NET")
        self.assertIsNone(carol["Original-Recipient"])

    def test_ret_full_returns_the_message_byte_for_byte(self):
        data = HEADERS + b"\r\n" + BODY + b"caf\xc3\xa9 8-bit\r\n"
        writer, dsn = self.bounce(original(data=data, params={"RET": "FULL"}))
        returned = dsn.get_payload()[2]
        self.assertEqual(returned.get_content_type(), "message/rfc822")
        self.assertEqual(str(returned["Content-Transfer-Encoding"]), "8bit")
        self.assertIn(b"\r\n\r\n" + data, writer.data)
        self.assertEqual(writer.envelope.body, "8BITMIME")
        self.assertIn("Your message is attached.", dsn.get_payload()[0].get_content())

    def test_ret_full_over_the_cap_returns_the_headers(self):
        big = HEADERS + b"\r\n" + (b"x" * 998 + b"\r\n") * (MAX_RETURN_BYTES // 1000 + 1)
        writer, dsn = self.bounce(original(data=big, params={"RET": "FULL"}))
        self.assertEqual(dsn.get_payload()[2].get_content_type(), "text/rfc822-headers")
        self.assertIn(f"larger than {MAX_RETURN_BYTES} bytes", dsn.get_payload()[0].get_content())
        self.assertLess(len(writer.data), 10_000)

    def test_ret_full_applies_to_failures_only(self):
        queue_id = self.report("delay", original(params={"RET": "FULL"}), BOUNCED[1:])
        self.assertTrue(queue_id)
        dsn = parse(self.queue.messages[0].data)
        self.assertEqual(dsn.get_payload()[2].get_content_type(), "text/rfc822-headers")
        self.assertNotIn(BODY, self.queue.messages[0].data)

    def test_requiretls_report_goes_with_requiretls_and_headers_only(self):
        # RFC 8689 5: as if RET=HDRS, whatever RET said; the report itself requires TLS.
        writer, dsn = self.bounce(original(params={"RET": "FULL", "REQUIRETLS": True}))
        self.assertEqual(dsn.get_payload()[2].get_content_type(), "text/rfc822-headers")
        self.assertNotIn(BODY, writer.data)
        self.assertEqual(writer.envelope.params, {"REQUIRETLS": True})

    def test_relayed_report(self):
        delivered = [RecipientResult("bob@example.net", 250, "2.0.0", "queued as X1", "smarthost[192.0.2.9]")]
        queue_id = self.successResultOf(self.reporter.success(original(params={"RET": "FULL"}), delivered,
                                                              "relayed"))
        writer = self.queue.messages[0]
        self.assertEqual(writer.queue_id, queue_id)
        dsn = parse(writer.data)
        self.assertEqual(str(dsn["Subject"]), "Successful Mail Delivery Report")
        bob = self.status_blocks(dsn)[1]
        self.assertEqual((bob["Action"], bob["Status"]), ("relayed", "2.0.0"))
        self.assertEqual(bob["Remote-MTA"], "dns; smarthost[192.0.2.9]")
        self.assertNotIn(BODY, writer.data)                       # RFC 3461 4.3: RET is for failures
        with self.assertRaises(ValueError):
            self.reporter.success(original(), delivered, "failed")
