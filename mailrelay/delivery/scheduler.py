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
- Metrics (optional `metrics`, a mailrelay.metrics.Metrics): deliveries started, per-recipient results
  and delivery latency; `queue_snapshot()` feeds the queue gauges from memory, without touching the spool.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, replace
from typing import Mapping, Optional

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.config import DeliveryConfig, QueueConfig
from mailrelay.delivery.backoff import Backoff
from mailrelay.delivery.batch import batch_size, take_batch
from mailrelay.delivery.client import Job
from mailrelay.delivery.results import RecipientResult
from mailrelay.delivery.state import BOUNCED, EXPIRED, LastReply, MessageState, StateError
from mailrelay.envelope import domain_of
from mailrelay.interfaces import INextHop, IScheduler
from mailrelay.metrics import UNKNOWN

POLL_INTERVAL = 0.5      # seconds between looks at the queue CLI's control requests
STOP_TIMEOUT = 30.0      # stopService waits at most this long for deliveries in flight
DUE_SLACK = 1.0          # recipients due within this many seconds join the attempt being made

# What a queue CLI "bounce" records for every pending recipient (RFC 3463 X.0.0: other/undefined).
ADMIN_BOUNCE = LastReply(554, "5.0.0", "delivery cancelled by the postmaster")


@implementer(INextHop)
@dataclass(frozen=True)
class _LocalFailure:
    """A next hop that cannot be used (router error, unknown transport): every recipient gets this
    temporary reply, so the failure goes through the same record-and-retry path as a remote 4xx."""
    text: str

    def deliver(self, message, recipients):
        # RFC 3463 4.3.5: system incorrectly configured — temporary, the operator can fix it.
        return defer.succeed([RecipientResult(r, 451, "4.3.5", self.text, "") for r in recipients])


class _Attempt:
    """One message being worked on: its deliveries waiting or in flight and the state they update."""

    def __init__(self, message, state: MessageState):
        self.message = message
        self.state = state
        self.outstanding = 0          # deliveries waiting for a slot or in flight
        self.lock = defer.DeferredLock()   # one save_state at a time, always of the newest state
        self.action: Optional[str] = None  # "delete" | "bounce", asked for while deliveries ran
        self.held = False
        self.force_again = False      # a flush came while the attempt ran
        self.save_failed = False

    @property
    def queue_id(self) -> str:
        return self.message.queue_id


@dataclass(frozen=True, eq=False)
class _Job:
    """One deliver() call: one message, one next hop, the recipients that go that way."""
    attempt: _Attempt
    hop: object                   # INextHop
    hop_name: str                 # "direct" or the transport name, for the log
    limit_key: str                # "domain:<d>" (direct) or "transport:<name>"
    recipients: tuple[str, ...]


