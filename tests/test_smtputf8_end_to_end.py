"""SMTPUTF8 (RFC 6531, 6532, 6533) through the whole relay over real sockets.

A real client (smtplib, raw sockets for malformed input) submits UTF-8 addresses and header fields; the
relay (make_service on this reactor, and once as twistd with a separate delivery process) checks them,
matches permit rules, routes and DKIM keys written as U-labels or A-labels, looks up MX by the A-label
on a loopback DNS server, and delivers to aiosmtpd (SMTPUTF8 enabled) or to tests/support/sink.py
offering or withholding SMTPUTF8.  A message that needs SMTPUTF8 never reaches a hop without it: the
sender gets an RFC 6533 DSN.
"""
from __future__ import annotations

import email
import email.policy
import os
import smtplib
import subprocess
import sys

import dkim
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from mailrelay import idn
from mailrelay.dkim import keys
from mailrelay.dkim.verifier import make_resolver, txt_lookup
from tests.support.dnsserver import DNSServer
from tests.support.ports import free_port
from tests.support.relay import SEPARATE, RelayFixture
from tests.support.sink import WITHOUT_SMTPUTF8, Sink
from tests.support.utf8peer import Utf8Peer
from tests.support.wire import WireClient

SENDER = "Jörg@exämple.org"                 # UTF-8 local part, U-label domain (xn--exmple-cua.org)
CHINESE = "用户@例子.广告"                     # UTF-8 local part, U-label domain (xn--fsqu00a.xn--4rr70v)
CHINESE_A = "xn--fsqu00a.xn--4rr70v"
BUECHER_A = "xn--bcher-kva.example"          # bücher.example
KEY = keys.generate("ed25519")
UTF8 = ("SMTPUTF8",)

PERMITS = (
    '[[permit]]\nnetworks = ["127.0.0.1/32"]\n'
    # permit patterns in both forms: U-label senders/recipients and A-label ones
    f'senders = ["exämple.org", "{BUECHER_A}"]\n'
    f'recipients = ["{CHINESE_A}", "bücher.example", "exämple.org"]\n'
)


def message(sender: str = SENDER, to: str = CHINESE, subject: str = "Grüße aus Köln") -> bytes:
    return (f"From: Jörg <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <m1@xn--exmple-cua.org>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"你好，世界\r\n").encode("utf-8")


def ascii_message(to: str) -> bytes:
    """A message whose header block is ASCII: `to` written with its domain as A-labels."""
    to = idn.ascii_address(to)
    return (f"From: <app@{BUECHER_A}>\r\nTo: <{to}>\r\nSubject: plain\r\nMessage-ID: <m2@x.example>\r\n\r\n"
            "body\r\n").encode("ascii")


class Utf8Hops(unittest.TestCase):
    """The next hops and the DNS every test here uses (no tests of its own)."""
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.mx_port = free_port("127.0.0.2")
        self.peer = Utf8Peer("127.0.0.2", self.mx_port)        # the MX of 例子.广告 and the DSN's way back
        yield threads.deferToThread(self.peer.start)
        self.addCleanup(threads.deferToThread, self.peer.stop)
        self.plain = Sink(extensions=WITHOUT_SMTPUTF8)           # a next hop without SMTPUTF8
        self.plain_port = self.plain.start(reactor)
        self.addCleanup(self.plain.stop)
        self.utf8_sink = Sink()                                  # offers SMTPUTF8, records MAIL parameters
        self.utf8_port = self.utf8_sink.start(reactor)
        self.addCleanup(self.utf8_sink.stop)
        self.dns = DNSServer({
            (CHINESE_A, "MX"): [f"10 mx.{CHINESE_A}."],
            (f"mx.{CHINESE_A}", "A"): ["127.0.0.2"],
            ("sel._domainkey.xn--exmple-cua.org", "TXT"): [keys.txt_record(KEY)],
        })
        self.dns_port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)

    def relay(self, routes: str = "", process=None) -> RelayFixture:
        extra = (
            f'[transports.plain]\nhost = "127.0.0.1"\nport = {self.plain_port}\nsecurity = "none"\n\n'
            f'[transports.utf8]\nhost = "127.0.0.1"\nport = {self.utf8_port}\nsecurity = "none"\n\n'
            f'[transports.back]\nhost = "127.0.0.2"\nport = {self.mx_port}\nsecurity = "none"\n\n'
            # the sender's domain, written as its U-label: DSNs to it go to the SMTPUTF8 peer
            '[[route]]\nrecipients = ["exämple.org"]\ntransport = "back"\n\n'
            + routes +
            f'[delivery]\nnameservers = ["127.0.0.1:{self.dns_port}"]\nmx_port = {self.mx_port}\n'
            'tls = "none"\n\n'
            '[dkim]\nmode = "sign"\n\n'
            # the key's domain as a U-label: stored and looked up as xn--exmple-cua.org
            '[[dkim.key]]\ndomain = "exämple.org"\nselector = "sel"\nkey_file = "sel.pem"\n'
        )
        kwargs = {} if process is None else {"process": process}
        relay = RelayFixture(self.mktemp(), permits=PERMITS, extra=extra, **kwargs)
        (relay.dir / "sel.pem").write_bytes(keys.private_pem(KEY))
        return relay

    def started(self, routes: str = "") -> RelayFixture:
        relay = self.relay(routes)
        relay.start(reactor)
        self.addCleanup(relay.stop)
        return relay

    def verify(self, data: bytes) -> defer.Deferred:
        lookup = txt_lookup(make_resolver([("127.0.0.1", self.dns_port)]))
        return threads.deferToThread(lambda: dkim.DKIM(data).verify(dnsfunc=lookup))


