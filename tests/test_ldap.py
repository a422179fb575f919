"""LDAP / Active Directory AUTH (mailrelay.server.ldap and its helpers).

Two kinds of tests: the conversation with a directory played by the test over StringTransport and a
MemoryReactorClock (what goes on the wire, timeouts, failover, lost connections), and logins against a
real OpenLDAP slapd on 127.0.0.1 (tests.support.slapd; skipped with a reason when slapd is not installed).
"""
from __future__ import annotations


from ldaptor.protocols import pureber, pureldap
from ldaptor.protocols.ldap.ldapserver import BaseLDAPServer
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailrelay.config import LDAPConfig
from mailrelay.server import ldap_text
from mailrelay.server.ldap import LDAPChecker
from mailrelay.server.ldap_cache import CredentialCache
from mailrelay.server.ldap_client import DirectoryError, LDAPConnection, connect
from mailrelay.server.realm import TemporaryAuthFailure
from tests.support.logcapture import LogLines
from tests.support import slapd as fixture
from tests.support.ldapauth import SlapdTestCase, login

BIND_DN = "uid={user}," + fixture.PEOPLE
SECRET = "s3cret-p\u00e4ss"


# -- names, escaping, URLs ---------------------------------------------------------------------------


class UsernameTests(unittest.SynchronousTestCase):
    def test_plain_and_utf8_names_are_accepted(self):
        self.assertEqual(ldap_text.check_username(b"alice"), "alice")
        self.assertEqual(ldap_text.check_username("j\u00fcrgen".encode("utf-8")), "j\u00fcrgen")

    def test_control_characters_are_refused(self):
        for name in ("alice\r\nuid=bob", "alice\x00", "alice\x7f", "ali\tce", "a\u2028b"):
            self.assertRaises(ldap_text.BadUsername, ldap_text.check_username, name)

    def test_names_over_256_characters_are_refused(self):
        self.assertEqual(len(ldap_text.check_username("a" * 256)), 256)
        self.assertRaises(ldap_text.BadUsername, ldap_text.check_username, "a" * 257)

    def test_empty_and_non_utf8_names_are_refused(self):
        self.assertRaises(ldap_text.BadUsername, ldap_text.check_username, b"")
        self.assertRaises(ldap_text.BadUsername, ldap_text.check_username, b"\xff\xfe")


class EscapingTests(unittest.SynchronousTestCase):
    def test_dn_specials_become_part_of_the_value(self):
        self.assertEqual(ldap_text.escape_dn_value("alice,ou=x"), r"alice\,ou\=x")
        self.assertEqual(ldap_text.escape_dn_value('a+b;c<d>e"f\\g'), r'a\+b\;c\<d\>e\"f\\g')

    def test_dn_leading_hash_and_edge_spaces_are_escaped(self):
        self.assertEqual(ldap_text.escape_dn_value("#x"), r"\#x")
        self.assertEqual(ldap_text.escape_dn_value(" x "), r"\ x\ ")
        self.assertEqual(ldap_text.escape_dn_value("a b"), "a b")

    def test_filter_specials_are_hex_escaped(self):
        self.assertEqual(ldap_text.escape_filter_value("*)(uid=*"), r"\2a\29\28uid=\2a")
        self.assertEqual(ldap_text.escape_filter_value("a\\b\0"), r"a\5cb\00")

    def test_substitute_replaces_only_the_user_placeholder(self):
        self.assertEqual(ldap_text.substitute("{user}@corp.example{x}", "bob"), "bob@corp.example{x}")


