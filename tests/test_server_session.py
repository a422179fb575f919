"""RelaySession conversations over StringTransport and task.Clock: client line, server reply.

Each hole of stock Twisted SMTP we close has a test here (or in test_server_data /
test_server_network) that fails against stock twisted.mail.smtp.ESMTP.
"""
from __future__ import annotations

import ipaddress
import re

from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mailrelay import config
from mailrelay.interfaces import Reply
from mailrelay.server.policy import PermitPolicy
from tests.support.fakes import (
    AllowAllPolicy, DenyRelayPolicy, PendingChecker, TemporaryFailureChecker, memory_portal,
)
from mailrelay.server.realm import build_portal
from tests.support.session import TLS_OPTIONS, Harness, b64, transaction

ENHANCED = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3} ")


class GreetingAndEhloTests(unittest.TestCase):
    def test_greeting_names_the_host_first(self):
        self.assertEqual(Harness().connect().greeting, "220 relay.test ESMTP mailrelay\r\n")

    def test_ehlo_advertises_the_extensions_and_starttls_in_plaintext(self):
        reply = Harness().connect().cmd("EHLO client.test")
        self.assertEqual(reply.splitlines(), [
            "250-relay.test Hello client.test", "250-PIPELINING", "250-SIZE 52428800", "250-8BITMIME",
            "250-ENHANCEDSTATUSCODES", "250-SMTPUTF8", "250-CHUNKING", "250-DSN", "250 STARTTLS",
        ])

    def test_auth_is_not_advertised_in_plaintext(self):
        reply = Harness(portal=memory_portal(alice="x")).connect().cmd("EHLO client.test")
        self.assertNotIn("AUTH", reply)
        self.assertIn("SMTPUTF8", reply)       # RFC 6531: offered in plaintext too

    def test_auth_advertised_under_tls_without_starttls(self):
        reply = Harness(portal=memory_portal(alice="x")).connect(tls=True).cmd("EHLO client.test")
        self.assertIn("250 AUTH PLAIN LOGIN\r\n", reply)
        self.assertNotIn("STARTTLS", reply)

    def test_auth_not_advertised_without_a_portal(self):
        self.assertNotIn("AUTH", Harness().connect(tls=True).cmd("EHLO client.test"))

    def test_starttls_not_advertised_without_tls_options(self):
        self.assertNotIn("STARTTLS", Harness(tls_options=None).connect().cmd("EHLO client.test"))

    def test_ehlo_with_embedded_lf_is_refused_and_not_remembered(self):
        client = Harness().connect()
        self.assertEqual(client.codes("EHLO evil\nReceived: forged\r\n"), ["501 5.5.4"])
        self.assertEqual(client.codes("MAIL FROM:<a@example.org>\r\n"), ["503 5.5.1"])

    def test_ehlo_arguments_are_validated(self):
        client = Harness().connect()
        for bad in ("EHLO", "EHLO a b", "EHLO bad(host)", "EHLO ex\x00ample", "HELO h\u00e9"):
            self.assertEqual(client.codes(bad + "\r\n"), ["501 5.5.4"], bad)
        for good in ("EHLO [192.0.2.1]", "EHLO [IPv6:2001:db8::1]", "EHLO my_host.example.", "HELO x"):
            self.assertTrue(client.cmd(good).startswith("250"), good)

    def test_every_reply_carries_an_enhanced_status_code(self):
        harness = Harness(portal=memory_portal(alice="pw"))
        client = harness.connect(tls=True)
        client.cmd("EHLO client.test")
        lines = []
        for line in ["NOOP", "HELP", "VRFY x", "BOGUS", "RCPT TO:<a@b.c>", "AUTH PLAIN " + b64(b"\0alice\0pw"),
                     "MAIL FROM:<a@example.org> SIZE=10", "RCPT TO:<b@example.org>", "DATA"]:
            lines += client.cmd(line).splitlines()
        lines += client.send(b"hi\r\n.\r\n").splitlines()
        lines += client.cmd("RSET").splitlines() + client.cmd("QUIT").splitlines()
        for line in lines:
            if not line.startswith("354 "):
                self.assertRegex(line, ENHANCED)


