# -*- test-case-name: tests.test_tlsrpt, tests.test_tlsrpt_delivery, tests.test_tlsrpt_end_to_end -*-
"""The TLS report store: every direct-to-MX session's TLS outcome, counted for SMTP TLS Reporting
(RFC 8460), kept in the spool directory until a report is sent.

Journey: direct MX delivery (outbound.mx) calls `record` (interfaces.ITLSReportSink) once per new
session; the reporter (outbound.tlsrpt_send: the daily run, or `mailrelay tlsrpt send`) takes what was
gathered with `take`, reads it with `read_batch` and removes it once every report is on its way.

Counted per UTC day and per (policy domain, policy type, policy strings, MX host — the latter only for
"tlsa" and "no-policy-found"; an "sts" policy names its MX patterns itself): the successful and failed
sessions, and the failures by RFC 8460 4.4 failure details (result type, sending and receiving IP,
receiving MX name and EHLO name, additional information, failure reason), with a count each; at most
MAX_DETAILS distinct rows per policy and day, further failures being merged into one row per result type.

On disk, <spool>/tlsrpt/:
    journal/YYYY-MM-DD.jsonl   append-only, one JSON line per flush: the counts gathered since the
                               previous flush, for that UTC day
    batches/DAY.BEGIN-END.ID.jsonl   a journal file taken for a report (renamed, so taken once), the
                               period it covers in its name; DAY...ID.done lists the domains done
    since                      the end of the last report of the current day (`mailrelay tlsrpt send`)
    journal.lock, report.lock  flock(2): appends and takes exclude each other; one report run at a time

Cost and durability (a choice: append-only journal of aggregated counts): `record` only counts in
memory (a dict update, no I/O); at most FLUSH_DELAY seconds later the counts are appended to the journal
(one open/write/close under the journal lock, however many sessions it holds), and at most every
SYNC_INTERVAL seconds that write is also fsync'd — never one fsync per delivery.  A kill -9 loses at most
the last FLUSH_DELAY seconds of counts; a power failure at most the last SYNC_INTERVAL seconds.  A torn
last line (a crash mid-write) is not valid JSON or has no newline: it is skipped, the lines before count.
A take renames a journal file under the journal lock, so no append is ever split between two periods.
"""
from __future__ import annotations

import calendar
import fcntl
import json
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from zope.interface import implementer

from mailrelay.interfaces import ITLSReportSink
from mailrelay.logger import Logger
from mailrelay.spool.files import atomic_write, make_directory, write_all

log = Logger(namespace="mailrelay.tlsrpt")

FLUSH_DELAY = 1.0        # seconds counts wait in memory before they are appended to the journal
SYNC_INTERVAL = 60.0     # seconds between fsyncs of the journal (only when something was written)
MAX_DETAILS = 100        # distinct failure-detail rows kept per policy and day
MAX_STRINGS = 50         # policy strings kept per policy (an MTA-STS policy has a handful of lines)
MAX_TEXT = 255           # characters kept of any one name, address or text
DAY = 86400
POLICY_TYPES = ("sts", "tlsa", "no-policy-found")   # RFC 8460 4.4 "policy-type"
DETAIL_FIELDS = ("sending-mta-ip", "receiving-ip", "receiving-mx-helo", "additional-information",
                 "failure-reason-code")
_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def day_of(when: float) -> str:
    """The UTC day of a unix time, "2026-12-03"."""
    return time.strftime("%Y-%m-%d", time.gmtime(when))


def day_start(day: str) -> int:
    return calendar.timegm(time.strptime(day, "%Y-%m-%d"))


def _text(value: Any) -> str:
    """Names and texts from the wire: printable ASCII only, bounded (they end up in a JSON report)."""
    text = value if isinstance(value, str) else str(value)
    if text.isascii() and text.isprintable():
        return text[:MAX_TEXT]                 # the usual case, without a loop over the characters
    return "".join(c if " " <= c <= "~" else "?" for c in text[:MAX_TEXT])


@dataclass
class Tally:
    """One policy's counts: sessions that succeeded, that failed, and the failures by details row
    (result-type, receiving-mx-hostname, then DETAIL_FIELDS, in that order)."""
    successes: int = 0
    failures: int = 0
    details: dict = field(default_factory=dict)

    def add_failure(self, row: tuple, count: int = 1) -> None:
        if row not in self.details and len(self.details) >= MAX_DETAILS:
            row = (row[0],) + ("",) * (len(row) - 1)      # bounded: merged into its result type's row
        self.details[row] = self.details.get(row, 0) + count

    def merge(self, other: "Tally") -> None:
        self.successes += other.successes
        self.failures += other.failures
        for row, count in other.details.items():
            self.add_failure(row, count)


PolicyKey = tuple   # (policy domain, policy type, policy strings tuple, MX host or "")


