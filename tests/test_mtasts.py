"""MTA-STS (RFC 8461) without the network: the TXT record and policy grammars, MX pattern matching, the
durable cache, and the discovery rules driven by a task.Clock (expiry, refresh, id change, failures).
"""
from __future__ import annotations

import json

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface import implementer

from mailrelay.outbound.dns import Lookup, temporary
from mailrelay.outbound.mtasts import (
    MAX_AGE_LIMIT, MTASTS, REFRESH_AFTER, RETRY_AFTER, FetchFailed, PolicyInvalid, mx_matches, parse_policy,
    parse_txt, policy_url,
)
from mailrelay.outbound.mtasts_cache import PolicyCache, file_name
from mailrelay.interfaces import IDNSLookup

GOOD = b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n"


class TXTTests(unittest.TestCase):
    def test_the_id(self):
        self.assertEqual(parse_txt(["v=STSv1; id=20160831085700Z;"]), "20160831085700Z")
        self.assertEqual(parse_txt(["v=STSv1;id=abc"]), "abc")
        self.assertEqual(parse_txt(["v=STSv1; id=abc; ext=value"]), "abc")

    def test_other_records_are_discarded(self):
        self.assertEqual(parse_txt(["v=spf1 -all", "v=STSv1; id=abc;"]), "abc")

    def test_not_exactly_one_record_is_no_policy(self):
        self.assertIsNone(parse_txt([]))
        self.assertIsNone(parse_txt(["v=STSv1; id=a;", "v=STSv1; id=b;"]))

    def test_bad_records(self):
        for text in ["v=STSv1;", "v=STSv1; id=", "v=STSv1; id=a-b", "v=STSv1; id=" + "a" * 33, "v=STSv2; id=a",
                     "v=STSv1; id=a; id=b", "v=STSv1; id=a; bad", " v=STSv1; id=a", "v=STSv1x; id=a"]:
            self.assertIsNone(parse_txt([text]), text)


class PolicyTests(unittest.TestCase):
    def test_a_good_policy(self):
        policy = parse_policy(GOOD)
        self.assertEqual((policy.mode, policy.max_age, policy.mx),
                         ("enforce", 86400, ("mail.example.com", "*.example.net")))
        self.assertEqual(policy.strings[0], "version: STSv1")

    def test_lf_line_ends_and_unknown_keys(self):
        policy = parse_policy(b"version: STSv1\nmode: testing\nmx: mx.example.org\nmax_age: 0\nfuture_key: x\n")
        self.assertEqual((policy.mode, policy.max_age), ("testing", 0))

    def test_mode_none_needs_no_mx(self):
        self.assertEqual(parse_policy(b"version: STSv1\nmode: none\nmax_age: 100\n").mx, ())

    def test_invalid_policies(self):
        bad = [
            b"mode: enforce\nmx: a.example\nmax_age: 1\n",                                   # no version
            b"version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
            b"version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
            b"version: STSv1\nmode: enforce\nmax_age: 1\n",                                  # no mx
            b"version: STSv1\nmode: enforce\nmx: a.example\n",                               # no max_age
            b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
            b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: %d\n" % (MAX_AGE_LIMIT + 1),
            b"version: STSv1\nmode: enforce\nmode: none\nmx: a.example\nmax_age: 1\n",
            b"version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 1\n",
            b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\njunk line\n",
            b"<html>version: STSv1</html>",
            b"\xff\xfe",
        ]
        for body in bad:
            self.assertRaises(PolicyInvalid, parse_policy, body)

    def test_mx_patterns(self):
        self.assertTrue(mx_matches("mail.example.com", "MAIL.example.com."))
        self.assertTrue(mx_matches("*.example.com", "mx1.example.com"))
        self.assertFalse(mx_matches("*.example.com", "example.com"))
        self.assertFalse(mx_matches("*.example.com", "a.b.example.com"))        # one label only
        self.assertFalse(mx_matches("mail.example.com", "mail.example.com.evil"))

    def test_url(self):
        self.assertEqual(policy_url("example.com"), "https://mta-sts.example.com/.well-known/mta-sts.txt")
        self.assertEqual(policy_url("example.com", 8443), "https://mta-sts.example.com:8443/.well-known/mta-sts.txt")


class CacheTests(unittest.TestCase):
    def test_survives_a_new_cache_object_and_expires(self):
        spool = self.mktemp()
        PolicyCache(spool).put("Example.COM", parse_policy(GOOD), "id1", 1000.0)
        cache = PolicyCache(spool)
        cached = cache.get("example.com", 1000.0 + 86399)
        self.assertEqual((cached.policy_id, cached.policy.mode), ("id1", "enforce"))
        self.assertIsNone(PolicyCache(spool).get("example.com", 1000.0 + 86400))
        self.assertEqual(PolicyCache(spool).domains(), [])        # the expired file is gone

    def test_a_broken_file_is_ignored(self):
        spool = self.mktemp()
        cache = PolicyCache(spool)
        cache.put("example.com", parse_policy(GOOD), "id1", 0.0)
        path = cache.directory / "example.com.json"
        path.write_text(json.dumps({"domain": "example.com", "id": "x", "fetched_at": 0, "policy": "junk"}))
        self.assertIsNone(PolicyCache(spool).get("example.com", 1.0))

    def test_file_names(self):
        self.assertEqual(file_name("Bücher.example"), "xn--bcher-kva.example.json")
        self.assertIsNone(file_name("../etc"))
        self.assertIsNone(file_name("a/b.example"))


