"""The portal over several sources of users (password file and LDAP): first acceptance wins, and a source
that could not decide makes a refusal temporary."""
from __future__ import annotations

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.trial import unittest
from zope.interface import implementer
from twisted.cred.checkers import ICredentialsChecker

from mailrelay.server.realm import IRelayUser, TemporaryAuthFailure, build_portal


@implementer(ICredentialsChecker)
class Unreachable:
    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials):
        return defer.fail(TemporaryAuthFailure("directory down"))


class PortalTests(unittest.TestCase):
    def login(self, portal, user: bytes, password: bytes):
        return portal.login(UsernamePassword(user, password), None, IRelayUser)

    @defer.inlineCallbacks
    def test_users_of_either_source_log_in(self):
        portal = build_portal([InMemoryUsernamePasswordDatabaseDontUse(app1=b"pw1"),
                               InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw2")])
        for user, password in ((b"app1", b"pw1"), (b"alice", b"pw2")):
            _, avatar, _ = yield self.login(portal, user, password)
            self.assertEqual(avatar.name, user.decode())
        yield self.assertFailure(self.login(portal, b"alice", b"pw1"), UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_a_source_that_cannot_decide_makes_a_refusal_temporary_but_not_an_acceptance(self):
        portal = build_portal([InMemoryUsernamePasswordDatabaseDontUse(app1=b"pw1"), Unreachable()])
        _, avatar, _ = yield self.login(portal, b"app1", b"pw1")
        self.assertEqual(avatar.name, "app1")
        yield self.assertFailure(self.login(portal, b"alice", b"pw2"), TemporaryAuthFailure)
