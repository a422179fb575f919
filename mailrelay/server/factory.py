# -*- test-case-name: tests.test_cluster_gcra, tests.test_shutdown, tests.test_server_network -*-
"""The listener's protocol factory: one RelaySession per connection, plus the per-listener counters.

Its job in the message's journey: the first stage a client meets.  In: the listener's configuration
and its collaborators (portal, policy, incoming queue, TLS options, clock).  Out: sessions that share
this factory's connection counters (max_connections in all, max_connections_per_ip) and its
AUTH-attempt window (auth_failures_per_minute per peer IP).  Per-IP counts key IPv6 peers by their /64
(ratelimit.client_key).  Both live here, never at module level,
and both use bounded memory: counters only hold open connections, the failure window at most
`MAX_TRACKED_IPS` addresses with at most `limit + 1` timestamps each.

Stock Twisted copies neither timeouts nor challengers into its protocol and has no connection caps
(twisted-smtp.md); this factory is the single place those come from.

Graceful shutdown (`shut_down`, called by the service once the listener has stopped accepting): idle
sessions are told 421 4.3.2 and closed at once (RFC 5321 §3.8); a session in the middle of a
transaction may finish it — its client still gets its 250 — within SHUTDOWN_GRACE seconds, after which
it is told 421 4.3.2 too and its partial message is thrown away (never acknowledged, so never lost:
the client keeps it and retries).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Optional

from twisted.cred.portal import Portal
from twisted.internet import defer, protocol
from zope.interface import implementer

from mailrelay import config
from mailrelay.interfaces import IAttemptWindow
from mailrelay.logger import Logger
from mailrelay.server.session import RelaySession

SUPPORTED_MECHANISMS = ("PLAIN", "LOGIN")
MAX_TRACKED_IPS = 10000
FAILURE_WINDOW = 60.0
SHUTDOWN_GRACE = 30.0    # seconds a transaction in progress may take to finish once shutdown begins
CLOSE_BOUND = 5.0        # then seconds for the 421s to drain before the remaining connections are cut


class ConnectionCounter:
    """Open connections, in all and per IP."""

    def __init__(self, max_total: int, max_per_ip: int):
        self._max_total = max_total
        self._max_per_ip = max_per_ip
        self._per_ip: dict[str, int] = {}
        self.total = 0

    def set_limits(self, max_total: int, max_per_ip: int) -> None:
        self._max_total, self._max_per_ip = max_total, max_per_ip

    def open(self, ip: str) -> bool:
        """Count a new connection; False (and not counted) when a cap is reached."""
        if self.total >= self._max_total or self._per_ip.get(ip, 0) >= self._max_per_ip:
            return False
        self.total += 1
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return True

    def close(self, ip: str) -> None:
        self.total -= 1
        left = self._per_ip.get(ip, 0) - 1
        if left > 0:
            self._per_ip[ip] = left
        else:
            self._per_ip.pop(ip, None)


@implementer(IAttemptWindow)
class FailureWindow:
    """AUTH attempts per client key (ratelimit.client_key: IPv6 per /64) over the last minute, bounded
    memory.  An attempt is counted when its check starts, so connections in parallel share one budget;
    a success may be refunded.  One window serves every listener and outlives reloads: `set_limit`
    applies a new limit at once to the keys already counted."""

    def __init__(self, limit: int, clock, window: float = FAILURE_WINDOW, max_ips: int = MAX_TRACKED_IPS):
        self._limit = limit
        self._clock = clock
        self._window = window
        self._max_ips = max_ips
        self._failures: OrderedDict[str, deque] = OrderedDict()

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        self._limit = limit

    def over_limit(self, count: int) -> bool:
        """True when `count` attempts in the window are more than the limit (0: no limit)."""
        return self._limit > 0 and count > self._limit

    def count(self, ip: str) -> int:
        times = self._failures.get(ip)
        if times is None:
            return 0
        horizon = self._clock.seconds() - self._window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[ip]
            return 0
        return len(times)

    def exhausted(self, ip: str) -> bool:
        """True when `ip` may not try again yet (limit 0 means no limit)."""
        return self._limit > 0 and self.count(ip) >= self._limit

    def record(self, ip: str) -> int:
        """Note one attempt; returns the attempts in the window including this one."""
        times = self._failures.pop(ip, None) or deque()
        times.append(self._clock.seconds())
        # Only whether the count passed the limit matters: limit + 1 timestamps are enough, whatever
        # the limit was when this key was first seen (a deque's maxlen would fix the old one).
        while len(times) > self._limit + 1:
            times.popleft()
        self._failures[ip] = times            # most recently tried last
        while len(self._failures) > self._max_ips:
            self._failures.popitem(last=False)
        return self.count(ip)

    def refund(self, ip: str) -> None:
        """Take back the latest attempt of `ip` (it succeeded)."""
        times = self._failures.get(ip)
        if times:
            times.pop()
            if not times:
                del self._failures[ip]


class RelayServerFactory(protocol.ServerFactory):
    """Builds hardened ESMTP sessions for one listener."""

    protocol = RelaySession
    noisy = False       # no "Starting factory" lines: the listener's port is logged by the endpoint service
    _log = Logger()

    def __init__(
        self,
        *,
        hostname: str,
        listener: config.Listener,
        limits: config.Limits,
        portal: Optional[Portal],
        mechanisms: tuple[str, ...],
        policy,
        queue,
        tls_options=None,
        clock=None,
        metrics=None,
        connections: Optional["ConnectionCounter"] = None,
        auth_failures: Optional[IAttemptWindow] = None,
        authserv_id: Optional[str] = None,
        postmaster: Optional[str] = None,
        received_shows_user: bool = False,
        suppression=None,
    ):
        """`connections` and `auth_failures` may be shared between the listeners of one relay, so that
        max_connections counts "in all" and an attacker gets one AUTH budget, not one per port.
        `authserv_id`: the name our own Authentication-Results carry (when the relay verifies DKIM);
        incoming fields claiming it are removed (server/authres.py).  `postmaster`: the mailbox that
        `RCPT TO:<postmaster>` (and postmaster@hostname) is delivered to, from any client.
        `received_shows_user`: name the authenticated user in our Received field ([auth]).
        `suppression`: the ISuppressionCheck RCPT is judged by (spool.suppression.SuppressionList, or
        cluster.shared.SharedSuppression with `[cluster] redis`), or None ([suppression] off).
        `auth_failures`: an IAttemptWindow (FailureWindow, or cluster.shared.SharedFailureWindow)."""
        if clock is None:
            from twisted.internet import reactor as clock
        self.hostname = hostname
        self.listener = listener
        self.limits = limits
        self.portal = portal
        self.mechanisms = tuple(m.upper() for m in mechanisms if m.upper() in SUPPORTED_MECHANISMS)
        self.policy = policy
        self.queue = queue
        self.authserv_id = authserv_id
        self.postmaster = postmaster
        self.received_shows_user = received_shows_user
        self.suppression = suppression
        self.tls_options = tls_options
        self.clock = clock
        self.metrics = metrics
        self.connections = connections or ConnectionCounter(limits.max_connections, limits.max_connections_per_ip)
        self.auth_failures = auth_failures or FailureWindow(limits.auth_failures_per_minute, clock)
        self._open_sessions: set = set()      # open, counted sessions (for graceful shutdown)
        self.shutting_down = False
        self._drain_waiters: list[defer.Deferred] = []

    def reconfigure(self, *, limits: config.Limits, portal: Optional[Portal], mechanisms: tuple[str, ...],
                    policy, authserv_id: Optional[str] = None, postmaster: Optional[str] = None,
                    received_shows_user: bool = False) -> None:
        """A reloaded config: new connections use these; sessions already open keep what they had."""
        self.limits, self.portal, self.policy = limits, portal, policy
        self.authserv_id, self.postmaster = authserv_id, postmaster
        self.received_shows_user = received_shows_user
        self.mechanisms = tuple(m.upper() for m in mechanisms if m.upper() in SUPPORTED_MECHANISMS)
        self.connections.set_limits(limits.max_connections, limits.max_connections_per_ip)
        self.auth_failures.set_limit(limits.auth_failures_per_minute)

    @property
    def require_tls(self) -> bool:
        """MAIL needs TLS first: always on "submission", on "relay" when configured."""
        kind = self.listener.kind
        return kind == "submission" or (kind == "relay" and self.listener.require_tls)

    @property
    def require_auth(self) -> bool:
        """MAIL needs AUTH first on the submission ports (RFC 6409 4.3, RFC 8314 3.3)."""
        return self.listener.kind in ("submission", "submissions")

    def buildProtocol(self, addr) -> RelaySession:
        session = self.protocol(self)
        session.factory = self
        return session

    # -- graceful shutdown -------------------------------------------------------------------------

    @property
    def open_sessions(self) -> int:
        """Sessions currently open on this listener (accepted, not refused by a cap)."""
        return len(self._open_sessions)

    def session_opened(self, session: RelaySession) -> None:
        self._open_sessions.add(session)

    def session_closed(self, session: RelaySession) -> None:
        self._open_sessions.discard(session)
        if not self._open_sessions:
            self._drained("every session closed")

    def shut_down(self, grace: float = SHUTDOWN_GRACE) -> defer.Deferred:
        """Close every session gracefully (the listener must already have stopped accepting): idle ones
        at once with 421 4.3.2, those in a transaction once it ends or after `grace` seconds.  Fires when
        every session is gone, at most `grace` + CLOSE_BOUND seconds from now."""
        self.shutting_down = True
        busy = 0
        for session in list(self._open_sessions):
            busy += not session.shut_down()
        if not self._open_sessions:
            return defer.succeed(None)
        self._log.info("{kind} listener: shutting down, {busy} transaction(s) may finish within {grace}s",
                       kind=self.listener.kind, busy=busy, grace=grace)
        done: defer.Deferred[None] = defer.Deferred()
        self._drain_waiters.append(done)
        grace_over = self.clock.callLater(grace, self._grace_over)
        cut = self.clock.callLater(grace + CLOSE_BOUND, self._cut)

        def cancel_timers(result):
            for call in (grace_over, cut):
                if call.active():
                    call.cancel()
            return result
        return done.addBoth(cancel_timers)

    def _grace_over(self) -> None:
        for session in list(self._open_sessions):
            session.grace_over()

    def _cut(self) -> None:
        for session in list(self._open_sessions):
            session.transport.abortConnection()
        self._drained("connections cut after the grace period")

    def _drained(self, why: str) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        if waiters:
            self._log.info("{kind} listener: shut down ({why})", kind=self.listener.kind, why=why)
        for d in waiters:
            d.callback(None)
