"""The whole relay over real sockets: a real client (smtplib) submits on 587/465/25, the relay built by
`make_service` spools and delivers to a real SMTP sink acting as smarthost."""
from __future__ import annotations

import email
import smtplib

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.support.polling import eventually
from tests.support.relay import SEPARATE, RelayFixture
from tests.support.sink import Sink
from tests.support.messages import strip_received

MESSAGE = (b"From: App <app@example.org>\r\nTo: <user@example.com>\r\nSubject: hello\r\n"
           b"Message-ID: <1@example.org>\r\n\r\nbody line\r\n..leading dot stays one dot\r\n"
           b"\xc3\xa9 8-bit\r\n")


class EndToEnd(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)

    def start_relay(self, extra: str = "", **kwargs) -> RelayFixture:
        extra = (f'[transports.sink]\nhost = "127.0.0.1"\nport = {self.sink_port}\nsecurity = "none"\n\n'
                 f'[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n[queue]\nfirst_retry = "1s"\n'
                 + extra)
        kwargs.setdefault("process", SEPARATE)        # the default mode: a delivery process
        relay = RelayFixture(self.mktemp(), extra=extra, **kwargs)
        relay.start(reactor)
        self.addCleanup(relay.stop)
        return relay

    @defer.inlineCallbacks
    def test_submission_with_starttls_and_auth_arrives_byte_exact(self):
        relay = self.start_relay()
        code, text = yield relay.submit("submission", "app@example.org", ["user@example.com"], MESSAGE,
                                        user="app1")
        self.assertEqual(code, 250)
        self.assertIn(b"2.0.0", text)
        yield self.sink.wait_for(1)
        arrived = self.sink.messages[0]
        self.assertEqual(strip_received(arrived.data), MESSAGE)
        self.assertEqual((arrived.mail_from, arrived.rcpt_tos), ("app@example.org", ["user@example.com"]))
        received = arrived.data.split(b"\r\n\r\n", 1)[0]
        self.assertIn(b"ESMTPSA", received)
        self.assertNotIn(b"app1", received)            # [auth] received_shows_user = false
        self.assertNotIn(b"correct horse", arrived.data)

    @defer.inlineCallbacks
    def test_implicit_tls_on_465(self):
        relay = self.start_relay()
        code, _ = yield relay.submit("submissions", "app@example.org", ["a@example.com", "b@example.net"],
                                     MESSAGE, user="app1")
        self.assertEqual(code, 250)
        yield self.sink.wait_for(1)
        self.assertEqual(sorted(self.sink.messages[0].rcpt_tos), ["a@example.com", "b@example.net"])
        self.assertEqual(strip_received(self.sink.messages[0].data), MESSAGE)

    @defer.inlineCallbacks
    def test_allowlisted_network_relays_without_auth_and_others_do_not(self):
        relay = self.start_relay()
        code, _ = yield relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        failure = yield self.assertFailure(
            relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE, source="127.0.0.3"),
            smtplib.SMTPRecipientsRefused,
        )
        (code, text), = failure.recipients.values()
        self.assertEqual(code, 550)
        self.assertIn(b"5.7.1", text)
        yield self.sink.wait_for(1)
        self.assertEqual(len(self.sink.messages), 1)

    @defer.inlineCallbacks
    def test_user_cannot_send_as_another_domain(self):
        relay = self.start_relay()
        failure = yield self.assertFailure(
            relay.submit("submission", "ceo@other.example", ["user@example.com"], MESSAGE, user="app1"),
            smtplib.SMTPSenderRefused,
        )
        self.assertEqual(failure.smtp_code, 553)

    @defer.inlineCallbacks
    def test_wrong_password_is_refused(self):
        relay = self.start_relay()
        failure = yield self.assertFailure(
            relay.submit("submission", "app@example.org", ["user@example.com"], MESSAGE, user="app1",
                         password="wrong"),
            smtplib.SMTPAuthenticationError,
        )
        self.assertEqual(failure.smtp_code, 535)

    @defer.inlineCallbacks
    def test_twenty_thousand_lone_dots_arrive_intact(self):
        relay = self.start_relay()
        message = b"From: app@example.org\r\nSubject: dots\r\n\r\n" + b".\r\n" * 20000
        code, _ = yield relay.submit("relay", "app@example.org", ["user@example.com"], message)
        self.assertEqual(code, 250)
        yield self.sink.wait_for(1)
        self.assertEqual(strip_received(self.sink.messages[0].data), message)
        self.assertEqual(self.sink.messages[0].data_raw.split(b"\r\n").count(b".."), 20000)   # each stuffed

    @defer.inlineCallbacks
    def test_temporary_failure_is_retried_then_delivered(self):
        self.sink.data_replies = ["451 4.3.0 try again later", "250 2.0.0 ok"]
        relay = self.start_relay()
        code, _ = yield relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        yield self.sink.wait_for(1)       # only accepted transactions are recorded
        self.assertEqual(self.sink.data_replies, [])   # the 451 was given to a first attempt
        self.assertEqual(strip_received(self.sink.messages[0].data), MESSAGE)
        spool = relay.dir / "spool" / "queue"
        yield eventually(lambda: not any(spool.iterdir()), timeout=5, interval=0.1)
        self.assertEqual(list(spool.iterdir()), [])

    @defer.inlineCallbacks
    def test_permanent_failure_bounces_to_the_sender(self):
        self.sink.rcpt_replies = {"gone@example.com": "550 5.1.1 no such user"}
        relay = self.start_relay()
        code, _ = yield relay.submit("relay", "app@example.org", ["gone@example.com", "ok@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        yield self.sink.wait_for(2)       # the message for ok@, then the DSN through the same route
        dsn = [m for m in self.sink.messages if m.mail_from == ""][0]
        self.assertEqual(dsn.rcpt_tos, ["app@example.org"])
        report = email.message_from_bytes(dsn.data)
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertEqual(report.get_param("report-type"), "delivery-status")
        status = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"][0]
        fields = str(status.get_payload()[1]) if status.is_multipart() else status.get_payload()
        self.assertIn("gone@example.com", fields)
        self.assertIn("5.1.1", fields)
        delivered = [m for m in self.sink.messages if m.mail_from == "app@example.org"]
        self.assertEqual(delivered[0].rcpt_tos, ["ok@example.com"])

    @defer.inlineCallbacks
    def test_relay_to_relay_pipelines_and_a_refused_recipient_bounces(self):
        # A second relay as the next hop: it offers PIPELINING (RFC 2920), so the first sends MAIL, both
        # RCPTs and DATA in one group; the second refuses one recipient, which comes back as a DSN.
        self.sink.extensions += ("PIPELINING",)
        downstream = self.start_relay(permits='[[permit]]\nnetworks = ["127.0.0.1/32"]\n'
                                              'recipients = ["example.com", "example.org"]\n')
        upstream = RelayFixture(self.mktemp(), extra=(
            f'[transports.downstream]\nhost = "127.0.0.1"\nport = {downstream.ports["relay"]}\n'
            f'security = "none"\n\n[[route]]\nrecipients = ["*"]\ntransport = "downstream"\n'))
        upstream.start(reactor)
        self.addCleanup(upstream.stop)
        code, _ = yield upstream.submit("relay", "app@example.org", ["ok@example.com", "x@example.net"], MESSAGE)
        self.assertEqual(code, 250)
        yield self.sink.wait_for(2)
        delivered = [m for m in self.sink.messages if m.mail_from == "app@example.org"]
        self.assertEqual(delivered[0].rcpt_tos, ["ok@example.com"])
        self.assertEqual(strip_received(strip_received(delivered[0].data)), MESSAGE)
        dsn = [m for m in self.sink.messages if m.mail_from == ""][0]
        self.assertEqual(dsn.rcpt_tos, ["app@example.org"])
        self.assertIn(b"x@example.net", dsn.data)
        self.assertIn(b"5.7.1", dsn.data)
        # downstream's own client pipelined to the sink as well
        groups = [[line.split(b":")[0] for line in read] for s in self.sink.sessions for read in s.reads]
        self.assertIn([b"MAIL FROM", b"RCPT TO", b"DATA"], groups)
