"""SMTPUTF8 and internationalised domains, piece by piece: mailrelay.idn, the MAIL/RCPT parser, the
spool's header watch, what delivery offers a next hop, the trace header, RFC 6533 DSNs, and every place
a domain is compared (config, permit rules, routes, suppression, DKIM keys, MX lookup)."""
from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay import config, idn
from mailrelay.outbound import offer
from mailrelay.outbound.dns import MXResolver, ResolutionFailed
from mailrelay.queue.job import Job
from mailrelay.queue.results import RecipientResult
from mailrelay.outbound.sevenbit import Unconvertible, convert_message
from mailrelay.queue.routes import Router
from mailrelay.dkim import keys
from mailrelay.dkim.keys import SigningKey
from mailrelay.dkim.signer import Signer
from mailrelay.dsn import DSNBuilder, address_field, is_global
from mailrelay.envelope import Envelope, domain_of
from mailrelay.interfaces import ISpooledMessage, Reply
from mailrelay.server import addresses
from mailrelay.server.http import Refused, parse_body
from mailrelay.mailboxes import AddressPatterns, routing_trick
from mailrelay.server.received import protocol_name, received_header
from mailrelay.spool.suppression import address_key
from mailrelay.spool import Spool
from mailrelay.spool.writer import BUFFER_LIMIT, HeaderWatch

CHINA = "例子.广告"
CHINA_A = "xn--fsqu00a.xn--4rr70v"


def wire(text: str) -> str:
    """A command argument as the session hands it over: UTF-8 octets, one character each."""
    return addresses.wire_text(text)


class IdnTests(unittest.TestCase):
    def test_u_labels_become_a_labels(self):
        self.assertEqual(idn.to_ascii(CHINA), CHINA_A)
        self.assertEqual(idn.to_ascii("Exämple.ORG"), "xn--exmple-cua.org")
        self.assertEqual(idn.to_ascii("例子.广告."), CHINA_A)

    def test_uts46_maps_before_checking_and_is_not_transitional(self):
        self.assertEqual(idn.to_ascii("ＥＸＡＭＰＬＥ.org"), "example.org")      # full width
        self.assertEqual(idn.to_ascii("faß.de"), "xn--fa-hia.de")              # ß stays ß (IDNA2008)

    def test_ascii_is_lower_cased_and_a_labels_are_checked(self):
        self.assertEqual(idn.to_ascii("Mail.Example.ORG"), "mail.example.org")
        self.assertEqual(idn.to_ascii("XN--EXMPLE-CUA.org"), "xn--exmple-cua.org")
        with self.assertRaises(ValueError) as e:
            idn.to_ascii("xn--zz.example")
        self.assertIn("A-label", str(e.exception))

    def test_what_idna2008_refuses_is_named(self):
        for domain, reason in (("ex☃mple.org", "U+2603"), ("a..例子", "Empty Label"),
                               ("ü" * 60 + ".org", "too long"), ("", "empty")):
            with self.assertRaises(ValueError) as e:
                idn.to_ascii(domain)
            self.assertIn(reason, str(e.exception), domain)

    def test_domain_key_makes_both_forms_one(self):
        self.assertEqual(idn.domain_key(CHINA), idn.domain_key(CHINA_A.upper()))
        self.assertEqual(idn.domain_key("Bücher.Example."), "xn--bcher-kva.example")
        self.assertEqual(idn.domain_key("ex☃mple.org"), "ex☃mple.org")        # refused: only equals itself

    def test_ascii_address_keeps_the_local_part(self):
        self.assertEqual(idn.ascii_address("User@Bücher.example"), "User@xn--bcher-kva.example")
        self.assertIsNone(idn.ascii_address("Jörg@example.org"))
        self.assertIsNone(idn.ascii_address("a@ex☃mple.org"))
        self.assertEqual(idn.to_unicode("xn--bcher-kva.example"), "bücher.example")

    def test_controls_and_separators_are_refused_in_addresses(self):
        self.assertIsNone(idn.utf8_problem("Jörg@exämple.org"))
        self.assertIn("U+0085", idn.utf8_problem("j\x85rg@example.org"))
        self.assertIn("U+2028", idn.utf8_problem("j\u2028rg@example.org"))


