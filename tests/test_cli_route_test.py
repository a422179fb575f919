"""`mailrelay route-test` against a real DNS server on loopback."""
from __future__ import annotations

import io
import os
from contextlib import redirect_stdout

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from mailrelay.cli.main import main
from mailrelay.dkim import keys
from tests.support.dnsserver import DNSServer


class RouteTest(unittest.TestCase):
    def setUp(self):
        self.dns = DNSServer({
            ("example.com", "MX"): ["10 mx1.example.com.", "20 mx2.example.com."],
            ("mx1.example.com", "A"): ["127.0.0.2"],
            ("mx2.example.com", "A"): ["127.0.0.3"],
            ("mx2.example.com", "AAAA"): ["::1"],
            ("nullmx.example", "MX"): ["0 ."],
        }, servfail={"broken.example"})
        port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        key_file = os.path.join(self.dir, "k.pem")
        with open(key_file, "wb") as f:
            f.write(keys.private_pem(keys.generate("ed25519")))
        self.config = os.path.join(self.dir, "tap.conf")
        with open(self.config, "w") as f:
            f.write(f'''hostname = "relay.test"
[delivery]
nameservers = ["127.0.0.1:{port}"]
tls = "verify"
[transports.backup]
host = "smarthost.example.net"
port = 587
[transports.partner]
host = "partner-gw.example.net"
port = 25
security = "none"
[[route]]
recipients = ["partner.example"]
transport = "partner"
[[route]]
recipients = ["*"]
transport = "backup"
after_attempts = 3
[[dkim.key]]
domain = "example.org"
selector = "s1"
key_file = "{key_file}"
''')

    def run_cli(self, *args):
        out = io.StringIO()
        with redirect_stdout(out):
            status = main(["route-test", *args, "--config", self.config])
        return status, out.getvalue()

    @defer.inlineCallbacks
    def test_direct_delivery_lists_mx_hosts_fallback_and_dkim(self):
        status, out = yield threads.deferToThread(self.run_cli, "user@example.com", "--sender", "app@example.org")
        self.assertEqual(status, 0, out)
        self.assertIn("route: none matches: direct delivery by MX", out)
        self.assertIn("tls: verify", out)
        self.assertIn(" 10 mx1.example.com [127.0.0.2]", out)
        self.assertIn(" 20 mx2.example.com [127.0.0.3, ::1]", out)
        self.assertIn("after 3 failed attempt(s):", out)
        self.assertIn("transport: smarthost.example.net:587 security=starttls verify=yes", out)
        self.assertIn("dkim: signs as d=example.org s=s1 (ed25519-sha256)", out)

    @defer.inlineCallbacks
    def test_routed_recipient_shows_transport_without_dns(self):
        status, out = yield threads.deferToThread(self.run_cli, "x@partner.example")
        self.assertEqual(status, 0, out)
        self.assertIn("route: route[0] -> transport partner", out)
        self.assertIn("partner-gw.example.net:25 security=none", out)
        self.assertNotIn("mx:", out)
        self.assertIn("dkim: no key", out)

    @defer.inlineCallbacks
    def test_null_mx_is_permanent_and_servfail_temporary(self):
        status, out = yield threads.deferToThread(self.run_cli, "x@nullmx.example")
        self.assertEqual(status, 1, out)
        self.assertIn("5.1.10", out)
        status, out = yield threads.deferToThread(self.run_cli, "x@broken.example")
        self.assertEqual(status, 2, out)
        self.assertIn("4.4.3", out)
