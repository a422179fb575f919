"""DSN (RFC 3461) through the whole relay over real sockets: a real client (smtplib) gives NOTIFY, ORCPT,
RET and ENVID, the relay spools and delivers to a scripted next hop (tests/support/sink.py) that offers
DSN or not, and every report that comes back (through the same route, from <>) is parsed with the email
package: which recipients get which report, what it returns, and what was passed on.  The last test
runs `twistd` itself and kills it in between: the requests survive in the spool."""
from __future__ import annotations

import email
import email.policy
import signal

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from tests.support.polling import until
from tests.support.ports import free_port
from tests.support.relay import SEPARATE, RelayFixture
from tests.support.sink import Sink

SECRET = b"the secret body line"
MESSAGE = (b"From: App <app@example.org>\r\nTo: <user@example.com>\r\nSubject: dsn test\r\n"
           b"Message-ID: <dsn1@example.org>\r\n\r\n" + SECRET + b"\r\n")


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.compat32)


def dsn_parts(data: bytes):
    """(the report, its per-message fields, one field block per recipient, the returned part)."""
    report = parse(data)
    assert report.get_content_type() == "multipart/report", report.get_content_type()
    status = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"][0]
    blocks = status.get_payload()
    returned = report.get_payload()[2]
    return report, blocks[0], blocks[1:], returned


def dsn_params(transaction) -> list[str]:
    """The MAIL parameters a hop saw, without SIZE and BODY (not the DSN's business)."""
    return [p for p in transaction.mail_params if not p.startswith(("SIZE=", "BODY="))]


def by_recipient(blocks) -> dict:
    return {b["Final-Recipient"].split(";", 1)[1].strip(): b for b in blocks}


def spool_empty(relay: RelayFixture) -> bool:
    queue = relay.dir / "spool" / "queue"
    return queue.is_dir() and not any(queue.iterdir())


