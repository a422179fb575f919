"""DKIM: streaming body hash, signing with RSA and Ed25519, verification against keys served by a real DNS
server on loopback, the delivery-side hop, and the key tools."""
from __future__ import annotations

import hashlib
import io
import os
import random
import stat
from contextlib import redirect_stdout

import dkim
from cryptography.hazmat.primitives import serialization
from dkim.canonicalization import ALGORITHMS
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.cli.main import main as cli_main
from mailrelay.queue.results import RecipientResult
from mailrelay.dkim import keys
from mailrelay.dkim.bodyhash import BodyHasher
from mailrelay.outbound.signing import DKIMHop
from mailrelay.dkim.permission import may_sign
from mailrelay.dkim.signer import Signer
from mailrelay.dkim.verifier import Verifier, make_resolver, txt_lookup
from mailrelay.envelope import Envelope
from mailrelay.interfaces import ISpooledMessage
from tests.support.dnsserver import DNSServer

RSA = keys.generate("rsa", 2048)
ED = keys.generate("ed25519")


def canonical_reference(body: bytes, canon: bytes) -> bytes:
    return hashlib.sha256(ALGORITHMS[canon].canonicalize_body(body)).digest()


class BodyHashTests(unittest.TestCase):
    def test_matches_dkimpy_for_any_body_and_any_chunking(self):
        rng = random.Random(7)
        atoms = [b"a", b" ", b"\t", b"\r\n", b"\r\n\r\n", b"x  y", b" \t\r\n", b"\xc3\xa9", b"."]
        for canon in (b"simple", b"relaxed"):
            for _ in range(2000):
                body = b"".join(rng.choice(atoms) for _ in range(rng.randint(0, 40)))
                hasher = BodyHasher(canon)
                position = 0
                while position < len(body):
                    step = rng.randint(1, 7)
                    hasher.update(body[position:position + step])
                    position += step
                self.assertEqual(hasher.digest(), canonical_reference(body, canon), (canon, body))

    def test_empty_body(self):
        self.assertEqual(BodyHasher(b"simple").digest(), hashlib.sha256(b"\r\n").digest())
        self.assertEqual(BodyHasher(b"relaxed").digest(), hashlib.sha256(b"").digest())

    def test_empty_lines_in_the_middle_survive_chunk_boundaries(self):
        body = b"a\r\n" + b"\r\n" * 5 + b"b\r\n" + b"\r\n" * 3
        hasher = BodyHasher(b"relaxed")
        for i in range(len(body)):
            hasher.update(body[i:i + 1])
        self.assertEqual(hasher.digest(), hashlib.sha256(b"a\r\n\r\n\r\n\r\n\r\n\r\nb\r\n").digest())


class KeyTests(unittest.TestCase):
    def write(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_pkcs1_and_pkcs8_rsa_and_ed25519_are_detected(self):
        pkcs1 = RSA.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption())
        self.assertIn(b"BEGIN RSA PRIVATE KEY", pkcs1)
        for data, algorithm in ((pkcs1, b"rsa-sha256"), (keys.private_pem(RSA), b"rsa-sha256"),
                                (keys.private_pem(ED), b"ed25519-sha256")):
            key = keys.SigningKey("example.org", "s", keys.load_private_key(self.write(data)))
            self.assertEqual(key.algorithm, algorithm)

    def test_short_rsa_key_is_refused_with_the_file_name(self):
        import subprocess

        # cryptography refuses to generate such a key; OpenSSL still will.
        weak = subprocess.run(["openssl", "genrsa", "768"], capture_output=True, check=True).stdout
        path = self.write(weak)
        with self.assertRaises(keys.KeyError_) as caught:
            keys.load_private_key(path)
        self.assertIn(path, str(caught.exception))
        self.assertIn("768", str(caught.exception))

    def test_garbage_is_refused(self):
        with self.assertRaises(keys.KeyError_):
            keys.load_private_key(self.write(b"not a key"))

    def test_txt_record_is_split_into_255_octet_strings(self):
        value = keys.txt_record(keys.generate("rsa", 4096))
        parts = keys.split_txt(value)
        self.assertGreater(len(parts), 2)
        self.assertTrue(all(len(p) <= 255 for p in parts))
        self.assertEqual("".join(parts), value)


