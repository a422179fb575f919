"""mailrelay.server.policy and mailrelay.server.ratelimit: who may relay what, and how often."""
from __future__ import annotations

import ipaddress
import re

from twisted.internet import task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailrelay.config import Limits, Permit
from mailrelay.envelope import ClientInfo
from mailrelay.interfaces import IRelayPolicy, Reply
from mailrelay.mailboxes import from_addresses, normal_domain, routing_trick
from mailrelay.server.policy import PermitPolicy
from mailrelay.server.ratelimit import RateLimiter

net = ipaddress.ip_network

LAN = ClientInfo("10.1.2.3")
LAN_OTHER = ClientInfo("10.200.0.1")
LAN6 = ClientInfo("2001:db8::5")
LAN_MAPPED = ClientInfo("::ffff:10.1.2.3")
OUTSIDER = ClientInfo("192.0.2.9")
OUTSIDER6 = ClientInfo("2001:db9::1")
OUTSIDER_MAPPED = ClientInfo("::ffff:192.0.2.9")
ALICE = ClientInfo("192.0.2.9", user="alice", listener="submission")
ALICE_ON_LAN = ClientInfo("10.1.2.3", user="alice", listener="submission")
BOB = ClientInfo("198.51.100.7", user="bob", listener="submission")

# The [[permit]] rules of the configuration contract's example.
SPEC_PERMITS = (
    Permit(networks=(net("10.0.0.0/8"), net("2001:db8::/32")),
           senders=("app.example.org", "noreply@example.org")),
    Permit(users=("*",), senders=("example.org",), check_from_header=True),
    Permit(anyone=True, recipients=("example.org",)),
)
NETWORK_ONLY = (Permit(networks=(net("10.0.0.0/8"), net("2001:db8::/32")), recipients=("example.org",)),)
NETWORK_ANYWHERE = (Permit(networks=(net("10.0.0.0/8"),)),)
USERS_ONLY = (Permit(users=("*",), senders=("example.org",), recipients=("example.org", "*.example.net")),)
USERS_ANYWHERE = (Permit(users=("*",)),)

# Addresses that must never be relayed, whoever asks and whatever `recipients` says.
TRICKS = (
    "user%evil.example@example.org",              # percent hack
    "user%evil.example%example.org@example.org",
    "evil.example!user@example.org",              # UUCP bang path
    "@example.org:user@evil.example",             # source route
    "@a.example,@example.org:user@evil.example",
    "user@evil.example@example.org",              # two @
    "user@example.org@evil.example",
    '"user@evil.example"@example.org',            # quoted local parts hiding routing
    '"user%evil.example"@example.org',
    '"evil.example!user"@example.org',
    '"a@evil.example,b"@example.org',
    '"<user@evil.example>"@example.org',
    '"user\\@evil.example"@example.org',
    '"unbalanced@example.org',
    '""@example.org',
    "user@[192.0.2.1]",                           # address literals
    "user@[IPv6:2001:db8::1]",
    "user@192.0.2.1",                             # bare IP: not a domain
    "user@localhost",                             # dotless
    "user@example.org.",                          # trailing dot
    "user@-bad.example.org",
    "user@bad-.example.org",
    "user@exa_mple.org",
    "user@example..org",
    "user@exam ple.org",
    "user@" + "a" * 64 + ".example.org",          # label longer than 63
    "user@" + ".".join(["abcdefghi"] * 26) + ".org",   # domain longer than 253
    "us er@example.org",
    "user,other@example.org",
    "user:x@example.org",
    ".user@example.org",
    "user.@example.org",
    "us..er@example.org",
    "user\r\n@example.org",
    "user\x00@example.org",
    "user@",
    "@example.org",
    "user",
    "",
)
PLAIN = ("user@example.org", "first.last+tag@example.org", "o'brien@example.org", "USER@EXAMPLE.ORG")

ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")


class ReplyAssertions:
    def assertRefused(self, reply, code: int, status: str):
        self.assertIsInstance(reply, Reply)
        self.assertEqual((reply.code, reply.status), (code, status), str(reply))
        self.assertTrue(ENHANCED.match(reply.status))
        self.assertEqual(str(reply.code)[0], reply.status[0])


