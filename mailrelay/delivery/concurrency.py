# -*- test-case-name: tests.test_webhook_scheduler, tests.test_scheduler, tests.test_logs -*-
"""Concurrency of the delivery scheduler: which waiting deliveries start, and in which batches.

Part of the delivery stage (delivery.scheduler).  In: `_Job`s waiting per limit key ("domain:<d>" for
direct delivery, "transport:<name>" for a route) and throttled destination, in FIFO order.  Out: at
most `[delivery] concurrency` connection slots in use in all and `concurrency_per_domain` per key; each slot one
`INextHop.deliver()` call, or one `IBatchNextHop.deliver_batch()` for several deliveries to the same
next hop on one connection (RFC 5321 §3.3, delivery.batch); each delivery's results handed on to be
recorded — for a batch, each message as soon as the next hop settles it (`on_settled`), the next
message on that connection waiting until the record is durable (docs/crash-safety.md section 2).

Waiting lines are per limit key and throttled destination (attempts._Job.line); `[[throttle]]` may hold a
line back or narrow what it starts (delivery.shaping).

`ConcurrencyMixin` is one part of `Scheduler` (scheduler.py); it uses the scheduler's `_waiting`,
`_in_flight`, `_per_key`, `_pumping`, `_pump_again`, `_pump_call`, `_clock`, `_delivery`,
`_metrics`, `running`, `log` and its `_now`, `_hop_failed`, `_record`, `_record_failed`, `_finish`,
`_shaped`, `_shaping_started`, `_shaping_finished` and `_announce_resumed`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Optional

from twisted.internet import defer

from mailrelay.delivery.attempts import _Attempt, _Job
from mailrelay.delivery.batch import batch_size, take_batch
from mailrelay.delivery.job import Job


class ConcurrencyMixin:
    """The slots and the waiting lines of deliveries, for Scheduler."""

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
        now = self._now()
        self._announce_resumed(now)
        for line in list(self._waiting):
            jobs, key = self._waiting.get(line), line[0]
            while jobs and self.running and self._in_flight < total and self._per_key.get(key, 0) < per_key:
                free = min(total - self._in_flight, per_key - self._per_key.get(key, 0))
                # [[throttle]]: a destination held back by its rate, connections or a pause waits in its
                # own line; the lines of other destinations go on (delivery.shaping).
                free, most = self._shaped(jobs[0], free, now)
                if not free:
                    break
                size = batch_size(len(jobs), free) if most < 0 else batch_size(len(jobs), free, most)
                self._start(take_batch(jobs, size, lambda job: job.hop), now)
            if not jobs:
                self._waiting.pop(line, None)
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
        shaped = first.destination if self._shaping_started(first, now) else None
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

    def _release_slot(self, result, limit_key: str, shaped: Optional[str] = None, batch: tuple = ()):
        self._in_flight -= 1
        self._per_key[limit_key] -= 1
        if not self._per_key[limit_key]:
            del self._per_key[limit_key]
        if shaped is not None:
            self._shaping_finished(shaped)
            if isinstance(result, list):
                # What the destination said counts before the freed slot starts anything for it (a
                # pause, before its next message); recording the results later tells the same again.
                now = self._now()
                for job, job_results in zip(batch, result):
                    self._shaping_outcome(job, list(job_results or ()), now)
        self._pump()
        return result

    def _record_settled(self, index: int, results, batch: list[_Job], recorded: set[int]):
        """on_settled for a batch: record delivery `index` now, exactly as _record_batch would have;
        the Deferred (never failing) fires once its state is saved, or the message removed, so the next
        hop offers the next message only then."""
        if index in recorded or not 0 <= index < len(batch):
            return None
        recorded.add(index)
        d = defer.maybeDeferred(self._record, results, batch[index])
        d.addErrback(self._record_failed, batch[index])
        return d

    def _record_batch(self, results, batch: list[_Job], recorded: frozenset = frozenset()) -> None:
        """Each delivery of a batch not yet recorded through on_settled is recorded, saved and acted on
        exactly as a lone one would be; one that the next hop gave no results for is retried (see _record)."""
        results = list(results or ())
        for index, job in enumerate(batch):
            if index in recorded:
                continue
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
        self._status_dirty = self._status_dirty or bool(dropped)
        if finish and dropped and not attempt.outstanding:
            self._finish(attempt)
