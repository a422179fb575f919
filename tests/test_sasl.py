"""The client side of AUTH (mailrelay.outbound.sasl.ClientLogin): never over plaintext, a mechanism the
server offers, each 334 answered, a refusal scrubbed of our secrets.  The delivery client runs it over
real connections in tests/test_delivery_client.py; here each step alone."""
from __future__ import annotations

import base64

from twisted.trial import unittest

from mailrelay.outbound.sasl import ClientLogin, LoginFailed, PasswordLogin


class ClientLoginTests(unittest.TestCase):
    def setUp(self):
        self.password = PasswordLogin("app1", b"s3cret")
        self.login = ClientLogin(self.password, "smarthost.example[127.0.0.1]")

    def test_nobody_to_log_in_as(self):
        self.assertFalse(ClientLogin(None, "mx.example").wanted)
        self.assertTrue(self.login.wanted)

    def test_credentials_never_go_over_plaintext(self):
        with self.assertRaises(LoginFailed) as caught:
            self.login.begin(b"PLAIN LOGIN", tls_active=False)
        code, status, text = caught.exception.failure
        self.assertEqual((code, status), (451, "4.7.11"))
        self.assertIn("smarthost.example[127.0.0.1]", text)
        self.assertNotIn("s3cret", text)

    def test_no_mechanism_in_common_names_both_sides(self):
        with self.assertRaises(LoginFailed) as caught:
            self.login.begin(b"CRAM-MD5 GSSAPI", tls_active=True)
        code, status, text = caught.exception.failure
        self.assertEqual((code, status), (451, "4.7.0"))
        self.assertIn("we use PLAIN or LOGIN", text)
        self.assertIn("offered: CRAM-MD5 GSSAPI", text)

    def test_plain_is_preferred_and_sent_at_once(self):
        command = self.login.begin(b"login plain", tls_active=True)       # keywords compare case-blind
        self.assertEqual(command, b"AUTH PLAIN " + base64.b64encode(b"\0app1\0s3cret"))
        self.login.succeeded()

    def test_login_answers_each_challenge_then_has_no_more(self):
        self.assertEqual(self.login.begin(b"LOGIN", tls_active=True), b"AUTH LOGIN")
        self.assertEqual(self.login.respond(b"VXNlcm5hbWU6"), base64.b64encode(b"app1"))
        self.assertEqual(self.login.respond(b"UGFzc3dvcmQ6"), base64.b64encode(b"s3cret"))
        with self.assertRaises(LoginFailed) as caught:
            self.login.respond(b"TW9yZT8=")
        self.assertEqual(caught.exception.failure[:2], (421, "4.7.0"))

    def test_a_refusal_is_scrubbed_and_a_535_marks_the_credentials_rejected(self):
        self.login.begin(b"LOGIN", tls_active=True)
        secret = base64.b64encode(b"s3cret")
        text = self.login.refused(535, b"5.7.8 bad credentials " + secret)
        self.assertEqual(text, b"5.7.8 bad credentials [secret]")
        self.assertTrue(self.password.rejected)

    def test_a_temporary_refusal_leaves_the_credentials_alone(self):
        self.login.begin(b"PLAIN", tls_active=True)
        self.login.refused(454, b"4.7.0 try later")
        self.assertFalse(self.password.rejected)
