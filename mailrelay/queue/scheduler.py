# -*- test-case-name: tests.test_scheduler, tests.test_webhook_scheduler, tests.test_logs -*-
"""The delivery scheduler: decides when each spooled message is tried, by which next hop, and what
becomes of each recipient.

Place in the journey: spool --(enqueue / start-up scan)--> **scheduler** --> next hop (smarthost
transport or direct MX) --> results --> spool state, DSN reporter.

In: queue ids (committed messages, the spool at start-up, queue CLI requests via
`spool.take_requests()` polled every 0.5 s).  Out: `INextHop.deliver(message, recipients)` calls,
one per (message, route) group — all of one message's recipients on one route in one transaction —
or, when several such groups wait for the same next hop, one `IBatchNextHop.deliver_batch(jobs)` call
carrying them all on one connection (queue.batch); per-recipient state written with
`spool.save_state` after every attempt *before* anything is done about it; `spool.remove` once every
recipient has a final answer; `IDeliveryReporter.bounce/delay`.

Rules implemented:
- RFC 5321 §4.2.1 / §4.5.4.1: 2xx delivered, 5xx failed for good, 4xx (and connection failures) retried
  after a growing, jittered interval (queue.backoff), until `[queue] lifetime`; then the remaining
  recipients expire (RFC 3463 4.4.7) and bounce.
- RFC 3464 DSNs via the reporter: a failure DSN per attempt that settled recipients for good, one delay
  DSN per message after `[queue] delay_warning` (persisted, so a restart does not send another).
- RFC 5321 §4.5.5 / §6.1: never a DSN to the null reverse-path <> (no bounce loops); dropped and logged.
- `[delivery] concurrency` connections in flight in all, `concurrency_per_domain` per recipient domain
  (per transport name for a routed group); what cannot start waits in FIFO order and starts when a
  slot frees.  Connection reuse (RFC 5321 §3.3): messages due in the same reactor turn, or waiting
  for a slot, for the same next hop share connections — one batch is one slot (queue.batch).
- Held messages are never tried; stopService stops starting work and waits (bounded) for what is in
  flight; everything needed to resume is already in the spool.
- `[[throttle]]` (queue.shaping, queue.throttle): per recipient domain a rule matches, a smooth
  message rate, a cap on connections at once, and a pause after a 421 or a 4.7.x deferral, doubling
  while it goes on; deliveries waiting for them are no failed attempts.  The state sits behind
  IThrottle (default: LocalThrottle).
- Metrics (optional `metrics`, a mailrelay.metrics.Metrics): deliveries started, per-recipient results
  and delivery latency; `queue_snapshot()` feeds the queue gauges from memory, without touching the spool,
  and `throttle_snapshot()` the throttle gauges.

The scheduler is a Service that owns small collaborators, each given what it needs in its constructor
(the spool, the clock, the config, the other collaborators it asks, callables for what it tells):
- queuestate.QueueState: what is in memory — messages seen (the queue gauges), messages in work (the
  bounded active set), deliveries waiting for a slot;
- timetable.Timetable: when each message not in work is due, admitting at most 200 per reactor turn;
- recovery.SpoolReader / StartupScan: loading a message when it is due, and the start-up scan;
- shaping.Shaper: the `[[throttle]]` gate over an IThrottle, and the throttle status;
- concurrency.Slots: the connection slots and batches;
- outcomes.Outcomes (with reports.Reports for the DSNs): recording results and settling attempts;
- control.Control: the queue CLI's requests.
This module holds the service, admitting a due message (its recipients routed to next hops and queued
as deliveries), and the wiring; attempts.py holds the objects the parts share.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Mapping, Optional

from twisted.application import service
from twisted.internet import defer, task
from zope.interface import implementer

from mailrelay.config import DeliveryConfig, QueueConfig
from mailrelay.queue.attempts import _Attempt, _Job, _LocalFailure
from mailrelay.queue.backoff import Backoff
from mailrelay.queue.concurrency import Slots
from mailrelay.queue.control import ADMIN_BOUNCE, POLL_INTERVAL, Control
from mailrelay.queue.outcomes import Outcomes
from mailrelay.queue.queuestate import ACTIVE_HARD_LIMIT, ACTIVE_MIN, ACTIVE_PER_SLOT, QueueState
from mailrelay.queue.recovery import RECOVER_PER_TURN, SpoolReader, StartupScan
from mailrelay.queue.reports import Reports
from mailrelay.queue.shaping import STATUS_FILE, Shaper
from mailrelay.queue.throttle import DestinationStatus, LocalThrottle, ThrottleRules
from mailrelay.queue.timetable import Timetable
from mailrelay.envelope import domain_of
from mailrelay.interfaces import IScheduler
from mailrelay.logger import Logger

__all__ = ["ACTIVE_HARD_LIMIT", "ACTIVE_MIN", "ACTIVE_PER_SLOT", "ADMIN_BOUNCE", "DUE_SLACK", "POLL_INTERVAL",
           "RECOVER_PER_TURN", "STATUS_FILE", "STOP_TIMEOUT", "Scheduler"]

STOP_TIMEOUT = 30.0      # stopService waits at most this long for deliveries in flight
DUE_SLACK = 1.0          # recipients due within this many seconds join the attempt being made
# The log lines' namespace, as it was before the module moved to queue/ (operators filter on it).
LOG_NAMESPACE = "mailrelay.delivery.scheduler.Scheduler"


@implementer(IScheduler)
class Scheduler(service.Service):
    """The queue runner.  `spool`: an ISpoolControl; `router`: IRouter;
    `transports`: INextHop per transport name; `direct`: the INextHop for MX delivery; `reporter`: an
    IDeliveryReporter or None (no DSNs); `clock`: IReactorTime (default: the reactor); `rng`: the
    jitter's random source; `metrics`: a mailrelay.metrics.Metrics, or None for no metrics; `suppression`:
    told of every permanent failure (spool.suppression.SuppressionRecorder), or None ([suppression] off);
    `events`: an IDeliveryEvents told of every per-recipient outcome (webhooks), or None;
    `throttles`: the [[throttle]] rules; `throttle`: their state, an IThrottle (default: a LocalThrottle);
    `status_path`: where the throttle status is written for the queue CLI (None: nowhere).

    `log` is the one logger of the scheduler and all its parts (setting it sets theirs)."""

    logs_queued = False     # IScheduler: the session writes each message's "queued" line (QueueFront)

    def __init__(self, spool, router, transports: Mapping[str, object], direct, queue: QueueConfig,
                 delivery: DeliveryConfig, reporter, clock=None, rng: Optional[random.Random] = None,
                 metrics=None, suppression=None, events=None, throttles: tuple = (), throttle=None,
                 status_path: Optional[Path] = None):
        if clock is None:
            from twisted.internet import reactor as clock
        self._spool, self._router, self._transports, self._direct = spool, router, transports, direct
        self._queue, self._delivery, self._clock = queue, delivery, clock
        self._suppression = suppression          # a spool.suppression.SuppressionRecorder, or None (off)
        self._rng = rng or random.Random()
        self._log = Logger(namespace=LOG_NAMESPACE, source=self)
        log = self._log
        backoff = Backoff(queue.first_retry, queue.max_retry, rng=self._rng)
        self._work = QueueState(delivery.concurrency)
        # When each message not in work is due; admits them as room allows (queue.timetable).
        self._timetable = Timetable(clock, self._due, self._work.has_room)
        self._reader = SpoolReader(spool, self._work, log)
        self._scan = StartupScan(clock, spool, self._reader, self._work, self._timetable, self._schedule, log)
        self._shaper = Shaper(ThrottleRules(throttles), throttle if throttle is not None else LocalThrottle(),
                              self._work, clock, self._pump, log, status_path)
        self._reports = Reports(reporter, queue, log)
        self._outcomes = Outcomes(spool, self._work, self._shaper, self._reports, clock, queue, backoff,
                                  self._schedule, self._attempt_over, log, metrics=metrics, events=events,
                                  suppression=suppression)
        self._slots = Slots(self._work, self._shaper, self._outcomes, clock, delivery.concurrency,
                            delivery.concurrency_per_domain, metrics, log)
        self._control = Control(spool, self._work, self._timetable, self._reader, self._scan, clock, log,
                                self.flush, self._recover, self._outcomes.finish)
        self._poller: Optional[task.LoopingCall] = None
        self._stop_waiters: list[defer.Deferred] = []
        if metrics is not None:
            metrics.watch_queue(self.queue_snapshot)
            metrics.watch_throttles(self.throttle_snapshot)

    @property
    def log(self) -> Logger:
        return self._log

    @log.setter
    def log(self, log: Logger) -> None:
        self._log = log
        for part in (self._reader, self._scan, self._shaper, self._reports, self._outcomes, self._slots,
                     self._control):
            part.log = log

    def reconfigure(self, router, transports: Mapping[str, object], direct, queue: QueueConfig,
                    delivery: DeliveryConfig, throttles: Optional[tuple] = None) -> None:
        """A reloaded config (SIGHUP): later attempts use the new routes, next hops, timings and limits.
        Deliveries in flight finish on the hop they started with; scheduled retries keep their times.
        New `throttles` apply at once to the state kept (a paused destination stays paused)."""
        self._router, self._transports, self._direct = router, transports, direct
        self._queue, self._delivery = queue, delivery
        self._outcomes.reconfigure(queue, Backoff(queue.first_retry, queue.max_retry, rng=self._rng))
        self._reports.reconfigure(queue)
        self._work.set_concurrency(delivery.concurrency)
        self._slots.set_limits(delivery.concurrency, delivery.concurrency_per_domain)
        if throttles is not None:
            self._shaper.set_rules(ThrottleRules(throttles))
        self._pump()

    # -- the service ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._slots.start()
        self._timetable.start()
        if self._spool.suspension() is not None:     # a drain left the spool suspended: stay so
            self._control.suspend()
        self._scan.start()
        self._poller = task.LoopingCall(self._control.poll)
        self._poller.clock = self._clock
        self._poller.start(POLL_INTERVAL, now=False)
        self._shaper.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._shaper.stop()
        self._timetable.stop()
        self._scan.stop()
        self._slots.stop()
        self._work.drop_all_waiting()
        if not self._work.attempts:
            return defer.succeed(None)
        done: defer.Deferred = defer.Deferred()
        self._stop_waiters.append(done)
        bound = self._clock.callLater(STOP_TIMEOUT, self._stopped, "timed out")

        def cancel_bound(result):
            if bound.active():
                bound.cancel()
            return result
        return done.addBoth(cancel_bound)

    def _attempt_over(self) -> None:
        """An attempt left work (Outcomes): room for another message; the last one a stop waits for?"""
        self._timetable.kick()
        if not self.running and not self._work.attempts:
            self._stopped("deliveries finished")

    def _stopped(self, why: str) -> None:
        waiters, self._stop_waiters = self._stop_waiters, []
        if waiters:
            self.log.info("scheduler stopped: {why}", why=why, queue_id="*", stage="stopped")
        for d in waiters:
            d.callback(None)

    # -- IScheduler and the queue CLI -------------------------------------------------------------

    def enqueue(self, queue_id: str) -> None:
        """A message was just committed: try it at once, subject to the concurrency limits."""
        now = self._clock.seconds()
        self._work.seen(queue_id, now)
        self._schedule(queue_id, now)

    def flush(self, queue_id: Optional[str] = None) -> None:
        """Make every message (or one) due now, whatever its next_attempt says."""
        ids = self._reader.queue_ids() if queue_id is None else [queue_id]
        now = self._clock.seconds()
        for one in ids:
            self._schedule(one, now, force=True)

    # -- the queue as metrics see it --------------------------------------------------------------

    def queue_snapshot(self) -> tuple[int, float, int]:
        """(messages in the queue, age of the oldest in seconds, held messages), from memory only; safe
        to call from the metrics collector's thread (QueueState.snapshot)."""
        return self._work.snapshot(self._clock.seconds())

    def throttle_snapshot(self) -> Optional[tuple[list[DestinationStatus], dict[str, int], float]]:
        """(the throttle's status, deliveries waiting per throttled destination, now), or None without
        [[throttle]] rules; safe to call from a scrape thread (Shaper.snapshot)."""
        return self._shaper.snapshot()

    def wake(self) -> None:
        """Look at the waiting deliveries again this reactor turn: the throttle's answer changed on its
        own (a shared IThrottle whose store just answered, mailrelay.cluster.throttle)."""
        if self.running:
            self._slots.pump_soon()

    # -- when messages are due --------------------------------------------------------------------

    def _schedule(self, queue_id: str, when: float, force: bool = False) -> None:
        if not self.running:
            return
        attempt = self._work.attempts.get(queue_id) if force else None
        if attempt is not None:
            attempt.force_again = True
        self._timetable.schedule(queue_id, when, force)

    def _recover(self, queue_id: str) -> None:
        """Schedule a message by its persisted state (due now if never tried): a released message."""
        loaded = self._reader.load_unheld(queue_id, "scheduled")
        if loaded is None:
            return
        message, state = loaded
        now = self._clock.seconds()
        self._schedule(queue_id, state.next_due(message.envelope.received_at + self._queue.lifetime,
                                                report_retry=now))

    def _due(self, queue_id: str, force: bool = False) -> None:
        """The timetable admits a message into work: its due recipients queued as deliveries, or (nothing
        to send now) the attempt settled at once — expiry, a DSN still to hand over, the next schedule."""
        if not self.running or queue_id in self._work.attempts or self._control.suspended_due(queue_id):
            return   # an attempt in progress reschedules the message when it ends
        loaded = self._reader.load_unheld(queue_id, "tried")
        if loaded is None:
            return
        message, state = loaded
        attempt = self._work.begin(message, state)
        now = self._clock.seconds()
        if now < message.envelope.received_at + self._queue.lifetime:
            due = [r for r in state.pending if force or r.next_attempt <= now + DUE_SLACK]
            for job in self._jobs_for(attempt, due):
                self._work.queue(job)
        if attempt.outstanding:
            self._slots.pump_soon()
        else:
            self._outcomes.finish(attempt)   # nothing to send now: expire, report or reschedule

    def _pump(self) -> None:
        self._slots.pump()

    # -- routing ----------------------------------------------------------------------------------

    def _jobs_for(self, attempt: _Attempt, due) -> list[_Job]:
        """Group the due recipients by route: one deliver() per next hop (and per domain, direct), and
        per recipient domain a [[throttle]] rule matches (the destination, also through a smarthost)."""
        groups: dict[tuple, list[str]] = {}
        hops: dict[tuple, tuple[object, str, str]] = {}
        for rcpt in due:
            key, way = self._route(attempt, rcpt.recipient, rcpt.attempts)
            destination = self._shaper.destination_of(domain_of(rcpt.recipient)) if key[0] != "error" else None
            key = (*key, destination)
            groups.setdefault(key, []).append(rcpt.recipient)
            hops[key] = way
        jobs = []
        for key, recipients in groups.items():
            hop, hop_name, limit_key = hops[key]
            jobs.append(_Job(attempt, hop, hop_name, limit_key, tuple(recipients), destination=key[-1]))
        return jobs

    def _route(self, attempt: _Attempt, recipient: str, attempts: int) -> tuple[tuple, tuple[object, str, str]]:
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