class URLTests(unittest.SynchronousTestCase):
    def test_default_ports_by_scheme(self):
        url = ldap_text.parse_url("ldap://dc1.corp.example")
        self.assertEqual(url, ldap_text.LDAPURL("ldap", "dc1.corp.example", 389))
        self.assertEqual(ldap_text.parse_url("LDAPS://dc1/"), ldap_text.LDAPURL("ldaps", "dc1", 636))

    def test_ipv6_literal_with_port(self):
        url = ldap_text.parse_url("ldap://[::1]:3389")
        self.assertEqual((url.host, url.port, url.is_ip, str(url)), ("::1", 3389, True, "ldap://[::1]:3389"))

    def test_other_schemes_and_url_parts_are_refused(self):
        for bad in ("http://dc1", "ldapi:///", "ldap://", "ldap://dc1/dc=x??sub", "ldap://dc1:99999"):
            self.assertRaises(ValueError, ldap_text.parse_url, bad)


# -- the cache -----------------------------------------------------------------------------------------


class CacheTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.cache = CredentialCache(60, self.clock)

    def test_same_password_hits_until_expiry(self):
        self.cache.remember("alice", b"pw")
        self.clock.advance(59)
        self.assertTrue(self.cache.check("alice", b"pw"))
        self.clock.advance(1)
        self.assertFalse(self.cache.check("alice", b"pw"))
        self.assertEqual(len(self.cache), 0)

    def test_other_password_or_user_misses(self):
        self.cache.remember("alice", b"pw")
        self.assertFalse(self.cache.check("alice", b"pw2"))
        self.assertFalse(self.cache.check("bob", b"pw"))

    def test_only_a_salted_hash_is_stored(self):
        self.cache.remember("alice", b"correct horse")
        other = CredentialCache(60, self.clock)
        other.remember("alice", b"correct horse")
        stored = self.cache._entries["alice"].digest
        self.assertNotIn(b"correct horse", stored)
        self.assertNotEqual(stored, other._entries["alice"].digest)   # per-instance random salt

    def test_zero_ttl_disables_the_cache(self):
        cache = CredentialCache(0, self.clock)
        cache.remember("alice", b"pw")
        self.assertFalse(cache.check("alice", b"pw"))


# -- the conversation, played by the test ---------------------------------------------------------------


def reply(response, msg_id: int) -> bytes:
    """A directory's response to request `msg_id`, on the wire."""
    return pureldap.LDAPMessage(response, id=msg_id).toWire()


def requests_in(transport: StringTransport) -> list:
    """The LDAPMessages the client wrote so far."""
    data, out = transport.value(), []
    while data:
        msg, used = pureber.berDecodeObject(BaseLDAPServer.berdecoder, data)
        out.append(msg)
        data = data[used:]
    return out


class PlayedDirectory:
    """LDAPChecker over a MemoryReactorClock: the test accepts connections and answers requests."""

    def __init__(self, **config):
        config.setdefault("urls", ("ldap://192.0.2.1", "ldap://192.0.2.2:3389"))
        config.setdefault("bind_dn", BIND_DN)
        config.setdefault("timeout", 5.0)
        self.reactor = MemoryReactorClock()
        self.checker = LDAPChecker(LDAPConfig(**config), reactor=self.reactor)

    def accept(self, index: int):
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    @staticmethod
    def answer(proto, transport, response) -> None:
        last = requests_in(transport)[-1]
        proto.dataReceived(reply(response, last.id))

    @staticmethod
    def drop(proto) -> None:
        proto.connectionLost(Failure(ConnectionDone()))