MESSAGES = {
    "8bit": b"From: A <a@example.org>\r\nTo: b@example.com\r\nSubject: caf\xc3\xa9\r\n\r\n"
            b"gr\xc3\xbc\xc3\x9fe  aus  K\xc3\xb6ln\t \r\n",
    "folded": b"From: A <a@example.org>\r\nTo: b@example.com,\r\n  c@example.com,\r\n\td@example.com\r\n"
              b"Subject: " + b"long " * 40 + b"\r\n subject continued\r\n"
              b"List-Unsubscribe: <mailto:u@x>\r\n\r\nbody\r\n",
    "empty": b"From: a@example.org\r\nSubject: nothing\r\n\r\n",
    "trailing": b"From: a@sub.example.org\r\nSubject: t\r\n\r\nlast line\r\n\r\n\r\n\r\n",
}


class SigningTests(unittest.TestCase):
    """Signatures made here verify with dkimpy, keys fetched by dnspython from a real DNS server."""

    def setUp(self):
        self.dns = DNSServer({
            ("rsa2026._domainkey.example.org", "TXT"): [keys.txt_record(RSA)],
            ("ed2026._domainkey.example.org", "TXT"): [keys.txt_record(ED)],
        })
        self.port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.lookup = txt_lookup(make_resolver([("127.0.0.1", self.port)]))
        self.signer = Signer([keys.SigningKey("example.org", "rsa2026", RSA),
                              keys.SigningKey("example.org", "ed2026", ED)])

    def verify_all(self, message: bytes):
        """In a thread: dnspython blocks, and the DNS server runs on this reactor."""
        def run():
            checker = dkim.DKIM(message)
            count = sum(1 for k, _ in checker.headers if k.lower() == b"dkim-signature")
            return [self._verify_one(checker, i) for i in range(count)]
        return threads.deferToThread(run)

    def _verify_one(self, checker, index: int) -> bool:
        try:
            return checker.verify(idx=index, dnsfunc=self.lookup)
        except dkim.ValidationError:   # dkimpy raises on a body hash mismatch
            return False

    @defer.inlineCallbacks
    def test_every_kind_of_message_verifies_with_both_keys(self):
        for name, message in MESSAGES.items():
            headers = self.signer.sign(io.BytesIO(message))
            self.assertEqual(headers.count(b"DKIM-Signature:"), 2, name)
            self.assertIn(b"a=rsa-sha256", headers)
            self.assertIn(b"a=ed25519-sha256", headers)
            results = yield self.verify_all(headers + message)
            self.assertEqual(results, [True, True], name)

    @defer.inlineCallbacks
    def test_from_is_oversigned_so_an_added_from_breaks_the_signature(self):
        message = MESSAGES["8bit"]
        signed = self.signer.sign(io.BytesIO(message)) + message
        self.assertIn(b"h=from: to: subject: from", signed.replace(b"\r\n ", b""))
        tampered = signed.replace(b"From: A", b"From: evil@attacker.example\r\nFrom: A", 1)
        results = yield self.verify_all(tampered)
        self.assertEqual(results, [False, False])

    @defer.inlineCallbacks
    def test_changed_body_fails(self):
        message = MESSAGES["folded"]
        signed = self.signer.sign(io.BytesIO(message)) + message
        results = yield self.verify_all(signed.replace(b"body", b"BODY"))
        self.assertEqual(results, [False, False])

    def test_other_domains_are_left_unsigned(self):
        for sender in (b"a@example.com", b"a@notexample.org", b""):
            message = b"From: " + sender + b"\r\nSubject: s\r\n\r\nbody\r\n"
            self.assertEqual(self.signer.sign(io.BytesIO(message)), b"", sender)

    def test_subdomain_uses_parent_keys(self):
        headers = self.signer.sign(io.BytesIO(MESSAGES["trailing"]))
        self.assertIn(b"d=example.org", headers)

    def test_expire_adds_x_tag(self):
        signer = Signer([keys.SigningKey("example.org", "rsa2026", RSA)], expire=86400, clock=lambda: 1000)
        headers = signer.sign(io.BytesIO(MESSAGES["empty"])).replace(b"\r\n ", b"")
        self.assertIn(b"t=1000;", headers)
        self.assertIn(b"x=87400;", headers)

    def test_rsa_signing_uses_openssl(self):
        """dkimpy's pure-Python RSA would not be called: its signing function is never reached."""
        self.patch(dkim, "RSASSA_PKCS1_v1_5_sign", lambda *a: self.fail("pure-Python RSA used"))
        self.assertIn(b"a=rsa-sha256", self.signer.sign(io.BytesIO(MESSAGES["8bit"])))