class ParserTests(unittest.TestCase):
    def test_mail_with_smtputf8_takes_a_utf8_sender_as_given(self):
        parsed = addresses.parse_mail(wire("FROM:<Jörg@Exämple.org> SMTPUTF8 BODY=8BITMIME"))
        self.assertEqual((parsed.sender, parsed.smtputf8, parsed.body), ("Jörg@Exämple.org", True, "8BITMIME"))
        self.assertFalse(addresses.parse_mail("FROM:<a@example.org>").smtputf8)

    def test_without_smtputf8_a_non_ascii_path_is_553_5_6_7(self):
        self.assertEqual(addresses.parse_mail(wire("FROM:<Jörg@example.org>")), addresses.NON_ASCII)
        self.assertEqual(addresses.parse_rcpt(wire(f"TO:<a@{CHINA}>")), addresses.NON_ASCII)
        self.assertEqual(addresses.parse_rcpt(wire("TO:<a@example.org> NOTIFY=Ü")).status, "5.6.7")

    def test_rcpt_takes_utf8_after_mail_with_smtputf8(self):
        self.assertEqual(addresses.parse_rcpt(wire(f"TO:<用户@{CHINA}>"), smtputf8=True).recipient, f"用户@{CHINA}")
        self.assertEqual(addresses.parse_rcpt(wire('TO:<"Jörg Ü"@example.org>'), True).recipient,
                         '"Jörg Ü"@example.org')
        # a source route is dropped as for ASCII paths
        self.assertEqual(addresses.parse_rcpt(wire(f"TO:<@relay.example:用户@{CHINA}>"), True).recipient,
                         f"用户@{CHINA}")

    def test_invalid_utf8_is_553_5_6_7(self):
        for octets in (b"j\xc3(rg", b"j\xc0\xafrg", b"j\xed\xa0\x80rg", b"j\xf4\x90\x80\x80rg", b"\xff"):
            argument = (b"FROM:<" + octets + b"@example.org> SMTPUTF8").decode("latin-1")
            self.assertEqual(addresses.parse_mail(argument), addresses.BAD_UTF8, octets)

    def test_controls_in_a_utf8_path_are_refused_with_the_reason(self):
        reply = addresses.parse_rcpt(wire("TO:<j\x85rg@example.org>"), True)
        self.assertEqual((reply.code, reply.status), (501, "5.1.3"))
        self.assertIn("U+0085", reply.text)

    def test_a_domain_idna_refuses_is_553_with_the_reason(self):
        reply = addresses.parse_rcpt(wire("TO:<a@ex☃mple.org>"), True)
        self.assertEqual((reply.code, reply.status), (553, "5.1.3"))
        self.assertIn("U+2603", reply.text)
        reply = addresses.parse_mail(wire("FROM:<a@xn--zz.example> SMTPUTF8"))
        self.assertEqual((reply.code, reply.status), (553, "5.1.7"))
        self.assertEqual(addresses.parse_rcpt("TO:<a@xn--zz.example>").status, "5.1.3")   # ASCII, no SMTPUTF8

    def test_lengths_count_octets(self):
        self.assertIsInstance(addresses.parse_rcpt(wire("TO:<" + "用" * 21 + "@example.org>"), True),
                              addresses.RcptTo)                                      # 63 octets
        self.assertEqual(addresses.parse_rcpt(wire("TO:<" + "用" * 22 + "@example.org>"), True),
                         addresses.BAD_RCPT)                                         # 66 octets

    def test_smtputf8_takes_no_value(self):
        self.assertEqual(addresses.parse_mail("FROM:<a@example.org> SMTPUTF8=YES"), addresses.BAD_SMTPUTF8)

    def test_the_policy_judges_utf8_addresses_by_their_a_label(self):
        self.assertIsNone(routing_trick(f"用户@{CHINA}"))
        self.assertEqual(routing_trick("用户%x@例子.广告"), "'%' routing in local part")
        self.assertEqual(routing_trick("a@ex☃mple.org"), "invalid domain")