class ConversationTests(unittest.SynchronousTestCase):
    def test_direct_bind_sends_the_escaped_dn_and_succeeds_on_result_0(self):
        played = PlayedDirectory()
        d = login(played.checker, "alice,ou=x", SECRET)
        proto, transport = played.accept(0)
        (bind,) = requests_in(transport)
        self.assertEqual(bind.value.dn, r"uid=alice\,ou\=x,ou=people,dc=example,dc=org".encode())
        self.assertEqual(bind.value.auth, SECRET.encode("utf-8"))
        played.answer(proto, transport, pureldap.LDAPBindResponse(resultCode=0))
        self.assertTrue(transport.disconnecting)
        played.drop(proto)
        self.assertEqual(self.successResultOf(d), "alice,ou=x")

    def test_invalid_credentials_is_unauthorized_and_no_other_directory_is_asked(self):
        played = PlayedDirectory()
        d = login(played.checker, "alice", "wrong")
        proto, transport = played.accept(0)
        played.answer(proto, transport, pureldap.LDAPBindResponse(resultCode=49))
        played.drop(proto)
        self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual(len(played.reactor.tcpClients), 1)

    def test_busy_directory_fails_over_to_the_next(self):
        played = PlayedDirectory()
        d = login(played.checker, "alice", SECRET)
        proto, transport = played.accept(0)
        played.answer(proto, transport, pureldap.LDAPBindResponse(resultCode=51))   # busy
        played.drop(proto)
        self.assertEqual(played.reactor.tcpClients[1][:2], ("192.0.2.2", 3389))
        proto, transport = played.accept(1)
        played.answer(proto, transport, pureldap.LDAPBindResponse(resultCode=0))
        played.drop(proto)
        self.assertEqual(self.successResultOf(d), "alice")

    def test_silent_directories_time_out_into_a_temporary_failure(self):
        played = PlayedDirectory(timeout=2.0)
        d = login(played.checker, "alice", SECRET)
        for index in (0, 1):
            proto, transport = played.accept(index)
            self.assertNoResult(d)
            played.reactor.advance(2.0)
            self.assertTrue(transport.disconnected)   # aborted, not left open
            played.drop(proto)
        self.failureResultOf(d, TemporaryAuthFailure)

    def test_connect_that_never_completes_times_out(self):
        played = PlayedDirectory(urls=("ldap://192.0.2.1",), timeout=3.0)
        d = login(played.checker, "alice", SECRET)
        played.reactor.advance(2.9)
        self.assertNoResult(d)
        played.reactor.advance(0.1)
        self.failureResultOf(d, TemporaryAuthFailure)
        self.assertTrue(played.reactor.connectors[0].stoppedConnecting)

    def test_empty_dn_from_the_search_is_never_bound(self):
        played = PlayedDirectory(bind_dn=None, search_base=fixture.BASE, search_filter="(uid={user})")
        d = login(played.checker, "alice", SECRET)
        proto, transport = played.accept(0)
        msg_id = requests_in(transport)[-1].id
        proto.dataReceived(reply(pureldap.LDAPSearchResultEntry("", []), msg_id))
        proto.dataReceived(reply(pureldap.LDAPSearchResultDone(resultCode=0), msg_id))
        played.drop(proto)
        self.failureResultOf(d, UnauthorizedLogin)
        self.assertFalse(any(isinstance(m.value, pureldap.LDAPBindRequest) for m in requests_in(transport)))

    def test_connection_lost_mid_bind_fails_over(self):
        played = PlayedDirectory(urls=("ldap://192.0.2.1",))
        d = login(played.checker, "alice", SECRET)
        proto, _ = played.accept(0)
        played.drop(proto)
        self.failureResultOf(d, TemporaryAuthFailure)

    def test_garbage_from_the_directory_is_a_temporary_failure_without_traceback(self):
        log = LogLines(self)
        played = PlayedDirectory(urls=("ldap://192.0.2.1",))
        d = login(played.checker, "alice", SECRET)
        proto, transport = played.accept(0)
        proto.dataReceived(b"\x30\x03\x02\x01\x01")   # an LDAPMessage with an id and no operation
        self.assertTrue(transport.disconnected)
        played.drop(proto)
        self.failureResultOf(d, TemporaryAuthFailure)
        self.assertNotIn("Traceback", log.text())

    def test_empty_password_never_reaches_the_directory(self):
        played = PlayedDirectory()
        self.failureResultOf(login(played.checker, "alice", ""), UnauthorizedLogin)
        self.assertEqual(played.reactor.tcpClients, [])

    def test_bad_user_names_never_reach_the_directory(self):
        played = PlayedDirectory()
        for name in ("alice\r\n", "x" * 257, ""):
            self.failureResultOf(login(played.checker, name, SECRET), UnauthorizedLogin)
        self.assertEqual(played.reactor.tcpClients, [])

    def test_search_filter_value_is_escaped_on_the_wire(self):
        played = PlayedDirectory(
            bind_dn=None, search_base=fixture.BASE, search_filter="(&(objectClass=person)(uid={user}))",
        )
        d = login(played.checker, "*)(uid=*", SECRET)
        proto, transport = played.accept(0)
        (search,) = requests_in(transport)   # no service_dn: an anonymous search, no bind first
        self.assertEqual(search.value.filter.data[1].assertionValue.value, b"*)(uid=*")
        self.assertEqual(search.value.sizeLimit, 2)
        played.answer(proto, transport, pureldap.LDAPSearchResultDone(resultCode=0))
        played.drop(proto)
        self.failureResultOf(d, UnauthorizedLogin)

    def test_two_matching_entries_are_refused(self):
        played = PlayedDirectory(bind_dn=None, search_base=fixture.BASE, search_filter="(cn={user})")
        d = login(played.checker, "smith", SECRET)
        proto, transport = played.accept(0)
        msg_id = requests_in(transport)[-1].id
        for dn in ("cn=smith,ou=a", "cn=smith,ou=b"):
            proto.dataReceived(reply(pureldap.LDAPSearchResultEntry(dn, []), msg_id))
        proto.dataReceived(reply(pureldap.LDAPSearchResultDone(resultCode=0), msg_id))
        played.drop(proto)
        self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual(len(requests_in(transport)), 2)   # the search and an unbind: no user bind

    def test_late_response_after_timeout_is_ignored(self):
        conn = LDAPConnection()
        transport = StringTransport()
        conn.makeConnection(transport)
        d = conn.request(pureldap.LDAPBindRequest(dn="x", auth=b"y"))
        d.cancel()
        msg_id = requests_in(transport)[-1].id
        conn.dataReceived(reply(pureldap.LDAPBindResponse(resultCode=0), msg_id))
        conn.connectionLost(Failure(ConnectionDone()))   # no AlreadyCalledError
        self.failureResultOf(d, defer.CancelledError)

    def test_connection_lost_fails_pending_requests_with_directory_error(self):
        conn = LDAPConnection()
        conn.makeConnection(StringTransport())
        d = conn.request(pureldap.LDAPBindRequest(dn="x", auth=b"y"))
        conn.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, DirectoryError)

    def test_bad_configuration_is_refused_at_construction(self):
        empty = self.mktemp()
        open(empty, "w").close()
        for config in (
            LDAPConfig(urls=()),
            LDAPConfig(urls=("ldap://x",), bind_dn="uid=fixed,dc=x"),
            LDAPConfig(urls=("ldap://x",), search_base="dc=x", search_filter="(uid={user}"),
            LDAPConfig(urls=("http://x",), bind_dn=BIND_DN),
            LDAPConfig(urls=("ldaps://x",), bind_dn=BIND_DN, ca_file="/nonexistent/ca.pem"),
            LDAPConfig(urls=("ldap://x",), search_base="dc=x", search_filter="(uid={user})",
                       service_dn="cn=s"),
            LDAPConfig(urls=("ldap://x",), search_base="dc=x", search_filter="(uid={user})",
                       service_dn="cn=s", service_password_file=empty),
        ):
            self.assertRaises(ValueError, LDAPChecker, config, MemoryReactorClock())


