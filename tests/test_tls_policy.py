"""The TLS policy plan of direct delivery (outbound.tlspolicy) without the network: which exchanger gets
DANE, MTA-STS or `[delivery] tls`, from fake lookups and a fixed MTA-STS answer; the seams' interfaces;
what the ITLSReportSink and the metric are told."""
from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from mailrelay.outbound.client import DeliveryClient
from mailrelay.outbound.dane import TLSA
from mailrelay.outbound.dns import Lookup, MXHost, MXResolver, temporary
from mailrelay.outbound.mtasts import StsAnswer, parse_policy
from mailrelay.queue.results import SessionResult
from mailrelay.outbound.tlsinfo import Negotiated
from mailrelay.outbound.tlspolicy import NoReports, TLSPolicies
from mailrelay.outbound.tlsverify import PolicyTLS, UnverifiedTLS, Verdict
from mailrelay.interfaces import IDNSLookup, ITLSPeerCheck, ITLSReportSink, ITLSVerification
from mailrelay.metrics import Metrics
from tests.support.tlsworld import RecordingReports

POLICY = parse_policy(b"version: STSv1\nmode: enforce\nmx: *.example.net\nmax_age: 86400\n")
EE = TLSA(3, 1, 1, b"\x01" * 32)


@implementer(IDNSLookup)
class FakeTLSA:
    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def lookup(self, name, rdtype):
        self.asked.append((name, rdtype))
        value = self.answers.get(name)
        if value == "servfail":
            return defer.fail(temporary(name, "SERVFAIL"))
        if value is None:
            return defer.succeed(Lookup((), True, exists=False))
        records, authenticated = value
        return defer.succeed(Lookup(tuple(records), authenticated))


class FixedSTS:
    def __init__(self, answer):
        self.answer = answer

    def policy_for(self, domain):
        return defer.succeed(self.answer)


class _Rdata:
    def __init__(self, r: TLSA):
        self.usage, self.selector, self.mtype, self.cert = r.usage, r.selector, r.mtype, r.data


