"""LMTP next hops (RFC 2033): the `protocol` and `unix:` keys, the LMTP client's conversation (LHLO, one
reply per recipient after the data), and deliveries through the relay to a real LMTP server on loopback
and on a unix socket, in-process and through twistd with its delivery process.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from mailrelay import config
from mailrelay.config import ConfigError, load
from mailrelay.queue.job import Job, Timeouts
from mailrelay.outbound.lmtp import LMTPClient
from mailrelay.outbound.smarthost import SmarthostTransport
from tests.support.conversation import Conversation, message
from tests.support.lmtpserver import LMTP_EXTENSIONS, LMTPSink
from tests.support.pki import TestCA
from tests.support.polling import until
from tests.support.relay import SEPARATE, RelayFixture

THREE = ("a@example.net", "b@example.net", "c@example.net")
BODY = b"Subject: lmtp\r\nMessage-ID: <lmtp-1@example.org>\r\n\r\n.leading dot\r\nbody\r\n"


def short_dir(test: unittest.TestCase) -> Path:
    """A directory with a short path: a unix socket's path must fit in 108 octets."""
    path = Path(tempfile.mkdtemp(prefix="lmtp"))
    test.addCleanup(shutil.rmtree, path, True)
    return path


# -- configuration -----------------------------------------------------------------------------------


class ConfigTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)

    def load(self, table: str) -> config.Transport:
        path = self.dir / "tap.conf"
        path.write_text("[transports.box]\n" + table)
        return load(path).transports["box"]

    def refused(self, table: str, key: str, *fragments: str) -> None:
        path = self.dir / "tap.conf"
        path.write_text("[transports.box]\n" + table)
        error = self.assertRaises(ConfigError, load, path)
        message = str(error)
        self.assertTrue(message.startswith(f"{path}: transports.box.{key}: "), message)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_protocol_defaults_to_smtp(self):
        t = self.load('host = "mx.test"\n')
        self.assertEqual((t.protocol, t.unix_path, t.port, t.place), ("smtp", None, 587, "mx.test:587"))

    def test_lmtp_over_tcp_keeps_security_and_defaults_to_port_24(self):
        t = self.load('host = "mail.test"\nprotocol = "lmtp"\nsecurity = "none"\n')
        self.assertEqual((t.protocol, t.port, t.security, t.place), ("lmtp", 24, "none", "LMTP mail.test:24"))
        t = self.load('host = "mail.test"\nprotocol = "lmtp"\nport = 2424\n')
        self.assertEqual((t.port, t.security, t.verify), (2424, "starttls", True))

    def test_unknown_protocol_is_refused_naming_the_key(self):
        self.refused('host = "mx.test"\nprotocol = "lmtps"\n', "protocol", '"lmtps" is not one of', '"lmtp"')

    def test_unix_socket_host_takes_no_tls_and_no_port(self):
        t = self.load('host = "unix:/run/dovecot/lmtp"\nprotocol = "lmtp"\n')
        self.assertEqual((t.unix_path, t.security, t.host),
                         (Path("/run/dovecot/lmtp"), "none", "unix:/run/dovecot/lmtp"))
        self.assertEqual(self.load('host = "unix:path=/run/x"\n').unix_path, Path("/run/x"))
        self.assertEqual(self.load('host = "unix:sock/lmtp"\n').unix_path, self.dir / "sock" / "lmtp")
        self.refused('host = "unix:/run/x"\nsecurity = "starttls"\n', "security", "unix: socket", '"none"')
        self.refused('host = "unix:/run/x"\nport = 24\n', "port", "not used with a unix: host")
        self.refused('host = "unix:"\n', "host", "unix:PATH")
        self.refused('host = "unix:path=/run/x:timeout=3"\n', "host", "unix:PATH")
        self.refused('host = "unix:/run/x"\nsource_address = "127.0.0.1"\n', "source_address", "unix:")
        secret = self.dir / "secret"
        secret.write_text("pw")
        self.refused(f'host = "unix:/run/x"\nusername = "u"\npassword_file = "{secret}"\n', "username", "no AUTH")


