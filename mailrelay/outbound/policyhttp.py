# -*- test-case-name: tests.test_mtasts, tests.test_cli_route_policy, tests.test_tls_policy -*-
"""Fetching an MTA-STS policy over HTTPS (RFC 8461 3.3) with treq, the host resolved by the delivery
resolver.

Job in the journey: outbound.mtasts calls `fetch(domain)`; this module GETs
https://mta-sts.DOMAIN[:mta_sts_port]/.well-known/mta-sts.txt and returns the body.  In: the domain.
Out: Deferred[bytes], or a failure with mtasts.FetchFailed naming the RFC 8460 result type.

Why an endpoint factory of our own: twisted.web's Agent resolves host names through the reactor's
(system) resolver, but every lookup of direct delivery goes through `[delivery] nameservers`.  So the
factory resolves `mta-sts.DOMAIN` (A and AAAA) with the delivery resolver (IDNSLookup), races the
addresses (outbound.eyeballs, RFC 8305), and wraps the connection in TLS verified for the host name
against `[delivery] ca_file` or the system's trust (BrowserLikePolicyForHTTPS).  No redirect is followed
(treq's allow_redirects=False; RFC 8461 3.3), no connection kept, no HTTP cache used.
"""
from __future__ import annotations

from typing import Any, Optional, cast

from OpenSSL import SSL
from twisted.internet import defer, endpoints, error, protocol
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from mailrelay.outbound.mtasts import FETCH_TIMEOUT, MAX_POLICY_SIZE, FetchFailed, policy_url

CONNECT_TIMEOUT = 30.0


class _TooBig(Exception):
    pass


@implementer(IStreamClientEndpoint)
class _ResolvingEndpoint:
    """Resolve `host` with the delivery resolver, then connect to its addresses as RFC 8305 says."""

    def __init__(self, reactor: Any, lookup: Any, host: str, port: int, creator: Any):
        self._reactor, self._lookup, self._host, self._port, self._creator = reactor, lookup, host, port, creator

    @defer.inlineCallbacks
    def connect(self, factory):
        from mailrelay.outbound.dns import ResolutionFailed
        from mailrelay.outbound.eyeballs import HappyEyeballsEndpoint, interleave

        addresses: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = yield self._lookup.lookup(self._host, rdtype)
            except ResolutionFailed:
                continue
            addresses.extend(answer.records)
        if not addresses:
            raise error.DNSLookupError(f"{self._host} has no address")

        def one(address: str):
            cls = endpoints.TCP6ClientEndpoint if ":" in address else endpoints.TCP4ClientEndpoint
            return cls(self._reactor, address, self._port, timeout=CONNECT_TIMEOUT)

        inner = HappyEyeballsEndpoint(self._reactor, interleave(addresses), one)
        protocol = yield endpoints.wrapClientTLS(self._creator, inner).connect(factory)
        return protocol


@implementer(IAgentEndpointFactory)
class _Endpoints:
    def __init__(self, reactor: Any, lookup: Any, tls_policy: Any):
        self._reactor, self._lookup, self._tls_policy = reactor, lookup, tls_policy

    def endpointForURI(self, uri):
        if uri.scheme != b"https":
            raise error.SSLError("MTA-STS policies are fetched over https only")    # RFC 8461 3.3
        creator = self._tls_policy.creatorForNetloc(uri.host, uri.port)
        return _ResolvingEndpoint(self._reactor, self._lookup, uri.host.decode("ascii"), uri.port, creator)


def fetcher(reactor: Any, lookup: Any, port: int = 443, ca_file: Any = None, timeout: float = FETCH_TIMEOUT):
    """fetch(domain) -> Deferred[bytes]; failures are FetchFailed (see the module docstring)."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

    from mailrelay.outbound.tlsverify import load_trust

    trust = load_trust(ca_file) if ca_file is not None else None
    agent = Agent.usingEndpointFactory(reactor, _Endpoints(reactor, lookup, BrowserLikePolicyForHTTPS(trust)),
                                       pool=HTTPConnectionPool(reactor, persistent=False))
    client = HTTPClient(agent)

    def fetch(domain: str) -> defer.Deferred:
        url = policy_url(domain, port)
        headers: dict[bytes | str, list[bytes | str]] = {"Accept": ["text/plain"]}
        d = client.get(url, allow_redirects=False, timeout=timeout,    # RFC 8461 3.3: no redirects
                       headers=headers)
        d.addCallback(_read)
        return d.addErrback(_failed, url)

    return fetch


def _read(response: Any) -> defer.Deferred:
    if response.code != 200:
        # RFC 8461 3.3: only a 200 is a policy; a 3xx is not followed, a 404 means none.
        raise FetchFailed("sts-policy-fetch-error", f"HTTP status {response.code}")
    kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0].split(b";")[0].strip().lower()
    if kind != b"text/plain":
        raise FetchFailed("sts-policy-invalid", f"media type {kind.decode('ascii', 'replace')[:60]!r}, not text/plain")
    length = response.length
    if isinstance(length, int) and length > MAX_POLICY_SIZE:
        raise FetchFailed("sts-policy-invalid", f"policy of {length} bytes, over {MAX_POLICY_SIZE}")
    collector = _Collector()
    response.deliverBody(collector)
    return collector.done


class _Collector(protocol.Protocol):
    """The body, or _TooBig once it passes MAX_POLICY_SIZE (the connection is then dropped at once)."""

    def __init__(self) -> None:
        self.done: defer.Deferred = defer.Deferred()
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > MAX_POLICY_SIZE:
            self.done.errback(_TooBig())
            # IResponse.deliverBody connects us to the body's producer, not to a socket's transport.
            cast(IPushProducer, self.transport).stopProducing()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


def _failed(failure: Failure, url: str) -> Failure:
    if failure.check(FetchFailed):
        return failure
    if _find(failure, _TooBig) is not None:
        raise FetchFailed("sts-policy-invalid", f"policy over {MAX_POLICY_SIZE} bytes")
    from service_identity import VerificationError

    tls = _find(failure, SSL.Error) or _find(failure, VerificationError)
    if tls is not None:
        # The policy host's certificate did not verify (RFC 8460 4.3.1: sts-webpki-invalid).
        raise FetchFailed("sts-webpki-invalid", f"TLS with the policy host failed: {_text(tls)}")
    if _find(failure, defer.CancelledError) is not None or _find(failure, error.TimeoutError) is not None:
        raise FetchFailed("sts-policy-fetch-error", f"no answer from {url} in time")
    reason = _innermost(failure)
    raise FetchFailed("sts-policy-fetch-error", f"cannot fetch {url}: {_text(reason)}")


def _reasons(failure: Failure) -> list[Failure]:
    """The failure and those it wraps (twisted.web's ResponseNeverReceived and friends keep a list)."""
    found, todo = [], [failure]
    while todo:
        f = todo.pop()
        found.append(f)
        todo.extend(r for r in getattr(f.value, "reasons", []) or [] if isinstance(r, Failure))
    return found


def _find(failure: Failure, kind) -> Optional[Failure]:
    return next((f for f in _reasons(failure) if f.check(kind)), None)


def _innermost(failure: Failure) -> Failure:
    return _reasons(failure)[-1]


def _text(failure: Failure) -> str:
    value = failure.value
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        parts = [str(e[-1]) for e in value.args[0] if isinstance(e, tuple) and e]
        if parts:
            return "; ".join(parts)[:160]
    return (str(value) or type(value).__name__)[:160]