def policy_key(policy_domain: str, policy_type: str, policy_strings, mx_host: str) -> PolicyKey:
    strings = tuple(_text(s) for s in tuple(policy_strings or ())[:MAX_STRINGS])
    # An MTA-STS policy covers the domain and names its MX patterns; DANE and "no policy" are per host.
    host = "" if policy_type == "sts" else _text(mx_host).lower().rstrip(".")
    return (_text(policy_domain).lower().rstrip("."), policy_type, strings, host)


def encode_line(tallies: dict, first: float, last: float) -> bytes:
    policies = [[list(key[:2]) + [list(key[2]), key[3]], t.successes, t.failures,
                 [list(row) + [count] for row, count in t.details.items()]] for key, t in tallies.items()]
    return json.dumps({"t": [first, last], "p": policies}, separators=(",", ":")).encode("ascii") + b"\n"


def decode_lines(data: bytes, into: dict) -> int:
    """Add the counts of every whole, valid journal line in `data` to `into` ({PolicyKey: Tally});
    returns the number of lines skipped (torn or damaged)."""
    skipped = 0
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        lines.pop()              # no newline at the end: a write torn by a crash
        skipped += 1
    for line in lines:
        try:
            for (domain, kind, strings, host), ok, failed, rows in json.loads(line)["p"]:
                tally = into.setdefault((domain, kind, tuple(strings), host), Tally())
                tally.successes += int(ok)
                tally.failures += int(failed)
                for row in rows:
                    tally.add_failure(tuple(str(v) for v in row[:-1]), int(row[-1]))
        except (ValueError, TypeError, KeyError):
            skipped += 1
    return skipped


@contextmanager
def locked(path: Path, blocking: bool = True) -> Iterator[bool]:
    """flock(2) on `path` for the block; yields False (and holds nothing) when `blocking` is False and
    another process holds it."""
    if not path.parent.is_dir():
        os.makedirs(path.parent, 0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)           # closing the descriptor releases the lock


