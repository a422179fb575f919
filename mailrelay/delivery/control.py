# -*- test-case-name: tests.test_webhook_scheduler, tests.test_scheduler, tests.test_logs -*-
"""The queue CLI's control requests, as the delivery scheduler carries them out.

Part of the delivery stage (delivery.scheduler).  In: (verb, queue id) pairs from
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

`ControlMixin` is one part of `Scheduler` (scheduler.py); it uses the scheduler's `_spool`,
`_attempts`, `_received`, `_held`, `log` and its `flush`, `_unschedule`, `_recover`, `_load`,
`_begin`, `_drop_waiting` and `_finish`.
"""
from __future__ import annotations

import os

from twisted.internet import defer

from mailrelay.delivery.state import LastReply

POLL_INTERVAL = 0.5      # seconds between looks at the queue CLI's control requests

# What a queue CLI "bounce" records for every pending recipient (RFC 3463 X.0.0: other/undefined).
ADMIN_BOUNCE = LastReply(554, "5.0.0", "delivery cancelled by the postmaster")


class ControlMixin:
    """flush/hold/release/delete/bounce/suspend/resume requests from the queue CLI, for Scheduler."""

    _suspended = False       # every delivery stopped (suspend), until resume
    _suspension_idle = False # the persisted record already says nothing is in flight

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
                       "bounce": lambda q: self._cancel(q, "bounce"),
                       "suspend": self._suspend, "resume": self._resume}.get(verb)
            if handler is None or (queue_id is None and verb not in ("flush", "suspend", "resume")):
                self.log.warn("{queue_id}: ignored control request {verb}", queue_id=queue_id, verb=verb)
                continue
            try:
                handler(queue_id)
            except Exception:   # one bad request must not stop the polling loop
                self.log.failure("{queue_id}: control request {verb} failed", queue_id=queue_id, verb=verb)
        if self._suspended and not self._suspension_idle and not self._attempts:
            self._record_suspension()

    # -- suspend / resume: every delivery, for a drain ---------------------------------------------

    def _suspend(self, _queue_id=None) -> None:
        if not self._suspended:
            self.log.warn("deliveries suspended: nothing is delivered until `mailrelay queue resume`",
                          stage="control")
        self._suspended = True
        self._timetable.clear()
        self._recovery = None
        for attempt in {job.attempt for jobs in self._waiting.values() for job in jobs}:
            self._drop_waiting(attempt, finish=False)
            if not attempt.outstanding:
                del self._attempts[attempt.queue_id]   # nothing in flight: its saved state is complete
        self._record_suspension()

    def _resume(self, _queue_id=None) -> None:
        was = self._suspended
        self._suspended, self._suspension_idle = False, False
        self._spool.set_suspension(None)
        if was:
            self.log.info("deliveries resumed: reading the spool again", stage="control")
        for queue_id in list(self._received):
            self._forget(queue_id)
        self._recover_all()

    def _record_suspension(self) -> None:
        """Persist how many deliveries are still in flight; "idle" tells the CLI it may take over."""
        in_flight = len(self._attempts)
        self._suspension_idle = in_flight == 0
        self._spool.set_suspension({"since": self._now(), "in_flight": in_flight, "idle": in_flight == 0,
                                    "pid": os.getpid()})

    def _suspended_due(self, queue_id: str) -> bool:
        """True (and the message left alone) while deliveries are suspended: the spool's copy in memory
        is dropped, since the files may change under us; resume schedules it again."""
        if not self._suspended:
            return False
        self._spool.forget_fresh(queue_id)
        return True

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

    def _after(self, operation, queue_id: str) -> defer.Deferred:
        d = defer.maybeDeferred(operation, queue_id)
        d.addErrback(lambda f: self.log.failure("{queue_id}: spool operation failed", f, queue_id=queue_id))
        return d