class SimpleCommandTests(unittest.TestCase):
    def setUp(self):
        self.client = Harness().connect()

    def test_noop_help_vrfy_quit(self):
        self.assertEqual(self.client.codes("NOOP\r\n"), ["250 2.0.0"])
        self.assertEqual(self.client.codes("HELP\r\n"), ["214 2.0.0"])
        self.assertEqual(self.client.codes("VRFY root\r\n"), ["252 2.5.0"])
        self.assertEqual(self.client.codes("QUIT\r\n"), ["221 2.0.0"])
        self.assertTrue(self.client.closed)

    def test_unknown_and_non_ascii_commands_are_500(self):
        self.assertEqual(self.client.codes("XYZZY\r\n"), ["500 5.5.2"])
        self.assertEqual(self.client.codes(b"\xff\xfe\r\n"), ["500 5.5.2"])
        self.assertEqual(self.client.codes("do_UNKNOWN\r\n"), ["500 5.5.2"])

    def test_mail_needs_helo_first(self):
        self.assertEqual(self.client.codes("MAIL FROM:<a@example.org>\r\n"), ["503 5.5.1"])

    def test_out_of_order_commands_are_503(self):
        self.client.cmd("EHLO c.test")
        self.assertEqual(self.client.codes("RCPT TO:<a@example.org>\r\n"), ["503 5.5.1"])
        self.assertEqual(self.client.codes("DATA\r\n"), ["503 5.5.1"])
        self.client.cmd("MAIL FROM:<a@example.org>")
        self.assertEqual(self.client.codes("MAIL FROM:<a@example.org>\r\n"), ["503 5.5.1"])
        self.assertEqual(self.client.codes("DATA\r\n"), ["503 5.5.1"])

    def test_rset_forgets_the_transaction(self):
        self.client.cmd("EHLO c.test")
        self.client.cmd("MAIL FROM:<a@example.org>")
        self.assertEqual(self.client.codes("RSET\r\n"), ["250 2.0.0"])
        self.assertEqual(self.client.codes("RCPT TO:<a@example.org>\r\n"), ["503 5.5.1"])

    def test_command_over_512_octets_is_500_and_the_session_goes_on(self):
        self.client.cmd("EHLO c.test")
        self.assertEqual(self.client.codes("NOOP " + "x" * 600 + "\r\n"), ["500 5.5.2"])
        self.assertFalse(self.client.closed)
        self.assertEqual(self.client.codes("NOOP\r\n"), ["250 2.0.0"])

    def test_endless_command_line_without_crlf_is_421_and_closed(self):
        for _ in range(20):
            if self.client.closed:
                break
            reply = self.client.send(b"x" * 1000)
        self.assertTrue(self.client.closed)
        self.assertTrue(reply.startswith("421 4.5.2"))

    def test_pipelined_commands_in_one_packet_are_answered_in_order(self):
        reply = self.client.codes(
            "EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nNOOP\r\n"
        )
        self.assertEqual(reply[-3:], ["250 2.1.0", "250 2.1.5", "250 2.0.0"])


class AddressTests(unittest.TestCase):
    def setUp(self):
        self.harness = Harness(limits=config.Limits(max_recipients=2, max_message_size=1000))
        self.client = self.harness.connect()
        self.client.cmd("EHLO c.test")

    def test_null_sender_allowed_null_recipient_refused(self):
        self.assertEqual(self.client.codes("MAIL FROM:<>\r\n"), ["250 2.1.0"])
        self.assertEqual(self.client.codes("RCPT TO:<>\r\n"), ["501 5.1.3"])

    def test_declared_size_over_limit_is_552_at_mail(self):
        self.assertEqual(self.client.codes("MAIL FROM:<a@example.org> SIZE=1001\r\n"), ["552 5.3.4"])
        self.assertEqual(self.client.codes("MAIL FROM:<a@example.org> SIZE=1000\r\n"), ["250 2.1.0"])

    def test_unknown_parameters_are_555(self):
        self.assertEqual(self.client.codes("MAIL FROM:<a@example.org> XFORWARD\r\n"), ["555 5.5.4"])
        self.assertEqual(self.client.codes("MAIL FROM:<a@example.org> XRET=FULL\r\n"), ["555 5.5.4"])
        self.client.cmd("MAIL FROM:<a@example.org>")
        self.assertEqual(self.client.codes("RCPT TO:<b@example.org> XNOTIFY=NEVER\r\n"), ["555 5.5.4"])

    def test_body_parameter_is_honoured(self):
        self.assertEqual(self.client.codes("MAIL FROM:<a@example.org> BODY=BINARYMIME\r\n"), ["501 5.5.4"])
        self.client.cmd("MAIL FROM:<a@example.org> BODY=8bitmime")
        self.client.cmd("RCPT TO:<b@example.org>")
        self.client.cmd("DATA")
        self.client.send(b"x\r\n.\r\n")
        self.assertEqual(self.harness.queue.messages[0].envelope.body, "8BITMIME")

    def test_non_ascii_addresses_are_553_5_6_7(self):
        self.assertEqual(self.client.codes("MAIL FROM:<j\u00f6rg@example.org>\r\n".encode()), ["553 5.6.7"])
        self.client.cmd("MAIL FROM:<a@example.org>")
        self.assertEqual(self.client.codes("RCPT TO:<b@b\u00fccher.example>\r\n".encode()), ["553 5.6.7"])

    def test_malformed_paths_are_refused(self):
        for bad in ("MAIL FROM:a@example.org", "MAIL FROM:<a@example.org", "MAIL FROM:<a@@b>",
                    "MAIL FROM:<a b@example.org>", "MAIL FROM:<a@exa_mple.org>", "MAIL TO:<a@b.c>"):
            self.assertEqual(self.client.send(bad + "\r\n")[:1], "5", bad)

    def test_control_character_in_quoted_local_part_never_reaches_the_envelope(self):
        self.assertEqual(self.client.codes('MAIL FROM:<"a\nb"@example.org>\r\n'), ["501 5.5.4"])
        self.assertEqual(self.client.codes('MAIL FROM:<"a\x01b"@example.org>\r\n'), ["501 5.5.4"])
        self.assertEqual(self.client.codes('MAIL FROM:<"a b"@example.org>\r\n'), ["250 2.1.0"])

    def test_source_route_is_stripped(self):
        self.client.cmd("MAIL FROM:<a@example.org>")
        self.client.cmd("RCPT TO:<@hop1.example,@hop2.example:b@example.org>")
        self.client.cmd("DATA")
        self.client.send(b"x\r\n.\r\n")
        self.assertEqual(self.harness.queue.messages[0].envelope.recipients, ("b@example.org",))

    def test_recipients_over_the_limit_get_452(self):
        self.client.cmd("MAIL FROM:<a@example.org>")
        self.assertEqual(self.client.codes("RCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n"
                                           "RCPT TO:<d@example.org>\r\n"), ["250 2.1.5", "250 2.1.5", "452 4.5.3"])

    def test_postmaster_without_domain_is_accepted(self):
        self.client.cmd("MAIL FROM:<a@example.org>")
        self.assertEqual(self.client.codes("RCPT TO:<Postmaster>\r\n"), ["250 2.1.5"])

    def test_a_configured_postmaster_takes_both_spellings_without_asking_the_policy(self):
        harness = Harness(policy=DenyRelayPolicy())
        harness.factory.postmaster = "admin@example.org"
        client = harness.connect()
        client.cmd("EHLO c.test")
        client.cmd("MAIL FROM:<a@example.net>")
        self.assertEqual(client.codes("RCPT TO:<POSTMASTER>\r\nRCPT TO:<postmaster@relay.test>\r\n"
                                      "RCPT TO:<postmaster@other.example>\r\n"),
                         ["250 2.1.5", "250 2.1.5", "550 5.7.1"])
        client.cmd("DATA")
        self.assertTrue(client.send(b"Subject: abuse\r\n\r\nreport\r\n.\r\n").startswith("250 "))
        self.assertEqual(harness.queue.messages[0].envelope.recipients, ("admin@example.org",))