@implementer(IDNSLookup)
class FakeDNS:
    """TXT answers from a dict; a name mapped to None fails temporarily."""

    def __init__(self):
        self.txt: dict = {}

    def lookup(self, name, rdtype):
        value = self.txt.get(name, ())
        if value is None:
            return defer.fail(temporary(name, "SERVFAIL"))
        return defer.succeed(Lookup(tuple(value), False, exists=bool(value)))


class DiscoveryTests(unittest.TestCase):
    """MTASTS.policy_for with a fake DNS and a fake fetch, on a task.Clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.dns = FakeDNS()
        self.bodies: dict = {"example.com": GOOD}
        self.fetched: list = []
        self.sts = MTASTS(self.dns, self.fetch, PolicyCache(self.mktemp()), self.clock)

    def fetch(self, domain):
        self.fetched.append(domain)
        body = self.bodies.get(domain)
        if isinstance(body, Exception):
            return defer.fail(body)
        return defer.succeed(body)

    def answer(self, domain="example.com"):
        return self.successResultOf(self.sts.policy_for(domain))

    def test_no_txt_no_fetch(self):
        answer = self.answer()
        self.assertIsNone(answer.policy)
        self.assertEqual(self.fetched, [])

    def test_fetched_once_then_cached_until_the_id_changes(self):
        self.dns.txt["_mta-sts.example.com"] = ["v=STSv1; id=one"]
        self.assertEqual(self.answer().policy.mode, "enforce")
        self.assertTrue(self.answer().cached)
        self.assertEqual(len(self.fetched), 1)
        self.dns.txt["_mta-sts.example.com"] = ["v=STSv1; id=two"]
        self.bodies["example.com"] = GOOD.replace(b"enforce", b"testing")
        self.assertEqual(self.answer().policy.mode, "testing")
        self.assertEqual(len(self.fetched), 2)

    def test_refreshed_after_a_day_and_expired_after_max_age(self):
        self.dns.txt["_mta-sts.example.com"] = ["v=STSv1; id=one"]
        self.answer()
        self.clock.advance(REFRESH_AFTER / 2)          # half the policy's max_age: renewed before it expires
        self.bodies["example.com"] = FetchFailed("sts-policy-fetch-error", "HTTP status 500")
        answer = self.answer()
        self.assertEqual(len(self.fetched), 2)
        self.assertEqual(answer.policy.mode, "enforce")           # the cached policy holds
        self.assertEqual(answer.problem[0], "sts-policy-fetch-error")
        self.clock.advance(10)
        self.assertEqual(len(self.fetched), 2)                    # RETRY_AFTER: not asked again so soon
        self.answer()
        self.assertEqual(len(self.fetched), 2)
        self.clock.advance(RETRY_AFTER)
        self.answer()
        self.assertEqual(len(self.fetched), 3)
        self.dns.txt.clear()
        self.clock.advance(REFRESH_AFTER / 2)                     # max_age passed: the policy is gone
        self.assertIsNone(self.answer().policy)

    def test_a_temporary_dns_failure_keeps_the_cached_policy(self):
        self.dns.txt["_mta-sts.example.com"] = ["v=STSv1; id=one"]
        self.answer()
        self.dns.txt["_mta-sts.example.com"] = None
        self.assertEqual(self.answer().policy.mode, "enforce")

    def test_an_invalid_policy_is_reported_and_ignored(self):
        self.dns.txt["_mta-sts.example.com"] = ["v=STSv1; id=one"]
        self.bodies["example.com"] = b"version: STSv1\nmode: enforce\n"
        answer = self.answer()
        self.assertIsNone(answer.policy)
        self.assertEqual(answer.problem[0], "sts-policy-invalid")

    def test_concurrent_asks_share_one_fetch(self):
        self.dns.txt["_mta-sts.example.com"] = ["v=STSv1; id=one"]
        waiting = defer.Deferred()
        self.sts.fetch = lambda domain: (self.fetched.append(domain), waiting)[1]
        first, second = self.sts.policy_for("example.com"), self.sts.policy_for("example.com")
        waiting.callback(GOOD)
        self.assertEqual(self.successResultOf(first).policy, self.successResultOf(second).policy)
        self.assertEqual(len(self.fetched), 1)


    def test_an_internationalised_domain_is_asked_under_its_a_label(self):
        self.dns.txt["_mta-sts.xn--bcher-kva.example"] = ["v=STSv1; id=one"]
        self.bodies["xn--bcher-kva.example"] = GOOD
        self.assertEqual(self.answer("Bücher.example").policy.mode, "enforce")
        self.assertEqual(self.fetched, ["xn--bcher-kva.example"])
