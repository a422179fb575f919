"""`[delivery] source_address` and `[transports.NAME] source_address`: outgoing connections leave from
the configured address, for direct MX delivery and smarthosts alike, the transport's own key first.

Real sockets: a sink on 127.0.0.1 records the address each connection came from; the relay binds to
127.0.0.2 or 127.0.0.3 (Linux routes all of 127.0.0.0/8 to the loopback interface, so any of them
works as a source without configuring an alias).
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailrelay import config
from mailrelay.cli.main import main
from mailrelay.config import DeliveryConfig, load
from mailrelay.queue.job import Timeouts
from mailrelay.outbound.dns import MXResolver
from mailrelay.outbound.mx import MXDelivery
from mailrelay.outbound.smarthost import SmarthostTransport
from mailrelay.wiring import build_delivery_parts
from tests.support.dnsserver import DNSServer
from tests.support.sink import Sink
from tests.support.messages import message_to

FAST = Timeouts(connect=5.0, reply=10.0, data_end=10.0)


class SourceAddressTests(unittest.TestCase):
    def setUp(self):
        self.sink = Sink()
        self.port = self.sink.start(reactor, interface="127.0.0.1")
        self.addCleanup(self.sink.stop)

    def smarthost(self, delivery_source: str = "", transport_source: str = "") -> SmarthostTransport:
        t = config.Transport("relay", "127.0.0.1", self.port, security="none", verify=False,
                             source_address=transport_source)
        hop = SmarthostTransport(t, "relay.test", reactor=reactor, timeouts=FAST, source_address=delivery_source)
        self.addCleanup(hop.close_idle)
        return hop

    @defer.inlineCallbacks
    def deliver(self, hop) -> defer.Deferred:
        results = yield hop.deliver(message_to("b@src.example"), ["b@src.example"])
        self.assertTrue(results[0].delivered, results)
        return [s.peer for s in self.sink.sessions]

    @defer.inlineCallbacks
    def test_smarthost_without_any_source_address_leaves_from_the_default(self):
        self.assertEqual((yield self.deliver(self.smarthost())), ["127.0.0.1"])

    @defer.inlineCallbacks
    def test_smarthost_binds_to_the_delivery_source_address(self):
        self.assertEqual((yield self.deliver(self.smarthost("127.0.0.2"))), ["127.0.0.2"])

    @defer.inlineCallbacks
    def test_the_transports_own_source_address_overrides_the_delivery_one(self):
        hop = self.smarthost("127.0.0.2", transport_source="127.0.0.3")
        self.assertEqual((yield self.deliver(hop)), ["127.0.0.3"])

    @defer.inlineCallbacks
    def test_mx_delivery_binds_to_the_delivery_source_address(self):
        dns = DNSServer({("src.example", "MX"): ["10 mx.src.example."], ("mx.src.example", "A"): ["127.0.0.1"]})
        nameservers = (("127.0.0.1", dns.start(reactor)),)
        self.addCleanup(dns.stop)
        resolver = MXResolver(nameservers, reactor, timeout=2.0)
        self.addCleanup(resolver.stop)
        delivery = DeliveryConfig(mx_port=self.port, tls="none", nameservers=nameservers, source_address="127.0.0.2")
        mx = MXDelivery(delivery, "relay.test", reactor, resolver=resolver, timeouts=FAST)
        self.addCleanup(mx.close_idle)
        self.assertEqual((yield self.deliver(mx)), ["127.0.0.2"])

    def parts(self, text: str):
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        path = directory / "tap.conf"
        path.write_text(f'hostname = "relay.test"\n{text}')
        parts = build_delivery_parts(load(path), reactor)
        self.addCleanup(parts.close_idle)
        return parts

    @defer.inlineCallbacks
    def test_a_configured_smarthost_binds_to_the_delivery_source_address(self):
        parts = self.parts(f'[delivery]\nsource_address = "127.0.0.2"\n'
                           f'[transports.sink]\nhost = "127.0.0.1"\nport = {self.port}\nsecurity = "none"\n')
        self.assertEqual((yield self.deliver(parts.transports["sink"])), ["127.0.0.2"])

    @defer.inlineCallbacks
    def test_configured_transports_bind_as_the_config_file_says(self):
        parts = self.parts(f'''[delivery]
source_address = "127.0.0.2"
[transports.inherits]
host = "127.0.0.1"
port = {self.port}
security = "none"
[transports.own]
host = "127.0.0.1"
port = {self.port}
security = "none"
source_address = "127.0.0.3"
''')
        peers = yield self.deliver(parts.transports["inherits"])
        self.assertEqual(peers, ["127.0.0.2"])
        peers = yield self.deliver(parts.transports["own"])
        self.assertEqual(peers, ["127.0.0.2", "127.0.0.3"])


class SourceAddressConfigTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        self.path = self.dir / "tap.conf"

    def write(self, text: str) -> Path:
        self.path.write_text(f'hostname = "relay.test"\n{text}')
        return self.path

    def test_transport_source_address_is_read_and_checked(self):
        c = load(self.write('[transports.a]\nhost = "smtp.example"\nsource_address = " 192.0.2.7 "\n'
                            '[transports.b]\nhost = "smtp.example"\n'))
        self.assertEqual((c.transports["a"].source_address, c.transports["b"].source_address), ("192.0.2.7", ""))
        self.write('[transports.a]\nhost = "smtp.example"\nsource_address = "eth0"\n')
        error = self.assertRaises(config.ConfigError, load, self.path)
        self.assertEqual(error.key, "transports.a.source_address")
        self.assertIn('"eth0" is not an IP address', str(error))
        self.assertNotIn("\n", str(error))

    def run_cli(self, *args: str) -> tuple[int, str]:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        status = main([*args, "--config", str(self.path)])
        return status, out.getvalue()

    def test_check_names_each_transports_source_address(self):
        self.write('[delivery]\nsource_address = "192.0.2.1"\n'
                   '[transports.own]\nhost = "a.example"\nsource_address = "192.0.2.9"\n'
                   '[transports.inherits]\nhost = "b.example"\n')
        status, out = self.run_cli("check")
        self.assertEqual(status, 0, out)
        own = [line for line in out.splitlines() if "own: a.example" in line]
        inherits = [line for line in out.splitlines() if "inherits: b.example" in line]
        self.assertIn("from 192.0.2.9", own[0])
        self.assertIn("from 192.0.2.1 ([delivery] source_address)", inherits[0])

    def test_route_test_shows_where_a_transports_connections_leave_from(self):
        self.write('[delivery]\nsource_address = "192.0.2.1"\n'
                   '[transports.own]\nhost = "a.example"\nsource_address = "192.0.2.9"\n'
                   '[[route]]\nrecipients = ["own.example"]\ntransport = "own"\n')
        status, out = self.run_cli("route-test", "x@own.example")
        self.assertEqual(status, 0, out)
        self.assertIn("from 192.0.2.9 (transports.own.source_address)", out)
