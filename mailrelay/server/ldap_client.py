# -*- test-case-name: tests.test_ldap -*-
"""One short LDAP connection: connect (TCP, TLS), STARTTLS, simple bind, search, close.

Part of AUTH against LDAP (mailrelay.server.ldap).  In: an `LDAPURL` and the TLS client options.
Out: an `LDAPConnection` whose operations are coroutines; a definite answer from the directory is an
`LDAPResultError` (its result code), everything else (refused, reset, TLS or certificate failure,
garbage on the wire) is a `DirectoryError`, meaning "ask the next directory".
Implements RFC 4511 §4.2 (bind), §4.5 (search), §4.14 (StartTLS), on top of ldaptor's BER codec.

Why not ldaptor's LDAPClient as is: its STARTTLS context verifies nothing and schedules on the global
reactor; it fires a response's Deferred before forgetting the request, so closing from a callback races;
and a lost connection errbacks Deferreds that a timeout has already cancelled (AlreadyCalledError).
"""
from __future__ import annotations

from typing import Optional, Sequence, cast

from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap.ldapclient import LDAPClient
from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.python.failure import Failure

from mailrelay.server.ldap_text import LDAPURL

MAX_BUFFER = 1024 * 1024          # a directory answer to one bind or search is far smaller
SUCCESS, SIZE_LIMIT_EXCEEDED = 0, 4
SCOPE_BASE, SCOPE_SUBTREE = pureldap.LDAP_SCOPE_baseObject, pureldap.LDAP_SCOPE_wholeSubtree
NO_ATTRIBUTES = ["1.1"]           # RFC 4511 §4.5.1.8: return no attributes, the DN is enough


class DirectoryError(Exception):
    """This directory could not give an answer (unreachable, TLS, protocol trouble): try another."""