# -- conversations over a StringTransport --------------------------------------------------------------


class ConversationTests(unittest.TestCase):
    def talk(self, recipients=THREE, **params) -> Conversation:
        return Conversation(self, LMTPClient, [Job(message(BODY, recipients=recipients), recipients)], **params)

    def test_each_recipient_is_settled_by_its_own_reply_after_the_data(self):
        talk = self.talk()
        talk.greet("LHLO", "ENHANCEDSTATUSCODES")
        talk.expect("MAIL FROM:<app@example.org>")
        talk.server("250 2.1.0 ok")
        for rcpt in THREE:
            talk.expect(f"RCPT TO:<{rcpt}>")
            talk.server("250 2.1.5 ok")
        talk.expect("DATA")
        talk.server("354 go")
        self.assertEqual(talk.stream_body(), b"Subject: lmtp\r\nMessage-ID: <lmtp-1@example.org>\r\n\r\n"
                                             b"..leading dot\r\nbody\r\n.\r\n")
        talk.server("250 2.0.0 <a@example.net> saved")
        self.assertEqual(talk.sent(), [])        # still owed two replies
        talk.server("452 4.2.2 <b@example.net> mailbox full", "550 5.1.1 <c@example.net> no such user")
        talk.expect("QUIT")
        talk.server("221 bye")
        a, b, c = talk.close().jobs[0]
        self.assertEqual((a.code, a.status), (250, "2.0.0"))
        self.assertEqual((b.code, b.status, b.text), (452, "4.2.2", "<b@example.net> mailbox full"))
        self.assertEqual((c.code, c.status), (550, "5.1.1"))

    def test_pipelined_group_and_replies_only_for_the_accepted_recipients(self):
        talk = self.talk()
        talk.greet("LHLO", "PIPELINING")
        talk.expect("MAIL FROM:<app@example.org>", *[f"RCPT TO:<{r}>" for r in THREE], "DATA")
        talk.server("250 ok", "250 ok", "550 5.1.1 refused at RCPT", "250 ok", "354 go")
        talk.stream_body()
        talk.server("250 2.0.0 a ok")
        talk.server("250 2.0.0 c ok")            # b was refused at RCPT: no reply is owed for it
        talk.expect("QUIT")
        self.assertEqual([r.code for r in talk.close().jobs[0]], [250, 550, 250])

    def test_a_refused_lhlo_ends_the_session_without_helo(self):
        talk = self.talk(recipients=("a@example.net",))
        talk.server("220 mx.test LMTP")
        talk.expect("LHLO relay.test")
        talk.server("500 5.5.1 what")
        talk.expect("QUIT")                      # RFC 2033 4.1: no HELO fallback
        (a,) = talk.close().jobs[0]
        self.assertTrue(a.temporary, a)
        self.assertIn("after LHLO", a.text)

    def the_data_sent(self, talk: Conversation) -> None:
        talk.greet("LHLO", "PIPELINING")
        talk.sent()
        talk.server("250 ok", "250 ok", "250 ok", "250 ok", "354 go")
        talk.stream_body()

    def test_connection_lost_part_way_settles_only_the_unanswered(self):
        talk = self.talk()
        self.the_data_sent(talk)
        talk.server("250 2.0.0 a saved")
        a, b, c = talk.close().jobs[0]
        self.assertEqual(a.code, 250)
        for r in (b, c):
            self.assertEqual((r.code, r.status), (421, "4.4.2"))
        self.assertIn("the reply for <b@example.net> after the data", b.text)

    def test_a_421_among_the_replies_settles_it_and_ends_the_session(self):
        talk = self.talk()
        self.the_data_sent(talk)
        talk.server("250 2.0.0 a saved", "421 4.3.2 shutting down")
        self.assertEqual(talk.sent(), [])        # no QUIT after a 421 (RFC 5321 3.8)
        self.assertTrue(talk.transport.disconnecting)
        a, b, c = talk.close().jobs[0]
        self.assertEqual([a.code, b.code, c.code], [250, 421, 421])
        self.assertTrue(c.temporary)

    def test_a_silent_server_times_out_only_the_unanswered(self):
        talk = self.talk(timeouts=Timeouts(reply=5, data_end=60))
        self.the_data_sent(talk)
        talk.server("250 2.0.0 a saved", "550 5.1.1 b unknown")
        talk.clock.advance(61)
        self.assertTrue(talk.transport.disconnecting)
        a, b, c = talk.close().jobs[0]
        self.assertEqual([a.code, b.code, c.code], [250, 550, 421])
        self.assertEqual(c.status, "4.4.2")
        self.assertIn("timed out waiting for the reply for <c@example.net>", c.text)

    def test_the_next_job_starts_only_after_every_reply(self):
        one, two = message(BODY, recipients=THREE[:2]), message(BODY, recipients=THREE[2:])
        talk = Conversation(self, LMTPClient, [Job(one, THREE[:2]), Job(two, THREE[2:])])
        talk.greet("LHLO", "PIPELINING")
        talk.sent()
        talk.server("250 ok", "250 ok", "250 ok", "354 go")
        talk.stream_body()
        talk.server("250 2.0.0 a")
        self.assertEqual(talk.sent(), [])
        talk.server("250 2.0.0 b")
        talk.expect("MAIL FROM:<app@example.org>", "RCPT TO:<c@example.net>", "DATA")
        talk.server("250 ok", "250 ok", "354 go")
        talk.stream_body()
        talk.server("451 4.3.0 c later")
        talk.expect("QUIT")
        first, second = talk.close().jobs
        self.assertEqual([r.code for r in first + second], [250, 250, 451])


