# -*- test-case-name: tests.test_scheduler, tests.test_webhook_scheduler, tests.test_logs -*-
"""The queue CLI's control requests, as the delivery scheduler carries them out.

Part of the delivery stage (queue.scheduler).  In: (verb, queue id) pairs from
`spool.take_requests()`, polled every POLL_INTERVAL seconds: flush, hold, release, delete, bounce,
suspend, resume.  Out: the spool's hold/release, timers cancelled or set, deliveries not yet started
dropped, and a delete (no DSN) or bounce (ADMIN_BOUNCE for every pending recipient, then an RFC 3464
DSN) carried out at once, or once the deliveries in flight end.  RFC 3463 5.0.0 for the postmaster's
bounce.

Suspend (the first step of `mailrelay queue transfer --hold`) stops every delivery: nothing waiting
starts, nothing due is tried, new mail is spooled and left alone, and the spool's suspension record says
how many deliveries are still in flight ("idle" once there are none), persisted so that a restart stays
suspended.  While suspended the spool's files are the only truth (another process may deliver or remove
messages); resume reads the whole spool again.

`Control` is one collaborator of `Scheduler` (scheduler.py), given what it acts on: the spool (an
ISpoolControl), the QueueState, the Timetable, the SpoolReader and the StartupScan (queue.recovery), and
three callables of the scheduler's — `flush(queue_id or None)`, `recover(queue_id)` (schedule a message by
its saved state) and `finish(attempt)` (settle an attempt: queue.outcomes).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from twisted.internet import defer

from mailrelay.queue.attempts import _Attempt
from mailrelay.queue.queuestate import QueueState
from mailrelay.queue.recovery import SpoolReader, StartupScan
from mailrelay.queue.state import LastReply
from mailrelay.queue.timetable import Timetable
from mailrelay.logger import Logger

POLL_INTERVAL = 0.5      # seconds between looks at the queue CLI's control requests

# What a queue CLI "bounce" records for every pending recipient (RFC 3463 X.0.0: other/undefined).
ADMIN_BOUNCE = LastReply(554, "5.0.0", "delivery cancelled by the postmaster")


class Control:
    """flush/hold/release/delete/bounce/suspend/resume requests from the queue CLI, for Scheduler."""

    def __init__(self, spool, work: QueueState, timetable: Timetable, reader: SpoolReader, scan: StartupScan,
                 clock, log: Logger, flush: Callable[[Optional[str]], None], recover: Callable[[str], None],
                 finish: Callable[[_Attempt], defer.Deferred]):
        self._spool, self._work, self._timetable, self._reader, self._scan = spool, work, timetable, reader, scan
        self._clock, self.log = clock, log
        self._flush, self._recover, self._finish = flush, recover, finish
        self._suspended = False        # every delivery stopped (suspend), until resume
        self._suspension_idle = False  # the persisted record already says nothing is in flight

    @property
    def suspended(self) -> bool:
        return self._suspended

    def poll(self) -> None:
        """Carry out the control requests the queue CLI left in the spool since the last poll."""
        try:
            requests = list(self._spool.take_requests())
        except Exception:
            self.log.failure("cannot read queue control requests")
            return
        for verb, queue_id in requests:
            self.log.info("{queue_id}: control request {verb}", queue_id=queue_id or "*", verb=verb,
                          stage="control")
            handler = {"flush": self._flush, "hold": self._hold, "release": self._release,
                       "delete": lambda q: self._cancel(q, "delete"),
                       "bounce": lambda q: self._cancel(q, "bounce"),
                       "suspend": self.suspend, "resume": self.resume}.get(verb)
            if handler is None or (queue_id is None and verb not in ("flush", "suspend", "resume")):
                self.log.warn("{queue_id}: ignored control request {verb}", queue_id=queue_id, verb=verb)
                continue
            try:
                handler(queue_id)
            except Exception:   # one bad request must not stop the polling loop
                self.log.failure("{queue_id}: control request {verb} failed", queue_id=queue_id, verb=verb)
        if self._suspended and not self._suspension_idle and not self._work.attempts:
            self._record_suspension()

    # -- suspend / resume: every delivery, for a drain ---------------------------------------------

    def suspend(self, _queue_id: Optional[str] = None) -> None:
        """Stop every delivery: nothing due is tried, nothing waiting starts; persisted."""
        if not self._suspended:
            self.log.warn("deliveries suspended: nothing is delivered until `mailrelay queue resume`",
                          stage="control")
        self._suspended = True
        self._timetable.clear()
        self._scan.stop()
        self._work.drop_all_waiting()
        self._record_suspension()

    def resume(self, _queue_id: Optional[str] = None) -> None:
        """Deliver again, from the spool's files as they are now."""
        was = self._suspended
        self._suspended, self._suspension_idle = False, False
        self._spool.set_suspension(None)
        if was:
            self.log.info("deliveries resumed: reading the spool again", stage="control")
        self._work.forget_all()
        self._scan.start()

    def _record_suspension(self) -> None:
        """Persist how many deliveries are still in flight; "idle" tells the CLI it may take over."""
        in_flight = len(self._work.attempts)
        self._suspension_idle = in_flight == 0
        self._spool.set_suspension({"since": self._clock.seconds(), "in_flight": in_flight,
                                    "idle": in_flight == 0, "pid": os.getpid()})

    def suspended_due(self, queue_id: str) -> bool:
        """True (and the message left alone) while deliveries are suspended: the spool's copy in memory
        is dropped, since the files may change under us; resume schedules it again."""
        if not self._suspended:
            return False
        self._spool.forget_fresh(queue_id)
        return True

    # -- one message ------------------------------------------------------------------------------

    def _hold(self, queue_id: str) -> None:
        self._after(self._spool.hold, queue_id)
        self._work.hold(queue_id)
        self._timetable.unschedule(queue_id)
        attempt = self._work.attempts.get(queue_id)
        if attempt is not None:
            attempt.held = True
            self._drop_waiting(attempt)

    def _release(self, queue_id: str) -> None:
        self._work.release(queue_id)
        attempt = self._work.attempts.get(queue_id)
        if attempt is not None:
            attempt.held = False
            self._after(self._spool.release, queue_id)
        else:
            self._after(self._spool.release, queue_id).addCallback(lambda _: self._recover(queue_id))

    def _cancel(self, queue_id: str, action: str) -> None:
        """delete (no DSN) or bounce (DSN to the sender): at once, or once deliveries in flight end."""
        self._timetable.unschedule(queue_id)
        attempt = self._work.attempts.get(queue_id)
        if attempt is not None:
            attempt.action = action
            self._drop_waiting(attempt)
            return
        loaded = self._reader.load(queue_id)
        if loaded is not None:
            attempt = self._work.begin(*loaded)
            attempt.action = action
            self._finish(attempt)

    def _drop_waiting(self, attempt: _Attempt) -> None:
        """Forget the deliveries of `attempt` not yet started; settle it if that was all it had."""
        if self._work.drop_waiting(attempt) and not attempt.outstanding:
            self._finish(attempt)

    def _after(self, operation: Callable[[str], object], queue_id: str) -> defer.Deferred:
        d = defer.maybeDeferred(operation, queue_id)
        d.addErrback(lambda f: self.log.failure("{queue_id}: spool operation failed", f, queue_id=queue_id))
        return d