# -- against a real slapd --------------------------------------------------------------------------------


class DirectBindTests(SlapdTestCase):
    async def test_good_password_gives_the_user_name(self):
        self.assertEqual(await login(self.checker(bind_dn=BIND_DN), "alice", fixture.USERS["alice"]), "alice")

    async def test_non_ascii_password_is_sent_as_utf8(self):
        self.assertEqual(await login(self.checker(bind_dn=BIND_DN), "bob", fixture.USERS["bob"]), "bob")

    async def test_bad_password_is_unauthorized(self):
        await self.refused(login(self.checker(bind_dn=BIND_DN), "alice", "wrong"))

    async def test_unknown_user_is_unauthorized(self):
        await self.refused(login(self.checker(bind_dn=BIND_DN), "mallory", "anything"))

    async def test_empty_password_is_refused_though_the_directory_would_accept_it(self):
        # The directory does accept an unauthenticated bind (RFC 4513 §5.1.2) ...
        conn = await connect(reactor, ldap_text.parse_url(self.slapd.ldap_url), None)
        await conn.bind("uid=alice," + fixture.PEOPLE, b"")
        await conn.close(reactor)
        # ... and the checker never lets it happen.
        await self.refused(login(self.checker(bind_dn=BIND_DN), "alice", ""))

    async def test_dn_injection_does_not_authenticate(self):
        checker = self.checker(bind_dn=BIND_DN)
        await self.refused(login(checker, "alice,ou=x", fixture.USERS["alice"]))
        await self.refused(login(checker, "alice,ou=people,dc=example,dc=org", fixture.USERS["alice"]))

    async def test_password_never_reaches_a_log_line(self):
        log = LogLines(self)
        checker = self.checker(bind_dn=BIND_DN, urls=(self.dead_url(), self.slapd.ldap_url))
        await login(checker, "alice", fixture.USERS["alice"])
        await self.refused(login(checker, "alice", "Wr0ng-Passw0rd"))
        self.assertIn("alice", log.text())
        self.assertNotIn(fixture.USERS["alice"], log.text())
        self.assertNotIn("Wr0ng-Passw0rd", log.text())