class Utf8EndToEnd(Utf8Hops):
    @defer.inlineCallbacks
    def test_utf8_addresses_go_by_mx_of_the_a_label_to_an_smtputf8_peer_signed_with_the_a_label_key(self):
        relay = self.started()
        code, _ = yield relay.submit("relay", SENDER, [CHINESE], message(), mail_options=UTF8)
        self.assertEqual(code, 250)
        [got] = yield self.peer.wait_for(1)
        self.assertEqual(got.mail_from, SENDER)                    # local part and domain as given
        self.assertEqual(got.rcpt_tos, [CHINESE])
        self.assertTrue(got.smtp_utf8)
        self.assertIn("SMTPUTF8", got.mail_options)
        self.assertIn("BODY=8BITMIME", got.mail_options)
        self.assertIn((CHINESE_A, "MX"), [(name, rtype) for name, rtype, _ in self.dns.queries])
        self.assertFalse(any(not name.isascii() for name, _, _ in self.dns.queries))
        parsed = email.message_from_bytes(got.content, policy=email.policy.SMTPUTF8)
        self.assertEqual(parsed["Subject"], "Grüße aus Köln")
        self.assertIn("with UTF8SMTP\r\n", got.content.decode("utf-8"))      # RFC 6531 4.3
        self.assertIn(b"d=xn--exmple-cua.org", got.content)
        self.assertTrue((yield self.verify(got.content)))

    @defer.inlineCallbacks
    def test_bdat_carries_an_smtputf8_transaction_too(self):
        relay = self.started()
        content = message()

        def send() -> list[bytes]:
            client = WireClient("127.0.0.1", relay.ports["relay"])
            client.reply()
            client.send(b"EHLO client.test\r\n")
            client.reply()
            client.send(b"MAIL FROM:<" + SENDER.encode() + b"> SMTPUTF8 BODY=8BITMIME\r\nRCPT TO:<"
                        + CHINESE.encode() + b">\r\n" + b"BDAT %d LAST\r\n" % len(content) + content)
            codes = [client.reply().lines[-1][:9] for _ in range(3)]
            client.sock.close()
            return codes
        codes = yield threads.deferToThread(send)
        self.assertEqual(codes, [b"250 2.1.0", b"250 2.1.5", b"250 2.0.0"])
        [got] = yield self.peer.wait_for(1)
        self.assertEqual((got.mail_from, got.rcpt_tos, got.smtp_utf8), (SENDER, [CHINESE], True))
        self.assertIn("with UTF8SMTP\r\n", got.content.decode("utf-8"))

    @defer.inlineCallbacks
    def test_a_route_written_as_an_a_label_takes_a_u_label_recipient(self):
        relay = self.started(f'[[route]]\nrecipients = ["{BUECHER_A}"]\ntransport = "utf8"\n\n')
        code, _ = yield relay.submit("relay", SENDER, ["Jürgen@bücher.example"], message(to="Jürgen@bücher.example"),
                                     mail_options=UTF8)
        self.assertEqual(code, 250)
        [got] = yield self.utf8_sink.wait_for(1)
        self.assertEqual(got.rcpt_tos, ["Jürgen@bücher.example"])
        self.assertIn("SMTPUTF8", got.mail_params)

    @defer.inlineCallbacks
    def test_permit_patterns_in_either_form_match_either_form(self):
        relay = self.started(f'[[route]]\nrecipients = ["{BUECHER_A}"]\ntransport = "utf8"\n\n')
        # sender domain allowed as an A-label pattern, given as a U-label; recipient pattern "bücher.example"
        # (U-label), given as its A-label
        code, _ = yield relay.submit("relay", "app@bücher.example", [f"user@{BUECHER_A}"],
                                     ascii_message(f"user@{BUECHER_A}"), mail_options=UTF8)
        self.assertEqual(code, 250)
        with self.assertRaises(smtplib.SMTPRecipientsRefused) as refused:
            yield relay.submit("relay", SENDER, ["用户@例子.中国"], message(), mail_options=UTF8)
        self.assertEqual(list(refused.exception.recipients.values())[0][0], 550)
        with self.assertRaises(smtplib.SMTPSenderRefused) as sender_refused:
            yield relay.submit("relay", "Jörg@other.example", [CHINESE], message(), mail_options=UTF8)
        self.assertEqual(sender_refused.exception.smtp_code, 553)
        [got] = yield self.utf8_sink.wait_for(1)
        self.assertEqual(got.mail_from, "app@bücher.example")

    @defer.inlineCallbacks
    def test_a_hop_without_smtputf8_never_gets_a_utf8_local_part_and_the_sender_gets_a_global_dsn(self):
        relay = self.started(f'[[route]]\nrecipients = ["{BUECHER_A}"]\ntransport = "plain"\n\n')
        code, _ = yield relay.submit("relay", SENDER, ["用户@bücher.example"], message(to="用户@bücher.example"),
                                     mail_options=UTF8)
        self.assertEqual(code, 250)
        [dsn] = yield self.peer.wait_for(1)
        self.assertEqual(self.plain.transactions, [])
        self.assertFalse(any(c.startswith(b"MAIL") for s in self.plain.sessions for _, c in s.commands))
        self.assertEqual((dsn.mail_from, dsn.rcpt_tos), ("<>", [SENDER]))      # aiosmtpd's null path
        self.assertTrue(dsn.smtp_utf8)                             # the DSN itself needs SMTPUTF8
        report = email.message_from_bytes(dsn.content, policy=email.policy.SMTPUTF8)
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertEqual(report.get_param("report-type"), "global-delivery-status")
        types = [p.get_content_type() for p in report.iter_parts()]
        self.assertEqual(types, ["text/plain", "message/global-delivery-status", "message/global-headers"])
        text = dsn.content.decode("utf-8")
        self.assertIn("Final-Recipient: utf-8; 用户@bücher.example\r\n", text)
        self.assertIn("Status: 5.6.7\r\n", text)
        self.assertIn("SMTPUTF8 required", text)
        self.assertIn("Subject: Grüße aus Köln\r\n", text)          # the returned header block, as it was

    @defer.inlineCallbacks
    def test_utf8_header_fields_are_never_sent_to_a_hop_without_smtputf8(self):
        relay = self.started(f'[[route]]\nrecipients = ["{BUECHER_A}"]\ntransport = "plain"\n\n')
        code, _ = yield relay.submit("relay", f"app@{BUECHER_A}", [f"user@{BUECHER_A}"],
                                     message(sender=f"app@{BUECHER_A}", to=f"user@{BUECHER_A}"), mail_options=UTF8)
        self.assertEqual(code, 250)
        # What reaches the hop is only the DSN to app@bücher.example: its own envelope and header block are
        # ASCII, and the UTF-8 header fields it returns are 8-bit content of a message/global-headers part
        # (RFC 6532 3.5), which 8BITMIME carries.
        [dsn] = yield self.plain.wait_for(1)
        self.assertEqual((dsn.mail_from, dsn.rcpt_tos), ("", [f"app@{BUECHER_A}"]))
        self.assertIn("BODY=8BITMIME", dsn.mail_params)
        self.assertIn(b"report-type=\"global-delivery-status\"", dsn.data)
        self.assertIn(b"Content-Type: message/global-headers\r\nContent-Transfer-Encoding: 8bit\r\n", dsn.data)
        self.assertIn(f"From: Jörg <app@{BUECHER_A}>\r\n".encode(), dsn.data)
        self.assertIn(b"Status: 5.6.7", dsn.data)
        self.assertEqual(len(self.plain.transactions), 1)

    @defer.inlineCallbacks
    def test_only_the_domain_non_ascii_goes_as_its_a_label_to_a_hop_without_smtputf8(self):
        relay = self.started(f'[[route]]\nrecipients = ["{BUECHER_A}"]\ntransport = "plain"\n\n')
        code, _ = yield relay.submit("relay", "app@bücher.example", ["user@bücher.example"],
                                     ascii_message("user@bücher.example"), mail_options=UTF8)
        self.assertEqual(code, 250)
        [got] = yield self.plain.wait_for(1)
        self.assertEqual(got.mail_from, f"app@{BUECHER_A}")
        self.assertEqual(got.rcpt_tos, [f"user@{BUECHER_A}"])
        self.assertNotIn("SMTPUTF8", got.mail_params)
        self.assertTrue(got.data_raw.isascii())                      # our Received `for` too
        self.assertIn(f"for <user@{BUECHER_A}>".encode(), got.data)


