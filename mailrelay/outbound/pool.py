# -*- test-case-name: tests.test_connection_cache -*-
"""The connection cache: idle SMTP client connections kept open for the next delivery to the same hop.

Journey: after a delivery client has sent its last job, it asks to be parked here instead of saying
QUIT; the next batch for the same destination takes it back and goes straight to MAIL FROM, saving the
TCP connect, greeting, EHLO, STARTTLS and AUTH (Postfix's connection cache, smtp_connection_cache_on_demand).
In: clients (mailrelay.outbound.client.DeliveryClient) at the end of a clean session, under a `PoolKey`.
Out: the same clients, to `take` for another session, or QUIT after `IDLE_TIME` (RFC 5321 4.1.1.10).

Keys: a smarthost's connections by its name; direct delivery's by the address connected to (ByAddress), so
that domains whose exchangers share an address share connections, as long as what the connection's TLS
proved (nothing, or one host name / TLSA set) is what the next session requires.

Bounds: at most `max_idle` (MAX_IDLE_PER_KEY; direct delivery: `[delivery] concurrency`, as one address
may serve every domain in flight) idle connections per key, each idle at most `IDLE_TIME`
seconds and reused only while younger than `REUSE_TIME_LIMIT` (Postfix smtp_connection_reuse_time_limit).
The client itself decides whether it is fit to park (no error, no 421, no per-connection limit reply);
a connection the server closes or talks on while idle is dropped (RFC 5321 3.8).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from twisted.internet import defer

IDLE_TIME = 2.0              # seconds idle, waiting for the next batch (Postfix: smtp_connection_cache_time_limit)
MAX_IDLE_PER_KEY = 10        # idle connections kept per destination
REUSE_TIME_LIMIT = 300.0     # seconds after which a connection is no longer parked, however busy


@dataclass(frozen=True)
class PoolKey:
    """Which connections are interchangeable: the same host and port, the same security mode, the same
    TLS options object (compared by identity, so the same certificate and name checks, or a token that
    stands for "TLS not authenticated": UNAUTHENTICATED), the same login and the same local source
    address.  `host` is a smarthost's name, or for direct delivery the address connected to (ByAddress)."""
    host: str
    port: int
    security: str
    tls_options: Any = None
    username: Optional[str] = None
    source: Optional[str] = None


# The TLS requirement of a connection whose certificate is not checked (opportunistic, "required",
# DANE with only unusable TLSA records): any such connection to the address serves any such session.
UNAUTHENTICATED = "unauthenticated"


def address_text(address: str) -> str:
    """One spelling per IP address (RFC 5952 for IPv6), so that keys built from DNS answers and from
    the socket's peer compare equal; anything else as it is."""
    try:
        return ipaddress.ip_address(address).compressed
    except ValueError:
        return address


@dataclass(frozen=True)
class ByAddress:
    """The keys of direct delivery's connections to one exchanger: one per address it may connect to,
    in the order they are tried.  A connection is parked under the address it went to, so a later
    session for another exchanger name with that address (two domains' MX names on one IP) takes it
    when its port, source address, security mode and TLS requirement (`tls`: UNAUTHENTICATED, None for
    no TLS, or the verifying options object, which names the one host name or TLSA set it checked)
    are the same."""
    addresses: tuple[str, ...]
    port: int
    security: str
    tls: Any = None
    source: Optional[str] = None

    def at(self, address: str) -> PoolKey:
        return PoolKey(address_text(address), self.port, self.security, self.tls, None, self.source)

    def keys(self) -> list[PoolKey]:
        return [self.at(address) for address in self.addresses]


class ConnectionPool:
    """Idle connections by PoolKey.  A parked client offers `age()` (seconds since it connected) and
    `quit_idle()` (QUIT, then a Deferred firing once closed), and calls `forget(key, client)` when its
    connection is lost or spoken on while idle."""

    def __init__(self, clock: Any = None, idle_time: float = IDLE_TIME, max_idle: int = MAX_IDLE_PER_KEY,
                 reuse_time_limit: float = REUSE_TIME_LIMIT):
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        self.idle_time, self.max_idle, self.reuse_time_limit = idle_time, max_idle, reuse_time_limit
        self._idle: dict[PoolKey, list[tuple[Any, Any]]] = {}     # key -> [(client, expiry call)], oldest first
        self._closed = False
        self.reused = 0          # sessions that went over a parked connection
        self.stale = 0           # parked connections found dead when reused (the batch then reconnected)

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._idle.values())

    def idle_count(self, key: PoolKey) -> int:
        return len(self._idle.get(key, ()))

    def park(self, key: PoolKey, client: Any) -> bool:
        """Keep `client` idle under `key`; False (the caller says QUIT itself) when full, closed or too old."""
        if self._closed or client.age() >= self.reuse_time_limit or self.idle_count(key) >= self.max_idle:
            return False
        expiry = self._clock.callLater(self.idle_time, self._expire, key, client)
        self._idle.setdefault(key, []).append((client, expiry))
        return True

    def take(self, key: PoolKey) -> Optional[Any]:
        """The most recently parked client for `key` (the others may then expire), or None."""
        entries = self._idle.get(key)
        if not entries:
            return None
        client, expiry = entries.pop()
        if not entries:
            del self._idle[key]
        expiry.cancel()
        self.reused += 1
        return client

    def take_any(self, keys: Iterable[PoolKey]) -> Optional[Any]:
        """The client `take` gives for the first of `keys` that has one, or None."""
        for key in keys:
            client = self.take(key)
            if client is not None:
                return client
        return None

    def forget(self, key: PoolKey, client: Any) -> None:
        """The client's idle connection went away (closed by the server, or a line arrived): drop it."""
        self._remove(key, client)

    def close(self) -> defer.Deferred:
        """QUIT every idle connection and park none from now on (shutdown, or a reload retiring this hop).
        Fires once all of them are closed."""
        self._closed = True
        closing = []
        for key in list(self._idle):
            for client, _ in list(self._idle[key]):
                self._remove(key, client)
                closing.append(client.quit_idle())
        return defer.gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)

    def _expire(self, key: PoolKey, client: Any) -> None:
        # Its time is up: say goodbye properly (RFC 5321 4.1.1.10) rather than just dropping the socket.
        if self._remove(key, client, cancel=False):
            client.quit_idle()

    def _remove(self, key: PoolKey, client: Any, cancel: bool = True) -> bool:
        entries = self._idle.get(key, [])
        for index, (parked, expiry) in enumerate(entries):
            if parked is client:
                del entries[index]
                if cancel and expiry.active():
                    expiry.cancel()
                if not entries:
                    del self._idle[key]
                return True
        return False
