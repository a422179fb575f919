"""The delivery scheduler: decides when each spooled message is tried, by which next hop, and what
becomes of each recipient.

Place in the journey: spool --(enqueue / start-up scan)--> **scheduler** --> next hop (smarthost
transport or direct MX) --> results --> spool state, DSN reporter.

In: queue ids (committed messages, the spool at start-up, queue CLI requests via
`spool.take_requests()` polled every 0.5 s).  Out: `INextHop.deliver(message, recipients)` calls,
one per (message, route) group — all of one message's recipients on one route in one transaction —
or, when several such groups wait for the same next hop, one `IBatchNextHop.deliver_batch(jobs)` call
carrying them all on one connection (delivery.batch); per-recipient state written with
`spool.save_state` after every attempt *before* anything is done about it; `spool.remove` once every
recipient has a final answer; `IDeliveryReporter.bounce/delay`.

Rules implemented:
- RFC 5321 §4.2.1 / §4.5.4.1: 2xx delivered, 5xx failed for good, 4xx (and connection failures) retried
  after a growing, jittered interval (delivery.backoff), until `[queue] lifetime`; then the remaining
  recipients expire (RFC 3463 4.4.7) and bounce.
- RFC 3464 DSNs via the reporter: a failure DSN per attempt that settled recipients for good, one delay
  DSN per message after `[queue] delay_warning` (persisted, so a restart does not send another).
- RFC 5321 §4.5.5 / §6.1: never a DSN to the null reverse-path <> (no bounce loops); dropped and logged.
- `[delivery] concurrency` connections in flight in all, `concurrency_per_domain` per recipient domain
  (per transport name for a routed group); what cannot start waits in FIFO order and starts when a
  slot frees.  Connection reuse (RFC 5321 §3.3): messages due in the same reactor turn, or waiting
  for a slot, for the same next hop share connections — one batch is one slot (delivery.batch).
- Held messages are never tried; stopService stops starting work and waits (bounded) for what is in
  flight; everything needed to resume is already in the spool.
- `[[throttle]]` (delivery.shaping, delivery.throttle): per recipient domain a rule matches, a smooth
  message rate, a cap on connections at once, and a pause after a 421 or a 4.7.x deferral, doubling
  while it goes on; deliveries waiting for them are no failed attempts.  The state sits behind
  IThrottle (default: LocalThrottle).
- Metrics (optional `metrics`, a mailrelay.metrics.Metrics): deliveries started, per-recipient results
  and delivery latency; `queue_snapshot()` feeds the queue gauges from memory, without touching the spool,
  and `throttle_snapshot()` the throttle gauges.

The scheduler is in parts, each a module: this one holds the service, the timers (when each message
is due) and the routing of its recipients to next hops; concurrency.py the slots and batches;
shaping.py the throttles; outcomes.py recording results and settling attempts (DSNs, expiry,
removal); control.py the queue CLI's requests; attempts.py the objects they share.
"""
from __future__ import annotations

import random
from collections import deque
from pathlib import Path
from typing import Mapping, Optional

from twisted.application import service
from twisted.internet import defer, task
from zope.interface import implementer

from mailrelay.config import DeliveryConfig, QueueConfig
from mailrelay.delivery.attempts import _Attempt, _Job, _LocalFailure
from mailrelay.delivery.backoff import Backoff
from mailrelay.delivery.concurrency import ConcurrencyMixin
from mailrelay.delivery.control import ADMIN_BOUNCE, POLL_INTERVAL, ControlMixin
from mailrelay.delivery.outcomes import OutcomesMixin
from mailrelay.delivery.shaping import STATUS_FILE, ShapingMixin
from mailrelay.delivery.state import MessageState, StateError, due_time
from mailrelay.delivery.throttle import LocalThrottle, ThrottleRules
from mailrelay.delivery.timetable import Timetable
from mailrelay.envelope import domain_of
from mailrelay.interfaces import IScheduler
from mailrelay.logger import Logger
from mailrelay.spool.ids import id_time
from mailrelay.spool.message import CorruptMessage, UnknownMessage
from mailrelay.crossthread import read_unlocked

