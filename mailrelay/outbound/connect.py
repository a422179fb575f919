# -*- test-case-name: tests.test_connection_cache -*-
"""Connecting an outgoing SMTP session: `deliver_over(endpoint, params, jobs)` runs a DeliveryClient
(outbound.client; with BDAT, outbound.chunking; for params.protocol "lmtp", outbound.lmtp) over a fresh
connection, or over one parked in a ConnectionPool (outbound.pool), and returns a Deferred SessionResult
that never fails: a refused or timed-out connection settles every recipient with a 4xx result.

Connection reuse (with an outbound.pool.ConnectionPool): a session that ends cleanly is parked in the pool
instead of ending with QUIT, and a later `deliver_over` to the same PoolKey runs its jobs on it, starting
at MAIL FROM (RFC 5321 3.3: one session may carry many transactions).  That first command is the liveness
check: a parked connection found closed, or answering 421, before its first reply is replaced by a fresh
one for the same jobs, and counts as no attempt.  Never reused: after a 421, an error, a failed TLS
handshake, a refused MAIL FROM or a "too many" (X.5.3) reply.  Direct delivery keys its connections by
the address they went to (outbound.pool.ByAddress), so two exchanger names on one address share them.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import defer, error, protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.python.failure import Failure

from mailrelay.outbound.chunking import ChunkingClient
from mailrelay.outbound.client import SECURITY_MODES, DeliveryClient
from mailrelay.outbound.lmtp import LMTPClient
from mailrelay.queue.job import Job, OnSettled, SessionParams, report_once
from mailrelay.outbound.pool import ByAddress, ConnectionPool, PoolKey
from mailrelay.queue.results import SessionResult, printable, settle_all

class _Factory(protocol.Factory):
    """Builds the one client of a connection once the address connected to is known (its pool key)."""
    noisy = False       # no "Starting/Stopping factory" pair in the log for every delivery connection

    def __init__(self, build: Callable[[Any], DeliveryClient]):
        self._build = build
        self.client: Optional[DeliveryClient] = None

    def buildProtocol(self, addr) -> DeliveryClient:
        self.client = self._build(addr)
        return self.client


def connect_failure_result(jobs: list[Job], reason: Failure, remote_host: str) -> SessionResult:
    """Every recipient temporarily failed because no connection was made (RFC 3463 X.4.1 / X.4.3)."""
    why = printable(str(reason.value).encode("utf-8", "replace"), 200)
    status = "4.4.3" if reason.check(error.DNSLookupError) else "4.4.1"
    text = f"cannot connect to {remote_host}: {why}"
    return SessionResult(tuple(settle_all(j.recipients, 451, status, text, remote_host) for j in jobs),
                         before_mail=True)


def deliver_over(endpoint: Any, params: SessionParams, jobs: list[Job], clock: Any = None,
                 pool: Optional[ConnectionPool] = None, key: Optional[PoolKey | ByAddress] = None,
                 on_settled: Optional[OnSettled] = None) -> defer.Deferred:
    """Send `jobs` over an idle connection from `pool` under `key` when there is one, else connect with
    `endpoint` (wrapped in TLS already when params.security == "tls").  With a pool, a connection that
    ends cleanly is parked there for the next call instead of closed.  `key` is one PoolKey, or a
    ByAddress: an idle connection to any of its addresses is taken (the first in its order), and a new
    one is parked under the address it went to.  `on_settled(index, results)` is called once per job as
    soon as it is settled, and the next job waits for its Deferred (see above); jobs it was not called
    for (connection lost) are only in the final result.

    Returns a Deferred firing with a SessionResult once every job is settled; it never fails."""
    if params.security not in SECURITY_MODES:
        raise ValueError(f"unknown security mode {params.security!r}")
    if clock is None:
        from twisted.internet import reactor as clock
    on_settled = report_once(on_settled)
    if pool is None or key is None:
        return _connect(endpoint, params, jobs, clock, pool, key, on_settled)
    idle = pool.take_any(key.keys()) if isinstance(key, ByAddress) else pool.take(key)
    if idle is None:
        return _connect(endpoint, params, jobs, clock, pool, key, on_settled)

    def fresh_if_stale(result: SessionResult) -> Any:
        if not idle.stale:
            return result
        pool.stale += 1       # dead before any reply: nothing was tried, so this is no failed attempt
        return _connect(endpoint, params, jobs, clock, pool, key, on_settled)

    return idle.reuse(jobs, on_settled, params.remote_host).addCallback(fresh_if_stale)


def _key_at(key: Optional[PoolKey | ByAddress], addr: object) -> Optional[PoolKey]:
    """The key a new connection is parked under: `key`, or for ByAddress the peer's address's (None,
    so never parked, if the transport has no IP address)."""
    if not isinstance(key, ByAddress):
        return key
    if not isinstance(addr, (IPv4Address, IPv6Address)):      # a UNIX socket's IAddress has no host
        return None
    return key.at(addr.host)


def _connect(endpoint: Any, params: SessionParams, jobs: list[Job], clock: Any,
             pool: Optional[ConnectionPool], key: Optional[PoolKey | ByAddress],
             on_settled: Optional[OnSettled] = None) -> defer.Deferred:
    client_class = LMTPClient if params.protocol == "lmtp" else ChunkingClient     # RFC 2033 / RFC 5321

    def build(addr: Any) -> DeliveryClient:
        parked_as = _key_at(key, addr)
        return client_class(params, jobs, clock, pool if parked_as is not None else None, parked_as, on_settled)

    factory = _Factory(build)

    def connected(_: Any) -> defer.Deferred:
        assert factory.client is not None       # the endpoint connected: buildProtocol has run
        return factory.client.finished

    def failed(reason: Failure):
        return connect_failure_result(jobs, reason, params.remote_host)

    return endpoint.connect(factory).addCallbacks(connected, failed)