class HeaderWatchTests(unittest.TestCase):
    def watch(self, *pieces: bytes) -> bool:
        w = HeaderWatch()
        for piece in pieces:
            w.feed(piece)
        return w.found

    def test_utf8_in_the_header_block_is_seen_across_pieces(self):
        self.assertTrue(self.watch(b"Received: x\r\n", b"Subject: Gr\xc3", b"\xbc\xc3\x9fe\r\n\r\nbody\r\n"))
        self.assertFalse(self.watch(b"Subject: x\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"))
        self.assertFalse(self.watch(b"Subject: x\r\n\r", b"\nGr\xc3\xbc\r\n"))     # the end split over pieces
        self.assertFalse(self.watch(b"\r\n\xc3\xbc body only\r\n"))                 # no header block at all
        self.assertTrue(self.watch(b"Subject: x\r\nFrom: \xc3\xbc@x"))             # no body, no end


class SpoolTests(unittest.TestCase):
    def setUp(self):
        self.spool = Spool(Path(self.mktemp()))
        self.spool.startService()
        self.addCleanup(self.spool.stopService)

    @defer.inlineCallbacks
    def store(self, *pieces: bytes, smtputf8: bool = True) -> Envelope:
        writer = self.spool.new_message(Envelope("Jörg@exämple.org", (f"用户@{CHINA}",), 0.0, smtputf8=smtputf8))
        for piece in pieces:
            writer.write(piece)
        queue_id = yield writer.commit()
        return self.spool.load(queue_id).envelope

    @defer.inlineCallbacks
    def test_the_flags_survive_the_spool_also_when_the_file_was_patched_at_commit(self):
        # Spilled to disk before the commit with `false` twice; both become `true` (two octets shorter).
        long_body = b"x" * 2000 + b"\r\n" + b"y" * (BUFFER_LIMIT * 2) + b"\r\n"
        envelope = yield self.store("Subject: Grüße\r\n\r\n".encode(), long_body)
        self.assertEqual((envelope.smtputf8, envelope.utf8_headers, envelope.long_lines), (True, True, True))
        self.assertEqual(envelope.sender, "Jörg@exämple.org")
        envelope = yield self.store(b"Subject: plain\r\n\r\n", "Grüße\r\n".encode())
        self.assertEqual((envelope.smtputf8, envelope.utf8_headers, envelope.octets), (True, False, "8bit"))


@implementer(ISpooledMessage)
@dataclass
class FakeMessage:
    envelope: Envelope
    size: int = 100
    queue_id: str = "Q1"
    path = None           # not read from a spool file

    def open(self):
        raise NotImplementedError("choosing what to offer never reads the body")


def job(sender: str, *recipients: str, smtputf8: bool = True, utf8_headers=False, octets="8bit") -> Job:
    envelope = Envelope(sender, recipients, 0.0, smtputf8=smtputf8, utf8_headers=utf8_headers, octets=octets)
    return Job(FakeMessage(envelope), recipients)


@implementer(ISpooledMessage)
@dataclass
class BodyMessage:
    envelope: Envelope
    body: bytes
    queue_id: str = "Q2"
    path = None           # not read from a spool file

    @property
    def size(self) -> int:
        return len(self.body)

    def open(self):
        import io
        return io.BytesIO(self.body)


class SevenBitTests(unittest.TestCase):
    BODY = "Subject: x\r\n\r\nGrüße\r\n".encode()

    def test_declared_smtputf8_with_ascii_headers_converts_for_a_hop_without_8bitmime(self):
        envelope = Envelope("a@bücher.example", ("b@example.net",), 0.0, smtputf8=True, utf8_headers=False,
                            octets="8bit")
        converted = convert_message(BodyMessage(envelope, self.BODY))
        with converted.open() as f:
            self.assertTrue(f.read().isascii())

    def test_utf8_headers_under_smtputf8_are_never_converted(self):
        envelope = Envelope("a@example.org", ("b@example.net",), 0.0, smtputf8=True, utf8_headers=True,
                            octets="8bit")
        with self.assertRaises(Unconvertible) as e:
            convert_message(BodyMessage(envelope, "Subject: Grüße\r\n\r\nx\r\n".encode()))
        self.assertIn("RFC 6532", str(e.exception))


UTF8_HOP = {b"SMTPUTF8": b"", b"8BITMIME": b""}
PLAIN_HOP = {b"8BITMIME": b""}


