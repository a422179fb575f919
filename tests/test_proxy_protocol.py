"""The PROXY protocol (HAProxy's proxy-protocol.txt) on a listener, over StringTransport and task.Clock.

The parser (mailrelay.server.proxyheader) on every header form and on what must be refused; the
listener wrapper (mailrelay.server.proxylistener) in front of a real RelayServerFactory: nothing is sent
before the header, the header's client is the one the session, its limits and its Received field see,
and an untrusted peer, a bad or oversize header, or a header that never comes closes the connection at
once with one log line.  The config keys (`proxy_protocol`, `trusted_proxies`) are checked here too;
tests/test_proxy_haproxy.py does it all over real sockets behind the real HAProxy.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from mailrelay import config
from mailrelay.cli.check import describe
from mailrelay.config import ConfigError, load
from mailrelay.metrics import Metrics
from mailrelay.server.factory import RelayServerFactory
from mailrelay.server.proxyheader import MAX_HEADER, V1_MAX, V2_SIGNATURE, ProxyHeaderError, parse
from mailrelay.server.proxylistener import HEADER_TIMEOUT, ProxyProtocolFactory
from tests.support.fakes import AllowAllPolicy, FakeQueue, TLSStringTransport
from tests.support.logcapture import LogLines

PROXY = "127.0.0.1"            # the load balancer, as the socket sees it
V1_TCP4 = b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 25\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 25\r\n"
# proxy-protocol.txt 2.1's worst case: 107 octets with the CRLF.
V1_LONGEST = (b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
              b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")


def v2(command: int = 1, family: int = 0x11, block: bytes | None = None, tlvs: bytes = b"",
       version: int = 2) -> bytes:
    """A v2 header: signature, version/command, family/protocol, length, address block, TLVs."""
    if block is None:
        if family == 0x21:
            block = (ipaddress.ip_address("2001:db8::7").packed + ipaddress.ip_address("2001:db8::1").packed
                     + struct.pack("!HH", 40001, 25))
        elif family == 0x11:
            block = socket.inet_aton("192.0.2.7") + socket.inet_aton("198.51.100.1") + struct.pack("!HH", 40001, 25)
        else:
            block = b""
    body = block + tlvs
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# PP2_TYPE_UNIQUE_ID and a PP2_TYPE_SSL block with a version sub-TLV, as HAProxy sends them.
TLVS = tlv(0x05, b"4f0c2b3a-unique-id") + tlv(0x20, b"\x01" + b"\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3"))


class V1Parser(unittest.TestCase):

    def test_tcp4(self):
        header = parse(V1_TCP4 + b"EHLO x\r\n")
        self.assertEqual((header.version, header.length), (1, len(V1_TCP4)))
        self.assertEqual(header.source, IPv4Address("TCP", "192.0.2.7", 40001))
        self.assertEqual(header.destination, IPv4Address("TCP", "198.51.100.1", 25))

    def test_tcp6(self):
        header = parse(V1_TCP6)
        self.assertEqual(header.source, IPv6Address("TCP", "2001:db8::7", 40001))
        self.assertEqual(header.destination, IPv6Address("TCP", "2001:db8::1", 25))

    def test_unknown_means_the_real_peer_and_its_rest_is_ignored(self):
        for line in (b"PROXY UNKNOWN\r\n", V1_LONGEST, b"PROXY UNKNOWN \x01anything\r\n"):
            header = parse(line + b"EHLO")
            self.assertEqual((header.source, header.destination, header.length), (None, None, len(line)))
        self.assertEqual(len(V1_LONGEST), V1_MAX)

    def test_every_prefix_is_incomplete(self):
        for whole in (V1_TCP4, V1_TCP6, V1_LONGEST):
            for cut in range(len(whole)):
                self.assertIsNone(parse(whole[:cut]), whole[:cut])

    def test_no_crlf_within_107_octets(self):
        self.assertIsNone(parse(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15)))       # 106: may still end
        with self.assertRaises(ProxyHeaderError) as e:
            parse(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 14))
        self.assertIn("107", str(e.exception))
        with self.assertRaises(ProxyHeaderError):                                 # 108 with its CRLF
            parse(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15) + b"\r\n")

    def test_malformed_lines(self):
        bad = [
            b"EHLO client.example\r\n",                                   # no header at all
            b"PROXY\r\n",
            b"PROXY TCP5 192.0.2.7 198.51.100.1 40001 25\r\n",            # no such protocol
            b"PROXY TCP4 192.0.2.7 198.51.100.1 40001\r\n",               # a field missing
            b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 25 extra\r\n",
            b"PROXY TCP4  192.0.2.7 198.51.100.1 40001 25\r\n",           # two spaces
            b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 25 \r\n",
            b"PROXY TCP4 999.0.2.7 198.51.100.1 40001 25\r\n",            # not an address
            b"PROXY TCP4 192.0.2.007 198.51.100.1 40001 25\r\n",          # heading zeroes
            b"PROXY TCP4 2001:db8::7 198.51.100.1 40001 25\r\n",          # IPv6 in TCP4
            b"PROXY TCP6 192.0.2.7 2001:db8::1 40001 25\r\n",             # IPv4 in TCP6
            b"PROXY TCP6 fe80::1%eth0 2001:db8::1 40001 25\r\n",          # a zone
            b"PROXY TCP4 192.0.2.7 198.51.100.1 040001 25\r\n",           # heading zero in a port
            b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n",            # port out of range
            b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 25\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 4e4 25\r\n",
            b"PROXY TCP4 192.0.2.7\n198.51.100.1 40001 25\r\n",           # a bare LF inside
            b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 25\xff\r\n",
            b"proxy TCP4 192.0.2.7 198.51.100.1 40001 25\r\n",
            b"GET / HTTP/1.0\r\n",
        ]
        for line in bad:
            with self.assertRaises(ProxyHeaderError, msg=line):
                parse(line)

    def test_wrong_first_bytes_are_refused_at_once(self):
        for start in (b"E", b"PX", b"PROXY\r", b"\x16\x03\x01", b"\r\n\r\n\x00\r\nQUIX"):
            with self.assertRaises(ProxyHeaderError, msg=start):
                parse(start)

    def test_port_bounds(self):
        self.assertEqual(parse(b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n").destination.port, 65535)


class V2Parser(unittest.TestCase):

    def test_ipv4_with_tlvs_skipped(self):
        header_bytes = v2(tlvs=TLVS)
        header = parse(header_bytes + b"EHLO x\r\n")
        self.assertEqual((header.version, header.length), (2, len(header_bytes)))
        self.assertEqual(header.source, IPv4Address("TCP", "192.0.2.7", 40001))
        self.assertEqual(header.destination, IPv4Address("TCP", "198.51.100.1", 25))

    def test_ipv6(self):
        header = parse(v2(family=0x21, tlvs=TLVS))
        self.assertEqual(header.source, IPv6Address("TCP", "2001:db8::7", 40001))
        self.assertEqual(header.destination, IPv6Address("TCP", "2001:db8::1", 25))

    def test_local_means_the_real_peer_whatever_its_block_says(self):
        for family in (0x00, 0x11, 0x21):
            whole = v2(command=0, family=family, tlvs=TLVS)
            header = parse(whole)
            self.assertEqual((header.source, header.destination, header.length), (None, None, len(whole)))

    def test_unspec_proxy_means_the_real_peer(self):
        header = parse(v2(command=1, family=0x00, block=b"\x00" * 8))
        self.assertEqual((header.source, header.length), (None, 16 + 8))

    def test_every_prefix_is_incomplete(self):
        for whole in (v2(tlvs=TLVS), v2(family=0x21), v2(command=0)):
            for cut in range(len(whole)):
                self.assertIsNone(parse(whole[:cut]), whole[:cut])

    def test_refused(self):
        bad = {
            "version": v2(version=1),
            "command": v2(command=2),
            "UDP": v2(family=0x12, block=b"\x00" * 12),
            "UDP6": v2(family=0x22, block=b"\x00" * 36),
            "UNIX": v2(family=0x31, block=b"\x00" * 216),
            "unassigned family": v2(family=0x41, block=b"\x00" * 12),
            "IPv4 block too short": v2(family=0x11, block=b"\x00" * 11),
            "IPv6 block too short": v2(family=0x21, block=b"\x00" * 35),
        }
        for name, header in bad.items():
            with self.assertRaises(ProxyHeaderError, msg=name):
                parse(header)

    def test_oversize_is_refused_from_its_first_16_octets(self):
        fixed = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_HEADER)   # 16 + MAX_HEADER octets
        with self.assertRaises(ProxyHeaderError) as e:
            parse(fixed)
        self.assertIn(str(MAX_HEADER), str(e.exception))
        self.assertIsNotNone(parse(v2(tlvs=tlv(0x04, b"\x00" * (MAX_HEADER - 16 - 12 - 3)))))   # exactly the bound


class Mutations(unittest.TestCase):

    def test_mutated_headers_parse_or_are_refused_never_crash(self):
        """Seeded mutations of every valid form: each gives None, a header within the bytes given, or
        ProxyHeaderError — never another exception, never a header longer than its bound."""
        import random
        rng = random.Random(19)
        seeds = [V1_TCP4, V1_TCP6, V1_LONGEST, v2(tlvs=TLVS), v2(family=0x21), v2(command=0, tlvs=TLVS)]
        for _ in range(20000):
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 4)):
                where = rng.randrange(len(data))
                action = rng.random()
                if action < 0.5:
                    data[where] = rng.randrange(256)
                elif action < 0.75:
                    del data[where]
                else:
                    data[where:where] = bytes([rng.randrange(256)])
            try:
                header = parse(bytes(data))
            except ProxyHeaderError:
                continue
            if header is not None:
                self.assertLessEqual(header.length, min(len(data), MAX_HEADER))
                self.assertLessEqual(header.length, V1_MAX if header.version == 1 else MAX_HEADER)


class Harness:
    """A relay listener (a real RelayServerFactory) behind the PROXY wrapper, on a task.Clock."""

    def __init__(self, trusted=("127.0.0.1/32",), limits=None, kind="relay"):
        self.clock, self.queue, self.policy, self.metrics = Clock(), FakeQueue(), AllowAllPolicy(), Metrics()
        self.relay = RelayServerFactory(
            hostname="relay.test", listener=config.Listener(kind, "tcp:0"), limits=limits or config.Limits(),
            portal=None, mechanisms=(), policy=self.policy, queue=self.queue, tls_options=object(),
            clock=self.clock, metrics=self.metrics,
        )
        self.factory = ProxyProtocolFactory(self.relay, [ipaddress.ip_network(n) for n in trusted],
                                            name="listen[0]", clock=self.clock, metrics=self.metrics)

    def connect(self, peer=PROXY):
        address = IPv6Address("TCP", peer, 50000) if ":" in peer else IPv4Address("TCP", peer, 50000)
        transport = TLSStringTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
        protocol = self.factory.buildProtocol(address)
        protocol.makeConnection(transport)
        return protocol, transport

    def refused(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value("mailrelay_proxy_refused_total", {"reason": reason}) or 0


def send_message(protocol, transport) -> str:
    transport.clear()
    protocol.dataReceived(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
                          b"DATA\r\n")
    protocol.dataReceived(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    return transport.value().decode()


class Wrapper(unittest.TestCase):

    def setUp(self):
        self.log = LogLines(self)

    def test_v1_client_is_what_the_session_and_received_see(self):
        h = Harness()
        protocol, transport = h.connect()
        self.assertEqual(transport.value(), b"")                 # no banner before the header
        protocol.dataReceived(V1_TCP4)
        self.assertTrue(transport.value().startswith(b"220 relay.test "))
        self.assertIn("250 2.0.0", send_message(protocol, transport))
        self.assertEqual(h.policy.clients[0].address, "192.0.2.7")
        self.assertEqual(h.policy.clients[0].port, 40001)
        self.assertTrue(h.queue.messages[0].data.startswith(b"Received: from client.test ([192.0.2.7])"))
        self.assertEqual(protocol.getPeer(), IPv4Address("TCP", "192.0.2.7", 40001))
        self.assertEqual(protocol.getHost(), IPv4Address("TCP", "198.51.100.1", 25))

    def test_v2_ipv6_with_tlvs(self):
        h = Harness()
        protocol, transport = h.connect()
        protocol.dataReceived(v2(family=0x21, tlvs=TLVS))
        self.assertIn("250 2.0.0", send_message(protocol, transport))
        self.assertEqual(h.policy.clients[0].address, "2001:db8::7")
        self.assertIn(b"[IPv6:2001:db8::7]", h.queue.messages[0].data)

    def test_v2_local_and_v1_unknown_leave_the_proxy_as_the_client(self):
        for header in (v2(command=0, tlvs=TLVS), b"PROXY UNKNOWN\r\n"):
            h = Harness()
            protocol, transport = h.connect()
            protocol.dataReceived(header)
            self.assertIn("250 2.0.0", send_message(protocol, transport))
            self.assertEqual(h.policy.clients[0].address, PROXY)

    def test_header_split_across_reads(self):
        for whole in (V1_TCP6, v2(tlvs=TLVS)):
            h = Harness()
            protocol, transport = h.connect()
            for i in range(len(whole)):
                self.assertEqual(transport.value(), b"")
                protocol.dataReceived(whole[i:i + 1])
            self.assertTrue(transport.value().startswith(b"220 "))
            self.assertFalse(transport.disconnecting)

    def test_bytes_after_the_header_in_the_same_read_reach_the_session(self):
        h = Harness()
        protocol, transport = h.connect()
        protocol.dataReceived(v2() + b"EHLO client.test\r\n")
        lines = transport.value().decode().splitlines()
        self.assertTrue(lines[0].startswith("220 "))
        self.assertTrue(lines[1].startswith("250-relay.test "))

    def test_untrusted_peer_is_closed_at_once(self):
        h = Harness(trusted=("10.0.0.0/8", "2001:db8::/32"))
        protocol, transport = h.connect(peer="127.0.0.1")
        self.assertTrue(transport.disconnected)                   # aborted: before any byte was read
        protocol.dataReceived(V1_TCP4 + b"EHLO x\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(h.relay.open_sessions, 0)
        lines = self.log.take("PROXY protocol")
        self.assertEqual(lines, ["PROXY protocol: connection from 127.0.0.1 on listen[0] closed: not in "
                                 "trusted_proxies"])
        self.assertEqual(h.refused("untrusted"), 1)

    def test_trusted_ipv6_and_mapped_peers(self):
        h = Harness(trusted=("::1/128", "127.0.0.0/8"))
        for peer in ("::1", "::ffff:127.0.0.9"):
            protocol, transport = h.connect(peer=peer)
            protocol.dataReceived(V1_TCP4)
            self.assertTrue(transport.value().startswith(b"220 "), peer)

    def test_garbage_instead_of_a_header(self):
        h = Harness()
        protocol, transport = h.connect()
        protocol.dataReceived(b"EHLO client.test\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnected)
        (line,) = self.log.take("PROXY protocol")
        self.assertIn("connection from 127.0.0.1 on listen[0] closed: bad PROXY header: not a PROXY", line)
        self.assertEqual(h.refused("invalid"), 1)

    def test_oversize_headers(self):
        for flood in (b"PROXY TCP4 " + b"1" * 200, V2_SIGNATURE + b"\x21\x11\xff\xff" + b"\x00" * 100):
            h = Harness()
            protocol, transport = h.connect()
            protocol.dataReceived(flood)
            self.assertEqual(transport.value(), b"")
            self.assertTrue(transport.disconnected)
            self.assertEqual(h.refused("invalid"), 1)

    def test_a_header_that_never_comes_times_out(self):
        h = Harness()
        protocol, transport = h.connect()
        protocol.dataReceived(V1_TCP4[:10])
        h.clock.advance(HEADER_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnected)
        h.clock.advance(0.1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")
        (line,) = self.log.take("PROXY protocol")
        self.assertIn("closed: no whole PROXY header within 5s", line)
        self.assertEqual(h.refused("timeout"), 1)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_the_timeout_ends_with_the_header(self):
        h = Harness()
        protocol, transport = h.connect()
        protocol.dataReceived(V1_TCP4)
        h.clock.advance(HEADER_TIMEOUT * 10)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.log.take("PROXY protocol"), [])

    def test_per_ip_limit_counts_the_header_client(self):
        h = Harness(limits=config.Limits(max_connections_per_ip=1))
        first, t1 = h.connect()
        first.dataReceived(V1_TCP4)
        self.assertTrue(t1.value().startswith(b"220 "))
        second, t2 = h.connect()
        second.dataReceived(V1_TCP4)                              # the same client: over its limit
        self.assertTrue(t2.value().startswith(b"421 4.7.0"))
        third, t3 = h.connect()                                   # another client, through the same proxy
        third.dataReceived(b"PROXY TCP4 192.0.2.8 198.51.100.1 40002 25\r\n")
        self.assertTrue(t3.value().startswith(b"220 "))
        self.assertIn("connection from 192.0.2.7 refused: connection limit", self.log.text())

    def test_connection_lost_before_and_after_the_header(self):
        h = Harness()
        protocol, transport = h.connect()
        protocol.dataReceived(V1_TCP4[:5])
        protocol.connectionLost(None)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        (line,) = self.log.take("PROXY protocol")
        self.assertIn("closed by the peer inside the header", line)
        protocol, transport = h.connect()
        protocol.connectionLost(None)                             # a bare TCP check: connect, close
        self.assertEqual(self.log.take("PROXY protocol"), [])
        protocol, transport = h.connect()
        protocol.dataReceived(V1_TCP4)
        self.assertEqual(h.relay.open_sessions, 1)
        protocol.connectionLost(None)
        self.assertEqual((h.relay.open_sessions, h.relay.connections.total), (0, 0))
        self.assertEqual(h.factory.protocols, {})

    def test_starttls_goes_to_the_socket(self):
        h = Harness()
        protocol, transport = h.connect()
        protocol.dataReceived(V1_TCP4 + b"EHLO client.test\r\n")
        self.assertIn(b"250 STARTTLS\r\n", transport.value())
        protocol.dataReceived(b"STARTTLS\r\n")
        self.assertIs(transport.tls_options, h.relay.tls_options)
        session = protocol.wrappedProtocol
        self.assertFalse(session._handshake_done)
        protocol.handshakeCompleted()         # the socket's TLS layer wraps this wrapper: it tells us
        self.assertTrue(session._handshake_done)

    def test_implicit_tls_starts_only_after_the_header(self):
        from tests.support.pki import TestCA
        h = Harness(kind="submissions")
        ca = TestCA()
        cert, key = ca.write_pair(Path(self.mktemp()), "relay.test", "relay")
        from mailrelay.tls import server_options
        h.factory = ProxyProtocolFactory(TLSMemoryBIOFactory(server_options(cert, key), False, h.relay),
                                         [ipaddress.ip_network("127.0.0.1/32")], name="listen[2]", clock=h.clock)
        protocol, transport = h.connect()
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(V1_TCP4)
        self.assertEqual(transport.value(), b"")                  # TLS server: waits for the ClientHello
        session = next(iter(h.relay._open_sessions))
        self.assertEqual(session.client_info().address, "192.0.2.7")


class Config(unittest.TestCase):

    def load(self, listen: str):
        path = Path(self.mktemp())
        path.mkdir()
        (path / "tap.conf").write_text(f'[[listen]]\nkind = "relay"\nendpoint = "tcp:2525"\n{listen}\n')
        return load(path / "tap.conf")

    def refused(self, listen: str) -> str:
        with self.assertRaises(ConfigError) as e:
            self.load(listen)
        self.assertNotIn("\n", str(e.exception))
        return e.exception.key + ": " + e.exception.message

    def test_keys(self):
        listener = self.load('proxy_protocol = true\ntrusted_proxies = ["10.0.0.5", "2001:db8::/48"]').listeners[0]
        self.assertTrue(listener.proxy_protocol)
        self.assertEqual(listener.trusted_proxies, (ipaddress.ip_network("10.0.0.5/32"),
                                                    ipaddress.ip_network("2001:db8::/48")))
        self.assertFalse(self.load("").listeners[0].proxy_protocol)
        self.assertEqual(self.load("proxy_protocol = false\ntrusted_proxies = []").listeners[0],
                         self.load("").listeners[0])

    def test_proxy_protocol_needs_trusted_proxies(self):
        for listen in ("proxy_protocol = true", "proxy_protocol = true\ntrusted_proxies = []"):
            self.assertTrue(self.refused(listen).startswith("listen[0].trusted_proxies: required with "
                                                            "proxy_protocol = true"))

    def test_trusted_proxies_validated_like_permit_networks(self):
        self.assertIn('listen[0].trusted_proxies[1]: bad network "10.0.0.0/33"',
                      self.refused('proxy_protocol = true\ntrusted_proxies = ["10.0.0.1", "10.0.0.0/33"]'))
        self.assertIn("listen[0].trusted_proxies[0]: expected a string",
                      self.refused("proxy_protocol = true\ntrusted_proxies = [5]"))

    def test_every_address_is_never_trusted(self):
        for network in ("0.0.0.0/0", "::/0"):
            self.assertIn("listen[0].trusted_proxies[0]", self.refused(
                f'proxy_protocol = true\ntrusted_proxies = ["{network}"]'))

    def test_trusted_proxies_without_proxy_protocol(self):
        self.assertIn("listen[0].trusted_proxies: only means something with proxy_protocol = true",
                      self.refused('trusted_proxies = ["10.0.0.5"]'))

    def test_not_on_an_ssl_endpoint(self):
        path = Path(self.mktemp())
        path.mkdir()
        (path / "tap.conf").write_text('[[listen]]\nkind = "submissions"\nendpoint = "ssl:4650:privateKey=k.pem"\n'
                                       'proxy_protocol = true\ntrusted_proxies = ["10.0.0.5"]\n')
        with self.assertRaises(ConfigError) as e:
            load(path / "tap.conf")
        self.assertEqual(e.exception.key, "listen[0].endpoint")

    def test_check_says_so(self):
        config_ = self.load('proxy_protocol = true\ntrusted_proxies = ["10.0.0.5"]')
        text = [t for label, t in describe(config_) if label == "listen"][0]
        self.assertIn("PROXY protocol from 10.0.0.5/32 only", text)
