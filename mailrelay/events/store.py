# -*- test-case-name: tests.test_webhook, tests.test_webhook_end_to_end -*-
"""The durable outbox of one webhook URL, in the spool: what is still to be POSTed there.

In: event documents (event.py) from the IDeliveryEvents service; acknowledgements from the sender once
the URL answered 2xx.  Out: the events to send, oldest first, each only once it is durable; the backlog
(pending count, oldest age, last error) for metrics and `mailrelay queue`.

On disk, `<spool>/webhooks/<key>/` (`key`: the first 16 hex digits of the URL's SHA-256):

    url                     the URL as `display_url` shows it (no query, no credentials), for people
    0000000001.events       append-only: one event document per line
    0000000001.done         append-only: the id of each event the URL acknowledged, one per line
    status.json             the sender's last success and last error (advisory; never fsync'd)

Events are appended in batches by one thread (spool.threads): one write and one fsync per batch, however
many outcomes arrived meanwhile (group commit); an event is handed to the sender only after the fsync.
An acknowledgement is a write without fsync: a crash of the machine (not of the process — the page
cache survives a kill -9) can forget one, and the event is then POSTed again (at-least-once; the `id`
lets a receiver dedupe).  A segment takes SEGMENT_EVENTS events; once every event of a segment that is
no longer written to is acknowledged, both its files are removed.  At start every segment is read again
(a line a crash tore is skipped) and a new segment begins, so a torn line is never followed by another.
The segment being written is created with O_EXCL and held under flock(2): a process that starts while
an ending one (a delivery process finishing after its parent was killed) still writes leaves that
segment alone until its next start, so no event is removed or lost by two writers.
The bound: with `max_pending` events outstanding (durable or being written), a new one is dropped —
counted and logged, never waited for: delivery must not block on a full outbox.
"""
from __future__ import annotations

import collections
import fcntl
import hashlib
import heapq
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

from twisted.internet import defer

from mailrelay.config.webhooks import display_url
from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.events")

SEGMENT_EVENTS = 1000
DIRECTORY = "webhooks"


def outbox_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]


@dataclass
class StoredEvent:
    id: str
    body: bytes
    created: float         # unix time of the outcome (the document's "time")
    segment: int
    seq: int = 0           # order of arrival in this outbox (oldest first)

    def __lt__(self, other: "StoredEvent") -> bool:
        return self.seq < other.seq


def _parse(line: bytes) -> Optional[tuple[str, float]]:
    """(id, unix time) of one stored line, or None when it is not a whole event (a torn write)."""
    try:
        document = json.loads(line)
        return str(document["id"]), datetime.fromisoformat(document["time"].replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def read_segments(directory: Path, busy: Optional[set[int]] = None
                  ) -> tuple[dict[int, list[tuple[str, bytes, float]]], dict[int, set[str]]]:
    """Every segment's events (id, body, time) and acknowledged ids, by segment number.  With `busy`, a
    segment another process still writes (it holds its lock) is left out and its number put in `busy`."""
    events: dict[int, list[tuple[str, bytes, float]]] = {}
    done: dict[int, set[str]] = {}
    for path in sorted(directory.glob("*.events")):
        if not path.stem.isdigit():
            continue
        number = int(path.stem)
        if busy is not None and _locked_elsewhere(path):
            busy.add(number)
            continue
        rows = []
        for line in path.read_bytes().split(b"\n"):
            parsed = _parse(line) if line.strip() else None
            if parsed is not None:
                rows.append((parsed[0], line, parsed[1]))
        events[number] = rows
        ack_path = path.with_suffix(".done")
        done[number] = set(ack_path.read_text("ascii", "replace").split()) if ack_path.exists() else set()
    return events, done


def _append(path: Path, data: bytes, sync: bool) -> None:
    created = sync and not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_directory(path.parent)      # a new segment's name is durable too (once per segment)


def _locked_elsewhere(path: Path) -> bool:
    """Does another process hold the lock of this segment (it is its current one)?"""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)              # closing releases a lock taken here
    return False


def _claim(directory: Path, number: int) -> tuple[int, int]:
    """Create a new segment file (never one that exists: another process may have made it) and lock it
    for as long as this process writes to it: (its number, the fd holding the lock)."""
    while True:
        path = directory / f"{number:010d}.events"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            number += 1
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        return number, fd