class SendmailTests(Utf8Hops):
    """mailrelay-sendmail (a subprocess) submits UTF-8 addresses and headers with SMTPUTF8."""

    def sendmail(self, port: int, args: list[str], stdin: bytes) -> subprocess.CompletedProcess:
        env = dict(os.environ, MAILRELAY_SERVER=f"127.0.0.1:{port}", MAILRELAY_SECURITY="none")
        return subprocess.run([sys.executable, "-m", "mailrelay.cli.sendmail", *args], input=stdin,
                              capture_output=True, env=env, timeout=60)

    @defer.inlineCallbacks
    def test_sendmail_uses_smtputf8_for_utf8_addresses_and_headers(self):
        relay = self.started()
        stdin = f"From: Jörg <{SENDER}>\nTo: {CHINESE}\nSubject: Grüße\n\nbody\n".encode()
        result = yield threads.deferToThread(self.sendmail, relay.ports["relay"], ["-t", "-i"], stdin)
        self.assertEqual(result.returncode, 0, result.stderr)
        [got] = yield self.peer.wait_for(1)
        self.assertEqual((got.mail_from, got.rcpt_tos, got.smtp_utf8), (SENDER, [CHINESE], True))
        self.assertIn(b"Message-ID: <", got.content)
        self.assertIn(b"@xn--exmple-cua.org>", got.content)        # the Message-ID's domain as its A-label

    @defer.inlineCallbacks
    def test_sendmail_to_a_server_without_smtputf8_fails_with_one_line(self):
        stdin = f"From: <{SENDER}>\nSubject: x\n\nbody\n".encode()
        result = yield threads.deferToThread(self.sendmail, self.plain_port, [CHINESE], stdin)
        self.assertEqual(result.returncode, 69, result.stderr)
        self.assertIn(b"SMTPUTF8", result.stderr)
        self.assertEqual(result.stderr.count(b"\n"), 1)
        self.assertEqual(self.plain.transactions, [])


