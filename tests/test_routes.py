"""mailrelay.queue.routes: first-match routing by recipient domain, sender and attempt count."""
from __future__ import annotations

from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailrelay.config import Route
from mailrelay.queue.routes import Router
from mailrelay.interfaces import IRouter


class RouterTests(unittest.TestCase):
    def test_router_provides_irouter(self):
        self.assertTrue(verifyObject(IRouter, Router(())))

    def test_no_routes_means_direct_mx(self):
        self.assertIsNone(Router(()).route("a@example.org", "b@example.com", 0))

    def test_plain_domain_matches_the_domain_itself_not_subdomains(self):
        router = Router((Route("ses", recipients=("example.com",)),))
        self.assertEqual(router.route("a@x.org", "b@example.com", 0).transport, "ses")
        self.assertIsNone(router.route("a@x.org", "b@mail.example.com", 0))
        self.assertIsNone(router.route("a@x.org", "b@notexample.com", 0))

    def test_star_dot_domain_matches_subdomains_only(self):
        router = Router((Route("ses", recipients=("*.example.com",)),))
        self.assertEqual(router.route("a@x.org", "b@mail.example.com", 0).transport, "ses")
        self.assertEqual(router.route("a@x.org", "b@a.b.example.com", 0).transport, "ses")
        self.assertIsNone(router.route("a@x.org", "b@example.com", 0))
        self.assertIsNone(router.route("a@x.org", "b@badexample.com", 0))

    def test_star_matches_any_recipient(self):
        router = Router((Route("all"),))
        self.assertEqual(router.route("", "b@anything.test", 0).transport, "all")

    def test_matching_is_case_insensitive_and_ignores_trailing_dots(self):
        router = Router((Route("ses", recipients=("Example.COM.",), senders=("App.Example.org",)),))
        self.assertEqual(router.route("X@APP.example.ORG", "b@EXAMPLE.com", 0).transport, "ses")

    def test_sender_exact_address_and_domain_patterns(self):
        router = Router((
            Route("exact", senders=("noreply@example.org",)),
            Route("sub", senders=("*.example.org",)),
            Route("dom", senders=("example.org",)),
        ))
        self.assertEqual(router.route("NoReply@Example.org", "r@x.test", 0).transport, "exact")
        self.assertEqual(router.route("a@app.example.org", "r@x.test", 0).transport, "sub")
        self.assertEqual(router.route("someone@example.org", "r@x.test", 0).transport, "dom")
        self.assertIsNone(router.route("someone@other.org", "r@x.test", 0))

    def test_null_sender_matches_only_star(self):
        router = Router((Route("dom", senders=("example.org",)), Route("any", senders=("*",))))
        self.assertEqual(router.route("", "r@x.test", 0).transport, "any")
        self.assertIsNone(Router((Route("dom", senders=("example.org",)),)).route("", "r@x.test", 0))

    def test_after_attempts_applies_only_from_that_many_failures(self):
        router = Router((Route("fallback", after_attempts=3),))
        self.assertIsNone(router.route("a@x.org", "b@y.org", 0))
        self.assertIsNone(router.route("a@x.org", "b@y.org", 2))
        self.assertEqual(router.route("a@x.org", "b@y.org", 3).transport, "fallback")
        self.assertEqual(router.route("a@x.org", "b@y.org", 10).transport, "fallback")

    def test_first_match_wins(self):
        router = Router((
            Route("late", recipients=("gmail.com",), after_attempts=2),
            Route("first", recipients=("gmail.com", "*.outlook.com")),
            Route("second", recipients=("*",)),
        ))
        self.assertEqual(router.route("a@x.org", "b@gmail.com", 0).transport, "first")
        self.assertEqual(router.route("a@x.org", "b@gmail.com", 2).transport, "late")
        self.assertEqual(router.route("a@x.org", "b@eu.outlook.com", 0).transport, "first")
        self.assertEqual(router.route("a@x.org", "b@yahoo.com", 0).transport, "second")

    def test_recipient_without_domain_matches_only_star(self):
        router = Router((Route("dom", recipients=("example.com",)),))
        self.assertIsNone(router.route("a@x.org", "postmaster", 0))
        self.assertEqual(Router((Route("any"),)).route("a@x.org", "postmaster", 0).transport, "any")
