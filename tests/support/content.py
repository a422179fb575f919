# -*- test-case-name: tests.test_content_end_to_end, tests.test_long_lines_end_to_end, tests.test_bdat_end_to_end -*-
"""Message content through the whole relay: `start_relay` runs one (tests.support.relay) routed to a sink.

`DKIMRelayTestCase` adds a loopback DNS server publishing the DKIM keys RSA (example.org, selector rsa) and
PARTNER (partner.example, selector up), a sink offering the extensions a test names (WITHOUT_8BITMIME by
default), a relay that resolves through that DNS server with rsa.pem beside its config, and `verify`,
which checks every DKIM-Signature of a message against those keys.
"""
from __future__ import annotations

from typing import Optional

import dkim
from twisted.internet import reactor, threads
from twisted.trial import unittest

from mailrelay.dkim import keys
from mailrelay.dkim.verifier import make_resolver, txt_lookup
from tests.support.dnsserver import DNSServer
from tests.support.relay import RelayFixture
from tests.support.sink import DEFAULT_EXTENSIONS, Sink


def start_relay(test: unittest.TestCase, sink_port: int, extra: str = "",
                files: Optional[dict] = None) -> RelayFixture:
    relay = RelayFixture(test.mktemp(), extra=(
        f'[transports.sink]\nhost = "127.0.0.1"\nport = {sink_port}\nsecurity = "none"\n\n'
        '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n' + extra))
    for name, content in (files or {}).items():
        (relay.dir / name).write_bytes(content)
    relay.start(reactor)
    test.addCleanup(relay.stop)
    return relay


WITHOUT_8BITMIME = tuple(e for e in DEFAULT_EXTENSIONS if e != "8BITMIME")
RSA = keys.generate("rsa", 2048)
PARTNER = keys.generate("rsa", 2048)


class DKIMRelayTestCase(unittest.TestCase):
    """A DNS server with the DKIM keys, a sink and relays routed to it (no tests of its own)."""

    def setUp(self):
        self.dns = DNSServer({
            ("rsa._domainkey.example.org", "TXT"): [keys.txt_record(RSA)],
            ("up._domainkey.partner.example", "TXT"): [keys.txt_record(PARTNER)],
        })
        self.dns_port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.lookup = txt_lookup(make_resolver([("127.0.0.1", self.dns_port)]))

    def sink(self, extensions=WITHOUT_8BITMIME) -> int:
        self.next_hop = Sink(extensions=extensions)
        port = self.next_hop.start(reactor)
        self.addCleanup(self.next_hop.stop)
        return port

    def relay(self, port: int, dkim_section: str = "") -> RelayFixture:
        return start_relay(self, port, f'[delivery]\nnameservers = ["127.0.0.1:{self.dns_port}"]\n\n'
                           + dkim_section, files={"rsa.pem": keys.private_pem(RSA)})

    def verify(self, message: bytes):
        def run():
            checker = dkim.DKIM(message)
            count = sum(1 for k, _ in checker.headers if k.lower() == b"dkim-signature")
            return [checker.verify(idx=i, dnsfunc=self.lookup) for i in range(count)]
        return threads.deferToThread(run)
