"""mailrelay.outbound.sevenbit: 8-bit content converted to 7-bit MIME for a next hop without 8BITMIME.

Unit tests on in-memory messages (the spooled-message contract); what a next hop receives over real
sockets is in test_content_end_to_end."""
from __future__ import annotations

import base64
import email
import email.policy
import io
import os
import tracemalloc
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.outbound.sevenbit import (
    MAX_LINE, READ_LIMIT, ConvertedMessage, Needs, Unconvertible, convert_message, downgrade, needs_downgrade,
    needs_for,
)
from mailrelay.envelope import Envelope
from mailrelay.interfaces import ISpooledMessage


@implementer(ISpooledMessage)
@dataclass(frozen=True)
class Spooled:
    queue_id: str
    envelope: Envelope
    body: bytes
    path: Optional[Path] = None

    @property
    def size(self) -> int:
        return len(self.body)

    def open(self):
        return io.BytesIO(self.body)


def spooled(body: bytes, octets: Optional[str] = "8bit", declared: str = "7BIT", smtputf8: bool = False,
            path: Optional[Path] = None) -> Spooled:
    envelope = Envelope("a@example.org", ("b@example.com",), 0.0, body=declared, octets=octets, smtputf8=smtputf8)
    return Spooled("Q1", envelope, body, path)


def converted(body: bytes, **kwargs) -> bytes:
    message = convert_message(spooled(body), **kwargs)
    with message.open() as f:
        return f.read()


def assert_7bit_mime(test: unittest.TestCase, data: bytes) -> None:
    test.assertTrue(data.isascii(), data)
    for line in data.split(b"\r\n"):
        test.assertLessEqual(len(line), 78, line)      # QP lines are short (78 with an escaped leading dash)
        test.assertNotIn(b"\n", line)
        test.assertNotIn(b"\r", line)


TEXT = ("Grüße aus Köln — ½ € ✓\r\n"
        "=equals= at the start and the end=\r\n"
        "trailing space \r\n"
        "trailing tab\t\r\n"
        ".\r\n"
        "--looks-like-a-boundary\r\n"
        + "é" * 400 + "\r\n"
        "From the start\r\n"
        "\r\n"
        "last line\r\n").encode("utf-8")