class SearchThenBindTests(SlapdTestCase):
    async def test_good_password_gives_the_user_name(self):
        self.assertEqual(await login(self.search_checker(), "bob", fixture.USERS["bob"]), "bob")

    async def test_bad_password_is_unauthorized(self):
        await self.refused(login(self.search_checker(), "bob", "wrong"))

    async def test_unknown_user_is_unauthorized(self):
        await self.refused(login(self.search_checker(), "mallory", "anything"))

    async def test_filter_injection_does_not_authenticate(self):
        checker = self.search_checker()
        password = fixture.USERS["alice"]
        # Unescaped, each of these would find exactly alice and bind as her under another name.
        for name in ("alice)(uid=alice", "al*", "*)(uid=alice", "*)(uid=*"):
            await self.refused(login(checker, name, password))

    async def test_wrong_service_password_is_a_temporary_failure(self):
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write("not-the-service-password\n")
        checker = self.search_checker(service_password_file=secret)
        await self.refused(login(checker, "bob", fixture.USERS["bob"]), TemporaryAuthFailure)


class GroupTests(SlapdTestCase):
    async def test_member_of_the_group_entry_is_accepted(self):
        checker = self.search_checker(require_group=fixture.MAIL_SENDERS)
        self.assertEqual(await login(checker, "alice", fixture.USERS["alice"]), "alice")

    async def test_user_outside_the_group_is_refused_with_the_right_password(self):
        for checker in (self.search_checker(require_group=fixture.MAIL_SENDERS),
                        self.checker(bind_dn=BIND_DN, require_group=fixture.MAIL_SENDERS)):
            await self.refused(login(checker, "carol", fixture.USERS["carol"]))

    async def test_memberof_on_the_user_entry_is_enough(self):
        # The restricted group is unreadable by users: only alice's own memberOf shows her membership.
        checker = self.checker(bind_dn=BIND_DN, require_group=fixture.RESTRICTED_SENDERS)
        self.assertEqual(await login(checker, "alice", fixture.USERS["alice"]), "alice")
        await self.refused(login(checker, "bob", fixture.USERS["bob"]))

    async def test_a_member_through_nested_groups_is_accepted_in_both_modes(self):
        # dave is in team-a, team-a in team-b, team-b in mail-senders; no group lists dave directly.
        for checker in (self.search_checker(require_group=fixture.MAIL_SENDERS),
                        self.checker(bind_dn=BIND_DN, require_group=fixture.MAIL_SENDERS)):
            self.assertEqual(await login(checker, "dave", fixture.USERS["dave"]), "dave")

    async def test_nested_groups_can_be_turned_off(self):
        checker = self.search_checker(require_group=fixture.MAIL_SENDERS, nested_groups=False)
        await self.refused(login(checker, "dave", fixture.USERS["dave"]))
        self.assertEqual(await login(checker, "alice", fixture.USERS["alice"]), "alice")

    async def test_nesting_is_followed_only_so_deep(self):
        from mailrelay.server import ldap

        self.patch(ldap, "MAX_NESTING", 1)          # dave is two levels down
        checker = self.search_checker(require_group=fixture.MAIL_SENDERS)
        await self.refused(login(checker, "dave", fixture.USERS["dave"]))

    async def test_a_group_cycle_neither_hangs_nor_lets_an_outsider_in(self):
        # carol is in loop-2, loop-2 and loop-1 list each other: inside loop-1, outside mail-senders.
        checker = self.search_checker(require_group=fixture.LOOP_1)
        self.assertEqual(await login(checker, "carol", fixture.USERS["carol"]), "carol")
        checker = self.search_checker(require_group=fixture.MAIL_SENDERS)
        await self.refused(login(checker, "carol", fixture.USERS["carol"]))

    async def test_group_base_says_where_nested_groups_are_looked_for(self):
        checker = self.search_checker(require_group=fixture.MAIL_SENDERS, group_base=fixture.PEOPLE)
        await self.refused(login(checker, "dave", fixture.USERS["dave"]))    # no groups under people

    def test_the_default_group_base_is_the_naming_context(self):
        from mailrelay.server.ldap import group_search_base

        self.assertEqual(group_search_base(fixture.MAIL_SENDERS), fixture.BASE)
        self.assertEqual(group_search_base("cn=g,ou=groups,o=acme"), "ou=groups,o=acme")

    async def test_unique_member_is_accepted(self):
        checker = self.checker(bind_dn=BIND_DN, require_group=fixture.UNIQUE_SENDERS)
        self.assertEqual(await login(checker, "bob", fixture.USERS["bob"]), "bob")
        await self.refused(login(checker, "alice", fixture.USERS["alice"]))


