"""The limits' state and keys, over task.Clock and StringTransport sessions: message budgets and AUTH
counts that outlive a reload and take its new limits, AUTH attempts counted when their check starts,
IPv6 peers counted per /64, clients no rule matches counted per IP, LDAP logins case-insensitive in
`users` lists while password-file names compare exactly."""
from __future__ import annotations

import ipaddress

from twisted.internet import task
from twisted.trial import unittest

from mailrelay import config
from mailrelay.config import Limits, Permit
from mailrelay.envelope import ClientInfo
from mailrelay.server.factory import FailureWindow
from mailrelay.server.policy import PermitPolicy
from mailrelay.server.ratelimit import RateLimiter, client_key
from mailrelay.server.realm import FoldedLogin, RelayRealm, IRelayUser, build_portal
from tests.support.fakes import PendingChecker, memory_portal
from tests.support.session import Harness, b64

net = ipaddress.ip_network
LAN_RULE = (Permit(networks=(net("10.0.0.0/8"),)), Permit(users=("*",)))
ALICE = ClientInfo("192.0.2.9", user="alice", listener="submission")


class ClientKeyTests(unittest.SynchronousTestCase):
    def test_ipv6_addresses_of_one_64_share_a_key(self):
        self.assertEqual(client_key("2001:db8::1"), client_key("2001:db8::2"))
        self.assertEqual(client_key("2001:db8::1"), "2001:db8::/64")
        self.assertEqual(client_key("2001:db8::ffff:ffff:ffff:ffff"), "2001:db8::/64")
        self.assertEqual(client_key("2001:DB8:0:0:1:2:3:4"), "2001:db8::/64")

    def test_another_64_is_another_key(self):
        self.assertNotEqual(client_key("2001:db8::1"), client_key("2001:db8:0:1::1"))

    def test_ipv4_is_keyed_per_address_and_mapped_addresses_are_unmapped(self):
        self.assertEqual(client_key("192.0.2.1"), "192.0.2.1")
        self.assertNotEqual(client_key("192.0.2.1"), client_key("192.0.2.2"))
        self.assertEqual(client_key("::ffff:192.0.2.1"), "192.0.2.1")

    def test_loopback_and_scoped_and_junk(self):
        self.assertEqual(client_key("::1"), "::/64")
        self.assertEqual(client_key("fe80::1%eth0"), client_key("fe80::2"))
        self.assertEqual(client_key("not an address"), "not an address")


class BudgetsAcrossReloadTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()

    def test_a_bucket_keeps_what_was_spent_when_the_rate_changes(self):
        limiter = RateLimiter(3, 60.0, self.clock)
        for _ in range(3):
            self.assertTrue(limiter.allow("k"))
        self.assertFalse(limiter.allow("k", 10))          # raised: still empty ...
        self.clock.advance(6)
        self.assertTrue(limiter.allow("k", 10))           # ... and refilling at the new rate (10/min)
        self.assertFalse(limiter.allow("k", 10))

    def test_a_lowered_rate_caps_a_fuller_bucket(self):
        limiter = RateLimiter(10, 60.0, self.clock)
        self.assertTrue(limiter.allow("k"))
        self.assertTrue(limiter.allow("k", 2))
        self.assertTrue(limiter.allow("k", 2))
        self.assertFalse(limiter.allow("k", 2))

    def test_an_identity_at_its_limit_stays_limited_under_the_reloaded_policy(self):
        old = PermitPolicy(LAN_RULE, Limits(messages_per_minute=2), clock=self.clock)
        for _ in range(2):
            self.assertIsNone(old.check_sender(ALICE, "alice@example.org"))
        new = PermitPolicy(LAN_RULE, Limits(messages_per_minute=3), clock=self.clock, limiter=old.limiter)
        self.assertEqual(new.check_sender(ALICE, "alice@example.org").code, 450)
        self.assertIsNone(new.check_sender(ClientInfo("192.0.2.9", user="bob"), "bob@example.org"))

    def test_a_limit_turned_off_and_on_again_keeps_the_budgets(self):
        first = PermitPolicy(LAN_RULE, Limits(messages_per_minute=1), clock=self.clock)
        self.assertIsNone(first.check_sender(ALICE, "alice@example.org"))
        off = PermitPolicy(LAN_RULE, Limits(messages_per_minute=0), clock=self.clock, limiter=first.limiter)
        for _ in range(5):
            self.assertIsNone(off.check_sender(ALICE, "alice@example.org"))
        self.assertIs(off.limiter, first.limiter)
        on = PermitPolicy(LAN_RULE, Limits(messages_per_minute=1), clock=self.clock, limiter=off.limiter)
        self.assertEqual(on.check_sender(ALICE, "alice@example.org").code, 450)


class FailureWindowTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()

    def test_a_raised_limit_applies_to_a_key_already_counted(self):
        window = FailureWindow(2, self.clock)
        for _ in range(3):
            window.record("192.0.2.1")
        window.set_limit(4)
        self.assertFalse(window.exhausted("192.0.2.1"))
        self.assertEqual(window.record("192.0.2.1"), 4)
        self.assertTrue(window.exhausted("192.0.2.1"))     # a deque sized for the old limit never got here
        self.assertTrue(window.over_limit(window.record("192.0.2.1")))

    def test_a_lowered_limit_applies_at_once(self):
        window = FailureWindow(5, self.clock)
        for _ in range(2):
            window.record("192.0.2.1")
        self.assertFalse(window.exhausted("192.0.2.1"))
        window.set_limit(2)
        self.assertTrue(window.exhausted("192.0.2.1"))

    def test_refund_takes_back_the_latest_attempt_and_memory_stays_bounded(self):
        window = FailureWindow(3, self.clock)
        for _ in range(100):
            window.record("k")
        self.assertEqual(window.count("k"), 4)             # limit + 1 timestamps are kept
        window.refund("k")
        self.assertEqual(window.count("k"), 3)
        window.refund("nobody")
        self.clock.advance(61)
        self.assertEqual(window.count("k"), 0)


class UnmatchedClientTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.policy = PermitPolicy(LAN_RULE[:1], Limits(messages_per_minute=2), clock=task.Clock())

    def test_a_client_no_rule_matches_is_counted_per_ip(self):
        stranger = ClientInfo("192.0.2.9")
        for _ in range(2):
            self.assertIsNone(self.policy.check_sender(stranger, "x@example.com"))
        self.assertEqual(self.policy.check_sender(stranger, "x@example.com").status, "4.7.1")
        self.assertIsNone(self.policy.check_sender(ClientInfo("192.0.2.10"), "x@example.com"))
        self.assertIsNone(self.policy.check_sender(ClientInfo("10.0.0.1"), "x@example.com"))

    def test_ipv6_strangers_of_one_64_share_a_budget(self):
        self.assertIsNone(self.policy.check_sender(ClientInfo("2001:db8::1"), ""))
        self.assertIsNone(self.policy.check_sender(ClientInfo("2001:db8::2"), ""))
        self.assertEqual(self.policy.check_sender(ClientInfo("2001:db8::3"), "").code, 450)
        self.assertIsNone(self.policy.check_sender(ClientInfo("2001:db8:0:1::1"), ""))


class FoldedUserTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.policy = PermitPolicy((Permit(users=("Alice",)),), Limits(), clock=task.Clock())

    def test_a_users_entry_matches_a_directory_login_case_insensitively(self):
        self.assertIsNotNone(self.policy.identify(ClientInfo("192.0.2.9", user="alice", user_folded=True)))
        self.assertIsNone(self.policy.check_recipient(
            ClientInfo("192.0.2.9", user="alice", user_folded=True), "", "x@example.com"))

    def test_a_password_file_name_compares_exactly(self):
        self.assertIsNotNone(self.policy.identify(ClientInfo("192.0.2.9", user="Alice")))
        self.assertIsNone(self.policy.identify(ClientInfo("192.0.2.9", user="alice")))
        self.assertEqual(self.policy.check_recipient(
            ClientInfo("192.0.2.9", user="alice"), "", "x@example.com").code, 550)

    def test_the_realm_marks_folded_logins(self):
        _, avatar, _ = RelayRealm().requestAvatar(FoldedLogin("alice"), None, IRelayUser)
        self.assertEqual((avatar.name, avatar.folded), ("alice", True))
        _, avatar, _ = RelayRealm().requestAvatar(b"Alice", None, IRelayUser)
        self.assertEqual((avatar.name, avatar.folded), ("Alice", False))


def start_auth(harness: Harness, peer: str, password: str = "wrong"):
    client = harness.connect(peer=peer, tls=True)
    client.cmd("EHLO client.test")
    return client, client.cmd("AUTH PLAIN " + b64(b"\0alice\0" + password.encode()))


class AuthCountingTests(unittest.TestCase):
    def test_parallel_checks_from_one_ip_are_bounded_by_the_limit(self):
        checker = PendingChecker()
        harness = Harness(portal=build_portal([checker]), limits=config.Limits(auth_failures_per_minute=3))
        replies = [start_auth(harness, "192.0.2.1")[1] for _ in range(6)]
        self.assertEqual(len(checker.pending), 3)          # only three guesses ever reach the checker
        self.assertEqual(replies[:3], [""] * 3)
        for reply in replies[3:]:
            self.assertTrue(reply.startswith("421 4.7.0 "), reply)

    def test_a_success_refunds_its_attempt(self):
        harness = Harness(portal=memory_portal(alice="s3cret"), limits=config.Limits(auth_failures_per_minute=2))
        for _ in range(5):
            self.assertTrue(start_auth(harness, "192.0.2.1", "s3cret")[1].startswith("235 "))
        self.assertEqual(harness.factory.auth_failures.count("192.0.2.1"), 0)

    def test_failures_count_per_64(self):
        harness = Harness(portal=memory_portal(alice="s3cret"), limits=config.Limits(auth_failures_per_minute=1))
        client, reply = start_auth(harness, "2001:db8::1")
        harness.clock.advance(1)
        self.assertTrue(client.transport.value().decode().startswith("535 5.7.8"))
        self.assertTrue(start_auth(harness, "2001:db8::2", "s3cret")[1].startswith("421 4.7.0"))
        self.assertTrue(start_auth(harness, "2001:db8:0:1::1", "s3cret")[1].startswith("235 "))

    def test_connections_count_per_64(self):
        harness = Harness(limits=config.Limits(max_connections_per_ip=1))
        self.assertTrue(harness.connect(peer="2001:db8::1").greeting.startswith("220 "))
        self.assertTrue(harness.connect(peer="2001:db8::2").greeting.startswith("421 4.7.0"))
        self.assertTrue(harness.connect(peer="2001:db8:0:1::1").greeting.startswith("220 "))

    def test_a_lowered_limit_applies_at_once_to_an_ip_already_counted(self):
        limits = config.Limits(auth_failures_per_minute=5)
        harness = Harness(portal=memory_portal(alice="s3cret"), limits=limits)
        for _ in range(2):
            start_auth(harness, "192.0.2.1")
            harness.clock.advance(1)
        factory = harness.factory
        factory.reconfigure(limits=config.Limits(auth_failures_per_minute=2), portal=factory.portal,
                            mechanisms=factory.mechanisms, policy=factory.policy)
        self.assertTrue(start_auth(harness, "192.0.2.1", "s3cret")[1].startswith("421 4.7.0"))
        self.assertTrue(start_auth(harness, "192.0.2.2", "s3cret")[1].startswith("235 "))
