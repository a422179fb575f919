# -*- test-case-name: tests.test_scheduler_outcomes -*-
"""The DSNs the delivery scheduler asks for: which are due, and handing them to the DSN reporter.

Part of the delivery stage (queue.scheduler, called from queue.outcomes).  In: one message's
attempt (its envelope and MessageState).  Out: `IDeliveryReporter.bounce/success/delay` calls, each only
for the recipients whose RFC 3461 NOTIFY asks for it (none given: FAILURE,DELAY), and a log line for every
DSN not sent and why.

Rules: RFC 3464 failure DSNs for recipients settled for good, one delay DSN after `[queue] delay_warning`,
a "relayed" or "delivered" success DSN for NOTIFY=SUCCESS when the next hop does not report on its own
(RFC 3461 6.2.1, RFC 3464 2.3.3); RFC 5321 §4.5.5 / §6.1: never a DSN to the null reverse-path.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from twisted.internet import defer

from mailrelay import dsnparams
from mailrelay.config import QueueConfig
from mailrelay.queue.attempts import _Attempt
from mailrelay.queue.state import DELIVERED, SUCCESS_ACTIONS, RecipientState
from mailrelay.queue.results import RecipientResult
from mailrelay.logger import Logger


class Reports:
    """DSNs for the scheduler.  `reporter`: an IDeliveryReporter, or None (no DSNs); `queue`: the
    `[queue]` config (`bounces`, `delay_warning`); `log`: the scheduler's."""

    def __init__(self, reporter, queue: QueueConfig, log: Logger):
        self._reporter, self._queue, self.log = reporter, queue, log

    def reconfigure(self, queue: QueueConfig) -> None:
        self._queue = queue

    def no_dsn_reason(self, message) -> Optional[str]:
        """Why no DSN at all may go for `message`, or None."""
        if message.envelope.sender == "":
            # RFC 5321 §4.5.5, RFC 3464 §2: never a DSN to the null reverse-path (bounce loops).
            return "null reverse-path"
        if self._reporter is None or not self._queue.bounces:
            return "bounces are disabled"
        return None

    def success_due(self, message, result: RecipientResult) -> bool:
        """RFC 3461 6.2.1: NOTIFY=SUCCESS, delivered to a hop that does not offer DSN (one that does got
        the request and reports itself) or into the mailbox: our own success DSN is due."""
        return (not result.dsn_passed and dsnparams.wants(message.envelope, result.recipient, "SUCCESS")
                and not self.no_dsn_reason(message))

    @defer.inlineCallbacks
    def report_settled(self, attempt: _Attempt):
        """Hand over the failure and success DSNs the state says are due, in that order; the recipients
        reported are marked so in `attempt.state`.  Fires with True when anything changed (the caller
        saves it); a reporter failure leaves its group and the rest unreported, to be asked again."""
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
        return changed

    @defer.inlineCallbacks
    def _report(self, attempt: _Attempt, rcpts: list[RecipientState], event: str, what: str):
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
        why_not = self.no_dsn_reason(attempt.message) if wanted else None
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

    def delay_warning_due(self, attempt: _Attempt, now: float) -> bool:
        """Whether the one delay DSN of the message is due now (logged when it is due but may not go)."""
        state, warning = attempt.state, self._queue.delay_warning
        if warning <= 0 or state.delay_warned or not state.pending or attempt.action:
            return False
        if now - attempt.message.envelope.received_at < warning:
            return False
        why_not = self.no_dsn_reason(attempt.message)
        envelope = attempt.message.envelope
        if not why_not and not any(dsnparams.wants(envelope, r.recipient, "DELAY") for r in state.pending):
            why_not = "NOTIFY without DELAY"           # RFC 3461 4.1: no DELAY, no delayed DSN
        if why_not:
            self.log.info("{queue_id}: no delay DSN: {reason}", queue_id=attempt.queue_id, reason=why_not,
                          stage="dsn-dropped")
            return False
        return True

    @defer.inlineCallbacks
    def report_delay(self, attempt: _Attempt):
        """Hand over the delay DSN for the pending recipients whose NOTIFY asks for DELAY; never fails."""
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