class PlanTests(unittest.TestCase):
    def plan(self, hosts, tlsa=None, sts=None, tls="opportunistic", dane=True):
        self.lookup = FakeTLSA(tlsa or {})
        self.reports = RecordingReports()
        self.metrics = Metrics()
        policies = TLSPolicies(tls, lookup=self.lookup, mtasts=FixedSTS(sts) if sts else None, dane=dane,
                               sink=self.reports, metrics=self.metrics)
        self.policies = policies
        return self.successResultOf(policies.plan("example.net", hosts))

    def test_no_policy_is_the_delivery_tls_setting(self):
        [plan] = self.plan([MXHost("mx1.example.net", 10, ("127.0.0.2",))], tls="required")
        self.assertEqual((plan.kind, plan.security, plan.plaintext_fallback, plan.policy_type),
                         ("required", "starttls", False, "no-policy-found"))
        self.assertIsInstance(plan.tls_options, UnverifiedTLS)
        self.assertEqual(self.lookup.asked, [])          # the MX answer was not authenticated: no TLSA asked

    def test_secure_hosts_with_usable_records_get_dane_over_mta_sts(self):
        secure = MXHost("mx1.other.example", 10, ("127.0.0.2",), secure=True)
        plans = self.plan([secure, MXHost("mx2.example.net", 20, ("127.0.0.3",))],
                          tlsa={"_25._tcp.mx1.other.example": ([_Rdata(EE)], True)}, sts=StsAnswer(POLICY, "1"))
        self.assertEqual([(p.kind, p.security, p.refusal) for p in plans],
                         [("dane", "starttls", None), ("mta-sts", "starttls", None)])
        self.assertEqual(plans[0].tls_options.records, (EE,))
        self.assertEqual(plans[0].policy_strings, (EE.text(),))

    def test_an_mx_outside_an_enforced_policy_is_refused(self):
        [plan] = self.plan([MXHost("mx.elsewhere.example", 10, ("127.0.0.2",))], sts=StsAnswer(POLICY, "1"))
        self.assertEqual((plan.refusal.code, plan.refusal.status), (451, "4.7.5"))

    def test_unauthenticated_or_absent_tlsa_is_no_dane(self):
        secure = MXHost("mx1.example.net", 10, ("127.0.0.2",), secure=True)
        [plan] = self.plan([secure], tlsa={"_25._tcp.mx1.example.net": ([_Rdata(EE)], False)})
        self.assertEqual(plan.kind, "opportunistic")
        [plan] = self.plan([secure])
        self.assertEqual(plan.kind, "opportunistic")

    def test_a_failed_tlsa_lookup_refuses_the_host_and_is_reported(self):
        secure = MXHost("mx1.example.net", 10, ("127.0.0.2",), secure=True)
        [plan] = self.plan([secure], tlsa={"_25._tcp.mx1.example.net": "servfail"})
        self.assertEqual(plan.refusal.status, "4.7.5")
        self.policies.refused(plan)
        self.assertEqual(self.reports.results(), [("tlsa", "mx1.example.net", "dnssec-invalid", False)])
        self.assertEqual(self.metrics.registry.get_sample_value(
            "mailrelay_tls_policy_results_total", {"policy": "tlsa", "result": "dnssec-invalid"}), 1.0)

    def test_dane_off_asks_nothing(self):
        secure = MXHost("mx1.example.net", 10, ("127.0.0.2",), secure=True)
        self.plan([secure], tlsa={"_25._tcp.mx1.example.net": ([_Rdata(EE)], True)}, dane=False)
        self.assertEqual(self.lookup.asked, [])

    def test_a_policy_fetch_problem_is_reported_without_an_mx_host(self):
        self.plan([MXHost("mx1.example.net", 10, ("127.0.0.2",))],
                  sts=StsAnswer(None, "1", ("sts-policy-fetch-error", "HTTP status 500")))
        self.assertEqual(self.reports.results(), [("sts", None, "sts-policy-fetch-error", False)])

    def test_session_outcomes(self):
        [plan] = self.plan([MXHost("mx1.example.net", 10, ("127.0.0.2",))], sts=StsAnswer(POLICY, "1"))
        self.policies.report(plan, SessionResult((), tls="TLSv1.3", tls_verdict=Verdict("mta-sts")))
        self.policies.report(plan, SessionResult((), starttls_missing=True))
        self.policies.report(plan, SessionResult((), before_mail=True))          # no connection: nothing
        self.assertEqual(self.reports.results(), [("sts", "mx1.example.net", None, True),
                                                  ("sts", "mx1.example.net", "starttls-not-supported", False)])

    def test_a_failing_sink_never_breaks_delivery(self):
        @implementer(ITLSReportSink)
        class Broken:
            def record(self, *args):
                raise RuntimeError("disk full")
        policies = TLSPolicies("opportunistic", sink=Broken())
        [plan] = self.successResultOf(policies.plan("example.net", [MXHost("mx1.example.net", 10, ("127.0.0.2",))]))
        policies.report(plan, SessionResult((), tls="TLSv1.3"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class InterfaceTests(unittest.TestCase):
    def test_the_seams(self):
        verifyClass(ITLSReportSink, NoReports)
        verifyClass(ITLSReportSink, RecordingReports)
        verifyClass(IDNSLookup, MXResolver)
        verifyClass(ITLSPeerCheck, PolicyTLS)
        verifyObject(ITLSPeerCheck, PolicyTLS("mx.example.net", "dane", records=(EE,)))
        self.assertTrue(ITLSVerification.implementedBy(DeliveryClient))
        verifyObject(ITLSVerification, Negotiated("tls1.3", True, tls_verified_by="dane"))

    def test_replies_name_the_policy(self):
        options = PolicyTLS("mx.example.net", "mta-sts", policy="the MTA-STS policy of example.net")
        self.assertEqual(options.without_starttls("mx.example.net[127.0.0.2]"),
                         ("4.7.4", "TLS is required by the MTA-STS policy of example.net, but "
                                   "mx.example.net[127.0.0.2] does not offer STARTTLS"))
        self.assertEqual(PolicyTLS("mx.example.net", "dane").without_starttls("mx")[0], "4.7.5")


def _handshake(client, server_context):
    """Run a TLS handshake between two pyOpenSSL connections over memory BIOs; the server connection."""
    from OpenSSL import SSL
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    for _ in range(50):
        for one in (client, server):
            try:
                one.do_handshake()
            except SSL.WantReadError:
                pass
        moved = False
        for source, target in ((client, server), (server, client)):
            try:
                data = source.bio_read(65536)
            except SSL.WantReadError:
                continue
            target.bio_write(data)
            moved = True
        if not moved:
            break
    return server


class UnverifiedContextTests(unittest.TestCase):
    """Opportunistic TLS ("opportunistic"/"required", unusable TLSA) for many exchangers: one SSL context
    for all of them, however many names — building a context per exchanger made every delivery to a
    domain beyond TLS_KEPT's names pay for one — and each connection still names its own host (SNI)."""

    def test_exchangers_beyond_the_kept_ones_share_one_context(self):
        from mailrelay.outbound.tlspolicy import TLS_KEPT
        policies = TLSPolicies("opportunistic")
        names = [f"mx.d{n}.example" for n in range(TLS_KEPT + 20)]
        contexts = set()
        for _ in range(2):                          # round robin over more names than are kept
            for name in names:
                [plan] = self.successResultOf(policies.plan(name[3:], [MXHost(name, 10, ("127.0.0.2",))]))
                self.assertIsInstance(plan.tls_options, UnverifiedTLS)
                contexts.add(id(plan.tls_options.clientConnectionForTLS(None).get_context()))
        self.assertEqual(len(contexts), 1)
        required = TLSPolicies("required")
        [plan] = self.successResultOf(required.plan("other.example", [MXHost("mx.other.example", 10, ("127.0.0.3",))]))
        self.assertEqual({id(plan.tls_options.clientConnectionForTLS(None).get_context())}, contexts)

    def test_each_connection_on_the_shared_context_names_its_own_host(self):
        from OpenSSL import SSL

        from tests.support import testca
        pair = testca.issue(self.mktemp(), "mx.a.example")
        named: list = []
        server_context = SSL.Context(SSL.TLS_SERVER_METHOD)
        server_context.use_certificate_file(str(pair.cert))
        server_context.use_privatekey_file(str(pair.key))
        server_context.set_tlsext_servername_callback(lambda connection: named.append(connection.get_servername()))
        versions = []
        for name in ("mx.a.example", "mx.b.example", "127.0.0.2"):
            client = UnverifiedTLS(name).clientConnectionForTLS(None)
            server = _handshake(client, server_context)
            # the certificate names mx.a.example only: not checked, so every handshake completes
            self.assertIsNotNone(server.get_cipher_name())
            self.assertIsNotNone(client.get_peer_certificate())
            versions.append(client.get_protocol_version_name())
        self.assertEqual(named, [b"mx.a.example", b"mx.b.example", None])   # an address literal: no SNI (RFC 6066 3)
        self.assertTrue(all(v in ("TLSv1.2", "TLSv1.3") for v in versions), versions)
        old = SSL.Context(SSL.TLS_SERVER_METHOD)
        old.use_certificate_file(str(pair.cert))
        old.use_privatekey_file(str(pair.key))
        old.set_max_proto_version(SSL.TLS1_1_VERSION)
        client = UnverifiedTLS("mx.c.example").clientConnectionForTLS(None)
        self.assertRaises(SSL.Error, _handshake, client, old)     # the shared context keeps TLS 1.2 at least


class PolicyContextTests(unittest.TestCase):
    """`verify`, MTA-STS and DANE options for many exchangers: one options object per exchanger and policy
    (what a reused connection is matched by), all over one SSL context per kind — building one, the
    system's trust loaded into it, per batch past TLS_KEPT exchangers cost tens of milliseconds — and the
    checks still judge each connection by its own exchanger's name."""

    def test_exchangers_beyond_the_kept_ones_share_one_context_per_kind(self):
        from mailrelay.outbound.tlspolicy import TLS_KEPT
        policies = TLSPolicies("verify")
        names = [f"mx.d{n}.example" for n in range(TLS_KEPT + 20)]
        contexts = set()
        for _ in range(2):
            for name in names:
                [plan] = self.successResultOf(policies.plan(name[3:], [MXHost(name, 10, ("127.0.0.2",))]))
                self.assertIsInstance(plan.tls_options, PolicyTLS)
                self.assertEqual(plan.tls_options.hostname, name)
                contexts.add(id(plan.tls_options.clientConnectionForTLS(None).get_context()))
        self.assertEqual(len(contexts), 1)

        dane = policies._options("mx.d0.example", "dane", records=(EE,))
        self.assertNotIn(id(dane.clientConnectionForTLS(None).get_context()), contexts)
        self.assertIs(policies._options("mx.d1.example", "dane", records=(EE,)).clientConnectionForTLS(None)
                      .get_context(), dane.clientConnectionForTLS(None).get_context())

    def test_each_connection_on_the_shared_context_is_judged_by_its_own_name(self):
        from OpenSSL import SSL

        from mailrelay.outbound.tlsverify import load_trust
        from tests.support import testca
        pair = testca.issue(self.mktemp(), "mx.a.example")
        other = testca.issue(self.mktemp(), "mx.a.example")          # another CA: not trusted
        policies = TLSPolicies("verify", ca_file=pair.ca)
        self.assertIsNotNone(load_trust(pair.ca))

        def server(issued):
            context = SSL.Context(SSL.TLS_SERVER_METHOD)
            context.use_certificate_file(str(issued.cert))
            context.use_privatekey_file(str(issued.key))
            return context

        verdicts = []
        for name, issued in (("mx.a.example", pair), ("mx.b.example", pair), ("mx.a.example", other)):
            [plan] = self.successResultOf(policies.plan(name[3:], [MXHost(name, 10, ("127.0.0.2",))]))
            client = plan.tls_options.clientConnectionForTLS(None)
            _handshake(client, server(issued))
            verdicts.append(plan.tls_options.check(client).result_type)
        self.assertEqual(verdicts, [None, "certificate-host-mismatch", "certificate-not-trusted"])
