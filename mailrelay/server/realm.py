"""The cred realm: what a successful AUTH gives the session — the user's name, nothing more.

What that user may relay is the policy's business (mailrelay.server.policy), not the realm's.
"""
from __future__ import annotations

from dataclasses import dataclass

from twisted.cred.portal import IRealm, Portal
from zope.interface import Interface, implementer


class TemporaryAuthFailure(Exception):
    """A checker could not decide (directory unreachable, timeout): the session answers 454 4.7.0 and the
    client may try again later. Wrong credentials are twisted.cred.error.UnauthorizedLogin (535 5.7.8)."""


class IRelayUser(Interface):
    """An authenticated client identity (attribute `name`)."""


@implementer(IRelayUser)
@dataclass(frozen=True)
class RelayUser:
    name: str


@implementer(IRealm)
class RelayRealm:
    def requestAvatar(self, avatarId, mind, *interfaces):
        if IRelayUser not in interfaces:
            raise NotImplementedError("mailrelay realm only provides IRelayUser")
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else str(avatarId)
        return IRelayUser, RelayUser(name), lambda: None


def build_portal(checkers) -> Portal:
    """A portal over our realm with the given credential checkers (password file, LDAP, ...)."""
    return Portal(RelayRealm(), list(checkers))
