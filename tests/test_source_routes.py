"""Source routes (`<@hop,@hop:user@domain>`, RFC 5321 §4.1.1.3 and Appendix C) are accepted and their
route ignored, as the RFC says a server SHOULD: the permit rules judge `user@domain`, the spool keeps
`user@domain`, and the hops named in the route are never contacted.  A real RelaySession over a
StringTransport with the real PermitPolicy, for MAIL FROM and RCPT TO alike."""
from __future__ import annotations

import ipaddress

from twisted.trial import unittest

from mailrelay.config import Limits, Permit
from mailrelay.server.addresses import BAD_PATH, BAD_RCPT, parse_mail, parse_rcpt
from mailrelay.server.policy import PermitPolicy
from tests.support.session import Harness

# An unauthenticated network client that may send only from example.org to allowed.example.
RULES = (Permit(networks=(ipaddress.ip_network("127.0.0.1/32"),),
                senders=("example.org",), recipients=("allowed.example",)),)


class Parsing(unittest.TestCase):
    def test_the_route_is_dropped_and_the_mailbox_kept(self) -> None:
        self.assertEqual(parse_rcpt("TO:<@x.example:u@allowed.example>").recipient, "u@allowed.example")
        self.assertEqual(parse_rcpt("TO:<@a.example,@[192.0.2.1]:u@allowed.example>").recipient,
                         "u@allowed.example")
        self.assertEqual(parse_mail("FROM:<@x.example:app@example.org>").sender, "app@example.org")

    def test_what_is_not_a_route_is_refused(self) -> None:
        for path in ("@:u@allowed.example", "@x.example;u@allowed.example", "@x.example,u@allowed.example",
                     "@x..example:u@allowed.example", "@x.example:"):
            self.assertEqual(parse_rcpt(f"TO:<{path}>"), BAD_RCPT, path)
        # a route with no mailbox after it is not the null reverse-path <>
        self.assertEqual(parse_mail("FROM:<@x.example:>"), BAD_PATH)


class PermitDecision(unittest.TestCase):
    def setUp(self) -> None:
        self.harness = Harness(policy=PermitPolicy(RULES, Limits()))
        self.client = self.harness.connect("127.0.0.1")
        self.client.cmd("EHLO client.test")

    def test_a_routed_recipient_is_judged_and_spooled_as_its_mailbox(self) -> None:
        self.assertEqual(self.client.codes("MAIL FROM:<app@example.org>\r\n"), ["250 2.1.0"])
        # <@x:u@d> is u@d: allowed.example is in `recipients`, whatever the route names
        self.assertEqual(self.client.codes("RCPT TO:<@victim.example:u@allowed.example>\r\n"), ["250 2.1.5"])
        # ... and a route through an allowed domain does not make another domain allowed
        self.assertEqual(self.client.codes("RCPT TO:<@allowed.example:u@victim.example>\r\n"), ["550 5.7.1"])
        self.assertEqual(self.client.codes("RCPT TO:<@allowed.example,@allowed.example:v@victim.example>\r\n"),
                         ["550 5.7.1"])
        self.client.cmd("DATA")
        self.client.send(b"From: app@example.org\r\n\r\nbody\r\n.\r\n")
        (message,) = self.harness.queue.messages
        self.assertEqual(message.envelope.recipients, ("u@allowed.example",))   # no route left to follow

    def test_a_routed_sender_is_judged_as_its_mailbox(self) -> None:
        self.assertEqual(self.client.codes("MAIL FROM:<@example.org:app@victim.example>\r\n"), ["553 5.7.1"])
        self.assertEqual(self.client.codes("MAIL FROM:<@victim.example:app@example.org>\r\n"), ["250 2.1.0"])
        self.client.cmd("RCPT TO:<u@allowed.example>")
        self.client.cmd("DATA")
        self.client.send(b"From: app@example.org\r\n\r\nbody\r\n.\r\n")
        (message,) = self.harness.queue.messages
        self.assertEqual(message.envelope.sender, "app@example.org")
