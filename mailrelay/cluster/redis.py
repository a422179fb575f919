# -*- test-case-name: tests.test_cluster_link -*-
"""The relay's one connection to the `[cluster] redis` server, and what happens when Redis is not there.

Where it sits: at the side of the journey.  The shared limiters (cluster/shared.py) send their
scripts through `RedisLink.evalsha` and their plain commands through `RedisLink.call`; both answer
with a Deferred that fires with Redis's reply, or fails with `RedisUnavailable` — at once while the
link is down, and at the latest after `timeout` seconds (the bounded wait) while it is up.  The
caller then uses its local counters.  Nothing on this link ever makes an SMTP session wait longer
than `timeout`.

States: `up` once a connection answered PING and has the scripts loaded; down otherwise.  A lost
connection, a refused connect, a failed AUTH or a reply later than `timeout` puts the link down: the
connection is dropped and a new one is tried in the background after a backoff (RECONNECT_FIRST
seconds, doubling with jitter up to RECONNECT_MAX).  The change to down is logged once (with the
reason) and the change back to up is logged once; `mailrelay_cluster_redis_up` shows the state and
`mailrelay_cluster_redis_fallbacks_total` counts the decisions taken locally meanwhile.

The URL: `redis://[[user]:password@]host[:port][/db]`, or `rediss://` for TLS (RFC 8446 through
Twisted's TLS: the host name is verified against the system's CAs, or `ca_file`).  Its password is
never logged: `masked(url)` replaces it with `***` wherever the URL is shown.

The client protocol is txredisapi's RedisProtocol (Twisted-native, RESP2): chosen by measurement
(docs/decisions.md, benchmarks/redis_client.py).  Its module is imported only when the link starts, so
that merely loading the config never installs a reactor.
"""
from __future__ import annotations

import random
import uuid
from typing import Optional

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure

from mailrelay.cluster import gcra
from mailrelay.cluster.url import RedisURL
from mailrelay.logger import Logger

DEFAULT_TIMEOUT = 0.1        # seconds: the bounded wait of one call while the link is up
CONNECT_TIMEOUT = 2.0        # seconds for a connect, AUTH, SELECT, PING and the script loads
RECONNECT_FIRST = 0.5
RECONNECT_MAX = 30.0

log = Logger(namespace="mailrelay.cluster")


class RedisUnavailable(Exception):
    """Redis did not answer (down, or later than the bounded wait): decide locally."""


class _Factory(protocol.ClientFactory):
    """What RedisProtocol expects of its factory when AUTH or SELECT fails (it calls these)."""
    isLazy = False
    noisy = False

    def __init__(self, protocol_class, url: RedisURL):
        self._class, self._url = protocol_class, url
        self.error: Optional[str] = None

    def buildProtocol(self, addr):
        p = self._class(charset="utf-8", password=self._url.password, dbid=self._url.db or None,
                        convertNumbers=True, username=self._url.username)
        p.factory = self
        return p

    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        self.error = why


