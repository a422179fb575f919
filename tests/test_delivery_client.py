"""mailrelay.outbound.client and smarthost: the outgoing ESMTP client.

Two halves: conversations driven through a StringTransport with a task.Clock (each test reads as the
exchange it checks), and end-to-end deliveries to the real loopback sink (tests.support.sink), with real
TLS where TLS is the point.
"""
from __future__ import annotations

import io

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailrelay import config
from mailrelay.outbound.dotstuff import CHUNK_SIZE, stuff_all
from mailrelay.queue.job import Job, Timeouts
from mailrelay.outbound.smarthost import SmarthostTransport, deliver_to_host
from mailrelay.interfaces import INextHop
from tests.support.conversation import FakeMessage
from tests.support.esmtp import BODY, FAST, Certificates, Conversation, message
from tests.support.polling import until
from tests.support.sink import DEFAULT_EXTENSIONS, Sink


# -- conversations over a StringTransport --------------------------------------------------------------


class ConversationTests(unittest.TestCase):
    def test_one_message_conversation_settles_every_recipient(self):
        c = Conversation(self, [Job(message(recipients=("a@x.test", "b@x.test")), ("a@x.test", "b@x.test"))])
        c.greet("SIZE 1000", "8BITMIME")
        c.expect(f"MAIL FROM:<app@example.org> SIZE={len(BODY)}")
        c.server("250 2.1.0 ok")
        c.expect("RCPT TO:<a@x.test>")
        c.server("250 2.1.5 ok")
        c.expect("RCPT TO:<b@x.test>")
        c.server("250 2.1.5 ok")
        c.expect("DATA")
        c.server("354 go")
        self.assertEqual(c.stream_body(), stuff_all(BODY))
        c.server("250 2.0.0 queued as X")
        c.expect("QUIT")
        c.server("221 2.0.0 bye")
        self.assertTrue(c.transport.disconnecting)
        result = c.close()
        self.assertEqual([(r.recipient, r.code, r.status, r.text) for r in result.results],
                         [("a@x.test", 250, "2.0.0", "queued as X"), ("b@x.test", 250, "2.0.0", "queued as X")])
        self.assertTrue(all(r.delivered for r in result.results))
        self.assertFalse(result.before_mail)

    def test_body_8bitmime_is_declared_when_offered(self):
        c = Conversation(self, [Job(message(eight_bit=True), ("a@example.net",))])
        c.greet("8BITMIME")
        c.expect("MAIL FROM:<app@example.org> BODY=8BITMIME")

    @defer.inlineCallbacks
    def test_8bit_header_to_server_without_8bitmime_bounces_without_mail(self):
        body = "Subject: café\r\n\r\nolé\r\n".encode("utf-8")
        c = Conversation(self, [Job(message(body, eight_bit=True), ("a@example.net",))])
        c.greet("SIZE")
        yield until(lambda: c.transport.value(), "the converted message")   # the conversion runs in a thread
        c.expect("QUIT")
        [r] = c.close().results
        self.assertEqual((r.code, r.status), (554, "5.6.3"))
        self.assertIn("does not offer 8BITMIME, and 8-bit octets in a header field cannot be converted", r.text)
        self.assertTrue(r.permanent)

    @defer.inlineCallbacks
    def test_undeclared_8bit_body_to_server_without_8bitmime_goes_as_quoted_printable(self):
        body = b"Subject: hi\r\n\r\nol\xc3\xa9\r\n"
        job = Job(message(body, octets="8bit"), ("a@example.net",))     # BODY=7BIT, but the spool saw 8-bit
        c = Conversation(self, [job])
        c.greet("SIZE 1000", "PIPELINING")
        yield until(lambda: c.transport.value(), "the converted message")
        converted = (b"Subject: hi\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
                     b"ol=C3=A9\r\n")
        c.expect(f"MAIL FROM:<app@example.org> SIZE={len(converted)}", "RCPT TO:<a@example.net>", "DATA")
        c.server("250 ok", "250 ok", "354 go")
        self.assertEqual(c.stream_body(), converted + b".\r\n")
        c.server("250 2.0.0 queued")
        c.expect("QUIT")
        self.assertTrue(c.close().results[0].delivered)

    def test_undeclared_8bit_body_is_declared_body_8bitmime_when_offered(self):
        c = Conversation(self, [Job(message(b"Subject: x\r\n\r\n\xff\r\n", octets="8bit"), ("a@example.net",))])
        c.greet("8BITMIME")
        c.expect("MAIL FROM:<app@example.org> BODY=8BITMIME")

    @defer.inlineCallbacks
    def test_a_reply_while_converting_ends_the_session_with_a_retry(self):
        c = Conversation(self, [Job(message(b"Subject: x\r\n\r\n\xff\r\n", octets="8bit"), ("a@example.net",))])
        c.greet("SIZE")
        c.server("421 4.4.2 bye")       # before the conversion is done: a reply nobody asked for
        result = c.close()
        yield task.deferLater(reactor, 0.2, lambda: None)      # the conversion finishing changes nothing
        self.assertEqual(c.sent(), [])
        self.assertEqual(result.results[0].code, 421)

    def test_declared_8bitmime_but_ascii_body_is_sent_without_body_param(self):
        c = Conversation(self, [Job(message(eight_bit=True), ("a@example.net",))])
        c.greet("SIZE")
        c.expect(f"MAIL FROM:<app@example.org> SIZE={len(BODY)}")

    def test_non_ascii_address_uses_smtputf8_when_offered_and_bounces_otherwise(self):
        job = Job(message(recipients=("jösé@x.test",)), ("jösé@x.test",))
        c = Conversation(self, [job])
        c.greet("SMTPUTF8")
        c.expect("MAIL FROM:<app@example.org> SMTPUTF8")
        c.server("250 ok")
        self.assertEqual(c.sent(), ["RCPT TO:<jösé@x.test>".encode("utf-8")])
        c = Conversation(self, [job])
        c.greet("8BITMIME")
        c.expect("QUIT")
        self.assertEqual(c.close().results[0].status, "5.6.7")

    def test_message_over_the_servers_size_limit_bounces_without_mail(self):
        c = Conversation(self, [Job(message(), ("a@example.net",))])
        c.greet("SIZE 10")
        c.expect("QUIT")
        [r] = c.close().results
        self.assertEqual((r.code, r.status), (552, "5.3.4"))

    def test_mail_from_refusal_settles_every_recipient_permanently(self):
        c = Conversation(self, [Job(message(recipients=("a@x.test", "b@x.test")), ("a@x.test", "b@x.test"))])
        c.greet("SIZE")
        c.sent()
        c.server("550 5.7.1 sender rejected")
        c.expect("QUIT")
        result = c.close()
        self.assertEqual([(r.code, r.status, r.text) for r in result.results],
                         [(550, "5.7.1", "sender rejected")] * 2)
        self.assertFalse(result.before_mail)

    def test_every_rcpt_refused_means_no_data(self):
        c = Conversation(self, [Job(message(), ("a@x.test", "b@x.test"))])
        c.greet("SIZE")
        c.sent()
        c.server("250 ok")
        c.expect("RCPT TO:<a@x.test>")
        c.server("550 5.1.1 no")
        c.expect("RCPT TO:<b@x.test>")
        c.server("450 4.2.0 later")
        c.expect("RSET")
        c.server("250 ok")
        c.expect("QUIT")
        result = c.close()
        self.assertEqual([(r.code, r.status) for r in result.results], [(550, "5.1.1"), (450, "4.2.0")])

    def test_data_answered_with_250_instead_of_354_is_not_a_delivery(self):
        c = Conversation(self, [Job(message(), ("a@x.test",))])
        c.greet("SIZE")
        c.sent()
        c.server("250 ok")
        c.sent()
        c.server("250 ok")
        c.expect("DATA")
        c.server("250 2.0.0 thanks")
        self.assertTrue(c.transport.disconnecting)
        [r] = c.close().results
        self.assertTrue(r.temporary)

    def test_reply_without_enhanced_code_gets_the_generic_one_of_its_class(self):
        c = Conversation(self, [Job(message(), ("a@x.test",))])
        c.greet("SIZE")
        c.sent()
        c.server("250 ok")
        c.sent()
        c.server("550 mailbox unavailable")
        [r] = c.close().results
        self.assertEqual((r.code, r.status, r.text), (550, "5.0.0", "mailbox unavailable"))

    def test_per_reply_timeout_gives_a_temporary_failure(self):
        c = Conversation(self, [Job(message(), ("a@x.test",))], timeouts=Timeouts(reply=30))
        c.greet("SIZE")
        c.sent()
        c.clock.advance(29)
        self.assertFalse(c.transport.disconnecting)
        c.clock.advance(2)
        self.assertTrue(c.transport.disconnecting)
        [r] = c.close().results
        self.assertEqual((r.code, r.status), (421, "4.4.2"))
        self.assertIn("timed out", r.text)

    def test_silent_server_times_out_waiting_for_the_greeting(self):
        c = Conversation(self, [Job(message(), ("a@x.test",))], timeouts=Timeouts(reply=60))
        c.clock.advance(61)
        self.assertTrue(c.transport.disconnecting)
        result = c.close()
        self.assertEqual(result.results[0].code, 421)
        self.assertTrue(result.before_mail)

    def test_malformed_reply_is_a_temporary_failure_not_a_traceback(self):
        c = Conversation(self, [Job(message(), ("a@x.test",))])
        c.server("HELLO I am not SMTP")
        self.assertTrue(c.transport.disconnecting)
        [r] = c.close().results
        self.assertEqual((r.code, r.status), (421, "4.5.0"))

    def test_5xx_greeting_defers_rather_than_bounces(self):
        c = Conversation(self, [Job(message(), ("a@x.test",))])
        c.server("554 5.3.2 go away")
        c.expect("QUIT")
        [r] = c.close().results
        self.assertEqual((r.code, r.status), (451, "4.3.2"))
        self.assertTrue(r.temporary)

    def test_starttls_required_but_not_offered_is_a_4_7_4_failure(self):
        c = Conversation(self, [Job(message(), ("a@x.test",))], security="starttls", tls_options=object())
        c.greet("SIZE")
        c.expect("QUIT")
        [r] = c.close().results
        self.assertEqual((r.code, r.status), (451, "4.7.4"))

    def test_plaintext_pipelined_after_starttls_220_is_discarded(self):
        # CVE-2011-0411 class: "250 ..." injected behind the 220 must not be read as a reply inside TLS.
        options = object()
        c = Conversation(self, [Job(message(), ("a@x.test",))], security="starttls", tls_options=options)
        c.greet("STARTTLS")
        c.expect("STARTTLS")
        c.server("220 2.0.0 go ahead", "250 injected-extension", "250 2.1.0 injected MAIL reply")
        self.assertIs(c.transport.tls_started_with, options)
        c.expect("EHLO relay.test")     # and nothing more: the client waits for the real EHLO reply

    def test_capabilities_are_forgotten_after_starttls(self):
        c = Conversation(self, [Job(message(), ("a@x.test",))], security="starttls", tls_options=object())
        c.greet("STARTTLS", "SIZE 10")
        c.sent()
        c.server("220 go")
        c.sent()
        c.server("250-mx.test", "250 8BITMIME")
        c.expect("MAIL FROM:<app@example.org>")     # no SIZE= and no 552: the plaintext SIZE 10 is gone

    def test_credentials_are_never_sent_in_plaintext(self):
        c = Conversation(self, [Job(message(), ("a@x.test",))], username="u", password=b"pw")
        c.greet("AUTH PLAIN LOGIN")
        c.expect("QUIT")
        [r] = c.close().results
        self.assertEqual((r.code, r.status), (451, "4.7.11"))

    def test_auth_login_over_tls_and_refusal_text_is_scrubbed_of_secrets(self):
        c = Conversation(self, [Job(message(), ("a@x.test",))], security="tls", username="u", password=b"s3cret",
                         implicit_tls=True)
        c.greet("AUTH LOGIN")
        c.expect("AUTH LOGIN")
        c.server("334 VXNlcm5hbWU6")
        c.expect("dQ==")
        c.server("334 UGFzc3dvcmQ6")
        c.expect("czNjcmV0")
        c.server("535 5.7.8 czNjcmV0 is not the password")
        c.expect("QUIT")
        [r] = c.close().results
        self.assertEqual((r.code, r.status), (451, "4.7.8"))
        self.assertNotIn("czNjcmV0", r.text)
        self.assertNotIn("s3cret", r.text)

    def test_implicit_tls_over_a_plain_connection_is_refused_before_a_word(self):
        c = Conversation(self, [Job(message(), ("a@x.test",))], security="tls", username="u", password=b"pw")
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(c.sent(), [])
        [r] = c.close().results
        self.assertEqual((r.code, r.status), (421, "4.7.5"))

    def test_connection_lost_mid_transaction_settles_the_rest_temporarily(self):
        c = Conversation(self, [Job(message(), ("a@x.test", "b@x.test"))])
        c.greet("SIZE")
        c.sent()
        c.server("250 ok")
        c.sent()
        c.server("550 5.1.1 no such user")
        result = c.close()
        self.assertEqual([(r.code, r.status) for r in result.results], [(550, "5.1.1"), (421, "4.4.2")])

    def test_two_jobs_share_one_connection(self):
        m1, m2 = message(), message(b"second\r\n", sender="")
        c = Conversation(self, [Job(m1, ("a@x.test",)), Job(m2, ("b@x.test",))])
        c.greet("SIZE")
        c.sent()
        c.server("250 ok")
        c.sent()
        c.server("250 ok")
        c.expect("DATA")
        c.server("354 go")
        c.stream_body()
        c.server("451 4.3.0 try later")
        c.expect("MAIL FROM:<> SIZE=8")
        c.server("250 ok")
        c.expect("RCPT TO:<b@x.test>")
        c.server("250 ok")
        c.expect("DATA")
        c.server("354 go")
        self.assertEqual(c.stream_body(), b"second\r\n.\r\n")
        c.server("250 2.0.0 ok")
        c.expect("QUIT")
        result = c.close()
        self.assertEqual([[r.code for r in job] for job in result.jobs], [[451], [250]])

    def test_address_with_crlf_is_refused_not_injected(self):
        c = Conversation(self, [Job(message(), ("a@x.test\r\nRSET",))])
        c.greet("SIZE")
        c.sent()
        c.server("250 ok")
        c.expect("RSET")
        [r] = c.close().results
        self.assertEqual((r.code, r.status), (553, "5.1.3"))


