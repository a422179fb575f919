# -*- test-case-name: tests.test_timetable -*-
"""When each queued message is next due, for a queue of any depth.

Part of the delivery stage (queue.scheduler).  In: (queue id, time due, forced?) from the scheduler:
new mail, the start-up scan, a retry time, a flush.  Out: `admit(queue_id, forced)` calls, in order of
the time due, only while `may_admit()` says the scheduler has room for another message in work, and at
most `per_turn` in one reactor turn — so a flush of 30,000 messages, or a restart with them due, neither
loads them all at once (memory bounded by what is in work, not by the depth) nor holds the reactor for
seconds (new connections keep getting their 220).

One heap of (time, sequence, id) with lazy deletion and one timer for the earliest entry, instead of a
timer object per message: a queued message costs a heap entry and a dict entry (about 200 bytes), and
rescheduling is O(log n).  `kick()` after the scheduler made room resumes admission.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Callable, Optional

PER_TURN = 200          # admissions per reactor turn at most


class Timetable:
    def __init__(self, clock, admit: Callable[[str, bool], None], may_admit: Callable[[], bool],
                 per_turn: int = PER_TURN):
        self._clock, self._admit, self._may_admit, self._per_turn = clock, admit, may_admit, per_turn
        self._heap: list[tuple[float, int, str]] = []
        self._entry: dict[str, int] = {}          # queue id -> sequence number of its valid heap entry
        self._forced: set[str] = set()
        self._seq = itertools.count()
        self._call = None                          # the one IDelayedCall: the earliest entry, or "now"
        self._call_at: Optional[float] = None
        self._stopped = False

    def __len__(self) -> int:
        return len(self._entry)

    def __contains__(self, queue_id: str) -> bool:
        return queue_id in self._entry

    def ids(self) -> list[str]:
        return list(self._entry)

    def schedule(self, queue_id: str, when: float, force: bool = False) -> None:
        """Due at `when` (replacing any earlier schedule); `force`: its attempt ignores next_attempt."""
        seq = next(self._seq)
        self._entry[queue_id] = seq
        if force:
            self._forced.add(queue_id)             # kept until admitted, even if scheduled again unforced
        heapq.heappush(self._heap, (when, seq, queue_id))
        if len(self._heap) > 2 * len(self._entry) + 64:
            self._compact()
        self._arm()

    def unschedule(self, queue_id: str) -> None:
        self._entry.pop(queue_id, None)
        self._forced.discard(queue_id)

    def clear(self) -> None:
        self._heap.clear()
        self._entry.clear()
        self._forced.clear()
        self._cancel()

    def stop(self) -> None:
        self._stopped = True
        self.clear()

    def start(self) -> None:
        self._stopped = False
        self._arm()

    def kick(self) -> None:
        """The scheduler has room again: admit what is due (in the next reactor turn)."""
        self._arm()

    # -- inside -------------------------------------------------------------------------------------

    def _earliest(self) -> Optional[tuple[float, int, str]]:
        heap, entry = self._heap, self._entry
        while heap:
            when, seq, queue_id = heap[0]
            if entry.get(queue_id) == seq:
                return heap[0]
            heapq.heappop(heap)                    # a stale entry: rescheduled or removed since
        return None

    def _arm(self) -> None:
        if self._stopped:
            return
        earliest = self._earliest()
        if earliest is None:
            self._cancel()
            return
        at = max(earliest[0], self._clock.seconds())
        if self._call is not None and self._call.active():
            if self._call_at is not None and self._call_at <= at:
                return                             # already set to fire no later than needed
            self._call.cancel()
        self._call_at = at
        self._call = self._clock.callLater(max(0.0, at - self._clock.seconds()), self._fire)

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call, self._call_at = None, None

    def _fire(self) -> None:
        self._call, self._call_at = None, None
        now = self._clock.seconds()
        admitted = 0
        while admitted < self._per_turn and not self._stopped:
            earliest = self._earliest()
            if earliest is None or earliest[0] > now or not self._may_admit():
                break
            heapq.heappop(self._heap)
            queue_id = earliest[2]
            del self._entry[queue_id]
            forced = queue_id in self._forced
            self._forced.discard(queue_id)
            admitted += 1
            self._admit(queue_id, forced)
        if self._may_admit():
            self._arm()                            # the rest in a later turn, or at the next due time
        # else: kick() when the scheduler has room

    def _compact(self) -> None:
        entry = self._entry
        self._heap = [item for item in self._heap if entry.get(item[2]) == item[1]]
        heapq.heapify(self._heap)