class VerifierTests(unittest.TestCase):
    def setUp(self):
        self.dns = DNSServer({("rsa2026._domainkey.example.org", "TXT"): [keys.txt_record(RSA)]},
                             servfail={"broken._domainkey.example.org"})
        self.port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.verifier = Verifier("relay.test", make_resolver([("127.0.0.1", self.port)], timeout=2))
        self.signed = Signer([keys.SigningKey("example.org", "rsa2026", RSA)]).sign(
            io.BytesIO(MESSAGES["8bit"])) + MESSAGES["8bit"]

    def header(self, message: bytes):
        return threads.deferToThread(self.verifier.results_header, io.BytesIO(message), len(message))

    @defer.inlineCallbacks
    def test_pass(self):
        header = yield self.header(self.signed)
        self.assertTrue(header.startswith(b"Authentication-Results: relay.test;"))
        self.assertIn(b"dkim=pass header.d=example.org header.s=rsa2026", header)

    @defer.inlineCallbacks
    def test_fail_on_changed_body(self):
        header = yield self.header(self.signed.replace(b"K\xc3\xb6ln", b"Bonn"))
        self.assertIn(b"dkim=fail", header)

    @defer.inlineCallbacks
    def test_none_without_signature(self):
        header = yield self.header(MESSAGES["empty"])
        self.assertIn(b"dkim=none", header)

    @defer.inlineCallbacks
    def test_servfail_is_temperror_not_fail(self):
        header = yield self.header(self.signed.replace(b"s=rsa2026", b"s=broken"))
        self.assertIn(b"dkim=temperror", header)

    @defer.inlineCallbacks
    def test_too_large_is_not_read(self):
        verifier = Verifier("relay.test", make_resolver([("127.0.0.1", self.port)]), max_size=10)
        header = yield threads.deferToThread(verifier.results_header, io.BytesIO(self.signed), len(self.signed))
        self.assertIn(b"dkim=neutral", header)


@implementer(ISpooledMessage)
class _Spooled:
    path = None           # not read from a spool file
    def __init__(self, data: bytes, dkim_senders=("*",), identity=None):
        self.data, self.queue_id, self.size = data, "Q1", len(data)
        self.envelope = Envelope("app@example.org", ("b@example.com",), 0.0, identity=identity,
                                 dkim_senders=dkim_senders)

    def open(self):
        return io.BytesIO(self.data)


class _RecordingHop:
    def __init__(self):
        self.sent = []

    def deliver(self, message, recipients):
        with message.open() as f:
            self.sent.append((f.read(), message.size, message.queue_id))
        return defer.succeed([RecipientResult(r, 250, "2.0.0", "ok") for r in recipients])


class HopTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_signature_is_prepended_and_the_spooled_bytes_are_untouched(self):
        inner = _RecordingHop()
        hop = DKIMHop(inner, signer=Signer([keys.SigningKey("example.org", "ed2026", ED)]))
        message = _Spooled(MESSAGES["folded"])
        results = yield hop.deliver(message, ["b@example.com"])
        self.assertTrue(results[0].delivered)
        sent, size, queue_id = inner.sent[0]
        self.assertTrue(sent.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256"))
        self.assertTrue(sent.endswith(MESSAGES["folded"]))
        self.assertEqual((size, queue_id), (len(sent), "Q1"))

    @defer.inlineCallbacks
    def test_a_message_its_client_may_not_sign_for_goes_unsigned(self):
        inner = _RecordingHop()
        hop = DKIMHop(inner, signer=Signer([keys.SigningKey("example.org", "ed2026", ED)]))
        for dkim_senders, identity in (((), "alice"), (("app.example.org",), "permit[0]"), (None, "permit[2]")):
            message = _Spooled(MESSAGES["folded"], dkim_senders=dkim_senders, identity=identity)
            results = yield hop.deliver(message, ["b@example.com"])
            self.assertTrue(results[0].delivered)
            self.assertEqual(inner.sent[-1][0], MESSAGES["folded"], dkim_senders)     # as spooled: no signature
        signed = _Spooled(MESSAGES["folded"], dkim_senders=None, identity="alice")     # an old file, a user's
        yield hop.deliver(signed, ["b@example.com"])
        self.assertTrue(inner.sent[-1][0].startswith(b"DKIM-Signature: "))

    @defer.inlineCallbacks
    def test_signing_failure_defers_instead_of_sending_unsigned(self):
        inner = _RecordingHop()

        class Broken:
            def sign(self, f, permitted=None):
                raise OSError("disk gone")

        results = yield DKIMHop(inner, signer=Broken()).deliver(_Spooled(MESSAGES["8bit"]), ["b@example.com"])
        self.assertEqual(inner.sent, [])
        self.assertEqual((results[0].code, results[0].status), (451, "4.3.0"))
        self.flushLoggedErrors(OSError)


class PermissionTests(unittest.TestCase):
    """The permit decision recorded in the envelope decides whether our keys sign (dkim/permission.py)."""

    def envelope(self, dkim_senders, identity=None):
        return Envelope("a@example.org", ("b@example.com",), 0.0, identity=identity, dkim_senders=dkim_senders)

    def test_recorded_senders_cover_the_from_addresses_or_not(self):
        allowed = self.envelope(("example.org", "*.example.net", "noreply@example.com"))
        for addresses in (["a@example.org"], ["A@EXAMPLE.ORG"], ["x@sub.example.net"], ["noreply@example.com"],
                          ["a@example.org", "b@example.org"]):
            self.assertTrue(may_sign(allowed, addresses), addresses)
        for addresses in (["ceo@sub.example.org"], ["a@example.net"], ["other@example.com"], [],
                          ["a@example.org", "ceo@evil.example"], [""]):
            self.assertFalse(may_sign(allowed, addresses), addresses)
        self.assertTrue(may_sign(self.envelope(("*",)), ["anyone@anywhere.example"]))

    def test_an_empty_decision_never_signs(self):
        self.assertFalse(may_sign(self.envelope(()), ["ceo@example.org"]))
        self.assertFalse(may_sign(self.envelope((), identity="alice"), ["ceo@example.org"]))
        self.assertFalse(may_sign(None, ["ceo@example.org"]))

    def test_a_from_the_parsers_read_differently_is_not_signed_for_a_restricted_client(self):
        restricted, anything = self.envelope(("example.org",)), self.envelope(("*",))
        plain = b"From: CEO <ceo@example.org>\r\nSubject: s\r\n\r\n"
        self.assertTrue(may_sign(restricted, ["ceo@example.org"], plain))
        # The signer's parser saw ceo@example.org; the strict one refuses the field, or reads another address.
        for block in (b"From: ceo@example.org)<boss@evil.example>\r\n\r\n",          # CVE-2023-27043 shape
                      b"From: Alice <ceo@example.org> <boss@evil.example>\r\n\r\n",
                      b"From: CEO <other@example.org>\r\n\r\n"):
            self.assertFalse(may_sign(restricted, ["ceo@example.org"], block), block)
        # A client that may use any From: loses nothing by an odd one: no domain is lent that it lacked.
        self.assertTrue(may_sign(anything, ["ceo@example.org"], b"From: ceo@example.org)<boss@evil.example>\r\n\r\n"))

    def test_a_spool_file_without_the_field_signs_only_an_authenticated_users_mail(self):
        old_line = (b'{"body":"7BIT","client_address":"10.0.0.5","client_helo":"h","identity":%s,"params":{},'
                    b'"received_at":1.0,"recipients":["b@example.com"],"sender":"a@example.org",'
                    b'"smtputf8":false,"tls":null}')
        for identity, signed in ((b'"alice"', True), (b'"permit[0]"', False), (b'"permit[12]"', False),
                                 (b"null", False)):
            envelope = Envelope.from_json(old_line % identity)
            self.assertIsNone(envelope.dkim_senders)
            self.assertEqual(may_sign(envelope, ["ceo@example.org"]), signed, identity)

    def test_the_decision_survives_the_spool_line(self):
        envelope = self.envelope(("example.org", "noreply@example.com"), identity="permit[0]")
        self.assertIn(b'"dkim_senders":["example.org","noreply@example.com"]', envelope.to_json())
        self.assertEqual(Envelope.from_json(envelope.to_json()), envelope)
        self.assertEqual(Envelope.from_json(self.envelope(()).to_json()).dkim_senders, ())
        for bad in (b'"example.org"', b"[1]", b"{}"):
            line = self.envelope(()).to_json().replace(b'"dkim_senders":[]', b'"dkim_senders":' + bad)
            self.assertRaises(ValueError, Envelope.from_json, line)

    def test_signer_asks_with_every_address_of_the_one_from_field(self):
        signer = Signer([keys.SigningKey("example.org", "ed2026", ED)])
        asked = []

        def permitted(addresses, block):
            asked.append((addresses, block))
            return addresses == ["a@example.org", "b@example.org"]
        message = b"From: A <a@example.org>, b@example.org\r\nSubject: s\r\n\r\nbody\r\n"
        self.assertIn(b"DKIM-Signature: ", signer.sign(io.BytesIO(message), permitted))
        self.assertEqual(signer.sign(io.BytesIO(message), lambda addresses, block: False), b"")
        self.assertEqual(asked, [(["a@example.org", "b@example.org"], message.split(b"\r\n\r\n")[0] + b"\r\n\r\n")])
        self.assertEqual(signer.sign(io.BytesIO(b"From: x@other.example\r\n\r\n"), permitted), b"")
        self.assertEqual(len(asked), 1)          # no key for the domain: not even asked


class KeyToolTests(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "tap.conf")

    def write_config(self, extra: str = ""):
        with open(self.config, "w") as f:
            f.write(f'hostname = "relay.test"\n{extra}')

    def run_cli(self, *argv):
        out = io.StringIO()
        with redirect_stdout(out):
            status = cli_main(list(argv))
        return status, out.getvalue()

    def test_genkey_writes_0600_key_and_prints_split_record(self):
        self.write_config()
        status, out = self.run_cli("dkim", "genkey", "example.org", "sel", "--bits", "4096", "--config", self.config)
        self.assertEqual(status, 0)
        path = os.path.join(self.dir, "dkim", "example.org.sel.pem")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertIn("sel._domainkey.example.org. IN TXT (", out)
        strings = out.split("(", 1)[1].rsplit(")", 1)[0].split('" "')
        self.assertGreater(len(strings), 2)
        self.assertTrue(all(len(s.strip(' "')) <= 255 for s in strings))
        key = keys.load_private_key(path)
        self.assertIn(keys.public_key_b64(key), "".join(s.strip(' "') for s in strings))

    def test_genkey_refuses_to_overwrite(self):
        self.write_config()
        self.assertEqual(self.run_cli("dkim", "genkey", "example.org", "s", "--algorithm", "ed25519",
                                      "--config", self.config)[0], 0)
        self.assertEqual(self.run_cli("dkim", "genkey", "example.org", "s", "--config", self.config)[0], 2)

    @defer.inlineCallbacks
    def test_check_compares_published_record_with_key(self):
        key_file = os.path.join(self.dir, "k.pem")
        with open(key_file, "wb") as f:
            f.write(keys.private_pem(ED))
        server = DNSServer({("good._domainkey.example.org", "TXT"): [keys.txt_record(ED)],
                            ("bad._domainkey.example.org", "TXT"): [keys.txt_record(keys.generate("ed25519"))]})
        port = server.start(reactor)
        self.addCleanup(server.stop)
        self.write_config(
            f'[delivery]\nnameservers = ["127.0.0.1:{port}"]\n'
            f'[[dkim.key]]\ndomain = "example.org"\nselector = "good"\nkey_file = "{key_file}"\n'
            f'[[dkim.key]]\ndomain = "example.org"\nselector = "bad"\nkey_file = "{key_file}"\n'
        )
        good = yield threads.deferToThread(self.run_cli, "dkim", "check", "example.org", "good",
                                           "--config", self.config)
        bad = yield threads.deferToThread(self.run_cli, "dkim", "check", "example.org", "bad", "--config", self.config)
        self.assertEqual(good[0], 0, good[1])
        self.assertIn("OK", good[1])
        self.assertEqual(bad[0], 1, bad[1])
        self.assertIn("MISMATCH", bad[1])


class TestDoubleTests(unittest.TestCase):
    def test_the_message_double_is_an_ispooledmessage(self):
        """What the hops here are given provides the interface they rely on (no probing)."""
        self.assertTrue(verifyObject(ISpooledMessage, _Spooled(b"Subject: x\r\n\r\ny\r\n")))