class OfferTests(unittest.TestCase):
    def test_smtputf8_and_8bitmime_are_declared_to_a_hop_offering_them(self):
        j = job("Jörg@exämple.org", f"用户@{CHINA}")
        self.assertEqual(offer.mail_command(j, UTF8_HOP),
                         "MAIL FROM:<Jörg@exämple.org> BODY=8BITMIME SMTPUTF8".encode())
        self.assertEqual(offer.rcpt_command(j, f"用户@{CHINA}", UTF8_HOP), f"RCPT TO:<用户@{CHINA}>".encode())
        self.assertIsNone(offer.refusal(j, UTF8_HOP, "mx"))

    def test_a_utf8_local_part_or_utf8_headers_never_go_to_a_hop_without_smtputf8(self):
        code, status, text = offer.refusal(job("a@example.org", "用户@example.net"), PLAIN_HOP, "mx.example")
        self.assertEqual((code, status), (553, "5.6.7"))
        self.assertIn("non-ASCII local part", text)
        self.assertIn("mx.example", text)
        code, status, text = offer.refusal(job("a@example.org", "b@example.net", utf8_headers=True), PLAIN_HOP, "mx")
        self.assertEqual(status, "5.6.7")
        self.assertIn("UTF-8 header fields", text)

    def test_only_domains_non_ascii_go_as_a_labels_without_smtputf8(self):
        j = job("app@bücher.example", f"user@{CHINA}", "plain@example.net")
        self.assertIsNone(offer.refusal(j, PLAIN_HOP, "mx"))
        self.assertEqual(offer.mail_command(j, PLAIN_HOP), b"MAIL FROM:<app@xn--bcher-kva.example> BODY=8BITMIME")
        self.assertEqual(offer.rcpt_command(j, f"user@{CHINA}", PLAIN_HOP), f"RCPT TO:<user@{CHINA_A}>".encode())
        self.assertEqual(offer.rcpt_command(j, "plain@example.net", PLAIN_HOP), b"RCPT TO:<plain@example.net>")

    def test_declared_but_all_ascii_is_no_smtputf8_need(self):
        j = job("a@example.org", "b@example.net", utf8_headers=False)
        self.assertIsNone(offer.refusal(j, PLAIN_HOP, "mx"))
        self.assertEqual(offer.mail_command(j, UTF8_HOP), b"MAIL FROM:<a@example.org> BODY=8BITMIME SMTPUTF8")
        self.assertFalse(offer.needs_smtputf8(j))

    def test_legacy_8bit_headers_without_smtputf8_are_not_an_smtputf8_message(self):
        j = job("a@example.org", "b@example.net", smtputf8=False, utf8_headers=True)
        self.assertIsNone(offer.refusal(j, PLAIN_HOP, "mx"))
        self.assertEqual(offer.mail_command(j, UTF8_HOP), b"MAIL FROM:<a@example.org> BODY=8BITMIME")

    def test_unknown_header_octets_are_taken_as_utf8_when_declared(self):
        self.assertTrue(offer.needs_smtputf8(job("a@example.org", "b@example.net", utf8_headers=None)))
        self.assertFalse(offer.needs_smtputf8(job("a@example.org", "b@example.net", utf8_headers=None,
                                                  octets="7bit")))


class ReceivedTests(unittest.TestCase):
    def test_the_rfc_6531_keywords(self):
        names = [protocol_name(esmtp=True, tls=tls, authenticated=auth, utf8=True)
                 for tls in (False, True) for auth in (False, True)]
        self.assertEqual(names, ["UTF8SMTP", "UTF8SMTPA", "UTF8SMTPS", "UTF8SMTPSA"])
        self.assertEqual(protocol_name(esmtp=True, tls=True, authenticated=False), "ESMTPS")

    def test_the_for_clause_is_ascii_where_the_address_has_an_ascii_form(self):
        def header(recipient: str) -> bytes:
            return received_header(helo="c.test", address="127.0.0.1", hostname="relay.test",
                                   protocol="UTF8SMTP", queue_id="Q", recipients=[recipient], when=0.0)
        self.assertIn(f"for <user@{CHINA_A}>;".encode(), header(f"user@{CHINA}"))
        self.assertIn(f"for <用户@{CHINA}>;".encode(), header(f"用户@{CHINA}"))


