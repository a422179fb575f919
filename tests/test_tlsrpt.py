"""TLS reports (RFC 8460): the store (counting, the journal, crash safety), the JSON report (section 4),
the reporting policy record (section 3), the file name (5.1) and the mail (5.3).

The store runs on task.Clock for its timers and writes real files; the kill -9 test runs a real Python
process with a real reactor and kills it.
"""
from __future__ import annotations

import email
import email.policy
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from twisted.internet import task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailrelay.outbound import tlsrpt_report as rpt
from mailrelay.outbound import tlsrpt_store as st
from mailrelay.interfaces import ITLSReportSink

ROOT = Path(__file__).resolve().parents[1]
NOON = 1_796_169_600 + 12 * 3600          # 2026-12-02T12:00:00Z
RESULT_TYPES = {"starttls-not-supported", "certificate-host-mismatch", "certificate-expired", "tlsa-invalid",
                "dnssec-invalid", "dane-required", "certificate-not-trusted", "sts-policy-invalid",
                "sts-webpki-invalid", "validation-failure", "sts-policy-fetch-error"}   # IANA registry
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")


def clock_at(when: float = NOON) -> task.Clock:
    clock = task.Clock()
    clock.advance(when)
    return clock


class StoreTests(unittest.TestCase):
    def setUp(self):
        self.directory = Path(self.mktemp()).absolute()
        self.clock = clock_at()
        self.store = st.TLSReportStore(self.directory, clock=self.clock)

    def journal(self) -> Path:
        return self.directory / "journal" / "2026-12-02.jsonl"

    def gathered(self, include_today: bool = True) -> dict:
        batches = st.take(self.directory, self.clock.seconds(), include_today)
        merged: dict = {}
        for batch in batches:
            for tallies in st.read_batch(batch).values():
                for key, tally in tallies.items():
                    merged.setdefault(key, st.Tally()).merge(tally)
        return merged

    def test_provides_the_sink_interface(self):
        verifyObject(ITLSReportSink, self.store)

    def test_record_only_counts_in_memory_and_the_journal_is_written_a_moment_later(self):
        for _ in range(50):
            self.store.record("example.org", "no-policy-found", (), "mx.example.org", None, True, {})
        self.assertFalse(self.journal().exists())
        self.clock.advance(st.FLUSH_DELAY)
        lines = self.journal().read_bytes().splitlines()
        self.assertEqual(len(lines), 1)                          # one append for the fifty sessions

    def test_counts_per_policy_and_failure_details(self):
        record = self.store.record
        record("Example.ORG", "no-policy-found", (), "MX1.example.org.", None, True, {})
        record("example.org", "no-policy-found", (), "mx1.example.org", "starttls-not-supported", False,
               {"receiving-ip": "192.0.2.1", "receiving-mx-helo": "mx1", "unknown-key": "dropped"})
        record("example.org", "no-policy-found", (), "mx1.example.org", "starttls-not-supported", False,
               {"receiving-ip": "192.0.2.1", "receiving-mx-helo": "mx1"})
        record("example.org", "sts", ("version: STSv1", "mode: enforce", "mx: *.example.org"), "mx2.example.org",
               "certificate-expired", False, {})
        self.clock.advance(st.FLUSH_DELAY)
        got = self.gathered()
        plain = got[("example.org", "no-policy-found", (), "mx1.example.org")]
        self.assertEqual((plain.successes, plain.failures), (1, 2))
        self.assertEqual(plain.details, {("starttls-not-supported", "mx1.example.org", "", "192.0.2.1", "mx1", "",
                                          ""): 2})
        sts = got[("example.org", "sts", ("version: STSv1", "mode: enforce", "mx: *.example.org"), "")]
        self.assertEqual((sts.successes, sts.failures), (0, 1))

    def test_failure_details_are_bounded(self):
        for n in range(st.MAX_DETAILS + 50):
            self.store.record("example.org", "no-policy-found", (), "mx.example.org", "validation-failure", False,
                              {"receiving-ip": f"10.0.{n // 256}.{n % 256}"})
        self.clock.advance(st.FLUSH_DELAY)
        (tally,) = self.gathered().values()
        self.assertEqual(tally.failures, st.MAX_DETAILS + 50)
        self.assertEqual(len(tally.details), st.MAX_DETAILS + 1)
        self.assertEqual(tally.details[("validation-failure",) + ("",) * 6], 50)
        self.assertEqual(sum(tally.details.values()), st.MAX_DETAILS + 50)

    def test_bad_policy_type_is_refused(self):
        self.assertRaises(ValueError, self.store.record, "example.org", "dmarc", (), "mx", None, True, {})

    def test_fsync_at_most_once_per_sync_interval(self):
        synced = []
        real = os.fsync
        self.patch(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
        for _ in range(20):                                     # 20 seconds of deliveries
            self.store.record("example.org", "no-policy-found", (), "mx", None, True, {})
            self.clock.advance(st.FLUSH_DELAY)
        self.assertEqual(len(self.journal().read_bytes().splitlines()), 20)
        self.assertEqual(synced, [])
        self.clock.advance(st.SYNC_INTERVAL)
        self.store.record("example.org", "no-policy-found", (), "mx", None, True, {})
        self.clock.advance(st.FLUSH_DELAY)
        self.assertEqual(len(synced), 1)

    def test_close_flushes_and_syncs(self):
        self.store.record("example.org", "no-policy-found", (), "mx", None, True, {})
        self.store.close()
        (tally,) = self.gathered().values()
        self.assertEqual(tally.successes, 1)

    def test_a_torn_last_line_is_skipped_and_the_lines_before_count(self):
        self.store.record("example.org", "no-policy-found", (), "mx", None, True, {})
        self.clock.advance(st.FLUSH_DELAY)
        whole = self.journal().read_bytes()
        with open(self.journal(), "ab") as f:
            f.write(whole[:len(whole) // 2])                    # a write cut short by a crash
        (tally,) = self.gathered().values()
        self.assertEqual(tally.successes, 1)

    def test_a_damaged_line_is_skipped(self):
        for _ in range(2):
            self.store.record("example.org", "no-policy-found", (), "mx", None, True, {})
            self.clock.advance(st.FLUSH_DELAY)
        lines = self.journal().read_bytes().splitlines(keepends=True)
        self.journal().write_bytes(lines[0] + b"\x00" * 40 + b"\n" + lines[1])   # zero-filled after power loss
        (tally,) = self.gathered().values()
        self.assertEqual(tally.successes, 2)

    def test_take_leaves_today_for_the_daily_run(self):
        self.store.record("example.org", "no-policy-found", (), "mx", None, True, {})
        self.clock.advance(st.FLUSH_DELAY)
        self.assertEqual(st.take(self.directory, self.clock.seconds(), include_today=False), [])
        self.clock.advance(86400)                              # the next day
        (batch,) = st.take(self.directory, self.clock.seconds(), include_today=False)
        self.assertEqual((batch.day, batch.begin, batch.end), ("2026-12-02", NOON - 12 * 3600, NOON + 12 * 3600))

    def test_a_report_now_starts_the_next_period(self):
        self.store.record("example.org", "no-policy-found", (), "mx", None, True, {})
        self.clock.advance(st.FLUSH_DELAY)
        (first,) = st.take(self.directory, self.clock.seconds(), include_today=True)
        self.assertEqual((first.begin, first.end), (NOON - 12 * 3600, NOON + 1))
        st.finish(first)
        self.store.record("example.org", "no-policy-found", (), "mx", "validation-failure", False, {})
        self.clock.advance(st.FLUSH_DELAY)
        self.clock.advance(86400)
        (second,) = st.take(self.directory, self.clock.seconds(), include_today=False)
        self.assertEqual((second.begin, second.end), (NOON + 1, NOON + 12 * 3600))
        ((_, tally),) = st.read_batch(second)["example.org"].items()
        self.assertEqual((tally.successes, tally.failures), (0, 1))

    def test_appends_after_a_take_go_to_the_next_period_none_lost_none_twice(self):
        self.store.record("example.org", "no-policy-found", (), "mx", None, True, {})
        self.clock.advance(st.FLUSH_DELAY)
        (first,) = st.take(self.directory, self.clock.seconds(), include_today=True)
        self.store.record("example.org", "no-policy-found", (), "mx", None, True, {})
        self.clock.advance(st.FLUSH_DELAY)
        batches = st.take(self.directory, self.clock.seconds(), include_today=True)
        self.assertEqual(len(batches), 2)                      # the first, not finished, is offered again
        counts = [tally.successes for b in batches for t in st.read_batch(b).values() for tally in t.values()]
        self.assertEqual(counts, [1, 1])

    def test_done_domains_are_remembered_until_the_batch_is_finished(self):
        self.store.record("a.example", "no-policy-found", (), "mx", None, True, {})
        self.clock.advance(st.FLUSH_DELAY)
        (batch,) = st.take(self.directory, self.clock.seconds(), include_today=True)
        st.mark_done(batch, "a.example")
        self.assertEqual(st.done_domains(batch), {"a.example"})
        st.finish(batch)
        self.assertEqual(st.batches(self.directory), [])
        self.assertFalse(batch.done_path.exists())

    def test_one_report_run_at_a_time(self):
        with st.report_lock(self.directory) as first:
            self.assertTrue(first)
            script = ("import sys; from pathlib import Path; from mailrelay.outbound.tlsrpt_store import report_lock\n"
                      f"with report_lock(Path({str(self.directory)!r})) as got: sys.exit(0 if got else 3)\n")
            other = subprocess.run([sys.executable, "-c", script], cwd=ROOT)
            self.assertEqual(other.returncode, 3)
        with st.report_lock(self.directory) as again:
            self.assertTrue(again)

    def test_kill_9_loses_at_most_the_counts_not_yet_flushed(self):
        """A real process with a real reactor: 30 sessions flushed, then 7 more, then SIGKILL."""
        script = textwrap.dedent(f"""
            import os, signal
            from twisted.internet import reactor
            from mailrelay.outbound.tlsrpt_store import TLSReportStore, FLUSH_DELAY
            store = TLSReportStore({str(self.directory)!r}, clock=reactor)
            for _ in range(30):
                store.record("example.org", "no-policy-found", (), "mx", None, True, {{}})
            def more():
                for _ in range(7):
                    store.record("example.org", "no-policy-found", (), "mx", "validation-failure", False, {{}})
                os.kill(os.getpid(), signal.SIGKILL)
            reactor.callLater(FLUSH_DELAY + 0.5, more)
            reactor.run()
        """)
        child = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=60)
        self.assertEqual(child.returncode, -signal.SIGKILL)
        batches = st.take(self.directory, time.time(), include_today=True)
        tallies = [t for b in batches for d in st.read_batch(b).values() for t in d.values()]
        self.assertEqual([(t.successes, t.failures) for t in tallies], [(30, 0)])


class ReportTests(unittest.TestCase):
    def tallies(self) -> dict:
        plain = st.Tally(successes=5, failures=2)
        plain.add_failure(("starttls-not-supported", "mx1.example.org", "192.0.2.9", "192.0.2.1", "mx1", "",
                           "STARTTLS not offered"), 2)
        sts = st.Tally(successes=3, failures=1)
        sts.add_failure(("certificate-expired", "mx2.example.org", "", "", "", "", ""), 1)
        return {("example.org", "no-policy-found", (), "mx1.example.org"): plain,
                ("example.org", "sts", ("version: STSv1", "mode: enforce", "mx: *.example.org", "max_age: 86400"),
                 ""): sts}

    def report(self) -> dict:
        begin = NOON - 12 * 3600
        return rpt.build_report("relay.example.net", "example.org", begin, begin + 86400, self.tallies(),
                                rpt.new_report_id(begin, "example.org", "relay.example.net"))

    def test_json_fields_are_those_of_rfc_8460_section_4(self):
        report = json.loads(json.dumps(self.report()))
        self.assertEqual(set(report), {"organization-name", "date-range", "contact-info", "report-id", "policies"})
        self.assertEqual(report["organization-name"], "relay.example.net")
        self.assertEqual(report["contact-info"], "postmaster@relay.example.net")
        self.assertEqual(report["date-range"], {"start-datetime": "2026-12-02T00:00:00Z",
                                                "end-datetime": "2026-12-02T23:59:59Z"})
        for value in report["date-range"].values():
            self.assertRegex(value, RFC3339_UTC)
        self.assertRegex(report["report-id"], r"^20261202\.[0-9a-f]{12}\.example\.org@relay\.example\.net$")
        for entry in report["policies"]:
            self.assertEqual(set(entry) - {"failure-details"}, {"policy", "summary"})
            policy = entry["policy"]
            self.assertIn(policy["policy-type"], ("sts", "tlsa", "no-policy-found"))
            self.assertIsInstance(policy["policy-string"], list)
            self.assertEqual(policy["policy-domain"], "example.org")
            self.assertIsInstance(policy["mx-host"], list)
            summary = entry["summary"]
            self.assertEqual(set(summary), {"total-successful-session-count", "total-failure-session-count"})
            self.assertTrue(all(isinstance(v, int) for v in summary.values()))
            details = entry.get("failure-details", [])
            self.assertEqual(sum(d["failed-session-count"] for d in details), summary["total-failure-session-count"])
            for detail in details:
                self.assertIn(detail["result-type"], RESULT_TYPES)
                self.assertLessEqual(set(detail), {"result-type", "sending-mta-ip", "receiving-mx-hostname",
                                                   "receiving-mx-helo", "receiving-ip", "failed-session-count",
                                                   "additional-information", "failure-reason-code"})

    def test_policies_carry_their_counts_and_mx_hosts(self):
        by_type = {p["policy"]["policy-type"]: p for p in self.report()["policies"]}
        plain, sts = by_type["no-policy-found"], by_type["sts"]
        self.assertEqual(plain["policy"]["mx-host"], ["mx1.example.org"])
        self.assertEqual(plain["summary"], {"total-successful-session-count": 5, "total-failure-session-count": 2})
        self.assertEqual(plain["failure-details"], [{
            "result-type": "starttls-not-supported", "receiving-mx-hostname": "mx1.example.org",
            "sending-mta-ip": "192.0.2.9", "receiving-ip": "192.0.2.1", "receiving-mx-helo": "mx1",
            "failure-reason-code": "STARTTLS not offered", "failed-session-count": 2}])
        self.assertEqual(sts["policy"]["policy-string"][0], "version: STSv1")
        self.assertEqual(sts["policy"]["mx-host"], ["*.example.org"])      # the policy's own mx patterns

    def test_filename_follows_section_5_1(self):
        name = rpt.report_filename("relay.example.net", "example.org", NOON, NOON + 86400, "ab/c+9=")
        self.assertEqual(name, f"relay.example.net!example.org!{NOON}!{NOON + 86399}!ab/c+9=.json.gz")
        self.assertRegex(rpt.report_filename("h", "d", 0, 10, "!!"), r"^h!d!0!9![A-Za-z0-9+/=]+\.json\.gz$")

    def test_gzip_holds_the_json(self):
        report = self.report()
        self.assertEqual(json.loads(gzip.decompress(rpt.report_bytes(report))), report)

    def test_mail_is_a_multipart_report_with_the_gzipped_report(self):
        report = self.report()
        gz = rpt.report_bytes(report)
        name = rpt.report_filename("relay.example.net", "example.org", NOON, NOON + 86400, "u1")
        data = rpt.build_message("relay.example.net", "example.org", ["tlsrpt@example.org"], report, gz, name, NOON)
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))      # CRLF line ends only
        message = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "tlsrpt")
        self.assertEqual(message["From"], "postmaster@relay.example.net")
        self.assertEqual(message["To"], "tlsrpt@example.org")
        self.assertEqual(message["Subject"], f"Report Domain: example.org Submitter: relay.example.net "
                                             f"Report-ID: <{report['report-id']}>")
        self.assertEqual(message["TLS-Report-Domain"], "example.org")
        self.assertEqual(message["TLS-Report-Submitter"], "relay.example.net")
        self.assertEqual(message["TLS-Required"], "No")
        text, attachment = message.iter_parts()
        self.assertEqual(text.get_content_type(), "text/plain")
        self.assertEqual(attachment.get_content_type(), "application/tlsrpt+gzip")
        self.assertEqual(attachment.get_filename(), name)
        self.assertEqual(json.loads(gzip.decompress(attachment.get_content())), report)


