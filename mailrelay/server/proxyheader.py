# -*- test-case-name: tests.test_proxy_haproxy, tests.test_proxy_protocol -*-
"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2), parsed strictly.

Its job in the message's journey: before a listener behind a load balancer says anything, learn who the
client really is.  In: the first bytes of a connection, as many as have arrived.  Out: `parse(buffer)`
returns None while the header is incomplete, a `ProxyHeader` (the client's and the proxy's addresses,
and how many octets the header took) once it is whole, or raises `ProxyHeaderError` with a short reason
as soon as the bytes cannot become a valid header — so a wrong first byte is refused at once, and no
header is ever waited for past MAX_HEADER octets.

What is accepted (proxy-protocol.txt section numbers):
- v1 (2.1): `PROXY TCP4 src dst sport dport\\r\\n`, `PROXY TCP6 ...`, or `PROXY UNKNOWN ...\\r\\n`, at
  most 107 octets with the CRLF; single spaces; addresses in their canonical text form (no heading
  zeroes in IPv4, no IPv6 zone), ports 0-65535 in decimal without heading zeroes.  UNKNOWN: the rest
  of the line is ignored and the real peer is the client.
- v2 (2.2): the 12-octet signature, version 2, command LOCAL (health checks: the real peer is the
  client, whatever the address block says) or PROXY; family/protocol TCP over IPv4 (0x11), TCP over
  IPv6 (0x21) or UNSPEC (0x00: the real peer is the client).  UDP and UNIX sockets fall back to UNSPEC
  mode, where 2.2 lets the receiver refuse, and are refused: the real peer is the proxy, not the client,
  and must not be given the client's rights.  TLVs after the addresses are skipped (2.2 lets a receiver
  ignore them).

Twisted ships a parser (twisted.protocols.haproxy) but lets a malformed v1 port escape as a ValueError,
takes any text as an address, lets a v1 line with its CRLF run past 107 octets and accepts UNIX and UDP;
its wrapper drops a header whose first read is shorter than 8 or 16 octets, has no timeout and no list
of trusted peers, and starts the wrapped protocol (our 220 banner, or the TLS layer on 465) before the
header has arrived.  Hence this module and mailrelay.server.proxylistener.
"""
from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Optional, Union

from twisted.internet.address import IPv4Address, IPv6Address

Address = Union[IPv4Address, IPv6Address]

V1_PREFIX = b"PROXY "
V1_MAX = 107                 # proxy-protocol.txt 2.1: the longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"     # proxy-protocol.txt 2.2: the 12-octet v2 signature
V2_FIXED = 16                # signature, version/command, family/protocol, 2-octet length
# Our size bound on a whole v2 header.  proxy-protocol.txt 2.2 allows up to 16 + 65535 octets, but the
# addresses take at most 216 and the TLVs real balancers send (AWS, Azure, HAProxy's own SSL and unique-id
# TLVs) fit well within this; anything longer is refused rather than buffered.
MAX_HEADER = 4096

_PORT = re.compile(rb"(0|[1-9][0-9]{0,4})\Z")    # proxy-protocol.txt 2.1: decimal, no heading zeroes
# v2 family/protocol octets we take (proxy-protocol.txt 2.2): TCP over IPv4 / IPv6, and UNSPEC.
_TCP4, _TCP6, _UNSPEC = 0x11, 0x21, 0x00


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY protocol header; str() is a short reason for the log line."""


@dataclass(frozen=True)
class ProxyHeader:
    """A whole header: `source` is the client (None: use the real peer, for v1 UNKNOWN, v2 LOCAL and
    v2 UNSPEC), `destination` the address the client connected to, `length` the octets it took."""
    version: int
    source: Optional[Address]
    destination: Optional[Address]
    length: int


def parse(buffer: bytes) -> Optional[ProxyHeader]:
    """The header at the start of `buffer`, or None when more bytes are needed; ProxyHeaderError as soon
    as `buffer` cannot start a valid header (so at most MAX_HEADER octets are ever waited for)."""
    if not buffer:
        return None
    if buffer[0:1] == V2_SIGNATURE[0:1]:
        return _parse_v2(buffer)
    if buffer[0:1] == V1_PREFIX[0:1]:
        return _parse_v1(buffer)
    raise ProxyHeaderError("not a PROXY protocol header")


# -- version 1 (proxy-protocol.txt 2.1) ------------------------------------------------------------------

