# -*- test-case-name: tests.test_scheduler, tests.test_webhook_scheduler, tests.test_logs -*-
"""Concurrency of the delivery scheduler: which waiting deliveries start, and in which batches.

Part of the delivery stage (queue.scheduler).  In: `_Job`s waiting per limit key ("domain:<d>" for
direct delivery, "transport:<name>" for a route) and throttled destination, in FIFO order.  Out: at
most `[delivery] concurrency` connection slots in use in all and `concurrency_per_domain` per key; each slot one
`INextHop.deliver()` call, or one `IBatchNextHop.deliver_batch()` for several deliveries to the same
next hop on one connection (RFC 5321 §3.3, queue.batch); each delivery's results handed on to be
recorded — for a batch, each message as soon as the next hop settles it (`on_settled`), the next
message on that connection waiting until the record is durable (docs/crash-safety.md section 2).

Waiting lines are per limit key and throttled destination (attempts._Job.line); `[[throttle]]` may hold a
line back or narrow what it starts (queue.shaping).

`Slots` is one collaborator of `Scheduler` (scheduler.py): it takes the deliveries from the waiting lines of
a QueueState, asks the Shaper (queue.shaping) at every start and finish, and hands every delivery's
results to a Recorder — queue.outcomes.Outcomes, or anything with its `record` and `record_failed`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Protocol

from twisted.internet import defer
from twisted.internet.base import DelayedCall
from twisted.python.failure import Failure

from mailrelay.queue.attempts import _Job
from mailrelay.queue.batch import batch_size, take_batch
from mailrelay.queue.job import Job
from mailrelay.queue.queuestate import QueueState
from mailrelay.queue.results import RecipientResult
from mailrelay.queue.shaping import Shaper
from mailrelay.logger import Logger


class Recorder(Protocol):
    """What becomes of one delivery's results (queue.outcomes.Outcomes)."""

    def record(self, results, job: _Job) -> defer.Deferred:
        """Apply `results` (a list of RecipientResult, or None: none given) to `job`'s message; fires once
        that record is durable."""

    def record_failed(self, failure: Failure, job: _Job) -> None:
        """`record` failed for `job`."""