class DSNEndToEnd(unittest.TestCase):
    timeout = 120

    def start_sink(self, extensions: tuple = (), **sink) -> int:
        self.sink = Sink(**sink)
        self.sink.extensions += extensions
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        return self.sink_port

    def start(self, extensions: tuple = (), queue: str = "", **sink) -> RelayFixture:
        port = self.start_sink(extensions, **sink)
        relay = RelayFixture(self.mktemp(), extra=(
            f'[transports.sink]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n\n'
            f'[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n[queue]\nfirst_retry = "1s"\n{queue}\n'))
        relay.start(reactor)
        self.addCleanup(relay.stop)
        return relay

    def dsns(self) -> list:
        return [m for m in self.sink.messages if m.mail_from == ""]

    @defer.inlineCallbacks
    def test_each_notify_gets_its_reports_from_a_hop_without_dsn(self):
        refused = "550 5.1.1 no such user"
        relay = self.start(rcpt_replies={"never@example.com": refused, "failure@example.com": refused,
                                         "delayonly@example.com": refused, "default@example.com": refused})
        rcpts = {"never@example.com": ["NOTIFY=NEVER"], "failure@example.com": ["NOTIFY=FAILURE"],
                 "delayonly@example.com": ["NOTIFY=DELAY"], "default@example.com": [],
                 "success@example.com": ["NOTIFY=SUCCESS", "ORCPT=rfc822;Success+2Bx@example.com"],
                 "silent@example.com": ["NOTIFY=FAILURE"]}
        code, _ = yield relay.submit("relay", "app@example.org", list(rcpts), MESSAGE,
                                     mail_options=("ENVID=env+2B1",), rcpt_options=rcpts)
        self.assertEqual(code, 250)
        yield self.sink.wait_for(3)              # the message itself, a failure and a relayed report
        yield until(lambda: spool_empty(relay), "the spool to empty")
        self.assertEqual(len(self.sink.messages), 3, [m.rcpt_tos for m in self.sink.messages])
        delivered = [m for m in self.sink.messages if m.mail_from == "app@example.org"][0]
        self.assertEqual(sorted(delivered.rcpt_tos), ["silent@example.com", "success@example.com"])
        self.assertEqual(dsn_params(delivered), [])               # the hop offers no DSN: none passed on
        self.assertEqual(delivered.rcpt_params["success@example.com"], [])
        reports = {}
        for dsn in self.dsns():
            self.assertEqual(dsn.rcpt_tos, ["app@example.org"])
            _, per_message, blocks, _ = dsn_parts(dsn.data)
            self.assertEqual(per_message["Original-Envelope-Id"], "env+1")
            for block in blocks:
                reports[block["Final-Recipient"].split(";", 1)[1].strip()] = block
        # NEVER: nothing; FAILURE: failed; DELAY alone: no failure report; none: FAILURE,DELAY.
        self.assertEqual(sorted(reports), ["default@example.com", "failure@example.com", "success@example.com"])
        self.assertEqual(reports["failure@example.com"]["Action"], "failed")
        self.assertEqual(reports["default@example.com"]["Action"], "failed")
        # RFC 3461 6.2.1: SUCCESS to a hop without DSN is answered "relayed", with the ORCPT given.
        self.assertEqual(reports["success@example.com"]["Action"], "relayed")
        self.assertEqual(reports["success@example.com"]["Status"], "2.0.0")
        self.assertEqual(reports["success@example.com"]["Original-Recipient"], "rfc822;Success+x@example.com")
        relayed = [d for d in self.dsns() if b"Action: relayed" in d.data][0]
        self.assertEqual(parse(relayed.data)["Subject"], "Successful Mail Delivery Report")
        self.assertNotIn(SECRET, relayed.data)                   # RFC 3461 4.3: headers only

    @defer.inlineCallbacks
    def test_a_hop_with_dsn_gets_the_parameters_and_we_send_nothing(self):
        relay = self.start(extensions=("DSN",))
        rcpts = {"a@example.com": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;A+2Bx@example.com"],
                 "b@example.com": ["NOTIFY=NEVER"], "c@example.com": []}
        code, _ = yield relay.submit("relay", "app@example.org", list(rcpts), MESSAGE,
                                     mail_options=("RET=HDRS", "ENVID=QQ+2B1+20x"), rcpt_options=rcpts)
        self.assertEqual(code, 250)
        yield self.sink.wait_for(1)
        yield until(lambda: spool_empty(relay), "the spool to empty")
        self.assertEqual(len(self.sink.messages), 1)             # no relayed DSN: the hop reports itself
        arrived = self.sink.messages[0]
        self.assertEqual(dsn_params(arrived), ["RET=HDRS", "ENVID=QQ+2B1+20x"])
        self.assertEqual(arrived.rcpt_params, rcpts)          # verbatim, each recipient its own

    @defer.inlineCallbacks
    def test_ret_full_returns_the_message_and_ret_hdrs_only_its_header(self):
        relay = self.start(rcpt_replies={"gone@example.com": "550 5.1.1 no such user"})
        for ret in ("FULL", "HDRS"):
            code, _ = yield relay.submit(
                "relay", "app@example.org", ["gone@example.com"], MESSAGE.replace(b"dsn1@", f"{ret}@".encode()),
                mail_options=(f"RET={ret}", f"ENVID={ret}-id"),
                rcpt_options={"gone@example.com": ["ORCPT=rfc822;Gone@example.com"]})
            self.assertEqual(code, 250)
        yield self.sink.wait_for(2)
        reports = {}
        for dsn in self.dsns():
            _, per_message, blocks, returned = dsn_parts(dsn.data)
            reports[per_message["Original-Envelope-Id"]] = (blocks, returned, dsn.data)
        blocks, returned, raw = reports["FULL-id"]
        self.assertEqual(blocks[0]["Original-Recipient"], "rfc822;Gone@example.com")
        self.assertEqual(blocks[0]["Status"], "5.1.1")
        self.assertEqual(returned.get_content_type(), "message/rfc822")
        original = returned.get_payload()[0]
        self.assertEqual(original["Message-ID"], "<FULL@example.org>")
        self.assertEqual(original.get_payload().strip().encode(), SECRET)
        self.assertIn(MESSAGE.replace(b"dsn1@", b"FULL@"), raw)             # byte for byte
        blocks, returned, raw = reports["HDRS-id"]
        self.assertEqual(returned.get_content_type(), "text/rfc822-headers")
        self.assertIn("Message-ID: <HDRS@example.org>", returned.get_payload())
        self.assertNotIn(SECRET, raw)

    @defer.inlineCallbacks
    def test_delay_reports_follow_notify(self):
        busy = "451 4.3.0 busy, try later"
        relay = self.start(queue='delay_warning = "1s"\n', rcpt_replies={
            "delay@example.com": busy, "failureonly@example.com": busy, "default@example.com": busy})
        rcpts = {"delay@example.com": ["NOTIFY=DELAY"], "failureonly@example.com": ["NOTIFY=FAILURE"],
                 "default@example.com": []}
        code, _ = yield relay.submit("relay", "app@example.org", list(rcpts), MESSAGE, rcpt_options=rcpts)
        self.assertEqual(code, 250)
        yield self.sink.wait_for(1)
        _, _, blocks, _ = dsn_parts(self.dsns()[0].data)
        self.assertEqual(sorted(by_recipient(blocks)), ["default@example.com", "delay@example.com"])
        self.assertEqual({b["Action"] for b in blocks}, {"delayed"})

    @defer.inlineCallbacks
    def test_a_relay_downstream_gets_and_keeps_the_parameters(self):
        # Our own relay as the next hop: it offers DSN, so the first passes the requests on verbatim and
        # the second answers NOTIFY=SUCCESS with its "relayed" report, carrying the ORCPT and ENVID.
        self.start_sink()
        downstream = RelayFixture(self.mktemp(), extra=(
            f'[transports.sink]\nhost = "127.0.0.1"\nport = {self.sink_port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n'), permits='[[permit]]\nnetworks = ["127.0.0.1/32"]\n')
        downstream.start(reactor)
        self.addCleanup(downstream.stop)
        upstream = RelayFixture(self.mktemp(), extra=(
            f'[transports.next]\nhost = "127.0.0.1"\nport = {downstream.ports["relay"]}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "next"\n'))
        upstream.start(reactor)
        self.addCleanup(upstream.stop)
        code, _ = yield upstream.submit("relay", "app@example.org", ["far@example.com"], MESSAGE,
                                        mail_options=("ENVID=chain+2B1",),
                                        rcpt_options={"far@example.com": ["NOTIFY=SUCCESS",
                                                                          "ORCPT=rfc822;Far@example.com"]})
        self.assertEqual(code, 250)
        yield self.sink.wait_for(2)
        relayed = self.dsns()[0]
        _, per_message, blocks, _ = dsn_parts(relayed.data)
        self.assertEqual(per_message["Original-Envelope-Id"], "chain+1")
        self.assertEqual(per_message["Reporting-MTA"], "dns; relay.test")
        self.assertEqual((blocks[0]["Action"], blocks[0]["Original-Recipient"]), ("relayed", "rfc822;Far@example.com"))
        message = [m for m in self.sink.messages if m.mail_from][0]
        self.assertIn(b"Received: from relay.test", message.data)         # through both relays


