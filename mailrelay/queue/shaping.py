# -*- test-case-name: tests.test_throttle, tests.test_throttle_cli -*-
"""Traffic shaping in the delivery scheduler: `[[throttle]]` applied to the deliveries waiting for a slot.

Part of the delivery stage (queue.scheduler).  In: the waiting line a delivery stands in (one per
limit key and throttled destination, see attempts._Job.line), the results of each delivery that ended.
Out: whether the first delivery of a line may start now (and how many messages its connection may
carry), a wake-up at the time a held-back destination may go on, a pause begun by a "slow down"
reply (queue.throttle.slows_down), log lines when a destination is paused and when it resumes, the
throttle status for the metrics and for `mailrelay queue throttle` (written to `<spool>/throttle.json` within a
second of a change, and every few seconds anyway).

Deliveries waiting for a destination's rate, connection cap or pause are not attempts: they stay in
their line with their saved state untouched (no attempt counted, no backoff, no DSN), and start in
order once it lets them.  A recipient that got the "slow down" reply itself did make an attempt (it
is counted, with that reply), and is tried again when the pause ends, not after the backoff.

`Shaper` is one collaborator of `Scheduler` (scheduler.py), given the waiting lines (a QueueState), the
IThrottle and a `wake` callable; queue.concurrency asks it at every start and finish, queue.outcomes
about every delivery's results.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from twisted.internet import task
from twisted.internet.base import DelayedCall

from mailrelay.config import Throttle
from mailrelay.crossthread import read_unlocked
from mailrelay.queue.attempts import _Job
from mailrelay.queue.queuestate import QueueState
from mailrelay.queue.throttle import DestinationStatus, ThrottleRules, slows_down
from mailrelay.logger import Logger

STATUS_INTERVAL = 1.0      # seconds between two looks at whether <spool>/throttle.json needs writing ...
STATUS_REFRESH = 5.0       # ... which it does after a change, and at least this often while throttles exist
STATUS_FILE = "throttle.json"
LISTED_IDS = 20            # queue ids of waiting deliveries named per destination in the status file


class Shaper:
    """`[[throttle]]` for the scheduler: the gate at each start, the outcome of each delivery, the status.

    `rules`: the ThrottleRules; `throttle`: their state, an IThrottle (only its methods are used, so one
    shared between relays may stand in); `work`: the QueueState whose waiting lines it gates and counts;
    `clock`: IReactorTime; `wake`: called when a held-back destination may go on (the scheduler pumps);
    `status_path`: where the status is written for the queue CLI (None: nowhere); `log`: the scheduler's."""

    def __init__(self, rules: ThrottleRules, throttle, work: QueueState, clock, wake: Callable[[], None],
                 log: Logger, status_path: Optional[Path] = None):
        self._rules, self._throttle, self._work, self._clock = rules, throttle, work, clock
        self._wake, self.log, self._status_path = wake, log, status_path
        self._open_to: dict[str, int] = {}       # throttled destination -> connections this scheduler has open
        self._paused: dict[str, float] = {}      # destination -> end of the pause announced in the log
        self._throttle_call: Optional[DelayedCall] = None   # the wake-up for the earliest held-back one
        self._running = False
        self._status_loop: Optional[task.LoopingCall] = None
        self._status_dirty, self._status_written = False, 0.0
        self._lines_written = work.line_changes  # the waiting lines as the status last showed them

    def set_rules(self, rules: ThrottleRules) -> None:
        """A reload's rules: they apply at once to the state kept (a paused destination stays paused); the
        status file starts or stops with the first or last rule."""
        had = bool(self._rules)
        self._rules = rules
        if self._running and bool(rules) != had:
            self._stop_status()
            self._start_status()

    def start(self) -> None:
        self._running = True
        self._start_status()

    def stop(self) -> None:
        self._running = False
        self._stop_status()

    # -- the gate ---------------------------------------------------------------------------------

    def _rule_of(self, job: _Job) -> Optional[Throttle]:
        return self._rules.match(job.destination) if job.destination is not None else None

    def destination_of(self, recipient_domain: str) -> Optional[str]:
        """The throttled destination a recipient of this domain belongs to, or None (no rule matches)."""
        return recipient_domain if self._rules.match(recipient_domain) is not None else None

    def gate(self, job: _Job, free: int, now: float) -> tuple[int, int]:
        """(connection slots the line of `job` may use now, messages its next connection may carry, -1
        for no limit of the throttle's own); (0, 0) when the destination must wait — with a wake-up set
        for when it may go on, or none when only a connection ending helps (that pumps)."""
        rule = self._rule_of(job)
        if rule is None or job.destination is None:
            return free, -1
        ready = self._throttle.ready_at(job.destination, rule, now)
        if ready is None:
            return 0, 0
        if ready > now:
            self._wake_at(ready)
            return 0, 0
        if rule.connections:
            free = max(1, min(free, rule.connections - self._open_to.get(job.destination, 0)))
        # A rate: each message takes its own place in it.  A pause: a "slow down" reply must be heeded
        # before the next message goes.  Either way one message per start; the connection the last one
        # left open for reuse (outbound.pool) carries the next, so no connection is made for nothing.
        return free, (1 if rule.interval or rule.pause else -1)

    def started(self, first: _Job, now: float) -> Optional[str]:
        """A connection for `first`'s line starts now: its destination when the throttle counts it (then
        `finished` with it), else None."""
        rule = self._rule_of(first)
        if rule is None or first.destination is None:
            return None
        self._throttle.start(first.destination, rule, now)
        self._open_to[first.destination] = self._open_to.get(first.destination, 0) + 1
        self._status_dirty = True
        return first.destination

    def finished(self, destination: str) -> None:
        """The connection `started` counted for `destination` is over."""
        self._status_dirty = True
        self._throttle.finish(destination)
        left = self._open_to.get(destination, 0) - 1
        if left > 0:
            self._open_to[destination] = left
        else:
            self._open_to.pop(destination, None)

    def _wake_at(self, when: float) -> None:
        """Wake the scheduler at `when` (one timer for every held-back destination: the earliest)."""
        call = self._throttle_call
        if call is not None and call.active():
            if call.getTime() <= when:
                return
            call.cancel()
        self._throttle_call = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._woken)

    def _woken(self) -> None:
        self._throttle_call = None
        if self._running:
            self._wake()

    # -- what a delivery's results say about its destination ----------------------------------------

    def outcome(self, job: _Job, results: list, now: float) -> Optional[float]:
        """Tell the throttle what `job`'s destination answered; the end of the pause in force when a
        recipient was asked to slow down (it is tried again then), else None."""
        rule = self._rule_of(job)
        if rule is None or job.destination is None:
            return None
        slow = next((r for r in results if slows_down(r)), None)
        if slow is None:
            if any(r.delivered for r in results):
                self._throttle.succeeded(job.destination, job.started)
            return None
        reply = f"{slow.code} {slow.status} {slow.text}"
        until, began = self._throttle.slowed(job.destination, rule, job.started, now, reply)
        if until <= now:
            return None                                  # pause = 0: a plain deferral
        if began:
            self._paused[job.destination] = until
            self.log.warn("{queue_id}: destination {destination} paused for {seconds:g}s after {reply}; "
                          "{waiting} deliveries wait for it", queue_id=job.attempt.queue_id,
                          destination=job.destination, seconds=round(until - now, 3), reply=reply,
                          waiting=self._work.waiting_for(job.destination), stage="throttle-paused")
            self._wake_at(until)
            self._publish_status()
        return until

    def announce_resumed(self, now: float) -> None:
        """One log line for each pause that has ended, with the deliveries it held back."""
        ended = [d for d, until in self._paused.items() if until <= now]
        for destination in ended:
            del self._paused[destination]
            ids = self._work.waiting_ids(destination)
            self.log.info("destination {destination} resumed after its pause; {waiting} deliveries go on: "
                          "{queue_ids}", queue_id="*", destination=destination, waiting=len(ids),
                          queue_ids=",".join(ids[:LISTED_IDS]) or "-", stage="throttle-resumed")
        if ended:
            self._publish_status()

    # -- the status: metrics and <spool>/throttle.json ----------------------------------------------

    def snapshot(self) -> Optional[tuple[list[DestinationStatus], dict[str, int], float]]:
        """(the throttle's status, deliveries waiting per throttled destination, now), from memory only;
        None without [[throttle]] rules (no gauges then).  Called by the metrics collector in a scrape
        thread: it only reads, and reads again if the reactor thread resized a dict meanwhile."""
        if not self._rules:
            return None
        now = self._clock.seconds()

        def read() -> tuple:
            return self._throttle.status(now), self._work.waiting_per_destination(), now
        return read_unlocked(read, ([], {}, now))

    def _start_status(self) -> None:
        """Write <spool>/throttle.json every STATUS_INTERVAL while throttles are configured; remove a stale one."""
        if self._status_path is None:
            return
        if not self._rules:
            self._remove_status()
            return
        self._status_loop = task.LoopingCall(self._refresh_status)
        self._status_loop.clock = self._clock
        self._status_loop.start(STATUS_INTERVAL, now=True)

    def _stop_status(self) -> None:
        loop, self._status_loop = self._status_loop, None
        if loop is not None and loop.running:
            loop.stop()
        if self._throttle_call is not None and self._throttle_call.active():
            self._throttle_call.cancel()
        self._throttle_call = None
        self._remove_status()       # pauses live in memory: a stopped relay has none in force

    def _refresh_status(self) -> None:
        dirty = self._status_dirty or self._work.line_changes != self._lines_written
        if dirty or self._clock.seconds() - self._status_written >= STATUS_REFRESH:
            self._publish_status()

    def _publish_status(self) -> None:
        if self._status_path is None or not self._running or not self._rules:
            return
        now = self._clock.seconds()
        self._status_dirty, self._status_written = False, now
        self._lines_written = self._work.line_changes
        statuses, waiting, _ = self.snapshot() or ([], {}, now)
        known = {s.destination for s in statuses}
        rows = [dict(destination=s.destination, messages_per_minute=s.messages_per_minute,
                     connections_cap=s.connections_cap, connections=s.connections, next_start=s.next_start,
                     paused_until=s.paused_until, pauses_in_a_row=s.pauses_in_a_row, reason=s.reason,
                     waiting=waiting.get(s.destination, 0),
                     waiting_ids=self._work.waiting_ids(s.destination)[:LISTED_IDS])
                for s in statuses]
        for destination in sorted(set(waiting) - known):
            rule = self._rules.match(destination)
            rows.append(dict(destination=destination, messages_per_minute=rule.messages_per_minute if rule else 0,
                             connections_cap=rule.connections if rule else 0, connections=0, next_start=0.0,
                             paused_until=0.0, pauses_in_a_row=0, reason="", waiting=waiting[destination],
                             waiting_ids=self._work.waiting_ids(destination)[:LISTED_IDS]))
        try:
            write_status(self._status_path, {"written_at": now, "pid": os.getpid(),
                                             "interval": STATUS_REFRESH, "destinations": rows})
        except OSError as e:
            self.log.warn("cannot write {path}: {error}", path=str(self._status_path), error=e.strerror or str(e))

    def _remove_status(self) -> None:
        if self._status_path is None:
            return
        try:
            os.unlink(self._status_path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self.log.warn("cannot remove {path}: {error}", path=str(self._status_path), error=e.strerror or str(e))


def write_status(path: Path, data: dict) -> None:
    """Replace `path` with `data` as JSON (a temp file renamed over it: a reader sees one or the other).
    Not fsync'd: it is a window on memory, rewritten every few seconds, never needed after a crash."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def read_status(path: Path) -> Optional[dict]:
    """The last status the running relay wrote, or None (none written, or unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("destinations"), list) else None
