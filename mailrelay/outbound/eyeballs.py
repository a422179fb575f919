# -*- test-case-name: tests.test_eyeballs -*-
"""Happy eyeballs (RFC 8305) for connecting to one mail exchanger: the connection attempt scheduler.

Job in the journey: direct delivery (outbound.mx) knows an exchanger's addresses from its own resolver
(outbound.dns, with its TTL cache); this module turns them into one connection.  In: the addresses, a
function making a client endpoint for one address (outbound.mx's TCP4/TCP6ClientEndpoint with the connect
timeout and `[delivery] source_address`) and a clock.  Out: `HappyEyeballsEndpoint`, an
IStreamClientEndpoint whose `connect()` fires with the protocol of the first connection made, or fails
with the error of the only address, or `AllAttemptsFailed` naming every address's error.  Afterwards it
tells which address answered (`connected`) and which are still worth a try (`untried()`).

The algorithm (RFC 8305):
- Order (§4): IPv6 first, then alternating families, each family in the order DNS gave (a "First Address
  Family Count" of 1).
- Stagger (§5): a new attempt starts every `CONNECTION_ATTEMPT_DELAY` seconds while the earlier ones are
  still pending; an attempt that fails (refused, unreachable, no route) starts the next one at once.  A
  hung address (its SYN never answered) keeps its own connect timeout but no longer holds up the others.
- The first connection made wins (§5); every attempt still pending is cancelled (its connector stops
  connecting) and no later one is started.  At most one protocol is ever built (`_OnceFactory`).
- Cancelling the Deferred of `connect()` cancels every pending attempt and the stagger timer.

Twisted's HostnameEndpoint runs the same race, but resolves the name itself through the system resolver;
delivery needs its own answers (MX preference order, TTL cache, the source address's family only).
"""
from __future__ import annotations

import ipaddress
from collections import deque
from itertools import zip_longest
from typing import Any, Callable, Iterable, Optional

from twisted.internet import defer, error
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

# RFC 8305 §5: "A simple implementation can have a fixed delay ... The recommended value for a default
# delay is 250 milliseconds", never below 100 ms nor above 2 s.
CONNECTION_ATTEMPT_DELAY = 0.25
MIN_ATTEMPT_DELAY, MAX_ATTEMPT_DELAY = 0.1, 2.0


def family(address: str) -> int:
    """4 or 6."""
    return ipaddress.ip_address(address).version


def interleave(addresses: Iterable[str]) -> list[str]:
    """RFC 8305 §4: IPv6 first, then alternating address families, each family keeping its own order;
    duplicates dropped.  interleave(interleave(x)) == interleave(x)."""
    unique = list(dict.fromkeys(addresses))
    six = [a for a in unique if family(a) == 6]
    four = [a for a in unique if family(a) == 4]
    return [a for pair in zip_longest(six, four) for a in pair if a is not None]


class AllAttemptsFailed(error.ConnectError):
    """No address of the exchanger could be connected to; `failures` holds (address, Failure) in the
    order the attempts failed."""

    def __init__(self, failures: list[tuple[str, Failure]]):
        super().__init__(string="every address failed")
        self.failures = list(failures)

    def __str__(self) -> str:
        return "; ".join(f"{address}: {reason.value}" for address, reason in self.failures)


class _OnceFactory:
    """The caller's factory, building at most one protocol: a second connection that completes before
    the race has settled gets none, and is closed (the client protocol of a delivery is one object)."""

    noisy = False

    def __init__(self, wrapped: IProtocolFactory):
        self._wrapped = wrapped
        self.built = False

    def doStart(self) -> None:
        self._wrapped.doStart()

    def doStop(self) -> None:
        self._wrapped.doStop()

    def buildProtocol(self, addr) -> Any:
        if self.built:
            return None
        self.built = True
        return self._wrapped.buildProtocol(addr)


