# -*- test-case-name: tests.test_config, tests.test_logger, tests.test_routes -*-
"""Never an open relay by configuration: `[[permit]]` rules that would relay for anyone are refused.

Part of the first stage of the journey (mailrelay.config).  In: the `[[permit]]` tables (their readers,
for key paths and whether `recipients` was written) and the Permits built from them.  Out: nothing, or
a ConfigError naming `permit[N]` and what would make the relay open.  RFC 5321 §3.6.1 and RFC 2505 §2:
a relay must not relay for arbitrary clients to arbitrary domains.

Refused (recipients "*" means a list holding "*", or `recipients` left out, whose default is "*"):
- `anyone = true` with recipients "*": any client may then send anywhere.
- `networks` with recipients "*" that cover every IPv4 address (0.0.0.0/0 however written, e.g.
  "1.2.3.4/0", or "::ffff:0:0/96", the IPv4-mapped form the policy reads as 0.0.0.0/0) or every IPv6
  address (::/0, or e.g. "::/1" with "8000::/1"), whether one entry does it or several together — in
  one rule or across rules: first match wins, so every client some "*" rule names may relay anywhere,
  whatever other rules say.
A pattern such as "*.example.org" is not "*": it names that domain's subdomains only.
"""
from __future__ import annotations

import ipaddress
from typing import Iterable, Optional

from mailrelay.config.model import IPNetwork, Permit
from mailrelay.config.reader import _Reader

_ALL_V4 = ipaddress.IPv4Network("0.0.0.0/0")
_ALL_V6 = ipaddress.IPv6Network("::/0")
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")   # RFC 4291 §2.5.5.2: IPv4-mapped IPv6 addresses
_FIX = "narrow networks or list the recipient domains"


def _ipv4_part(net: IPNetwork) -> Optional[ipaddress.IPv4Network]:
    """The IPv4 addresses `net` lets in, read as the policy reads it: an IPv4 network itself, and a
    network inside ::ffff:0:0/96 the IPv4 addresses it maps (a client at ::ffff:a.b.c.d is judged as
    a.b.c.d, so "::ffff:0:0/96" is 0.0.0.0/0).  A wider IPv6 network (::/0 too) matches no IPv4 client."""
    if net.version == 4:
        return net
    if net.prefixlen >= 96 and net.subnet_of(_IPV4_MAPPED):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return None


def _covers_everyone(networks: Iterable[IPNetwork]) -> Optional[str]:
    """"every IPv6 address (::/0)" or "every IPv4 address (0.0.0.0/0)" when `networks` together cover
    that family, else None.  The IPv4-mapped block need not be covered for IPv6: no client has such an
    address once it is unmapped."""
    networks = tuple(networks)
    v6 = [n for n in networks if n.version == 6] + [_IPV4_MAPPED]
    if list(ipaddress.collapse_addresses(v6)) == [_ALL_V6]:
        return "every IPv6 address (::/0)"
    v4 = [p for p in map(_ipv4_part, networks) if p is not None]
    if list(ipaddress.collapse_addresses(v4)) == [_ALL_V4]:
        return "every IPv4 address (0.0.0.0/0)"
    return None


def refuse_open_relay(tables: list[_Reader], permits: tuple[Permit, ...]) -> None:
    """Raise ConfigError (naming `permit[N]`) if the rules would relay for anyone to anywhere."""
    open_networks: list[IPNetwork] = []     # the networks of the rules before, with recipients "*"
    open_rules: list[str] = []
    for t, permit in zip(tables, permits):
        if "*" not in permit.recipients:
            continue
        said = ' "*"' if t.has("recipients") else ' "*" (the default when recipients is left out)'
        if permit.anyone:
            t.fail(None, f"anyone = true with recipients{said} would make an open relay; "
                         "list the domains this gateway accepts")
        if not permit.networks:
            continue                        # `users`: authenticated clients only
        raw = t.data["networks"]
        for i, (text, net) in enumerate(zip([raw] if isinstance(raw, str) else raw, permit.networks)):
            everyone = _covers_everyone([net])
            if everyone:
                t.fail("networks" if isinstance(raw, str) else f"networks[{i}]",
                       f'"{text}" with recipients{said} would make an open relay: it covers {everyone}; {_FIX}')
        open_networks += permit.networks
        open_rules.append(t.prefix)
        everyone = _covers_everyone(open_networks)
        if everyone:
            if len(open_rules) == 1:
                t.fail("networks", f"these networks together cover {everyone}; with recipients{said} that "
                                   f"would make an open relay; {_FIX}")
            t.fail("networks", f'the networks of {", ".join(open_rules)} (each with recipients "*") together '
                               f"cover {everyone}; that would make an open relay; {_FIX}")
