"""An outgoing client (outbound.client and its subclasses) on a StringTransport, for conversation tests:
feed server lines, read what the client wrote, time on a task.Clock.  Plus the spooled-message contract
as a small in-memory value (`FakeMessage`).

    talk = Conversation(self, LMTPClient, [Job(message(), ("a@example.net",))])
    talk.server("220 lmtp.test LMTP")
    talk.expect("LHLO relay.test")
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from twisted.internet import error, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.queue.job import SessionParams
from mailrelay.envelope import Envelope
from mailrelay.interfaces import ISpooledMessage


@implementer(ISpooledMessage)
@dataclass(frozen=True)
class FakeMessage:
    """The spooled-message contract: queue_id, envelope, size, open() at the first message byte."""
    queue_id: str
    envelope: Envelope
    body: bytes
    path = None           # not read from a spool file

    @property
    def size(self) -> int:
        return len(self.body)

    def open(self):
        return io.BytesIO(self.body)


def message(body: bytes = b"Subject: test\r\n\r\nHello.\r\n", sender: str = "app@example.org",
            recipients=("a@example.net",), eight_bit: bool = False, octets=None) -> FakeMessage:
    envelope = Envelope(sender, tuple(recipients), 0.0, body="8BITMIME" if eight_bit else "7BIT", octets=octets)
    return FakeMessage("Q1", envelope, body)


class Conversation:
    def __init__(self, test, client_class, jobs, **params):
        params.setdefault("helo", "relay.test")
        params.setdefault("remote_host", "mx.test")
        params.setdefault("security", "none")
        self.clock = task.Clock()
        self.transport = StringTransport()
        self.client = client_class(SessionParams(**params), jobs, self.clock)
        self.client.makeConnection(self.transport)
        self.test = test

    def server(self, *lines: str) -> None:
        self.client.dataReceived(b"".join(line.encode() + b"\r\n" for line in lines))

    def raw(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def sent(self) -> list[bytes]:
        return self.raw().split(b"\r\n")[:-1]

    def expect(self, *lines: str) -> None:
        self.test.assertEqual(self.sent(), [line.encode() for line in lines])

    def stream_body(self) -> bytes:
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        return self.raw()

    def close(self):
        """The connection ends (as the transport would report it); returns the SessionResult."""
        self.client.connectionLost(Failure(error.ConnectionDone()))
        return self.test.successResultOf(self.client.finished)

    def greet(self, verb: str, *extensions: str) -> None:
        self.server("220 mx.test ready")
        self.expect(f"{verb} relay.test")
        lines = ["mx.test", *extensions]
        self.server(*[f"250-{line}" for line in lines[:-1]], f"250 {lines[-1]}")
