# -*- test-case-name: tests.test_server_session, tests.test_limits, tests.test_server_bdat -*-
"""A RelaySession on a StringTransport with task.Clock, for conversation tests: `Harness` builds the
factory (a relay listener with fakes behind it by default), `Harness.connect` gives a `Client` that sends raw
lines and returns the server's replies; `login` (AUTH PLAIN over a faked TLS) and `transaction` (one message
from MAIL to the final dot) are the usual first steps.
"""
from __future__ import annotations

import base64

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from zope.interface import alsoProvides

from mailrelay import config
from mailrelay.server.factory import RelayServerFactory
from tests.support.fakes import AllowAllPolicy, FakeQueue, TLSStringTransport


TLS_OPTIONS = object()        # startTLS is faked by TLSStringTransport: any non-None options will do


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Harness:
    """One factory (relay listener by default) and helpers to open conversations on it."""

    def __init__(self, kind="relay", require_tls=False, portal=None, limits=None, policy=None,
                 queue=None, tls_options=TLS_OPTIONS, mechanisms=("PLAIN", "LOGIN")):
        self.clock = Clock()
        self.policy = policy or AllowAllPolicy()
        self.queue = queue or FakeQueue()
        self.factory = RelayServerFactory(
            hostname="relay.test", listener=config.Listener(kind, "tcp:0", require_tls),
            limits=limits or config.Limits(), portal=portal, mechanisms=mechanisms,
            policy=self.policy, queue=self.queue, tls_options=tls_options, clock=self.clock,
        )

    def connect(self, peer="127.0.0.1", tls=False) -> "Client":
        address = IPv6Address("TCP", peer, 40000) if ":" in peer else IPv4Address("TCP", peer, 40000)
        transport = TLSStringTransport(peerAddress=address)
        if tls:
            alsoProvides(transport, ISSLTransport)
        protocol = self.factory.buildProtocol(address)
        protocol.makeConnection(transport)
        return Client(protocol, transport)


class Client:
    def __init__(self, protocol, transport):
        self.protocol, self.transport = protocol, transport
        self.greeting = transport.value().decode()
        transport.clear()

    def send(self, data: bytes | str) -> str:
        """Send raw bytes (no CRLF added) and return everything the server wrote in reply."""
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.transport.clear()
        self.protocol.dataReceived(data)
        return self.transport.value().decode("latin-1")

    def cmd(self, line: str) -> str:
        return self.send(line + "\r\n")

    def codes(self, data: bytes | str) -> list[str]:
        """The reply codes + enhanced codes of every reply line, e.g. ["250 2.1.0"]."""
        return [" ".join(line.split(" ")[:2]) for line in self.send(data).splitlines()]

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def ehlo_tls(self):
        self.cmd("EHLO client.test")
        self.cmd("STARTTLS")


def login(harness: Harness, user="alice", password="s3cret", **kwargs) -> Client:
    client = harness.connect(tls=True, **kwargs)
    client.cmd("EHLO client.test")
    assert client.cmd("AUTH PLAIN " + b64(b"\0%s\0%s" % (user.encode(), password.encode()))).startswith("235 ")
    return client


def transaction(client: Client, body: bytes = b"Subject: hi\r\n\r\nHello\r\n") -> str:
    client.cmd("MAIL FROM:<a@example.org>")
    client.cmd("RCPT TO:<b@example.org>")
    client.cmd("DATA")
    return client.send(body + b".\r\n")
