# -*- test-case-name: tests.test_proxy_protocol -*-
"""A listener behind a load balancer: the PROXY protocol header (v1 or v2) read before anything else.

Its job in the message's journey: the layer between the socket and the listener's own factory
(RelayServerFactory, or for implicit TLS the TLSMemoryBIOFactory around it), on a `[[listen]]` with
`proxy_protocol = true`.  In: a new TCP connection.  Out: either the connection closed at once — its peer
is outside `trusted_proxies`, its header is malformed or over the size bound, or no whole header came
within HEADER_TIMEOUT seconds — with one log line and a count in the metrics; or the listener's own
protocol connected to this wrapper as its transport, whose getPeer() is the client the header names, so
every rule, limit, Received field, log line and metric sees the real client.

Order (HAProxy's proxy-protocol.txt section 2: the header comes first, before any protocol byte): the
inner protocol is built and connected only once the header is whole, so no 220 banner is sent and, on
port 465, no TLS handshake starts before it; bytes after the header in the same read go to the inner
protocol.  STARTTLS later works as on a plain listener: the wrapper relays startTLS to the socket.
A v1 UNKNOWN, v2 LOCAL or v2 UNSPEC header leaves the real peer (the proxy) as the client.
"""
from __future__ import annotations

import ipaddress
from typing import Optional, Sequence

from twisted.internet import interfaces
from twisted.internet.protocol import connectionDone
from twisted.protocols import policies
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from mailrelay.config import IPNetwork
from mailrelay.logger import Logger
from mailrelay.server.proxyheader import ProxyHeader, ProxyHeaderError, parse
from mailrelay.server.session import unmapped_ip

# Seconds a trusted proxy has to send the whole header: proxy-protocol.txt section 2 allows a short
# timeout of at least 3 s (a TCP retransmit); HAProxy sends the header at once.
HEADER_TIMEOUT = 5.0

log = Logger(namespace="mailrelay.server.proxylistener")


@implementer(interfaces.IHandshakeListener)
class ProxyHeaderReader(policies.ProtocolWrapper):
    """One connection: the header first, then the listener's protocol, with this as its transport.
    STARTTLS puts the socket's TLS layer around this wrapper, so the end of the handshake is told here
    and passed on."""

    transport: interfaces.ITCPTransport       # the accepted connection from the proxy (makeConnection)
    factory: ProxyProtocolFactory
    # None until the header is read (and again once the connection is lost); ProtocolWrapper's own
    # type says it is always set, as it connects the inner protocol at once.
    wrappedProtocol: Optional[interfaces.IProtocol]  # type: ignore[assignment]

    def __init__(self, factory: "ProxyProtocolFactory"):
        super().__init__(factory, None)  # type: ignore[arg-type]  # no inner protocol yet (see above)
        self._buffer = b""
        self._header: Optional[ProxyHeader] = None
        self._timer = None
        self._refused = False
        self._ip = ""

    def logPrefix(self) -> str:
        return "PROXY"

    def makeConnection(self, transport) -> None:
        # The inner protocol is connected later, in _header_received: not here as ProtocolWrapper does.
        directlyProvides(self, providedBy(transport))
        policies.Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None)
        self._ip = unmapped_ip(str(host)) if host is not None else str(peer)
        if not self.factory.trusts(self._ip):
            self._refuse("untrusted", "not in trusted_proxies")
            return
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    # -- the header --------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._header is not None:
            if self.wrappedProtocol is not None:
                self.wrappedProtocol.dataReceived(data)
            return
        if self._refused:
            return
        self._buffer += data
        try:
            header = parse(self._buffer)
        except ProxyHeaderError as e:
            self._refuse("invalid", f"bad PROXY header: {e}")
            return
        if header is not None:
            self._header_received(header)

    def _header_received(self, header: ProxyHeader) -> None:
        self._cancel_timer()
        rest, self._buffer = self._buffer[header.length:], b""
        self._header = header
        inner = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if inner is None:
            self.transport.abortConnection()
            return
        self.wrappedProtocol = inner
        inner.makeConnection(self)
        if rest and not self.disconnecting and self.wrappedProtocol is not None:
            inner.dataReceived(rest)

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse("timeout", f"no whole PROXY header within {self.factory.timeout:g}s")

    def _refuse(self, reason: str, why: str) -> None:
        """Close at once, before any byte of ours: one log line, one count."""
        self._refused = True
        self._cancel_timer()
        self._buffer = b""
        log.info("PROXY protocol: connection from {ip} on {listener} closed: {why}", ip=self._ip,
                 listener=self.factory.name, why=why)
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.proxy_refused(reason)
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- the transport the inner protocol sees -----------------------------------------------------

    def getPeer(self) -> interfaces.IAddress:
        """The client the header names; the real peer before the header, or when it names none."""
        if self._header is not None and self._header.source is not None:
            return self._header.source
        return self.transport.getPeer()

    def getHost(self) -> interfaces.IAddress:
        """The address the client connected to (at the proxy), when the header names it."""
        if self._header is not None and self._header.destination is not None:
            return self._header.destination
        return self.transport.getHost()

    def handshakeCompleted(self) -> None:
        if interfaces.IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        if not self._refused and self._header is None and self._buffer:
            log.info("PROXY protocol: connection from {ip} on {listener} closed by the peer inside the "
                     "header", ip=self._ip, listener=self.factory.name)
        self.factory.unregisterProtocol(self)
        inner, self.wrappedProtocol = self.wrappedProtocol, None
        if inner is not None:
            inner.connectionLost(reason)


class ProxyProtocolFactory(policies.WrappingFactory[ProxyHeaderReader]):
    """Puts the PROXY protocol in front of `wrappedFactory` (the listener's own factory)."""

    protocol = ProxyHeaderReader
    noisy = False

    def __init__(self, wrappedFactory, trusted: Sequence[IPNetwork], *, name: str, clock=None,
                 metrics=None, timeout: float = HEADER_TIMEOUT):
        """`trusted`: the networks proxies may connect from (`trusted_proxies`); `name`: the listener in
        log lines ("listen[0]"); `clock`: for the header timeout; `metrics`: mailrelay.metrics.Metrics."""
        super().__init__(wrappedFactory)
        if clock is None:
            from twisted.internet import reactor as clock
        self.trusted = tuple(trusted)
        self.name, self.clock, self.metrics, self.timeout = name, clock, metrics, timeout

    def trusts(self, ip: str) -> bool:
        """True when `ip` (text, unmapped) is inside `trusted_proxies`; never for a non-IP peer."""
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        return any(address in network for network in self.trusted)

    def buildProtocol(self, addr) -> ProxyHeaderReader:
        return self.protocol(self)