@implementer(IStreamClientEndpoint)
class HappyEyeballsEndpoint:
    """Connects to the first of `addresses` that answers (see the module docstring).  `endpoint_for(address)`
    makes the endpoint of one attempt; each keeps its own connect timeout.  One race per `connect()`;
    `connected`, `failures` and `untried()` describe the latest one."""

    def __init__(self, clock: Any, addresses: Iterable[str],
                 endpoint_for: Callable[[str], IStreamClientEndpoint],
                 delay: float = CONNECTION_ATTEMPT_DELAY):
        if not MIN_ATTEMPT_DELAY <= delay <= MAX_ATTEMPT_DELAY:
            raise ValueError(f"connection attempt delay {delay} s is outside RFC 8305's 0.1 s to 2 s")
        self.addresses = tuple(interleave(addresses))
        if not self.addresses:
            raise ValueError("no address to connect to")
        self._clock = clock
        self._endpoint_for = endpoint_for
        self.delay = delay
        self._race: Optional[_Race] = None

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred:
        """A Deferred firing with the connected protocol, failing with the only address's connection
        error, AllAttemptsFailed, or ConnectingCancelledError when cancelled."""
        self._race = _Race(self._clock, self.addresses, self._endpoint_for, self.delay, protocolFactory)
        return self._race.start()

    @property
    def started(self) -> tuple[str, ...]:
        """The addresses an attempt was started for, in order."""
        return tuple(self._race.started) if self._race else ()

    @property
    def connected(self) -> Optional[str]:
        """The address that answered, or None."""
        return self._race.connected if self._race else None

    @property
    def failures(self) -> list[tuple[str, Failure]]:
        """(address, Failure) of each attempt that failed on its own (not cancelled by the winner)."""
        return list(self._race.failures) if self._race else []

    def untried(self) -> list[str]:
        """The addresses, in order, that neither answered nor failed: never started, or cancelled
        because another one won.  All of them before the first connect()."""
        if self._race is None:
            return list(self.addresses)
        done = {self._race.connected, *(address for address, _ in self._race.failures)}
        return [a for a in self.addresses if a not in done]


class _Race:
    """One run of the algorithm over `addresses`; `winner` is what connect() returned."""

    def __init__(self, clock: Any, addresses: tuple[str, ...], endpoint_for: Callable[[str], Any],
                 delay: float, factory: IProtocolFactory):
        self._clock, self._endpoint_for, self._delay = clock, endpoint_for, delay
        self._factory = _OnceFactory(factory)
        self._queue = deque(addresses)
        self._pending: dict[defer.Deferred, str] = {}
        self._timer: Any = None
        self._done = False
        self.started: list[str] = []
        self.failures: list[tuple[str, Failure]] = []
        self.connected: Optional[str] = None
        self.winner: defer.Deferred = defer.Deferred(canceller=self._cancelled)

    def start(self) -> defer.Deferred:
        self._next()
        return self.winner

    def _next(self) -> None:
        """Start the next attempt; while more are queued, the one after follows `delay` seconds later."""
        self._stop_timer()
        if self._done or not self._queue:
            return
        address = self._queue.popleft()
        self.started.append(address)
        attempt = defer.maybeDeferred(lambda: self._endpoint_for(address).connect(self._factory))
        self._pending[attempt] = address
        if self._queue:
            self._timer = self._clock.callLater(self._delay, self._next)
        # Callbacks last: an attempt failing at once (e.g. no route to an IPv6 host) moves on right here.
        attempt.addCallbacks(self._succeeded, self._failed, callbackArgs=(attempt,), errbackArgs=(attempt,))

    def _succeeded(self, protocol: Any, attempt: defer.Deferred) -> None:
        address = self._pending.pop(attempt)
        if self._done:
            # Not reachable with TCP endpoints (a connection and its Deferred complete in one call, and
            # the others are cancelled then); any other endpoint's late connection is closed.
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.loseConnection()
            return
        self._done, self.connected = True, address
        self._stop_all()
        self.winner.callback(protocol)

    def _failed(self, reason: Failure, attempt: defer.Deferred) -> None:
        address = self._pending.pop(attempt)
        if self._done:
            return None        # cancelled because another attempt won, or the whole race was cancelled
        self.failures.append((address, reason))
        if self._queue:
            self._next()       # refused or unreachable: the next address now, not after the delay
        elif not self._pending:
            self._done = True
            self._stop_timer()
            self.winner.errback(reason if len(self.failures) == 1 else Failure(AllAttemptsFailed(self.failures)))
        return None

    def _cancelled(self, winner: defer.Deferred) -> None:
        self._done = True
        self._stop_all()
        winner.errback(Failure(error.ConnectingCancelledError(self.started[-1] if self.started else None)))

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _stop_all(self) -> None:
        self._stop_timer()
        self._queue.clear()
        for attempt in list(self._pending):
            attempt.cancel()
