# -*- test-case-name: tests.test_cluster_throttle -*-
"""`[[throttle]]` shared by every relay naming one `[cluster] redis`: one message rate, one connection
cap and one pause per destination for the cluster, with this relay's own LocalThrottle behind it.

Where it sits: at the side of the journey, behind the IThrottle seam the delivery scheduler asks
(queue.shaping).  IThrottle answers at once, from memory; Redis answers later.  So:

- The rate: before a connection to a throttled destination starts, this relay books the next free
  start in Redis (gcra.THROTTLE_RESERVE, atomic: the destination's TAT moves one interval on per
  booking, whichever relay books).  While the booking is in flight `ready_at` answers "a moment from
  now" (the bounded wait); when Redis answers, the booked time, and `on_ready` (the scheduler's wake)
  is called so that the start goes as soon as it may.  A relay holds at most one booking per
  destination, so relays together start at most one message per interval (a booking made and then
  used a little late is the burst of one).
- Connections: the booking also takes a lease in the destination's set of leases when the rule has
  `connections` (refused when the set is full: `ready_at` asks again after FULL_RETRY).  A lease lapses
  LEASE seconds after it was last renewed: this relay renews its open ones every LEASE / 3 (and at once
  when Redis comes back, putting back those it opened meanwhile), `finish` releases its own; a relay
  that dies frees its leases within LEASE seconds.
- Pauses: a "slow down" reply starts the pause in Redis too (gcra.THROTTLE_PAUSE: doubled per pause in
  a row, counted for the cluster; a reply to a delivery that began before the pause in force belongs
  to it).  Every booking reads the pause, and a pause another relay began is adopted into the local
  view (LocalThrottle.adopt): this relay holds the destination back until its end.  An accepted
  delivery that began after the pause ends the row for all (gcra.THROTTLE_SUCCEED).

Redis unreachable or later than its bounded wait (RedisLink): the local throttle alone decides, each
start so decided is counted (`mailrelay_cluster_redis_fallbacks_total{what="throttle"}`), the link logs
the outage once and the return once, and the next booking after it is back goes to Redis again.  Keys:
`<prefix>throttle:rate:<destination>`, `...:conn:<destination>`, `...:pause:<destination>`, each with a
TTL no longer than its state is worth.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from twisted.application import service
from twisted.internet import task
from zope.interface import implementer

from mailrelay.cluster.redis import RedisLink, RedisUnavailable
from mailrelay.config import Throttle
from mailrelay.config.model import MAX_THROTTLE_PAUSE
from mailrelay.queue.throttle import QUIET_AFTER, DestinationStatus, LocalThrottle
from mailrelay.interfaces import IThrottle
from mailrelay.logger import Logger

LEASE = 30.0               # seconds a connection lease lives unless renewed
FULL_RETRY = 0.25          # seconds before asking again when the cluster's connections are all in use
REFUSED_PAUSE = 1.0        # seconds a destination is decided locally after Redis refused its booking
REASON_MAX = 200           # characters of the "slow down" reply kept in Redis

log = Logger(namespace="mailrelay.cluster")


@dataclass
class _View:
    """What this relay holds in Redis for one destination."""
    pending: bool = False                  # a booking in flight
    grant: Optional[float] = None          # a booked start (this clock) not yet used
    member: str = ""                       # the lease that came with it ("" : no cap)
    open: list[str] = field(default_factory=list)    # leases of the connections started
    ask_after: float = 0.0                 # the cap was full, or Redis said paused: ask again then
    row: int = 0                           # pauses in a row as Redis counts them
    local_until: float = 0.0               # Redis refused a booking (not an outage): decide here until then

    def idle(self, now: float) -> bool:
        return not (self.pending or self.grant is not None or self.open or self.row or self.ask_after > now
                    or self.local_until > now)


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


@implementer(IThrottle)
class SharedThrottle(service.Service):
    """IThrottle for the cluster (module docstring).  `local`: this relay's LocalThrottle (default a new
    one); `on_ready`: called with no arguments when a booking was answered (the scheduler's wake)."""

    def __init__(self, link: RedisLink, local: Optional[LocalThrottle] = None,
                 on_ready: Optional[Callable[[], None]] = None, lease: float = LEASE):
        self.link = link
        self.local = local if local is not None else LocalThrottle()
        self.on_ready = on_ready
        self.lease = lease
        self._views: dict[str, _View] = {}
        self._renewal: Optional[task.LoopingCall] = None
        link.on_up.append(self.renew)

    # -- IThrottle -----------------------------------------------------------------------------------

    def ready_at(self, destination: str, rule: Throttle, now: float) -> Optional[float]:
        ready = self.local.ready_at(destination, rule, now)
        if ready is None or ready > now or not self.link.up or not (rule.interval or rule.connections or rule.pause):
            return ready                 # held back here already, Redis away, or nothing to share
        view = self._views.get(destination)
        if view is None:
            view = self._views[destination] = _View()
        if view.local_until > now:
            return ready
        if not (view.grant is not None or view.pending or view.ask_after > now):
            self._reserve(destination, rule, view)
        if view.grant is not None:
            return view.grant
        if view.pending:
            return now + self.link.timeout     # the answer comes within the bounded wait (on_ready)
        if view.ask_after > now:
            return view.ask_after
        return self.local.ready_at(destination, rule, now)   # answered at once: a pause, or Redis away

    def start(self, destination: str, rule: Throttle, now: float) -> None:
        self.local.start(destination, rule, now)
        view = self._views.get(destination)
        if view is not None and view.grant is not None:
            view.grant = None
            if view.member:
                view.open.append(view.member)
                view.member = ""
            self._forget(destination, view)
            return
        # Started on this relay's own say: Redis was away.  A connection it opens still gets a lease,
        # put into Redis at the next renewal (when Redis is back), so that the cluster counts it.
        self.link.fell_back("throttle")
        if rule.connections:
            if view is None:
                view = self._views[destination] = _View()
            view.open.append(self.link.unique())

    def finish(self, destination: str) -> None:
        self.local.finish(destination)
        view = self._views.get(destination)
        if view is None or not view.open:
            return
        member = view.open.pop()
        if self.link.up:
            d = self.link.evalsha("release", [self._key("conn", destination)], [member])
            d.addErrback(self._failed_quietly, "release")      # not released: it lapses within LEASE
        self._forget(destination, view)

    def slowed(self, destination: str, rule: Throttle, started: float, now: float,
               reply: str) -> tuple[float, bool]:
        until, began = self.local.slowed(destination, rule, started, now, reply)
        if not began:
            return until, began
        if not self.link.up:
            self.link.fell_back("throttle")
            return until, began
        row = self.local.pauses_in_a_row(destination)
        d = self.link.evalsha("throttle_pause", [self._key("pause", destination)],
                              ["", max(0.0, now - started), rule.pause, MAX_THROTTLE_PAUSE, reply[:REASON_MAX],
                               row, QUIET_AFTER])

        def paused(answer) -> None:
            left, ago, shared_row, _ = (int(x) for x in answer[:4])
            self._adopt(destination, rule, ago, left, shared_row, reply)
        d.addCallbacks(paused, self._failed, errbackArgs=("pause",))
        return until, began

    def succeeded(self, destination: str, started: float) -> None:
        self.local.succeeded(destination, started)
        view = self._views.get(destination)
        if view is None or not view.row or not self.link.up:
            return
        view.row = 0
        now = self.link.seconds()
        d = self.link.evalsha("throttle_succeed", [self._key("pause", destination)], ["", max(0.0, now - started)])
        d.addErrback(self._failed_quietly, "succeed")
        self._forget(destination, view)

    def status(self, now: float) -> list[DestinationStatus]:
        return self.local.status(now)

    # -- the bookings ---------------------------------------------------------------------------------

    def _reserve(self, destination: str, rule: Throttle, view: _View) -> None:
        view.pending = True
        member = self.link.unique() if rule.connections else ""
        d = self.link.evalsha("throttle_reserve",
                              [self._key("rate", destination), self._key("conn", destination),
                               self._key("pause", destination)],
                              ["", rule.interval, rule.connections, self.lease, member or "-"])
        d.addCallbacks(self._reserved, self._refused, callbackArgs=(destination, rule, view, member),
                       errbackArgs=(destination, view))

    def _reserved(self, answer, destination: str, rule: Throttle, view: _View, member: str) -> None:
        view.pending = False
        now = self.link.seconds()
        state, wait, left, ago, row = (int(x) for x in answer[:5])
        self._adopt(destination, rule, ago, left, row, _text(answer[5]) if len(answer) > 5 else "")
        if state == 2:
            view.grant, view.member = now + wait / 1e6, member
        elif state == 1:
            view.ask_after = now + FULL_RETRY
        else:
            view.ask_after = now + max(left, 1) / 1000.0     # paused for the cluster: not before its end
        self._wake()

    def _refused(self, failure, destination: str, view: _View) -> None:
        """No booking: Redis went away (the link is down now) or refused the script (then this relay
        decides alone for REFUSED_PAUSE, rather than asking again at once).  The start that follows is
        the fallback, counted there."""
        view.pending = False
        if not failure.check(RedisUnavailable):
            log.failure("cluster: Redis refused the throttle booking; decided locally", failure)
            view.local_until = self.link.seconds() + REFUSED_PAUSE
        self._forget(destination, view)
        self._wake()

    def _adopt(self, destination: str, rule: Throttle, ago: int, left: int, row: int, reason: str) -> None:
        """What Redis said of the destination's pause, into the local view."""
        if ago < 0:
            return
        view = self._views.get(destination)
        if view is None and row:
            view = self._views[destination] = _View()     # kept until a success ends the row
        if view is not None:
            view.row = row
        now = self.link.seconds()
        self.local.adopt(destination, rule, now - ago / 1000.0, now + max(0, left) / 1000.0, row, reason, now)

    def _wake(self) -> None:
        if self.on_ready is not None:
            try:
                self.on_ready()
            except Exception:
                log.failure("cluster: waking the scheduler after a throttle booking failed")

    # -- leases ---------------------------------------------------------------------------------------

    def renew(self) -> None:
        """Renew the leases of this relay's open connections (each LEASE / 3, and when Redis comes back);
        drop a booking nobody used for LEASE seconds (its deliveries went elsewhere or were removed: its
        lease goes back) and forget the destinations with nothing left here."""
        now = self.link.seconds()
        for destination, view in list(self._views.items()):
            if view.grant is not None and view.grant + self.lease < now:
                view.grant, member, view.member = None, view.member, ""
                if member and self.link.up:
                    d = self.link.evalsha("release", [self._key("conn", destination)], [member])
                    d.addErrback(self._failed_quietly, "release")
            if view.row and not self.local.pauses_in_a_row(destination):
                view.row = 0                  # the local view forgot the row (quiet for long): so do we
            self._forget(destination, view)
        if not self.link.up:
            return
        for destination, view in list(self._views.items()):
            if view.open:
                d = self.link.evalsha("throttle_renew", [self._key("conn", destination)],
                                      ["", self.lease, *view.open])
                d.addErrback(self._failed_quietly, "renew")

    def startService(self) -> None:
        super().startService()
        self._renewal = task.LoopingCall(self.renew)
        self._renewal.clock = self.link.clock
        self._renewal.start(self.lease / 3, now=False)

    def stopService(self):
        super().stopService()
        if self._renewal is not None and self._renewal.running:
            self._renewal.stop()
        self._renewal = None
        return None

    # -- helpers --------------------------------------------------------------------------------------

    def _key(self, kind: str, destination: str) -> str:
        return self.link.key("throttle", kind, destination)

    def _forget(self, destination: str, view: _View) -> None:
        if view.idle(self.link.seconds()) and self._views.get(destination) is view:
            del self._views[destination]

    def _failed(self, failure, what: str) -> None:
        if not failure.check(RedisUnavailable):
            log.failure("cluster: Redis refused the throttle {what} call; decided locally", failure, what=what)
        self.link.fell_back("throttle")

    def _failed_quietly(self, failure, what: str) -> None:
        if not failure.check(RedisUnavailable):
            log.failure("cluster: Redis refused the throttle {what} call", failure, what=what)