@implementer(IScheduler)
class Scheduler(service.Service):
    """The queue runner.  `spool`: ISpool (plus hold/release/take_requests); `router`: IRouter;
    `transports`: INextHop per transport name; `direct`: the INextHop for MX delivery; `reporter`: an
    IDeliveryReporter or None (no DSNs); `clock`: IReactorTime (default: the reactor); `rng`: the
    jitter's random source; `metrics`: a mailrelay.metrics.Metrics, or None for no metrics."""

    log = Logger()

    def __init__(self, spool, router, transports: Mapping[str, object], direct, queue: QueueConfig,
                 delivery: DeliveryConfig, reporter, clock=None, rng: Optional[random.Random] = None,
                 metrics=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self._spool, self._router, self._transports, self._direct = spool, router, transports, direct
        self._queue, self._delivery, self._reporter, self._clock = queue, delivery, reporter, clock
        self._rng = rng or random.Random()
        self._backoff = Backoff(queue.first_retry, queue.max_retry, rng=self._rng)
        self._timers: dict = {}                  # queue id -> IDelayedCall of its next attempt
        self._forced: set[str] = set()           # ids whose next attempt ignores next_attempt (flush)
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
        if metrics is not None:
            metrics.watch_queue(self.queue_snapshot)

    def reconfigure(self, router, transports: Mapping[str, object], direct, queue: QueueConfig,
                    delivery: DeliveryConfig) -> None:
        """A reloaded config (SIGHUP): later attempts use the new routes, next hops, timings and limits.
        Deliveries in flight finish on the hop they started with; scheduled retries keep their times."""
        self._router, self._transports, self._direct = router, transports, direct
        self._queue, self._delivery = queue, delivery
        self._backoff = Backoff(queue.first_retry, queue.max_retry, rng=self._rng)
        self._pump()

    # -- the service ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for queue_id in self._queue_ids():
            self._recover(queue_id)
        self._poller = task.LoopingCall(self._poll_requests)
        self._poller.clock = self._clock
        self._poller.start(POLL_INTERVAL, now=False)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
        self._pump_call = None
        self._forced.clear()
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

    def _poll_requests(self) -> None:
        try:
            requests = list(self._spool.take_requests())
        except Exception:
            self.log.failure("cannot read queue control requests")
            return
        for verb, queue_id in requests:
            self.log.info("{queue_id}: control request {verb}", queue_id=queue_id or "*", verb=verb,
                          stage="control")
            handler = {"flush": self.flush, "hold": self._hold, "release": self._release,
                       "delete": lambda q: self._cancel(q, "delete"),
                       "bounce": lambda q: self._cancel(q, "bounce")}.get(verb)
            if handler is None or (queue_id is None and verb != "flush"):
                self.log.warn("{queue_id}: ignored control request {verb}", queue_id=queue_id, verb=verb)
                continue
            try:
                handler(queue_id)
            except Exception:   # one bad request must not stop the polling loop
                self.log.failure("{queue_id}: control request {verb} failed", queue_id=queue_id, verb=verb)

    def _hold(self, queue_id: str) -> None:
        self._after(self._spool.hold, queue_id)
        if queue_id in self._received:
            self._held.add(queue_id)
        self._unschedule(queue_id)
        attempt = self._attempts.get(queue_id)
        if attempt is not None:
            attempt.held = True
            self._drop_waiting(attempt)

    def _release(self, queue_id: str) -> None:
        self._held.discard(queue_id)
        attempt = self._attempts.get(queue_id)
        if attempt is not None:
            attempt.held = False
            self._after(self._spool.release, queue_id)
        else:
            self._after(self._spool.release, queue_id).addCallback(lambda _: self._recover(queue_id))

    def _cancel(self, queue_id: str, action: str) -> None:
        """delete (no DSN) or bounce (DSN to the sender): at once, or once deliveries in flight end."""
        self._unschedule(queue_id)
        attempt = self._attempts.get(queue_id)
        if attempt is not None:
            attempt.action = action
            self._drop_waiting(attempt)
            return
        loaded = self._load(queue_id)
        if loaded is not None:
            attempt = self._begin(*loaded)
            attempt.action = action
            self._finish(attempt)

    # -- when messages are due --------------------------------------------------------------------

    def _recover(self, queue_id: str) -> None:
        """Schedule a message by its persisted state (due now if never tried)."""
        loaded = self._load(queue_id)
        if loaded is None:
            return
        message, state = loaded
        if message.held:
            self.log.info("{queue_id}: held, not scheduled", queue_id=queue_id, stage="held")
            return
        self._schedule(queue_id, self._next_due(message, state, report_retry=self._now()))

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
        self._unschedule(queue_id)
        if force:
            self._forced.add(queue_id)
            if queue_id in self._attempts:
                self._attempts[queue_id].force_again = True
        self._timers[queue_id] = self._clock.callLater(max(0.0, when - self._now()), self._due, queue_id)

    def _unschedule(self, queue_id: str) -> None:
        timer = self._timers.pop(queue_id, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _due(self, queue_id: str) -> None:
        self._timers.pop(queue_id, None)
        force = queue_id in self._forced
        self._forced.discard(queue_id)
        if not self.running or queue_id in self._attempts:
            return   # an attempt in progress reschedules the message when it ends
        loaded = self._load(queue_id)
        if loaded is None:
            return
        message, state = loaded
        if message.held:
            self.log.info("{queue_id}: held, not tried", queue_id=queue_id, stage="held")
            return
        attempt = self._begin(message, state)
        now = self._now()
        if now < self._expiry(message):
            due = [r for r in state.pending if force or r.next_attempt <= now + DUE_SLACK]
            for job in self._jobs_for(attempt, due):
                self._waiting.setdefault(job.limit_key, deque()).append(job)
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
        """Group the due recipients by route: one deliver() per next hop (and per domain, direct)."""
        groups: dict[tuple, list[str]] = {}
        hops: dict[tuple, tuple] = {}
        for rcpt in due:
            key, hop = self._route(attempt, rcpt.recipient, rcpt.attempts)
            groups.setdefault(key, []).append(rcpt.recipient)
            hops[key] = hop
        return [_Job(attempt, *hops[key], tuple(recipients)) for key, recipients in groups.items()]

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

    # -- concurrency ------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start every waiting delivery the limits allow: FIFO within a domain (or transport), domains
        in the order they started waiting, and a full domain does not hold up the others.  Re-entrant
        calls (a next hop answering synchronously) are folded into the running loop."""
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again:
                self._pump_again = False
                self._start_what_fits()
        finally:
            self._pumping = False

    def _pump_soon(self) -> None:
        """Pump once every message due in this reactor turn has queued its deliveries, so that those
        bound for the same next hop can share a connection instead of the first going alone."""
        if self._pump_call is None or not self._pump_call.active():
            self._pump_call = self._clock.callLater(0, self._pump_now)

    def _pump_now(self) -> None:
        self._pump_call = None
        self._pump()

    def _start_what_fits(self) -> None:
        total, per_key = max(1, self._delivery.concurrency), max(1, self._delivery.concurrency_per_domain)
        for key in list(self._waiting):
            jobs = self._waiting.get(key)
            while jobs and self.running and self._in_flight < total and self._per_key.get(key, 0) < per_key:
                free = min(total - self._in_flight, per_key - self._per_key.get(key, 0))
                self._start(take_batch(jobs, batch_size(len(jobs), free), lambda job: job.hop))
            if not jobs:
                self._waiting.pop(key, None)
            if self._in_flight >= total:
                return

    def _start(self, batch: list[_Job]) -> None:
        """One connection slot for `batch` (deliveries for one next hop): deliver() for a single one,
        deliver_batch() for several; each delivery's results are then recorded on their own."""
        first = batch[0]
        self._in_flight += 1
        self._per_key[first.limit_key] = self._per_key.get(first.limit_key, 0) + 1
        for job in batch:
            self.log.info("{queue_id}: attempt via {hop} for {recipients}", queue_id=job.attempt.queue_id,
                          hop=job.hop_name, recipients=list(job.recipients), batch=len(batch), stage="attempt")
            if self._metrics is not None:
                self._metrics.delivery_started(job.hop_name)
        if len(batch) == 1:
            d = defer.maybeDeferred(first.hop.deliver, first.attempt.message, list(first.recipients))
            d.addCallback(lambda results: [results])
        else:
            d = defer.maybeDeferred(first.hop.deliver_batch,
                                    [Job(job.attempt.message, job.recipients) for job in batch])
        d.addErrback(self._hop_failed, batch)
        d.addBoth(self._release_slot, first.limit_key)
        d.addCallback(self._record_batch, batch)

    def _release_slot(self, result, limit_key: str):
        self._in_flight -= 1
        self._per_key[limit_key] -= 1
        if not self._per_key[limit_key]:
            del self._per_key[limit_key]
        self._pump()
        return result

    def _record_batch(self, results, batch: list[_Job]) -> None:
        """Each delivery of a batch is recorded, saved and acted on exactly as a lone one would be;
        one that the next hop gave no results for is retried (see _record)."""
        results = list(results or ())
        for index, job in enumerate(batch):
            job_results = results[index] if index < len(results) else None
            d = defer.maybeDeferred(self._record, job_results, job)
            d.addErrback(self._record_failed, job)

    def _drop_waiting(self, attempt: _Attempt, finish: bool = True) -> None:
        """Forget the deliveries of `attempt` that have not started (hold, delete, bounce, stop)."""
        dropped = 0
        for key, jobs in list(self._waiting.items()):
            kept = deque(job for job in jobs if job.attempt is not attempt)
            dropped += len(jobs) - len(kept)
            if kept:
                self._waiting[key] = kept
            else:
                del self._waiting[key]
        attempt.outstanding -= dropped
        if finish and dropped and not attempt.outstanding:
            self._finish(attempt)

    # -- outcomes ---------------------------------------------------------------------------------

    def _hop_failed(self, failure, batch: list[_Job]) -> list[list[RecipientResult]]:
        # INextHop promises never to fail; if one does anyway, the message must not be lost: every
        # recipient is retried (RFC 3463 4.4.0: other network/routing problem).
        self.log.failure("{queue_id}: next hop {hop} failed", failure,
                         queue_id=",".join(job.attempt.queue_id for job in batch), hop=batch[0].hop_name)
        return [[RecipientResult(r, 451, "4.4.0", "local error in the next hop", "") for r in job.recipients]
                for job in batch]

    def _record(self, results, job: _Job) -> defer.Deferred:
        """Apply one delivery's results to the message state and persist it, then count it done."""
        attempt, now = job.attempt, self._now()
        by_recipient = {r.recipient: r for r in results or () if r.recipient in job.recipients}
        delays: dict[int, float] = {}   # one draw per attempt count: a group is retried together
        for recipient in job.recipients:
            result = by_recipient.get(recipient) or RecipientResult(
                recipient, 451, "4.4.0", "the next hop gave no result for this recipient", "")
            before = attempt.state.get(recipient)
            failures = before.attempts + 1
            if failures not in delays:
                delays[failures] = self._backoff.next_delay(failures)
            retry_at = min(now + delays[failures], self._expiry(attempt.message))
            after = before.recorded(result, now, retry_at)
            attempt.state = attempt.state.with_recipient(after)
            self._log_outcome(attempt, job, after, result)
        if attempt.outstanding == 1 and attempt.state.finished and not attempt.action:
            # The last delivery settled every recipient for good: the removal that follows at once is
            # the record. A save in between would only narrow nothing (a crash before it, or before the
            # removal, sends the message again either way — docs/crash-safety.md) and costs an fsync.
            d = defer.succeed(None)
        else:
            d = self._persist(attempt)
        d.addBoth(self._job_done, attempt)
        return d

    def _record_failed(self, failure, job: _Job) -> None:
        self.log.failure("{queue_id}: recording results failed", failure, queue_id=job.attempt.queue_id)
        job.attempt.save_failed = True
        self._job_done(None, job.attempt)

    def _log_outcome(self, attempt: _Attempt, job: _Job, rcpt, result: RecipientResult) -> None:
        stage = {None: "deferred", BOUNCED: "bounced"}.get(rcpt.done, rcpt.done)
        delay = self._now() - attempt.message.envelope.received_at
        self.log.info("{queue_id}: {stage} {recipient} via {hop} ({remote}): {code} {status} {text}",
                      queue_id=attempt.queue_id, stage=stage, recipient=rcpt.recipient, hop=job.hop_name,
                      remote=result.remote_host or "-", code=result.code, status=result.status,
                      text=result.text, attempts=rcpt.attempts, next_attempt=rcpt.next_attempt,
                      delay=round(delay, 3))
        if self._metrics is not None:
            # RecipientResult carries no TLS fact (yet): `tls` is read if a next hop adds one.
            self._metrics.delivery_result(job.hop_name, stage, getattr(result, "tls", UNKNOWN), delay)

    def _job_done(self, result, attempt: _Attempt):
        if isinstance(result, Failure):
            self.log.failure("{queue_id}: cannot save delivery state", result, queue_id=attempt.queue_id)
            attempt.save_failed = True
        attempt.outstanding -= 1
        if not attempt.outstanding:
            self._finish(attempt)

    def _persist(self, attempt: _Attempt) -> defer.Deferred:
        """Write the newest state; saves of one message never overlap or land out of order."""
        return attempt.lock.run(
            lambda: defer.maybeDeferred(self._spool.save_state, attempt.queue_id, attempt.state.to_dict()))

    def _finish(self, attempt: _Attempt) -> None:
        d = self._settle(attempt)
        d.addErrback(self._settle_failed, attempt)
        d.addBoth(lambda _: self._attempt_over(attempt))

    @defer.inlineCallbacks
    def _settle(self, attempt: _Attempt):
        """Everything after the deliveries of an attempt: control actions, expiry, DSNs, removal or
        the next schedule.  Each change of state is saved before it is acted on."""
        if attempt.save_failed:
            raise RuntimeError("delivery state not saved; the message is retried from its saved state")
        if attempt.action == "delete":
            yield defer.maybeDeferred(self._spool.remove, attempt.queue_id)
            self._forget(attempt.queue_id)
            self.log.info("{queue_id}: deleted without DSN", queue_id=attempt.queue_id, stage="deleted")
            return
        if self._close_pending(attempt):
            yield self._persist(attempt)
        if attempt.state.unreported:
            yield self._report_bounces(attempt)
        if self._delay_warning_due(attempt):
            attempt.state = replace(attempt.state, delay_warned=True)
            yield self._persist(attempt)   # saved first: a restart never sends a second warning
            yield self._report_delay(attempt)
        if attempt.state.finished:
            yield defer.maybeDeferred(self._spool.remove, attempt.queue_id)
            self._forget(attempt.queue_id)
            self.log.info("{queue_id}: removed from the spool", queue_id=attempt.queue_id, stage="removed")
        elif not attempt.held:
            self._attempts.pop(attempt.queue_id, None)
            when = self._next_due(attempt.message, attempt.state,
                                  report_retry=self._now() + self._backoff.next_delay(1))
            self._schedule(attempt.queue_id, self._now() if attempt.force_again else when,
                           force=attempt.force_again)

    def _close_pending(self, attempt: _Attempt) -> bool:
        """Give the pending recipients a final answer if the postmaster bounced the message or it
        outlived [queue] lifetime; True if anything changed."""
        pending = attempt.state.pending
        if attempt.action == "bounce":
            closed = [replace(r, done=BOUNCED, reported=False, last_reply=ADMIN_BOUNCE) for r in pending]
        elif self._now() >= self._expiry(attempt.message):
            closed = [replace(r, done=EXPIRED, reported=False) for r in pending]
        else:
            return False
        for rcpt in closed:
            attempt.state = attempt.state.with_recipient(rcpt)
            self.log.info("{queue_id}: {stage} {recipient} after {attempts} attempts", queue_id=attempt.queue_id,
                          stage=rcpt.done, recipient=rcpt.recipient, attempts=rcpt.attempts)
        return bool(closed)

    @defer.inlineCallbacks
    def _report_bounces(self, attempt: _Attempt):
        unreported = attempt.state.unreported
        recipients = [r.recipient for r in unreported]
        why_not = self._no_dsn_reason(attempt.message)
        if why_not:
            self.log.info("{queue_id}: no DSN for {recipients}: {reason}", queue_id=attempt.queue_id,
                          recipients=recipients, reason=why_not, stage="dsn-dropped")
        else:
            try:
                yield defer.maybeDeferred(self._reporter.bounce, attempt.message,
                                          [r.as_result() for r in unreported])
            except Exception:
                # Left unreported in the saved state: asked again later, and the message stays.
                self.log.failure("{queue_id}: bounce report failed", queue_id=attempt.queue_id)
                return
            self.log.info("{queue_id}: bounce reported for {recipients}", queue_id=attempt.queue_id,
                          recipients=recipients, stage="dsn")
        for rcpt in unreported:
            attempt.state = attempt.state.with_recipient(replace(rcpt, reported=True))
        yield self._persist(attempt)

    def _delay_warning_due(self, attempt: _Attempt) -> bool:
        state, warning = attempt.state, self._queue.delay_warning
        if warning <= 0 or state.delay_warned or not state.pending or attempt.action:
            return False
        if self._now() - attempt.message.envelope.received_at < warning:
            return False
        why_not = self._no_dsn_reason(attempt.message)
        if why_not:
            self.log.info("{queue_id}: no delay DSN: {reason}", queue_id=attempt.queue_id, reason=why_not,
                          stage="dsn-dropped")
            return False
        return True

    @defer.inlineCallbacks
    def _report_delay(self, attempt: _Attempt):
        pending = [r.as_result() for r in attempt.state.pending]
        try:
            yield defer.maybeDeferred(self._reporter.delay, attempt.message, pending)
        except Exception:
            # Not retried: a delay warning is advisory, and one too few beats one too many.
            self.log.failure("{queue_id}: delay report failed", queue_id=attempt.queue_id)
            return
        self.log.info("{queue_id}: delay reported for {recipients}", queue_id=attempt.queue_id,
                      recipients=[r.recipient for r in pending], stage="delayed")

    def _no_dsn_reason(self, message) -> Optional[str]:
        if message.envelope.sender == "":
            # RFC 5321 §4.5.5, RFC 3464 §2: never a DSN to the null reverse-path (bounce loops).
            return "null reverse-path"
        if self._reporter is None or not self._queue.bounces:
            return "bounces are disabled"
        return None

    def _settle_failed(self, failure, attempt: _Attempt) -> None:
        self.log.failure("{queue_id}: could not settle the attempt", failure, queue_id=attempt.queue_id)
        self._attempts.pop(attempt.queue_id, None)
        if not attempt.held and attempt.action != "delete":
            self._schedule(attempt.queue_id, self._now() + self._backoff.next_delay(1))

    def _attempt_over(self, attempt: _Attempt) -> None:
        if self._attempts.get(attempt.queue_id) is attempt:
            del self._attempts[attempt.queue_id]
        if not self.running and not self._attempts:
            self._stopped("deliveries finished")

    def _stopped(self, why: str) -> None:
        waiters, self._stop_waiters = self._stop_waiters, []
        if waiters:
            self.log.info("scheduler stopped: {why}", why=why, queue_id="*", stage="stopped")
        for d in waiters:
            d.callback(None)

    # -- the queue as metrics see it --------------------------------------------------------------

    def queue_snapshot(self) -> tuple[int, float, int]:
        """(messages in the queue, age of the oldest in seconds, held messages), from memory only.

        Called by the metrics collector in a threadpool thread: it only reads, and copies the dict in
        one C-level call; a concurrent resize (RuntimeError) is simply read again."""
        for _ in range(3):
            try:
                received, held = list(self._received.values()), len(self._held)
                break
            except RuntimeError:
                continue
        else:
            return 0, 0.0, 0
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
            take_fresh = getattr(self._spool, "take_fresh", None)     # optional: spools that remember
            message = (take_fresh(queue_id) if take_fresh else None) or self._spool.load(queue_id)
            self._track(message)
            return message, MessageState.from_dict(message.state, message.envelope.recipients)
        except StateError as e:
            self.log.error("{queue_id}: unreadable delivery state, left in the spool: {error}",
                           queue_id=queue_id, error=str(e), stage="error")
        except Exception:
            self.log.failure("{queue_id}: cannot load from the spool", queue_id=queue_id)
        return None

    def _after(self, operation, queue_id: str) -> defer.Deferred:
        d = defer.maybeDeferred(operation, queue_id)
        d.addErrback(lambda f: self.log.failure("{queue_id}: spool operation failed", f, queue_id=queue_id))
        return d
