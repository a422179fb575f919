# -*- test-case-name: tests.test_access_end_to_end, tests.test_ldap_end_to_end, tests.test_limits_end_to_end -*-
"""Real SMTP clients against the whole relay in front of a real sink, for the access-control tests.

`RelayTestCase` starts a sink and relays (`start_relay(permits)`) routed to it, and waits for what reached
it (`settle`); `Client` is a blocking smtplib client bound to ALLOWED_HOST or FOREIGN_HOST (run it in a
thread) that sends raw commands and sees every reply, `status` the (code, enhanced status) of a reply.
NETWORK_ONLY and USERS_ONLY are the `[[permit]]` rules most tests use; `submit` logs in on 587 and sends
one `message`.
"""
from __future__ import annotations

import base64
import smtplib

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from tests.support.polling import until
from tests.support.relay import RelayFixture
from tests.support.sink import Sink


ALLOWED_HOST = "127.0.0.2"
FOREIGN_HOST = "127.0.0.3"
SENDER = "app@example.org"
RECIPIENT_RULES = 'recipients = ["allowed.example", "*.corp.example", "b\u00fccher.example"]\n'
SENDER_RULES = 'senders = ["example.org", "*.example.org"]\n'
NETWORK_ONLY = f'[[permit]]\nnetworks = ["{ALLOWED_HOST}/32"]\n' + SENDER_RULES + RECIPIENT_RULES
USERS_ONLY = '[[permit]]\nusers = ["*"]\n' + SENDER_RULES + RECIPIENT_RULES


def message(sender: str = SENDER, subject: str = "hello") -> bytes:
    return (f"From: <{sender}>\r\nTo: <user@allowed.example>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.org>\r\n\r\nbody\r\n").encode("ascii")


class Client:
    """A real SMTP client (smtplib, blocking: run it in a thread) on a socket bound to `source`, with
    raw commands so that the exact path text reaches the relay and every reply is seen."""

    def __init__(self, relay: RelayFixture, kind: str = "relay", source: str = ALLOWED_HOST):
        self.relay = relay
        address = (source, 0)
        port = relay.ports[kind]
        if kind == "submissions":
            self.smtp = smtplib.SMTP_SSL("127.0.0.1", port, context=relay.tls_context(), timeout=30,
                                         source_address=address)
        else:
            self.smtp = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=address)
        self.smtp.command_encoding = "utf-8"    # lets a raw UTF-8 address reach the relay
        self.ehlo()

    def ehlo(self) -> None:
        code, _ = self.smtp.ehlo("client.test")
        assert code == 250, code

    def starttls(self) -> None:
        self.smtp.starttls(context=self.relay.tls_context())
        self.ehlo()

    def login(self, user: str, password: str) -> tuple[int, bytes]:
        """One AUTH PLAIN with an initial response (smtplib's login() would try LOGIN after a failure)."""
        blob = base64.b64encode(f"\0{user}\0{password}".encode("utf-8")).decode("ascii")
        return self.smtp.docmd("AUTH", "PLAIN " + blob)

    def cmd(self, line: str) -> tuple[int, bytes]:
        return self.smtp.docmd(line)

    def mail(self, sender: str) -> tuple[int, bytes]:
        return self.cmd(f"MAIL FROM:<{sender}>")

    def rcpt(self, recipient: str) -> tuple[int, bytes]:
        return self.cmd(f"RCPT TO:<{recipient}>")

    def data(self, content: bytes) -> tuple[int, bytes]:
        """DATA and the content (dot-stuffed) when the relay says 354; otherwise DATA's own reply."""
        code, text = self.cmd("DATA")
        if code != 354:
            return code, text
        stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in content.split(b"\r\n"))
        self.smtp.send(stuffed + (b"" if stuffed.endswith(b"\r\n") else b"\r\n") + b".\r\n")
        return self.smtp.getreply()

    def quit(self) -> None:
        try:
            self.smtp.quit()
        except smtplib.SMTPServerDisconnected:
            self.smtp.close()


def status(reply: tuple[int, bytes]) -> tuple[int, str]:
    """(code, enhanced status code) of a reply."""
    code, text = reply
    return code, text.split(b" ", 1)[0].decode("ascii")


class RelayTestCase(unittest.TestCase):
    """A sink on loopback and relays routed to it; helpers to run clients and to watch the sink."""

    timeout = 60

    def setUp(self):
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)

    def start_relay(self, permits: str, extra: str = "", top: str = "") -> RelayFixture:
        extra = (f'[transports.sink]\nhost = "127.0.0.1"\nport = {self.sink_port}\nsecurity = "none"\n\n'
                 f'[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n[queue]\nfirst_retry = "1s"\n\n'
                 + extra)
        relay = RelayFixture(self.mktemp(), extra=extra, permits=permits, top=top)
        relay.start(reactor)
        self.addCleanup(relay.stop)
        return relay

    def run_client(self, function, *args):
        """Run a blocking client function in a thread; its result (or exception) comes back here."""
        return threads.deferToThread(function, *args)

    def delivered(self) -> list[str]:
        return sorted(r for m in self.sink.messages for r in m.rcpt_tos)

    @defer.inlineCallbacks
    def settle(self, relay: RelayFixture, expected: list[str]):
        """Wait until the sink holds `expected` recipients and the relay's queue is empty, then assert
        that the sink received exactly those: an empty queue means nothing else can still arrive."""
        queue = relay.dir / "spool" / "queue"
        try:
            yield until(lambda: len(self.delivered()) >= len(expected) and not any(queue.iterdir()),
                        "the sink to hold every expected recipient and the queue to empty", timeout=20)
        except self.failureException:
            pass                     # the assertions below say what is missing
        self.assertEqual(self.delivered(), sorted(expected))
        self.assertEqual(list(queue.iterdir()), [])


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode("utf-8")).decode("ascii")


def auth_login(client: Client, user: str, password: str) -> tuple[int, bytes]:
    """AUTH LOGIN, step by step (RFC 4954 §4: "=" would be an empty response)."""
    code, text = client.cmd("AUTH LOGIN")
    if code != 334:
        return code, text
    code, text = client.cmd(base64.b64encode(user.encode("utf-8")).decode("ascii"))
    if code != 334:
        return code, text
    return client.cmd(base64.b64encode(password.encode("utf-8")).decode("ascii") or "=")


def submit(relay, user: str, password: str, mechanism: str = "PLAIN", subject: str = "hello"):
    """Blocking: log in on 587 after STARTTLS, then try to send one message.  Returns the replies as
    (code, status): [AUTH, MAIL, RCPT, DATA], or [AUTH, MAIL] when MAIL is refused."""
    client = Client(relay, "submission", FOREIGN_HOST)
    client.starttls()
    if mechanism == "PLAIN":
        reply = client.cmd("AUTH PLAIN " + plain(user, password))
    else:
        reply = auth_login(client, user, password)
    replies = [status(reply)]
    replies.append(status(client.mail(f"{user}@example.org")))
    if replies[-1][0] == 250:
        replies += [status(client.rcpt(f"{subject}@allowed.example")),
                    status(client.data(message(sender=f"{user}@example.org", subject=subject)))]
    client.quit()
    return replies