class Slots:
    """The connection slots and the waiting lines of deliveries, for Scheduler.  `work`: the QueueState
    whose lines it starts; `shaper`: the [[throttle]] gate; `recorder`: told of every delivery's results;
    `clock`: IReactorTime; `concurrency`, `per_key`: `[delivery] concurrency` and
    `concurrency_per_domain`; `metrics`: a mailrelay.metrics.Metrics, or None; `log`: the scheduler's.
    Nothing starts before `start()` or after `stop()`; deliveries in flight finish either way."""

    def __init__(self, work: QueueState, shaper: Shaper, recorder: Recorder, clock, concurrency: int,
                 per_key: int, metrics, log: Logger):
        self._work, self._shaper, self._recorder, self._clock = work, shaper, recorder, clock
        self._metrics, self.log = metrics, log
        self.set_limits(concurrency, per_key)
        self._in_flight = 0
        self._per_key: dict[str, int] = {}
        self._pumping = self._pump_again = False
        self._pump_call: Optional[DelayedCall] = None   # a pump asked for at the end of this reactor turn
        self._running = False

    @property
    def in_flight(self) -> int:
        """Connection slots in use."""
        return self._in_flight

    def set_limits(self, concurrency: int, per_key: int) -> None:
        """The limits (a reload's apply to the next start: slots in use stay in use)."""
        self._total, self._per_key_limit = max(1, concurrency), max(1, per_key)

    def start(self) -> None:
        self._running = True

    def stop(self) -> None:
        """Start nothing more; what is in flight finishes and is recorded."""
        self._running = False
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
        self._pump_call = None

    def pump(self) -> None:
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

    def pump_soon(self) -> None:
        """Pump once every message due in this reactor turn has queued its deliveries, so that those
        bound for the same next hop can share a connection instead of the first going alone."""
        if self._pump_call is None or not self._pump_call.active():
            self._pump_call = self._clock.callLater(0, self._pump_now)

    def _pump_now(self) -> None:
        self._pump_call = None
        self.pump()

    def _start_what_fits(self) -> None:
        total, per_key = self._total, self._per_key_limit
        now = self._clock.seconds()
        self._shaper.announce_resumed(now)
        for line, jobs in self._work.lines():
            key = line[0]
            while jobs and self._running and self._in_flight < total and self._per_key.get(key, 0) < per_key:
                free = min(total - self._in_flight, per_key - self._per_key.get(key, 0))
                # [[throttle]]: a destination held back by its rate, connections or a pause waits in its
                # own line; the lines of other destinations go on (queue.shaping).
                free, most = self._shaper.gate(jobs[0], free, now)
                if not free:
                    break
                size = batch_size(len(jobs), free) if most < 0 else batch_size(len(jobs), free, most)
                self._start(take_batch(jobs, size, lambda job: job.hop), now)
            self._work.line_done(line)
            if self._in_flight >= total:
                return

    def _start(self, batch: list[_Job], now: float) -> None:
        """One connection slot for `batch` (deliveries for one next hop): deliver() for a single one,
        deliver_batch() for several; each delivery's results are then recorded on their own."""
        if batch[0].destination is not None:          # a throttled destination: when it started counts
            batch = [replace(job, started=now) for job in batch]
        first = batch[0]
        self._in_flight += 1
        self._per_key[first.limit_key] = self._per_key.get(first.limit_key, 0) + 1
        shaped = self._shaper.started(first, now)
        for job in batch:
            self.log.info("{queue_id}: attempt via {hop} for {recipients}", queue_id=job.attempt.queue_id,
                          hop=job.hop_name, recipients=list(job.recipients), batch=len(batch), stage="attempt")
            if self._metrics is not None:
                self._metrics.delivery_started(job.hop_name)
        recorded: set[int] = set()       # positions in `batch` already recorded through on_settled
        if len(batch) == 1:
            d = defer.maybeDeferred(first.hop.deliver, first.attempt.message, list(first.recipients))
            d.addCallback(lambda results: [results])
        else:
            jobs = [Job(job.attempt.message, job.recipients) for job in batch]
            # IBatchNextHop.deliver_batch takes on_settled; a hop may leave jobs unreported (then
            # recorded when the connection is done).
            d = defer.maybeDeferred(first.hop.deliver_batch, jobs,
                                    on_settled=lambda index, results: self._record_settled(
                                        index, results, batch, recorded))
        d.addErrback(self._hop_failed, batch)
        d.addBoth(self._release_slot, first.limit_key, shaped, batch)
        d.addCallback(self._record_batch, batch, recorded)

    def _hop_failed(self, failure: Failure, batch: list[_Job]) -> list[list[RecipientResult]]:
        # INextHop promises never to fail; if one does anyway, the message must not be lost: every
        # recipient is retried (RFC 3463 4.4.0: other network/routing problem).
        self.log.failure("{queue_id}: next hop {hop} failed", failure,
                         queue_id=",".join(job.attempt.queue_id for job in batch), hop=batch[0].hop_name)
        return [[RecipientResult(r, 451, "4.4.0", "local error in the next hop", "") for r in job.recipients]
                for job in batch]

    def _release_slot(self, result, limit_key: str, shaped: Optional[str], batch: list[_Job]):
        self._in_flight -= 1
        self._per_key[limit_key] -= 1
        if not self._per_key[limit_key]:
            del self._per_key[limit_key]
        if shaped is not None:
            self._shaper.finished(shaped)
            if isinstance(result, list):
                # What the destination said counts before the freed slot starts anything for it (a
                # pause, before its next message); recording the results later tells the same again.
                now = self._clock.seconds()
                for job, job_results in zip(batch, result):
                    self._shaper.outcome(job, list(job_results or ()), now)
        self.pump()
        return result

    def _record_settled(self, index: int, results, batch: list[_Job], recorded: set[int]):
        """on_settled for a batch: record delivery `index` now, exactly as _record_batch would have;
        the Deferred (never failing) fires once its state is saved, or the message removed, so the next
        hop offers the next message only then."""
        if index in recorded or not 0 <= index < len(batch):
            return None
        recorded.add(index)
        d = defer.maybeDeferred(self._recorder.record, results, batch[index])
        d.addErrback(self._recorder.record_failed, batch[index])
        return d

    def _record_batch(self, results, batch: list[_Job], recorded: set[int]) -> None:
        """Each delivery of a batch not yet recorded through on_settled is recorded, saved and acted on
        exactly as a lone one would be; one that the next hop gave no results for is retried (see
        Outcomes.record)."""
        results = list(results or ())
        for index, job in enumerate(batch):
            if index in recorded:
                continue
            job_results = results[index] if index < len(results) else None
            d = defer.maybeDeferred(self._recorder.record, job_results, job)
            d.addErrback(self._recorder.record_failed, job)
