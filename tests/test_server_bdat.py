"""CHUNKING (RFC 3030) inbound: BDAT conversations over StringTransport and task.Clock.

Every chunk's octets are read whatever the answer (the session stays in step), a chunk is content and
never commands or an end of data (SMTP smuggling), the DATA content rules hold inside chunks, and the
LAST chunk is answered 250 only once the message is committed.  Stock Twisted (and this relay before
CHUNKING) answers `BDAT` with 500 and then runs the chunk's octets as commands: each test here fails so.
"""
from __future__ import annotations

from twisted.trial import unittest

from mailrelay import config
from mailrelay.server.bdat import parse_bdat
from tests.support.messages import strip_received
from tests.support.session import Harness, login

ENVELOPE = b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"
MESSAGE = b"From: a@example.org\r\nSubject: chunks\r\n\r\nfirst line\r\n..two dots stay\r\n.\r\nlast\r\n"


def bdat(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


def replies(text: str) -> list[str]:
    """Each reply line's code and enhanced code, e.g. "250 2.0.0"."""
    return [" ".join(line.split(" ")[:2]) for line in text.splitlines()]


class BdatTestCase(unittest.TestCase):
    def setUp(self):
        self.harness = Harness()
        self.client = self.harness.connect()

    def content(self, writer) -> bytes:
        """The content as spooled, without the Received header the relay wrote first."""
        return strip_received(writer.data)


class OfferedTests(unittest.TestCase):
    def test_every_listener_offers_chunking(self):
        for kind, tls in (("relay", False), ("submission", False), ("submissions", True)):
            client = Harness(kind=kind, tls_options=None if tls else object()).connect(tls=tls)
            self.assertIn("CHUNKING", [line[4:] for line in client.cmd("EHLO c.test").splitlines()], kind)

    def test_and_after_starttls_too(self):
        client = Harness().connect()
        client.ehlo_tls()
        self.assertIn("CHUNKING", client.cmd("EHLO c.test"))

    def test_but_not_binarymime(self):
        reply = Harness().connect().cmd("EHLO c.test")
        self.assertNotIn("BINARYMIME", reply)
        client = Harness().connect()
        client.cmd("EHLO c.test")
        self.assertEqual(replies(client.cmd("MAIL FROM:<a@example.org> BODY=BINARYMIME")), ["501 5.5.4"])


class ParseTests(unittest.TestCase):
    def test_the_argument(self):
        self.assertEqual(parse_bdat("10"), (10, False, True))
        self.assertEqual(parse_bdat("0 LAST"), (0, True, True))
        self.assertEqual(parse_bdat("7 last"), (7, True, True))
        self.assertEqual(parse_bdat("7 LATER"), (7, False, False))
        self.assertEqual(parse_bdat("7 LAST junk"), (7, True, False))
        self.assertEqual(parse_bdat("9" * 20), (int("9" * 20), False, True))
        for bad in ("", "LAST", "-1", "+1", "0x10", "1e9", "1.5", "9" * 21, "\xb2", "١٢"):
            self.assertIsNone(parse_bdat(bad), bad)


class ConversationTests(BdatTestCase):
    def test_pipelined_with_mail_and_rcpt_in_one_write(self):
        first, second = MESSAGE[:30], MESSAGE[30:]
        out = self.client.send(ENVELOPE + bdat(first) + bdat(second, last=True) + b"NOOP\r\n")
        lines = out.splitlines()
        self.assertEqual(replies(out)[-5:], ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0", "250 2.0.0"])
        self.assertEqual(lines[-3:], ["250 2.0.0 Ok: 30 octets", "250 2.0.0 Ok: queued as Q000001",
                                      "250 2.0.0 Ok"])
        [message] = self.harness.queue.messages
        # No dot-stuffing inside BDAT: ".." stays "..", a lone "." line is content, nothing ended early.
        self.assertEqual(self.content(message), MESSAGE)
        self.assertEqual(message.envelope.recipients, ("b@example.org",))
        self.assertIn(b"by relay.test (mailrelay) with ESMTP", message.data)

    def test_chunks_split_at_every_boundary_give_the_same_conversation(self):
        wire = ENVELOPE + bdat(MESSAGE[:17]) + bdat(MESSAGE[17:], last=True) + b"MAIL FROM:<c@example.org>\r\n"
        whole = Harness()
        expected = whole.connect().send(wire)
        expected_content = whole.queue.messages[0].data
        for cut in range(1, len(wire)):
            harness = Harness()
            client = harness.connect()
            out = client.send(wire[:cut]) + client.send(wire[cut:])
            self.assertEqual(out, expected, f"split at {cut}: {wire[:cut][-20:]!r}")
            self.assertEqual(harness.queue.messages[0].data, expected_content, f"split at {cut}")
        harness = Harness()
        client = harness.connect()
        self.assertEqual("".join(client.send(wire[i:i + 1]) for i in range(len(wire))), expected)
        self.assertEqual(harness.queue.messages[0].data, expected_content)

    def test_bdat_0_last_ends_the_message(self):
        out = self.client.send(ENVELOPE + bdat(MESSAGE) + b"BDAT 0 LAST\r\n")
        self.assertEqual(out.splitlines()[-2:], [f"250 2.0.0 Ok: {len(MESSAGE)} octets",
                                                 "250 2.0.0 Ok: queued as Q000001"])
        self.assertEqual(self.content(self.harness.queue.messages[0]), MESSAGE)

    def test_bdat_0_last_alone_is_an_empty_message(self):
        out = self.client.send(ENVELOPE + b"BDAT 0 LAST\r\n")
        self.assertEqual(out.splitlines()[-1], "250 2.0.0 Ok: queued as Q000001")
        [message] = self.harness.queue.messages
        self.assertTrue(message.data.startswith(b"Received: ") and message.data.endswith(b"\r\n"))

    def test_a_second_message_in_the_same_session_by_bdat_then_by_data(self):
        out = self.client.send(ENVELOPE + bdat(MESSAGE, last=True)
                               + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        self.assertEqual(replies(out)[-4:], ["250 2.0.0", "250 2.1.0", "250 2.1.5", "354 End"])
        self.assertEqual(replies(self.client.send(b"Subject: two\r\n\r\nby DATA\r\n.\r\n")), ["250 2.0.0"])
        self.assertEqual(len(self.harness.queue.messages), 2)

    def test_a_crlf_split_between_two_chunks_is_one_line_end(self):
        self.client.send(ENVELOPE + bdat(b"Subject: x\r\n\r\nline\r") + bdat(b"\nnext\r\n", last=True))
        self.assertEqual(self.content(self.harness.queue.messages[0]), b"Subject: x\r\n\r\nline\r\nnext\r\n")

    def test_a_last_line_without_a_line_end_gets_crlf(self):
        self.client.send(ENVELOPE + bdat(b"Subject: x\r\n\r\nno line end", last=True))
        self.assertEqual(self.content(self.harness.queue.messages[0]), b"Subject: x\r\n\r\nno line end\r\n")

    def test_the_final_250_only_after_the_commit_and_nothing_read_meanwhile(self):
        self.harness.queue.commit_mode = "pending"
        out = self.client.send(ENVELOPE + bdat(MESSAGE, last=True) + b"NOOP\r\n")
        self.assertEqual(replies(out)[-2:], ["250 2.1.0", "250 2.1.5"])     # no 250 for the message yet
        self.client.transport.clear()
        self.harness.queue.writers[0].pending.callback("Q000001")
        self.assertEqual(self.client.transport.value().decode().splitlines(),
                         ["250 2.0.0 Ok: queued as Q000001", "250 2.0.0 Ok"])

    def test_a_failed_commit_is_451(self):
        self.harness.queue.commit_mode = "fail"
        out = self.client.send(ENVELOPE + bdat(MESSAGE, last=True) + b"NOOP\r\n")
        self.assertEqual(replies(out)[-2:], ["451 4.3.0", "250 2.0.0"])
        self.assertTrue(self.harness.queue.writers[0].aborted)
        self.flushLoggedErrors(OSError)

    def test_a_queue_that_cannot_take_the_message_gets_451_for_its_chunks(self):
        def broken(envelope):
            raise OSError("spool unusable")

        self.harness.queue.new_message = broken
        out = self.client.send(ENVELOPE + bdat(b"one\r\n") + bdat(b"two\r\n", last=True) + b"NOOP\r\n")
        self.assertEqual(replies(out)[-3:], ["451 4.3.0", "451 4.3.0", "250 2.0.0"])
        self.flushLoggedErrors(OSError)

    def test_rset_throws_the_partial_message_away(self):
        out = self.client.send(ENVELOPE + bdat(b"Subject: x\r\n") + b"RSET\r\n" + bdat(b"y\r\n", last=True))
        self.assertEqual(replies(out)[-3:], ["250 2.0.0", "250 2.0.0", "503 5.5.1"])
        self.assertTrue(self.harness.queue.writers[0].aborted)
        self.assertEqual(self.harness.queue.messages, [])

    def test_the_policy_sees_the_headers_at_last(self):
        self.client.send(ENVELOPE + bdat(b"Subject: seen\r\n") + bdat(b"\r\nbody\r\n", last=True))
        self.assertEqual(self.harness.policy.headers, [b"Subject: seen\r\n"])


class OrderTests(BdatTestCase):
    def test_data_after_bdat_is_503_and_rset_recovers(self):
        out = self.client.send(ENVELOPE + bdat(b"Subject: x\r\n") + b"DATA\r\n")
        self.assertEqual(replies(out)[-2:], ["250 2.0.0", "503 5.5.1"])
        self.assertIn("DATA after BDAT", out)
        out = self.client.send(b"RSET\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        self.assertEqual(replies(out), ["250 2.0.0", "250 2.1.0", "250 2.1.5", "354 End"])

    def test_rcpt_and_mail_after_bdat_are_503(self):
        out = self.client.send(ENVELOPE + bdat(b"Subject: x\r\n")
                               + b"RCPT TO:<c@example.org>\r\nMAIL FROM:<a@example.org>\r\n" + bdat(b"y\r\n", True))
        self.assertEqual(replies(out)[-4:], ["250 2.0.0", "503 5.5.1", "503 5.5.1", "250 2.0.0"])
        self.assertEqual(self.harness.queue.messages[0].envelope.recipients, ("b@example.org",))

    def test_bdat_without_mail_is_503_after_its_chunk_is_read(self):
        # The chunk holds commands: read as octets and discarded, never run.
        chunk = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nNOOP\r\n"
        out = self.client.send(b"EHLO c.test\r\n" + bdat(chunk, last=True) + b"NOOP\r\n")
        self.assertEqual(replies(out)[-2:], ["503 5.5.1", "250 2.0.0"])
        self.assertEqual(out.count("\r\n"), 9 + 2)          # EHLO's nine lines, then one reply each
        self.assertEqual(self.harness.queue.writers, [])

    def test_bdat_without_rcpt_is_503_after_its_chunk_is_read(self):
        out = self.client.send(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\n" + bdat(b"NOOP\r\n")
                               + bdat(b"RSET\r\n", last=True) + b"RCPT TO:<b@example.org>\r\n")
        self.assertEqual(replies(out)[-4:], ["250 2.1.0", "503 5.5.1", "503 5.5.1", "250 2.1.5"])
        self.assertIn("Need MAIL and RCPT before BDAT", out)

    def test_bdat_after_last_is_503(self):
        out = self.client.send(ENVELOPE + bdat(b"x\r\n", last=True) + bdat(b"y\r\n") + b"NOOP\r\n")
        self.assertEqual(replies(out)[-3:], ["250 2.0.0", "503 5.5.1", "250 2.0.0"])
        self.assertEqual(len(self.harness.queue.messages), 1)

    def test_a_malformed_end_marker_reads_the_chunk_and_ends_the_message(self):
        out = self.client.send(ENVELOPE + bdat(b"Subject: x\r\n") + b"BDAT 6 LATER\r\nNOOP\r\n"
                               + bdat(b"y\r\n", last=True) + b"NOOP\r\n")
        self.assertEqual(replies(out)[-4:], ["250 2.0.0", "501 5.5.4", "503 5.5.1", "250 2.0.0"])
        self.assertTrue(self.harness.queue.writers[0].aborted)
        self.assertEqual(self.harness.queue.messages, [])

    def test_an_unreadable_size_is_501_and_closes_the_connection(self):
        for size in (b"", b" abc", b" -1", b" 0x10", b" 1e3", b" " + b"9" * 21, b" LAST"):
            harness = Harness()
            client = harness.connect()
            out = client.send(ENVELOPE + b"BDAT" + size + b"\r\nMAIL FROM:<evil@example.org>\r\nNOOP\r\n")
            self.assertEqual(replies(out)[-1], "501 5.5.4", size)
            self.assertIn("closing connection", out.splitlines()[-1])
            self.assertTrue(client.closed, size)
            self.assertEqual(client.send(b"NOOP\r\n"), "")
            self.assertEqual(harness.queue.messages, [])

    def test_an_unreadable_size_mid_message_throws_the_message_away(self):
        self.client.send(ENVELOPE + bdat(b"Subject: x\r\n") + b"BDAT many\r\n")
        self.assertTrue(self.harness.queue.writers[0].aborted)
        self.assertTrue(self.client.closed)


class ContentTests(BdatTestCase):
    def test_a_data_terminator_and_a_smuggled_transaction_inside_a_chunk_are_content(self):
        smuggled = (b"From: a@example.org\r\nSubject: one\r\n\r\nbody\r\n.\r\n"
                    b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
                    b"Subject: smuggled\r\n\r\npay\n.\nQUIT\r\n")
        out = self.client.send(ENVELOPE + bdat(smuggled[:40]) + bdat(smuggled[40:], last=True) + b"NOOP\r\n")
        self.assertEqual(replies(out)[-3:], ["250 2.0.0", "250 2.0.0", "250 2.0.0"])
        self.assertEqual(out.splitlines()[-2], "250 2.0.0 Ok: queued as Q000001")
        [message] = self.harness.queue.messages
        self.assertEqual(len(self.harness.queue.writers), 1)          # one message, not two
        self.assertEqual(message.envelope.recipients, ("b@example.org",))
        # The content rules still hold: the bare LFs are normalised, so the lone "." lines are content
        # lines a next hop sees dot-stuffed, never an end of data.
        self.assertEqual(self.content(message), smuggled.replace(b"pay\n.\nQUIT", b"pay\r\n.\r\nQUIT"))

    def assertRefusedInStep(self, bad_chunk: bytes, code: str, last_separate: bool = True) -> str:
        wire = ENVELOPE + bdat(b"Subject: x\r\n\r\n") + bdat(bad_chunk, last=not last_separate)
        if last_separate:
            wire += bdat(b"more\r\nNOOP\r\n") + b"BDAT 0 LAST\r\n"
        out = self.client.send(wire + b"NOOP\r\n" + ENVELOPE[13:] + bdat(b"Subject: ok\r\n\r\nok\r\n", True))
        got = replies(out)[9 + 2:]
        expected = ["250 2.0.0", code] + ([code, code] if last_separate else []) + \
            ["250 2.0.0", "250 2.1.0", "250 2.1.5", "250 2.0.0"]
        self.assertEqual(got, expected, out)
        self.assertTrue(self.harness.queue.writers[0].aborted)
        self.assertEqual(len(self.harness.queue.messages), 1)       # only the clean one after it
        self.assertEqual(self.content(self.harness.queue.messages[0]), b"Subject: ok\r\n\r\nok\r\n")
        return out

    def test_a_nul_in_a_chunk_refuses_the_message_and_the_session_stays_in_step(self):
        out = self.assertRefusedInStep(b"body\r\n\x00.\r\nMAIL FROM:<x@example.org>\r\n", "550 5.6.0")
        self.assertIn("NUL octet", out)

    def test_a_bare_cr_in_a_chunk_refuses_the_message(self):
        self.assertRefusedInStep(b"body\r.\rDATA\r\n", "550 5.6.11")

    def test_a_bare_cr_in_the_last_chunk(self):
        self.assertRefusedInStep(b"body\r.\r\n", "550 5.6.11", last_separate=False)

    def test_a_cr_ending_the_last_chunk_is_a_bare_cr(self):
        self.assertRefusedInStep(b"body\r", "550 5.6.11", last_separate=False)

    def test_bare_lf_is_normalised(self):
        self.client.send(ENVELOPE + bdat(b"Subject: x\n\nline\n.\n", last=True))
        self.assertEqual(self.content(self.harness.queue.messages[0]), b"Subject: x\r\n\r\nline\r\n.\r\n")

    def test_the_line_length_bound_is_the_configured_one(self):
        self.harness = Harness(limits=config.Limits(max_line_length=2000))
        self.client = self.harness.connect()
        self.client.send(ENVELOPE + bdat(b"Subject: x\r\n\r\n" + b"a" * 2000 + b"\r\n", last=True))
        self.assertEqual(len(self.harness.queue.messages), 1)
        self.harness = Harness(limits=config.Limits(max_line_length=2000))
        self.client = self.harness.connect()
        out = self.assertRefusedInStep(b"b" * 2001 + b"\r\n", "554 5.6.0")
        self.assertIn("longer than 2000 octets", out)

    def test_a_long_line_without_line_end_is_never_buffered_whole(self):
        self.harness = Harness(limits=config.Limits(max_line_length=1000))
        self.client = self.harness.connect()
        self.client.send(ENVELOPE + b"BDAT 1000000 LAST\r\n")
        for _ in range(99):
            self.assertEqual(self.client.send(b"x" * 10000), "")
            self.assertLess(len(self.client.protocol.transactions.chunks.message.reader._partial), 1002)
        self.assertEqual(replies(self.client.send(b"x" * 10000)), ["554 5.6.0"])


class SizeTests(BdatTestCase):
    def setUp(self):
        self.harness = Harness(limits=config.Limits(max_message_size=100))
        self.client = self.harness.connect()

    def test_over_the_limit_is_552_with_every_octet_still_read(self):
        out = self.client.send(ENVELOPE + bdat(b"x" * 60 + b"\r\n") + bdat(b"y" * 60 + b"\r\nNOOP\r\n")
                               + bdat(b"z\r\n", last=True) + b"NOOP\r\n")
        self.assertEqual(replies(out)[-4:], ["250 2.0.0", "552 5.3.4", "552 5.3.4", "250 2.0.0"])
        self.assertTrue(self.harness.queue.writers[0].aborted)
        self.assertEqual(self.harness.queue.messages, [])

    def test_a_declared_chunk_over_the_limit_is_refused_unread_by_the_reader(self):
        self.client.send(ENVELOPE + b"BDAT 100000\r\n")
        self.assertEqual(self.harness.queue.writers, [])                 # refused as soon as declared
        piece = b"NOOP\r\n" * 1000 + b"\r\n.\r\n" * 800          # 10,000 octets of the chunk's 100,000
        for _ in range(9):
            self.assertEqual(self.client.send(piece), "")
        self.assertEqual(replies(self.client.send(piece)), ["552 5.3.4"])
        self.assertEqual(replies(self.client.send(b"BDAT 0 LAST\r\nNOOP\r\n")), ["552 5.3.4", "250 2.0.0"])

    def test_up_to_the_limit_is_taken(self):
        self.client.send(ENVELOPE + bdat(b"x" * 48 + b"\r\n") + bdat(b"y" * 48 + b"\r\n", last=True))
        self.assertEqual(len(self.harness.queue.messages), 1)


class TimeoutTests(unittest.TestCase):
    def test_the_idle_timeout_applies_inside_a_chunk(self):
        harness = Harness(limits=config.Limits(idle_timeout=30))
        client = harness.connect()
        client.send(ENVELOPE + b"BDAT 1000 LAST\r\npartial")
        harness.clock.advance(29)
        client.send(b"more")
        harness.clock.advance(29)
        self.assertFalse(client.closed)
        harness.clock.advance(1)
        self.assertTrue(client.transport.value().startswith(b"421 4.4.2"))
        self.assertTrue(client.closed)
        self.assertTrue(harness.queue.writers[0].aborted)

    def test_the_session_deadline_applies_inside_a_chunk(self):
        harness = Harness(limits=config.Limits(idle_timeout=30, session_timeout=100))
        client = harness.connect()
        client.send(ENVELOPE + b"BDAT 1000000\r\n")
        for _ in range(10):
            harness.clock.advance(10)
            client.protocol.dataReceived(b"x" * 100 + b"\r\n")
        self.assertIn(b"421 4.4.2 relay.test Session time limit exceeded", client.transport.value())
        self.assertTrue(client.closed)
        self.assertTrue(harness.queue.writers[0].aborted)

    def test_a_connection_lost_inside_a_chunk_throws_the_message_away(self):
        harness = Harness()
        client = harness.connect()
        client.send(ENVELOPE + bdat(b"Subject: x\r\n") + b"BDAT 100\r\npart")
        client.protocol.connectionLost(None)
        self.assertTrue(harness.queue.writers[0].aborted)

    def test_between_chunks_too(self):
        harness = Harness()
        client = harness.connect()
        client.send(ENVELOPE + bdat(b"Subject: x\r\n"))
        client.protocol.connectionLost(None)
        self.assertTrue(harness.queue.writers[0].aborted)


class ShutdownTests(unittest.TestCase):
    def test_a_bdat_message_under_way_is_finished_before_the_421(self):
        harness = Harness()
        client = harness.connect()
        client.send(ENVELOPE + bdat(b"Subject: x\r\n"))
        self.assertFalse(client.protocol.shut_down())
        out = client.send(bdat(b"\r\nbody\r\n", last=True) + b"NOOP\r\n")
        self.assertEqual(replies(out), ["250 2.0.0", "421 4.3.2"])
        self.assertEqual(len(harness.queue.messages), 1)


class AuthenticatedTests(unittest.TestCase):
    def test_bdat_on_submission_after_login(self):
        from tests.support.fakes import memory_portal
        harness = Harness(kind="submission", portal=memory_portal(alice="s3cret"))
        client = login(harness)
        out = client.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<b@example.org>\r\n" + bdat(MESSAGE, True))
        self.assertEqual(replies(out), ["250 2.1.0", "250 2.1.5", "250 2.0.0"])
        self.assertIn(b"with ESMTPSA", harness.queue.messages[0].data)


class MetricsTests(unittest.TestCase):
    def test_a_refused_message_is_counted_once_whatever_its_chunks(self):
        from mailrelay.metrics import Metrics
        harness = Harness(limits=config.Limits(max_message_size=10))
        harness.factory.metrics = metrics = Metrics()
        client = harness.connect()
        client.send(ENVELOPE + bdat(b"x" * 20) + bdat(b"y") + b"BDAT 0 LAST\r\n")
        self.assertEqual(metrics.registry.get_sample_value("mailrelay_messages_refused_total",
                                                           {"reason": "size"}), 1)

    def test_no_spool_file_for_a_message_refused_at_its_first_declaration(self):
        harness = Harness(limits=config.Limits(max_message_size=10))
        client = harness.connect()
        self.assertEqual(replies(client.send(ENVELOPE + bdat(b"x" * 20, last=True)))[-1], "552 5.3.4")
        self.assertEqual(harness.queue.writers, [])


class FailureTests(unittest.TestCase):
    def test_an_error_opening_the_message_is_451_after_the_chunk_is_read(self):
        harness = Harness()

        def broken(client):
            raise RuntimeError("policy bug")

        harness.policy.signing_senders = broken
        client = harness.connect()
        out = client.send(ENVELOPE + bdat(b"NOOP\r\nQUIT\r\n") + b"NOOP\r\n")
        self.assertEqual(replies(out)[-2:], ["451 4.3.0", "250 2.0.0"])
        self.assertFalse(client.closed)          # the QUIT inside the chunk was never run
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_and_data_still_gets_its_451_before_any_354(self):
        harness = Harness()

        def broken(client):
            raise RuntimeError("policy bug")

        harness.policy.signing_senders = broken
        client = harness.connect()
        out = client.send(ENVELOPE + b"DATA\r\n")
        self.assertEqual(replies(out)[-1], "451 4.3.0")
        self.assertNotIn("354", out)
        self.flushLoggedErrors(RuntimeError)