class DSNTests(unittest.TestCase):
    def build(self, envelope: Envelope, recipient: str, headers: bytes) -> bytes:
        result = RecipientResult(recipient, 553, "5.6.7", "SMTPUTF8 required but not offered by mx", "mx")
        return DSNBuilder("relay.test").build(envelope, [result], "failed", headers, 100.0)

    def test_a_dsn_about_an_smtputf8_message_is_rfc_6533(self):
        envelope = Envelope("Jörg@exämple.org", (f"用户@{CHINA}",), 0.0, smtputf8=True, utf8_headers=True)
        data = self.build(envelope, f"用户@{CHINA}", "Subject: Grüße\r\n".encode())
        report = email.message_from_bytes(data, policy=email.policy.SMTPUTF8)
        self.assertEqual(report.get_param("report-type"), "global-delivery-status")
        self.assertEqual([p.get_content_type() for p in report.iter_parts()],
                         ["text/plain", "message/global-delivery-status", "message/global-headers"])
        self.assertIn(f"Final-Recipient: utf-8; 用户@{CHINA}\r\n".encode(), data)
        self.assertIn("To: <Jörg@exämple.org>\r\n".encode(), data)
        self.assertIn("\r\n\r\nSubject: Grüße\r\n".encode(), data)

    def test_an_ascii_message_gets_the_rfc_3464_dsn_as_before(self):
        envelope = Envelope("a@example.org", ("b@example.net",), 0.0)
        data = self.build(envelope, "b@example.net", b"Subject: hi\r\n")
        self.assertTrue(data.isascii())
        self.assertIn(b"report-type=\"delivery-status\"", data)
        self.assertIn(b"Final-Recipient: rfc822; b@example.net", data)
        self.assertIn(b"text/rfc822-headers", data)

    def test_global_report_with_ascii_recipient_keeps_rfc822_type(self):
        self.assertEqual(address_field("b@example.net"), "rfc822; b@example.net")
        self.assertEqual(address_field("ü@example.net"), "utf-8; ü@example.net")
        self.assertTrue(is_global(Envelope("Jörg@example.org", ("b@example.net",), 0.0)))
        self.assertFalse(is_global(Envelope("a@example.org", ("b@example.net",), 0.0, utf8_headers=True)))


class DomainComparisonTests(unittest.TestCase):
    def test_domain_of_is_the_a_label(self):
        self.assertEqual(domain_of(f"用户@{CHINA}"), CHINA_A)
        self.assertEqual(domain_of("a@Example.ORG."), "example.org")

    def test_permit_patterns_match_either_form(self):
        patterns = AddressPatterns.parse(["bücher.example", f"*.{CHINA_A}", "Jörg@exämple.org"])
        self.assertTrue(patterns.allows("a@xn--bcher-kva.example"))
        self.assertTrue(patterns.allows("a@BÜCHER.example"))
        self.assertTrue(patterns.allows(f"a@mail.{CHINA}"))
        self.assertTrue(patterns.allows("Jörg@xn--exmple-cua.org"))
        self.assertFalse(patterns.allows("jörg@xn--exmple-cua.org"))        # local part exact

    def test_routes_match_either_form(self):
        route = config.Route(transport="t", recipients=("bücher.example",), senders=(f"app@{CHINA_A}",))
        router = Router((route,))
        self.assertIs(router.route(f"app@{CHINA}", "x@xn--bcher-kva.example", 0), route)
        self.assertIsNone(router.route("app@example.org", "x@bücher.example", 0))

    def test_suppression_keys_are_one_for_both_forms(self):
        self.assertEqual(address_key("用户@例子.广告"), address_key(f"用户@{CHINA_A.upper()}"))

    def test_dkim_keys_are_found_for_either_form(self):
        key = keys.generate("ed25519")
        signer = Signer([SigningKey("exämple.org", "sel", key)])
        self.assertEqual(len(signer.keys_for("mail.xn--exmple-cua.org")), 1)
        signer = Signer([SigningKey("xn--exmple-cua.org", "sel", key)])
        self.assertEqual(len(signer.keys_for("EXÄMPLE.org")), 1)

    def test_the_dkim_record_name_is_the_a_label(self):
        from mailrelay.cli.dkim import record_name
        self.assertEqual(record_name("Exämple.org.", "sel"), "sel._domainkey.xn--exmple-cua.org.")
        self.assertEqual(record_name("Example.org", "sel"), "sel._domainkey.example.org.")

    def test_mx_lookup_of_a_domain_idna_refuses_is_permanent(self):
        resolver = MXResolver(nameservers=[("127.0.0.1", 9)])
        self.addCleanup(resolver.stop)
        failure = self.failureResultOf(resolver.resolve("ex☃mple.org"), ResolutionFailed)
        reply: Reply = failure.value.reply
        self.assertEqual((reply.code, reply.status), (553, "5.1.2"))
        self.assertIn("U+2603", reply.text)