class TLSTests(SlapdTestCase):
    async def test_ldaps_with_the_right_ca(self):
        checker = self.checker(urls=(self.slapd.ldaps_url,), ca_file=self.slapd.ca_file, bind_dn=BIND_DN)
        self.assertEqual(await login(checker, "alice", fixture.USERS["alice"]), "alice")

    async def test_ldaps_with_a_wrong_ca_is_a_temporary_failure(self):
        checker = self.checker(urls=(self.slapd.ldaps_url,), ca_file=self.slapd.wrong_ca_file,
                               bind_dn=BIND_DN)
        await self.refused(login(checker, "alice", fixture.USERS["alice"]), TemporaryAuthFailure)

    async def test_starttls_with_the_right_ca(self):
        checker = self.search_checker(starttls=True, ca_file=self.slapd.ca_file,
                                      require_group=fixture.MAIL_SENDERS)
        self.assertEqual(await login(checker, "bob", fixture.USERS["bob"]), "bob")

    async def test_starttls_with_a_wrong_ca_is_a_temporary_failure(self):
        checker = self.checker(starttls=True, ca_file=self.slapd.wrong_ca_file, bind_dn=BIND_DN)
        await self.refused(login(checker, "alice", fixture.USERS["alice"]), TemporaryAuthFailure)

    async def test_certificate_not_naming_the_host_is_a_temporary_failure(self):
        # Same server, same trusted CA, reached as 127.0.0.2, which its certificate does not name (RFC 6125).
        checker = self.checker(urls=(self.slapd.misnamed_ldaps_url,), ca_file=self.slapd.ca_file,
                               bind_dn=BIND_DN)
        await self.refused(login(checker, "alice", fixture.USERS["alice"]), TemporaryAuthFailure)


