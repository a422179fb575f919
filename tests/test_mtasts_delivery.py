"""MTA-STS (RFC 8461) in direct delivery, with real peers: the loopback DNS server publishes the
`_mta-sts` TXT record and the addresses, a real HTTPS policy host (test CA certificate) serves the
policy, and SMTP sinks on 127.0.0.2/.3 play the exchangers with good, wrong-name, self-signed, expired
or no certificates (no STARTTLS).  The relay trusts the test CA through `[delivery] ca_file`.
"""
from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from mailrelay.outbound.mtasts_cache import PolicyCache
from tests.support.tlsworld import World
from tests.support.messages import message_to

RCPT = "b@example.net"


class MTASTSDeliveryTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.world = World(self)
        self.world.zone(("example.net", "MX"), ["10 mx1.example.net.", "20 mx2.example.net."])

    @defer.inlineCallbacks
    def deliver(self, **keys):
        [result] = yield self.world.mx(**keys).deliver(message_to(RCPT), [RCPT])
        return result

    # -- enforce ------------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_enforce_with_a_valid_certificate_delivers_verified_by_mta_sts(self):
        sink = self.world.exchanger("mx1.example.net", "127.0.0.2", tls="good")
        self.world.publish("example.net", "enforce", ["mx1.example.net", "mx2.example.net"])
        result = yield self.deliver()
        self.assertTrue(result.delivered, result)
        self.assertEqual((result.tls_verified, result.tls_verified_by), (True, "mta-sts"))
        self.assertTrue(sink.messages[0].tls)
        self.assertEqual(self.world.reports.results(), [("sts", "mx1.example.net", None, True)])
        self.assertIn("mode: enforce", self.world.reports.records[0]["strings"])
        self.assertEqual(self.world.policies.fetches("example.net"), 1)

    @defer.inlineCallbacks
    def test_enforce_with_a_wrong_name_defers_and_sends_nothing(self):
        sink = self.world.exchanger("mx1.example.net", "127.0.0.2", tls="wrong-name")
        self.world.publish("example.net", "enforce", ["mx1.example.net"])
        result = yield self.deliver()
        self.assertEqual((result.code, result.status), (421, "4.7.5"), result)
        self.assertIn("MTA-STS policy of example.net", result.text)
        self.assertIn("certificate-host-mismatch", result.text)
        self.assertEqual(sink.messages, [])
        self.assertNotIn(b"MAIL", b" ".join(line for _, line in sink.sessions[0].commands))
        self.assertEqual(self.world.reports.results(),
                         [("sts", "mx1.example.net", "certificate-host-mismatch", False)])

    @defer.inlineCallbacks
    def test_enforce_with_a_self_signed_certificate_defers(self):
        self.world.exchanger("mx1.example.net", "127.0.0.2", tls="self-signed")
        self.world.publish("example.net", "enforce", ["mx1.example.net"])
        result = yield self.deliver()
        self.assertEqual(result.status, "4.7.5", result)
        self.assertEqual(self.world.reports.results()[0][2], "certificate-not-trusted")

    @defer.inlineCallbacks
    def test_enforce_with_an_expired_certificate_defers(self):
        self.world.exchanger("mx1.example.net", "127.0.0.2", tls="expired")
        self.world.publish("example.net", "enforce", ["mx1.example.net"])
        result = yield self.deliver()
        self.assertEqual(result.status, "4.7.5", result)
        self.assertEqual(self.world.reports.results()[0][2], "certificate-expired")

    @defer.inlineCallbacks
    def test_enforce_without_starttls_defers_and_never_falls_back_to_plaintext(self):
        sink = self.world.exchanger("mx1.example.net", "127.0.0.2", tls=None)
        self.world.publish("example.net", "enforce", ["mx1.example.net"])
        result = yield self.deliver()
        self.assertEqual((result.code, result.status), (451, "4.7.4"), result)
        self.assertIn("TLS is required by the MTA-STS policy of example.net", result.text)
        self.assertEqual(sink.messages, [])
        self.assertEqual(self.world.reports.results(), [("sts", "mx1.example.net", "starttls-not-supported", False)])

    @defer.inlineCallbacks
    def test_enforce_never_connects_to_an_mx_outside_the_policy(self):
        outsider = self.world.exchanger("mx1.example.net", "127.0.0.2", tls="good")
        listed = self.world.exchanger("mx2.example.net", "127.0.0.3", tls="good")
        self.world.publish("example.net", "enforce", ["*.other.example", "mx2.example.net"])
        result = yield self.deliver()
        self.assertTrue(result.delivered, result)
        self.assertEqual(outsider.sessions, [])
        self.assertEqual(len(listed.messages), 1)
        self.assertEqual(self.world.reports.results()[0][:3], ("sts", "mx1.example.net", "validation-failure"))

    @defer.inlineCallbacks
    def test_enforce_matching_no_mx_defers_every_recipient_with_4_7_5(self):
        sink = self.world.exchanger("mx1.example.net", "127.0.0.2", tls="good")
        self.world.zone(("example.net", "MX"), ["10 mx1.example.net."])
        self.world.publish("example.net", "enforce", ["mail.example.net"])
        result = yield self.deliver()
        self.assertEqual((result.code, result.status), (451, "4.7.5"), result)
        self.assertIn("not an MX host allowed by the MTA-STS policy of example.net", result.text)
        self.assertTrue(result.text.startswith("mail waits: the TLS policy refuses every MX host of example.net"))
        self.assertEqual(sink.sessions, [])

    @defer.inlineCallbacks
    def test_a_wildcard_pattern_matches_one_label(self):
        self.world.exchanger("mx1.example.net", "127.0.0.2", tls="good")
        self.world.zone(("example.net", "MX"), ["10 mx1.example.net."])
        self.world.publish("example.net", "enforce", ["*.example.net"])
        result = yield self.deliver()
        self.assertEqual(result.tls_verified_by, "mta-sts", result)

    # -- testing and none ---------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_testing_delivers_despite_a_wrong_name_and_records_the_failure(self):
        sink = self.world.exchanger("mx1.example.net", "127.0.0.2", tls="wrong-name")
        self.world.publish("example.net", "testing", ["mx1.example.net"])
        result = yield self.deliver()
        self.assertTrue(result.delivered, result)
        self.assertEqual((result.tls, result.tls_verified, result.tls_verified_by), ("tls1.3", False, None))
        self.assertTrue(sink.messages[0].tls)
        self.assertEqual(self.world.reports.results(),
                         [("sts", "mx1.example.net", "certificate-host-mismatch", False)])

    @defer.inlineCallbacks
    def test_testing_delivers_in_plaintext_to_an_exchanger_without_starttls(self):
        sink = self.world.exchanger("mx1.example.net", "127.0.0.2", tls=None)
        self.world.publish("example.net", "testing", ["mx1.example.net"])
        result = yield self.deliver()
        self.assertTrue(result.delivered, result)
        self.assertFalse(sink.messages[0].tls)
        self.assertEqual(self.world.reports.results(), [("sts", "mx1.example.net", "starttls-not-supported", False)])

    @defer.inlineCallbacks
    def test_mode_none_changes_nothing(self):
        sink = self.world.exchanger("mx1.example.net", "127.0.0.2", tls="self-signed")
        self.world.publish("example.net", "none", [])
        result = yield self.deliver()
        self.assertTrue(result.delivered, result)
        self.assertTrue(sink.messages[0].tls)
        self.assertEqual(self.world.reports.results(), [("no-policy-found", "mx1.example.net", None, True)])

    @defer.inlineCallbacks
    def test_no_txt_record_is_no_policy(self):
        self.world.exchanger("mx1.example.net", "127.0.0.2", tls="self-signed")
        result = yield self.deliver()
        self.assertTrue(result.delivered, result)
        self.assertEqual(result.tls_verified_by, None)

    @defer.inlineCallbacks
    def test_mta_sts_off_ignores_the_policy(self):
        self.world.exchanger("mx1.example.net", "127.0.0.2", tls="self-signed")
        self.world.publish("example.net", "enforce", ["mx1.example.net"])
        result = yield self.deliver(mta_sts=False)
        self.assertTrue(result.delivered, result)
        self.assertEqual(self.world.policies.requests, [])

    # -- fetching -----------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_a_redirect_is_not_followed_and_counts_as_no_policy(self):
        self.world.exchanger("mx1.example.net", "127.0.0.2", tls="self-signed")
        self.world.publish("example.net", "enforce", ["mx1.example.net"])
        self.world.policies.mode["example.net"] = "redirect"
        result = yield self.deliver()
        self.assertTrue(result.delivered, result)
        self.assertEqual(self.world.reports.results()[0][:3], ("sts", None, "sts-policy-fetch-error"))
        self.assertEqual(self.world.policies.fetches("example.net"), 1)

    @defer.inlineCallbacks
    def test_a_policy_host_with_an_untrusted_certificate_is_sts_webpki_invalid(self):
        self.world = World(self, policy_certificate="self-signed")
        self.world.zone(("example.net", "MX"), ["10 mx1.example.net."])
        self.world.exchanger("mx1.example.net", "127.0.0.2", tls="self-signed")
        self.world.publish("example.net", "enforce", ["mx1.example.net"])
        result = yield self.deliver()
        self.assertTrue(result.delivered, result)
        self.assertEqual(self.world.reports.results()[0][:3], ("sts", None, "sts-webpki-invalid"))

    @defer.inlineCallbacks
    def test_a_policy_served_as_html_is_invalid(self):
        self.world.exchanger("mx1.example.net", "127.0.0.2", tls="self-signed")
        self.world.publish("example.net", "enforce", ["mx1.example.net"])
        self.world.policies.mode["example.net"] = "html"
        result = yield self.deliver()
        self.assertTrue(result.delivered, result)
        self.assertEqual(self.world.reports.results()[0][2], "sts-policy-invalid")

    @defer.inlineCallbacks
    def test_a_policy_over_64_kib_is_invalid(self):
        self.world.exchanger("mx1.example.net", "127.0.0.2", tls="self-signed")
        self.world.publish("example.net", "enforce", ["mx1.example.net"])
        self.world.policies.mode["example.net"] = "big"
        result = yield self.deliver()
        self.assertTrue(result.delivered, result)
        self.assertEqual(self.world.reports.results()[0][2], "sts-policy-invalid")

    # -- the cache ----------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_a_cached_policy_survives_a_failed_fetch_and_a_restart(self):
        spool = self.mktemp()
        self.world.exchanger("mx1.example.net", "127.0.0.2", tls="self-signed")
        self.world.publish("example.net", "testing", ["mx1.example.net"], policy_id="one")
        [first] = yield self.world.mx(spool=spool).deliver(message_to(RCPT), [RCPT])
        self.assertTrue(first.delivered)
        # A new id, but the policy host now fails: the cached policy (on disk) stays in force, even for
        # a new MXDelivery (a restart).
        self.world.zone(("_mta-sts.example.net", "TXT"), ["v=STSv1; id=two;"])
        self.world.policies.mode["example.net"] = "500"
        self.world.reports.records.clear()
        [second] = yield self.world.mx(spool=spool).deliver(message_to(RCPT), [RCPT])
        self.assertTrue(second.delivered)
        self.assertEqual(self.world.policies.fetches("example.net"), 2)
        self.assertEqual(self.world.reports.results(), [("sts", None, "sts-policy-fetch-error", False),
                                                        ("sts", "mx1.example.net", "certificate-not-trusted", False)])
        self.assertEqual(PolicyCache(spool).domains(), ["example.net"])

    @defer.inlineCallbacks
    def test_the_same_id_uses_the_cache_and_a_new_id_fetches_again(self):
        self.world.exchanger("mx1.example.net", "127.0.0.2", tls="good")
        self.world.publish("example.net", "enforce", ["mx1.example.net"], policy_id="one")
        mx = self.world.mx(spool=self.mktemp())
        for _ in range(2):
            [r] = yield mx.deliver(message_to(RCPT), [RCPT])
            self.assertTrue(r.delivered, r)
        self.assertEqual(self.world.policies.fetches("example.net"), 1)
        # One connection, kept for the second message: one TLS session to report.
        self.assertEqual((len(self.world.sinks["mx1.example.net"].sessions), len(self.world.reports.records)), (1, 1))
        # The domain moves its mail: a new policy under a new id is fetched and obeyed at once.
        self.world.publish("example.net", "enforce", ["mx9.example.net"], policy_id="two")
        [r] = yield mx.deliver(message_to(RCPT), [RCPT])
        self.assertEqual(self.world.policies.fetches("example.net"), 2)
        self.assertEqual(r.status, "4.7.5", r)

    @defer.inlineCallbacks
    def test_a_vanished_txt_record_keeps_the_cached_policy(self):
        sink = self.world.exchanger("mx1.example.net", "127.0.0.2", tls="self-signed")
        self.world.publish("example.net", "enforce", ["mx1.example.net"])
        mx = self.world.mx()
        [r] = yield mx.deliver(message_to(RCPT), [RCPT])
        self.assertEqual(r.status, "4.7.5")
        # RFC 8461 5.1: an attacker who removes the TXT record does not remove the policy.
        self.world.dns.remove("_mta-sts.example.net", "TXT")
        [r] = yield mx.deliver(message_to(RCPT), [RCPT])
        self.assertEqual(r.status, "4.7.5", r)
        self.assertEqual(sink.messages, [])


class VerifyModeTests(unittest.TestCase):
    """`[delivery] tls = "verify"` checks the chain against `[delivery] ca_file` and the MX name."""

    timeout = 60

    def setUp(self):
        self.world = World(self)
        self.world.zone(("example.net", "MX"), ["10 mx1.example.net."])

    @defer.inlineCallbacks
    def test_a_certificate_from_the_ca_file_is_verified(self):
        self.world.exchanger("mx1.example.net", "127.0.0.2", tls="good")
        [result] = yield self.world.mx(tls="verify").deliver(message_to(RCPT), [RCPT])
        self.assertEqual((result.code, result.tls_verified, result.tls_verified_by), (250, True, "verify"))

    @defer.inlineCallbacks
    def test_without_the_ca_file_the_same_certificate_is_not_trusted(self):
        sink = self.world.exchanger("mx1.example.net", "127.0.0.2", tls="good")
        [result] = yield self.world.mx(tls="verify", ca_file=None).deliver(message_to(RCPT), [RCPT])
        self.assertEqual(result.status, "4.7.5", result)
        self.assertIn("certificate-not-trusted", result.text)
        self.assertEqual(sink.messages, [])