class RecordTests(unittest.TestCase):
    def test_a_valid_record(self):
        self.assertEqual(rpt.parse_record(["v=TLSRPTv1; rua=mailto:tlsrpt@example.org,https://r.example/v1"]),
                         ["mailto:tlsrpt@example.org", "https://r.example/v1"])

    def test_other_records_are_discarded(self):
        self.assertEqual(rpt.parse_record(["v=spf1 -all", "v=TLSRPTv1;rua=mailto:a@example.org"]),
                         ["mailto:a@example.org"])

    def test_two_policies_or_none_mean_no_policy(self):
        self.assertIsNone(rpt.parse_record(["v=TLSRPTv1; rua=mailto:a@x.example",
                                            "v=TLSRPTv1; rua=mailto:b@x.example"]))
        self.assertIsNone(rpt.parse_record([]))
        self.assertIsNone(rpt.parse_record(["v=TLSRPTv2; rua=mailto:a@x.example"]))
        self.assertIsNone(rpt.parse_record(["v=TLSRPTv1"]))

    def test_unknown_schemes_and_bad_addresses_are_ignored(self):
        self.assertEqual(rpt.parse_record(["v=TLSRPTv1; rua=ftp://x.example/, mailto:not-an-address, "
                                           "mailto:ok%40x.example"]), ["mailto:ok%40x.example"])
        self.assertEqual(rpt.mailto_address("mailto:ok%40x.example?subject=hi"), "ok@x.example")
        self.assertIsNone(rpt.parse_record(["v=TLSRPTv1; rua=ftp://x.example/"]))


