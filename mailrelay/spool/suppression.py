# -*- test-case-name: tests.test_suppression, tests.test_cluster_session, tests.test_cluster_link -*-
"""The suppression list: recipients that failed for good, refused at RCPT until they expire or are removed.

Place in the journey: beside the spool, shared by both ends.  Delivery (outcomes.py, through
`SuppressionRecorder`) adds a recipient whose delivery failed permanently with an RFC 3463 status of
5.1.x (bad destination address) or 5.2.1 (mailbox disabled); the receiving side (server/transaction.py)
asks `SuppressionList.refusal` at every RCPT; `mailrelay suppression list|add|remove` (cli/suppression.py)
reads and changes it, with the relay running or stopped.

On disk: `<spool>/suppression.jsonl`, an append-only journal of JSON lines, one record each:

    {"v": 1, "op": "add", "address": "bob@example.net", "since": 1767225600.0,
     "reply": "550 5.1.1 User unknown", "remote_host": "mx.example.net", "queue_id": "...",
     "source": "bounce" | "operator", "reason": "operator's text"}
    {"v": 1, "op": "remove", "address": "bob@example.net", "time": 1767229200.0}

The last record of an address wins.  Every writer (the delivery process, the receiving process at
compaction, the CLI) takes an exclusive flock(2) on `<spool>/suppression.lock` for its append, writes its
records with one write(2) and fsyncs before it lets go, so records of several processes never mix.  A
line a crash tore (no newline at its end, or not JSON) is skipped on reading, and the next writer starts
a new line after it.  Readers need no lock: they read only up to the last newline.  The owner (the
receiving process) compacts the journal at start, and again when it holds twice as many records as live
entries: the live entries are written to `suppression.jsonl.new`, fsync'd and renamed over the journal
(then the directory fsync'd), so a crash leaves the old journal or the new one, never half of one.

Expiry is `since + [suppression] duration`, computed when asked: a changed duration applies to the
entries already listed.  Addresses compare with the domain case-insensitively (in ASCII, internationalised
domains by their A-label) and the local part exactly (RFC 5321 §2.4: only the destination host may
interpret it).  The receiving process sees changes by polling: one stat(2) a second (`REFRESH_INTERVAL`),
reading only what was appended since, or the whole journal again when it was replaced.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from twisted.application import service
from twisted.internet import defer, task
from zope.interface import implementer

from mailrelay.idn import domain_key
from mailrelay.interfaces import ISuppressionCheck, Reply
from mailrelay.logger import Logger
from mailrelay.spool.files import FILE_MODE, fsync_directory, write_all
from mailrelay.crossthread import read_unlocked

JOURNAL = "suppression.jsonl"
LOCK = "suppression.lock"
REFRESH_INTERVAL = 1.0        # seconds between the receiving process's stat()s of the journal
COMPACT_MIN_RECORDS = 1000    # below this many records the journal is only compacted at start
RECORD_VERSION = 1
REPLY_QUOTE_LIMIT = 200       # characters of the remote reply quoted in our RCPT refusal
# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets with its CRLF; "550 5.1.1 " takes 10.
TEXT_LIMIT = 512 - 2 - 10

log = Logger(namespace="mailrelay.suppression")


def address_key(address: str) -> str:
    """The form addresses are compared in: local part exact, domain lower-cased (IDNA A-label)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    return f"{local}@{domain_key(domain)}"       # RFC 5890: U-label and A-label are one domain


def suppresses(code: int, status: str, sender_refused: bool = False) -> bool:
    """True when a permanent failure says the recipient address itself is bad: RFC 3463 X.1.x (address
    status) but X.1.7 and X.1.8 (those are about the sender), or X.2.1 (mailbox disabled).  A refusal of
    MAIL FROM settles every recipient with the sender's reply: it says nothing about them."""
    if sender_refused or not 500 <= code < 600:
        return False
    if status == "5.2.1":
        return True
    return status.startswith("5.1.") and status not in ("5.1.7", "5.1.8")


