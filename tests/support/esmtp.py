# -*- test-case-name: tests.test_delivery_client, tests.test_connection_cache, tests.test_duplicate_window -*-
"""The outgoing ESMTP client (outbound.client.DeliveryClient) in conversation with a test: `Conversation`
puts it on a StringTransport that can start TLS (`TLSStringTransport`) with a task.Clock; the test feeds the
server's lines and reads the client's.  `message()` is the spooled message it sends (BODY: dots to stuff);
`Certificates` a self-signed server certificate and its CA file for real TLS to a sink; `FAST` short
timeouts for deliveries over loopback.
"""
from __future__ import annotations

from twisted.internet import error, ssl, task
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import directlyProvides

from mailrelay.outbound.client import DeliveryClient
from mailrelay.queue.job import SessionParams, Timeouts
from mailrelay.envelope import Envelope
from mailrelay.tls import generate_self_signed
from tests.support.conversation import FakeMessage


BODY = b"Subject: test\r\n\r\nHello.\r\n.\r\n..two dots\r\n.\r\nbye\r\n"


def message(body: bytes = BODY, sender: str = "app@example.org", recipients=("a@example.net",),
            eight_bit: bool = False, octets=None) -> FakeMessage:
    envelope = Envelope(sender, tuple(recipients), 0.0, body="8BITMIME" if eight_bit else "7BIT", octets=octets)
    return FakeMessage("Q1", envelope, body)


class TLSStringTransport(StringTransport):
    """Can start TLS; with implicit TLS it provides ISSLTransport, an ITCPTransport: hence setTcpNoDelay."""
    tls_started_with = None
    tcp_no_delay = False

    def startTLS(self, options):
        self.tls_started_with = options

    def setTcpNoDelay(self, enabled):
        self.tcp_no_delay = bool(enabled)


class Conversation:
    """A DeliveryClient on a StringTransport: feed server lines, read client lines."""

    def __init__(self, test, jobs, implicit_tls=False, **params):
        params.setdefault("helo", "relay.test")
        params.setdefault("remote_host", "mx.test")
        params.setdefault("security", "none")
        self.clock = task.Clock()
        self.transport = TLSStringTransport()
        if implicit_tls:
            directlyProvides(self.transport, ISSLTransport)
        self.client = DeliveryClient(SessionParams(**params), jobs, self.clock)
        self.client.makeConnection(self.transport)
        self.test = test

    def server(self, *lines: str) -> None:
        self.client.dataReceived(b"".join(line.encode() + b"\r\n" for line in lines))

    def sent(self) -> list[bytes]:
        lines = self.transport.value().split(b"\r\n")
        self.transport.clear()
        return lines[:-1]

    def expect(self, *lines: str) -> None:
        self.test.assertEqual(self.sent(), [line.encode() for line in lines])

    def stream_body(self) -> bytes:
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        data = self.transport.value()
        self.transport.clear()
        return data

    def close(self):
        """The connection ends (as the transport would report it); returns the SessionResult."""
        self.client.connectionLost(Failure(error.ConnectionDone()))
        return self.test.successResultOf(self.client.finished)

    def greet(self, *extensions: str) -> None:
        self.server("220 mx.test ESMTP")
        self.expect("EHLO relay.test")
        lines = ["mx.test", *extensions]
        self.server(*[f"250-{line}" for line in lines[:-1]], f"250 {lines[-1]}")


class Certificates:
    def __init__(self, hostname: str):
        cert_pem, key_pem = generate_self_signed(hostname)
        self.cert_pem = cert_pem
        self.server_options = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem).options()

    def ca_file(self, test) -> str:
        path = test.mktemp()
        with open(path, "wb") as f:
            f.write(self.cert_pem)
        return path


FAST = Timeouts(connect=5, reply=5, data_end=5)
