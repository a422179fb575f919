"""`mailrelay route-test` shows the TLS policy of direct delivery: the MTA-STS policy (fetched from a real
HTTPS policy host on loopback, or read from the relay's cache) and each exchanger's DANE records with
whether the (loopback) resolver authenticated them."""
from __future__ import annotations

import io
import os
from contextlib import redirect_stdout

from twisted.internet import defer, threads
from twisted.trial import unittest

from mailrelay.cli.main import main
from mailrelay.outbound.dane import TLSA
from mailrelay.outbound.mtasts import parse_policy
from mailrelay.outbound.mtasts_cache import PolicyCache
from tests.support.tlsworld import World, policy_text


class RoutePolicyTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def configure(self, world: World) -> str:
        path = os.path.join(self.dir, "tap.conf")
        with open(path, "w") as f:
            f.write(f'''hostname = "relay.test"
spool = "spool"
[delivery]
nameservers = ["127.0.0.1:{world.nameservers[0][1]}"]
mx_port = {world.mx_port}
mta_sts_port = {world.policy_port}
ca_file = "{world.ca_file}"
''')
        return path

    def world(self, authenticated: bool = False) -> World:
        world = World(self, authenticated=authenticated)
        world.zone(("example.net", "MX"), ["10 mx1.example.net.", "20 mx2.example.net."])
        world.zone(("mx1.example.net", "A"), ["127.0.0.2"])
        world.zone(("mx2.example.net", "A"), ["127.0.0.3"])
        return world

    @defer.inlineCallbacks
    def run_cli(self, world: World, address: str = "b@example.net"):
        config = self.configure(world)

        def run():
            out = io.StringIO()
            with redirect_stdout(out):
                status = main(["route-test", address, "--config", config])
            return status, out.getvalue()
        status, out = yield threads.deferToThread(run)
        self.assertEqual(status, 0, out)
        return out

    @defer.inlineCallbacks
    def test_an_mta_sts_policy_fetched_now_and_what_each_exchanger_gets(self):
        world = self.world()
        world.publish("example.net", "enforce", ["mx1.example.net"], policy_id="abc123")
        out = yield self.run_cli(world)
        self.assertIn("mta-sts: TXT id abc123", out)
        self.assertIn("mta-sts: policy fetched now", out)
        self.assertIn("mta-sts: mode enforce, max_age 86400s, mx mx1.example.net", out)
        self.assertIn("tls: mx1.example.net: MTA-STS enforce: STARTTLS required", out)
        self.assertIn("tls: mx2.example.net: not tried: not an MX host of the MTA-STS policy", out)
        self.assertIn("dane: mx1.example.net: MX or address answers not authenticated", out)
        self.assertEqual(PolicyCache(os.path.join(self.dir, "spool")).domains(), [])     # nothing written

    @defer.inlineCallbacks
    def test_the_relay_s_cached_policy_is_shown_without_a_fetch(self):
        world = self.world()
        world.publish("example.net", "enforce", ["mx1.example.net"], policy_id="abc123")
        world.policies.mode["example.net"] = "500"
        import time
        PolicyCache(os.path.join(self.dir, "spool")).put(
            "example.net", parse_policy(policy_text("testing", ["*.example.net"]).encode()), "abc123", time.time())
        out = yield self.run_cli(world)
        self.assertIn("mta-sts: cached policy id abc123", out)
        self.assertIn("mode testing", out)
        self.assertEqual(world.policies.requests, [])

    @defer.inlineCallbacks
    def test_a_failed_fetch_is_explained(self):
        world = self.world()
        world.publish("example.net", "enforce", ["mx1.example.net"])
        world.policies.mode["example.net"] = "redirect"
        out = yield self.run_cli(world)
        self.assertIn("mta-sts: policy not fetched: HTTP status 302 (redirects are not followed)", out)
        self.assertIn("tls: mx1.example.net: delivery.tls = opportunistic", out)

    @defer.inlineCallbacks
    def test_dane_records_and_whether_they_were_authenticated(self):
        world = self.world(authenticated=True)
        name = f"_{world.mx_port}._tcp.mx1.example.net"
        world.zone((name, "TLSA"), [TLSA(3, 1, 1, b"\x01" * 32).text()])
        out = yield self.run_cli(world)
        self.assertIn(" 10 mx1.example.net [127.0.0.2] (authenticated)", out)
        self.assertIn(f"dane: {name} (authenticated): 3 1 1 {'01' * 32}", out)
        self.assertIn("tls: mx1.example.net: DANE: STARTTLS required, a TLSA record must match", out)
        self.assertIn(f"dane: _{world.mx_port}._tcp.mx2.example.net: no TLSA records", out)
        world.dns.insecure.add(name)
        out = yield self.run_cli(world)
        self.assertIn(f"dane: {name} (NOT authenticated: ignored)", out)
