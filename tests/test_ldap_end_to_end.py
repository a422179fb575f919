"""LDAP AUTH through the SMTP session, end to end: a real client, the whole relay, a real OpenLDAP slapd.

The client logs in with AUTH PLAIN or LOGIN over STARTTLS on the submission port (RFC 4954, RFC 6409);
the relay's `[auth.ldap]` checks the password against slapd (tests.support.slapd: alice and bob in
cn=mail-senders, carol outside it), over ldap:// with STARTTLS (RFC 4513 §3) or ldaps://, both verified
against the test CA; the message of a good login is relayed to a real sink.  Replies asserted: 235 2.7.0,
535 5.7.8 (wrong password, outside `require_group`), 501 for an empty password (never an anonymous bind,
RFC 4513 §5.1.2), 454 4.7.0 when no directory answers, and a cached login that works with slapd stopped.
Skipped with a reason when slapd is not installed.
"""
from __future__ import annotations


from twisted.internet import defer

from tests.support.logcapture import LogLines
from tests.support import slapd as fixture
from tests.support.access import USERS_ONLY, RelayTestCase, plain, submit
from tests.support.ldapauth import ldap_section


OK = [(235, "2.7.0"), (250, "2.1.0"), (250, "2.1.5"), (250, "2.0.0")]
REFUSED = [(535, "5.7.8"), (530, "5.7.0")]      # and no MAIL without a login (RFC 6409 §4.3)


class LDAPThroughSMTPTests(RelayTestCase):
    """[auth.ldap] against the shared slapd, the login on the submission port."""

    def setUp(self):
        super().setUp()
        self.slapd = fixture.shared_slapd()

    def start_ldap_relay(self, section: str):
        return self.start_relay(USERS_ONLY, section)

    @defer.inlineCallbacks
    def test_good_password_over_ldap_starttls_is_235_and_the_message_is_relayed(self):
        logs = LogLines(self, raw=True)
        relay = self.start_ldap_relay(ldap_section([self.slapd.ldap_url], self.slapd.ca_file, starttls=True))
        password = fixture.USERS["alice"]
        replies = yield self.run_client(submit, relay, "alice", password)
        self.assertEqual(replies, OK)
        yield self.settle(relay, ["hello@allowed.example"])
        arrived = self.sink.messages[0]
        self.assertEqual(arrived.mail_from, "alice@example.org")
        received = arrived.data.split(b"\r\n\r\n", 1)[0]
        self.assertIn(b"ESMTPSA", received)
        self.assertIn(b"alice", received)
        for secret in (password, plain("alice", password)):
            self.assertNotIn(secret.encode("ascii"), arrived.data)
            self.assertNotIn(secret, logs.text())

    @defer.inlineCallbacks
    def test_non_ascii_password_with_auth_login_over_ldaps_search_then_bind(self):
        section = ldap_section(
            [self.slapd.ldaps_url], self.slapd.ca_file, starttls=False,
            rest=(f'search_base = "{fixture.BASE}"\n'
                  'search_filter = "(&(objectClass=inetOrgPerson)(uid={user}))"\n'
                  f'service_dn = "{fixture.SERVICE_DN}"\n'
                  f'service_password_file = "{self.slapd.service_password_file}"\n'
                  f'require_group = "{fixture.MAIL_SENDERS}"\n'))
        relay = self.start_ldap_relay(section)
        replies = yield self.run_client(submit, relay, "bob", fixture.USERS["bob"], "LOGIN")
        self.assertEqual(replies, OK)
        yield self.settle(relay, ["hello@allowed.example"])
        self.assertEqual(self.sink.messages[0].mail_from, "bob@example.org")

    @defer.inlineCallbacks
    def test_wrong_password_is_535_and_nothing_is_relayed(self):
        logs = LogLines(self, raw=True)
        relay = self.start_ldap_relay(ldap_section([self.slapd.ldap_url], self.slapd.ca_file, starttls=True))
        replies = yield self.run_client(submit, relay, "alice", "not-alices-password")
        self.assertEqual(replies, REFUSED)
        replies = yield self.run_client(submit, relay, "nobody", "whatever", "LOGIN")
        self.assertEqual(replies, REFUSED)
        yield self.settle(relay, [])
        self.assertNotIn("not-alices-password", logs.text())
        self.assertNotIn(plain("alice", "not-alices-password"), logs.text())

    @defer.inlineCallbacks
    def test_empty_password_is_refused_though_the_directory_would_bind_anonymously(self):
        # slapd here runs with `allow bind_anon_dn`, like Active Directory: a DN with an empty password
        # binds as anonymous and "succeeds".  It must never get that far (RFC 4513 §5.1.2).
        relay = self.start_ldap_relay(ldap_section([self.slapd.ldap_url], self.slapd.ca_file, starttls=True))
        for mechanism in ("PLAIN", "LOGIN"):
            replies = yield self.run_client(submit, relay, "alice", "", mechanism)
            self.assertEqual(replies, [(501, "5.5.2"), (530, "5.7.0")], mechanism)
        yield self.settle(relay, [])

    @defer.inlineCallbacks
    def test_user_outside_require_group_is_535_with_the_right_password(self):
        relay = self.start_ldap_relay(ldap_section([self.slapd.ldap_url], self.slapd.ca_file, starttls=True))
        replies = yield self.run_client(submit, relay, "carol", fixture.USERS["carol"])
        self.assertEqual(replies, REFUSED)
        yield self.settle(relay, [])

    @defer.inlineCallbacks
    def test_directory_down_is_454_temporary(self):
        closed = f"ldap://127.0.0.1:{fixture.free_port()}"
        relay = self.start_ldap_relay(ldap_section([closed], self.slapd.ca_file, starttls=True))
        replies = yield self.run_client(submit, relay, "alice", fixture.USERS["alice"])
        self.assertEqual(replies, [(454, "4.7.0"), (530, "5.7.0")])
        yield self.settle(relay, [])

    @defer.inlineCallbacks
    def test_a_dead_first_url_fails_over_to_the_next(self):
        closed = f"ldaps://127.0.0.1:{fixture.free_port()}"
        relay = self.start_ldap_relay(ldap_section([closed, self.slapd.ldaps_url], self.slapd.ca_file,
                                                   starttls=False))
        replies = yield self.run_client(submit, relay, "alice", fixture.USERS["alice"])
        self.assertEqual(replies, OK)
        yield self.settle(relay, ["hello@allowed.example"])


