# -*- test-case-name: tests.test_scheduler_parts -*-
"""Reading the spool for the delivery scheduler: one message when it is due, and the whole queue at start-up.

Part of the delivery stage (queue.scheduler).  In: queue ids.  Out: `SpoolReader.load` — the spooled
message and its MessageState, or None (gone, unreadable: logged, and an unreadable state leaves the message
in the spool untouched for the postmaster, never guessed, never lost); `StartupScan` — every message in the
spool scheduled by its state file alone (queue.state.due_time: no message opened),
RECOVER_PER_TURN per reactor turn, so a restart over a deep queue answers at once and catches up in the
background.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from mailrelay.queue.queuestate import QueueState
from mailrelay.queue.state import MessageState, StateError, due_time
from mailrelay.queue.timetable import Timetable
from mailrelay.logger import Logger
from mailrelay.spool.ids import id_time
from mailrelay.spool.message import CorruptMessage, UnknownMessage

RECOVER_PER_TURN = 500   # messages the start-up scan schedules per reactor turn (the rest: later turns)

Loaded = tuple[Any, MessageState]          # (a spool.SpooledMessage, its state)


class SpoolReader:
    """Loads messages for the scheduler from `spool` (an ISpoolControl) and tells `work` what it saw."""

    def __init__(self, spool, work: QueueState, log: Logger):
        self._spool, self._work, self.log = spool, work, log

    def queue_ids(self) -> list[str]:
        """Every queue id in the spool, oldest first; [] (logged) when it cannot be listed."""
        try:
            return list(self._spool.queue_ids())
        except Exception:
            self.log.failure("cannot list the spool")
            return []

    def load(self, queue_id: str) -> Optional[Loaded]:
        """(message, MessageState), or None — logged — if it is gone or unreadable."""
        try:
            message = self._spool.take_fresh(queue_id) or self._spool.load(queue_id)   # ISpoolControl
            self._work.track(message)
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

    def load_unheld(self, queue_id: str, what: str) -> Optional[Loaded]:
        """(message, state) of a message that may be delivered, or None (gone, unreadable, or held)."""
        loaded = self.load(queue_id)
        if loaded is not None and loaded[0].held:
            self.log.info("{queue_id}: held, not {what}", queue_id=queue_id, what=what, stage="held")
            return None
        return loaded


class StartupScan:
    """The start-up scan over the spool: each message scheduled (`schedule(queue_id, when)`) by its state
    file, or loaded at once when it is held (rare: so the queue gauges know it).  Messages already in work
    or in `timetable` (enqueued or flushed meanwhile) are left as they are."""

    def __init__(self, clock, spool, reader: SpoolReader, work: QueueState, timetable: Timetable,
                 schedule: Callable[[str, float], None], log: Logger, per_turn: int = RECOVER_PER_TURN):
        self._clock, self._spool, self._reader, self._work = clock, spool, reader, work
        self._timetable, self._schedule, self.log, self._per_turn = timetable, schedule, log, per_turn
        self._ids: Optional[list[str]] = None   # ids still to schedule, the oldest last
        self._call = None                       # the next turn's step

    @property
    def scanning(self) -> bool:
        return self._ids is not None

    def start(self) -> None:
        """Scan the whole spool again, from its oldest message."""
        self.stop()
        self._ids = self._reader.queue_ids()
        self._ids.reverse()                     # oldest first, popped from the end
        self.step()

    def stop(self) -> None:
        self._ids = None
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def step(self) -> None:
        """One reactor turn of the scan: at most `per_turn` messages, the rest in the next turn."""
        self._call = None
        ids = self._ids
        if ids is None:
            return
        for _ in range(min(self._per_turn, len(ids))):
            self._recover_quick(ids.pop())
        if ids:
            self._call = self._clock.callLater(0, self.step)
        else:
            self._ids = None
            self.log.info("start-up scan done: {count} messages in the queue", count=len(self._work.received),
                          queue_id="*", stage="recovered")

    def _recover_quick(self, queue_id: str) -> None:
        """Schedule one message by its state file alone (the message itself is read when it is due)."""
        if queue_id in self._work.attempts or queue_id in self._timetable:
            return                                   # enqueued or flushed meanwhile
        made = id_time(queue_id)        # when it was received, near enough until it is loaded
        self._work.seen(queue_id, self._clock.seconds() if made is None else made)
        try:
            if self._spool.is_held(queue_id):
                self._reader.load(queue_id)    # held (rare): loaded once, so the queue gauges know it
                return
            when = due_time(self._spool.state_of(queue_id))
        except (CorruptMessage, OSError, ValueError):
            when = 0.0                               # loaded when due: the load says what is wrong
        self._schedule(queue_id, when)