@implementer(ITLSReportSink)
class TLSReportStore:
    """Counts in memory, appended to <directory>/journal/ FLUSH_DELAY seconds later (see above).
    `clock` gives the time and runs the flush; `close()` flushes and fsyncs (at stop)."""

    def __init__(self, directory: Path, clock: Any = None, flush_delay: float = FLUSH_DELAY,
                 sync_interval: float = SYNC_INTERVAL):
        if clock is None:
            from twisted.internet import reactor as clock
        self.directory = Path(directory)
        self.clock = clock
        self.flush_delay, self.sync_interval = flush_delay, sync_interval
        self._pending: dict[str, dict[PolicyKey, Tally]] = {}
        self._window: dict[str, list[float]] = {}
        self._call = None
        self._last_sync = clock.seconds()
        self._unsynced: set[Path] = set()
        self.recorded = 0          # outcomes recorded since start (tests, metrics)

    def record(self, policy_domain, policy_type, policy_strings, mx_host, result_type, success, detail) -> None:
        """ITLSReportSink: count one session's TLS outcome (no I/O here)."""
        if policy_type not in POLICY_TYPES or not policy_domain:
            raise ValueError(f"bad TLS report record: {policy_type!r} for {policy_domain!r}")
        now = self.clock.seconds()
        day = day_of(now)
        tallies = self._pending.get(day)
        if tallies is None:
            tallies = self._pending[day] = {}
            self._window[day] = [now, now]
        self._window[day][1] = now
        key = policy_key(policy_domain, policy_type, policy_strings, mx_host)
        tally = tallies.get(key)
        if tally is None:
            tally = tallies[key] = Tally()
        if success:
            tally.successes += 1
        else:
            tally.failures += 1
            detail = detail or {}
            tally.add_failure((_text(result_type or "validation-failure"), _text(mx_host).lower().rstrip("."))
                              + tuple(_text(detail.get(name, "")) for name in DETAIL_FIELDS))
        self.recorded += 1
        if self._call is None:
            self._call = self.clock.callLater(self.flush_delay, self.flush)

    def flush(self, sync: bool = False) -> None:
        """Append the counts gathered so far to the journal; fsync when SYNC_INTERVAL has passed (or
        `sync`).  A failure is logged and the counts kept for the next flush."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        pending, window = self._pending, self._window
        self._pending, self._window = {}, {}
        now = self.clock.seconds()
        sync = sync or now - self._last_sync >= self.sync_interval
        try:
            with locked(self.directory / "journal.lock"):
                for day, tallies in pending.items():
                    path = self.directory / "journal" / f"{day}.jsonl"
                    make_directory(path.parent)
                    fd = os.open(path, _APPEND, 0o600)
                    try:
                        write_all(fd, encode_line(tallies, *window[day]))
                        if sync:
                            os.fsync(fd)
                    finally:
                        os.close(fd)
                    self._unsynced.add(path)
                if sync:
                    self._sync_rest(pending)
        except OSError:
            log.failure("cannot write the TLS report journal; the counts are kept for the next try")
            for day, tallies in pending.items():
                kept = self._pending.setdefault(day, {})
                for key, tally in tallies.items():
                    kept.setdefault(key, Tally()).merge(tally)
                self._window.setdefault(day, window[day])
            if self._call is None:
                self._call = self.clock.callLater(self.sync_interval, self.flush)

    def _sync_rest(self, written: dict) -> None:
        """fsync the journal files written since the last sync and not just now (still there)."""
        for path in self._unsynced - {self.directory / "journal" / f"{d}.jsonl" for d in written}:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue               # taken for a report meanwhile: the reporter owns it now
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._unsynced.clear()
        self._last_sync = self.clock.seconds()

    def close(self) -> None:
        """Flush and fsync what is gathered (the relay is stopping)."""
        if self._pending or self._unsynced:
            self.flush(sync=True)


# -- the reporter's side: take a period, read it, finish it --------------------------------------------

@dataclass(frozen=True)
class Batch:
    """A journal file taken for a report: its UTC day and the period [begin, end) it covers."""
    path: Path
    day: str
    begin: int
    end: int

    @property
    def done_path(self) -> Path:
        return self.path.with_suffix(".done")


def take(directory: Path, now: float, include_today: bool) -> list[Batch]:
    """Move the journal files of past UTC days (and today's too, with `include_today`: `mailrelay
    tlsrpt send`) to batches/, each named with the period it covers, under the journal lock; with
    `include_today`, today's next period begins now.  Returns every batch waiting, old ones (a report
    run that stopped half-way) included, oldest first."""
    directory = Path(directory)
    today = day_of(now)
    with locked(directory / "journal.lock"):
        since = _read_since(directory)
        journal = directory / "journal"
        names = sorted(os.listdir(journal)) if journal.is_dir() else []
        for name in names:
            day = name[:-len(".jsonl")]
            if not name.endswith(".jsonl") or len(day) != 10 or (day >= today and not include_today):
                continue
            try:
                start = day_start(day)
            except ValueError:
                continue
            end = int(now) if day == today else start + DAY
            begin = min(max(start, int(since)), end)
            target = directory / "batches" / f"{day}.{begin}-{end}.{secrets.token_hex(4)}.jsonl"
            make_directory(target.parent)
            os.rename(journal / name, target)
        if include_today:
            atomic_write(_tmp(directory), directory / "since", b"%d\n" % int(now))
    return batches(directory)


def batches(directory: Path) -> list[Batch]:
    found = []
    folder = Path(directory) / "batches"
    for name in sorted(os.listdir(folder)) if folder.is_dir() else []:
        parts = name.split(".")
        if len(parts) != 4 or parts[3] != "jsonl":
            continue
        try:
            begin, end = (int(v) for v in parts[1].split("-"))
        except ValueError:
            continue
        found.append(Batch(folder / name, parts[0], begin, end))
    return found


def read_batch(batch: Batch) -> dict[str, dict[PolicyKey, Tally]]:
    """The batch's counts by policy domain; a torn or damaged line is skipped with a warning."""
    tallies: dict[PolicyKey, Tally] = {}
    skipped = decode_lines(batch.path.read_bytes(), tallies)
    if skipped:
        log.warn("TLS report journal {path}: {count} damaged line(s) skipped", path=str(batch.path), count=skipped)
    by_domain: dict[str, dict[PolicyKey, Tally]] = {}
    for key, tally in tallies.items():
        by_domain.setdefault(key[0], {})[key] = tally
    return by_domain


def done_domains(batch: Batch) -> set[str]:
    try:
        return set(batch.done_path.read_text("ascii").split())
    except FileNotFoundError:
        return set()


def mark_done(batch: Batch, domain: str) -> None:
    """`domain`'s reports from this batch are on their way (fsync'd: a crash never sends them twice)."""
    fd = os.open(batch.done_path, _APPEND, 0o600)
    try:
        write_all(fd, domain.encode("ascii", "replace") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def finish(batch: Batch) -> None:
    """Every domain of the batch is done: remove it."""
    for path in (batch.path, batch.done_path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _read_since(directory: Path) -> float:
    try:
        return float((directory / "since").read_text("ascii").strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0.0


def _tmp(directory: Path) -> Path:
    tmp = directory / "tmp"
    make_directory(tmp)
    return tmp


def report_lock(directory: Path, blocking: bool = False):
    """One report run at a time (the daily run and `mailrelay tlsrpt send`): a context manager yielding
    whether this process got the run."""
    return locked(Path(directory) / "report.lock", blocking)


def store_directory(spool: Path) -> Path:
    return Path(spool) / "tlsrpt"