class RuleMatchingTests(ReplyAssertions, unittest.TestCase):
    def test_policy_provides_the_interface(self):
        self.assertTrue(verifyObject(IRelayPolicy, PermitPolicy(SPEC_PERMITS, Limits())))

    def test_identity_is_the_user_the_rule_or_none(self):
        policy = PermitPolicy(SPEC_PERMITS, Limits())
        table = [(LAN, "permit[0]"), (LAN6, "permit[0]"), (LAN_MAPPED, "permit[0]"), (ALICE, "alice"),
                 (ALICE_ON_LAN, "alice"), (OUTSIDER, "permit[2]")]
        for client, identity in table:
            self.assertEqual(policy.identify(client), identity, client)
        strict = PermitPolicy(NETWORK_ONLY + (Permit(users=("alice",)),), Limits())
        for client, identity in [(OUTSIDER, None), (OUTSIDER6, None), (OUTSIDER_MAPPED, None), (BOB, None),
                                 (LAN, "permit[0]"), (ALICE, "alice")]:
            self.assertEqual(strict.identify(client), identity, client)

    def test_ipv4_mapped_ipv6_peer_matches_an_ipv4_network(self):
        policy = PermitPolicy(NETWORK_ANYWHERE, Limits())
        self.assertEqual(policy.identify(LAN_MAPPED), "permit[0]")
        self.assertIsNone(policy.check_recipient(LAN_MAPPED, "a@b.example", "x@gmail.com"))
        reply = policy.check_recipient(OUTSIDER_MAPPED, "a@b.example", "x@gmail.com")
        self.assertRefused(reply, 550, "5.7.1")

    def test_ipv4_mapped_network_in_the_config_matches_a_plain_ipv4_peer(self):
        policy = PermitPolicy((Permit(networks=(net("::ffff:10.0.0.0/104"),)),), Limits())
        self.assertEqual(policy.identify(LAN), "permit[0]")
        self.assertIsNone(policy.identify(OUTSIDER))

    def test_unparsable_peer_address_matches_no_network(self):
        policy = PermitPolicy(NETWORK_ANYWHERE, Limits())
        for address in ("", "unix:/tmp/sock", "10.1.2.3.4", "10.1.2.3:25"):
            self.assertIsNone(policy.identify(ClientInfo(address)), address)

    def test_first_matching_rule_decides(self):
        permits = (Permit(networks=(net("10.1.0.0/16"),), recipients=("example.org",)),
                   Permit(networks=(net("10.0.0.0/8"),)))
        policy = PermitPolicy(permits, Limits())
        self.assertRefused(policy.check_recipient(LAN, "", "x@gmail.com"), 550, "5.7.1")
        self.assertIsNone(policy.check_recipient(LAN_OTHER, "", "x@gmail.com"))

    def test_a_login_never_falls_back_to_the_network_rule(self):
        policy = PermitPolicy(SPEC_PERMITS, Limits())
        # unauthenticated from the LAN the app sender is allowed; logged in, alice is held to rule 1
        self.assertIsNone(policy.check_sender(LAN, "cron@app.example.org"))
        self.assertRefused(policy.check_sender(ALICE_ON_LAN, "cron@app.example.org"), 553, "5.7.1")
        only_network = PermitPolicy(NETWORK_ANYWHERE, Limits())
        self.assertIsNone(only_network.identify(ALICE_ON_LAN))
        self.assertRefused(only_network.check_recipient(ALICE_ON_LAN, "", "x@gmail.com"), 550, "5.7.1")

    def test_users_rule_names_users_and_ignores_unauthenticated_clients(self):
        policy = PermitPolicy((Permit(users=("alice", "carol")),), Limits())
        self.assertEqual(policy.identify(ALICE), "alice")
        self.assertIsNone(policy.identify(BOB))
        self.assertIsNone(policy.identify(ClientInfo("192.0.2.9", user="Alice")))
        self.assertIsNone(policy.identify(OUTSIDER))

    def test_anyone_rule_matches_unauthenticated_clients_only(self):
        policy = PermitPolicy((Permit(anyone=True, recipients=("example.org",)),), Limits())
        self.assertEqual(policy.identify(OUTSIDER6), "permit[0]")
        self.assertIsNone(policy.identify(ALICE))

    def test_rule_with_users_and_networks_needs_both(self):
        policy = PermitPolicy((Permit(users=("alice",), networks=(net("10.0.0.0/8"),)),), Limits())
        self.assertEqual(policy.identify(ALICE_ON_LAN), "alice")
        self.assertIsNone(policy.identify(ALICE))
        self.assertIsNone(policy.identify(LAN))