class ConfigTests(unittest.TestCase):
    def load(self, text: str):
        path = Path(self.mktemp())
        path.mkdir()
        (path / "tap.conf").write_text('hostname = "relay.test"\nspool = "spool"\n' + text, encoding="utf-8")
        (path / "k.pem").write_bytes(keys.private_pem(keys.generate("ed25519")))
        return config.load(path / "tap.conf")

    def test_domains_are_stored_as_a_labels_whichever_form_is_written(self):
        loaded = self.load(
            '[[permit]]\nnetworks = ["127.0.0.1/32"]\nsenders = ["Jörg@Exämple.org", "*.例子.广告"]\n'
            'recipients = ["bücher.example"]\n\n'
            '[transports.t]\nhost = "127.0.0.1"\n\n[[route]]\nrecipients = ["例子.广告"]\ntransport = "t"\n\n'
            '[[dkim.key]]\ndomain = "exämple.org"\nselector = "s"\nkey_file = "k.pem"\n')
        self.assertEqual(loaded.permits[0].senders, ("Jörg@xn--exmple-cua.org", f"*.{CHINA_A}"))
        self.assertEqual(loaded.permits[0].recipients, ("xn--bcher-kva.example",))
        self.assertEqual(loaded.routes[0].recipients, (CHINA_A,))
        self.assertEqual(loaded.dkim.keys[0].domain, "xn--exmple-cua.org")

    def test_a_domain_idna_refuses_is_a_one_line_error_naming_the_key(self):
        with self.assertRaises(config.ConfigError) as e:
            self.load('[[permit]]\nnetworks = ["127.0.0.1/32"]\nrecipients = ["ex☃mple.org"]\n')
        message = str(e.exception)
        self.assertIn("tap.conf", message)
        self.assertIn("recipients[0]", message)
        self.assertIn("U+2603", message)
        self.assertNotIn("\n", message)
        with self.assertRaises(config.ConfigError) as e:
            self.load('[[dkim.key]]\ndomain = "xn--zz.example"\nselector = "s"\nkey_file = "k.pem"\n')
        self.assertIn("domain", str(e.exception))


class HttpTests(unittest.TestCase):
    LIMITS = config.Limits()

    def body(self, sender: str, to: list) -> bytes:
        import json
        return json.dumps({"from": sender, "to": to, "message": "Subject: x\r\n\r\nbody\r\n"}).encode()

    def test_utf8_addresses_are_taken(self):
        sender, recipients, _, _ = parse_body(self.body("Jörg@exämple.org", [f"用户@{CHINA}"]), self.LIMITS)
        self.assertEqual((sender, recipients), ("Jörg@exämple.org", [f"用户@{CHINA}"]))

    def test_bad_utf8_addresses_are_400_with_the_smtp_reply(self):
        with self.assertRaises(Refused) as e:
            parse_body(self.body("a@example.org", ["a@ex☃mple.org"]), self.LIMITS)
        self.assertEqual(e.exception.status, 400)
        self.assertIn("U+2603", e.exception.body["error"])
        with self.assertRaises(Refused) as e:
            parse_body(self.body("a@example.org", ["\ud800@example.org"]), self.LIMITS)
        self.assertIn("surrogate", e.exception.body["error"])


class TestDoubleTests(unittest.TestCase):
    def test_the_message_double_is_an_ispooledmessage(self):
        """What the hops here are given provides the interface they rely on (no probing)."""
        envelope = Envelope("a@example.org", ("b@example.net",), 0.0)
        self.assertTrue(verifyObject(ISpooledMessage, FakeMessage(envelope)))
        self.assertTrue(verifyObject(ISpooledMessage, BodyMessage(envelope, b"x\r\n")))