class RestartEndToEnd(unittest.TestCase):
    """`twistd -n mailrelay`, killed with SIGKILL while the message waits for an unreachable next hop,
    started again: the DSN requests reach the hop as given.  In both `[delivery] process` modes."""
    timeout = 120

    def test_parameters_survive_a_restart_of_twistd(self):
        return self.restart(SEPARATE)        # the default: a delivery process

    def test_parameters_survive_a_restart_of_twistd_inline(self):
        return self.restart("inline")

    @defer.inlineCallbacks
    def restart(self, process):
        port = free_port()
        relay = RelayFixture(self.mktemp(), process=process, extra=(
            f'[transports.sink]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n[queue]\nfirst_retry = "1s"\n'))
        yield threads.deferToThread(relay.spawn)
        self.addCleanup(relay.kill)
        rcpts = {"a@example.com": ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;A+2Bb@example.com"],
                 "b@example.com": ["NOTIFY=NEVER"]}
        code, _ = yield relay.submit("relay", "app@example.org", list(rcpts), MESSAGE,
                                     mail_options=("RET=FULL", "ENVID=kept+2B1"), rcpt_options=rcpts)
        self.assertEqual(code, 250)
        yield task.deferLater(reactor, 1.0, lambda: None)       # a first attempt fails: nobody listens
        yield threads.deferToThread(relay.kill, signal.SIGKILL)
        sink = Sink(extensions=("DSN", "8BITMIME"))
        sink.start(reactor, port=port)
        self.addCleanup(sink.stop)
        yield threads.deferToThread(relay.spawn)
        yield sink.wait_for(1)
        arrived = sink.messages[0]
        self.assertEqual(dsn_params(arrived), ["RET=FULL", "ENVID=kept+2B1"])
        self.assertEqual(arrived.rcpt_params, rcpts)
