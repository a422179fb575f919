# -*- test-case-name: tests.test_ldap, tests.test_ldap_end_to_end, tests.test_limits_end_to_end -*-
"""LDAP AUTH against the shared OpenLDAP slapd (tests.support.slapd), for the checker's tests and the relay's.

`SlapdTestCase` builds LDAPCheckers for it (`checker`: direct bind, `search_checker`: search then bind),
and directory servers that refuse (`dead_url`) or never answer (`silent_server`); `login` asks a checker.
`ldap_section` is the relay's `[auth.ldap]` for it, DIRECT_BIND its bind DN and required group.
"""
from __future__ import annotations

import socket

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from mailrelay.config import LDAPConfig
from mailrelay.server.ldap import LDAPChecker
from tests.support import slapd as fixture


def login(checker, user, password) -> defer.Deferred:
    return checker.requestAvatarId(UsernamePassword(user.encode("utf-8"), password.encode("utf-8")))


class _SilentFactory(protocol.Factory):
    noisy = False

    def __init__(self):
        self.connections = []

    def buildProtocol(self, addr):
        proto = _Silent()
        proto.factory = self
        return proto


class _Silent(protocol.Protocol):
    """Accepts a TCP connection and never says a word."""

    def connectionMade(self):
        self.factory.connections.append(self)

    def connectionLost(self, reason=None):
        self.factory.connections.remove(self)


class SlapdTestCase(unittest.TestCase):
    def setUp(self):
        self.slapd = fixture.shared_slapd()

    def checker(self, **config) -> LDAPChecker:
        config.setdefault("urls", (self.slapd.ldap_url,))
        config.setdefault("timeout", 5.0)
        config.setdefault("cache", 0)
        return LDAPChecker(LDAPConfig(**config), reactor)

    def search_checker(self, **config) -> LDAPChecker:
        config.setdefault("search_base", fixture.BASE)
        config.setdefault("search_filter", "(&(objectClass=inetOrgPerson)(uid={user}))")
        config.setdefault("service_dn", fixture.SERVICE_DN)
        config.setdefault("service_password_file", self.slapd.service_password_file)
        return self.checker(**config)

    async def refused(self, d, exception=UnauthorizedLogin):
        with self.assertRaises(exception):
            await d

    @staticmethod
    def dead_url(scheme: str = "ldap") -> str:
        """A URL for a port of 127.0.0.1 that nobody listens on: connections are refused."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"{scheme}://127.0.0.1:{s.getsockname()[1]}"

    def silent_server(self) -> str:
        factory = _SilentFactory()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self._stop_silent, port, factory)
        return f"127.0.0.1:{port.getHost().port}"

    @staticmethod
    def _stop_silent(port, factory):
        for conn in list(factory.connections):
            conn.transport.abortConnection()
        return port.stopListening()


DIRECT_BIND = (
    'bind_dn = "uid={user},' + fixture.PEOPLE + '"\n'
    f'require_group = "{fixture.MAIL_SENDERS}"\n'
)


def ldap_section(urls: list[str], ca_file, starttls: bool, rest: str = DIRECT_BIND, cache: str = "0") -> str:
    listed = ", ".join(f'"{u}"' for u in urls)
    return (f"[auth.ldap]\nurl = [{listed}]\nstarttls = {'true' if starttls else 'false'}\n"
            f'ca_file = "{ca_file}"\ntimeout = "5s"\ncache = "{cache}"\n' + rest)
