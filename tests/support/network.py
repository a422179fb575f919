# -*- test-case-name: tests.test_server_network, tests.test_limits_end_to_end -*-
"""RelayServerFactory on a real loopback socket with real TLS (a self-signed certificate for HOSTNAME).

`NetworkTestBase.listen` starts a listener whose sessions are `TrackedSession`s (each fires `lost` when its
connection is gone, so cleanup waits for every one); `connect` opens an `SMTPTestClient`, a deliberately
dumb client that sends raw bytes and reads whole replies.
"""
from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, protocol, reactor, ssl
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from mailrelay import config
from mailrelay.server.factory import RelayServerFactory
from mailrelay.server.session import RelaySession
from mailrelay.tls import generate_self_signed, server_options
from tests.support.fakes import AllowAllPolicy, FakeQueue


HOSTNAME = "relay.test"


class TrackedSession(RelaySession):
    """Fires `lost` when the server side of the connection is gone, so tests can clean up fully."""

    def __init__(self, factory):
        super().__init__(factory)
        self.lost = defer.Deferred()
        factory.sessions.append(self)

    def connectionLost(self, reason=None):
        super().connectionLost(reason)
        self.lost.callback(None)


class SMTPTestClient(protocol.Protocol):
    """A deliberately dumb client: sends raw bytes, reads whole replies (multi-line joined)."""

    def __init__(self):
        self.buffer = b""
        self.replies: list[str] = []
        self.waiting: list[defer.Deferred] = []
        self.connected_d = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.connected_d.callback(self)

    def dataReceived(self, data):
        self.buffer += data
        while b"\r\n" in self.buffer:
            end = 0
            lines = []
            while True:
                nl = self.buffer.find(b"\r\n", end)
                if nl < 0:
                    return
                line = self.buffer[end:nl].decode("latin-1")
                lines.append(line)
                end = nl + 2
                if line[3:4] != "-":
                    break
            self.buffer = self.buffer[end:]
            self.replies.append("\n".join(lines))
            self._deliver()

    def _deliver(self):
        while self.waiting and self.replies:
            self.waiting.pop(0).callback(self.replies.pop(0))

    def reply(self) -> defer.Deferred:
        d = defer.Deferred()
        self.waiting.append(d)
        self._deliver()
        return d

    def send(self, data: bytes | str) -> defer.Deferred:
        self.transport.write(data.encode() if isinstance(data, str) else data)
        return self.reply()

    def connectionLost(self, reason):
        self.lost.callback(None)


class NetworkTestBase(unittest.TestCase):
    def setUp(self):
        cert_pem, key_pem = generate_self_signed(HOSTNAME)
        pem = Path(self.mktemp())
        pem.write_bytes(cert_pem + key_pem)
        self.server_tls = server_options(pem)
        self.client_tls = ssl.optionsForClientTLS(HOSTNAME, trustRoot=ssl.Certificate.loadPEM(cert_pem))
        self.queue, self.policy = FakeQueue(), AllowAllPolicy()

    def listen(self, kind="relay", implicit_tls=False, portal=None, limits=None):
        factory = RelayServerFactory(
            hostname=HOSTNAME, listener=config.Listener(kind, "tcp:0"), limits=limits or config.Limits(),
            portal=portal, mechanisms=("PLAIN", "LOGIN"), policy=self.policy, queue=self.queue,
            tls_options=None if implicit_tls else self.server_tls,
        )
        factory.protocol = TrackedSession
        factory.sessions = []
        listening = TLSMemoryBIOFactory(self.server_tls, False, factory) if implicit_tls else factory
        # A burst of 400 connects overflows the default accept backlog (50): the kernel then drops
        # handshakes and the test would measure TCP retransmission, not the server.
        port = reactor.listenTCP(0, listening, backlog=1024, interface="127.0.0.1")
        self.addCleanup(self._stop, port, factory)
        self.port_number = port.getHost().port
        return factory

    @defer.inlineCallbacks
    def _stop(self, port, factory):
        yield port.stopListening()
        yield defer.gatherResults([s.lost for s in factory.sessions])

    @defer.inlineCallbacks
    def connect(self, implicit_tls=False):
        """Connect a new SMTPTestClient; returns (client, greeting)."""
        client = SMTPTestClient()
        factory = protocol.ClientFactory.forProtocol(lambda: client)
        if implicit_tls:
            factory = TLSMemoryBIOFactory(self.client_tls, True, factory)
        reactor.connectTCP("127.0.0.1", self.port_number, factory)
        yield client.connected_d
        self.addCleanup(self._close_client, client)
        greeting = yield client.reply()
        return client, greeting

    def _close_client(self, client):
        if client.transport is not None and client.transport.connected:
            client.transport.loseConnection()
        return client.lost
