"""DSN (RFC 3461) and REQUIRETLS (RFC 8689) parameters: xtext, the MAIL/RCPT parameter parser, what a
server session offers, refuses and keeps in the envelope (StringTransport and task.Clock), what the
delivery side passes on (outbound.offer), and how the spool keeps it (old files, unknown fields)."""
from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import alsoProvides, implementer
from zope.interface.verify import verifyObject

from mailrelay import config, dsnparams
from mailrelay.outbound import offer
from mailrelay.queue.job import Job
from mailrelay.queue.state import DELIVERED, MessageState, RecipientState
from mailrelay.outbound.tlsinfo import Negotiated
from mailrelay.envelope import Envelope
from mailrelay.interfaces import ISpooledMessage
from mailrelay.server import addresses
from mailrelay.server.factory import RelayServerFactory
from tests.support.fakes import AllowAllPolicy, FakeQueue, TLSStringTransport


class XtextTests(unittest.TestCase):
    def test_decodes_hexchars_and_plain_characters(self):
        self.assertEqual(dsnparams.xtext_decode("a+2Bb+3Dc+20d"), "a+b=c d")
        self.assertEqual(dsnparams.xtext_decode(""), "")

    def test_refuses_what_is_not_xtext(self):
        for bad in ("a+2b", "a+", "a+G0", "a=b", "a b", "caf\u00e9", "a\x01"):
            with self.assertRaises(dsnparams.XtextError, msg=bad):
                dsnparams.xtext_decode(bad)

    def test_refuses_a_decoded_control_character(self):
        # RFC 3461 4.2 / 4.4: the decoded value is printable US-ASCII only (no CR/LF for a DSN field).
        for bad in ("a+0Db", "a+0A", "+7F", "+80"):
            with self.assertRaises(dsnparams.XtextError, msg=bad):
                dsnparams.xtext_decode(bad)

    def test_encode_round_trips(self):
        for text in ("plain", "a+b=c d", "~!", "100%"):
            encoded = dsnparams.xtext_encode(text)
            self.assertNotIn(" ", encoded)
            self.assertNotIn("=", encoded)
            self.assertEqual(dsnparams.xtext_decode(encoded), text)
        self.assertEqual(dsnparams.xtext_encode("a+b=c d"), "a+2Bb+3Dc+20d")


class ParserTests(unittest.TestCase):
    def mail(self, params: str):
        return addresses.parse_mail("FROM:<a@example.org> " + params)

    def rcpt(self, params: str):
        return addresses.parse_rcpt("TO:<b@example.net> " + params)

    def assertReply(self, parsed, code: int, status: str):
        self.assertIsInstance(parsed, addresses.Reply, parsed)
        self.assertEqual((parsed.code, parsed.status), (code, status))

    def test_mail_parameters_are_kept(self):
        parsed = self.mail("RET=hdrs ENVID=QQ+2B1 REQUIRETLS SIZE=10")
        self.assertEqual(parsed.params, {"RET": "HDRS", "ENVID": "QQ+1", "REQUIRETLS": True})
        self.assertEqual(parsed.size, 10)

    def test_bad_mail_values_are_501(self):
        for params in ("RET=ALL", "RET", "ENVID", "ENVID=" + "x" * 101, "ENVID=a+2b", "ENVID=a+0D",
                       "REQUIRETLS=YES", "RET=FULL RET=HDRS", "ENVID=a ENVID=b"):
            self.assertReply(self.mail(params), 501, "5.5.4")

    def test_envid_of_100_characters_is_taken(self):
        self.assertEqual(self.mail("ENVID=" + "x" * 100).params["ENVID"], "x" * 100)

    def test_unknown_parameters_are_555(self):
        self.assertReply(self.mail("XFOO=1"), 555, "5.5.4")
        self.assertReply(self.mail("NOTIFY=NEVER"), 555, "5.5.4")      # a RCPT parameter on MAIL
        self.assertReply(self.rcpt("RET=FULL"), 555, "5.5.4")          # and the other way round

    def test_notify_values(self):
        self.assertEqual(self.rcpt("NOTIFY=never").params, {"NOTIFY": "NEVER"})
        self.assertEqual(self.rcpt("NOTIFY=delay,Success").params, {"NOTIFY": "DELAY,SUCCESS"})
        for bad in ("NOTIFY=NEVER,FAILURE", "NOTIFY=FAILURE,NEVER", "NOTIFY=", "NOTIFY", "NOTIFY=FAIL",
                    "NOTIFY=SUCCESS,SUCCESS", "NOTIFY=SUCCESS,", "NOTIFY=NEVER NOTIFY=NEVER"):
            self.assertReply(self.rcpt(bad), 501, "5.5.4")

    def test_orcpt_values(self):
        self.assertEqual(self.rcpt("ORCPT=rfc822;B+2Bx@example.net").params, {"ORCPT": "rfc822;B+x@example.net"})
        self.assertEqual(self.rcpt("NOTIFY=SUCCESS ORCPT=rfc822;b@example.net").params,
                         {"NOTIFY": "SUCCESS", "ORCPT": "rfc822;b@example.net"})
        self.assertEqual(self.rcpt("ORCPT=rfc822;" + "x" * 493).params["ORCPT"], "rfc822;" + "x" * 493)
        for bad in ("ORCPT=b@example.net", "ORCPT=;b@example.net", "ORCPT=rfc822;", "ORCPT=rfc822;a+2g",
                    "ORCPT=rfc822;" + "x" * 494, "ORCPT=rf(c;x", "ORCPT=rfc822;a ORCPT=rfc822;b"):
            self.assertReply(self.rcpt(bad), 501, "5.5.4")

    def test_postmaster_keeps_its_parameters(self):
        parsed = addresses.parse_rcpt("TO:<Postmaster> NOTIFY=NEVER")
        self.assertEqual((parsed.recipient, parsed.params), ("postmaster", {"NOTIFY": "NEVER"}))