def clean_text(text: str, limit: int) -> str:
    """Printable ASCII only (others become "?"), at most `limit` characters: safe in a reply or a log."""
    text = "".join(c if " " <= c <= "~" else "?" for c in str(text))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def utc(seconds: float) -> str:
    """1767225600.0 -> "2026-01-01 00:00:00 UTC"."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@dataclass(frozen=True)
class Entry:
    """One suppressed address: since when, and why (the next hop's reply, or an operator's reason)."""
    address: str
    since: float
    reply: str = ""               # "550 5.1.1 User unknown" (source "bounce")
    remote_host: str = ""
    queue_id: str = ""
    source: str = "bounce"        # "bounce" | "operator"
    reason: str = ""              # the operator's --reason

    def why(self) -> str:
        if self.source == "operator":
            return "added by an operator" + (f": {self.reason}" if self.reason else "")
        where = f" from {self.remote_host}" if self.remote_host else ""
        return f'after "{clean_text(self.reply, REPLY_QUOTE_LIMIT)}"{where}'

    def record(self) -> dict:
        return {"v": RECORD_VERSION, "op": "add", **asdict(self)}

    @classmethod
    def from_record(cls, data: dict) -> "Entry":
        return cls(address=str(data["address"]), since=float(data["since"]), reply=str(data.get("reply", "")),
                   remote_host=str(data.get("remote_host", "")), queue_id=str(data.get("queue_id", "")),
                   source=str(data.get("source", "bounce")), reason=str(data.get("reason", "")))


def _line(record: dict) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


@implementer(ISuppressionCheck)
class SuppressionList:
    """The journal in `directory` (the spool), as of the last refresh.  `duration`: seconds an entry is
    in force; `clock`: IReactorTime-like (`seconds()`), the time entries are stamped and expired by."""

    def __init__(self, directory: Path, duration: float, clock=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.directory = Path(directory)
        self.path = self.directory / JOURNAL
        self.duration = duration
        self._clock = clock
        self._entries: dict[str, Entry] = {}
        self._identity: Optional[tuple[int, int]] = None   # (st_dev, st_ino) of the journal read
        self._offset = 0             # bytes of it read, up to the last newline
        self.records = 0             # records read (the live ones and those they replaced)
        self.skipped = 0             # unreadable lines (torn by a crash, or not ours)
        # Told of each record appended since the last refresh (not of a first read, nor of a re-read
        # after a compaction): how new entries reach a shared list (cluster.shared.publish).
        self.on_record: Optional[Callable[[dict], None]] = None
        self._started = False        # a first refresh has read what was there

    # -- reading ----------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Read what was appended since the last refresh (or the whole journal, if it was replaced);
        True when anything was read.  Never raises for a missing journal (an empty list)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._started = True         # whatever is appended from now on is news
            changed = bool(self._entries) or self._identity is not None
            self._reset(None)
            return changed
        replaced = False
        # Appended records are news unless this is the first read, or a compacted journal read again.
        news = self._started
        self._started = True
        try:
            st = os.fstat(fd)
            identity = (st.st_dev, st.st_ino)
            if identity != self._identity or st.st_size < self._offset:
                news = news and self._identity is None
                replaced = bool(self._entries) or self._identity is not None
                self._reset(identity)
            if st.st_size == self._offset:
                return replaced
            data = os.pread(fd, st.st_size - self._offset, self._offset)
        finally:
            os.close(fd)
        whole = data[:data.rfind(b"\n") + 1]      # a line still being written waits for its newline
        self._offset += len(whole)
        for line in whole.splitlines():
            record = self._apply(line)
            if news and record is not None and self.on_record is not None:
                try:
                    self.on_record(record)
                except Exception:
                    log.failure("suppression list {path}: sharing a record failed", path=str(self.path))
        return replaced or bool(whole)

    def _reset(self, identity: Optional[tuple[int, int]]) -> None:
        self._entries, self._identity, self._offset, self.records, self.skipped = {}, identity, 0, 0, 0

    def _apply(self, line: bytes) -> Optional[dict]:
        if not line.strip():
            return None
        try:
            data = json.loads(line)
            key = address_key(str(data["address"]))
            if data["op"] == "add":
                self._entries[key] = Entry.from_record(data)
            elif data["op"] == "remove":
                self._entries.pop(key, None)
            else:
                raise ValueError(f"unknown op {data['op']!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self.skipped += 1
            log.warn("suppression list {path}: unreadable line skipped ({error})", path=str(self.path),
                     error=clean_text(str(e), 100))
            return None
        self.records += 1
        return data

    def expires(self, entry: Entry) -> float:
        return entry.since + self.duration

    def lookup(self, address: str) -> Optional[Entry]:
        """The entry in force for `address`, from memory (as of the last refresh), or None."""
        entry = self._entries.get(address_key(address))
        if entry is None or self.expires(entry) <= self._clock.seconds():
            return None
        return entry

    def entries(self) -> list[Entry]:
        """Every entry in force, oldest first."""
        now = self._clock.seconds()
        return sorted((e for e in self._entries.values() if self.expires(e) > now), key=lambda e: e.since)

    def size(self) -> int:
        """Entries in force (read by the metrics collector from another thread: a copy is taken first)."""
        entries = read_unlocked(lambda: list(self._entries.values()), None)
        if entries is None:
            return 0
        now = self._clock.seconds()
        return sum(1 for e in entries if e.since + self.duration > now)

    def refusal(self, address: str) -> Optional[Reply]:
        """550 5.1.1 naming since when and why, for an address in force; None otherwise."""
        entry = self.lookup(address)
        return None if entry is None else self.refusal_for(address, entry)

    def refusal_for(self, address: str, entry: Entry) -> Reply:
        """The 550 5.1.1 for `address` suppressed by `entry` (this list's, or a shared one)."""
        # RFC 3463 X.1.1: the destination mailbox address does not exist (as far as we know, it did not).
        text = (f"<{clean_text(address, 254)}>: suppressed since {utc(entry.since)} {entry.why()}; "
                f"until {utc(self.expires(entry))}")
        return Reply(550, "5.1.1", clean_text(text, TEXT_LIMIT))

    # -- writing (blocking: fsync) ------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            _own_like_directory(fd, self.directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)          # and the lock with it

    def append(self, records: list[dict]) -> None:
        """Append `records` durably (one write, one fsync), under the writers' lock."""
        if not records:
            return
        data = b"".join(_line(r) for r in records)
        with self._locked():
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            try:
                if created:
                    _own_like_directory(fd, self.directory)
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data        # a line torn by a crash stays a line of its own (skipped)
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_directory(self.directory)

    def add(self, address: str, source: str = "operator", reason: str = "", reply: str = "",
            remote_host: str = "", queue_id: str = "", since: Optional[float] = None) -> Entry:
        entry = Entry(address, self._clock.seconds() if since is None else since, reply, remote_host, queue_id,
                      source, reason)
        self.append([entry.record()])
        return entry

    def remove(self, address: str) -> Optional[Entry]:
        """Lift the suppression of `address` (durably); the entry that was in force, or None (then
        nothing is written)."""
        self.refresh()
        entry = self.lookup(address)
        if entry is not None:
            self.append([{"v": RECORD_VERSION, "op": "remove", "address": address_key(address),
                          "time": self._clock.seconds()}])
        return entry

    def compact(self) -> int:
        """Rewrite the journal with only the entries in force (atomically: new file, fsync, rename);
        returns how many it kept.  Called by the owner at start and when the journal has grown."""
        with self._locked():
            self._reset(None)
            self._started = False        # what the compaction reads again is no news
            self.refresh()
            if self._identity is None:
                return 0
            live = self.entries()
            new = self.directory / (JOURNAL + ".new")
            fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
            try:
                _own_like_directory(fd, self.directory)
                write_all(fd, b"".join(_line(e.record()) for e in live))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(new, self.path)
            fsync_directory(self.directory)
        self._started = False
        self.refresh()
        return len(live)

    def wants_compaction(self) -> bool:
        return self.records >= COMPACT_MIN_RECORDS and self.records > 2 * max(1, len(self._entries))


def _own_like_directory(fd: int, directory: Path) -> None:
    """Run as root (the CLI, say), give a file we made the spool directory's owner, so the relay's own
    user can still read and lock it."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(directory)
        os.fchown(fd, st.st_uid, st.st_gid)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOENT):
            raise


class SuppressionRecorder:
    """The delivery side: `note()` each permanent failure; those that suppress are appended in batches,
    off the reactor thread (`run_blocking`, e.g. the spool's threads, whose stop waits for them), one
    fsync per batch, and logged once durable."""

    def __init__(self, journal: SuppressionList, run_blocking: Optional[Callable[..., defer.Deferred]] = None):
        self.journal = journal
        self._run = run_blocking or (lambda f, *args: defer.maybeDeferred(f, *args))
        self._pending: list[Entry] = []
        self._busy = False
        self._idle: list[defer.Deferred] = []

    def note(self, recipient: str, code: int, status: str, text: str, remote_host: str = "", queue_id: str = "",
             sender_refused: bool = False) -> bool:
        """Record a permanent failure of `recipient`; True when it suppresses the address."""
        if not suppresses(code, status, sender_refused):
            return False
        reply = clean_text(f"{code} {status} {text}".strip(), REPLY_QUOTE_LIMIT)
        self._pending.append(Entry(recipient, self.journal._clock.seconds(), reply, remote_host, queue_id))
        if not self._busy:
            self._flush()
        return True

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._busy = True
        try:
            d = self._run(self.journal.append, [e.record() for e in batch])
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._written, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))
        d.addBoth(self._done)

    def _written(self, _, batch: list[Entry]) -> None:
        for entry in batch:
            log.info("{queue_id}: {recipient} suppressed for {days:g} days after {reply}", queue_id=entry.queue_id
                     or "-", recipient=entry.address, days=round(self.journal.duration / 86400, 2),
                     reply=entry.reply, stage="suppressed")

    def _failed(self, failure, batch: list[Entry]) -> None:
        log.failure("cannot write the suppression list {path}; not suppressed: {recipients}", failure,
                    path=str(self.journal.path), recipients=[e.address for e in batch])

    def _done(self, _) -> None:
        self._busy = False
        if self._pending:
            self._flush()
        elif self._idle:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def wait(self) -> defer.Deferred:
        """Fires once every noted failure is written (or its write failed)."""
        if not self._busy and not self._pending:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d


class SuppressionWatcher(service.Service):
    """The receiving side: compacts the journal at start, then re-reads it when it changes (one stat a
    `interval`), compacting again once it has grown to twice its live entries.  `journal.refusal` is
    what RCPT asks; `journal.size` what the metrics gauge reads."""

    def __init__(self, journal: SuppressionList, clock=None, interval: float = REFRESH_INTERVAL):
        self.journal = journal
        self._loop = task.LoopingCall(self.poll)
        self._loop.clock = clock if clock is not None else journal._clock
        self._interval = interval

    def startService(self) -> None:
        super().startService()
        try:
            kept = self.journal.compact()
            log.info("suppression list {path}: {kept} address(es) suppressed for {days:g} days",
                     path=str(self.journal.path), kept=kept, days=round(self.journal.duration / 86400, 2))
        except OSError:
            log.failure("suppression list {path}: cannot compact; read as it is", path=str(self.journal.path))
        self._loop.start(self._interval, now=True)

    def poll(self) -> None:
        try:
            self.journal.refresh()
            if self.journal.wants_compaction():
                self.journal.compact()
        except OSError:
            log.failure("suppression list {path}: cannot read", path=str(self.journal.path))

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
