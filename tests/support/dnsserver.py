"""A real, authoritative DNS server on a loopback address, for tests that resolve names.

Job: stand in for "the DNS" in any test that needs it (MX routing, DKIM TXT keys, DANE TLSA records),
over real UDP and TCP sockets on one OS-chosen port, so the code under test runs its real resolver
(dnspython) end to end.  In: a dict of records per (name, type), in zone-file text form, plus names
scripted to fail.  Out: DNS answers (RFC 1035 §4, TCP framing §4.2.2), with the TC bit when a UDP
answer does not fit (RFC 1035 §4.1.1, RFC 6891 §6.2.5 for the EDNS payload size).

    server = DNSServer({
        ("example.org", "MX"): ["10 mx1.example.org.", "20 mx2.example.org."],
        ("mx1.example.org", "A"): ["127.0.0.2"],
        ("sel._domainkey.example.org", "TXT"): ["v=DKIM1; k=ed25519; p=..."],   # split at 255 octets
        ("_25._tcp.mx1.example.org", "TLSA"): ["3 1 1 0123abcd..."],
    }, servfail={"broken.example"}, nxdomain={"gone.example"}, silent={"slow.example"})
    port = server.start(reactor)          # nameserver is ("127.0.0.1", port)
    self.addCleanup(server.stop)

Names are case-insensitive, with or without the trailing dot.  A name with no records at all (and no
records below it) answers NXDOMAIN; a name with records of other types answers NOERROR with no data.
A CNAME is followed within the zone.  A negative answer (NXDOMAIN or no data) carries the SOA of the
closest enclosing name that has one, in the authority section (RFC 2308 section 3: its TTL and
MINIMUM are the negative-caching TTL); without an SOA record it carries none.  With
`authenticated_data=True` every answer has the AD bit, as a validating resolver's would, except answers
about the names in `insecure` (a zone that is not signed).  `records` may be changed
between queries.  `queries` lists every question asked, as (name, type, "udp"|"tcp").  The records of
one set come in random order in each answer, as servers may send them; `shuffle=False` keeps the zone's.
"""
from __future__ import annotations

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.TXT import TXT
from twisted.internet import defer, protocol
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver

_log = Logger(namespace="tests.dnsserver")

_MAX_CNAME_CHAIN = 8


def _key(name: str) -> str:
    return str(name).lower().rstrip(".")


def _txt_rdata(value: str | bytes) -> dns.rdata.Rdata:
    """A TXT record from raw text, split into <=255-octet strings (RFC 1035 §3.3.14, RFC 6376 §3.6.2.2)."""
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    chunks = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
    return TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)


def make_rdata(rtype: str, value) -> dns.rdata.Rdata:
    """One record's data from zone-file text ("10 mx.example.org."), raw TXT text, or an Rdata."""
    if isinstance(value, dns.rdata.Rdata):
        return value
    rdtype = dns.rdatatype.from_text(rtype)
    if rdtype == dns.rdatatype.TXT and not (isinstance(value, str) and value.startswith('"')):
        return _txt_rdata(value)
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, value, origin=dns.name.root, relativize=False)


class _UDPServer(protocol.DatagramProtocol):
    def __init__(self, server: "DNSServer"):
        self.server = server

    def datagramReceived(self, data, addr):
        reply = self.server.answer(data, "udp")
        if reply is not None:
            self.transport.write(reply, addr)


class _TCPServer(Int16StringReceiver):
    def connectionMade(self):
        self.closed = defer.Deferred()
        self.factory.connections.add(self)

    def connectionLost(self, reason):
        self.factory.connections.discard(self)
        self.closed.callback(None)

    def stringReceived(self, data):
        reply = self.factory.server.answer(data, "tcp")
        if reply is not None:
            self.sendString(reply)


class _TCPFactory(protocol.ServerFactory):
    protocol = _TCPServer

    def __init__(self, server: "DNSServer"):
        self.server = server
        self.connections: set[_TCPServer] = set()


