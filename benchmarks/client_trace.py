"""Which of Twisted's own methods the outgoing SMTP client (mailrelay.outbound.client.DeliveryClient)
still calls: what a Twisted base class does for it.

Where it sits: outside the message's journey, driving its last SMTP stage (the delivery client) alone
over twisted.internet.testing.StringTransport and a task.Clock, with the server's replies scripted.
The sessions: a pipelined one with two messages and a refused recipient; STARTTLS, then AUTH PLAIN,
then the handshake completing; a server without EHLO (HELO); an over-long reply line; a reply timeout;
a connection lost in the middle of a session.  Every function defined in twisted.mail.smtp,
twisted.protocols.basic, twisted.protocols.policies or twisted.internet.protocol that runs with the
client as `self` is counted (sys.setprofile): a count, not a time, the same on any machine.

Measured before the client left twisted.mail.smtp.ESMTPClient (the same count taken over the client's
test modules — test_delivery_client, test_tls_policy, test_connection_cache, test_dane,
test_mtasts_delivery, test_oauth2, test_lmtp, test_chunking — 217 tests, 174 clients): of smtp.py only
ESMTPClient.__init__ and SMTPClient.__init__ (174 each: setting identity, resp and a transcript the
client never used) and ESMTPClient.__getattr__ (2: an AttributeError for a missing attribute) ran;
everything else was LineReceiver (dataReceived, clearLineBuffer), TimeoutMixin (setTimeout,
resetTimeout, the timer firing) and Protocol (makeConnection, logPrefix).

    .venv/bin/python benchmarks/client_trace.py
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twisted.internet import error, task  # noqa: E402
from twisted.internet.interfaces import ISSLTransport  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402
from zope.interface import directlyProvides, providedBy  # noqa: E402

from mailrelay.outbound.client import DeliveryClient  # noqa: E402
from mailrelay.queue.job import Job, SessionParams, Timeouts  # noqa: E402
from tests.support.conversation import message  # noqa: E402

WATCHED = ("twisted/mail/smtp.py", "twisted/protocols/basic.py", "twisted/protocols/policies.py",
           "twisted/internet/protocol.py")
BODY = b"Subject: trace\r\n\r\n.a line with a dot\r\nbye\r\n"


class TLSStringTransport(StringTransport):
    """A StringTransport that can start TLS (nothing is encrypted: the client is told it happened)."""

    def startTLS(self, options) -> None:
        directlyProvides(self, providedBy(self), ISSLTransport)


def _client(clock: task.Clock, jobs: list[Job], **params) -> tuple[DeliveryClient, StringTransport]:
    params.setdefault("security", "none")
    client = DeliveryClient(SessionParams("relay.test", "mx.test", timeouts=Timeouts(5, 5, 5), **params), jobs, clock)
    transport = TLSStringTransport()
    client.makeConnection(transport)
    return client, transport


def _feed(client: DeliveryClient, *lines: str) -> None:
    client.dataReceived(b"".join(line.encode() + b"\r\n" for line in lines))


def _body(transport: StringTransport) -> None:
    while transport.producer is not None:
        transport.producer.resumeProducing()


def sessions() -> list[bytes]:
    """Run the scripted sessions; returns what each client wrote, for the caller to check."""
    clock = task.Clock()
    written = []
    jobs = [Job(message(BODY, recipients=("a@example.net", "b@example.net")), ("a@example.net", "b@example.net")),
            Job(message(BODY), ("a@example.net",))]
    client, transport = _client(clock, jobs)
    _feed(client, "220 mx.test ESMTP", "250-mx.test", "250 PIPELINING")
    _feed(client, "250 ok", "250 ok", "550 5.1.1 no such user", "354 go on")
    _body(transport)
    _feed(client, "250 queued", "250 ok", "250 ok", "354 go on")
    _body(transport)
    _feed(client, "250 queued", "221 bye")
    client.connectionLost(Failure(error.ConnectionDone()))
    written.append(transport.value())

    client, transport = _client(clock, [Job(message(BODY), ("a@example.net",))], security="starttls",
                                tls_options=object(), username="user", password=b"secret")
    _feed(client, "220 mx.test ESMTP", "250-mx.test", "250 STARTTLS", "220 go ahead")
    client.handshakeCompleted()
    _feed(client, "250-mx.test", "250 AUTH PLAIN", "235 ok", "250 ok", "250 ok", "354 go on")
    _body(transport)
    _feed(client, "250 queued", "221 bye")
    client.connectionLost(Failure(error.ConnectionDone()))
    written.append(transport.value())

    for script in (("220 old.test", "502 no EHLO", "250 hello", "250 ok", "250 ok", "354 go on"),
                   ("220 mx.test ESMTP", "250-mx.test", "250-" + "x" * 5000),
                   ("220 mx.test ESMTP",)):
        client, transport = _client(clock, [Job(message(BODY), ("a@example.net",))])
        _feed(client, *script)
        clock.advance(6)          # the reply timer fires where a reply is awaited
        client.connectionLost(Failure(error.ConnectionLost()))
        written.append(transport.value())
    return written


def trace() -> list[tuple[str, int]]:
    """(Twisted function, calls) run with a DeliveryClient as `self` during `sessions()`."""
    calls: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.endswith(WATCHED):
            return
        if isinstance(frame.f_locals.get("self"), DeliveryClient):
            calls[f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_qualname}"] += 1

    sys.setprofile(profile)
    try:
        written = sessions()
    finally:
        sys.setprofile(None)
    assert written[0].count(b"\r\n.\r\n") == 2 and b"QUIT" in written[0], written[0]
    assert b"AUTH PLAIN" in written[1] and written[1].count(b"EHLO") == 2, written[1]
    assert b"HELO relay.test" in written[2], written[2]
    return sorted(calls.items())


def main() -> int:
    print("bases: " + ", ".join(f"{c.__module__}.{c.__qualname__}" for c in DeliveryClient.__mro__[1:]))
    for name, count in trace():
        print(f"trace:    {count:6d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