class RelayDecisionTests(ReplyAssertions, unittest.TestCase):
    def run_table(self, permits, table):
        """table rows: (client, sender, recipient, MAIL reply code or None, RCPT reply code or None)."""
        policy = PermitPolicy(permits, Limits())
        for client, sender, recipient, mail, rcpt in table:
            row = (client, sender, recipient)
            got_mail = policy.check_sender(client, sender)
            got_rcpt = policy.check_recipient(client, sender, recipient)
            self.assertEqual(got_mail and (got_mail.code, got_mail.status), mail, row)
            self.assertEqual(got_rcpt and (got_rcpt.code, got_rcpt.status), rcpt, row)

    def test_spec_example_battery(self):
        denied, bad_sender = (550, "5.7.1"), (553, "5.7.1")
        self.run_table(SPEC_PERMITS, [
            # the allowlisted network: its two senders, anywhere
            (LAN, "cron@app.example.org", "x@gmail.com", None, None),
            (LAN, "cron@APP.Example.ORG", "x@gmail.com", None, None),
            (LAN6, "noreply@example.org", "x@gmail.com", None, None),
            (LAN_MAPPED, "noreply@EXAMPLE.org", "x@outlook.com", None, None),
            (LAN, "NoReply@example.org", "x@gmail.com", bad_sender, None),
            (LAN, "ceo@example.org", "x@gmail.com", bad_sender, None),
            (LAN, "x@sub.app.example.org", "x@gmail.com", bad_sender, None),
            (LAN, "x@app.example.org.evil.example", "x@gmail.com", bad_sender, None),
            (LAN, "", "x@gmail.com", None, None),
            # any authenticated user: senders in example.org itself, anywhere
            (ALICE, "alice@example.org", "x@gmail.com", None, None),
            (ALICE, "alice@Example.Org", "x@gmail.com", None, None),
            (ALICE, "alice@sub.example.org", "x@gmail.com", bad_sender, None),
            (ALICE, "alice@notexample.org", "x@gmail.com", bad_sender, None),
            (ALICE, "alice@example.org.evil.example", "x@gmail.com", bad_sender, None),
            (ALICE, "", "x@gmail.com", None, None),
            # anyone: inbound for example.org only, from any sender, bounces included
            (OUTSIDER, "someone@gmail.com", "alice@example.org", None, None),
            (OUTSIDER, "", "alice@EXAMPLE.ORG", None, None),
            (OUTSIDER, "someone@gmail.com", "x@gmail.com", None, denied),
            (OUTSIDER6, "someone@gmail.com", "x@sub.example.org", None, denied),
            (OUTSIDER, "someone@gmail.com", "x@example.org.evil.example", None, denied),
        ])

    def test_subdomain_patterns_match_subdomains_only(self):
        permits = (Permit(users=("*",), senders=("*.example.org",), recipients=("*.example.net",)),)
        denied, bad_sender = (550, "5.7.1"), (553, "5.7.1")
        self.run_table(permits, [
            (ALICE, "a@sub.example.org", "x@deep.sub.example.net", None, None),
            (ALICE, "a@example.org", "x@example.net", bad_sender, denied),
            (ALICE, "a@xexample.org", "x@xexample.net", bad_sender, denied),
        ])

    def test_no_matching_rule_accepts_mail_and_refuses_every_recipient(self):
        policy = PermitPolicy(NETWORK_ONLY, Limits())
        self.assertIsNone(policy.check_sender(OUTSIDER, "someone@gmail.com"))
        for recipient in PLAIN + ("x@gmail.com",):
            reply = policy.check_recipient(OUTSIDER, "someone@gmail.com", recipient)
            self.assertRefused(reply, 550, "5.7.1")
            self.assertEqual(reply.text, "Relay access denied")

    def test_no_rules_at_all_relays_nothing(self):
        policy = PermitPolicy((), Limits())
        for client in (LAN, ALICE, OUTSIDER):
            self.assertIsNone(policy.identify(client))
            self.assertRefused(policy.check_recipient(client, "", "x@example.org"), 550, "5.7.1")

    def test_plain_addresses_relay_where_allowed(self):
        for permits, client in ((NETWORK_ONLY, LAN), (USERS_ONLY, ALICE), (USERS_ANYWHERE, BOB)):
            policy = PermitPolicy(permits, Limits())
            for recipient in PLAIN:
                self.assertIsNone(policy.check_recipient(client, "a@example.org", recipient), recipient)

    def test_idn_recipient_domain_matches_its_a_label_form(self):
        policy = PermitPolicy((Permit(users=("*",), recipients=("bücher.example",)),), Limits())
        self.assertIsNone(policy.check_recipient(ALICE, "", "x@xn--bcher-kva.example"))
        self.assertIsNone(policy.check_recipient(ALICE, "", "x@BÜCHER.example"))

    def test_no_open_relay_trick_relays_for_anybody(self):
        configs = {"network only": NETWORK_ONLY, "network, anywhere": NETWORK_ANYWHERE,
                   "users only": USERS_ONLY, "users, anywhere": USERS_ANYWHERE, "spec": SPEC_PERMITS}
        clients = (LAN, LAN6, LAN_MAPPED, OUTSIDER, OUTSIDER6, ALICE, ALICE_ON_LAN, BOB)
        for name, permits in configs.items():
            policy = PermitPolicy(permits, Limits())
            for client in clients:
                for trick in TRICKS:
                    reply = policy.check_recipient(client, "a@example.org", trick)
                    self.assertIsInstance(reply, Reply, (name, client, trick))
                    self.assertEqual((reply.code, reply.status), (550, "5.7.1"), (name, client, trick))

    def test_each_trick_is_named(self):
        for trick in TRICKS:
            self.assertIsNotNone(routing_trick(trick), trick)
        for plain in PLAIN + ("ü@bücher.example", '"john smith"@example.org', "a@b.c.example"):
            self.assertIsNone(routing_trick(plain), plain)
        self.assertEqual(routing_trick("user%evil@example.org"), "'%' routing in local part")
        self.assertEqual(routing_trick("user@[192.0.2.1]"), "address literal")
        self.assertEqual(routing_trick("@a.example:user@b.example"), "source route")

    def test_normal_domain(self):
        self.assertEqual(normal_domain("Example.ORG"), "example.org")
        self.assertEqual(normal_domain("bücher.example"), "xn--bcher-kva.example")
        for bad in ("", "localhost", "example.org.", "1.2.3.4", "a..b", "-a.example", "a_b.example"):
            self.assertIsNone(normal_domain(bad), bad)


