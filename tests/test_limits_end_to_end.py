"""The limits over real loopback sockets: AUTH guesses racing on parallel connections against a slow
checker, IPv6 clients on ::1 counted per /64, a postmaster flood from a host no rule names, and LDAP
logins in any case as one identity against a real slapd (plus the nested-group size guard)."""
from __future__ import annotations

import base64
import socket

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol, reactor, task
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SkipTest
from zope.interface import implementer

from mailrelay import config
from mailrelay.server import ldap
from mailrelay.server.factory import RelayServerFactory
from mailrelay.server.realm import FoldedLogin, build_portal
from tests.support import slapd as fixture
from tests.support.access import (
    FOREIGN_HOST, NETWORK_ONLY, RECIPIENT_RULES, SENDER_RULES, Client, RelayTestCase, message, status, submit,
)
from tests.support.ldapauth import DIRECT_BIND, SlapdTestCase, ldap_section, login
from tests.support.logcapture import LogLines
from tests.support.network import HOSTNAME, NetworkTestBase, SMTPTestClient, TrackedSession
from tests.support.polling import eventually

CHECK_TIME = 2.0     # seconds the slow checker takes for each answer


@implementer(ICredentialsChecker)
class SlowChecker:
    """A directory that takes CHECK_TIME to answer: accepts `password` for "alice", refuses anything
    else; `calls` counts the checks asked for (the guesses an attacker got tested)."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, password: bytes):
        self.password, self.calls = password, 0

    def requestAvatarId(self, credentials):
        self.calls += 1
        good = credentials.username == b"alice" and credentials.password == self.password
        d = task.deferLater(reactor, CHECK_TIME, lambda: None)
        return d.addCallback(lambda _: "alice" if good else defer.fail(UnauthorizedLogin()))


def plain(user: bytes, password: bytes) -> str:
    return base64.b64encode(b"\0" + user + b"\0" + password).decode("ascii")


class ParallelGuessTests(NetworkTestBase):
    timeout = 60

    @defer.inlineCallbacks
    def test_parallel_connections_get_no_more_guesses_than_the_limit(self):
        checker = SlowChecker(b"the right one")
        self.listen(kind="submissions", implicit_tls=True, portal=build_portal([checker]),
                    limits=config.Limits(auth_failures_per_minute=3))
        clients = []
        for _ in range(8):
            client, _ = yield self.connect(implicit_tls=True)
            yield client.send("EHLO client.test\r\n")
            clients.append(client)
        # Seven wrong guesses at once: three are checked (slowly), the other four are turned away at once.
        pending = [c.send(f"AUTH PLAIN {plain(b'alice', b'guess %d' % i)}\r\n") for i, c in enumerate(clients[:7])]
        yield eventually(lambda: sum(d.called for d in pending) >= 4, timeout=CHECK_TIME / 2, interval=0.05)
        # The right password while those three checks are still running: no failure has been
        # recorded yet, and still it gets no check.
        self.assertEqual(checker.calls, 3)
        right = yield clients[7].send(f"AUTH PLAIN {plain(b'alice', b'the right one')}\r\n")
        self.assertTrue(right.startswith("421 4.7.0"), right)
        replies = yield defer.gatherResults(pending)
        self.assertEqual(checker.calls, 3)
        self.assertEqual(sorted(r[:9] for r in replies), ["421 4.7.0"] * 4 + ["535 5.7.8"] * 3)


class IPv6LoopbackTests(NetworkTestBase):
    """A listener on ::1; every client there has the key "::/64"."""

    timeout = 30

    def setUp(self):
        super().setUp()
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", 0))
        except OSError as e:
            raise SkipTest(f"no IPv6 loopback: {e}") from None

    def listen6(self, limits: config.Limits, portal=None) -> RelayServerFactory:
        factory = RelayServerFactory(
            hostname=HOSTNAME, listener=config.Listener("submissions", "tcp6:0"), limits=limits,
            portal=portal, mechanisms=("PLAIN",), policy=self.policy, queue=self.queue)
        factory.protocol = TrackedSession
        factory.sessions = []
        port = reactor.listenTCP(0, TLSMemoryBIOFactory(self.server_tls, False, factory), interface="::1")
        self.addCleanup(self._stop, port, factory)
        self.port_number = port.getHost().port
        return factory

    @defer.inlineCallbacks
    def connect6(self):
        client = SMTPTestClient()
        factory = TLSMemoryBIOFactory(self.client_tls, True, protocol.ClientFactory.forProtocol(lambda: client))
        reactor.connectTCP("::1", self.port_number, factory)
        yield client.connected_d
        self.addCleanup(self._close_client, client)
        greeting = yield client.reply()
        return client, greeting

    @defer.inlineCallbacks
    def test_auth_failures_from_ipv6_are_counted_under_the_64(self):
        factory = self.listen6(config.Limits(auth_failures_per_minute=1), portal=build_portal([SlowChecker(b"pw")]))
        client, greeting = yield self.connect6()
        self.assertTrue(greeting.startswith("220 "))
        yield client.send("EHLO client.test\r\n")
        reply = yield client.send(f"AUTH PLAIN {plain(b'alice', b'wrong')}\r\n")
        self.assertTrue(reply.startswith("535 5.7.8"), reply)
        self.assertEqual(factory.auth_failures.count("::/64"), 1)
        again, _ = yield self.connect6()
        yield again.send("EHLO client.test\r\n")
        reply = yield again.send(f"AUTH PLAIN {plain(b'alice', b'pw')}\r\n")
        self.assertTrue(reply.startswith("421 4.7.0"), reply)

    @defer.inlineCallbacks
    def test_connections_from_ipv6_are_capped_per_64(self):
        factory = self.listen6(config.Limits(max_connections_per_ip=1))
        _, first = yield self.connect6()
        _, second = yield self.connect6()
        self.assertEqual((first[:3], second[:9]), ("220", "421 4.7.0"))
        self.assertEqual(factory.connections._per_ip, {"::/64": 1})


class PostmasterFloodTests(RelayTestCase):
    @defer.inlineCallbacks
    def test_a_host_no_rule_names_is_rate_limited_even_to_the_postmaster(self):
        relay = self.start_relay(NETWORK_ONLY, "[limits]\nmessages_per_minute = 2\n",
                                 top='postmaster = "admin@allowed.example"\n')

        def flood():
            client = Client(relay, source=FOREIGN_HOST)
            replies = []
            for i in range(3):
                reply = status(client.mail("someone@elsewhere.example"))
                replies.append(reply)
                if reply[0] != 250:
                    break
                replies += [status(client.rcpt("postmaster")),
                            status(client.data(message(sender="someone@elsewhere.example", subject=f"n{i}")))]
            client.quit()
            return replies

        replies = yield self.run_client(flood)
        self.assertEqual(replies, [(250, "2.1.0"), (250, "2.1.5"), (250, "2.0.0")] * 2 + [(450, "4.7.1")])
        yield self.settle(relay, ["admin@allowed.example"] * 2)


ALICE_ONLY = '[[permit]]\nusers = ["alice"]\n' + SENDER_RULES + RECIPIENT_RULES


class LDAPIdentityTests(RelayTestCase):
    def setUp(self):
        super().setUp()
        self.slapd = fixture.shared_slapd()

    @defer.inlineCallbacks
    def test_alice_in_any_case_is_one_identity_for_rules_budgets_and_logs(self):
        logs = LogLines(self)
        relay = self.start_relay(ALICE_ONLY, "[limits]\nmessages_per_minute = 2\n\n" + ldap_section(
            [self.slapd.ldap_url], self.slapd.ca_file, starttls=True, rest=DIRECT_BIND))
        password = fixture.USERS["alice"]
        # `users = ["alice"]` matches ALICE: without it MAIL would pass and every RCPT be 550 5.7.1.
        first = yield self.run_client(submit, relay, "ALICE", password, "PLAIN", "one")
        second = yield self.run_client(submit, relay, "Alice", password, "PLAIN", "two")
        third = yield self.run_client(submit, relay, "alice", password, "PLAIN", "three")
        ok = [(235, "2.7.0"), (250, "2.1.0"), (250, "2.1.5"), (250, "2.0.0")]
        self.assertEqual((first, second), (ok, ok))
        self.assertEqual(third, [(235, "2.7.0"), (450, "4.7.1")])     # one budget of 2 for all three
        yield self.settle(relay, ["one@allowed.example", "two@allowed.example"])
        self.assertIn("LDAP login accepted for alice", logs.text())
        self.assertNotIn("accepted for ALICE", logs.text())
        self.assertNotIn("accepted for Alice", logs.text())

    @defer.inlineCallbacks
    def test_password_file_names_stay_exact(self):
        relay = self.start_relay('[[permit]]\nusers = ["app1"]\n' + SENDER_RULES + RECIPIENT_RULES)

        def converse():
            client = Client(relay, "submissions", FOREIGN_HOST)
            replies = [status(client.login("APP1", relay.users["app1"])),
                       status(client.login("app1", relay.users["app1"]))]
            client.quit()
            return replies

        replies = yield self.run_client(converse)
        self.assertEqual(replies, [(535, "5.7.8"), (235, "2.7.0")])


class LDAPCheckerTests(SlapdTestCase):
    async def test_a_login_in_capitals_is_the_case_folded_identity(self):
        checker = self.checker(bind_dn="uid={user}," + fixture.PEOPLE)
        name = await login(checker, "ALICE", fixture.USERS["alice"])
        self.assertEqual(name, "alice")
        self.assertIsInstance(name, FoldedLogin)

    async def test_the_nested_group_size_guard_refuses_and_says_why(self):
        # dave is in mail-senders only through team-a and team-b: with room for one group, the walk
        # stops at the guard, which must refuse the login (535), not fail on a NameError (454).
        self.patch(ldap, "MAX_NESTED_GROUPS", 1)
        logs = LogLines(self)
        checker = self.search_checker(require_group=fixture.MAIL_SENDERS)
        await self.refused(login(checker, "dave", fixture.USERS["dave"]))
        self.assertIn("more than 1 groups around require_group", logs.text())
        self.assertNotIn("NameError", logs.text())