__all__ = ["ADMIN_BOUNCE", "DUE_SLACK", "POLL_INTERVAL", "STATUS_FILE", "STOP_TIMEOUT", "Scheduler"]

STOP_TIMEOUT = 30.0      # stopService waits at most this long for deliveries in flight
DUE_SLACK = 1.0          # recipients due within this many seconds join the attempt being made
RECOVER_PER_TURN = 500   # messages the start-up scan schedules per reactor turn (the rest: later turns)
ACTIVE_MIN = 1000        # messages in work (loaded, waiting for a slot or in flight) at most: this, or
ACTIVE_PER_SLOT = 10     # ... this many per `[delivery] concurrency` slot, whichever is more
ACTIVE_HARD_LIMIT = 20000  # ... and never more, even while most wait for a throttle (Postfix's
                           # qmgr_message_active_limit is the same figure)


@implementer(IScheduler)
class Scheduler(ControlMixin, ConcurrencyMixin, ShapingMixin, OutcomesMixin, service.Service):
    """The queue runner.  `spool`: ISpool (plus hold/release/take_requests); `router`: IRouter;
    `transports`: INextHop per transport name; `direct`: the INextHop for MX delivery; `reporter`: an
    IDeliveryReporter or None (no DSNs); `clock`: IReactorTime (default: the reactor); `rng`: the
    jitter's random source; `metrics`: a mailrelay.metrics.Metrics, or None for no metrics; `suppression`:
    told of every permanent failure (spool.suppression.SuppressionRecorder), or None ([suppression] off);
    `events`: an IDeliveryEvents told of every per-recipient outcome (webhooks), or None;
    `throttles`: the [[throttle]] rules; `throttle`: their state, an IThrottle (default: a LocalThrottle);
    `status_path`: where the throttle status is written for the queue CLI (None: nowhere)."""

    log = Logger()

    def __init__(self, spool, router, transports: Mapping[str, object], direct, queue: QueueConfig,
                 delivery: DeliveryConfig, reporter, clock=None, rng: Optional[random.Random] = None,
                 metrics=None, suppression=None, events=None, throttles: tuple = (), throttle=None,
                 status_path: Optional[Path] = None):
        if clock is None:
            from twisted.internet import reactor as clock
        self._spool, self._router, self._transports, self._direct = spool, router, transports, direct
        self._queue, self._delivery, self._reporter, self._clock = queue, delivery, reporter, clock
        self._rng = rng or random.Random()
        self._backoff = Backoff(queue.first_retry, queue.max_retry, rng=self._rng)
        # When each message not in work is due; admits them as room allows (delivery.timetable).
        self._timetable = Timetable(clock, self._due, self._has_room)
        self._recovery: Optional[list[str]] = None   # ids the start-up scan has still to schedule
        self._attempts: dict[str, _Attempt] = {}
        self._waiting: dict[str, deque[_Job]] = {}   # limit key -> deliveries waiting for a slot
        self._in_flight = 0
        self._per_key: dict[str, int] = {}
        self._pumping = self._pump_again = False
        self._pump_call = None                   # a pump asked for at the end of this reactor turn
        self._poller: Optional[task.LoopingCall] = None
        self._stop_waiters: list[defer.Deferred] = []
        self._received: dict[str, float] = {}    # queue id -> received_at of every message seen in the spool
        self._held: set[str] = set()
        self._metrics = metrics
        self._suppression = suppression          # a spool.suppression.SuppressionRecorder, or None (off)
        self._events = events                    # an IDeliveryEvents, or None
        self._rules = ThrottleRules(throttles)
        self._throttle = throttle if throttle is not None else LocalThrottle()
        self._open_to: dict[str, int] = {}       # throttled destination -> connections this scheduler has open
        self._paused: dict[str, float] = {}      # destination -> end of the pause announced in the log
        self._throttle_call = None               # the wake-up for the earliest held-back destination
        self._status_path, self._status_loop = status_path, None
        self._status_dirty, self._status_written = False, 0.0
        if metrics is not None:
            metrics.watch_queue(self.queue_snapshot)
            metrics.watch_throttles(self.throttle_snapshot)

    def reconfigure(self, router, transports: Mapping[str, object], direct, queue: QueueConfig,
                    delivery: DeliveryConfig, throttles: Optional[tuple] = None) -> None:
        """A reloaded config (SIGHUP): later attempts use the new routes, next hops, timings and limits.
        Deliveries in flight finish on the hop they started with; scheduled retries keep their times.
        New `throttles` apply at once to the state kept (a paused destination stays paused)."""
        self._router, self._transports, self._direct = router, transports, direct
        self._queue, self._delivery = queue, delivery
        self._backoff = Backoff(queue.first_retry, queue.max_retry, rng=self._rng)
        if throttles is not None:
            had = bool(self._rules)
            self._rules = ThrottleRules(throttles)
            if self.running and bool(self._rules) != had:
                self._stop_status()
                self._start_status()
        self._pump()

    # -- the service ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._timetable.start()
        if self._spool.suspension() is not None:     # a drain left the spool suspended: stay so
            self._suspend()
        self._recover_all()
        self._poller = task.LoopingCall(self._poll_requests)
        self._poller.clock = self._clock
        self._poller.start(POLL_INTERVAL, now=False)
        self._start_status()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._stop_status()
        self._timetable.stop()
        self._recovery = None
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
        self._pump_call = None
        for attempt in {job.attempt for jobs in self._waiting.values() for job in jobs}:
            self._drop_waiting(attempt, finish=False)
            if not attempt.outstanding:
                del self._attempts[attempt.queue_id]   # nothing in flight: its saved state is complete
        if not self._attempts:
            return defer.succeed(None)
        done = defer.Deferred()
        self._stop_waiters.append(done)
        bound = self._clock.callLater(STOP_TIMEOUT, self._stopped, "timed out")

        def cancel_bound(result):
            if bound.active():
                bound.cancel()
            return result
        return done.addBoth(cancel_bound)

    # -- IScheduler and the queue CLI -------------------------------------------------------------

    def enqueue(self, queue_id: str) -> None:
        """A message was just committed: try it at once, subject to the concurrency limits."""
        self._received.setdefault(queue_id, self._now())
        self._schedule(queue_id, self._now())

    def flush(self, queue_id: Optional[str] = None) -> None:
        """Make every message (or one) due now, whatever its next_attempt says."""
        ids = self._queue_ids() if queue_id is None else [queue_id]
        for one in ids:
            self._schedule(one, self._now(), force=True)

    def wake(self) -> None:
        """Look at the waiting deliveries again this reactor turn: the throttle's answer changed on its
        own (a shared IThrottle whose store just answered, mailrelay.cluster.throttle)."""
        if self.running:
            self._pump_soon()

    # -- when messages are due --------------------------------------------------------------------

    def _recover_all(self) -> None:
        """Schedule every message in the spool by its persisted state: RECOVER_PER_TURN per reactor turn,
        so a restart over a deep queue answers at once and catches up in the background."""
        self._recovery = self._queue_ids()
        self._recovery.reverse()                     # oldest first, popped from the end
        self._recover_some()

    def _recover_some(self) -> None:
        ids = self._recovery
        if ids is None or not self.running:
            return
        for _ in range(min(RECOVER_PER_TURN, len(ids))):
            self._recover_quick(ids.pop())
        if ids:
            self._clock.callLater(0, self._recover_some)
        else:
            self._recovery = None
            self.log.info("start-up scan done: {count} messages in the queue", count=len(self._received),
                          queue_id="*", stage="recovered")

    def _recover_quick(self, queue_id: str) -> None:
        """Schedule one message by its state file alone (the message itself is read when it is due)."""
        if queue_id in self._attempts or queue_id in self._timetable:
            return                                   # enqueued or flushed meanwhile
        made = id_time(queue_id)        # when it was received, near enough until it is loaded
        self._received.setdefault(queue_id, self._now() if made is None else made)
        try:
            if self._spool.is_held(queue_id):
                self._load(queue_id)        # held (rare): loaded once, so the queue gauges know it
                return
            when = due_time(self._spool.state_of(queue_id))
        except (CorruptMessage, OSError, ValueError):
            when = 0.0                               # loaded when due: the load says what is wrong
        self._schedule(queue_id, when)

    def _recover(self, queue_id: str) -> None:
        """Schedule a message by its persisted state (due now if never tried)."""
        loaded = self._load_unheld(queue_id, "scheduled")
        if loaded is None:
            return
        message, state = loaded
        self._schedule(queue_id, self._next_due(message, state, report_retry=self._now()))

    def _load_unheld(self, queue_id: str, what: str):
        """(message, state) of a message that may be delivered, or None (gone, unreadable, or held)."""
        loaded = self._load(queue_id)
        if loaded is not None and loaded[0].held:
            self.log.info("{queue_id}: held, not {what}", queue_id=queue_id, what=what, stage="held")
            return None
        return loaded

    def _next_due(self, message, state: MessageState, report_retry: float) -> float:
        """When to look at a message again: its earliest pending recipient (never past its lifetime),
        or `report_retry` if a bounce is still to be handed to the reporter."""
        candidates = [min(r.next_attempt, self._expiry(message)) for r in state.pending]
        if state.unreported or not candidates:
            candidates.append(report_retry)
        return min(candidates)

    def _schedule(self, queue_id: str, when: float, force: bool = False) -> None:
        if not self.running:
            return
        if force and queue_id in self._attempts:
            self._attempts[queue_id].force_again = True
        self._timetable.schedule(queue_id, when, force)

    def _unschedule(self, queue_id: str) -> None:
        self._timetable.unschedule(queue_id)

    def _has_room(self) -> bool:
        """Whether another message may be taken into work: loaded, routed, waiting for a slot.  Deliveries
        held back by a [[throttle]] (a paused or rate-held destination) do not count against the limit, up
        to ACTIVE_HARD_LIMIT in all: a destination on hold never holds up the others."""
        in_work, limit = len(self._attempts), max(ACTIVE_MIN, ACTIVE_PER_SLOT * self._delivery.concurrency)
        if in_work < limit:
            return True
        if in_work >= ACTIVE_HARD_LIMIT:
            return False
        shaped = sum(len(jobs) for (_key, destination), jobs in self._waiting.items() if destination is not None)
        return in_work - shaped < limit

    def _due(self, queue_id: str, force: bool = False) -> None:
        if not self.running or queue_id in self._attempts or self._suspended_due(queue_id):
            return   # an attempt in progress reschedules the message when it ends
        loaded = self._load_unheld(queue_id, "tried")
        if loaded is None:
            return
        message, state = loaded
        attempt = self._begin(message, state)
        now = self._now()
        if now < self._expiry(message):
            due = [r for r in state.pending if force or r.next_attempt <= now + DUE_SLACK]
            for job in self._jobs_for(attempt, due):
                self._waiting.setdefault(job.line, deque()).append(job)
                self._status_dirty = self._status_dirty or job.destination is not None
                attempt.outstanding += 1
        if attempt.outstanding:
            self._pump_soon()
        else:
            self._finish(attempt)   # nothing to send now: expire, report or reschedule

    def _begin(self, message, state: MessageState) -> _Attempt:
        attempt = _Attempt(message, state)
        self._attempts[attempt.queue_id] = attempt
        return attempt

    def _jobs_for(self, attempt: _Attempt, due) -> list[_Job]:
        """Group the due recipients by route: one deliver() per next hop (and per domain, direct), and
        per recipient domain a [[throttle]] rule matches (the destination, also through a smarthost)."""
        groups: dict[tuple, list[str]] = {}
        hops: dict[tuple, tuple] = {}
        for rcpt in due:
            key, hop = self._route(attempt, rcpt.recipient, rcpt.attempts)
            destination = self._destination_of(domain_of(rcpt.recipient)) if key[0] != "error" else None
            key = (*key, destination)
            groups.setdefault(key, []).append(rcpt.recipient)
            hops[key] = hop
        return [_Job(attempt, *hops[key], tuple(recipients), destination=key[-1])
                for key, recipients in groups.items()]

    def _route(self, attempt: _Attempt, recipient: str, attempts: int) -> tuple[tuple, tuple]:
        """(group key, (hop, hop name, limit key)) for one recipient; `attempts` = failed attempts so
        far, so `after_attempts` routes take over from direct delivery (or another route)."""
        try:
            route = self._router.route(attempt.message.envelope.sender, recipient, attempts)
        except Exception:
            self.log.failure("{queue_id}: router failed for {recipient}", queue_id=attempt.queue_id,
                             recipient=recipient)
            return ("error",), (_LocalFailure("routing failed"), "router", "local")
        if route is None:
            domain = domain_of(recipient)
            return ("direct", domain), (self._direct, "direct", f"domain:{domain}")
        hop = self._transports.get(route.transport)
        if hop is None:
            hop = _LocalFailure(f"transport {route.transport!r} is not configured")
        return ("route", route), (hop, route.transport, f"transport:{route.transport}")

    # -- the queue as metrics see it --------------------------------------------------------------

    def queue_snapshot(self) -> tuple[int, float, int]:
        """(messages in the queue, age of the oldest in seconds, held messages), from memory only.

        Called by the metrics collector in a threadpool thread: it only reads, and copies the dict in
        one C-level call; a concurrent resize (RuntimeError) is simply read again."""
        copied = read_unlocked(lambda: (list(self._received.values()), len(self._held)), None)
        if copied is None:
            return 0, 0.0, 0
        received, held = copied
        oldest = self._now() - min(received) if received else 0.0
        return len(received), max(0.0, oldest), held

    def _track(self, message) -> None:
        self._received[message.queue_id] = message.envelope.received_at
        if message.held:
            self._held.add(message.queue_id)
        else:
            self._held.discard(message.queue_id)

    def _forget(self, queue_id: str) -> None:
        self._received.pop(queue_id, None)
        self._held.discard(queue_id)

    # -- small helpers ----------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock.seconds()

    def _expiry(self, message) -> float:
        return message.envelope.received_at + self._queue.lifetime

    def _queue_ids(self) -> list[str]:
        try:
            return list(self._spool.queue_ids())
        except Exception:
            self.log.failure("cannot list the spool")
            return []

    def _load(self, queue_id: str):
        """(message, MessageState), or None — logged — if it is gone or unreadable.  An unreadable state
        leaves the message in the spool untouched for the postmaster: never guessed, never lost."""
        try:
            message = self._spool.take_fresh(queue_id) or self._spool.load(queue_id)   # ISpoolControl
            self._track(message)
            return message, MessageState.from_dict(message.state, message.envelope.recipients)
        except StateError as e:
            self.log.error("{queue_id}: unreadable delivery state, left in the spool: {error}",
                           queue_id=queue_id, error=str(e), stage="error")
        except UnknownMessage:
            # Removed meanwhile, or still being received (its commit will enqueue it): nothing to do.
            self.log.debug("{queue_id}: not in the spool (yet)", queue_id=queue_id)
        except Exception:
            self.log.failure("{queue_id}: cannot load from the spool", queue_id=queue_id)
        return None