class FakeSender:
    def __init__(self):
        self.runs = []

    def run(self, include_today):
        from twisted.internet import defer
        self.runs.append(include_today)
        return defer.succeed([])


class ServiceScheduleTests(unittest.TestCase):
    def test_first_run_after_start_then_daily_shortly_after_midnight_utc(self):
        from mailrelay.outbound import tlsrpt_send
        clock = clock_at(NOON)
        store = st.TLSReportStore(Path(self.mktemp()).absolute(), clock=clock)
        sender = FakeSender()
        service = tlsrpt_send.TLSReportService(store, sender, clock)
        service.sender.outbox = tlsrpt_send.Outbox(store.directory, None, clock)
        service.startService()
        low, high = tlsrpt_send.RUN_AFTER_START
        clock.advance(low - 1)
        self.assertEqual(sender.runs, [])
        clock.advance(high - low + 1)
        self.assertEqual(sender.runs, [False])              # days gathered before a stop are sent
        (call,) = [c for c in clock.getDelayedCalls() if c.func == service._daily]
        midnight = NOON + 12 * 3600
        self.assertTrue(midnight + 60 <= call.getTime() <= midnight + tlsrpt_send.JITTER, call.getTime() - midnight)
        clock.advance(call.getTime() - clock.seconds())
        self.assertEqual(sender.runs, [False, False])       # the day just ended, never today
        (call,) = [c for c in clock.getDelayedCalls() if c.func == service._daily]
        self.assertTrue(midnight + 86400 + 60 <= call.getTime() <= midnight + 86400 + tlsrpt_send.JITTER)

    def test_stop_flushes_the_store_and_cancels_the_timers(self):
        from mailrelay.outbound import tlsrpt_send
        clock = clock_at(NOON)
        store = st.TLSReportStore(Path(self.mktemp()).absolute(), clock=clock)
        service = tlsrpt_send.TLSReportService(store, FakeSender(), clock)
        service.startService()
        store.record("example.org", "no-policy-found", (), "mx", None, True, {})
        service.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
        (tally,) = [t for b in st.take(store.directory, clock.seconds(), True)
                    for d in st.read_batch(b).values() for t in d.values()]
        self.assertEqual(tally.successes, 1)