class TextTests(unittest.TestCase):
    def test_8bit_text_plain_becomes_quoted_printable_and_decodes_to_the_same_text(self):
        original = (b"From: a@example.org\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
                    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + TEXT)
        data = converted(original)
        assert_7bit_mime(self, data)
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertEqual(head, b"From: a@example.org\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
                               b"Content-Type: text/plain; charset=utf-8\r\n"
                               b"Content-Transfer-Encoding: quoted-printable")
        parsed = email.message_from_bytes(data)
        self.assertEqual(parsed.get_payload(decode=True), TEXT)
        as_text = email.message_from_bytes(data, policy=email.policy.default).get_content()
        self.assertEqual(as_text.encode("utf-8"), TEXT)          # the text, not only the octets
        self.assertIn(b"\r\n=2D-looks-like-a-boundary\r\n", body)

    def test_a_message_without_mime_fields_gets_mime_version_and_its_encoding(self):
        data = converted(b"Received: from x\r\nSubject: plain\r\n\r\n" + TEXT)
        self.assertTrue(data.startswith(b"Received: from x\r\nSubject: plain\r\nMIME-Version: 1.0\r\n"
                                        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"))
        self.assertEqual(email.message_from_bytes(data).get_payload(decode=True), TEXT)

    def test_an_obsolete_space_before_the_colon_is_still_a_header_field(self):
        data = converted(b"Subject : spaced\r\nMIME-Version : 1.0\r\nContent-Transfer-Encoding\t: 8bit\r\n"
                         b"\r\n\xe9\r\n")
        self.assertEqual(data, b"Subject : spaced\r\nMIME-Version : 1.0\r\n"
                               b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=E9\r\n")

    def test_a_folded_transfer_encoding_field_is_replaced_whole(self):
        data = converted(b"Subject: x\r\nContent-Transfer-Encoding:\r\n 8bit\r\nX-After: kept\r\n\r\n\xe9\r\n")
        self.assertEqual(data, b"Subject: x\r\nX-After: kept\r\nMIME-Version: 1.0\r\n"
                               b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=E9\r\n")


MULTIPART = (b"From: a@example.org\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: multipart/mixed; boundary=\"outer\"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
             b"This is a MIME message.\r\n"
             b"--outer\r\n"
             b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
             b"plain ascii part\r\n"
             b"--outer\r\n"
             b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
             b"caf\xe9 cr\xe8me\r\n"
             b"--outer\r\n"
             b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
             b"AAECAwQF\r\n"
             b"--outer--\r\n"
             b"epilogue\r\n")


class MultipartTests(unittest.TestCase):
    def parts(self, data: bytes):
        return [(p.get_content_type(), p.get_payload(decode=True)) for p in email.message_from_bytes(data).walk()
                if not p.is_multipart()]

    def test_only_the_8bit_part_is_reencoded_the_others_stay_byte_for_byte(self):
        data = converted(MULTIPART)
        assert_7bit_mime(self, data)
        self.assertEqual(self.parts(data), self.parts(MULTIPART))
        self.assertIn(b"--outer\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nplain ascii part\r\n--outer\r\n",
                      data)
        self.assertIn(b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable"
                      b"\r\n\r\ncaf=E9 cr=E8me\r\n--outer\r\n", data)
        self.assertIn(b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQF\r\n--outer--\r\nepilogue\r\n", data)
        # RFC 2045 6.4: a multipart is never encoded; its label now says what it holds.
        self.assertIn(b'boundary="outer"\r\nContent-Transfer-Encoding: 7bit\r\n\r\nThis is a MIME message.', data)

    def test_nested_multipart_and_message_rfc822_are_walked_recursively(self):
        inner_message = (b"Subject: forwarded\r\nContent-Type: multipart/alternative; boundary=inner\r\n\r\n"
                         b"--inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nna\xc3\xafve\r\n"
                         b"--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>na\xc3\xafve</p>\r\n"
                         b"--inner--\r\n")
        original = (b"Subject: fwd\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=outer\r\n\r\n"
                    b"--outer\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
                    b"--outer\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                    + inner_message + b"--outer--\r\n")
        data = converted(original)
        assert_7bit_mime(self, data)
        self.assertIn(b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
                      b"Subject: forwarded\r\n", data)       # message/rfc822 itself is never encoded
        texts = [p.get_payload(decode=True) for p in email.message_from_bytes(data).walk()
                 if p.get_content_maintype() == "text"]
        self.assertEqual(texts, [b"see attached", b"na\xc3\xafve", b"<p>na\xc3\xafve</p>"])

    def test_an_8bit_preamble_is_escaped_and_the_parts_are_unchanged(self):
        original = MULTIPART.replace(b"This is a MIME message.", b"Ceci est un message MIME \xe0 plusieurs parties.")
        original = original.replace(b"caf\xe9 cr\xe8me", b"cafe creme")
        data = converted(original)
        assert_7bit_mime(self, data)
        self.assertIn(b"\r\n\r\nCeci est un message MIME =E0 plusieurs parties.\r\n--outer\r\n", data)
        self.assertEqual(self.parts(data), self.parts(original))

    def test_multipart_digest_parts_default_to_message_rfc822(self):
        original = (b"Subject: digest\r\nMIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n"
                    b"--d\r\n\r\nSubject: one\r\n\r\nr\xc3\xa9sum\xc3\xa9\r\n--d--\r\n")
        data = converted(original)
        assert_7bit_mime(self, data)
        self.assertIn(b"--d\r\n\r\nSubject: one\r\nMIME-Version: 1.0\r\n"
                      b"Content-Transfer-Encoding: quoted-printable\r\n\r\nr=C3=A9sum=C3=A9\r\n--d--", data)


class RefusalTests(unittest.TestCase):
    def assertRefused(self, body: bytes, why: str, **kwargs) -> None:
        with self.assertRaises(Unconvertible) as caught:
            convert_message(spooled(body, **kwargs))
        self.assertIn(why, str(caught.exception))

    def test_an_8bit_header_field_cannot_be_converted(self):
        self.assertRefused(b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n", "8-bit octets in a header field")

    def test_an_8bit_header_field_of_a_part_cannot_be_converted(self):
        part_header = MULTIPART.replace(b"Content-Type: text/plain; charset=us-ascii\r\n",
                                        b"Content-Type: text/plain; name=\"r\xc3\xa9sum\xc3\xa9.txt\"\r\n")
        self.assertRefused(part_header, "8-bit octets in a header field")

    def test_8bit_octets_in_a_base64_or_quoted_printable_part_cannot_be_converted(self):
        for cte in (b"base64", b"quoted-printable"):
            broken = MULTIPART.replace(b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQF",
                                       b"Content-Transfer-Encoding: " + cte + b"\r\n\r\nAAEC\xffAwQF")
            self.assertRefused(broken, "Content-Transfer-Encoding " + cte.decode())

    def test_a_message_type_that_allows_no_encoding_cannot_be_converted(self):
        report = (b"Subject: dsn\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; boundary=r\r\n\r\n"
                  b"--r\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; h\xc3\xa9\r\n--r--\r\n")
        self.assertRefused(report, "message/delivery-status")

    def test_a_multipart_without_a_boundary_is_never_encoded_as_a_leaf(self):
        self.assertRefused(b"Subject: x\r\nContent-Type: multipart/mixed\r\n\r\n\xc3\xa9\r\n", "multipart/mixed")

    def test_an_smtputf8_message_cannot_be_converted(self):
        self.assertRefused(b"Subject: x\r\n\r\n\xc3\xa9\r\n", "SMTPUTF8", smtputf8=True)


class UnchangedTests(unittest.TestCase):
    def test_an_already_7bit_message_is_returned_as_it_is(self):
        for body in (MULTIPART.replace(b"caf\xe9 cr\xe8me", b"cafe creme"),
                     b"Subject: x\r\nContent-Transfer-Encoding: 8bit\r\n\r\nascii only\r\n", b"", b"\r\n"):
            message = spooled(body)
            self.assertIs(convert_message(message), message)

    def test_a_message_known_7bit_is_not_converted_for_any_hop(self):
        self.assertFalse(needs_downgrade(spooled(b"x\r\n", octets="7bit", declared="8BITMIME"), {}))
        self.assertTrue(needs_downgrade(spooled(b"x\r\n", octets="8bit", declared="7BIT"), {}))
        self.assertFalse(needs_downgrade(spooled(b"\xff\r\n", octets="8bit"), {b"8BITMIME": b""}))

    def test_an_older_spool_file_is_taken_as_declared(self):
        self.assertFalse(needs_downgrade(spooled(b"\xff\r\n", octets=None, declared="7BIT"), {}))
        self.assertTrue(needs_downgrade(spooled(b"\xff\r\n", octets=None, declared="8BITMIME"), {}))
        self.assertFalse(needs_downgrade(spooled(b"ascii\r\n", octets=None, declared="8BITMIME"), {}))


class GeneralPredicateTests(unittest.TestCase):
    def test_the_same_walk_wraps_overlong_lines_for_a_hop_that_takes_8bit(self):
        long_line = b"word " * 500 + b"\r\n"
        original = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
                    b"--b\r\nContent-Type: text/plain\r\n\r\n" + long_line +
                    b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\xc3\xa9t\xc3\xa9\r\n--b--\r\n")
        data = converted(original, needs=Needs(eight_bit_ok=True))
        self.assertTrue(all(len(line) <= MAX_LINE for line in data.split(b"\r\n")))
        self.assertIn(b"\r\n\r\n\xc3\xa9t\xc3\xa9\r\n--b--", data)            # 8-bit is fine for this hop
        parts = [p.get_payload(decode=True) for p in email.message_from_bytes(data).walk() if not p.is_multipart()]
        self.assertEqual(parts[0], long_line[:-2])


class BoundedTests(unittest.TestCase):
    def test_a_big_message_is_converted_in_bounded_memory_into_the_spools_tmp(self):
        spool = Path(self.mktemp())
        (spool / "queue").mkdir(parents=True)
        (spool / "tmp").mkdir()
        line = ("é" * 498 + "\r\n").encode("utf-8")         # 998 octets: the longest line there may be
        body = b"Subject: big\r\n\r\n" + line * (8 * 1024 * 1024 // len(line))
        message = spooled(body, path=spool / "queue" / "Q1")
        tracemalloc.start()
        try:
            result = convert_message(message)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 2 * 1024 * 1024)             # 8 MiB in, 24 MiB out: neither held whole
        self.assertIsInstance(result, ConvertedMessage)
        self.assertEqual(os.listdir(spool / "tmp"), [])      # unlinked: nothing to clean up, even after a crash
        where = os.readlink(f"/proc/self/fd/{result._file.fileno()}")
        self.assertTrue(where.startswith(str((spool / "tmp").resolve())), where)
        first, second = result.open(), result.open()          # independent readers of one file
        self.assertEqual(first.read(1000), second.read(1000))
        rest = first.read()
        self.assertEqual(len(rest) + 1000, result.size)
        self.assertTrue(rest.endswith(b"=C3=A9=C3=A9\r\n"))
        self.assertEqual((result.envelope.body, result.envelope.octets), ("7BIT", "7bit"))
        self.assertEqual(result.queue_id, "Q1")
        with result.open() as f:
            decoded = email.message_from_bytes(f.read()).get_payload(decode=True)
        self.assertEqual(decoded, body[len(b"Subject: big\r\n\r\n"):])


class GeneratedMessagesTests(unittest.TestCase):
    """Messages the stdlib `email` package builds (seeded, reproducible): every structure converts to pure
    7-bit MIME whose parts decode to the same octets."""

    WORDS = ["Grüße", "naïve", "café", "ascii", "—", "½", "plain", "=", "--", ".", "From", "\t", " "]

    def build(self, rng) -> bytes:
        from email.message import EmailMessage

        def text() -> str:
            lines = [" ".join(rng.choice(self.WORDS) for _ in range(rng.randint(0, 40)))
                     for _ in range(rng.randint(1, 6))]
            return "\n".join(lines) + "\n"

        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "a@example.org", "b@example.com", "generated"
        message.set_content(text(), cte="8bit")
        if rng.random() < 0.7:
            message.add_alternative("<p>" + text() + "</p>", subtype="html", cte="8bit")
        for _ in range(rng.randint(0, 2)):
            if rng.random() < 0.5:
                message.add_attachment(os.urandom(rng.randint(0, 300)), maintype="application",
                                       subtype="octet-stream", filename="blob.bin")
            else:
                inner = EmailMessage()
                inner["Subject"] = "inner"
                inner.set_content(text(), cte="8bit")
                message.add_attachment(inner)
        return message.as_bytes(policy=email.policy.SMTP)

    def payloads(self, data: bytes) -> list:
        return [(p.get_content_type(), p.get_payload(decode=True).rstrip(b"\r\n"))
                for p in email.message_from_bytes(data).walk() if not p.is_multipart()
                and p.get_content_type() != "message/rfc822"]

    def test_generated_messages_round_trip(self):
        import random
        for seed in range(60):
            rng = random.Random(seed)
            original = self.build(rng)
            message = spooled(original)
            result = convert_message(message)
            with result.open() as f:
                data = f.read()
            assert_7bit_mime(self, data)
            self.assertEqual(self.payloads(data), self.payloads(original), f"seed {seed}")


def longest(data: bytes) -> int:
    return max(len(line) for line in data.split(b"\r\n"))


def leaves(data: bytes) -> list:
    return [(p.get_content_type(), p.get_payload(decode=True)) for p in email.message_from_bytes(data).walk()
            if not p.is_multipart()]


EIGHT_BIT_OK = Needs(eight_bit_ok=True)
HTML_LINE = b"<html><body>" + b"<td>cell</td>" * 400 + b"</body></html>"       # 5,226 octets, no space


class LongLineTests(unittest.TestCase):
    """Lines over 998 octets re-encoded for every hop (RFC 5322 2.1.1), 8BITMIME or not."""

    def test_a_message_with_long_lines_is_converted_for_every_hop(self):
        message = spooled(b"x\r\n", octets="7bit")
        self.assertFalse(needs_downgrade(message, {b"8BITMIME": b""}))
        long = Spooled("Q1", replace(message.envelope, long_lines=True), b"x\r\n")
        self.assertTrue(needs_downgrade(long, {b"8BITMIME": b""}))
        self.assertTrue(needs_downgrade(long, {}))
        self.assertEqual(needs_for({b"8BITMIME": b""}), EIGHT_BIT_OK)
        self.assertEqual(needs_for({}), Needs())

    def test_for_an_8bitmime_hop_only_the_part_with_the_long_line_is_encoded(self):
        original = (b"From: a@example.org\r\nMIME-Version: 1.0\r\n"
                    b"Content-Type: multipart/alternative; boundary=b\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                    b"--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                    b"caf\xc3\xa9\r\n"
                    b"--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + HTML_LINE + b"\r\n.\r\n--b--\r\n")
        result = convert_message(spooled(original), EIGHT_BIT_OK)
        with result.open() as f:
            data = f.read()
        self.assertLessEqual(longest(data), 78)
        self.assertEqual(leaves(data), leaves(original))
        # The 8-bit part and the multipart's own label stay as they were: this hop takes 8-bit.
        self.assertIn(b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xc3\xa9\r\n--b\r\n", data)
        self.assertIn(b"boundary=b\r\nContent-Transfer-Encoding: 8bit\r\n\r\n--b", data)
        self.assertIn(b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable"
                      b"\r\n\r\n<html>", data)
        self.assertEqual((result.envelope.octets, result.envelope.long_lines), ("8bit", False))

    def test_for_a_hop_without_8bitmime_long_lines_and_8bit_both_go(self):
        original = (b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                    + "é".encode() * 2000 + b"\r\n" + HTML_LINE + b"\r\n")
        data = converted(original)
        assert_7bit_mime(self, data)
        self.assertEqual(leaves(data), leaves(original))

    def test_a_message_without_long_lines_is_unchanged_for_an_8bitmime_hop(self):
        message = spooled(MULTIPART)
        self.assertIs(convert_message(message, EIGHT_BIT_OK), message)

    def test_long_base64_lines_are_rewrapped_at_76(self):
        blob = bytes(range(256)) * 30
        encoded = base64.b64encode(blob)
        original = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
                    b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
                    b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                    + encoded[:5000] + b"\r\n" + encoded[5000:] + b"\r\n--b--\r\n")
        data = converted(original, needs=EIGHT_BIT_OK)
        self.assertLessEqual(longest(data), 76)
        self.assertEqual(leaves(data)[-1], ("application/octet-stream", blob))
        self.assertIn(b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b\r\n"
                      b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n", data)
        self.assertNotIn(b"MIME-Version: 1.0\r\nMIME-Version", data)

    def test_long_quoted_printable_lines_get_soft_breaks_and_decode_the_same(self):
        qp = (b"=C3=A9" * 12000 + b" --b=09\r\n"          # 65536 = 6 * 10922 + 4: a read ends inside "=A9"
              + b"x" * 40000 + b"=\r\nend\r\n")           # a long line ending in a soft break
        text = "é".encode() * 12000 + b" --b\t\r\n" + b"x" * 40000 + b"end\r\n"
        self.assertGreater(longest(qp), READ_LIMIT)
        original = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + qp)
        data = converted(original, needs=EIGHT_BIT_OK)
        self.assertLessEqual(longest(data), 78)
        self.assertEqual(email.message_from_bytes(data).get_payload(decode=True), text)
        self.assertEqual(email.message_from_bytes(original).get_payload(decode=True), text)
        self.assertNotIn(b"\r\n--b", data)                   # a dash that starts a line is escaped

    def test_a_long_header_line_is_folded_before_white_space_and_unfolds_to_the_same_field(self):
        references = b" ".join(b"<%d.message@example.org>" % i for i in range(300))
        original = (b"Subject: x\r\nReferences: " + references + b"\r\nX-Tab:\t" + b"a\t" * 800 + b"b\r\n"
                    b"\r\nbody\r\n")
        data = converted(original, needs=EIGHT_BIT_OK)
        self.assertLessEqual(longest(data), 998)
        head = data.split(b"\r\n\r\n")[0]
        self.assertEqual(head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b"\t"), original.split(b"\r\n\r\n")[0])
        self.assertTrue(data.endswith(b"\r\n\r\nbody\r\n"))          # the body is untouched, no MIME added
        self.assertNotIn(b"MIME-Version", data)

    def test_a_header_line_without_a_place_to_fold_is_refused(self):
        for field in (b"X-Token: " + b"t" * 1200, b"X-" + b"n" * 1100 + b": value"):
            with self.assertRaises(Unconvertible) as caught:
                convert_message(spooled(b"Subject: x\r\n" + field + b"\r\n\r\nbody\r\n"), EIGHT_BIT_OK)
            self.assertIn("no space or tab to fold it at", str(caught.exception))

    def test_a_long_line_in_a_part_that_allows_no_reencoding_is_refused(self):
        for ctype, cte, why in ((b"application/octet-stream", b"x-uuencode", "Content-Transfer-Encoding x-uuencode"),
                                (b"message/delivery-status", b"7bit", "message/delivery-status")):
            body = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
                    b"--b\r\nContent-Type: " + ctype + b"\r\nContent-Transfer-Encoding: " + cte + b"\r\n\r\n"
                    + b"z" * 2000 + b"\r\n--b--\r\n")
            with self.assertRaises(Unconvertible) as caught:
                convert_message(spooled(body), EIGHT_BIT_OK)
            self.assertIn(why, str(caught.exception))

    def test_a_boundary_inside_a_line_longer_than_a_read_is_not_a_delimiter(self):
        inner = b"z" * (READ_LIMIT - 2) + b"\r\n" + b"y" * READ_LIMIT + b"--b--"
        original = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
                    b"--b\r\nContent-Type: text/plain\r\n\r\n" + inner + b"\r\n--b--\r\n")
        data = converted(original, needs=EIGHT_BIT_OK)
        self.assertLessEqual(longest(data), 78)
        self.assertEqual(leaves(data), [("text/plain", inner)])

    def test_the_refusal_says_it_is_about_a_long_line(self):
        message = Spooled("Q1", Envelope("a@example.org", ("b@example.com",), 0.0, octets="7bit", long_lines=True),
                          b"Subject: x\r\nX-Token: " + b"t" * 1200 + b"\r\n\r\nbody\r\n")
        d = downgrade(message, "mx.example.com", {b"8BITMIME": b""})
        d.addCallback(self.assertEqual, (554, "5.6.3", "a line over 998 octets must be re-encoded for mx.example.com, "
                                         "and a header field line longer than 998 octets has no space or tab to "
                                         "fold it at"))
        return d

    def test_a_converted_message_is_what_downgrade_gives_an_8bitmime_hop(self):
        body = b"Subject: x\r\n\r\n" + HTML_LINE + b"\r\n"
        message = Spooled("Q1", Envelope("a@example.org", ("b@example.com",), 0.0, octets="7bit", long_lines=True),
                          body)
        d = downgrade(message, "mx.example.com", {b"8BITMIME": b""})

        def check(result):
            self.assertIsInstance(result, ConvertedMessage)
            with result.open() as f:
                data = f.read()
            self.assertLessEqual(longest(data), 78)
            self.assertEqual(email.message_from_bytes(data).get_payload(decode=True), HTML_LINE + b"\r\n")
            self.assertFalse(needs_downgrade(result, {b"8BITMIME": b""}))
        return d.addCallback(check)

    def test_a_huge_line_is_converted_in_bounded_memory(self):
        body = b"Subject: big\r\n\r\n" + b"w" * (8 * 1024 * 1024) + b"\r\n"
        tracemalloc.start()
        try:
            result = convert_message(spooled(body), EIGHT_BIT_OK)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 2 * 1024 * 1024)
        with result.open() as f:
            data = f.read()
        self.assertLessEqual(longest(data), 76)
        self.assertEqual(email.message_from_bytes(data).get_payload(decode=True), body[16:])


class TestDoubleTests(unittest.TestCase):
    def test_the_message_double_is_an_ispooledmessage(self):
        """What the hops here are given provides the interface they rely on (no probing)."""
        self.assertTrue(verifyObject(ISpooledMessage, spooled(b"x\r\n")))