class Session:
    """A relay listener's session over StringTransport: raw lines in, replies out."""

    def __init__(self, tls: bool = False, postmaster: str = ""):
        self.queue = FakeQueue()
        factory = RelayServerFactory(
            hostname="relay.test", listener=config.Listener("relay", "tcp:0", False), limits=config.Limits(),
            portal=None, mechanisms=(), policy=AllowAllPolicy(), queue=self.queue, tls_options=object(),
            clock=Clock(),
        )
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        self.transport = TLSStringTransport(peerAddress=address)
        if tls:
            alsoProvides(self.transport, ISSLTransport)
        self.protocol = factory.buildProtocol(address)
        self.protocol.makeConnection(self.transport)

    def send(self, line: str) -> str:
        self.transport.clear()
        self.protocol.dataReceived(line.encode("latin-1") + b"\r\n")
        return self.transport.value().decode("latin-1")

    def code(self, line: str) -> str:
        return " ".join(self.send(line).split(" ")[:2])

    def message(self, *lines: str):
        for line in lines:
            self.send(line)
        self.send("DATA")
        self.protocol.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        return self.queue.messages[-1].envelope


class SessionTests(unittest.TestCase):
    def test_dsn_offered_in_plaintext_requiretls_only_under_tls(self):
        plain = Session().send("EHLO client.test").splitlines()
        self.assertIn("250-DSN", plain)
        self.assertFalse(any("REQUIRETLS" in line for line in plain))
        under_tls = Session(tls=True).send("EHLO client.test").splitlines()
        self.assertIn("250-DSN", under_tls)
        self.assertTrue(any(line[4:] == "REQUIRETLS" for line in under_tls), under_tls)

    def test_requiretls_before_tls_is_530(self):
        session = Session()
        session.send("EHLO client.test")
        self.assertEqual(session.code("MAIL FROM:<a@example.org> REQUIRETLS"), "530 5.7.10")
        self.assertEqual(session.code("MAIL FROM:<a@example.org>"), "250 2.1.0")   # nothing was begun

    def test_parameters_reach_the_envelope(self):
        session = Session(tls=True)
        session.send("EHLO client.test")
        envelope = session.message(
            "MAIL FROM:<a@example.org> RET=HDRS ENVID=id+2B1 REQUIRETLS",
            "RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B@example.net",
            "RCPT TO:<c@example.net>",
            "RCPT TO:<b@example.net> NOTIFY=NEVER",          # a repeat: the first one's parameters stay
        )
        self.assertEqual(envelope.recipients, ("b@example.net", "c@example.net"))
        self.assertEqual(envelope.params, {
            "RET": "HDRS", "ENVID": "id+1", "REQUIRETLS": True,
            "RCPT": {"b@example.net": {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;B@example.net"}}})
        self.assertEqual(dsnparams.notify(envelope, "b@example.net"), {"SUCCESS", "FAILURE"})
        self.assertIsNone(dsnparams.notify(envelope, "c@example.net"))
        self.assertTrue(dsnparams.wants(envelope, "c@example.net", "DELAY"))    # RFC 3461 4.1 default
        self.assertFalse(dsnparams.wants(envelope, "b@example.net", "DELAY"))

    def test_a_rejected_parameter_leaves_the_transaction_as_it_was(self):
        session = Session()
        session.send("EHLO client.test")
        self.assertEqual(session.code("MAIL FROM:<a@example.org> RET=SOME"), "501 5.5.4")
        self.assertEqual(session.code("MAIL FROM:<a@example.org>"), "250 2.1.0")
        self.assertEqual(session.code("RCPT TO:<b@example.net> NOTIFY=NEVER,SUCCESS"), "501 5.5.4")
        envelope = session.message("RCPT TO:<b@example.net>")
        self.assertEqual(envelope.params, {})

    def test_a_long_orcpt_fits_the_command_line(self):
        session = Session()
        session.send("EHLO client.test")
        session.send("MAIL FROM:<a@example.org> ENVID=" + "e" * 100)
        line = "RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;" + "x" * 480
        self.assertGreater(len(line), 510)
        self.assertEqual(session.code(line), "250 2.1.5")


def job(params: dict, recipients=("b@example.net",), sender="a@example.org") -> Job:
    envelope = Envelope(sender=sender, recipients=tuple(recipients), received_at=0.0, params=params)

    @implementer(ISpooledMessage)
    class Message:
        queue_id, path, size = "Q1", None, 100

        def open(self):
            raise NotImplementedError("the MAIL and RCPT parameters never need the body")
    message = Message()
    message.envelope = envelope
    return Job(message, tuple(recipients))


DSN_PARAMS = {"RET": "FULL", "ENVID": "x+y z", "REQUIRETLS": True,
              "RCPT": {"b@example.net": {"NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;B=x@example.net"}}}
VERIFIED = Negotiated("tls1.3", True, "TLSv1.3", "TLS_AES_128_GCM_SHA256", "pkix")
UNVERIFIED = Negotiated("tls1.3", False, "TLSv1.3", "TLS_AES_128_GCM_SHA256")


class OfferTests(unittest.TestCase):
    def test_parameters_go_xtext_encoded_to_a_hop_with_dsn(self):
        the_job = job(DSN_PARAMS)
        extensions = {b"DSN": b"", b"SIZE": b"", b"REQUIRETLS": b""}
        self.assertEqual(offer.mail_command(the_job, extensions),
                         b"MAIL FROM:<a@example.org> SIZE=100 RET=FULL ENVID=x+2By+20z REQUIRETLS")
        self.assertEqual(offer.rcpt_command(the_job, "b@example.net", extensions),
                         b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;B+3Dx@example.net")

    def test_transaction_parameters_for_another_sender_of_spooled_mail(self):
        envelope = job(DSN_PARAMS, recipients=("b@example.net", "c@example.net")).message.envelope
        mail, rcpts = offer.transaction_parameters(envelope, ("b@example.net", "c@example.net"),
                                                   {b"DSN": b"", b"SIZE": b"1000"}, size=42)
        self.assertEqual(mail, [b"SIZE=42", b"RET=FULL", b"ENVID=x+2By+20z"])      # no REQUIRETLS offered
        self.assertEqual(rcpts, {"b@example.net": [b"NOTIFY=SUCCESS,DELAY", b"ORCPT=rfc822;B+3Dx@example.net"],
                                 "c@example.net": []})

    def test_nothing_goes_to_a_hop_without_dsn(self):
        the_job = job(DSN_PARAMS)
        self.assertEqual(offer.mail_command(the_job, {}), b"MAIL FROM:<a@example.org>")
        self.assertEqual(offer.rcpt_command(the_job, "b@example.net", {}), b"RCPT TO:<b@example.net>")
        self.assertEqual(offer.rcpt_parameters(the_job.message.envelope, "c@example.net", {b"DSN": b""}), [])

    def test_requiretls_needs_verified_tls_and_the_extension(self):
        the_job = job({"REQUIRETLS": True})
        ext = {b"REQUIRETLS": b""}
        self.assertEqual(offer.refusal(the_job, ext, "mx", None)[:2], (550, "5.7.10"))
        self.assertEqual(offer.refusal(the_job, ext, "mx", None, after_tls_failure=True)[:2], (451, "4.7.10"))
        self.assertEqual(offer.refusal(the_job, ext, "mx", UNVERIFIED)[:2], (550, "5.7.10"))
        self.assertEqual(offer.refusal(the_job, {}, "mx", VERIFIED)[:2], (550, "5.7.30"))
        self.assertIsNone(offer.refusal(the_job, ext, "mx", VERIFIED))
        self.assertIsNone(offer.refusal(job({}), {}, "mx", None))

    def test_a_bounce_of_a_requiretls_message_is_never_held_back(self):
        # RFC 8689 5: REQUIRETLS SHOULD NOT cause a bounce (from <>) to be discarded.
        the_job = job({"REQUIRETLS": True}, sender="")
        self.assertIsNone(offer.refusal(the_job, {}, "mx", None))
        self.assertEqual(offer.mail_command(the_job, {b"REQUIRETLS": b""}), b"MAIL FROM:<> REQUIRETLS")


class StorageTests(unittest.TestCase):
    def test_params_survive_the_spool_line(self):
        envelope = Envelope(sender="a@example.org", recipients=("b@example.net",), received_at=1.0,
                            params=DSN_PARAMS)
        again = Envelope.from_json(envelope.to_json())
        self.assertEqual(again.params, DSN_PARAMS)
        self.assertEqual(dsnparams.orcpt(again, "b@example.net"), "rfc822;B=x@example.net")
        self.assertTrue(dsnparams.requiretls(again))

    def test_an_old_spool_line_has_no_requests(self):
        old = b'{"recipients":["b@example.net"],"sender":"a@example.org","received_at":1.0}'
        envelope = Envelope.from_json(old)
        self.assertEqual((dsnparams.ret(envelope), dsnparams.envid(envelope)), (None, None))
        self.assertTrue(dsnparams.wants(envelope, "b@example.net", "FAILURE"))
        self.assertFalse(dsnparams.wants(envelope, "b@example.net", "SUCCESS"))

    def test_a_field_from_a_newer_version_is_left_aside(self):
        newer = b'{"recipients":["b@example.net"],"sender":"a@example.org","received_at":1.0,"later":[1]}'
        self.assertEqual(Envelope.from_json(newer).recipients, ("b@example.net",))

    def test_params_that_are_not_an_object_are_refused(self):
        with self.assertRaises(ValueError):
            Envelope.from_json(b'{"recipients":[],"sender":"","received_at":1.0,"params":[1]}')

    def test_a_due_success_report_survives_the_state_file(self):
        state = MessageState((RecipientState("b@example.net", attempts=1, done=DELIVERED, dsn="relayed"),))
        again = MessageState.from_dict(state.to_dict(), ["b@example.net"])
        self.assertEqual(again.recipients[0].dsn, "relayed")
        self.assertEqual(len(again.unreported), 1)
        self.assertFalse(again.finished)
        plain = MessageState((RecipientState("b@example.net", attempts=1, done=DELIVERED),))
        self.assertNotIn("dsn", plain.to_dict()["recipients"]["b@example.net"])   # as older versions wrote
        self.assertTrue(plain.finished)


class HeaderFieldTests(unittest.TestCase):
    def test_tls_required_no(self):
        self.assertTrue(dsnparams.tls_required_no(b"Subject: x\r\nTLS-Required: No\r\n"))
        self.assertTrue(dsnparams.tls_required_no(b"tls-required:no\r\n"))
        self.assertTrue(dsnparams.tls_required_no(b"TLS-Required:\r\n  No\r\n"))       # FWS
        self.assertFalse(dsnparams.tls_required_no(b"Subject: TLS-Required: No\r\n"))
        self.assertFalse(dsnparams.tls_required_no(b"TLS-Required: Yes\r\n"))
        # RFC 8689 3: more than one MUST NOT appear: then none counts.
        self.assertFalse(dsnparams.tls_required_no(b"TLS-Required: No\r\nTLS-Required: No\r\n"))


class TestDoubleTests(unittest.TestCase):
    def test_the_message_double_is_an_ispooledmessage(self):
        """What the hops here are given provides the interface they rely on (no probing)."""
        self.assertTrue(verifyObject(ISpooledMessage, job({}).message))