class PipeliningTests(unittest.TestCase):
    """RFC 2920: to a server offering PIPELINING, MAIL, the RCPTs and DATA go in one write and the
    replies are matched to them in order."""

    def pipelined(self, *recipients, jobs=None):
        jobs = jobs or [Job(message(recipients=recipients), tuple(recipients))]
        c = Conversation(self, jobs)
        writes = []
        write = c.transport.write
        c.transport.write = lambda data: (writes.append(data), write(data))[1]
        c.greet("PIPELINING", "SIZE")
        return c, writes

    def test_mail_rcpts_and_data_go_in_one_write_and_the_replies_in_one_packet_settle_them(self):
        c, writes = self.pipelined("a@x.test", "b@x.test")
        c.expect(f"MAIL FROM:<app@example.org> SIZE={len(BODY)}", "RCPT TO:<a@x.test>", "RCPT TO:<b@x.test>", "DATA")
        self.assertEqual(len(writes), 2)          # EHLO, then the whole group at once
        c.server("250 2.1.0 ok", "250 2.1.5 ok", "550 5.1.1 no such user", "354 go")
        self.assertEqual(c.stream_body(), stuff_all(BODY))
        c.server("250 2.0.0 queued")
        c.expect("QUIT")
        result = c.close()
        self.assertEqual([(r.recipient, r.code, r.status) for r in result.results],
                         [("a@x.test", 250, "2.0.0"), ("b@x.test", 550, "5.1.1")])

    def test_replies_arriving_one_by_one_are_matched_in_order(self):
        c, _ = self.pipelined("a@x.test")
        c.sent()
        c.server("250 ok")
        c.server("250 ok")
        self.assertEqual(c.sent(), [])           # nothing more to send until the 354
        c.server("354 go")
        c.stream_body()
        c.server("250 2.0.0 ok")
        c.expect("QUIT")
        self.assertTrue(c.close().results[0].delivered)

    def test_refused_sender_settles_everyone_and_the_503s_that_follow_are_swallowed(self):
        m2 = message(b"second\r\n", sender="b@example.org")
        c, _ = self.pipelined(jobs=[Job(message(recipients=("a@x.test", "b@x.test")), ("a@x.test", "b@x.test")),
                                    Job(m2, ("c@x.test",))])
        c.sent()
        c.server("550 5.7.1 sender rejected", "503 5.5.1 MAIL first", "503 5.5.1 MAIL first",
                 "503 5.5.1 no valid recipients")
        c.expect("MAIL FROM:<b@example.org> SIZE=8", "RCPT TO:<c@x.test>", "DATA")
        c.server("250 ok", "250 ok", "354 go")
        self.assertEqual(c.stream_body(), b"second\r\n.\r\n")
        c.server("250 2.0.0 ok")
        c.expect("QUIT")
        result = c.close()
        self.assertEqual([[(r.code, r.status, r.text) for r in job] for job in result.jobs],
                         [[(550, "5.7.1", "sender rejected")] * 2, [(250, "2.0.0", "ok")]])

    def test_every_rcpt_refused_then_data_refused_resets_the_transaction(self):
        c, _ = self.pipelined("a@x.test", "b@x.test")
        c.sent()
        c.server("250 ok", "550 5.1.1 no", "450 4.2.0 later", "554 5.5.1 no valid recipients")
        c.expect("RSET")
        c.server("250 ok")
        c.expect("QUIT")
        result = c.close()
        self.assertEqual([(r.code, r.status) for r in result.results], [(550, "5.1.1"), (450, "4.2.0")])

    def test_data_accepted_with_no_recipient_gets_an_empty_body_at_once(self):
        # RFC 2920 3.1: a server may answer 354 although it refused every RCPT; the client ends it with ".".
        c, _ = self.pipelined("a@x.test")
        c.sent()
        c.server("250 ok", "550 5.1.1 no", "354 go")
        c.expect(".")
        c.server("554 5.5.1 no valid recipients")
        c.expect("QUIT")
        [r] = c.close().results
        self.assertEqual((r.code, r.status), (550, "5.1.1"))

    def test_421_in_the_middle_of_the_replies_defers_the_rest_and_closes(self):
        c, _ = self.pipelined("a@x.test", "b@x.test")
        c.sent()
        c.server("250 ok", "421 4.3.2 shutting down")
        self.assertTrue(c.transport.disconnecting)
        result = c.close()
        self.assertEqual([(r.code, r.status) for r in result.results], [(421, "4.3.2"), (421, "4.3.2")])
        self.assertFalse(any(r.permanent for r in result.results))

    def test_address_with_crlf_is_left_out_of_the_group(self):
        c, _ = self.pipelined("a@x.test\r\nRSET", "b@x.test")
        c.expect(f"MAIL FROM:<app@example.org> SIZE={len(BODY)}", "RCPT TO:<b@x.test>", "DATA")
        c.server("250 ok", "250 ok", "354 go")
        c.stream_body()
        c.server("250 2.0.0 ok")
        c.expect("QUIT")
        result = c.close()
        self.assertEqual([(r.code, r.status) for r in result.results], [(553, "5.1.3"), (250, "2.0.0")])

    def test_silence_after_the_group_times_out_naming_the_reply_awaited(self):
        c, _ = self.pipelined("a@x.test")
        c.sent()
        c.server("250 ok")
        c.clock.advance(301)
        [r] = c.close().results
        self.assertEqual((r.code, r.status), (421, "4.4.2"))
        self.assertIn("the reply to RCPT TO", r.text)