class DNSServer:
    """An in-memory authoritative server: see the module docstring."""

    def __init__(
        self,
        records: dict | None = None,
        *,
        servfail=(),
        nxdomain=(),
        silent=(),
        ttl: int = 300,
        authenticated_data: bool = False,
        insecure=(),
        shuffle: bool = True,
    ):
        self.records: dict[tuple[str, str], list] = {}
        for (name, rtype), values in (records or {}).items():
            self.set(name, rtype, values)
        self.servfail = {_key(n) for n in servfail}       # answer SERVFAIL
        self.nxdomain = {_key(n) for n in nxdomain}       # answer NXDOMAIN even if records exist
        self.silent = {_key(n) for n in silent}           # never answer at all (a timeout)
        self.ttl = ttl
        self.authenticated_data = authenticated_data      # set the AD bit, as a validating resolver would
        self.insecure = {_key(n) for n in insecure}       # ... except in answers about these names
        self.shuffle = shuffle        # records of one set in random order per answer (as servers may); else as given
        self.queries: list[tuple[str, str, str]] = []
        self.host = "127.0.0.1"
        self.port = 0
        self._udp = None
        self._tcp = None
        self._tcp_factory = None

    # -- zone ---------------------------------------------------------------------------------------

    def set(self, name: str, rtype: str, values: list) -> None:
        """Replace the records of one (name, type)."""
        self.records[(_key(name), rtype.upper())] = list(values)

    def remove(self, name: str, rtype: str) -> None:
        self.records.pop((_key(name), rtype.upper()), None)

    def _exists(self, name: str) -> bool:
        suffix = "." + name
        return any(n == name or n.endswith(suffix) for n, _ in self.records)

    def _rrset(self, name: str, rtype: str):
        values = self.records.get((name, rtype))
        if not values:
            return None
        rdatas = [make_rdata(rtype, v) for v in values]
        return dns.rrset.from_rdata_list(dns.name.from_text(name), self.ttl, rdatas)

    def _resolve(self, response: dns.message.Message, name: str, rtype: str) -> None:
        for _ in range(_MAX_CNAME_CHAIN):
            if name in self.nxdomain:
                response.set_rcode(dns.rcode.NXDOMAIN)
                return self._negative(response, name)
            rrset = self._rrset(name, rtype)
            if rrset is not None:
                response.answer.append(rrset)
                return
            cname = self._rrset(name, "CNAME") if rtype != "CNAME" else None
            if cname is None:
                if not self._exists(name):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                return self._negative(response, name)
            response.answer.append(cname)
            name = _key(cname[0].target.to_text())

    def _negative(self, response: dns.message.Message, name: str) -> None:
        labels = name.split(".")
        for i in range(len(labels)):
            soa = self._rrset(".".join(labels[i:]), "SOA")
            if soa is not None:
                response.authority.append(soa)
                return

    # -- wire ---------------------------------------------------------------------------------------

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """The reply to one query message in wire format, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None          # not worth a FORMERR: a test server only hears our own resolver
        if len(query.question) != 1:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = _key(question.name.to_text())
        rtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rtype, transport))
        if name in self.silent:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.authenticated_data and name not in self.insecure:
            response.flags |= dns.flags.AD
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        try:
            self._resolve(response, name, rtype)
            return self._to_wire(query, response, transport)
        except Exception:
            # A bad record in a test's zone: logged (trial fails the test on it) and answered SERVFAIL.
            _log.failure("DNSServer cannot answer {name} {rtype}", name=name, rtype=rtype)
            failed = dns.message.make_response(query)
            failed.set_rcode(dns.rcode.SERVFAIL)
            return failed.to_wire()

    def _to_wire(self, query, response, transport: str) -> bytes:
        if transport == "tcp":
            return response.to_wire(want_shuffle=self.shuffle)
        limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit, want_shuffle=self.shuffle)
        except dns.exception.TooBig:
            # RFC 1035 §4.1.1: too big for UDP → an empty answer with TC set; the client retries on TCP.
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()

    # -- sockets ------------------------------------------------------------------------------------

    def start(self, reactor=None, interface: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on UDP and TCP on one OS-chosen port of `interface` (or on `port`); return the port."""
        if reactor is None:
            from twisted.internet import reactor
        self.host = interface
        self._tcp_factory = _TCPFactory(self)
        if port:
            self._udp = reactor.listenUDP(port, _UDPServer(self), interface=interface)
            self._tcp = reactor.listenTCP(port, self._tcp_factory, interface=interface)
            self.port = port
            return port
        for _ in range(20):
            udp = reactor.listenUDP(0, _UDPServer(self), interface=interface)
            port = udp.getHost().port
            try:
                self._tcp = reactor.listenTCP(port, self._tcp_factory, interface=interface)
            except CannotListenError:        # that TCP port is taken: pick another UDP port
                udp.stopListening()
                continue
            self._udp, self.port = udp, port
            return port
        raise CannotListenError(interface, 0, "no port free for both UDP and TCP")

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def stop(self) -> defer.Deferred:
        """Stop listening and drop open TCP connections; the Deferred fires when all is closed."""
        waits = []
        if self._tcp_factory is not None:
            for conn in list(self._tcp_factory.connections):
                waits.append(conn.closed)
                conn.transport.abortConnection()
        for port in (self._udp, self._tcp):
            if port is not None:
                waits.append(defer.maybeDeferred(port.stopListening))
        self._udp = self._tcp = None
        return defer.gatherResults(waits)