class DoorTests(unittest.TestCase):
    """What the listeners say to UTF-8 input, over real sockets (relay, submission, submissions)."""
    timeout = 60

    def setUp(self):
        self.relay = RelayFixture(self.mktemp(), permits=PERMITS)
        self.relay.start(reactor)
        self.addCleanup(self.relay.stop)

    def conversation(self, lines: list[bytes], kind: str = "relay") -> list[bytes]:
        tls = self.relay.tls_context() if kind == "submissions" else None
        client = WireClient("127.0.0.1", self.relay.ports[kind], implicit_tls=tls)
        try:
            client.reply()
            out = []
            for line in lines:
                client.send(line + b"\r\n")
                reply = client.reply()
                out.append(reply.lines[-1][:9] if not line.startswith(b"EHLO") else b"\n".join(reply.lines))
            return out
        finally:
            client.sock.close()

    @defer.inlineCallbacks
    def test_every_listener_offers_smtputf8(self):
        for kind in ("relay", "submission", "submissions"):
            [ehlo] = yield threads.deferToThread(self.conversation, [b"EHLO client.test"], kind)
            self.assertIn(b"250-SMTPUTF8", ehlo, kind)

    @defer.inlineCallbacks
    def test_utf8_input_gets_precise_replies(self):
        sender = SENDER.encode("utf-8")
        lines = [
            b"EHLO client.test",
            b"MAIL FROM:<" + sender + b">",                                     # no SMTPUTF8 given
            b"MAIL FROM:<j\xc3(rg@xn--exmple-cua.org> SMTPUTF8",                 # invalid UTF-8
            b"MAIL FROM:<j\xc0\xafrg@xn--exmple-cua.org> SMTPUTF8",              # overlong "/"
            b"MAIL FROM:<j\xc2\x85rg@xn--exmple-cua.org> SMTPUTF8",              # C1 control NEL
            b"MAIL FROM:<" + sender + b"> SMTPUTF8=yes",
            b"MAIL FROM:<" + sender + b"> SMTPUTF8",
            "RCPT TO:<a@ex☃mple.org>".encode(),                                # IDNA2008: DISALLOWED
            b"RCPT TO:<a@xn--zz.example>",                                      # not a valid A-label
            ("RCPT TO:<" + "用" * 22 + "@例子.广告>").encode(),                   # 66 octets: > 64
            ("RCPT TO:<" + CHINESE + ">").encode(),
            b"RSET",
            b"MAIL FROM:<app@" + BUECHER_A.encode() + b">",
            ("RCPT TO:<" + CHINESE + ">").encode(),                             # this MAIL had no SMTPUTF8
        ]
        replies = yield threads.deferToThread(self.conversation, lines)
        self.assertEqual(replies[1:], [
            b"553 5.6.7", b"553 5.6.7", b"553 5.6.7", b"501 5.1.7", b"501 5.5.4", b"250 2.1.0",
            b"553 5.1.3", b"553 5.1.3", b"501 5.1.3", b"250 2.1.5", b"250 2.0.0", b"250 2.1.0", b"553 5.6.7",
        ])

    @defer.inlineCallbacks
    def test_smtputf8_after_helo_is_refused(self):
        replies = yield threads.deferToThread(self.conversation, [
            b"HELO client.test", b"MAIL FROM:<" + SENDER.encode() + b"> SMTPUTF8",
            b"MAIL FROM:<app@" + BUECHER_A.encode() + b">"])
        self.assertEqual(replies[1:], [b"555 5.5.4", b"250 2.1.0"])

    @defer.inlineCallbacks
    def test_an_idna_refusal_names_the_reason(self):
        def run():
            client = WireClient("127.0.0.1", self.relay.ports["relay"])
            client.reply()
            for line in (b"EHLO client.test", b"MAIL FROM:<" + SENDER.encode() + b"> SMTPUTF8",
                         "RCPT TO:<a@ex☃mple.org>".encode()):
                client.send(line + b"\r\n")
                reply = client.reply()
            client.sock.close()
            return reply
        reply = yield threads.deferToThread(run)
        self.assertIn(b"U+2603", reply.text)
        self.assertIn(b"IDNA2008", reply.text)


