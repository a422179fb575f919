"""mailrelay-sendmail driven as a subprocess against a real aiosmtpd server on loopback (STARTTLS, AUTH)."""
from __future__ import annotations

import os
import ssl
import subprocess
import sys
from email import message_from_bytes

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from twisted.trial import unittest

from mailrelay.cli import sendmail
from mailrelay.tls import generate_self_signed
from tests.support.ports import free_port


class _Recorder:
    def __init__(self):
        self.envelopes = []
        self.rcpt_reply = {}

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rcpt_reply.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
                               session.ssl is not None, getattr(session, "login_data", None)))
        return "250 2.0.0 Ok: queued"


def _free_port() -> int:
    return free_port()


def _authenticate(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and auth_data.login == b"app1" and auth_data.password == b"s3cret"
    return AuthResult(success=ok, handled=False)


class SendmailAgainstSMTPServer(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        cert_pem, key_pem = generate_self_signed("localhost")
        self.ca = os.path.join(self.dir, "cert.pem")
        with open(self.ca, "wb") as f:
            f.write(cert_pem + key_pem)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.ca)
        self.recorder = _Recorder()
        self.port = _free_port()
        self.controller = Controller(
            self.recorder, hostname="127.0.0.1", port=self.port, tls_context=context,
            require_starttls=True, authenticator=_authenticate, auth_required=True,
        )
        self.controller.start()
        self.addCleanup(self.controller.stop)
        self.secret = os.path.join(self.dir, "app1.secret")
        with open(self.secret, "w") as f:
            f.write("s3cret\n")

    def run_sendmail(self, args, stdin: bytes, **env):
        environment = dict(os.environ, MAILRELAY_SERVER=f"localhost:{self.port}", MAILRELAY_CA_FILE=self.ca,
                           MAILRELAY_USERNAME="app1", MAILRELAY_PASSWORD_FILE=self.secret)
        environment.update(env)
        return subprocess.run([sys.executable, "-m", "mailrelay.cli.sendmail", *args], input=stdin,
                              capture_output=True, env=environment, timeout=60)

    def test_t_reads_recipients_and_removes_bcc(self):
        message = b"From: App <app@example.org>\nTo: a@example.com\nCc: b@example.com\nBcc: c@example.com\n" \
                  b"Subject: hi\n\nline one\n.\nline three\n"
        result = self.run_sendmail(["-t", "-i"], message)
        self.assertEqual(result.returncode, 0, result.stderr)
        sender, rcpts, data, tls, login = self.recorder.envelopes[0]
        self.assertEqual(sender, "app@example.org")
        self.assertEqual(sorted(rcpts), ["a@example.com", "b@example.com", "c@example.com"])
        self.assertTrue(tls)
        self.assertNotIn(b"Bcc", data)
        self.assertIn(b"\r\n.\r\nline three\r\n", data)   # -i: a lone dot is content, sent intact
        parsed = message_from_bytes(data)
        self.assertIsNotNone(parsed["Date"])
        self.assertIsNotNone(parsed["Message-ID"])

    def test_lone_dot_ends_input_without_i(self):
        result = self.run_sendmail(["-f", "bounce@example.org", "x@example.com"],
                                   b"Subject: s\n\nkept\n.\nnot sent\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        sender, rcpts, data, _, _ = self.recorder.envelopes[0]
        self.assertEqual((sender, rcpts), ("bounce@example.org", ["x@example.com"]))
        self.assertIn(b"kept\r\n", data)
        self.assertNotIn(b"not sent", data)
        self.assertIn(b"From: bounce@example.org", data)

    def test_refused_recipient_is_ex_unavailable_with_one_line(self):
        self.recorder.rcpt_reply["no@example.com"] = "550 5.1.1 no such user"
        result = self.run_sendmail(["no@example.com"], b"Subject: s\n\nbody\n")
        self.assertEqual(result.returncode, 69)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn(b"550", result.stderr)

    def test_temporary_refusal_is_ex_tempfail(self):
        self.recorder.rcpt_reply["later@example.com"] = "451 4.3.0 try later"
        result = self.run_sendmail(["later@example.com"], b"Subject: s\n\nbody\n")
        self.assertEqual(result.returncode, 75, result.stderr)

    def test_wrong_password_is_ex_noperm(self):
        with open(self.secret, "w") as f:
            f.write("wrong\n")
        result = self.run_sendmail(["x@example.com"], b"Subject: s\n\nbody\n")
        self.assertEqual(result.returncode, 77, result.stderr)
        self.assertNotIn(b"wrong", result.stderr)

    def test_unreachable_relay_is_ex_tempfail(self):
        result = self.run_sendmail(["x@example.com"], b"Subject: s\n\nbody\n",
                                   MAILRELAY_SERVER=f"127.0.0.1:{_free_port()}")
        self.assertEqual(result.returncode, 75)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)

    def test_untrusted_certificate_is_refused(self):
        result = self.run_sendmail(["x@example.com"], b"Subject: s\n\nbody\n", MAILRELAY_CA_FILE="")
        self.assertEqual(result.returncode, 69, result.stderr)
        self.assertEqual(self.recorder.envelopes, [])


class SendmailArguments(unittest.TestCase):
    def test_combined_and_ignored_flags(self):
        inv = sendmail.parse_args(["-oi", "-odi", "-fme@example.org", "-FMe Myself", "a@x.org,b@x.org", "c@x.org"])
        self.assertEqual(inv.sender, "me@example.org")
        self.assertEqual(inv.full_name, "Me Myself")
        self.assertFalse(inv.dot_ends_input)
        self.assertEqual(inv.recipients, ["a@x.org", "b@x.org", "c@x.org"])

    def test_unknown_option_is_usage_error(self):
        with self.assertRaises(sendmail.Failure) as caught:
            sendmail.parse_args(["-Q"])
        self.assertEqual(caught.exception.status, 64)

    def test_full_name_goes_into_added_from(self):
        inv = sendmail.parse_args(["-f", "me@example.org", "-F", "Me Myself", "a@x.org"])
        sender, rcpts, message = sendmail.prepare(inv, b"Subject: s\r\n\r\nbody\r\n")
        self.assertIn(b"From: Me Myself <me@example.org>\r\n", message)
        self.assertTrue(message.endswith(b"\r\n\r\nbody\r\n"))