def _parse_v1(buffer: bytes) -> Optional[ProxyHeader]:
    if not buffer[:len(V1_PREFIX)] == V1_PREFIX[:len(buffer)]:
        raise ProxyHeaderError("not a PROXY protocol header")
    end = buffer.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buffer) >= V1_MAX:
            raise ProxyHeaderError(f"v1 header has no CRLF within {V1_MAX} octets")
        return None
    line = buffer[:end]
    words = line.split(b" ")
    length = end + 2
    if len(words) < 2:
        raise ProxyHeaderError("v1 header names no protocol")
    protocol = words[1]
    if protocol == b"UNKNOWN":
        # proxy-protocol.txt 2.1: the receiver ignores the rest of the line and uses the real endpoints.
        return ProxyHeader(1, None, None, length)
    if any(octet < 0x20 or octet > 0x7E for octet in line):
        raise ProxyHeaderError("v1 header holds a control or non-ASCII octet")
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"v1 protocol {_show(protocol)} is not TCP4, TCP6 or UNKNOWN")
    if len(words) != 6:
        raise ProxyHeaderError(f"v1 {protocol.decode()} header needs 4 fields after the protocol, "
                               f"has {len(words) - 2}")
    family = 4 if protocol == b"TCP4" else 6
    source_ip, dest_ip = (_v1_address(word, family) for word in words[2:4])
    source_port, dest_port = (_v1_port(word) for word in words[4:6])
    return ProxyHeader(1, _address(source_ip, source_port), _address(dest_ip, dest_port), length)


def _v1_address(word: bytes, family: int) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    try:
        text = word.decode("ascii")
        if "%" in text:                 # a zone is meaningless beyond the proxy's own link
            raise ValueError(text)
        return ipaddress.IPv4Address(text) if family == 4 else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyHeaderError(f"v1 header: {_show(word)} is not an IPv{family} address") from None


def _v1_port(word: bytes) -> int:
    if _PORT.match(word) is None or int(word) > 65535:
        raise ProxyHeaderError(f"v1 header: {_show(word)} is not a port")
    return int(word)


# -- version 2 (proxy-protocol.txt 2.2) ------------------------------------------------------------------

def _parse_v2(buffer: bytes) -> Optional[ProxyHeader]:
    if buffer[:len(V2_SIGNATURE)] != V2_SIGNATURE[:len(buffer)]:
        raise ProxyHeaderError("not a PROXY protocol header")
    if len(buffer) < V2_FIXED:
        return None
    version, command = buffer[12] >> 4, buffer[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError(f"v2 header: version {version} is not 2")
    if command not in (0, 1):
        raise ProxyHeaderError(f"v2 header: command {command} is neither LOCAL nor PROXY")
    family = buffer[13]
    (block,) = struct.unpack("!H", buffer[14:16])
    length = V2_FIXED + block
    if length > MAX_HEADER:
        raise ProxyHeaderError(f"v2 header of {length} octets is over the {MAX_HEADER}-octet bound")
    if len(buffer) < length:
        return None
    if command == 0:
        # LOCAL (a health check by the proxy itself): the real endpoints count, the block is skipped.
        return ProxyHeader(2, None, None, length)
    if family == _UNSPEC:
        # proxy-protocol.txt 2.2: with UNSPEC the receiver may use the real endpoints.
        return ProxyHeader(2, None, None, length)
    if family not in (_TCP4, _TCP6):
        # UDP and UNIX (or a value 2.2 leaves unassigned): refused, never taken as the real peer.
        raise ProxyHeaderError(f"v2 header: family/protocol 0x{family:02x} is not TCP over IPv4 or IPv6")
    size = 4 if family == _TCP4 else 16
    if block < 2 * size + 4:
        raise ProxyHeaderError(f"v2 header: the address block is {block} octets, too short for "
                               f"{'IPv4' if size == 4 else 'IPv6'}")
    start = V2_FIXED
    source = ipaddress.ip_address(buffer[start:start + size])
    dest = ipaddress.ip_address(buffer[start + size:start + 2 * size])
    source_port, dest_port = struct.unpack("!HH", buffer[start + 2 * size:start + 2 * size + 4])
    # Whatever follows the addresses up to `length` is TLVs (proxy-protocol.txt 2.2): skipped.
    return ProxyHeader(2, _address(source, source_port), _address(dest, dest_port), length)


# -- shared ----------------------------------------------------------------------------------------------

def _address(ip: Union[ipaddress.IPv4Address, ipaddress.IPv6Address], port: int) -> Address:
    if ip.version == 4:
        return IPv4Address("TCP", str(ip), port)
    return IPv6Address("TCP", str(ip), port)


def _show(word: bytes) -> str:
    """A field from the header, quoted and cut short, safe for a log line."""
    text = word[:40].decode("ascii", "replace")
    return repr(text + ("..." if len(word) > 40 else ""))
