# -*- test-case-name: tests.test_scheduler_parts -*-
"""What the delivery scheduler holds in memory about the queue: the messages it has seen, those in work,
and the deliveries waiting for a connection slot.

Part of the delivery stage (queue.scheduler).  In: messages loaded from the spool (`track`), attempts
begun and ended, deliveries queued in their waiting line and dropped from it.  Out: the queue gauges
(`snapshot`, read from the metrics thread), whether another message may be taken into work
(`has_room`: the bounded active set), the deliveries waiting per throttled destination (queue.shaping).

The active set: at most ACTIVE_MIN messages in work, or ACTIVE_PER_SLOT per `[delivery] concurrency`
slot, whichever is more; deliveries held back by a `[[throttle]]` do not count against it, up to
ACTIVE_HARD_LIMIT in all, so a destination on hold never holds up the others.

Nothing here does I/O or keeps time: the scheduler and its parts (queue.recovery, queue.control,
queue.concurrency, queue.outcomes) tell it what happened.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator, Optional

from mailrelay.crossthread import read_unlocked
from mailrelay.queue.attempts import _Attempt, _Job
from mailrelay.queue.state import MessageState

ACTIVE_MIN = 1000        # messages in work (loaded, waiting for a slot or in flight) at most: this, or
ACTIVE_PER_SLOT = 10     # ... this many per `[delivery] concurrency` slot, whichever is more
ACTIVE_HARD_LIMIT = 20000  # ... and never more, even while most wait for a throttle (Postfix's
                           # qmgr_message_active_limit is the same figure)

Line = tuple[str, Optional[str]]     # (limit key, throttled destination): see attempts._Job.line


def active_limit(concurrency: int) -> int:
    """Messages in work at most (throttled deliveries aside) for `[delivery] concurrency` slots."""
    return max(ACTIVE_MIN, ACTIVE_PER_SLOT * concurrency)


class QueueState:
    """The scheduler's memory of the queue.  `received`: queue id -> received_at of every message seen in
    the spool; `held`: the held ones among them; `attempts`: queue id -> the _Attempt of each message in
    work; `waiting`: per waiting line, the deliveries not yet started, in FIFO order (lines in the order
    they began waiting).  `line_changes` counts the changes to the lines of throttled destinations (and
    every drop), so the throttle status knows it is out of date."""

    def __init__(self, concurrency: int = 1):
        self.received: dict[str, float] = {}
        self.held: set[str] = set()
        self.attempts: dict[str, _Attempt] = {}
        self.waiting: dict[Line, deque[_Job]] = {}
        self.line_changes = 0
        self.limit = active_limit(concurrency)

    def set_concurrency(self, concurrency: int) -> None:
        """A reload's `[delivery] concurrency`: the bound of the active set follows it."""
        self.limit = active_limit(concurrency)

    # -- the messages seen: the queue gauges ------------------------------------------------------------

    def track(self, message) -> None:
        """A message was loaded: its received time and hold flag as the spool says."""
        self.received[message.queue_id] = message.envelope.received_at
        if message.held:
            self.held.add(message.queue_id)
        else:
            self.held.discard(message.queue_id)

    def seen(self, queue_id: str, received_at: float) -> None:
        """A message known by its id alone (new mail, the start-up scan): counted from `received_at`
        until it is loaded."""
        self.received.setdefault(queue_id, received_at)

    def hold(self, queue_id: str) -> None:
        if queue_id in self.received:
            self.held.add(queue_id)

    def release(self, queue_id: str) -> None:
        self.held.discard(queue_id)

    def forget(self, queue_id: str) -> None:
        """The message left the spool."""
        self.received.pop(queue_id, None)
        self.held.discard(queue_id)

    def forget_all(self) -> None:
        """The spool is to be read again (resume after a suspension)."""
        for queue_id in list(self.received):
            self.forget(queue_id)

    def snapshot(self, now: float) -> tuple[int, float, int]:
        """(messages in the queue, age of the oldest in seconds, held messages), from memory only.

        Called by the metrics collector in a threadpool thread: it only reads, and copies the dict in
        one C-level call; a concurrent resize (RuntimeError) is simply read again."""
        copied = read_unlocked(lambda: (list(self.received.values()), len(self.held)), None)
        if copied is None:
            return 0, 0.0, 0
        received, held = copied
        oldest = now - min(received) if received else 0.0
        return len(received), max(0.0, oldest), held

    # -- the messages in work: the active set ---------------------------------------------------------

    def begin(self, message, state: MessageState) -> _Attempt:
        """Take a loaded message into work."""
        attempt = _Attempt(message, state)
        self.attempts[attempt.queue_id] = attempt
        return attempt

    def end(self, attempt: _Attempt) -> None:
        """`attempt` is over (if it is still the one in work for its message)."""
        if self.attempts.get(attempt.queue_id) is attempt:
            del self.attempts[attempt.queue_id]

    def has_room(self) -> bool:
        """Whether another message may be taken into work: loaded, routed, waiting for a slot.  Deliveries
        held back by a [[throttle]] (a paused or rate-held destination) do not count against the limit, up
        to ACTIVE_HARD_LIMIT in all: a destination on hold never holds up the others."""
        in_work = len(self.attempts)
        if in_work < self.limit:
            return True
        if in_work >= ACTIVE_HARD_LIMIT:
            return False
        shaped = sum(len(jobs) for (_key, destination), jobs in self.waiting.items() if destination is not None)
        return in_work - shaped < self.limit

    # -- the waiting lines ----------------------------------------------------------------------------

    def queue(self, job: _Job) -> None:
        """`job` waits for a connection slot at the end of its line; its attempt has one more outstanding."""
        self.waiting.setdefault(job.line, deque()).append(job)
        job.attempt.outstanding += 1
        if job.destination is not None:
            self.line_changes += 1

    def drop_waiting(self, attempt: _Attempt) -> int:
        """Forget the deliveries of `attempt` that have not started (hold, delete, bounce, stop); how many."""
        dropped = 0
        for line, jobs in list(self.waiting.items()):
            kept = deque(job for job in jobs if job.attempt is not attempt)
            dropped += len(jobs) - len(kept)
            if kept:
                self.waiting[line] = kept
            else:
                del self.waiting[line]
        attempt.outstanding -= dropped
        if dropped:
            self.line_changes += 1
        return dropped

    def drop_all_waiting(self) -> None:
        """Forget every delivery not yet started (stop, suspend); a message left with nothing in flight
        leaves work too — its saved state is complete."""
        for attempt in {job.attempt for jobs in self.waiting.values() for job in jobs}:
            self.drop_waiting(attempt)
            if not attempt.outstanding:
                del self.attempts[attempt.queue_id]

    def lines(self) -> Iterator[tuple[Line, deque[_Job]]]:
        """Each waiting line and its deliveries, in the order the lines began waiting (a copy of the
        list of lines: the caller may start, and so remove, deliveries as it goes)."""
        for line in list(self.waiting):
            jobs = self.waiting.get(line)
            if jobs is not None:
                yield line, jobs

    def line_done(self, line: Line) -> None:
        """Forget `line` if nothing waits in it any more."""
        if not self.waiting.get(line, True):
            del self.waiting[line]

    def waiting_for(self, destination: str) -> int:
        """Deliveries waiting for the throttled `destination`."""
        return sum(len(jobs) for (_, dest), jobs in list(self.waiting.items()) if dest == destination)

    def waiting_ids(self, destination: str) -> list[str]:
        """The queue ids of the deliveries waiting for `destination`, each once, in line order."""
        ids: dict[str, None] = {}
        for (_, dest), jobs in list(self.waiting.items()):
            if dest == destination:
                ids.update((job.attempt.queue_id, None) for job in list(jobs))
        return list(ids)

    def waiting_per_destination(self) -> dict[str, int]:
        """Deliveries waiting per throttled destination (read from a scrape thread too: it only reads)."""
        waiting: dict[str, int] = {}
        for (_, destination), jobs in list(self.waiting.items()):
            if destination is not None:
                waiting[destination] = waiting.get(destination, 0) + len(jobs)
        return waiting
