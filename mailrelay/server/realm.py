# -*- test-case-name: tests.test_realm, tests.test_passwords, tests.test_ldap -*-
"""The cred realm: what a successful AUTH gives the session — the user's name, nothing more.

What that user may relay is the policy's business (mailrelay.server.policy), not the realm's.
"""
from __future__ import annotations

from dataclasses import dataclass

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer


class TemporaryAuthFailure(Exception):
    """A checker could not decide (directory unreachable, timeout): the session answers 454 4.7.0 and the
    client may try again later. Wrong credentials are twisted.cred.error.UnauthorizedLogin (535 5.7.8)."""


class IRelayUser(Interface):
    """An authenticated client identity: what a successful AUTH gives the session."""

    name = Attribute("The login as the relay knows it from now on (policy, logs, Received): a str.")
    folded = Attribute("True when `name` is a case-insensitive login (LDAP / AD) already case-folded "
                       "(FoldedLogin): permit rules' `users` lists then match it case-insensitively.")


class FoldedLogin(str):
    """An avatar id whose login is case-insensitive (LDAP / AD), already case-folded: `users` lists in
    permit rules compare it case-insensitively.  A plain str (the password file) compares exactly."""


@implementer(IRelayUser)
@dataclass(frozen=True)
class RelayUser:
    name: str
    folded: bool = False      # `name` is a FoldedLogin


@implementer(IRealm)
class RelayRealm:
    def requestAvatar(self, avatarId, mind, *interfaces):
        if IRelayUser not in interfaces:
            raise NotImplementedError("mailrelay realm only provides IRelayUser")
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else str(avatarId)
        return IRelayUser, RelayUser(name, folded=isinstance(avatarId, FoldedLogin)), lambda: None


@implementer(ICredentialsChecker)
class CheckerChain:
    """Several checkers for the same credentials, asked in order: the password file, then the directory.

    A Portal keeps one checker per credential interface (the last registered wins), so two sources of
    users need one checker in front. The first checker that accepts decides; a refusal moves on to the
    next; when none accepts, any checker that could not decide makes the whole answer temporary (454),
    since that one might have said yes."""

    def __init__(self, checkers):
        self.checkers = list(checkers)
        self.credentialInterfaces = tuple({i for c in self.checkers for i in c.credentialInterfaces})

    def requestAvatarId(self, credentials):
        return self._try(credentials, 0, undecided=None)

    def _try(self, credentials, index: int, undecided):
        if index == len(self.checkers):
            if undecided is not None:
                return undecided
            return defer.fail(UnauthorizedLogin())

        def refused(failure):
            if failure.check(UnauthorizedLogin):
                return self._try(credentials, index + 1, undecided)
            return self._try(credentials, index + 1, undecided or failure)

        return defer.maybeDeferred(self.checkers[index].requestAvatarId, credentials).addErrback(refused)


def build_portal(checkers) -> Portal:
    """A portal over our realm with the given credential checkers (password file, LDAP, ...)."""
    checkers = list(checkers)
    return Portal(RelayRealm(), [CheckerChain(checkers)] if len(checkers) > 1 else checkers)
