# -*- test-case-name: tests.test_webhook_scheduler, tests.test_scheduler, tests.test_logs -*-
"""Outcomes of the delivery scheduler: results recorded, then each attempt settled.

Part of the delivery stage (delivery.scheduler).  In: per-recipient RecipientResults of one
delivery (or a next hop's failure).  Out: the message's state updated and saved with
`spool.save_state` *before* anything is done about it; then control actions, expiry, DSNs through the
IDeliveryReporter, `spool.remove` once every recipient has a final answer, or the next schedule.

Rules: RFC 5321 §4.2.1 / §4.5.4.1 (2xx delivered, 5xx failed for good, 4xx and connection failures
retried after a growing, jittered interval until `[queue] lifetime`, then expired: RFC 3463 4.4.7);
RFC 3464 DSNs (a failure DSN per attempt that settled recipients for good, one persisted delay DSN
after `[queue] delay_warning`, a "relayed" DSN for NOTIFY=SUCCESS delivered to a hop without DSN),
each only for the recipients whose RFC 3461 NOTIFY asks for it (none: FAILURE,DELAY); RFC 5321 §4.5.5
/ §6.1 (never a DSN to the null reverse-path).

`OutcomesMixin` is one part of `Scheduler` (scheduler.py); it uses the scheduler's `_spool`,
`_reporter`, `_queue`, `_backoff`, `_attempts`, `_stop_waiters`, `_metrics`, `running`, `log` and
its `_now`, `_expiry`, `_next_due`, `_schedule`, `_forget` and `_shaping_outcome`; `_events` (an
IDeliveryEvents, or None) hears of every per-recipient outcome — the record waits for the event to be
durable in its outbox (side by side with the state's own fsync), never for a webhook receiver;
`_suppression` hears of every recipient that failed for good (spool.suppression decides whether that
suppresses it).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from twisted.internet import defer
from twisted.python.failure import Failure

from mailrelay.delivery.attempts import _Attempt, _Job
from mailrelay.delivery.control import ADMIN_BOUNCE
from mailrelay.delivery.results import RecipientResult
from mailrelay import dsnparams
from mailrelay.delivery.state import BOUNCED, DELIVERED, EXPIRED, SUCCESS_ACTIONS
from mailrelay.delivery.throttle import slows_down
from mailrelay.delivery.tlsinfo import describe
from mailrelay.interfaces import Reply
from mailrelay.metrics import UNKNOWN


class OutcomesMixin:
    """Recording delivery results and settling attempts, for Scheduler."""

    def _hop_failed(self, failure, batch: list[_Job]) -> list[list[RecipientResult]]:
        # INextHop promises never to fail; if one does anyway, the message must not be lost: every
        # recipient is retried (RFC 3463 4.4.0: other network/routing problem).
        self.log.failure("{queue_id}: next hop {hop} failed", failure,
                         queue_id=",".join(job.attempt.queue_id for job in batch), hop=batch[0].hop_name)
        return [[RecipientResult(r, 451, "4.4.0", "local error in the next hop", "") for r in job.recipients]
                for job in batch]

    def _record(self, results, job: _Job) -> defer.Deferred:
        """Apply one delivery's results to the message state and persist it, then count it done.  The
        Deferred fires once that record is durable (the save, or — for the last delivery of a finished
        message — the settling that removes it); a batch's next message waits for it."""
        attempt, now = job.attempt, self._now()
        by_recipient = {r.recipient: r for r in results or () if r.recipient in job.recipients}
        # [[throttle]]: a "slow down" reply pauses the destination; whoever got it is retried when the
        # pause ends, not after the backoff (delivery.shaping).
        paused_until = self._shaping_outcome(job, list(by_recipient.values()), now)
        delays: dict[int, float] = {}   # one draw per attempt count: a group is retried together
        emitted: list[defer.Deferred] = []
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
            if after.done == DELIVERED and self._success_dsn_due(attempt.message, result):
                after = replace(after, dsn="delivered" if result.final else "relayed")
            attempt.state = attempt.state.with_recipient(after)
            self._log_outcome(attempt, job, after, result)
            if self._events is not None:
                kind = {DELIVERED: "delivered", BOUNCED: "bounced"}.get(after.done, "deferred")
                emitted.append(self._emit(kind, attempt, after, result, result.remote_host or job.hop_name,
                                          job.hop_name))
            if after.done == BOUNCED and self._suppression is not None:
                self._suppression.note(recipient, result.code, result.status, result.text, result.remote_host,
                                       attempt.queue_id, getattr(result, "sender_refused", False))
        if attempt.outstanding == 1 and attempt.state.finished and not attempt.action:
            # The last delivery settled every recipient for good: the removal that follows at once is
            # the record. A save in between would only narrow nothing (a crash before it, or before the
            # removal, sends the message again either way — docs/crash-safety.md) and costs an fsync.
            # Whoever waits on this record (a batch's next message) waits for that removal.
            return _all(emitted).addBoth(self._job_done, attempt, wait=True)
        d = _all([self._persist(attempt), *emitted])
        d.addBoth(self._job_done, attempt)
        return d

    def _emit(self, kind: str, attempt: _Attempt, rcpt, result: RecipientResult, next_hop: str,
              transport: str) -> defer.Deferred:
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

    def _record_failed(self, failure, job: _Job) -> None:
        self.log.failure("{queue_id}: recording results failed", failure, queue_id=job.attempt.queue_id)
        job.attempt.save_failed = True
        self._job_done(None, job.attempt)

    def _log_outcome(self, attempt: _Attempt, job: _Job, rcpt, result: RecipientResult) -> None:
        stage = {None: "deferred", BOUNCED: "bounced"}.get(rcpt.done, rcpt.done)
        delay = self._now() - attempt.message.envelope.received_at
        tls, verified = getattr(result, "tls", None), getattr(result, "tls_verified", False)
        self.log.info("{queue_id}: {stage} {recipient} via {hop} ({remote}): {code} {status} {text}",
                      queue_id=attempt.queue_id, stage=stage, recipient=rcpt.recipient, hop=job.hop_name,
                      remote=result.remote_host or "-", code=result.code, status=result.status,
                      text=result.text, attempts=rcpt.attempts, next_attempt=rcpt.next_attempt,
                      delay=round(delay, 3), tls=describe(tls, verified))
        if self._metrics is not None:
            # The session's TLS (delivery.tlsinfo); "unknown" when none said (DNS failure, no connection).
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
            settled = self._finish(attempt)
            return settled if wait else None
        return None

    def _persist(self, attempt: _Attempt) -> defer.Deferred:
        """Write the newest state; saves of one message never overlap or land out of order."""
        return attempt.lock.run(
            lambda: defer.maybeDeferred(self._spool.save_state, attempt.queue_id, attempt.state.to_dict()))

    def _finish(self, attempt: _Attempt) -> defer.Deferred:
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
            self._forget(attempt.queue_id)
            self.log.info("{queue_id}: deleted without DSN", queue_id=attempt.queue_id, stage="deleted")
            return
        closed = self._close_pending(attempt)
        if closed:
            yield _all([self._persist(attempt), *closed])
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

    def _close_pending(self, attempt: _Attempt) -> list:
        """Give the pending recipients a final answer if the postmaster bounced the message or it
        outlived [queue] lifetime; [] if nothing changed, else the Deferreds of their events (or
        Nones, without events)."""
        pending = attempt.state.pending
        if attempt.action == "bounce":
            closed = [replace(r, done=BOUNCED, reported=False, last_reply=ADMIN_BOUNCE) for r in pending]
        elif self._now() >= self._expiry(attempt.message):
            closed = [replace(r, done=EXPIRED, reported=False) for r in pending]
        else:
            return []
        emitted = []
        for rcpt in closed:
            attempt.state = attempt.state.with_recipient(rcpt)
            self.log.info("{queue_id}: {stage} {recipient} after {attempts} attempts", queue_id=attempt.queue_id,
                          stage=rcpt.done, recipient=rcpt.recipient, attempts=rcpt.attempts)
            result = rcpt.as_result()       # expired: RFC 3463 4.4.7 with the last reply in its text
            emitted.append(None if self._events is None else
                           self._emit(rcpt.done, attempt, rcpt, result, result.remote_host or "", ""))
        return emitted

    def _success_dsn_due(self, message, result: RecipientResult) -> bool:
        """RFC 3461 6.2.1: NOTIFY=SUCCESS, delivered to a hop that does not offer DSN (one that does got
        the request and reports itself) or into the mailbox: our own success DSN is due."""
        return (not result.dsn_passed and dsnparams.wants(message.envelope, result.recipient, "SUCCESS")
                and not self._no_dsn_reason(message))

    @defer.inlineCallbacks
    def _report_bounces(self, attempt: _Attempt):
        unreported = attempt.state.unreported
        groups = [([r for r in unreported if r.done != DELIVERED], "FAILURE", "bounce")]
        groups += [([r for r in unreported if r.done == DELIVERED and r.dsn == action], "SUCCESS", action)
                   for action in SUCCESS_ACTIONS]
        changed = False
        for rcpts, event, what in groups:
            if not rcpts:
                continue
            if not (yield self._report(attempt, rcpts, event, what)):
                break               # this group and the rest stay unreported; those before are saved
            for rcpt in rcpts:
                attempt.state = attempt.state.with_recipient(replace(rcpt, reported=True))
            changed = True
        if changed:
            yield self._persist(attempt)

    @defer.inlineCallbacks
    def _report(self, attempt: _Attempt, rcpts, event: str, what: str):
        """Hand one kind of report to the reporter for the recipients whose NOTIFY asks for `event`
        (RFC 3461 4.1: NEVER, or a list without it, means none); False when the reporter failed — all
        then stay unreported in the saved state, are asked again later, and the message stays."""
        envelope = attempt.message.envelope
        wanted = [r for r in rcpts if dsnparams.wants(envelope, r.recipient, event)]
        unwanted = [r.recipient for r in rcpts if r not in wanted]
        if unwanted:
            self.log.info("{queue_id}: no DSN for {recipients}: NOTIFY without {event}", queue_id=attempt.queue_id,
                          recipients=unwanted, event=event, stage="dsn-dropped")
        recipients = [r.recipient for r in wanted]
        why_not = self._no_dsn_reason(attempt.message) if wanted else None
        if why_not:
            self.log.info("{queue_id}: no DSN for {recipients}: {reason}", queue_id=attempt.queue_id,
                          recipients=recipients, reason=why_not, stage="dsn-dropped")
        elif wanted:
            results = [r.as_result() for r in wanted]
            try:
                if event == "FAILURE":
                    yield defer.maybeDeferred(self._reporter.bounce, attempt.message, results)
                else:
                    yield defer.maybeDeferred(self._reporter.success, attempt.message, results, what)
            except Exception:
                self.log.failure("{queue_id}: {what} report failed", queue_id=attempt.queue_id, what=what)
                return False
            self.log.info("{queue_id}: {what} reported for {recipients}", queue_id=attempt.queue_id,
                          what=what, recipients=recipients, stage="dsn")
        return True

    def _delay_warning_due(self, attempt: _Attempt) -> bool:
        state, warning = attempt.state, self._queue.delay_warning
        if warning <= 0 or state.delay_warned or not state.pending or attempt.action:
            return False
        if self._now() - attempt.message.envelope.received_at < warning:
            return False
        why_not = self._no_dsn_reason(attempt.message)
        envelope = attempt.message.envelope
        if not why_not and not any(dsnparams.wants(envelope, r.recipient, "DELAY") for r in state.pending):
            why_not = "NOTIFY without DELAY"           # RFC 3461 4.1: no DELAY, no delayed DSN
        if why_not:
            self.log.info("{queue_id}: no delay DSN: {reason}", queue_id=attempt.queue_id, reason=why_not,
                          stage="dsn-dropped")
            return False
        return True

    @defer.inlineCallbacks
    def _report_delay(self, attempt: _Attempt):
        envelope = attempt.message.envelope
        pending = [r.as_result() for r in attempt.state.pending if dsnparams.wants(envelope, r.recipient, "DELAY")]
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
        self._timetable.kick()          # room for another message in work
        if not self.running and not self._attempts:
            self._stopped("deliveries finished")

    def _stopped(self, why: str) -> None:
        waiters, self._stop_waiters = self._stop_waiters, []
        if waiters:
            self.log.info("scheduler stopped: {why}", why=why, queue_id="*", stage="stopped")
        for d in waiters:
            d.callback(None)


def _all(deferreds: list) -> defer.Deferred:
    """Fires when every one of `deferreds` (Deferreds or Nones) has; fails with the first failure."""
    waiting = [d for d in deferreds if d is not None]
    if not waiting:
        return defer.succeed(None)
    if len(waiting) == 1:
        return waiting[0]
    return defer.gatherResults(waiting, consumeErrors=True).addErrback(lambda f: f.value.subFailure)