def _write_status(path: Path, status: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


def _remove_segment(directory: Path, number: int) -> None:
    for suffix in (".events", ".done"):
        try:
            os.unlink(directory / f"{number:010d}{suffix}")
        except FileNotFoundError:
            pass


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Outbox:
    """The events of one URL.  `run(f, *args)`: f in the outbox thread, a Deferred for its result;
    `on_ready()`: called when events became sendable; `on_drop(reason)`: an event was dropped."""

    def __init__(self, root: Path, url: str, max_pending: int, run: Callable, on_ready: Callable[[], None],
                 on_drop: Callable[[str], None] = lambda reason: None):
        self.url, self.shown = url, display_url(url)
        self.directory = Path(root) / DIRECTORY / outbox_key(url)
        self.max_pending = max_pending
        self._run, self._on_ready, self._on_drop = run, on_ready, on_drop
        self._pending: collections.deque[StoredEvent] = collections.deque()   # durable, not in flight
        self._returned: list[StoredEvent] = []      # a heap: events whose POST failed, sent first again
        self._seq = 0
        self._in_flight: dict[str, StoredEvent] = {}
        self._buffer: list[tuple[StoredEvent, defer.Deferred]] = []
        self._acks: dict[int, list[str]] = {}
        self._counts: collections.Counter[int] = collections.Counter()      # events per segment
        self._acked: collections.Counter[int] = collections.Counter()
        self._writing = self._acking = False
        self._current = 1
        self._locks: dict[int, int] = {}       # segment -> fd holding its lock (the one being written)
        self.live = 0                      # outstanding: buffered, durable or in flight
        self.dropped = 0
        self.status: dict = {}

    # -- start -------------------------------------------------------------------------------------

    def load(self) -> int:
        """Read the outbox from disk (at start, or when its URL comes back in a reload); the number of
        events still to send.  Fully acknowledged segments are removed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "url").write_text(self.shown + "\n")
        busy: set[int] = set()
        events, done = read_segments(self.directory, busy)
        if busy:
            # A process that is ending (an old delivery process finishing its deliveries) still writes
            # these: they are read at the next start, never removed or sent twice from here meanwhile.
            log.info("webhook {url}: {count} outbox segments still written by another process; read at the "
                     "next start", url=self.shown, count=len(busy))
        for number, rows in sorted(events.items()):
            acked = done.get(number, set())
            left = [StoredEvent(i, body, created, number, self._next_seq()) for i, body, created in rows
                    if i not in acked]
            if not left:
                _remove_segment(self.directory, number)
                continue
            self._counts[number] = len(rows)
            self._acked[number] = len(rows) - len(left)
            self._pending.extend(left)
        # A new segment: never appended after a line a crash may have torn, nor to another process's.
        self._claim(max([*events, *busy], default=0) + 1)
        self.live = len(self._pending)
        try:
            self.status = json.loads((self.directory / "status.json").read_text())
        except (OSError, ValueError):
            self.status = {}
        return self.live

    def _claim(self, number: int) -> None:
        self._current, fd = _claim(self.directory, number)
        self._locks[self._current] = fd

    def _release_old_locks(self) -> None:
        for number in [n for n in self._locks if n < self._current]:
            os.close(self._locks.pop(number))

    def close(self) -> None:
        """Give up the segment locks (after `flushed`): another process may take this outbox over."""
        for fd in self._locks.values():
            os.close(fd)
        self._locks.clear()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # -- the delivery side -------------------------------------------------------------------------

    def append(self, event_id: str, body: bytes, created: float) -> defer.Deferred:
        """Fires with True once the event is durable, False when it was dropped (never fails)."""
        if self.live >= self.max_pending:
            self.dropped += 1
            self._on_drop("full")
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warn("webhook {url}: outbox full ({max} events waiting): event dropped ({dropped} so far)",
                         url=self.shown, max=self.max_pending, dropped=self.dropped)
            return defer.succeed(False)
        self.live += 1
        d: defer.Deferred[bool] = defer.Deferred()
        self._buffer.append((StoredEvent(event_id, body, created, 0, self._next_seq()), d))
        self._write()
        return d

    def _write(self) -> None:
        if self._writing or not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        segment = self._current
        for event, _ in batch:
            event.segment = segment
        self._counts[segment] += len(batch)
        if self._counts[segment] >= SEGMENT_EVENTS:
            self._claim(self._current + 1)     # the old lock goes once this write to it is done
        self._writing = True
        data = b"".join(event.body + b"\n" for event, _ in batch)
        d = defer.maybeDeferred(self._run, _append, self.directory / f"{segment:010d}.events", data, True)
        d.addCallbacks(self._written, self._not_written, callbackArgs=(batch,), errbackArgs=(batch,))

    def _written(self, _, batch) -> None:
        self._writing = False
        self._release_old_locks()
        self._pending.extend(event for event, _ in batch)
        for _, d in batch:
            d.callback(True)
        self._on_ready()
        self._write()

    def _not_written(self, failure, batch) -> None:
        self._writing = False
        self._release_old_locks()
        log.failure("webhook {url}: cannot write {count} events to the outbox; dropped", failure,
                    url=self.shown, count=len(batch))
        for event, d in batch:
            self._counts[event.segment] -= 1
            self.live -= 1
            self.dropped += 1
            self._on_drop("error")
            d.callback(False)
        self._write()

    def flushed(self) -> defer.Deferred:
        """Fires once everything appended so far is written (at stop)."""
        waiters = [d for _, d in self._buffer]
        if waiters:
            return defer.DeferredList(waiters)
        if self._writing:
            return self._run(lambda: None)     # the thread is serial: this runs after the write
        return defer.succeed(None)

    # -- the sending side --------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Durable events not in flight."""
        return len(self._pending) + len(self._returned)

    def take(self) -> Optional[StoredEvent]:
        """The oldest durable event not in flight (one given back before any never tried), or None."""
        if self._returned:
            event = heapq.heappop(self._returned)
        elif self._pending:
            event = self._pending.popleft()
        else:
            return None
        self._in_flight[event.id] = event
        return event

    def give_back(self, event: StoredEvent) -> None:
        """A POST that failed: the event goes back in line, before every event taken after it."""
        if self._in_flight.pop(event.id, None) is not None:
            heapq.heappush(self._returned, event)

    def return_all(self) -> None:
        """Every event in flight back in line (the sender stopped)."""
        for event in self._in_flight.values():
            heapq.heappush(self._returned, event)
        self._in_flight.clear()

    def ack(self, event: StoredEvent) -> None:
        """The URL answered 2xx (or the event is given up): it is never sent again."""
        if self._in_flight.pop(event.id, None) is None:
            return
        self.live -= 1
        self._acked[event.segment] += 1
        self._acks.setdefault(event.segment, []).append(event.id)
        self._write_acks()

    def _write_acks(self) -> None:
        if self._acking or not self._acks:
            return
        acks, self._acks = self._acks, {}
        finished = [n for n in acks if n < self._current and self._acked[n] >= self._counts[n]]
        self._acking = True

        def write() -> None:
            for number, ids in acks.items():
                if number in finished:
                    _remove_segment(self.directory, number)
                else:
                    _append(self.directory / f"{number:010d}.done", "".join(i + "\n" for i in ids).encode(), False)

        for number in finished:
            del self._counts[number], self._acked[number]
        d = defer.maybeDeferred(self._run, write)
        d.addErrback(lambda f: log.failure("webhook {url}: cannot record acknowledgements", f, url=self.shown))
        d.addBoth(self._acks_written)

    def _acks_written(self, _) -> None:
        self._acking = False
        self._write_acks()

    def note(self, **status) -> None:
        """Remember the sender's last success / error (shown by `mailrelay queue`)."""
        if all(self.status.get(k) == v for k, v in status.items() if not k.endswith("_at")):
            self.status.update(status)
            return
        self.status.update(status)
        defer.maybeDeferred(self._run, _write_status, self.directory / "status.json",
                            dict(self.status)).addErrback(lambda _: None)

    # -- the backlog -------------------------------------------------------------------------------

    def oldest(self) -> Optional[float]:
        """The time of the oldest outstanding durable event, or None."""
        times = [e.created for e in self._in_flight.values()]
        if self._returned:
            times.append(self._returned[0].created)
        if self._pending:
            times.append(self._pending[0].created)
        return min(times) if times else None


@dataclass(frozen=True)
class Backlog:
    url: str
    pending: int
    oldest: Optional[float]
    last_error: str
    last_error_at: Optional[float]
    directory: Path


def read_backlog(spool: Path) -> list[Backlog]:
    """Every outbox in the spool as it is on disk (for `mailrelay queue`, relay running or not)."""
    root = Path(spool) / DIRECTORY
    result = []
    for directory in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else ():
        try:
            url = (directory / "url").read_text().strip()
            events, done = read_segments(directory)
        except OSError:
            continue
        left = [created for number, rows in events.items() for i, _, created in rows
                if i not in done.get(number, set())]
        try:
            status = json.loads((directory / "status.json").read_text())
        except (OSError, ValueError):
            status = {}
        result.append(Backlog(url, len(left), min(left) if left else None, str(status.get("last_error", "")),
                              status.get("last_error_at"), directory))
    return result