class LDAPCacheThroughSMTPTests(RelayTestCase):
    """`cache`: a second login within it works with the directory stopped (a private slapd)."""

    def setUp(self):
        super().setUp()
        fixture.shared_slapd()     # raises SkipTest when slapd is not installed
        self.slapd = fixture.start_private_slapd()
        self.addCleanup(self.slapd.stop)

    @defer.inlineCallbacks
    def test_cached_login_works_with_the_directory_stopped_and_others_get_454(self):
        relay = self.start_relay(USERS_ONLY, ldap_section([self.slapd.ldap_url], self.slapd.ca_file,
                                                          starttls=True, cache="5m"))
        alice = fixture.USERS["alice"]
        replies = yield self.run_client(submit, relay, "alice", alice, "PLAIN", "first")
        self.assertEqual(replies, OK)
        self.slapd.stop()
        replies = yield self.run_client(submit, relay, "alice", alice, "LOGIN", "second")
        self.assertEqual(replies, OK)
        # Not in the cache: a wrong password for alice, and bob, need the directory, which is down.
        replies = yield self.run_client(submit, relay, "alice", "not-alices-password")
        self.assertEqual(replies, [(454, "4.7.0"), (530, "5.7.0")])
        replies = yield self.run_client(submit, relay, "bob", fixture.USERS["bob"])
        self.assertEqual(replies, [(454, "4.7.0"), (530, "5.7.0")])
        yield self.settle(relay, ["first@allowed.example", "second@allowed.example"])