class FailoverTests(SlapdTestCase):
    async def test_dead_first_url_fails_over_to_the_second(self):
        checker = self.checker(urls=(self.dead_url(), self.slapd.ldap_url), bind_dn=BIND_DN)
        self.assertEqual(await login(checker, "alice", fixture.USERS["alice"]), "alice")

    async def test_all_urls_dead_is_a_temporary_failure(self):
        urls = (self.dead_url(), self.dead_url("ldaps"))
        checker = self.checker(urls=urls, ca_file=self.slapd.ca_file, bind_dn=BIND_DN)
        await self.refused(login(checker, "alice", fixture.USERS["alice"]), TemporaryAuthFailure)

    async def test_silent_directory_times_out_into_a_temporary_failure(self):
        checker = self.checker(urls=(f"ldap://{self.silent_server()}",), timeout=0.5, bind_dn=BIND_DN)
        await self.refused(login(checker, "alice", fixture.USERS["alice"]), TemporaryAuthFailure)

    async def test_silent_ldaps_directory_times_out_during_the_handshake(self):
        checker = self.checker(urls=(f"ldaps://{self.silent_server()}",), ca_file=self.slapd.ca_file,
                               timeout=0.5, bind_dn=BIND_DN)
        await self.refused(login(checker, "alice", fixture.USERS["alice"]), TemporaryAuthFailure)

    async def test_silent_directory_fails_over_after_the_timeout(self):
        silent = f"ldap://{self.silent_server()}"
        checker = self.search_checker(urls=(silent, self.slapd.ldap_url), timeout=0.5)
        self.assertEqual(await login(checker, "bob", fixture.USERS["bob"]), "bob")


class CacheWithSlapdTests(SlapdTestCase):
    def setUp(self):
        if fixture.ldap_installed() is None:
            raise unittest.SkipTest("slapd/ldapadd not installed (apt-get install slapd ldap-utils)")
        self.slapd = fixture.start_private_slapd(self.mktemp())
        self.addCleanup(self.slapd.stop)

    async def test_cached_login_works_while_the_directory_is_down_and_a_wrong_password_does_not(self):
        checker = self.checker(bind_dn=BIND_DN, cache=300.0, timeout=1.0)
        password = fixture.USERS["alice"]
        self.assertEqual(await login(checker, "alice", password), "alice")
        self.slapd.stop()
        self.assertEqual(await login(checker, "alice", password), "alice")
        await self.refused(login(checker, "alice", "wrong"), TemporaryAuthFailure)
        await self.refused(login(checker, "bob", fixture.USERS["bob"]), TemporaryAuthFailure)

    async def test_a_different_password_goes_to_the_directory(self):
        checker = self.checker(bind_dn=BIND_DN, cache=300.0)
        await login(checker, "alice", fixture.USERS["alice"])
        await self.refused(login(checker, "alice", "wrong"), UnauthorizedLogin)


class CacheHashThreadTests(unittest.TestCase):
    def test_the_cache_hash_is_computed_off_the_reactor_thread(self):
        import threading

        from twisted.internet import reactor

        from mailrelay.config import LDAPConfig
        from mailrelay.server.ldap import LDAPChecker

        checker = LDAPChecker(LDAPConfig(urls=("ldap://127.0.0.1:1",), bind_dn="uid={user},dc=example",
                                         cache=60.0), reactor=reactor)
        seen = []
        real = checker._cache.digest
        checker._cache.digest = lambda user, password: (seen.append(threading.current_thread()),
                                                        real(user, password))[1]
        d = checker._digest("alice", b"pw")
        d.addCallback(lambda digest: self.assertEqual(digest, real("alice", b"pw")))
        d.addCallback(lambda _: self.assertIsNot(seen[0], threading.main_thread()))
        return d