class RedisLink(service.Service):
    """The link to one Redis (see the module docstring).  `reactor` connects and times; `metrics` (a
    mailrelay.metrics.Metrics, or None) shows the state and counts fallbacks; `prefix` starts every key
    (`[cluster] key_prefix`)."""

    def __init__(self, url: RedisURL, reactor, timeout: float = DEFAULT_TIMEOUT, prefix: str = "mailrelay:",
                 metrics=None, ca_file=None, endpoint=None):
        self.url, self.timeout, self.prefix = url, timeout, prefix
        self._reactor = reactor
        self._metrics = metrics
        self._ca_file = ca_file
        self._endpoint = endpoint            # tests may hand one in; else built from the URL
        self._conn = None                    # the RedisProtocol in use while up
        self.up = False
        self._announced: Optional[bool] = None    # the state last logged: log each change once
        self._attempt = 0
        self._retry = None
        self._attempt_d = None               # the connect under way (stopService cancels it)
        self._connecting = False
        self._shas = {name: gcra.sha1(script) for name, script in gcra.SCRIPTS.items()}
        self.fallbacks = 0
        self.on_up: list = []                # called (no arguments) each time the link comes up
        if metrics is not None:
            metrics.watch_cluster(lambda: 1 if self.up else 0)

    # -- the calls -----------------------------------------------------------------------------------

    def call(self, *command) -> defer.Deferred:
        """One Redis command; fires with its reply, or fails with RedisUnavailable (bounded)."""
        conn = self._conn
        if not self.up or conn is None:
            return defer.fail(RedisUnavailable("down"))
        try:
            d = conn.execute_command(*command)
        except Exception as e:          # the protocol says "not connected" synchronously
            self._down(f"{type(e).__name__}: {e}")
            return defer.fail(RedisUnavailable(str(e)))
        return self._bounded(d, conn)

    def evalsha(self, script: str, keys: list, args: list) -> defer.Deferred:
        """Run one of gcra.SCRIPTS by its SHA1 (loaded at connect; EVAL once should Redis have lost it)."""
        d = self.call("EVALSHA", self._shas[script], len(keys), *keys, *args)

        def noscript(failure):
            if "NOSCRIPT" in str(failure.value):
                return self.call("EVAL", gcra.SCRIPTS[script], len(keys), *keys, *args)
            return failure
        return d.addErrback(noscript)

    def _bounded(self, d: defer.Deferred, conn) -> defer.Deferred:
        result: defer.Deferred[object] = defer.Deferred()

        def late():
            if not result.called:
                # Down first: whatever the caller does next (at once, in the errback) sees the link down.
                self._down(f"no reply within {self.timeout:g}s", conn)
                result.errback(RedisUnavailable(f"no reply within {self.timeout:g}s"))

        timer = self._reactor.callLater(self.timeout, late)

        def answered(value):
            if timer.active():
                timer.cancel()
            if result.called:
                return None
            if isinstance(value, Failure):
                if type(value.value).__name__ == "ResponseError":
                    result.errback(value)       # Redis refused the command (NOSCRIPT, a bug): reported
                else:
                    self._down(str(value.value), conn)                     # lost, not connected
                    result.errback(RedisUnavailable(str(value.value)))
            else:
                result.callback(value)
            return None
        d.addBoth(answered)
        return result

    def fell_back(self, what: str) -> None:
        """Count one decision taken locally because Redis did not answer (`what`: rate | auth | suppression |
        throttle)."""
        self.fallbacks += 1
        if self._metrics is not None:
            self._metrics.cluster_fallback(what)

    def seconds(self) -> float:
        """The relay's clock (the link's reactor): what local expiry is judged by."""
        return self._reactor.seconds()

    @property
    def clock(self):
        """The link's reactor, as an IReactorTime: for the timers of what uses the link."""
        return self._reactor

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @staticmethod
    def unique() -> str:
        """A member name no other attempt anywhere uses (AUTH attempts in the sliding log)."""
        return uuid.uuid4().hex

    # -- the connection ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._connect()

    def stopService(self):
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        attempt, self._attempt_d = self._attempt_d, None
        if attempt is not None and self._connecting:
            attempt.cancel()                 # a connect or handshake under way: dropped, not reported later
        conn, self._conn = self._conn, None
        self.up = False
        if conn is not None and conn.transport is not None:
            conn.transport.loseConnection()
        return None

    def _make_endpoint(self):
        if self._endpoint is not None:
            return self._endpoint
        endpoint: IStreamClientEndpoint = endpoints.HostnameEndpoint(self._reactor, self.url.host, self.url.port,
                                                                     timeout=CONNECT_TIMEOUT)
        if self.url.tls:
            from twisted.internet import ssl

            trust = None
            if self._ca_file is not None:
                with open(self._ca_file, "rb") as f:
                    trust = ssl.Certificate.loadPEM(f.read())
            options = ssl.optionsForClientTLS(self.url.host, trustRoot=trust)
            endpoint = endpoints.wrapClientTLS(options, endpoint)
        return endpoint

    def _connect(self) -> None:
        if not self.running or self._connecting:
            return
        self._retry = None
        self._connecting = True
        from txredisapi import RedisProtocol      # imported here: see the module docstring

        factory = _Factory(RedisProtocol, self.url)
        d = self._attempt_d = self._make_endpoint().connect(factory)
        timer = self._reactor.callLater(CONNECT_TIMEOUT, d.cancel)
        d.addCallback(self._handshake, factory)
        d.addBoth(self._connect_done, timer)
        d.addCallbacks(self._ready, self._failed)

    def _handshake(self, conn, factory: _Factory) -> defer.Deferred:
        """AUTH and SELECT (RedisProtocol's connectionMade), then PING and SCRIPT LOAD, all bounded."""
        ready = conn.whenConnected()
        lost = conn.whenDisconnected()

        def gone(_):
            if not ready.called:
                ready.errback(RedisUnavailable(factory.error or "connection closed during the handshake"))
        lost.addCallback(gone)
        timer = self._reactor.callLater(CONNECT_TIMEOUT, lambda: ready.called or ready.errback(
            RedisUnavailable(f"no handshake within {CONNECT_TIMEOUT:g}s")))

        def loaded(_):
            if timer.active():
                timer.cancel()
            return defer.gatherResults([conn.execute_command("SCRIPT", "LOAD", s) for s in gcra.SCRIPTS.values()],
                                       consumeErrors=True).addCallback(lambda shas: self._check(conn, shas))

        def aborted(failure):
            if timer.active():
                timer.cancel()
            if conn.transport is not None:
                conn.transport.abortConnection()
            return failure
        return ready.addCallback(lambda c: c.execute_command("PING")).addCallback(loaded).addErrback(aborted)

    def _check(self, conn, shas) -> object:
        for sha in shas:
            if isinstance(sha, Exception):
                raise RedisUnavailable(f"SCRIPT LOAD failed: {sha}")
        return conn

    def _ready(self, conn) -> None:
        if not self.running:
            conn.transport.loseConnection()
            return
        self._conn, self.up, self._attempt = conn, True, 0
        conn.whenDisconnected().addCallback(lambda _: self._down("connection lost", conn))
        for hook in self.on_up:
            try:
                hook()
            except Exception:
                log.failure("cluster: a task run when Redis came up failed")
        if self._announced is not True:
            if self._announced is None:
                log.info("cluster: Redis {url} reachable: limits and the suppression list are shared",
                         url=str(self.url))
            else:
                log.info("cluster: Redis {url} reachable again: back to shared counting", url=str(self.url))
            self._announced = True

    def _failed(self, failure) -> None:
        if not self.running:
            return                           # stopped meanwhile: nothing to announce, nothing to retry
        why = failure.getErrorMessage() if not failure.check(defer.CancelledError) else \
            f"no connection within {CONNECT_TIMEOUT:g}s"
        self._announce_down(why)
        self._schedule()

    def _connect_done(self, result, timer):
        self._connecting = False
        if timer.active():
            timer.cancel()
        return result

    def _down(self, why: str, conn=None) -> None:
        """The link in use failed: drop it, fall back, reconnect later."""
        if conn is not None and conn is not self._conn:
            return                        # an old connection's news
        was_up = self.up
        self.up, current, self._conn = False, self._conn, None
        if current is not None and current.transport is not None:
            current.transport.abortConnection()
        if was_up:
            self._announce_down(why)
            self._schedule()

    def _announce_down(self, why: str) -> None:
        if self._announced is not False:
            log.warn("cluster: Redis {url} unreachable ({why}): each limit falls back to this relay's own "
                     "counters until it answers again", url=str(self.url), why=why)
            self._announced = False

    def _schedule(self) -> None:
        if not self.running or (self._retry is not None and self._retry.active()) or self._connecting:
            return
        delay = min(RECONNECT_MAX, RECONNECT_FIRST * 2 ** self._attempt)
        delay *= random.uniform(0.8, 1.2)
        self._attempt = min(self._attempt + 1, 20)
        self._retry = self._reactor.callLater(delay, self._connect)
