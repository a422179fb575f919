# -*- test-case-name: tests.test_capabilities, tests.test_delivery_client, tests.test_chunking -*-
"""A next hop on a local socket: `[transports.NAME] host = "unix:PATH"` (e.g. Dovecot's LMTP socket).

Journey: smarthost.SmarthostTransport sends a batch here instead of to host:port when its transport
names a unix socket.  In: the socket path, the jobs, the protocol ("smtp" or "lmtp").  Out: a Deferred
results.SessionResult that never fails (connect.deliver_over; a missing socket or a refused connection
settles every recipient with 451 4.4.1).  No TLS and no AUTH: the config refuses both for a socket.
Idle connections are parked in the transport's pool under the path, as TCP ones are under host:port.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from twisted.internet import defer, endpoints

from mailrelay.outbound.connect import deliver_over
from mailrelay.queue.job import Job, OnSettled, SessionParams, Timeouts
from mailrelay.outbound.pool import ConnectionPool, PoolKey


def deliver_to_socket(path: Path, jobs: list[Job], *, helo: str, remote_host: str, protocol: str = "smtp",
                      timeouts: Timeouts = Timeouts(), reactor: Any = None, clock: Any = None,
                      pool: Optional[ConnectionPool] = None, on_settled: Optional[OnSettled] = None) -> defer.Deferred:
    """Send every job over one connection to the socket at `path` (or one idle in `pool`)."""
    if reactor is None:
        from twisted.internet import reactor
    endpoint = endpoints.UNIXClientEndpoint(reactor, str(path), timeout=timeouts.connect)
    params = SessionParams(helo=helo, remote_host=remote_host, security="none", timeouts=timeouts,
                           protocol=protocol)
    key = PoolKey(remote_host, 0, "none")
    return deliver_over(endpoint, params, jobs, clock if clock is not None else reactor, pool=pool, key=key,
                        on_settled=on_settled)
