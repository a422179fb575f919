"""mailrelay.outbound.starttls: the TLS side of one outgoing connection, on its own — its inputs are the
security mode, the TLS options, the server's name and EHLO keywords, and a transport (a StringTransport
that can start TLS); the delivery client's use of it is in test_delivery_client and test_tls_policy."""
from __future__ import annotations

from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import directlyProvides, implementer

from mailrelay.outbound.starttls import StartTLS, TLSFailed
from mailrelay.outbound.tlsverify import Verdict
from mailrelay.interfaces import ITLSPeerCheck
from tests.support.esmtp import TLSStringTransport


@implementer(ITLSPeerCheck)
class Policy:
    """ITLSPeerCheck options whose check gives a fixed verdict."""

    def __init__(self, verdict: Verdict):
        self.verdict, self.checked = verdict, []

    def check(self, connection):
        self.checked.append(connection)
        return self.verdict

    def without_starttls(self, host):
        return "4.7.5", f"the policy needs TLS; {host} offers no STARTTLS"

    def refusal(self, host, verdict):
        return f"{host}: {verdict.result_type}: {verdict.detail}"


class HandleTransport(TLSStringTransport):
    """A transport whose TLS "handle" is a marker (tlsinfo.negotiated copes with one it cannot read)."""
    handle = object()

    def getHandle(self):
        return self.handle


class StartTLSTests(unittest.TestCase):
    def test_plain_connection_under_implicit_tls_is_refused(self):
        tls = StartTLS("tls", object(), "mx.test[127.0.0.1]")
        with self.assertRaises(TLSFailed) as caught:
            tls.connected(StringTransport())
        self.assertEqual(caught.exception.failure,
                         (421, "4.7.5", "implicit TLS to mx.test[127.0.0.1] requested, but the connection is plain"))
        self.assertFalse(tls.active)

    def test_an_ssl_transport_is_active_and_a_loss_before_any_reply_is_a_failed_handshake(self):
        tls = StartTLS("tls", object(), "mx.test")
        transport = StringTransport()
        directlyProvides(transport, ISSLTransport)
        tls.connected(transport)
        self.assertTrue(tls.active)
        self.assertEqual(tls.lost("reset"), (421, "4.7.5", "TLS handshake with mx.test failed: reset"))
        self.assertTrue(tls.failed)

    def test_a_reply_through_tls_means_a_later_loss_is_no_handshake_failure(self):
        tls = StartTLS("tls", object(), "mx.test")
        transport = StringTransport()
        directlyProvides(transport, ISSLTransport)
        tls.connected(transport)
        tls.heard()
        self.assertIsNone(tls.lost("reset"))
        self.assertFalse(tls.failed)

    def test_starttls_is_asked_for_only_when_wanted_offered_and_not_active(self):
        offered = {b"STARTTLS": b""}
        self.assertTrue(StartTLS("opportunistic", object(), "mx").wanted(offered))
        self.assertTrue(StartTLS("starttls", object(), "mx").wanted(offered))
        self.assertFalse(StartTLS("none", object(), "mx").wanted(offered))
        self.assertFalse(StartTLS("opportunistic", None, "mx").wanted(offered))
        opportunistic = StartTLS("opportunistic", object(), "mx")
        self.assertFalse(opportunistic.wanted({}))
        self.assertTrue(opportunistic.missing)

    def test_required_tls_not_offered_fails_with_the_policys_words_when_there_is_one(self):
        with self.assertRaises(TLSFailed) as plain:
            StartTLS("starttls", object(), "mx.test").wanted({b"PIPELINING": b""})
        self.assertEqual(plain.exception.failure,
                         (451, "4.7.4", "TLS is required, but mx.test does not offer STARTTLS"))
        tls = StartTLS("starttls", Policy(Verdict("dane")), "mx.test")
        with self.assertRaises(TLSFailed) as policy:
            tls.wanted({})
        self.assertEqual(policy.exception.failure, (451, "4.7.5", "the policy needs TLS; mx.test offers no STARTTLS"))
        self.assertTrue(tls.missing)

    def test_a_refused_starttls_ends_only_required_sessions_or_a_421(self):
        self.assertFalse(StartTLS("opportunistic", object(), "mx").refusal_ends_session(454))
        self.assertTrue(StartTLS("opportunistic", object(), "mx").refusal_ends_session(421))
        self.assertTrue(StartTLS("starttls", object(), "mx").refusal_ends_session(454))

    def test_start_hands_the_options_to_the_transport(self):
        options = object()
        tls, transport = StartTLS("starttls", options, "mx"), TLSStringTransport()
        tls.start(transport)
        self.assertIs(transport.tls_started_with, options)
        self.assertTrue(tls.active)
        self.assertIsNone(tls.protection)          # no handshake yet: nothing negotiated to go by

    def test_a_transport_that_cannot_start_tls_is_a_failure_naming_the_server(self):
        tls = StartTLS("opportunistic", object(), "mx.test")
        with self.assertRaises(TLSFailed) as caught:
            tls.start(StringTransport())            # no startTLS at all
        self.assertEqual(caught.exception.failure[:2], (421, "4.7.5"))
        self.assertIn("cannot start TLS with mx.test", caught.exception.failure[2])
        self.assertTrue(tls.failed)

    def test_the_handshake_is_judged_by_the_policy_and_a_pass_says_who_verified(self):
        policy = Policy(Verdict("dane"))
        tls, transport = StartTLS("starttls", policy, "mx.test"), HandleTransport()
        tls.start(transport)
        tls.handshake_completed(transport)
        self.assertEqual(policy.checked, [transport.handle])
        self.assertEqual((tls.tls_verified_by, tls.verdict), ("dane", Verdict("dane")))
        self.assertIs(tls.protection, tls.negotiated)

    def test_an_enforced_failed_verdict_ends_the_session_and_an_unenforced_one_does_not(self):
        bad = Verdict(None, "certificate-host-mismatch", "CN is other.test")
        tls, transport = StartTLS("starttls", Policy(bad), "mx.test"), HandleTransport()
        with self.assertRaises(TLSFailed) as caught:
            tls.handshake_completed(transport)
        self.assertEqual(caught.exception.failure,
                         (421, "4.7.5", "mx.test: certificate-host-mismatch: CN is other.test"))
        testing = Verdict(None, "certificate-host-mismatch", "CN is other.test", enforce=False)
        tls = StartTLS("starttls", Policy(testing), "mx.test")
        tls.handshake_completed(transport)
        self.assertIsNone(tls.tls_verified_by)
        self.assertIs(tls.verdict, testing)
