"""`[[throttle]]` in tap.conf: what is understood, and every refusal as one line naming file and key."""
from __future__ import annotations

from pathlib import Path

from twisted.trial import unittest

from mailrelay.config import ConfigError, Throttle, load
from mailrelay.queue.throttle import ThrottleRules

HEAD = 'hostname = "relay.test"\n'


class ThrottleConfigTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        self.path = self.dir / "tap.conf"

    def load(self, text: str):
        self.path.write_text(HEAD + text)
        return load(self.path)

    def assertRefused(self, text: str, key: str, *fragments: str) -> None:
        self.path.write_text(HEAD + text)
        error = self.assertRaises(ConfigError, load, self.path)
        message = str(error)
        self.assertEqual(error.key, key, message)
        self.assertTrue(message.startswith(f"{self.path}: {key}: "), message)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_the_contract_example_is_understood(self):
        config = self.load('[[throttle]]\ndomains = ["gmail.com", "GoogleMail.com"]\nmessages_per_minute = 120\n'
                           'connections = 5\npause = "1m"\n')
        self.assertEqual(config.throttles, (Throttle(("gmail.com", "googlemail.com"), 120, 5, 60.0),))
        self.assertEqual(config.throttles[0].interval, 0.5)

    def test_defaults_any_domain_no_rate_no_cap_a_minute_of_pause(self):
        self.assertEqual(self.load("").throttles, ())
        self.assertEqual(self.load("[[throttle]]\n").throttles, (Throttle(("*",), 0, 0, 60.0),))

    def test_pause_zero_means_never_and_bare_seconds_work(self):
        self.assertEqual(self.load('[[throttle]]\npause = "0"\n').throttles[0].pause, 0.0)
        self.assertEqual(self.load("[[throttle]]\npause = 90\n").throttles[0].pause, 90.0)

    def test_subdomain_patterns_match_as_route_recipients_do(self):
        rules = ThrottleRules(self.load('[[throttle]]\ndomains = ["*.example.com"]\nconnections = 1\n'
                                        '[[throttle]]\ndomains = "example.com"\nconnections = 2\n').throttles)
        self.assertEqual(rules.match("mx.Example.com.").connections, 1)
        self.assertEqual(rules.match("example.com").connections, 2)     # the domain itself: the second rule
        self.assertIsNone(rules.match("badexample.com"))
        self.assertIsNone(rules.match(""))

    def test_unknown_key_names_the_rule(self):
        self.assertRefused('[[throttle]]\ndomains = ["a.example"]\n[[throttle]]\nconnection = 5\n',
                           "throttle[1].connection", "unknown key", 'did you mean "connections"')

    def test_wrong_types(self):
        self.assertRefused("[[throttle]]\nmessages_per_minute = \"120\"\n", "throttle[0].messages_per_minute",
                           "expected an integer")
        self.assertRefused("[[throttle]]\nconnections = true\n", "throttle[0].connections", "expected an integer")
        self.assertRefused("[[throttle]]\ndomains = [1]\n", "throttle[0].domains[0]", "expected a string")
        self.assertRefused('throttle = "gmail.com"\n', "throttle", "expected an array of tables")

    def test_out_of_range_numbers(self):
        self.assertRefused("[[throttle]]\nmessages_per_minute = -1\n", "throttle[0].messages_per_minute",
                           "out of range")
        self.assertRefused("[[throttle]]\nconnections = -2\n", "throttle[0].connections", "out of range")

    def test_bad_and_too_long_pauses(self):
        self.assertRefused('[[throttle]]\npause = "soon"\n', "throttle[0].pause", "bad duration")
        self.assertRefused('[[throttle]]\npause = "2h"\n', "throttle[0].pause", "longer than 1h")

    def test_bad_domain_patterns(self):
        self.assertRefused('[[throttle]]\ndomains = ["user@gmail.com"]\n', "throttle[0].domains[0]",
                           "is an address")
        self.assertRefused('[[throttle]]\ndomains = ["gmail com"]\n', "throttle[0].domains[0]", "bad pattern")
        self.assertRefused("[[throttle]]\ndomains = []\n", "throttle[0].domains", "empty")

    def test_a_rule_after_a_catch_all_is_refused(self):
        self.assertRefused('[[throttle]]\ndomains = ["a.example"]\n[[throttle]]\ndomains = "*"\n'
                           '[[throttle]]\ndomains = ["gmail.com"]\n', "throttle[2]", "never applies",
                           "throttle[1] matches every domain")

    def test_mailrelay_check_prints_each_rule(self):
        import contextlib
        import io

        from mailrelay.cli import main as cli_main

        self.path.write_text(HEAD + '[[throttle]]\ndomains = ["gmail.com", "googlemail.com"]\n'
                             'messages_per_minute = 120\nconnections = 5\npause = "1m"\n'
                             '[[throttle]]\npause = "0"\n')
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(cli_main.main(["check", "--config", str(self.path)]), 0)
        text = out.getvalue()
        self.assertIn("each of gmail.com, googlemail.com: 120/min, 5 connections, pause 1m on 421 / 4.7.x, "
                      "doubling up to 1h", text)
        self.assertIn("each of *: no rate limit, no connection cap of its own, no pause", text)