# -- to a real LMTP server -------------------------------------------------------------------------------


def transport(**keys) -> config.Transport:
    keys.setdefault("security", "none")
    return config.Transport(name="box", protocol="lmtp", **keys)


class DirectTests(unittest.TestCase):
    """SmarthostTransport to a real LMTP server: TCP and a unix socket, batches and connection reuse."""
    timeout = 60

    def start(self, **kwargs) -> LMTPSink:
        server = LMTPSink(**kwargs)
        self.addCleanup(server.stop)
        return server

    @defer.inlineCallbacks
    def test_a_batch_over_a_unix_socket_and_a_second_batch_on_the_same_connection(self):
        path = str(short_dir(self) / "lmtp")       # removed after the server has stopped
        server = self.start(replies={"b@example.net": ["550 5.1.1 unknown"]})
        server.start_unix(reactor, path)
        hop = SmarthostTransport(transport(host=f"unix:{path}", unix_path=Path(path), port=0), "relay.test")
        self.addCleanup(hop.close_idle)
        jobs = [Job(message(BODY, recipients=THREE[:2]), THREE[:2]), Job(message(BODY), ("c@example.net",))]
        results = yield hop.deliver_batch(jobs)
        self.assertEqual([[r.code for r in job] for job in results], [[250, 550], [250]])
        self.assertEqual(results[0][1].remote_host, f"unix:{path}")
        self.assertEqual(len(server.sessions), 1)
        self.assertEqual(server.sessions[0].commands[0][1], b"LHLO relay.test")
        results = yield hop.deliver_batch([Job(message(BODY), ("a@example.net",))])
        self.assertEqual(results[0][0].code, 250)
        self.assertEqual((len(server.sessions), hop.pool.reused), (1, 1))      # the parked connection
        self.assertEqual([r for r, _ in server.deliveries], ["a@example.net", "c@example.net", "a@example.net"])

    @defer.inlineCallbacks
    def test_a_missing_socket_defers_every_recipient(self):
        path = short_dir(self) / "nothing-here"
        hop = SmarthostTransport(transport(host=f"unix:{path}", unix_path=path, port=0), "relay.test")
        results = yield hop.deliver(message(BODY), ["a@example.net"])
        self.assertEqual((results[0].code, results[0].status), (451, "4.4.1"))

    @defer.inlineCallbacks
    def test_lmtp_over_tcp(self):
        server = self.start(replies={"a@example.net": ["452 4.2.2 full"]})
        port = server.start(reactor)
        hop = SmarthostTransport(transport(host="127.0.0.1", port=port), "relay.test")
        self.addCleanup(hop.close_idle)
        results = yield hop.deliver(message(BODY, recipients=THREE), THREE)
        self.assertEqual([r.code for r in results], [452, 250, 250])
        self.assertEqual(server.transactions[0].data, BODY)
        # PIPELINING offered: LHLO alone, then MAIL, the RCPTs and DATA in one read (RFC 2920)
        verbs = [[line.split(b" ")[0].split(b":")[0] for line in read] for read in server.sessions[0].reads if read]
        self.assertIn([b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA"], verbs)


    @defer.inlineCallbacks
    def test_bdat_to_an_lmtp_server_that_offers_chunking_then_one_reply_per_recipient(self):
        server = self.start(extensions=LMTP_EXTENSIONS + ("CHUNKING",),
                            replies={"b@example.net": ["550 5.2.1 <b@example.net> disabled"]})
        port = server.start(reactor)
        hop = SmarthostTransport(transport(host="127.0.0.1", port=port), "relay.test")
        self.addCleanup(hop.close_idle)
        results = yield hop.deliver(message(BODY, recipients=THREE), THREE)
        self.assertEqual([r.code for r in results], [250, 550, 250])
        (transaction,) = server.transactions
        self.assertEqual((transaction.data, transaction.chunks), (BODY, [(len(BODY), True)]))

    @defer.inlineCallbacks
    def test_lmtp_over_tcp_with_starttls_verified_and_lhlo_again_after_it(self):
        ca = TestCA()
        directory = Path(self.mktemp())
        directory.mkdir()
        server = self.start()
        port = server.start(reactor, tls_options=ca.server_options("127.0.0.1"))
        hop = SmarthostTransport(transport(host="127.0.0.1", port=port, security="starttls",
                                           ca_file=ca.write(directory)), "relay.test")
        self.addCleanup(hop.close_idle)
        results = yield hop.deliver(message(BODY), ["a@example.net"])
        self.assertEqual(results[0].code, 250)
        self.assertEqual(results[0].tls_verified, True)
        self.assertEqual(server.transactions[0].tls, True)
        commands = [(tls, line.split(b" ")[0]) for tls, line in server.sessions[0].commands]
        self.assertEqual(commands[:3], [(False, b"LHLO"), (False, b"STARTTLS"), (True, b"LHLO")])   # RFC 3207 4.2


# -- through the whole relay -----------------------------------------------------------------------------


class RelayTests(unittest.TestCase):
    """Mail through the relay to an LMTP transport: each recipient's outcome on its own."""
    timeout = 120

    def relay(self, host_keys: str, process=None) -> RelayFixture:
        relay = RelayFixture(self.mktemp(), extra=(
            f'[transports.box]\nprotocol = "lmtp"\n{host_keys}\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "box"\n\n[queue]\nfirst_retry = "1s"\nmax_retry = "1s"\n'),
            **({} if process is None else {"process": process}))
        return relay

    def start(self, relay: RelayFixture) -> RelayFixture:
        relay.start(reactor)
        self.addCleanup(relay.stop)
        return relay

    @defer.inlineCallbacks
    def test_delivered_retried_and_bounced_recipients_in_one_transaction(self):
        server = LMTPSink(replies={"b@example.net": ["452 4.2.2 mailbox full"],
                                   "c@example.net": ["550 5.1.1 no such user"]})
        port = server.start(reactor)
        self.addCleanup(server.stop)
        relay = self.start(self.relay(f'host = "127.0.0.1"\nport = {port}\nsecurity = "none"\n'))
        code, _ = yield relay.submit("relay", "app@example.org", list(THREE), BODY)
        self.assertEqual(code, 250)
        yield until(lambda: len(server.deliveries) >= 3, "a, b (retried) and the DSN")
        delivered = sorted(r for r, _ in server.deliveries)
        self.assertEqual(delivered, ["a@example.net", "app@example.org", "b@example.net"])   # each once
        first, *later = server.transactions
        self.assertEqual(first.rcpt_tos, list(THREE))
        retry = [t for t in later if t.mail_from == "app@example.org"]
        self.assertEqual([t.rcpt_tos for t in retry], [["b@example.net"]])      # only b was tried again
        dsn = dict((r, d) for r, d in server.deliveries)["app@example.org"]
        self.assertIn(b"c@example.net", dsn)
        self.assertIn(b"5.1.1", dsn)
        self.assertNotIn(b"Final-Recipient: rfc822; b@example.net", dsn)
        yield until(lambda: not relay.service.spool.queue_ids(), "the spool to empty")

    @defer.inlineCallbacks
    def test_notify_success_to_an_lmtp_mailbox_is_reported_delivered_not_relayed(self):
        server = LMTPSink()
        port = server.start(reactor)
        self.addCleanup(server.stop)
        relay = self.start(self.relay(f'host = "127.0.0.1"\nport = {port}\nsecurity = "none"\n'))
        code, _ = yield relay.submit("relay", "app@example.org", ["a@example.net"], BODY,
                                     rcpt_options={"a@example.net": ["NOTIFY=SUCCESS"]})
        self.assertEqual(code, 250)
        yield until(lambda: len(server.deliveries) >= 2, "the message and its success report")
        report = dict((r, d) for r, d in server.deliveries)["app@example.org"]
        self.assertIn(b"Action: delivered", report)       # RFC 3464 2.3.3: the LMTP reply is the mailbox's
        self.assertNotIn(b"Action: relayed", report)

    @defer.inlineCallbacks
    def test_connection_lost_part_way_through_the_replies_resends_only_the_unanswered(self):
        server = LMTPSink(drop_after=1)
        port = server.start(reactor)
        self.addCleanup(server.stop)
        relay = self.start(self.relay(f'host = "127.0.0.1"\nport = {port}\nsecurity = "none"\n'))
        code, _ = yield relay.submit("relay", "app@example.org", list(THREE), BODY)
        self.assertEqual(code, 250)
        yield until(lambda: len(server.deliveries) >= 3, "every recipient delivered")
        yield until(lambda: not relay.service.spool.queue_ids(), "the spool to empty")
        self.assertEqual(sorted(r for r, _ in server.deliveries), list(THREE))     # no duplicate
        self.assertEqual([t.rcpt_tos for t in server.transactions],
                         [list(THREE), ["b@example.net", "c@example.net"]])

    @defer.inlineCallbacks
    def test_through_twistd_with_its_delivery_process_over_a_unix_socket(self):
        path = str(short_dir(self) / "lmtp")
        server = LMTPSink(replies={"c@example.net": ["550 5.1.1 no such user"] * 2})
        server.start_unix(reactor, path)
        self.addCleanup(server.stop)
        relay = self.relay(f'host = "unix:{path}"\n', process=SEPARATE)
        yield threads.deferToThread(relay.spawn)
        self.addCleanup(relay.kill)
        for n in range(2):
            code, _ = yield relay.submit("relay", "app@example.org", list(THREE),
                                         BODY.replace(b"lmtp-1", b"lmtp-%d" % n))
            self.assertEqual(code, 250)
        yield until(lambda: len(server.deliveries) >= 6, "four deliveries and two DSNs", timeout=60)
        self.assertEqual(sorted(r for r, _ in server.deliveries),
                         ["a@example.net"] * 2 + ["app@example.org"] * 2 + ["b@example.net"] * 2)
        self.assertTrue(all(cmd[1].startswith(b"LHLO") for cmd in (s.commands[0] for s in server.sessions)))