class LDAPResultError(Exception):
    """The directory answered with a result code other than success (RFC 4511 §4.1.9)."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(f"LDAP result {code}" + (f": {message}" if message else ""))
        self.code = code


class LDAPConnection(LDAPClient):
    """An LDAP client protocol for one login: one request at a time, every Deferred fired once."""

    onwire: dict[int, tuple[defer.Deferred, list]]    # LDAPClient's: message id -> (Deferred, responses)

    def __init__(self):
        super().__init__()
        self._close_waiters: list[defer.Deferred] = []
        self._closed = False

    # -- Twisted/ldaptor protocol API ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if len(self.buffer) + len(data) > MAX_BUFFER:
            self._fail_all(DirectoryError("oversized response"))
            self.transport.abortConnection()
            return
        try:
            super().dataReceived(data)
        except Exception as e:   # undecodable BER: the peer is not a sane LDAP server
            self._fail_all(DirectoryError(f"malformed response: {e.__class__.__name__}"))
            self.transport.abortConnection()

    def handle(self, msg) -> None:
        # Forget the request before firing its Deferred, so the callback may close or send at will.
        pending = self.onwire.get(msg.id)
        if pending is None:
            return   # id 0 (RFC 4511 §4.4 unsolicited notice, e.g. disconnection) or a cancelled request
        d, responses = pending
        responses.append(msg.value)
        if isinstance(msg.value, (pureldap.LDAPSearchResultEntry, pureldap.LDAPSearchResultReference)):
            return   # more to come until LDAPSearchResultDone
        del self.onwire[msg.id]
        if not d.called:
            d.callback(responses)

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self.connected = 0
        self._fail_all(DirectoryError(f"connection lost: {reason.getErrorMessage() if reason else ''}"))
        self._closed = True
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)

    # -- our operations --------------------------------------------------------------------------------

    def _fail_all(self, error: Exception) -> None:
        pending, self.onwire = self.onwire, {}
        for d, _responses in pending.values():
            if not d.called:
                d.errback(error)

    def request(self, op) -> defer.Deferred:
        """Send one operation; fires with its list of responses, the last one final."""
        if not self.connected:
            return defer.fail(DirectoryError("not connected"))
        msg = pureldap.LDAPMessage(op)
        d: defer.Deferred[list] = defer.Deferred()
        self.onwire[msg.id] = (d, [])
        self.transport.write(msg.toWire())
        return d

    async def _result(self, op):
        responses = await self.request(op)
        final = responses[-1]
        if not isinstance(final, pureldap.LDAPResult):
            raise DirectoryError(f"unexpected response {final.__class__.__name__}")
        return responses[:-1], final

    async def start_tls(self, options: IOpenSSLClientConnectionCreator) -> None:
        """RFC 4511 §4.14: ask for TLS, then handshake with `options` (which verify the certificate)."""
        _, final = await self._result(pureldap.LDAPStartTLSRequest())
        if final.resultCode != SUCCESS:
            raise DirectoryError(f"STARTTLS refused: result {final.resultCode}")
        self.transport.startTLS(options)

    async def bind(self, dn: str, password: bytes) -> None:
        """RFC 4511 §4.2 simple bind; LDAPResultError unless the directory says success."""
        _, final = await self._result(pureldap.LDAPBindRequest(dn=dn, auth=password))
        if final.resultCode != SUCCESS:
            raise LDAPResultError(final.resultCode, _text(final.errorMessage))

    async def search(self, base: str, scope: int, filter_: pureldap.LDAPFilter,
                     attributes: Sequence[str] = NO_ATTRIBUTES, size_limit: int = 0, time_limit: int = 0,
                     ) -> tuple[list[tuple[str, dict[str, list[str]]]], int]:
        """RFC 4511 §4.5: (entries as [(dn, {attr: [values]})], result code)."""
        op = pureldap.LDAPSearchRequest(
            baseObject=base, scope=scope, derefAliases=pureldap.LDAP_DEREF_neverDerefAliases,
            sizeLimit=size_limit, timeLimit=time_limit, typesOnly=0, filter=filter_,
            attributes=list(attributes),
        )
        responses, final = await self._result(op)
        entries = [
            (_text(r.objectName), {_text(k): [_text(v) for v in vs] for k, vs in r.attributes})
            for r in responses if isinstance(r, pureldap.LDAPSearchResultEntry)
        ]
        return entries, final.resultCode

    def close(self, clock, grace: float = 1.0) -> defer.Deferred:
        """Unbind and close; abort if the peer has not let go after `grace` seconds.  Fires when closed."""
        if self._closed:
            return defer.succeed(None)
        if self.connected:
            try:
                self.transport.write(pureldap.LDAPMessage(pureldap.LDAPUnbindRequest()).toWire())
            except Exception:
                pass   # courtesy only (RFC 4511 §4.3)
        self.transport.loseConnection()
        timer = clock.callLater(grace, self.transport.abortConnection)
        return self._when_closed().addBoth(_cancel_timer, timer)

    def abort(self) -> defer.Deferred:
        """Drop the connection now; fires when it is gone."""
        if self._closed:
            return defer.succeed(None)
        self.transport.abortConnection()
        return self._when_closed()

    def _when_closed(self) -> defer.Deferred:
        d: defer.Deferred[None] = defer.Deferred()
        self._close_waiters.append(d)
        return d


def _cancel_timer(result, timer):
    if timer.active():
        timer.cancel()
    return result


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _ConnectionFactory(protocol.Factory):
    noisy = False   # one connection per login: "Starting factory" lines would be noise
    protocol = LDAPConnection


def endpoint_for(reactor, url: LDAPURL, tls: Optional[IOpenSSLClientConnectionCreator]
                 ) -> IStreamClientEndpoint:
    """The client endpoint for `url`: TLS from the first byte for ldaps://, with `tls` options."""
    endpoint: IStreamClientEndpoint
    if url.is_ip:
        cls = TCP6ClientEndpoint if ":" in url.host else TCP4ClientEndpoint
        endpoint = cls(reactor, url.host, url.port)
    else:
        endpoint = HostnameEndpoint(reactor, url.host, url.port)
    if url.tls:
        assert tls is not None      # LDAPChecker makes TLS options for every ldaps:// URL
        endpoint = wrapClientTLS(tls, endpoint)
    return endpoint


async def connect(reactor, url: LDAPURL, tls: Optional[IOpenSSLClientConnectionCreator]) -> LDAPConnection:
    """A connected LDAPConnection, or DirectoryError.  Cancelling the caller cancels the attempt."""
    try:
        connected = await endpoint_for(reactor, url, tls).connect(_ConnectionFactory())
        return cast(LDAPConnection, connected)      # what _ConnectionFactory builds
    except (defer.CancelledError, ConnectingCancelledError):
        raise defer.CancelledError() from None   # the caller's timeout, not this directory's fault
    except Exception as e:
        raise DirectoryError(f"cannot connect: {e}") from None