class FromHeaderTests(ReplyAssertions, unittest.TestCase):
    def setUp(self):
        self.policy = PermitPolicy(SPEC_PERMITS, Limits())

    def check(self, client, header_block: bytes):
        return self.policy.check_message(client, "alice@example.org", header_block)

    def test_allowed_from_addresses_pass(self):
        for block in (b"From: Alice <alice@example.org>\r\nSubject: hi\r\n",
                      b"From: alice@EXAMPLE.org (Alice)\r\n",
                      b"From: =?utf-8?q?Al=C3=AFce?= <alice@example.org>\r\n",
                      "From: \"Ålice\" <alice@example.org>\r\n".encode("utf-8"),
                      b"From: Alice\r\n <alice@example.org>\r\n",
                      b"From: a@example.org, b@example.org\r\nSender: a@example.org\r\n"):
            self.assertIsNone(self.check(ALICE, block), block)

    def test_from_outside_the_senders_is_refused(self):
        for block in (b"From: boss@evil.example\r\n",
                      b"From: alice@example.org, boss@evil.example\r\n",
                      b"From: alice@example.org\r\nFrom: boss@evil.example\r\n",
                      b"From: alice@sub.example.org\r\n",
                      b'From: "alice@example.org" <boss@evil.example>\r\n',
                      b"From: =?utf-8?q?alice@example.org?= <boss@evil.example>\r\n"):
            reply = self.check(ALICE, block)
            self.assertRefused(reply, 550, "5.7.1")
            self.assertEqual(reply.text, "From header not allowed for this user")

    def test_missing_empty_or_ambiguous_from_is_refused(self):
        for block in (b"Subject: no from\r\n", b"From:\r\n", b"From: <>\r\n", b"From: undisclosed:;\r\n",
                      b"From: alice@example.org)<boss@evil.example>\r\n",      # CVE-2023-27043 shape
                      b"From: Alice <alice@example.org> <boss@evil.example>\r\n",
                      b"From: alice@example.org@evil.example\r\n"):
            self.assertRefused(self.check(ALICE, block), 550, "5.7.1")

    def test_junk_headers_never_raise(self):
        junk = (b"\xff\xfe\x00From: \x00\x01\r\n", b"From: \xff\xfe <alice@example.org>\r\n",
                b"From" + b"\r\n" * 50, b"From: " + b"<" * 5000 + b"\r\n", b"\r\n\r\n", b"",
                b"From: =?x-unknown?q?=FF?= <alice@example.org>\r\n", b": no name\r\nFrom: a@example.org\r\n")
        for block in junk:
            reply = self.check(ALICE, block)
            self.assertTrue(reply is None or reply.code == 550, block)
            found = from_addresses(block)
            self.assertTrue(found is None or isinstance(found, list), block)

    def test_network_clients_are_not_held_to_the_from_header_unless_their_rule_says_so(self):
        # The LAN rule's senders are app.example.org and noreply@example.org; check_from_header unset.
        self.assertIsNone(self.check(LAN, b"From: boss@evil.example\r\n"))
        held = PermitPolicy((Permit(networks=(net("10.0.0.0/8"),), senders=("app.example.org", "noreply@example.org"),
                                    check_from_header=True),), Limits())
        for block in (b"From: App <x@app.example.org>\r\n", b"From: noreply@EXAMPLE.org\r\n"):
            self.assertIsNone(held.check_message(LAN, "", block), block)
        for block in (b"From: ceo@example.org\r\n", b"From: boss@evil.example\r\n", b"Subject: none\r\n",
                      b"From: x@app.example.org, ceo@example.org\r\n"):
            reply = held.check_message(LAN, "", block)
            self.assertRefused(reply, 550, "5.7.1")
            self.assertEqual(reply.text, "From header not allowed for clients of this network")

    def test_users_rules_hold_the_from_header_unless_told_not_to(self):
        policy = PermitPolicy((Permit(users=("*",), senders=("example.org",)),), Limits())
        self.assertRefused(policy.check_message(ALICE, "", b"From: boss@evil.example\r\n"), 550, "5.7.1")

    def test_strangers_through_an_anyone_rule_or_no_rule_are_not_held_to_the_from_header(self):
        self.assertIsNone(self.check(OUTSIDER, b"From: ceo@example.org\r\n"))     # the gateway rule
        gateway = PermitPolicy((Permit(anyone=True, senders=("example.net",), recipients=("example.org",),
                                       check_from_header=True),), Limits())
        self.assertIsNone(gateway.check_message(OUTSIDER, "", b"From: ceo@example.org\r\n"))
        lonely = PermitPolicy(NETWORK_ONLY, Limits())            # OUTSIDER matches nothing: postmaster only
        self.assertIsNone(lonely.check_message(OUTSIDER, "", b"Subject: none\r\n"))

    def test_check_from_header_off_or_any_sender_skips_the_check(self):
        for permit in (Permit(users=("*",), senders=("example.org",), check_from_header=False),
                       Permit(users=("*",))):
            policy = PermitPolicy((permit,), Limits())
            self.assertIsNone(policy.check_message(ALICE, "", b"From: boss@evil.example\r\n"))
        for permit in (Permit(networks=(net("10.0.0.0/8"),), senders=("example.org",), check_from_header=False),
                       Permit(networks=(net("10.0.0.0/8"),), senders=("example.org",)),
                       Permit(networks=(net("10.0.0.0/8"),), check_from_header=True)):
            policy = PermitPolicy((permit,), Limits())
            self.assertIsNone(policy.check_message(LAN, "", b"From: boss@evil.example\r\n"))