class SigningDecisionTests(unittest.TestCase):
    """The envelope records whose From: our DKIM keys may sign: the accepting rule's `senders`."""

    PERMITS = (config.Permit(networks=(ipaddress.ip_network("127.0.0.0/24"),), senders=("app.example.org",),
                             recipients=("example.net",)),
               config.Permit(anyone=True, recipients=("example.org",)))

    def envelope_of(self, peer: str, recipients: list[str], postmaster: str | None = None):
        harness = Harness(policy=PermitPolicy(self.PERMITS, config.Limits()))
        harness.factory.postmaster = postmaster
        client = harness.connect(peer=peer)
        client.cmd("EHLO c.test")
        client.cmd("MAIL FROM:<>")
        for recipient in recipients:
            self.assertTrue(client.cmd(f"RCPT TO:<{recipient}>").startswith("250 "), recipient)
        client.cmd("DATA")
        self.assertTrue(client.send(b"From: x@app.example.org\r\n\r\nbody\r\n.\r\n").startswith("250 "))
        return harness.queue.messages[0].envelope

    def test_a_network_client_gets_its_rules_senders(self):
        self.assertEqual(self.envelope_of("127.0.0.5", ["b@example.net"]).dkim_senders, ("app.example.org",))

    def test_a_stranger_through_an_anyone_rule_gets_nothing(self):
        self.assertEqual(self.envelope_of("192.0.2.9", ["b@example.org"]).dkim_senders, ())

    def test_mail_taken_through_the_postmaster_exception_gets_nothing(self):
        for peer, recipients in (("192.0.2.9", ["postmaster"]), ("127.0.0.5", ["b@example.net", "postmaster"])):
            envelope = self.envelope_of(peer, recipients, postmaster="admin@example.com")
            self.assertIn("admin@example.com", envelope.recipients)
            self.assertEqual(envelope.dkim_senders, (), (peer, recipients))
        # A postmaster mailbox the client's rule could reach anyway lends it nothing it did not have.
        envelope = self.envelope_of("127.0.0.5", ["postmaster"], postmaster="admin@example.net")
        self.assertEqual(envelope.dkim_senders, ("app.example.org",))