# -- real deliveries to the loopback sink ----------------------------------------------------------------


class SinkDeliveryTests(unittest.TestCase):
    def sink(self, **kw) -> tuple[Sink, int]:
        start = {k: kw.pop(k) for k in ("tls_options", "implicit_tls", "auth") if k in kw}
        sink = Sink(**kw)
        port = sink.start(reactor, **start)
        self.addCleanup(sink.stop)
        return sink, port

    def deliver(self, port, jobs, **kw):
        kw.setdefault("tls_policy", "none")
        return deliver_to_host("127.0.0.1", port, jobs, helo="relay.test", timeouts=kw.pop("timeouts", FAST), **kw)

    @defer.inlineCallbacks
    def test_message_arrives_byte_exact(self):
        sink, port = self.sink()
        body = b"".join(b"line %d %s\r\n" % (i, b"." * (i % 3)) for i in range(5000)) + b".\r\n..\r\nend\r\n"
        body = b".first line\r\n" + body
        result = yield self.deliver(port, [Job(message(body), ("a@example.net",))])
        self.assertEqual([r.code for r in result.results], [250])
        [got] = sink.messages
        self.assertEqual(got.data, body)
        self.assertEqual(got.data_raw, stuff_all(body))
        self.assertEqual((got.mail_from, got.rcpt_tos, got.helo), ("app@example.org", ["a@example.net"], "relay.test"))

    @defer.inlineCallbacks
    def test_twenty_thousand_lone_dot_lines_arrive_intact(self):
        sink, port = self.sink()
        body = b".\r\n" * 20000
        result = yield self.deliver(port, [Job(message(body), ("a@example.net",))])
        self.assertTrue(result.results[0].delivered)
        self.assertEqual(sink.messages[0].data, body)

    @defer.inlineCallbacks
    def test_body_without_final_crlf_gets_one_before_the_dot(self):
        sink, port = self.sink()
        yield self.deliver(port, [Job(message(b"no newline"), ("a@example.net",))])
        self.assertEqual(sink.messages[0].data, b"no newline\r\n")

    @defer.inlineCallbacks
    def test_8bitmime_and_size_parameters_are_sent(self):
        sink, port = self.sink()
        body = "Subject: é\r\n\r\nnaïve\r\n".encode("utf-8")
        result = yield self.deliver(port, [Job(message(body, eight_bit=True), ("a@example.net",))])
        self.assertTrue(result.results[0].delivered)
        self.assertEqual(sorted(sink.messages[0].mail_params), ["BODY=8BITMIME", f"SIZE={len(body)}"])
        self.assertEqual(sink.messages[0].data, body)

    @defer.inlineCallbacks
    def test_partial_rcpt_failure_settles_only_those_permanently(self):
        sink, port = self.sink(rcpt_replies={"bad@example.net": "550 5.1.1 no such user"})
        rcpts = ("a@example.net", "bad@example.net", "c@example.net")
        result = yield self.deliver(port, [Job(message(recipients=rcpts), rcpts)])
        self.assertEqual([(r.recipient, r.code, r.status) for r in result.results], [
            ("a@example.net", 250, "2.0.0"), ("bad@example.net", 550, "5.1.1"), ("c@example.net", 250, "2.0.0")])
        self.assertEqual(sink.messages[0].rcpt_tos, ["a@example.net", "c@example.net"])

    @defer.inlineCallbacks
    def test_pipelined_transactions_reach_a_real_server_in_one_read_each(self):
        # RFC 2920: MAIL, RCPTs and DATA arrive together; the replies settle the right recipients.
        sink, port = self.sink(extensions=DEFAULT_EXTENSIONS + ("PIPELINING",),
                               rcpt_replies={"bad@example.net": "550 5.1.1 no such user"})
        rcpts = ("a@example.net", "bad@example.net")
        jobs = [Job(message(recipients=rcpts), rcpts), Job(message(b"second\r\n"), ("c@example.net",))]
        result = yield self.deliver(port, jobs)
        self.assertEqual([[(r.recipient, r.code) for r in job] for job in result.jobs],
                         [[("a@example.net", 250), ("bad@example.net", 550)], [("c@example.net", 250)]])
        self.assertEqual([(m.rcpt_tos, m.data) for m in sink.messages],
                         [(["a@example.net"], BODY), (["c@example.net"], b"second\r\n")])
        groups = [read for read in sink.sessions[0].reads if len(read) > 1]
        self.assertEqual([[line.split(b":")[0] for line in g] for g in groups],
                         [[b"MAIL FROM", b"RCPT TO", b"RCPT TO", b"DATA"], [b"MAIL FROM", b"RCPT TO", b"DATA"]])

    @defer.inlineCallbacks
    def test_451_then_250_is_temporary_then_delivered(self):
        sink, port = self.sink(data_replies=("451 4.3.0 try again later",))
        job = Job(message(), ("a@example.net",))
        first = yield self.deliver(port, [job])
        self.assertTrue(first.results[0].temporary)
        self.assertEqual(first.results[0].status, "4.3.0")
        self.assertEqual(sink.messages, [])
        second = yield self.deliver(port, [job])
        self.assertTrue(second.results[0].delivered)
        self.assertEqual(len(sink.messages), 1)

    @defer.inlineCallbacks
    def test_connection_dropped_in_data_is_temporary(self):
        sink, port = self.sink(drop_in_data=3)
        body = b"x" * 100 + b"\r\n"
        result = yield self.deliver(port, [Job(message(body * 5000), ("a@example.net", "b@example.net"))])
        self.assertEqual([(r.code, r.status) for r in result.results], [(421, "4.4.2")] * 2)
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_connection_dropped_in_data_over_tls_is_temporary(self):
        certs = Certificates("mx.test")
        sink, port = self.sink(tls_options=certs.server_options, drop_in_data=3)
        body = (b"y" * 998 + b"\r\n") * 3000
        result = yield self.deliver(port, [Job(message(body), ("a@x.test",))], tls_policy="required")
        self.assertEqual((result.results[0].code, result.results[0].status), (421, "4.4.2"))
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_silent_peer_times_out_with_a_temporary_failure(self):
        sink, port = self.sink(silent=True)
        result = yield self.deliver(port, [Job(message(), ("a@example.net",))],
                                    timeouts=Timeouts(connect=5, reply=0.2, data_end=0.2))
        self.assertEqual((result.results[0].code, result.results[0].status), (421, "4.4.2"))
        self.assertTrue(result.before_mail)

    @defer.inlineCallbacks
    def test_refused_connection_is_4_4_1_for_every_recipient(self):
        sink, port = self.sink()
        yield sink.stop()
        result = yield self.deliver(port, [Job(message(), ("a@x.test", "b@x.test"))])
        self.assertEqual([(r.code, r.status) for r in result.results], [(451, "4.4.1")] * 2)
        self.assertTrue(result.before_mail)

    @defer.inlineCallbacks
    def test_several_jobs_on_one_connection(self):
        sink, port = self.sink()
        jobs = [Job(message(b"one\r\n"), ("a@x.test",)), Job(message(b"two\r\n"), ("b@x.test",))]
        result = yield self.deliver(port, jobs)
        self.assertEqual([[r.code for r in job] for job in result.jobs], [[250], [250]])
        self.assertEqual([m.data for m in sink.messages], [b"one\r\n", b"two\r\n"])
        self.assertEqual(len(sink.sessions), 1)

    # -- TLS ----------------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_starttls_required_but_not_offered_is_4xx_and_nothing_sent(self):
        sink, port = self.sink()
        result = yield self.deliver(port, [Job(message(), ("a@x.test",))], tls_policy="required")
        self.assertEqual((result.results[0].code, result.results[0].status), (451, "4.7.4"))
        self.assertFalse(any(line.startswith(b"MAIL") for _, line in sink.sessions[0].commands))

    @defer.inlineCallbacks
    def test_verify_with_wrong_name_certificate_is_4xx_and_nothing_delivered(self):
        certs = Certificates("wrong.example")
        sink, port = self.sink(tls_options=certs.server_options)
        result = yield self.deliver(port, [Job(message(), ("a@x.test",))], tls_policy="verify",
                                    tls_hostname="mx.test", ca_file=certs.ca_file(self))
        [r] = result.results
        self.assertEqual((r.code, r.status), (421, "4.7.5"))
        self.assertTrue(result.tls_failed)
        self.assertEqual(sink.transactions, [])

    @defer.inlineCallbacks
    def test_verify_with_the_right_ca_delivers_over_tls(self):
        certs = Certificates("mx.test")
        sink, port = self.sink(tls_options=certs.server_options)
        result = yield self.deliver(port, [Job(message(), ("a@x.test",))], tls_policy="verify",
                                    tls_hostname="mx.test", ca_file=certs.ca_file(self))
        self.assertTrue(result.results[0].delivered)
        self.assertTrue(result.tls.startswith("TLSv1."))
        self.assertTrue(sink.messages[0].tls)
        self.assertEqual(sink.messages[0].data, BODY)

    @defer.inlineCallbacks
    def test_large_body_is_streamed_in_bounded_reads_over_starttls(self):
        certs = Certificates("mx.test")
        sink, port = self.sink(tls_options=certs.server_options)
        body = b"".join(b"%07d .%s\r\n" % (i, b"x" * (i % 200)) for i in range(20000))   # ~2 MiB
        reads = []

        class RecordingFile(io.BytesIO):
            def read(self, n=-1):
                reads.append(n)
                return super().read(n)

        class StreamedMessage(FakeMessage):
            def open(self):
                return RecordingFile(self.body)

        job = Job(StreamedMessage("Q2", message().envelope, body), ("a@x.test",))
        result = yield self.deliver(port, [job], tls_policy="required")
        self.assertTrue(result.results[0].delivered)
        self.assertTrue(sink.messages[0].tls)
        self.assertEqual(sink.messages[0].data, body)
        self.assertTrue(all(0 < n <= CHUNK_SIZE for n in reads), set(reads))

    @defer.inlineCallbacks
    def test_opportunistic_falls_back_to_plaintext_when_the_handshake_fails(self):
        certs = Certificates("mx.test")
        sink, port = self.sink(tls_options=certs.server_options, fail_tls=True)
        result = yield self.deliver(port, [Job(message(), ("a@x.test",))], tls_policy="opportunistic")
        self.assertTrue(result.results[0].delivered)
        self.assertTrue(result.tls_failed)
        self.assertIsNone(result.tls)
        self.assertFalse(sink.messages[0].tls)
        self.assertEqual(len(sink.sessions), 2)

    @defer.inlineCallbacks
    def test_required_tls_does_not_fall_back_when_the_handshake_fails(self):
        certs = Certificates("mx.test")
        sink, port = self.sink(tls_options=certs.server_options, fail_tls=True)
        result = yield self.deliver(port, [Job(message(), ("a@x.test",))], tls_policy="required")
        self.assertEqual(result.results[0].status, "4.7.5")
        self.assertEqual((sink.messages, len(sink.sessions)), ([], 1))

    @defer.inlineCallbacks
    def test_implicit_tls_delivers(self):
        certs = Certificates("localhost")
        sink, port = self.sink(tls_options=certs.server_options, implicit_tls=True)
        result = yield self.deliver(port, [Job(message(), ("a@x.test",))], tls_policy="verify",
                                    implicit_tls=True, tls_hostname="localhost", ca_file=certs.ca_file(self))
        self.assertTrue(result.results[0].delivered, result.results)
        self.assertTrue(sink.messages[0].tls)
        self.assertTrue(result.tls)