class Utf8Twistd(unittest.TestCase):
    """The same journey through twistd, with the delivery process separate (the default)."""
    timeout = 120

    @defer.inlineCallbacks
    def test_utf8_message_through_twistd_reaches_the_smtputf8_peer_and_survives_the_spool(self):
        mx_port = free_port("127.0.0.2")
        peer = Utf8Peer("127.0.0.2", mx_port)
        yield threads.deferToThread(peer.start)
        self.addCleanup(threads.deferToThread, peer.stop)
        dns = DNSServer({(CHINESE_A, "MX"): [f"10 mx.{CHINESE_A}."], (f"mx.{CHINESE_A}", "A"): ["127.0.0.2"]})
        dns_port = dns.start(reactor)
        self.addCleanup(dns.stop)
        relay = RelayFixture(self.mktemp(), permits=PERMITS, process=SEPARATE, extra=(
            f'[delivery]\nnameservers = ["127.0.0.1:{dns_port}"]\nmx_port = {mx_port}\ntls = "none"\n'))
        yield threads.deferToThread(relay.spawn)
        self.addCleanup(relay.kill)
        code, _ = yield relay.submit("relay", SENDER, [CHINESE], message(), mail_options=UTF8)
        self.assertEqual(code, 250)
        [got] = yield peer.wait_for(1)
        self.assertEqual((got.mail_from, got.rcpt_tos, got.smtp_utf8), (SENDER, [CHINESE], True))
        self.assertIn((CHINESE_A, "MX"), [(name, rtype) for name, rtype, _ in dns.queries])
        self.assertIn("Subject: Grüße aus Köln\r\n", got.content.decode("utf-8"))
