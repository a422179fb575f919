"""server/authres.py: Authentication-Results fields claiming our authserv-id are removed on the way in
(RFC 8601 section 5), whatever the chunking; everything else passes byte for byte."""
from __future__ import annotations

from twisted.trial import unittest

from mailrelay.server.authres import AuthResultsFilter, authserv_id
from tests.support.session import Harness, transaction

OURS = b"Authentication-Results: relay.test; dkim=pass header.d=bank.example\r\n"
THEIRS = b"Authentication-Results: mx.partner.example;\r\n\tspf=pass smtp.mailfrom=partner.example\r\n"
HEAD = b"From: a@example.org\r\nSubject: hi\r\n"
BODY = b"\r\nAuthentication-Results: relay.test; in the body, untouched\r\n"


def run(chunks, our_id="relay.test", limit=256 * 1024):
    out = []
    f = AuthResultsFilter(out.append, our_id, limit)
    for chunk in chunks:
        f.feed(chunk)
    f.finish()
    return b"".join(out), f.removed


def every_split(data: bytes):
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]


class AuthservIdTests(unittest.TestCase):
    def test_the_first_token_without_comments_version_or_case(self):
        self.assertEqual(authserv_id(b" relay.test; dkim=pass"), "relay.test")
        self.assertEqual(authserv_id(b" (comment) Relay.TEST. 1; none"), "relay.test")
        self.assertEqual(authserv_id(b"\r\n\trelay.test\r\n\t; spf=fail"), "relay.test")
        self.assertEqual(authserv_id(b" relay.test"), "relay.test")
        self.assertEqual(authserv_id(b" ;"), "")


class FilterTests(unittest.TestCase):
    def test_ours_removed_theirs_and_the_body_kept_at_every_split(self):
        message = OURS + HEAD + THEIRS + OURS.replace(b"relay.test", b"RELAY.TEST") + BODY
        expected = HEAD + THEIRS + BODY
        for chunks in every_split(message):
            self.assertEqual(run(chunks), (expected, 2), chunks)

    def test_folded_and_commented_claims_are_recognised(self):
        folded = b"authentication-results:\r\n (our relay) relay.test\r\n\t; dkim=pass\r\n"
        self.assertEqual(run([HEAD + folded + BODY]), (HEAD + BODY, 1))

    def test_a_similar_name_is_not_ours(self):
        lookalike = b"Authentication-Results: relay.test.evil.example; dkim=pass\r\n"
        other_field = b"X-Authentication-Results: relay.test; dkim=pass\r\n"
        message = HEAD + lookalike + other_field + BODY
        self.assertEqual(run([message]), (message, 0))

    def test_no_header_block_and_headers_only_messages(self):
        self.assertEqual(run([BODY]), (BODY, 0))
        self.assertEqual(run([HEAD, OURS]), (HEAD, 1))       # all header, no empty line: filtered at the end

    def test_a_header_block_over_the_limit_passes_unfiltered_and_unheld(self):
        big = b"X-Filler: " + b"x" * 90 + b"\r\n"
        message = OURS + big * 20 + BODY
        out, removed = run([message[i:i + 100] for i in range(0, len(message), 100)], limit=1000)
        self.assertEqual((out, removed), (message, 0))


class SessionTests(unittest.TestCase):
    def test_a_relay_that_verifies_spools_the_message_without_the_forged_field(self):
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        harness = Harness()
        harness.factory.authserv_id = "relay.test"
        client = harness.connect()
        client.cmd("EHLO client.test")
        reply = transaction(client, OURS + HEAD + THEIRS + BODY)
        self.assertTrue(reply.startswith("250 "), reply)
        data = harness.queue.messages[0].data
        self.assertNotIn(b"bank.example", data)
        self.assertTrue(data.endswith(HEAD + THEIRS + BODY))
        self.assertTrue(data.startswith(b"Received: "))
        removals = [e for e in events if e.get("count") == 1 and "Authentication-Results" in e.get("log_format", "")]
        self.assertEqual([e["queue_id"] for e in removals], [harness.queue.messages[0].queue_id])

    def test_a_relay_that_does_not_verify_changes_nothing(self):
        harness = Harness()
        client = harness.connect()
        client.cmd("EHLO client.test")
        reply = transaction(client, OURS + HEAD + BODY)
        self.assertTrue(reply.startswith("250 "), reply)
        self.assertTrue(harness.queue.messages[0].data.endswith(OURS + HEAD + BODY))
