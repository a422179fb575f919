"""TLS reports end to end: the relay delivers to real exchangers with and without STARTTLS, counts the
sessions, and `mailrelay tlsrpt send` (a real subprocess against the real config) sends the reports —
by mail through the relay's own queue to a reporting address's exchanger, and by HTTPS POST to a real
HTTPS server on loopback (a certificate from a test CA, trusted through SSL_CERT_FILE).

Loopback hosts: 127.0.0.1 DNS (tests/support/dnsserver.py) and the HTTPS receiver; 127.0.0.2 the
exchanger of plain.example (no STARTTLS); 127.0.0.3 that of tls.example (STARTTLS); 127.0.0.4 that of
reports.example, where the mail reports arrive.  All three sinks share one port ([delivery] mx_port).
"""
from __future__ import annotations

import email
import email.policy
import gzip
import json
import os
import sys
from pathlib import Path

import dkim
from twisted.internet import defer, reactor, threads, utils
from twisted.internet.error import CannotListenError
from twisted.trial import unittest

from mailrelay.outbound.tlsrpt_send import TLSReportService
from mailrelay.outbound.tlsrpt_store import decode_lines
from mailrelay.dkim import keys
from tests.support.dnsserver import DNSServer
from tests.support.pki import TestCA
from tests.support.polling import until
from tests.support.relay import SEPARATE, RelayFixture
from tests.support.reportserver import ReportReceiver
from tests.support.sink import Sink

ROOT = Path(__file__).resolve().parents[1]
KEY = keys.generate("ed25519")
MESSAGE = b"From: app@example.org\r\nTo: someone\r\nSubject: tls report test\r\n\r\nhello\r\n"


def report_of(transaction) -> tuple[email.message.EmailMessage, dict]:
    """The mail report a sink received, parsed, and the JSON report inside its gzipped attachment."""
    message = email.message_from_bytes(transaction.data, policy=email.policy.default)
    parts = list(message.iter_parts())
    attachment = [p for p in parts if p.get_content_type() == "application/tlsrpt+gzip"][0]
    return message, json.loads(gzip.decompress(attachment.get_content()))


def opened_for(session, domain: str) -> bool:
    """Whether the connection was made for `domain`'s exchanger: its first recipient is of that domain."""
    rcpts = [line for _, line in session.commands if line[:8].upper() == b"RCPT TO:"]
    return bool(rcpts) and rcpts[0].split(b">")[0].lower().endswith(b"@" + domain.encode())


class TLSReportEndToEndTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.ca = TestCA()
        self.receiver = ReportReceiver(self.ca)
        self.receiver.start(reactor)
        self.addCleanup(self.receiver.stop)
        self.plain = Sink(hostname="mx.plain.example")
        self.tls = Sink(hostname="mx.tls.example")
        self.reports = Sink(hostname="mx.reports.example")
        self.mx_port = self.listen()
        self.dns = DNSServer({
            ("plain.example", "MX"): ["10 mx.plain.example."], ("mx.plain.example", "A"): ["127.0.0.2"],
            ("tls.example", "MX"): ["10 mx.tls.example."], ("mx.tls.example", "A"): ["127.0.0.3"],
            ("quiet.example", "MX"): ["10 mx.quiet.example."], ("mx.quiet.example", "A"): ["127.0.0.2"],
            ("reports.example", "MX"): ["10 mx.reports.example."], ("mx.reports.example", "A"): ["127.0.0.4"],
            ("_smtp._tls.plain.example", "TXT"): ["v=TLSRPTv1; rua=mailto:tlsrpt@reports.example"],
            ("_smtp._tls.tls.example", "TXT"): [f"v=TLSRPTv1; rua=mailto:tlsrpt@reports.example,{self.receiver.url}"],
            ("ed._domainkey.relay.test", "TXT"): [keys.txt_record(KEY)],
        })
        self.dns_port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.ca_file = self.ca.write(Path(self.mktemp()).absolute())

    def listen(self) -> int:
        """The three sinks on one port: the tls one with STARTTLS."""
        for _ in range(10):
            port = self.tls.start(reactor, interface="127.0.0.3", tls_options=self.ca.server_options("mx.tls.example"))
            try:
                self.plain.start(reactor, port=port, interface="127.0.0.2")
                self.reports.start(reactor, port=port, interface="127.0.0.4")
            except CannotListenError:
                for sink in (self.tls, self.plain, self.reports):
                    sink.stop()
                continue
            for sink in (self.tls, self.plain, self.reports):
                self.addCleanup(sink.stop)
            return port
        raise CannotListenError("127.0.0.2", 0, "no common port")

    def relay(self, separate: bool = False, delivery: str = "") -> RelayFixture:
        relay = RelayFixture(self.mktemp(), process=SEPARATE) if separate else RelayFixture(self.mktemp())
        (relay.dir / "ed.pem").write_bytes(keys.private_pem(KEY))
        relay.path.write_text(relay.path.read_text() + (
            f'[delivery]\nmx_port = {self.mx_port}\nnameservers = ["127.0.0.1:{self.dns_port}"]\n{delivery}\n'
            '[dkim]\nmode = "sign"\n[[dkim.key]]\ndomain = "relay.test"\nselector = "ed"\nkey_file = "ed.pem"\n'))
        return relay

    @defer.inlineCallbacks
    def deliver(self, relay: RelayFixture):
        """Two messages to plain.example, one to tls.example, one to quiet.example (no TLSRPT policy)."""
        for rcpt in ("a@plain.example", "b@plain.example", "c@tls.example", "d@quiet.example"):
            code, _ = yield relay.submit("relay", "app@example.org", [rcpt], MESSAGE)
            self.assertEqual(code, 250)
        yield self.plain.wait_for(3)
        yield self.tls.wait_for(1)

    @defer.inlineCallbacks
    def counted(self, relay: RelayFixture):
        """Wait until the relay's journal (in the spool) holds a count for every session the exchangers
        saw: it is appended within a second of each session's end, in whichever process delivers."""
        journal = relay.dir / "spool" / "tlsrpt" / "journal"
        expected = len(self.plain.sessions) + len(self.tls.sessions)

        def sessions() -> int:
            tallies: dict = {}
            for path in journal.iterdir() if journal.is_dir() else ():
                decode_lines(path.read_bytes(), tallies)
            return sum(t.successes + t.failures for t in tallies.values())
        yield until(lambda: sessions() >= expected, f"the journal to count {expected} sessions", interval=0.1)

    def send_reports(self, relay: RelayFixture) -> defer.Deferred:
        """`mailrelay tlsrpt send --config tap.conf` as a subprocess: (stdout, stderr, exit status)."""
        env = dict(os.environ, PYTHONPATH=str(ROOT), SSL_CERT_FILE=str(self.ca_file))
        return utils.getProcessOutputAndValue(
            sys.executable, ["-m", "mailrelay.cli.main", "tlsrpt", "send", "--config", str(relay.path)],
            env=env, path=str(relay.dir))

    def check_mail_reports(self, transactions):
        by_domain = {}
        for transaction in transactions:
            self.assertEqual(transaction.mail_from, "")               # sent from <>
            self.assertEqual(transaction.rcpt_tos, ["tlsrpt@reports.example"])
            message, report = report_of(transaction)
            self.assertEqual(message.get_content_type(), "multipart/report")
            self.assertEqual(message.get_param("report-type"), "tlsrpt")
            self.assertEqual(message["From"], "postmaster@relay.test")
            self.assertEqual(message["TLS-Report-Submitter"], "relay.test")
            self.assertIn(f"Report-ID: <{report['report-id']}>", message["Subject"])
            signature = message["DKIM-Signature"]
            self.assertIn("d=relay.test", signature)
            self.assertIn("tls-report-domain", signature.lower())
            checker = dkim.DKIM(transaction.data[transaction.data.index(b"DKIM-Signature"):])
            self.assertTrue(checker.verify(dnsfunc=lambda name, timeout=5: keys.txt_record(KEY).encode()))
            by_domain[message["TLS-Report-Domain"]] = report
        self.assertEqual(set(by_domain), {"plain.example", "tls.example"})   # quiet.example asks for none
        plain = by_domain["plain.example"]["policies"]
        self.assertEqual([p["policy"] for p in plain], [{"policy-type": "no-policy-found", "policy-string": [],
                                                        "policy-domain": "plain.example",
                                                        "mx-host": ["mx.plain.example"]}])
        # quiet.example's exchanger has another name on the same address: a session opened for it is not
        # counted here, and its message may as well ride on a connection opened for plain.example.
        plain_sessions = sum(opened_for(session, "plain.example") for session in self.plain.sessions)
        self.assertEqual(plain[0]["summary"], {"total-successful-session-count": 0,
                                               "total-failure-session-count": plain_sessions})
        (detail,) = plain[0]["failure-details"]
        self.assertEqual((detail["result-type"], detail["receiving-ip"], detail["receiving-mx-hostname"],
                          detail["failed-session-count"]),
                         ("starttls-not-supported", "127.0.0.2", "mx.plain.example", plain_sessions))
        (tls,) = by_domain["tls.example"]["policies"]
        self.assertEqual(tls["summary"], {"total-successful-session-count": len(self.tls.sessions),
                                          "total-failure-session-count": 0})
        self.assertNotIn("failure-details", tls)
        return by_domain

    @defer.inlineCallbacks
    def test_cli_sends_mail_and_https_reports_beside_a_running_relay(self):
        relay = self.relay()
        relay.start(reactor)
        self.addCleanup(relay.stop)
        yield self.deliver(relay)
        yield self.counted(relay)
        out, err, status = yield self.send_reports(relay)
        self.assertEqual(status, 0, (out, err))
        lines = out.decode().splitlines()
        self.assertEqual(len(lines), 3, lines)                     # two mail reports, one POST
        self.assertEqual(sum(" mail to tlsrpt@reports.example queued as " in line for line in lines), 2, lines)
        self.assertTrue(any(f"POST to {self.receiver.url}: HTTP 201" in line for line in lines), lines)
        arrived = yield self.reports.wait_for(2)                   # the relay took the flush requests
        by_domain = self.check_mail_reports(arrived)
        (post,) = self.receiver.posts
        self.assertEqual(post.content_type, "application/tlsrpt+gzip")
        self.assertEqual(post.path, "/tlsrpt")
        posted = json.loads(gzip.decompress(post.body))
        self.assertEqual(posted["policies"], by_domain["tls.example"]["policies"])
        self.assertEqual(posted["organization-name"], "relay.test")
        again, err, status = yield self.send_reports(relay)         # nothing gathered since
        self.assertEqual((again.decode().strip(), status), ("no TLS reports due", 0), err)

    @defer.inlineCallbacks
    def test_with_the_relay_stopped_the_reports_wait_in_the_spool_for_its_start(self):
        relay = self.relay()
        relay.start(reactor)
        yield self.deliver(relay)
        yield self.counted(relay)
        yield relay.stop()
        out, err, status = yield self.send_reports(relay)
        self.assertEqual(status, 0, (out, err))
        self.assertEqual(len(out.decode().splitlines()), 3, out)
        self.assertEqual(len(list((relay.dir / "spool" / "queue").iterdir())), 2)
        self.assertEqual(list((relay.dir / "spool" / "control").iterdir()), [])   # nobody to tell
        self.assertEqual(self.reports.messages, [])
        relay.start(reactor)
        self.addCleanup(relay.stop)
        arrived = yield self.reports.wait_for(2)
        self.check_mail_reports(arrived)

    @defer.inlineCallbacks
    def test_a_failed_post_is_kept_and_retried_by_the_relay(self):
        relay = self.relay()
        relay.start(reactor)
        self.addCleanup(relay.stop)
        yield self.deliver(relay)
        yield self.counted(relay)
        self.receiver.mode = "500"
        out, err, status = yield self.send_reports(relay)
        self.assertEqual(status, 1, (out, err))
        self.assertIn("HTTP 500); kept for retry", out.decode())
        outbox = relay.dir / "spool" / "tlsrpt" / "outbox"
        (kept,) = list(outbox.iterdir())
        meta, _, body = kept.read_bytes().partition(b"\n")
        self.assertEqual(json.loads(meta)["url"], self.receiver.url)
        kept.write_bytes(json.dumps(dict(json.loads(meta), next=0)).encode() + b"\n" + body)   # its time came
        self.receiver.mode = "ok"
        # The relay's https reports trust the system's store; OpenSSL reads SSL_CERT_FILE for it.
        os.environ["SSL_CERT_FILE"] = str(self.ca_file)             # (putenv: OpenSSL reads the C environment)
        self.addCleanup(os.environ.pop, "SSL_CERT_FILE", None)
        (service,) = [s for s in relay.service if isinstance(s, TLSReportService)]
        yield service.sender.outbox.retry_due()
        self.assertEqual([p.body for p in self.receiver.accepted], [body])
        self.assertEqual(list(outbox.iterdir()), [])

    @defer.inlineCallbacks
    def test_the_daily_run_reports_the_day_just_ended(self):
        relay = self.relay()
        relay.start(reactor)
        self.addCleanup(relay.stop)
        yield self.deliver(relay)
        yield self.counted(relay)
        journal = relay.service.tls_reports.directory / "journal"
        (today,) = list(journal.iterdir())
        today.rename(journal / "2026-01-15.jsonl")               # as if it had all happened that day
        (service,) = [s for s in relay.service if isinstance(s, TLSReportService)]
        lines = yield service.run(include_today=False)
        self.assertEqual(len(lines), 3, lines)
        arrived = yield self.reports.wait_for(2)
        by_domain = self.check_mail_reports(arrived)
        for report in by_domain.values():
            self.assertEqual(report["date-range"], {"start-datetime": "2026-01-15T00:00:00Z",
                                                    "end-datetime": "2026-01-15T23:59:59Z"})

    @defer.inlineCallbacks
    def test_tls_reports_off_records_and_sends_nothing(self):
        relay = self.relay(delivery="tls_reports = false\n")
        relay.start(reactor)
        self.addCleanup(relay.stop)
        yield self.deliver(relay)
        self.assertIsNone(relay.service.tls_reports)
        self.assertEqual([s for s in relay.service if isinstance(s, TLSReportService)], [])
        out, err, status = yield self.send_reports(relay)
        self.assertEqual(status, 1)
        self.assertIn(b"tls_reports is false", err)
        self.assertFalse((relay.dir / "spool" / "tlsrpt").exists())

    @defer.inlineCallbacks
    def test_through_twistd_with_the_delivery_process(self):
        relay = self.relay(separate=True)
        yield threads.deferToThread(relay.spawn)
        self.addCleanup(relay.kill)      # SIGKILL: a report still on its way must not hold the cleanup
        yield self.deliver(relay)
        yield self.counted(relay)                               # counted in the delivery process
        out, err, status = yield self.send_reports(relay)
        self.assertEqual(status, 0, (out, err))
        arrived = yield self.reports.wait_for(2)
        self.check_mail_reports(arrived)
        yield self.receiver.wait_for(1)