class PolicyTests(unittest.TestCase):
    def test_policy_replies_are_sent_as_they_are(self):
        harness = Harness(policy=DenyRelayPolicy(bad_senders=("spam@example.net",)))
        client = harness.connect()
        client.cmd("EHLO c.test")
        self.assertEqual(client.cmd("MAIL FROM:<spam@example.net>"), "550 5.7.1 Sender not allowed\r\n")
        client.cmd("MAIL FROM:<a@example.org>")
        self.assertEqual(client.cmd("RCPT TO:<x@elsewhere.example>"), "550 5.7.1 Relay access denied\r\n")
        self.assertEqual(client.codes("RCPT TO:<x@example.org>\r\n"), ["250 2.1.5"])

    def test_policy_sees_the_client_with_mapped_ipv4_unmapped(self):
        harness = Harness()
        client = harness.connect(peer="::ffff:192.0.2.7")
        client.cmd("EHLO c.test")
        client.cmd("MAIL FROM:<a@example.org>")
        info = harness.policy.clients[-1]
        self.assertEqual((info.address, info.helo, info.listener, info.user, info.tls),
                         ("192.0.2.7", "c.test", "relay", None, None))

    def test_check_message_reply_refuses_and_aborts_the_writer(self):
        class Refuse(AllowAllPolicy):
            def check_message(self, client, sender, headers):
                self.headers.append(headers)
                return Reply(550, "5.7.1", "From header not allowed")
        harness = Harness(policy=Refuse())
        client = harness.connect()
        client.cmd("EHLO c.test")
        self.assertEqual(transaction(client, b"From: x@y.z\r\nSubject: s\r\n\r\nbody\r\n"),
                         "550 5.7.1 From header not allowed\r\n")
        self.assertEqual(harness.policy.headers, [b"From: x@y.z\r\nSubject: s\r\n"])
        self.assertEqual(harness.queue.messages, [])
        self.assertTrue(harness.queue.writers[0].aborted)

    def test_policy_exception_is_a_451_not_a_traceback(self):
        class Broken(AllowAllPolicy):
            def check_recipient(self, client, sender, recipient):
                raise RuntimeError("bug")
        client = Harness(policy=Broken()).connect()
        client.cmd("EHLO c.test")
        client.cmd("MAIL FROM:<a@example.org>")
        self.assertEqual(client.codes("RCPT TO:<b@example.org>\r\n"), ["451 4.3.0"])
        self.assertFalse(client.closed)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class DataTests(unittest.TestCase):
    def setUp(self):
        self.harness = Harness()
        self.client = self.harness.connect()
        self.client.cmd("EHLO client.test")

    def test_message_is_queued_with_received_header_first(self):
        self.harness = Harness()
        self.harness.clock.advance(1767225600)     # 2026-01-01T00:00:00Z
        self.client = self.harness.connect()
        self.client.cmd("EHLO client.test")
        self.client.cmd("MAIL FROM:<a@example.org>")
        self.client.cmd("RCPT TO:<b@example.org>")
        self.assertEqual(self.client.codes("DATA\r\n"), ["354 End"])
        self.assertEqual(self.client.send(b"Subject: hi\r\n\r\n..x\r\n.\r\n"), "250 2.0.0 Ok: queued as Q000001\r\n")
        [message] = self.harness.queue.messages
        self.assertEqual(message.data, (
            b"Received: from client.test ([127.0.0.1])\r\n\tby relay.test (mailrelay) with ESMTP\r\n"
            b"\tid Q000001\r\n\tfor <b@example.org>;\r\n\tThu, 01 Jan 2026 00:00:00 +0000\r\n"
            b"Subject: hi\r\n\r\n.x\r\n"))
        env = message.envelope
        self.assertEqual((env.sender, env.recipients, env.received_at, env.client_address, env.client_helo,
                          env.identity, env.body, env.tls, env.smtputf8),
                         ("a@example.org", ("b@example.org",), 1767225600, "127.0.0.1", "client.test",
                          "permit[0]", "7BIT", None, False))

    def test_message_without_headers_gets_an_empty_line_after_received(self):
        transaction(self.client, b"just text\r\n")
        self.assertIn(b"\r\n\r\njust text\r\n", self.harness.queue.messages[0].data)

    def test_250_only_after_commit_and_nothing_read_meanwhile(self):
        self.harness.queue.commit_mode = "pending"
        self.client.cmd("MAIL FROM:<a@example.org>")
        self.client.cmd("RCPT TO:<b@example.org>")
        self.client.cmd("DATA")
        self.assertEqual(self.client.send(b"x\r\n.\r\nNOOP\r\n"), "")
        self.assertEqual(self.client.transport.producerState, "producing")   # a little input just waits
        writer = self.harness.queue.writers[0]
        writer.pending.callback("Q000001")
        self.assertEqual(self.client.transport.value().decode().splitlines(),
                         ["250 2.0.0 Ok: queued as Q000001", "250 2.0.0 Ok"])

    def test_a_flood_during_a_pending_commit_pauses_reading_until_it_is_done(self):
        from mailrelay.server.session import BUSY_INPUT_LIMIT

        self.harness.queue.commit_mode = "pending"
        self.client.cmd("MAIL FROM:<a@example.org>")
        self.client.cmd("RCPT TO:<b@example.org>")
        self.client.cmd("DATA")
        self.assertEqual(self.client.send(b"x\r\n.\r\n"), "")
        for _ in range(BUSY_INPUT_LIMIT // 6 + 1):
            self.client.protocol.dataReceived(b"NOOP\r\n")
        self.assertEqual(self.client.transport.producerState, "paused")
        self.assertEqual(self.client.transport.value(), b"")
        self.harness.queue.writers[0].pending.callback("Q000001")
        self.assertEqual(self.client.transport.producerState, "producing")
        replies = self.client.transport.value().decode().splitlines()
        self.assertEqual(replies[0], "250 2.0.0 Ok: queued as Q000001")
        self.assertEqual(set(replies[1:]), {"250 2.0.0 Ok"})
        self.assertEqual(len(replies), BUSY_INPUT_LIMIT // 6 + 2)

    def test_failed_commit_is_451_and_aborts(self):
        self.harness.queue.commit_mode = "fail"
        self.assertTrue(transaction(self.client).startswith("451 4.3.0"))
        self.assertTrue(self.harness.queue.writers[0].aborted)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_a_queue_that_cannot_take_the_message_gets_its_data_read_and_a_451(self):
        def broken(envelope):
            raise OSError("spool unusable")

        self.harness.queue.new_message = broken
        self.client.cmd("MAIL FROM:<a@example.org>")
        self.client.cmd("RCPT TO:<b@example.org>")
        self.assertTrue(self.client.cmd("DATA").startswith("354"))    # answered before the writer is made
        self.assertTrue(self.client.send(b"Subject: hi\r\n\r\nlost\r\n.\r\n").startswith("451 4.3.0"))
        self.assertTrue(self.client.cmd("MAIL FROM:<a@example.org>").startswith("250"))   # session goes on
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_lf_dot_lf_smuggling_ends_in_one_message_with_the_commands_inside(self):
        reply = transaction(self.client, b"Subject: a\r\n\r\nbody\n.\nMAIL FROM:<evil@example.net>\r\n"
                                         b"RCPT TO:<v@example.org>\r\nDATA\r\nforged\r\n")
        self.assertEqual(reply, "250 2.0.0 Ok: queued as Q000001\r\n")
        self.assertEqual(len(self.harness.queue.writers), 1)
        self.assertIn(b"body\r\n.\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<v@example.org>\r\nDATA\r\n",
                      self.harness.queue.messages[0].data)

    def test_no_fake_end_of_data_starts_a_second_transaction(self):
        smuggled = b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<v@example.org>\r\nDATA\r\nforged\r\n"
        normalised = {b"\n.\n": True, b"\n.\r\n": True, b"\r.\r": False, b"\r\n.\r": False,
                      b"\r.\r\n": False, b"\n.\r": False}
        for fake_end, accepted in normalised.items():
            harness = Harness()
            client = harness.connect()
            client.cmd("EHLO c.test")
            replies = client.codes(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                                   b"Subject: a\r\n\r\nbody" + fake_end + smuggled + b".\r\n")
            final = ["250 2.0.0"] if accepted else ["550 5.6.11"]
            self.assertEqual(replies, ["250 2.1.0", "250 2.1.5", "354 End"] + final, fake_end)
            self.assertEqual(len(harness.queue.writers), 1, fake_end)
            self.assertEqual(len(harness.queue.messages), int(accepted), fake_end)
            self.assertEqual(len(harness.policy.clients), 1, fake_end)      # the smuggled MAIL never ran
            if accepted:
                self.assertIn(b"body\r\n.\r\n" + smuggled, harness.queue.messages[0].data)

    def test_bare_cr_is_550_5_6_11_after_the_real_end(self):
        reply = transaction(self.client, b"Subject: a\r\n\r\nbody\r.\rMAIL FROM:<evil@example.net>\r\n")
        self.assertEqual(self.client.codes("NOOP\r\n"), ["250 2.0.0"])
        self.assertTrue(reply.startswith("550 5.6.11 "))
        self.assertEqual(self.harness.queue.messages, [])
        self.assertTrue(self.harness.queue.writers[0].aborted)

    def test_nul_is_550_5_6_0_after_the_real_end_and_the_next_message_works(self):
        # SMTP smuggling (CVE-2023-51764 class): "\\r\\n\\x00.\\r\\n" must not end DATA nor be passed on.
        reply = transaction(self.client, b"Subject: a\r\n\r\nbody\r\n\x00.\r\nMAIL FROM:<evil@example.net>\r\n"
                                         b"RCPT TO:<v@example.org>\r\nDATA\r\nforged\r\n")
        self.assertEqual(reply, "550 5.6.0 Message refused: NUL octet in message content\r\n")
        self.assertEqual(self.harness.queue.messages, [])
        self.assertTrue(self.harness.queue.writers[0].aborted)
        self.assertEqual(len(self.harness.policy.clients), 1)        # the smuggled MAIL never ran
        self.assertEqual(transaction(self.client), "250 2.0.0 Ok: queued as Q000002\r\n")
        self.assertNotIn(b"\x00", self.harness.queue.messages[0].data)

    def test_a_line_over_the_bound_is_refused_after_the_end_and_never_runs_commands(self):
        reply = transaction(self.client, b"Subject: a\r\n\r\n" + b"A" * (64 * 1024 + 1) + b"\r\nRSET\r\nQUIT\r\n")
        self.assertEqual(reply, "554 5.6.0 Message refused: a text line is longer than 65536 octets, "
                                "the most this relay accepts\r\n")
        self.assertFalse(self.client.closed)
        self.assertEqual(self.harness.queue.messages, [])
        self.assertTrue(self.harness.queue.writers[0].aborted)
        self.assertEqual(transaction(self.client), "250 2.0.0 Ok: queued as Q000002\r\n")

    def test_a_5000_octet_line_is_accepted_and_spooled_whole(self):
        line = b"<p>" + b"x" * 4993 + b"</p>"
        reply = transaction(self.client, b"Subject: html\r\n\r\n" + line + b"\r\n..dot\r\n")
        self.assertEqual(reply, "250 2.0.0 Ok: queued as Q000001\r\n")
        [message] = self.harness.queue.messages
        self.assertTrue(message.data.endswith(b"\r\nSubject: html\r\n\r\n" + line + b"\r\n.dot\r\n"))

    def test_the_bound_is_the_configured_max_line_length(self):
        harness = Harness(limits=config.Limits(max_line_length=2000))
        client = harness.connect()
        client.cmd("EHLO c.test")
        self.assertEqual(transaction(client, b"Subject: a\r\n\r\n" + b"y" * 2000 + b"\r\n")[:9], "250 2.0.0")
        pieces = [b"Subject: a\r\n\r\n", b"z" * 1500, b"z" * 501, b"\r\nMAIL FROM:<evil@example.net>\r\n"]
        client.cmd("MAIL FROM:<a@example.org>")
        client.cmd("RCPT TO:<b@example.org>")
        client.cmd("DATA")
        replies = "".join(client.send(piece) for piece in pieces) + client.send(b".\r\n")
        self.assertEqual(replies, "554 5.6.0 Message refused: a text line is longer than 2000 octets, "
                                  "the most this relay accepts\r\n")
        self.assertEqual(len(harness.queue.messages), 1)
        self.assertEqual(client.codes("NOOP\r\n"), ["250 2.0.0"])       # in step: the MAIL was content
        self.assertEqual(len(harness.policy.clients), 2)           # our two MAILs, not the smuggled one

    def test_message_over_the_size_limit_is_552_after_the_dot(self):
        harness = Harness(limits=config.Limits(max_message_size=100))
        client = harness.connect()
        client.cmd("EHLO c.test")
        reply = transaction(client, b"x" * 80 + b"\r\n" + b"y" * 80 + b"\r\n")
        self.assertTrue(reply.startswith("552 5.3.4"))
        self.assertEqual(harness.queue.messages, [])

    def test_connection_lost_mid_data_aborts_the_writer(self):
        self.client.cmd("MAIL FROM:<a@example.org>")
        self.client.cmd("RCPT TO:<b@example.org>")
        self.client.cmd("DATA")
        self.client.send(b"partial\r\n")
        self.client.protocol.connectionLost(None)
        self.assertTrue(self.harness.queue.writers[0].aborted)
        self.assertEqual(self.harness.factory.connections.total, 0)

    def test_helo_session_is_recorded_as_smtp(self):
        self.client.cmd("HELO old.test")
        transaction(self.client)
        self.assertIn(b"from old.test ([127.0.0.1])\r\n\tby relay.test (mailrelay) with SMTP\r\n",
                      self.harness.queue.messages[0].data)

    def test_several_recipients_have_no_for_clause(self):
        self.client.cmd("MAIL FROM:<a@example.org>")
        self.client.cmd("RCPT TO:<b@example.org>")
        self.client.cmd("RCPT TO:<c@example.org>")
        self.client.cmd("DATA")
        self.client.send(b"x\r\n.\r\n")
        self.assertNotIn(b"for <", self.harness.queue.messages[0].data)


class StartTLSTests(unittest.TestCase):
    def test_starttls_discards_pipelined_plaintext_and_forgets_the_session(self):
        harness = Harness()
        client = harness.connect()
        client.cmd("EHLO c.test")
        client.cmd("MAIL FROM:<a@example.org>")
        reply = client.send(b"STARTTLS\r\nRCPT TO:<injected@example.net>\r\n")
        self.assertEqual(reply, "220 2.0.0 Ready to start TLS\r\n")
        self.assertIs(client.transport.tls_options, TLS_OPTIONS)
        # RFC 3207 4.2: EHLO and the transaction are forgotten; the injected RCPT never ran.
        self.assertEqual(client.codes("RCPT TO:<b@example.org>\r\n"), ["503 5.5.1"])
        self.assertEqual(client.codes("MAIL FROM:<a@example.org>\r\n"), ["503 5.5.1"])
        self.assertNotIn("STARTTLS", client.cmd("EHLO c.test"))

    def test_starttls_with_an_argument_is_501(self):
        client = Harness().connect()
        client.cmd("EHLO c.test")
        self.assertEqual(client.codes("STARTTLS now\r\n"), ["501 5.5.4"])

    def test_starttls_twice_is_503(self):
        client = Harness().connect()
        client.ehlo_tls()
        self.assertEqual(client.codes("STARTTLS\r\n"), ["503 5.5.1"])
        client = Harness().connect(tls=True)
        self.assertEqual(client.codes("STARTTLS\r\n"), ["503 5.5.1"])

    def test_starttls_without_certificate_is_454(self):
        self.assertEqual(Harness(tls_options=None).connect().codes("STARTTLS\r\n"), ["454 4.7.0"])

    def test_starttls_forgets_authentication(self):
        harness = Harness(portal=memory_portal(alice="pw"))
        client = harness.connect()
        client.ehlo_tls()
        client.cmd("EHLO c.test")
        client.cmd("AUTH PLAIN " + b64(b"\0alice\0pw"))
        self.assertEqual(client.protocol.client_info().user, "alice")
        self.assertEqual(client.codes("STARTTLS\r\n"), ["503 5.5.1"])   # and a second one is refused

    def test_relay_with_require_tls_refuses_mail_before_starttls(self):
        client = Harness(require_tls=True).connect()
        client.cmd("EHLO c.test")
        self.assertEqual(client.codes("MAIL FROM:<a@example.org>\r\n"), ["530 5.7.0"])
        client.ehlo_tls()
        client.cmd("EHLO c.test")
        self.assertEqual(client.codes("MAIL FROM:<a@example.org>\r\n"), ["250 2.1.0"])

    def test_submission_needs_starttls_then_auth_before_mail(self):
        client = Harness(kind="submission", portal=memory_portal(alice="pw")).connect()
        client.cmd("EHLO c.test")
        self.assertEqual(client.codes("MAIL FROM:<a@example.org>\r\n"), ["530 5.7.0"])
        client.ehlo_tls()
        client.cmd("EHLO c.test")
        self.assertEqual(client.cmd("MAIL FROM:<a@example.org>"), "530 5.7.0 Authentication required\r\n")
        client.cmd("AUTH PLAIN " + b64(b"\0alice\0pw"))
        self.assertEqual(client.codes("MAIL FROM:<alice@example.org>\r\n"), ["250 2.1.0"])


class AuthTests(unittest.TestCase):
    def setUp(self):
        self.harness = Harness(portal=memory_portal(alice="s3cret"),
                               limits=config.Limits(auth_failures_per_minute=2))
        self.client = self.harness.connect(tls=True)
        self.client.cmd("EHLO c.test")

    def test_auth_in_plaintext_is_538(self):
        client = self.harness.connect()
        client.cmd("EHLO c.test")
        self.assertEqual(client.codes("AUTH PLAIN " + b64(b"\0alice\0s3cret") + "\r\n"), ["538 5.7.11"])

    def test_plain_with_initial_response(self):
        self.assertEqual(self.client.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")),
                         "235 2.7.0 Authentication successful\r\n")
        self.client.cmd("MAIL FROM:<alice@example.org>")
        self.assertEqual(self.harness.policy.clients[-1].user, "alice")

    def test_plain_with_continuation(self):
        self.assertEqual(self.client.cmd("AUTH PLAIN"), "334 \r\n")
        self.assertEqual(self.client.codes(b64(b"alice\0alice\0s3cret") + "\r\n"), ["235 2.7.0"])

    def test_login(self):
        self.assertEqual(self.client.cmd("AUTH LOGIN"), "334 VXNlcm5hbWU6\r\n")
        self.assertEqual(self.client.cmd(b64(b"alice")), "334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(self.client.codes(b64(b"s3cret") + "\r\n"), ["235 2.7.0"])

    def test_login_with_initial_username(self):
        self.assertEqual(self.client.cmd("AUTH LOGIN " + b64(b"alice")), "334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(self.client.codes(b64(b"s3cret") + "\r\n"), ["235 2.7.0"])

    def test_authenticated_message_is_recorded_as_esmtpsa_without_the_login(self):
        self.client.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret"))
        transaction(self.client)
        data = self.harness.queue.messages[0].data
        self.assertIn(b"with ESMTPSA (version=TLS cipher=unknown)\r\n\tid Q", data)
        self.assertNotIn(b"alice", data)
        self.assertNotIn(b"s3cret", data)
        self.assertEqual(self.harness.queue.messages[0].envelope.identity, "alice")

    def test_received_names_the_user_when_configured(self):
        self.harness.factory.received_shows_user = True
        self.client.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret"))
        transaction(self.client)
        data = self.harness.queue.messages[0].data
        self.assertIn(b"with ESMTPSA (version=TLS cipher=unknown)\r\n\t(authenticated as alice)\r\n\tid Q", data)
        self.assertNotIn(b"s3cret", data)

    def test_malformed_responses_are_501_never_a_traceback(self):
        cases = {
            "AUTH PLAIN %%%notbase64": "501 5.5.2",
            "AUTH PLAIN " + b64(b"alice-without-nuls"): "501 5.5.2",
            "AUTH PLAIN " + b64(b"\0alice\0"): "501 5.5.2",
            "AUTH PLAIN =": "501 5.5.2",
            "AUTH PLAIN " + b64(b"\0\xff\xfe\0pw"): "501 5.5.2",
            "AUTH PLAIN " + b64(b"bob\0alice\0s3cret"): "501 5.5.2",
            "AUTH": "501 5.5.4",
            "AUTH PLAIN a b": "501 5.5.4",
            "AUTH CRAM-MD5": "504 5.5.4",
        }
        for line, code in cases.items():
            self.assertEqual(self.client.codes(line + "\r\n"), [code], line)
        self.client.cmd("AUTH PLAIN")
        self.assertEqual(self.client.codes("*\r\n"), ["501 5.7.0"])
        self.client.cmd("AUTH LOGIN")
        self.assertEqual(self.client.codes("!!\r\n"), ["501 5.5.2"])
        self.assertEqual(self.client.codes("NOOP\r\n"), ["250 2.0.0"])
        self.assertFalse(self.client.closed)

    def test_auth_twice_is_503(self):
        self.client.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret"))
        self.assertEqual(self.client.codes("AUTH PLAIN " + b64(b"\0alice\0s3cret") + "\r\n"), ["503 5.5.1"])

    def test_auth_inside_a_transaction_is_503(self):
        self.client.cmd("MAIL FROM:<a@example.org>")
        self.assertEqual(self.client.codes("AUTH PLAIN " + b64(b"\0alice\0s3cret") + "\r\n"), ["503 5.5.1"])

    def test_wrong_password_is_535_after_a_delay(self):
        self.assertEqual(self.client.cmd("AUTH PLAIN " + b64(b"\0alice\0wrong")), "")
        self.harness.clock.advance(0.9)
        self.assertEqual(self.client.transport.value(), b"")
        self.harness.clock.advance(0.1)
        self.assertEqual(self.client.transport.value(), b"535 5.7.8 Authentication credentials invalid\r\n")

    def test_failures_beyond_the_limit_close_with_421_even_on_a_new_connection(self):
        for _ in range(2):
            self.client.cmd("AUTH PLAIN " + b64(b"\0alice\0wrong"))
            self.harness.clock.advance(1)
        self.assertEqual(self.client.codes("AUTH PLAIN " + b64(b"\0alice\0s3cret") + "\r\n"), ["421 4.7.0"])
        self.assertTrue(self.client.closed)
        other = self.harness.connect(tls=True)
        other.cmd("EHLO c.test")
        self.assertEqual(other.codes("AUTH LOGIN\r\n"), ["421 4.7.0"])
        self.harness.clock.advance(60)
        fresh = self.harness.connect(tls=True)
        fresh.cmd("EHLO c.test")
        self.assertEqual(fresh.codes("AUTH PLAIN " + b64(b"\0alice\0s3cret") + "\r\n"), ["235 2.7.0"])
        other_ip = self.harness.connect(peer="127.0.0.9", tls=True)
        other_ip.cmd("EHLO c.test")

    def test_concurrent_failures_past_the_limit_get_421(self):
        clients = [self.harness.connect(tls=True) for _ in range(3)]
        for client in clients:
            client.cmd("EHLO c.test")
            client.cmd("AUTH PLAIN " + b64(b"\0alice\0wrong"))
        self.assertTrue(clients[2].transport.value().startswith(b"421 4.7.0"))
        self.assertTrue(clients[2].closed)

    def test_temporary_checker_failure_is_454(self):
        harness = Harness(portal=build_portal([TemporaryFailureChecker()]))
        client = harness.connect(tls=True)
        client.cmd("EHLO c.test")
        self.assertEqual(client.codes("AUTH PLAIN " + b64(b"\0alice\0pw") + "\r\n"), ["454 4.7.0"])

    def test_pipelined_commands_wait_for_a_pending_login(self):
        checker = PendingChecker()
        harness = Harness(portal=build_portal([checker]))
        client = harness.connect(tls=True)
        client.cmd("EHLO c.test")
        self.assertEqual(client.send("AUTH PLAIN " + b64(b"\0alice\0pw") + "\r\nMAIL FROM:<a@example.org>\r\n"), "")
        checker.pending[0].callback(b"alice")
        self.assertEqual([line[:9] for line in client.transport.value().decode().splitlines()],
                         ["235 2.7.0", "250 2.1.0"])
        self.assertEqual(harness.policy.clients[-1].user, "alice")

    def test_secrets_never_reach_the_log(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        blob = b64(b"\0alice\0hunter2")
        self.client.cmd("AUTH PLAIN " + blob)
        self.harness.clock.advance(1)
        self.client.cmd("AUTH LOGIN")
        self.client.cmd(b64(b"alice"))
        self.client.cmd(b64(b"hunter3"))
        self.harness.clock.advance(1)
        text = repr(events)
        self.assertIn("alice", text)             # the failure was logged ...
        for secret in ("hunter2", "hunter3", blob, b64(b"hunter3")):
            self.assertNotIn(secret, text)       # ... without the secret


class LimitsTests(unittest.TestCase):
    def test_idle_timeout_is_421_and_closes(self):
        harness = Harness(limits=config.Limits(idle_timeout=30))
        client = harness.connect()
        harness.clock.advance(29)
        client.cmd("NOOP")
        client.transport.clear()
        harness.clock.advance(29)
        self.assertFalse(client.closed)
        harness.clock.advance(1)
        self.assertTrue(client.transport.value().startswith(b"421 4.4.2"))
        self.assertTrue(client.closed)

    def test_session_deadline_closes_even_a_busy_client(self):
        harness = Harness(limits=config.Limits(idle_timeout=30, session_timeout=100))
        client = harness.connect()
        for _ in range(10):
            harness.clock.advance(10)
            client.protocol.dataReceived(b"NOOP\r\n")
        replies = client.transport.value().decode()
        self.assertTrue(client.closed)
        self.assertEqual(replies.count("250 2.0.0"), 9)
        self.assertIn("421 4.4.2 relay.test Session time limit exceeded", replies)

    def test_idle_timeout_during_data_aborts_the_message(self):
        harness = Harness(limits=config.Limits(idle_timeout=30))
        client = harness.connect()
        client.cmd("EHLO c.test")
        client.cmd("MAIL FROM:<a@example.org>")
        client.cmd("RCPT TO:<b@example.org>")
        client.cmd("DATA")
        client.send(b"partial\r\n")
        harness.clock.advance(30)
        self.assertTrue(harness.queue.writers[0].aborted)
        self.assertTrue(client.closed)

    def test_timers_are_cancelled_when_the_connection_ends(self):
        harness = Harness()
        client = harness.connect()
        client.protocol.connectionLost(None)
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_connections_per_ip_are_capped(self):
        harness = Harness(limits=config.Limits(max_connections_per_ip=2))
        first, second = harness.connect(), harness.connect()
        self.assertEqual([first.greeting[:4], second.greeting[:4]], ["220 ", "220 "])
        third = harness.connect()
        self.assertTrue(third.greeting.startswith("421 4.7.0"))
        self.assertTrue(third.closed)
        self.assertEqual(third.codes("EHLO c.test\r\n"), [])
        self.assertTrue(harness.connect(peer="127.0.0.2").greeting.startswith("220 "))
        third.protocol.connectionLost(None)
        first.protocol.connectionLost(None)
        self.assertTrue(harness.connect().greeting.startswith("220 "))

    def test_connections_in_all_are_capped(self):
        harness = Harness(limits=config.Limits(max_connections=2))
        harness.connect("127.0.0.1"), harness.connect("127.0.0.2")
        self.assertTrue(harness.connect("127.0.0.3").greeting.startswith("421 4.7.0"))
        self.assertEqual(harness.factory.connections.total, 2)