class SigningSendersTests(unittest.TestCase):
    """Whose From: the relay may DKIM-sign: the senders of the rule that accepts the client."""

    def test_users_and_networks_get_their_rules_senders(self):
        policy = PermitPolicy(SPEC_PERMITS, Limits())
        self.assertEqual(policy.signing_senders(ALICE), ("example.org",))
        self.assertEqual(policy.signing_senders(LAN), ("app.example.org", "noreply@example.org"))
        self.assertEqual(PermitPolicy(NETWORK_ANYWHERE, Limits()).signing_senders(LAN), ("*",))

    def test_strangers_get_nothing(self):
        self.assertEqual(PermitPolicy(SPEC_PERMITS, Limits()).signing_senders(OUTSIDER), ())   # anyone rule
        self.assertEqual(PermitPolicy(NETWORK_ONLY, Limits()).signing_senders(OUTSIDER), ())   # no rule
        self.assertEqual(PermitPolicy(NETWORK_ONLY, Limits()).signing_senders(ALICE), ())      # no rule


class RateLimitTests(ReplyAssertions, unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.policy = PermitPolicy(SPEC_PERMITS, Limits(messages_per_minute=3), clock=self.clock)

    def test_limit_reached_gives_450_and_a_minute_later_mail_is_allowed_again(self):
        for _ in range(3):
            self.assertIsNone(self.policy.check_sender(ALICE, "alice@example.org"))
        self.assertRefused(self.policy.check_sender(ALICE, "alice@example.org"), 450, "4.7.1")
        self.clock.advance(10)
        self.assertRefused(self.policy.check_sender(ALICE, "alice@example.org"), 450, "4.7.1")
        self.clock.advance(50)
        for _ in range(3):
            self.assertIsNone(self.policy.check_sender(ALICE, "alice@example.org"))
        self.assertRefused(self.policy.check_sender(ALICE, "alice@example.org"), 450, "4.7.1")

    def test_identities_have_separate_budgets_and_a_network_rule_shares_one(self):
        for _ in range(3):
            self.assertIsNone(self.policy.check_sender(ALICE, "alice@example.org"))
        self.assertIsNone(self.policy.check_sender(ClientInfo("192.0.2.9", user="bob"), "bob@example.org"))
        for client in (LAN, LAN_OTHER, LAN6):
            self.assertIsNone(self.policy.check_sender(client, "noreply@example.org"))
        self.assertRefused(self.policy.check_sender(LAN_MAPPED, "noreply@example.org"), 450, "4.7.1")

    def test_a_user_named_like_a_rule_does_not_share_its_budget(self):
        impostor = ClientInfo("192.0.2.9", user="permit[0]")
        for _ in range(3):
            self.assertIsNone(self.policy.check_sender(impostor, "x@example.org"))
        self.assertIsNone(self.policy.check_sender(LAN, "noreply@example.org"))

    def test_refused_senders_do_not_use_up_the_budget(self):
        for _ in range(10):
            self.assertRefused(self.policy.check_sender(ALICE, "x@evil.example"), 553, "5.7.1")
        self.assertIsNone(self.policy.check_sender(ALICE, "alice@example.org"))

    def test_zero_means_no_limit(self):
        policy = PermitPolicy(SPEC_PERMITS, Limits(messages_per_minute=0), clock=self.clock)
        for _ in range(1000):
            self.assertIsNone(policy.check_sender(ALICE, "alice@example.org"))

    def test_memory_stays_bounded_under_100000_identities(self):
        limiter = RateLimiter(3, 60.0, self.clock, max_keys=10_000)
        for i in range(100_000):
            self.assertTrue(limiter.allow(f"user{i}"))
            self.assertLessEqual(len(limiter), 10_000)
        self.assertEqual(len(limiter), 10_000)
        # the most recently used keys are the ones remembered
        for _ in range(2):
            limiter.allow("user99999")
        self.assertFalse(limiter.allow("user99999"))
        self.clock.advance(60)
        limiter.allow("fresh")
        self.assertEqual(len(limiter), 1, "fully refilled buckets are forgotten")

    def test_policy_with_100000_users_keeps_a_bounded_number_of_buckets(self):
        for i in range(100_000):
            client = ClientInfo("192.0.2.9", user=f"u{i}")
            self.assertIsNone(self.policy.check_sender(client, "x@example.org"))
        self.assertLessEqual(len(self.policy._limiter), 10_000)

    def test_bucket_refills_gradually(self):
        limiter = RateLimiter(6, 60.0, self.clock)
        for _ in range(6):
            self.assertTrue(limiter.allow("k"))
        self.assertFalse(limiter.allow("k"))
        self.clock.advance(10)
        self.assertTrue(limiter.allow("k"))
        self.assertFalse(limiter.allow("k"))

    def test_limiter_refuses_nonsense_settings(self):
        for args in ((0,), (-1,), (1, 0), (1, 60.0, self.clock, 0)):
            self.assertRaises(ValueError, RateLimiter, *args)