class SmarthostTests(unittest.TestCase):
    def secret_file(self, content: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    def start_sink(self, **kw) -> tuple[Sink, int]:
        start = {k: kw.pop(k) for k in ("tls_options", "implicit_tls", "auth") if k in kw}
        sink = Sink(**kw)
        port = sink.start(reactor, **start)
        self.addCleanup(sink.stop)
        return sink, port

    def test_transport_provides_inexthop_and_hides_the_password(self):
        t = config.Transport("ses", "localhost", 587, username="u", password_file=self.secret_file(b"hunter2\n"))
        smarthost = SmarthostTransport(t, "relay.test", reactor=reactor)
        self.assertTrue(verifyObject(INextHop, smarthost))
        self.assertNotIn("hunter2", repr(smarthost))
        self.assertNotIn("hunter2", repr(vars(smarthost)))

    @defer.inlineCallbacks
    def test_auth_over_starttls_reaches_the_sink_with_the_password_file_secret(self):
        certs = Certificates("localhost")
        sink, port = self.start_sink(tls_options=certs.server_options, auth={"relayuser": "hunter2"})
        t = config.Transport("ses", "localhost", port, security="starttls", verify=True, username="relayuser",
                             password_file=self.secret_file(b"hunter2\n"), ca_file=certs.ca_file(self))
        smarthost = SmarthostTransport(t, "relay.test", reactor=reactor, timeouts=FAST)
        results = yield smarthost.deliver(message(), ["a@x.test"])
        self.assertEqual([r.code for r in results], [250])
        self.assertEqual(sink.messages[0].auth_identity, "relayuser")
        self.assertTrue(sink.messages[0].tls)
        self.assertEqual(sink.auth_attempts, [(True, "PLAIN")])
        self.assertNotIn((False, b"AUTH"), [(tls, line[:4]) for tls, line in sink.sessions[0].commands])

    @defer.inlineCallbacks
    def test_auth_is_never_sent_in_plaintext_even_when_offered(self):
        sink, port = self.start_sink(auth={"relayuser": "hunter2"})
        t = config.Transport("plain", "localhost", port, security="none", username="relayuser",
                             password_file=self.secret_file(b"hunter2\n"))
        results = yield SmarthostTransport(t, "relay.test", reactor=reactor, timeouts=FAST).deliver(
            message(), ["a@x.test"])
        self.assertEqual((results[0].code, results[0].status), (451, "4.7.11"))
        self.assertEqual(sink.auth_attempts, [])
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_wrong_password_is_a_temporary_failure(self):
        certs = Certificates("localhost")
        sink, port = self.start_sink(tls_options=certs.server_options, implicit_tls=True,
                                     auth={"relayuser": "right"})
        t = config.Transport("ses", "localhost", port, security="tls", username="relayuser",
                             password_file=self.secret_file(b"wrong"), ca_file=certs.ca_file(self))
        results = yield SmarthostTransport(t, "relay.test", reactor=reactor, timeouts=FAST).deliver(
            message(), ["a@x.test"])
        self.assertEqual((results[0].code, results[0].status), (451, "4.7.8"))
        self.assertEqual(sink.messages, [])
