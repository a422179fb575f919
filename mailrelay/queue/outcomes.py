# -*- test-case-name: tests.test_scheduler, tests.test_webhook_scheduler, tests.test_logs -*-
"""Outcomes of the delivery scheduler: results recorded, then each attempt settled.

Part of the delivery stage (queue.scheduler).  In: per-recipient results (IRecipientResult) of one
delivery (or a next hop's failure).  Out: the message's state updated and saved with
`spool.save_state` *before* anything is done about it; then control actions, expiry, DSNs
(queue.reports), `spool.remove` once every recipient has a final answer, or the next schedule.

Rules: RFC 5321 §4.2.1 / §4.5.4.1 (2xx delivered, 5xx failed for good, 4xx and connection failures
retried after a growing, jittered interval until `[queue] lifetime`, then expired: RFC 3463 4.4.7);
the DSNs of RFC 3464 / RFC 3461 as queue.reports decides them.

`Outcomes` is one collaborator of `Scheduler` (scheduler.py), given what it acts on: the spool, the
QueueState (the attempts in work, the messages seen), the Shaper (a "slow down" reply pauses its
destination), the Reports, the backoff, and two callables — `schedule(queue_id, when, force)` for the
next look at a message, `over()` once an attempt has left work.  `events` (an IDeliveryEvents, or
None) hears of every per-recipient outcome — the record waits for the event to be durable in its outbox
(side by side with the state's own fsync), never for a webhook receiver; `suppression` hears of every
recipient that failed for good (spool.suppression decides whether that suppresses it).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

from twisted.internet import defer
from twisted.python.failure import Failure

from mailrelay.config import QueueConfig
from mailrelay.queue.attempts import _Attempt, _Job
from mailrelay.queue.backoff import Backoff
from mailrelay.queue.control import ADMIN_BOUNCE
from mailrelay.queue.queuestate import QueueState
from mailrelay.queue.reports import Reports
from mailrelay.queue.results import RecipientResult
from mailrelay.queue.shaping import Shaper
from mailrelay.queue.state import BOUNCED, DELIVERED, EXPIRED, RecipientState
from mailrelay.queue.throttle import slows_down
from mailrelay.queue.results import describe_tls
from mailrelay.interfaces import Reply
from mailrelay.logger import Logger
from mailrelay.metrics import UNKNOWN


class Outcomes:
    """Recording delivery results and settling attempts, for Scheduler."""

    def __init__(self, spool, work: QueueState, shaper: Shaper, reports: Reports, clock, queue: QueueConfig,
                 backoff: Backoff, schedule: Callable[[str, float, bool], None], over: Callable[[], None],
                 log: Logger, metrics=None, events=None, suppression=None):
        self._spool, self._work, self._shaper, self._reports = spool, work, shaper, reports
        self._clock, self._queue, self._backoff = clock, queue, backoff
        self._schedule, self._over, self.log = schedule, over, log
        self._metrics, self._events, self._suppression = metrics, events, suppression

    def reconfigure(self, queue: QueueConfig, backoff: Backoff) -> None:
        """A reload's `[queue]` timings: they apply from the next result recorded."""
        self._queue, self._backoff = queue, backoff

    def _expiry(self, message) -> float:
        return message.envelope.received_at + self._queue.lifetime

    # -- recording one delivery's results ------------------------------------------------------------

    def record(self, results, job: _Job) -> defer.Deferred:
        """Apply one delivery's results to the message state and persist it, then count it done.  The
        Deferred fires once that record is durable (the save, or — for the last delivery of a finished
        message — the settling that removes it); a batch's next message waits for it."""
        attempt, now = job.attempt, self._clock.seconds()
        by_recipient = {r.recipient: r for r in results or () if r.recipient in job.recipients}
        # [[throttle]]: a "slow down" reply pauses the destination; whoever got it is retried when the
        # pause ends, not after the backoff (queue.shaping).
        paused_until = self._shaper.outcome(job, list(by_recipient.values()), now)
        delays: dict[int, float] = {}   # one draw per attempt count: a group is retried together
        emitted: list[Optional[defer.Deferred]] = []
        for recipient in job.recipients:
            result = by_recipient.get(recipient) or RecipientResult(
                recipient, 451, "4.4.0", "the next hop gave no result for this recipient", "")
            before = attempt.state.get(recipient)
            failures = before.attempts + 1
            if failures not in delays:
                delays[failures] = self._backoff.next_delay(failures)
            retry_at = min(now + delays[failures], self._expiry(attempt.message))
            if paused_until is not None and slows_down(result):
                retry_at = min(paused_until, self._expiry(attempt.message))
            after = before.recorded(result, now, retry_at)
            if after.done == DELIVERED and self._reports.success_due(attempt.message, result):
                after = replace(after, dsn="delivered" if result.final else "relayed")
            attempt.state = attempt.state.with_recipient(after)
            self._log_outcome(attempt, job, after, result)
            if self._events is not None:
                kind = {DELIVERED: "delivered", BOUNCED: "bounced"}.get(after.done or "", "deferred")
                emitted.append(self._emit(kind, attempt, after, result, result.remote_host or job.hop_name,
                                          job.hop_name))
            if after.done == BOUNCED and self._suppression is not None:
                # IRecipientResult.sender_refused: a refused MAIL FROM never suppresses the recipient.
                self._suppression.note(recipient, result.code, result.status, result.text, result.remote_host,
                                       attempt.queue_id, result.sender_refused)
        if attempt.outstanding == 1 and attempt.state.finished and not attempt.action:
            # The last delivery settled every recipient for good: the removal that follows at once is
            # the record. A save in between would only narrow nothing (a crash before it, or before the
            # removal, sends the message again either way — docs/crash-safety.md) and costs an fsync.
            # Whoever waits on this record (a batch's next message) waits for that removal.
            return _all(emitted).addBoth(self._job_done, attempt, wait=True)
        d = _all([self._persist(attempt), *emitted])
        d.addBoth(self._job_done, attempt)
        return d

    def record_failed(self, failure: Failure, job: _Job) -> None:
        """`record` itself failed: the message is retried from its saved state."""
        self.log.failure("{queue_id}: recording results failed", failure, queue_id=job.attempt.queue_id)
        job.attempt.save_failed = True
        self._job_done(None, job.attempt)

    def _emit(self, kind: str, attempt: _Attempt, rcpt: RecipientState, result: RecipientResult,
              next_hop: str, transport: str) -> defer.Deferred:
        """Tell the IDeliveryEvents of one outcome; a Deferred that never fails."""
        try:
            d = self._events.emit(kind, attempt.queue_id, attempt.message.envelope.sender, rcpt.recipient,
                                  Reply(result.code, result.status, result.text), rcpt.attempts, next_hop,
                                  transport)
        except Exception:
            self.log.failure("{queue_id}: delivery event not recorded", queue_id=attempt.queue_id)
            return defer.succeed(None)
        return d.addErrback(lambda f: self.log.failure("{queue_id}: delivery event not recorded", f,
                                                       queue_id=attempt.queue_id))

    def _log_outcome(self, attempt: _Attempt, job: _Job, rcpt: RecipientState, result: RecipientResult) -> None:
        stage = {None: "deferred", BOUNCED: "bounced"}.get(rcpt.done, rcpt.done)
        delay = self._clock.seconds() - attempt.message.envelope.received_at
        tls, verified = result.tls, result.tls_verified      # declared on IRecipientResult
        self.log.info("{queue_id}: {stage} {recipient} via {hop} ({remote}): {code} {status} {text}",
                      queue_id=attempt.queue_id, stage=stage, recipient=rcpt.recipient, hop=job.hop_name,
                      remote=result.remote_host or "-", code=result.code, status=result.status,
                      text=result.text, attempts=rcpt.attempts, next_attempt=rcpt.next_attempt,
                      delay=round(delay, 3), tls=describe_tls(tls, verified))
        if self._metrics is not None:
            # The session's TLS (outbound.tlsinfo); "unknown" when none said (DNS failure, no connection).
            self._metrics.delivery_result(job.hop_name, stage, UNKNOWN if tls is None else tls, delay,
                                          verified=verified)

    def _job_done(self, result, attempt: _Attempt, wait: bool = False) -> Optional[defer.Deferred]:
        """Count one delivery recorded; after the last, settle the attempt.  With `wait`, returns the
        settling's Deferred (never failing), so a caller sees the removal done, not just begun."""
        if isinstance(result, Failure):
            self.log.failure("{queue_id}: cannot save delivery state", result, queue_id=attempt.queue_id)
            attempt.save_failed = True
        attempt.outstanding -= 1
        if not attempt.outstanding:
            settled = self.finish(attempt)
            return settled if wait else None
        return None

    def _persist(self, attempt: _Attempt) -> defer.Deferred:
        """Write the newest state; saves of one message never overlap or land out of order."""
        return attempt.lock.run(
            lambda: defer.maybeDeferred(self._spool.save_state, attempt.queue_id, attempt.state.to_dict()))

    # -- settling an attempt ----------------------------------------------------------------------------

    def finish(self, attempt: _Attempt) -> defer.Deferred:
        """Settle `attempt` (nothing of it waiting or in flight any more); fires, never failing, once done."""
        d = self._settle(attempt)
        d.addErrback(self._settle_failed, attempt)
        d.addBoth(lambda _: self._attempt_over(attempt))
        return d

    @defer.inlineCallbacks
    def _settle(self, attempt: _Attempt):
        """Everything after the deliveries of an attempt: control actions, expiry, DSNs, removal or
        the next schedule.  Each change of state is saved before it is acted on."""
        if attempt.save_failed:
            raise RuntimeError("delivery state not saved; the message is retried from its saved state")
        if attempt.action == "delete":
            yield defer.maybeDeferred(self._spool.remove, attempt.queue_id)
            self._work.forget(attempt.queue_id)
            self.log.info("{queue_id}: deleted without DSN", queue_id=attempt.queue_id, stage="deleted")
            return
        closed = self._close_pending(attempt)
        if closed:
            yield _all([self._persist(attempt), *closed])
        if attempt.state.unreported:
            if (yield self._reports.report_settled(attempt)):
                yield self._persist(attempt)
        if self._reports.delay_warning_due(attempt, self._clock.seconds()):
            attempt.state = replace(attempt.state, delay_warned=True)
            yield self._persist(attempt)   # saved first: a restart never sends a second warning
            yield self._reports.report_delay(attempt)
        if attempt.state.finished:
            yield defer.maybeDeferred(self._spool.remove, attempt.queue_id)
            self._work.forget(attempt.queue_id)
            self.log.info("{queue_id}: removed from the spool", queue_id=attempt.queue_id, stage="removed")
        elif not attempt.held:
            self._work.attempts.pop(attempt.queue_id, None)
            now = self._clock.seconds()
            when = attempt.state.next_due(self._expiry(attempt.message),
                                          report_retry=now + self._backoff.next_delay(1))
            self._schedule(attempt.queue_id, now if attempt.force_again else when, attempt.force_again)

    def _close_pending(self, attempt: _Attempt) -> list[Optional[defer.Deferred]]:
        """Give the pending recipients a final answer if the postmaster bounced the message or it
        outlived [queue] lifetime; [] if nothing changed, else the Deferreds of their events (or
        Nones, without events)."""
        pending = attempt.state.pending
        if attempt.action == "bounce":
            closed = [replace(r, done=BOUNCED, reported=False, last_reply=ADMIN_BOUNCE) for r in pending]
        elif self._clock.seconds() >= self._expiry(attempt.message):
            closed = [replace(r, done=EXPIRED, reported=False) for r in pending]
        else:
            return []
        emitted: list[Optional[defer.Deferred]] = []
        for rcpt in closed:
            attempt.state = attempt.state.with_recipient(rcpt)
            self.log.info("{queue_id}: {stage} {recipient} after {attempts} attempts", queue_id=attempt.queue_id,
                          stage=rcpt.done, recipient=rcpt.recipient, attempts=rcpt.attempts)
            result = rcpt.as_result()       # expired: RFC 3463 4.4.7 with the last reply in its text
            emitted.append(None if self._events is None else
                           self._emit(rcpt.done or "", attempt, rcpt, result, result.remote_host or "", ""))
        return emitted

    def _settle_failed(self, failure: Failure, attempt: _Attempt) -> None:
        self.log.failure("{queue_id}: could not settle the attempt", failure, queue_id=attempt.queue_id)
        self._work.attempts.pop(attempt.queue_id, None)
        if not attempt.held and attempt.action != "delete":
            self._schedule(attempt.queue_id, self._clock.seconds() + self._backoff.next_delay(1), False)

    def _attempt_over(self, attempt: _Attempt) -> None:
        self._work.end(attempt)
        self._over()            # room for another message in work; perhaps the last one a stop waits for


def _all(deferreds: list[Optional[defer.Deferred]]) -> defer.Deferred:
    """Fires when every one of `deferreds` (Deferreds or Nones) has; fails with the first failure."""
    waiting = [d for d in deferreds if d is not None]
    if not waiting:
        return defer.succeed(None)
    if len(waiting) == 1:
        return waiting[0]
    return defer.gatherResults(waiting, consumeErrors=True).addErrback(_first_failure)


def _first_failure(failure: Failure) -> Failure:
    """gatherResults' FirstError, unwrapped to the failure inside it."""
    error = failure.trap(defer.FirstError) and failure.value
    assert isinstance(error, defer.FirstError)       # trap re-raised anything else
    return error.subFailure
