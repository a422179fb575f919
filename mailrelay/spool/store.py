# -*- test-case-name: tests.test_spool, tests.test_spool_crash, tests.test_queue_front -*-
"""The durable spool: where an accepted message waits between the SMTP session and its last delivery.

In: envelopes and message bytes from the session (new_message → write → commit), per-recipient state
from the scheduler (save_state), operator actions (hold/release/remove, control requests).
Out: complete messages for the delivery side (queue_ids, load → SpooledMessage.open()).

Durability (RFC 5321 §6.1: after 250 the message must survive a crash): commit() fires only after the
file, created under its final name in queue/, has its size written in place of the in-progress mark and
is fsync'd, and queue/ itself is fsync'd where the filesystem needs that for the new name (fsinfo.py).
Every fsync runs on the spool's own threads (threads.py), never on the reactor thread; a commit starts at
once when they are idle, and commits asked for while they are busy share, per reactor turn, one thread
job and one directory fsync (group commit). See files.py for the directory layout, message.py for the
file format, recovery.py for what startService() repairs, control.py for the CLI.

Threading: `reactor` (default: the global one) receives results from the pool and marks turn
boundaries; `clock` (default: the reactor) gives id timestamps and drives control polling. Without
startService() (the CLI on a stopped relay, scripts) every operation runs synchronously and returns an
already-fired Deferred.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.envelope import Envelope
from mailrelay.interfaces import ISpool, ISpoolControl
from mailrelay.logger import Logger
from mailrelay.spool import control, recovery
from mailrelay.spool.ids import QueueIdGenerator, is_valid_queue_id
from mailrelay.spool.files import (CommitJob, SpoolLocked, SpoolPaths, acquire_lock, atomic_write,
                                   commit_batch, create_file, ensure_directories, fsync_directory,
                                   is_locked, make_directory, unlink_quietly)
from mailrelay.spool.fsinfo import filesystem_type, names_durable_with_file_fsync
from mailrelay.spool.message import (CorruptMessage, InProgress, SpooledMessage, UnknownMessage, check_file,
                                     read_header_fd)
from mailrelay.spool.threads import BlockingThreads
from mailrelay.spool.writer import MessageWriter

FRESH_LIMIT = 10_000   # committed messages remembered for their first load()
REMOVAL_SYNC_DELAY = 0.1   # seconds a removal waits for others to share its directory fsync


# A spool with this many queue files or more at start is checked in a thread while the relay already
# listens (recovery.py); a smaller one at once (a few milliseconds), before anything is received.
RECOVER_IN_BACKGROUND = 1000


@implementer(ISpool, ISpoolControl)
class Spool(Service):
    _log = Logger()
    logs_queued = False     # IIncomingQueue: the server writes the "queued" line of what is committed here

    def __init__(self, directory: Path, clock=None, threadpool_size: int = 4, reactor=None,
                 owner: bool = True, directory_fsync: str = "auto") -> None:
        """`owner=False`: a second process of the same relay (the delivery process) — it neither takes the
        spool lock nor runs recovery; the owner, which holds the lock, did both before starting it.
        `directory_fsync` (`[queue] directory_fsync`): "always" fsyncs queue/ after every group commit;
        "auto" leaves that out where the filesystem makes a new file's name durable with the file's own
        fsync (ext4, XFS: fsinfo.py)."""
        if reactor is None:
            from twisted.internet import reactor
        self.directory = Path(directory)
        self.paths = SpoolPaths(self.directory)
        self._queue_dir, self._state_dir = str(self.paths.queue), str(self.paths.state)
        self._reactor = reactor
        self._clock = reactor if clock is None else clock
        self._threadpool_size = threadpool_size
        self._directory_fsync = directory_fsync
        self._sync_directory: Optional[bool] = None      # decided at start, for queue/'s filesystem
        self._owner = owner
        self._pool: Optional[BlockingThreads] = None
        self._lock_fd: Optional[int] = None
        self._ids = QueueIdGenerator(self._clock.seconds)
        self._batch: list[tuple[CommitJob, Deferred]] = []
        self._batch_call = None
        self._jobs = 0
        self._idle_waiters: list[Deferred] = []
        self._state_locks: dict[str, DeferredLock] = {}
        self._poller: Optional[control.RequestPoller] = None
        self.recovery_report: Optional[recovery.RecoveryReport] = None
        self.recovered: Optional[Deferred] = None    # fires with the report once start-up recovery is done
        # Messages committed by this process and not loaded yet: their first load() (the scheduler's, a
        # moment after the commit) is answered from memory instead of re-reading what we just wrote.
        self._fresh: dict[str, SpooledMessage] = {}
        # The directory fsync covering recent removals: a DelayedCall until it starts, then a Deferred.
        self._removal_sync: Optional[IDelayedCall | Deferred[None]] = None
        self._removal_dirs: set[Path] = set()             # directories changed by removals since
        self.batch_count = 0          # group commits run so far (for tests and metrics)
        self.largest_batch = 0

    # -- service ---------------------------------------------------------------------------------

    def startService(self) -> None:
        """Create the directories, take the spool lock (files.SpoolLocked if a relay already runs),
        start the thread pool and run recovery in it over the files a previous run left (`recovered` fires
        with its report, also kept in `recovery_report`)."""
        ensure_directories(self.paths)
        names = None
        if self._owner:
            self._lock_fd = acquire_lock(self.paths.lock)
            try:
                names = recovery.snapshot(self.paths)     # what a previous run left; nothing opened yet
                if len(names.queue) < RECOVER_IN_BACKGROUND:
                    self.recovered = succeed(self._report_recovery(recovery.recover(self.paths, names)))
                    names = None
            except BaseException:
                os.close(self._lock_fd)
                self._lock_fd = None
                raise
        self._pool = BlockingThreads(self._reactor, self._threadpool_size, "mailrelay-spool")
        self._pool.start()
        if names is not None:
            # Checked in a thread while the relay already listens (recovery.py: only these files).
            self.recovered = self._run_blocking(recovery.recover, self.paths, names)
            self.recovered.addCallbacks(self._report_recovery, self._recovery_failed)
        if self._owner:
            when = "yes" if self.sync_directory else "no (the file's own fsync makes its name durable)"
            self._log.info("spool: {queue} is on {fstype}; directory fsync after each commit: {when}",
                           queue=str(self.paths.queue), when=when,
                           fstype=filesystem_type(self.paths.queue) or "an unknown filesystem")
        Service.startService(self)

    def stopService(self) -> Deferred:
        """Stop polling, commit what is pending, wait for every thread job, stop the pool, unlock."""
        Service.stopService(self)
        if self._poller is not None:
            self._poller.stop()
            self._poller = None
        if self._batch_call is not None and self._batch_call.active():
            self._batch_call.cancel()
            self._flush_batch()
        if self._removal_sync is not None and not isinstance(self._removal_sync, Deferred):
            self._removal_sync.cancel()       # a clean stop leaves every removal on disk
            self._sync_removals()
        idle: Deferred[None] = Deferred()
        if self._jobs:
            self._idle_waiters.append(idle)
        else:
            idle.callback(None)
        return idle.addCallback(self._stop_pool)

    def _stop_pool(self, _: object) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @staticmethod
    def in_use(directory: Path) -> bool:
        """True when a running relay holds this spool (the CLI then posts requests instead of acting)."""
        return is_locked(SpoolPaths(Path(directory)).lock)

    def _report_recovery(self, report: "recovery.RecoveryReport") -> "recovery.RecoveryReport":
        for name, why in report.quarantined:
            self._log.warn("spool: {name} moved to corrupt/: {why}", name=name, why=why)
        if report.torn_temp_files or report.orphans_removed:
            self._log.info("spool recovery: {torn} files of messages never acknowledged, {orphans} orphan "
                           "files removed", torn=report.torn_temp_files, orphans=report.orphans_removed)
        self.recovery_report = report
        return report

    def _recovery_failed(self, failure: Failure) -> None:
        self._log.failure("spool: start-up recovery failed; the files it did not reach stay as they are",
                          failure)

    def recover(self) -> list[str]:
        """Repair the spool after a crash (see recovery.py) and return the ids to queue again, oldest
        first. startService() calls it; call it yourself only on a spool no process is using
        (files.SpoolLocked when a running relay holds it)."""
        if self.running:
            raise RuntimeError("recover() would discard messages being received; run it before start")
        if self._lock_fd is None and is_locked(self.paths.lock):
            raise SpoolLocked(f"{self.directory} is in use by a running relay; recover() refused")
        return list(self._report_recovery(recovery.recover(self.paths)).queued)

    # -- thread pool -----------------------------------------------------------------------------

    def _run_blocking(self, f: Callable, *args) -> Deferred:
        if self._pool is None:
            return maybeDeferred(f, *args)
        self._jobs += 1
        try:
            d = self._pool.run(f, *args)
        except Exception:       # a pool that will not take work: the caller's Deferred fails, never hangs
            d = fail()
        return d.addBoth(self._job_done)

    def run_blocking(self, f: Callable, *args) -> Deferred:
        """`f(*args)` on the spool's threads (synchronously before start); stopService waits for it."""
        return self._run_blocking(f, *args)

    def _job_done(self, result: object) -> object:
        self._jobs -= 1
        if self._jobs == 0 and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:     # next turn: after the job's own callbacks have run
                self._reactor.callLater(0, waiter.callback, None)
        return result

    # -- receiving (IIncomingQueue) --------------------------------------------------------------

    def new_message(self, envelope: Envelope) -> MessageWriter:
        if self._pool is None:
            ensure_directories(self.paths)
        return MessageWriter(self._ids.next_id(), envelope, self.paths, self._enqueue_commit)

    def _enqueue_commit(self, job: CommitJob) -> Deferred:
        d: Deferred[object] = Deferred()
        self._batch.append((job, d))
        if self._pool is None or (self._jobs == 0 and self._batch_call is None):
            self._flush_batch()       # nothing else on the disk: no reason to wait for the end of the turn
        elif self._batch_call is None:
            # Group commit: while the disk is busy, everything committed during this reactor turn goes in
            # one batch (one thread job, one directory fsync).
            self._batch_call = self._reactor.callLater(0, self._flush_batch)
        return d

    def _flush_batch(self) -> None:
        self._batch_call = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        self.batch_count += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        d = self._run_blocking(commit_batch, [job for job, _ in batch], self.paths.queue, self.sync_directory)
        d.addCallbacks(self._batch_done, self._batch_failed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _batch_done(self, results: list, batch: list) -> None:
        for (job, d), error in zip(batch, results):
            if error is None:
                self._remember_fresh(job)
                d.callback(None)
            else:
                self._log.error("spool: commit of {queue_id} failed: {error}", queue_id=job.queue_id,
                                error=repr(error))
                d.errback(Failure(error))

    def _batch_failed(self, failure: Failure, batch: list) -> None:
        self._log.failure("spool: group commit failed", failure)
        for _, d in batch:
            d.errback(failure)

    @property
    def sync_directory(self) -> bool:
        """Whether a group commit ends with an fsync of queue/ (`directory_fsync`, decided once)."""
        if self._sync_directory is None:
            self._sync_directory = (self._directory_fsync != "auto"
                                    or not names_durable_with_file_fsync(self.paths.queue))
        return self._sync_directory

    def take_fresh(self, queue_id: str) -> Optional[SpooledMessage]:
        """The message as this process just committed it — no state saved, no hold since — or None.
        What the scheduler calls first, a moment after the commit, instead of re-reading the file."""
        return self._fresh.pop(queue_id, None)

    def _remember_fresh(self, job: CommitJob) -> None:
        if job.envelope is not None:
            self.remember_fresh(SpooledMessage(job.queue_id, job.envelope, job.size, job.final_path,
                                               len(job.header)))

    def remember_fresh(self, message: SpooledMessage) -> None:
        """Offer a just-committed message to take_fresh(): our own commits, or (in the delivery process)
        those the main process describes down the pipe."""
        self._fresh[message.queue_id] = message
        while len(self._fresh) > FRESH_LIMIT:      # nobody is loading them: bounded all the same
            del self._fresh[next(iter(self._fresh))]

    # -- reading ---------------------------------------------------------------------------------

    def _checked(self, queue_id: str) -> str:
        if not is_valid_queue_id(queue_id):
            raise UnknownMessage(queue_id)
        return queue_id

    def exists(self, queue_id: str) -> bool:
        return is_valid_queue_id(queue_id) and self.paths.message(queue_id).is_file()

    def is_held(self, queue_id: str) -> bool:
        return is_valid_queue_id(queue_id) and self.paths.hold_flag(queue_id).exists()

    def queue_ids(self) -> list[str]:
        """Queue files, oldest first (ids sort by time), held ones included. A message still being
        received is listed too: load() raises message.InProgress (an UnknownMessage) for it."""
        try:
            names = os.listdir(self.paths.queue)
        except FileNotFoundError:
            return []
        return sorted(name for name in names if is_valid_queue_id(name))

    def load(self, queue_id: str, held: Optional[bool] = None) -> SpooledMessage:
        """The message's envelope, size, state and hold flag. message.CorruptMessage for a bad queue
        file or an unreadable state file; UnknownMessage (a KeyError) when there is no such message.
        `held`: the hold flag when the caller knows it already (held_ids()), saving a stat."""
        self._fresh.pop(queue_id, None)
        name = os.path.join(self._queue_dir, self._checked(queue_id))      # str: no pathlib per message
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UnknownMessage(queue_id) from None
        try:
            header = read_header_fd(fd)
        finally:
            os.close(fd)
        return SpooledMessage(queue_id, header.envelope, header.size, Path(name), header.data_offset,
                              self._read_state(queue_id), self.is_held(queue_id) if held is None else held)

    def held_ids(self) -> set[str]:
        """Every held message's id, from one listing of hold/ (a reader of the whole queue: `queue list`)."""
        try:
            return set(os.listdir(self.paths.hold))
        except FileNotFoundError:
            return set()

    def state_of(self, queue_id: str) -> dict:
        """The message's per-recipient state alone ({} before the first save), without opening the
        message; CorruptMessage when unreadable."""
        return self._read_state(self._checked(queue_id))

    def _read_state(self, queue_id: str) -> dict:
        try:
            fd = os.open(os.path.join(self._state_dir, queue_id + ".json"), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise CorruptMessage(f"state of {queue_id} unreadable: {e.__class__.__name__}") from None
        try:
            data = _read_all(fd)
            state = json.loads(data)
        except (OSError, ValueError) as e:
            # Only disk corruption gets here (writes are atomic). Never guess ({} would deliver to every
            # recipient again): the message stays in the spool, unloadable, for the postmaster.
            raise CorruptMessage(f"state of {queue_id} unreadable: {e.__class__.__name__}") from None
        finally:
            os.close(fd)
        if not isinstance(state, dict):
            raise CorruptMessage(f"state of {queue_id} is not a JSON object")
        return state

    # -- changing --------------------------------------------------------------------------------

    def save_state(self, queue_id: str, state: dict) -> Deferred:
        """Atomically replace the message's state file. Saves of one message are written in the order
        they were asked for; each Deferred fires once its own version is durable."""
        if not self.exists(queue_id):
            return fail(UnknownMessage(queue_id))
        self._fresh.pop(queue_id, None)
        try:
            data = json.dumps(state, separators=(",", ":"), sort_keys=True).encode("utf-8")
        except (TypeError, ValueError):
            return fail()
        lock = self._state_locks.setdefault(queue_id, DeferredLock())
        d = lock.run(self._run_blocking, atomic_write, self.paths.tmp, self.paths.state_file(queue_id), data)
        return d.addBoth(self._state_saved, queue_id, lock)

    def _state_saved(self, result: object, queue_id: str, lock: DeferredLock) -> object:
        if not lock.locked and not lock.waiting:
            self._state_locks.pop(queue_id, None)
        if not self.exists(queue_id):   # removed while we wrote: do not leave an orphan behind
            unlink_quietly(self.paths.state_file(queue_id))
        return result

    def remove(self, queue_id: str) -> Deferred:
        """Delete a message, its state and its hold flag (the Deferred fails with UnknownMessage if it is
        not there). The message goes first: a crash in between leaves an orphan state file, which recovery
        removes; the other order could leave a message without its state, delivered twice.

        The unlinks run in the thread pool (on a filesystem mounted with `discard` an unlink costs the
        reactor real time) and the Deferred fires once they are done: from then on the message is gone
        for every process and for a kill -9. Only a power loss before the directories reach the disk
        could bring it back — delivered again, never lost — so those fsyncs run in the background:
        REMOVAL_SYNC_DELAY after a removal, one fsync of each directory that changed covers every
        removal made meanwhile. Each directory fsync is a journal commit that a commit of new mail
        (whose 250 waits for it) would queue behind; one per message would double the disk's work."""
        self._fresh.pop(queue_id, None)
        d = self._run_blocking(_unlink_message, self.paths, self._checked(queue_id))
        d.addCallback(self._removed)
        return d

    def _removed(self, changed: set) -> None:
        self._removal_dirs |= changed
        if self._removal_sync is not None:
            return
        if self.running and self._pool is not None:
            self._removal_sync = self._clock.callLater(REMOVAL_SYNC_DELAY, self._sync_removals)
        else:
            self._sync_removals()       # stopping, or no thread pool (the CLI on a stopped relay): now

    def _sync_removals(self) -> None:
        directories, self._removal_dirs = tuple(sorted(self._removal_dirs)), set()
        self._removal_sync = self._run_blocking(_fsync_all, directories)
        self._removal_sync.addBoth(self._removals_synced)

    def _removals_synced(self, result: object) -> None:
        self._removal_sync = None
        if isinstance(result, Failure):
            self._log.failure("spool: fsync of the directories after removals failed", result)
        if self._removal_dirs:         # removed while that fsync ran: one more, after the delay
            self._removed(set())

    def hold(self, queue_id: str) -> Deferred:
        """Keep the message but stop delivering it, until release(). Persisted (a flag in hold/).
        UnknownMessage also for a message still being received: it is not in the queue yet."""
        if not self.exists(queue_id):
            raise UnknownMessage(queue_id)
        try:
            check_file(self.paths.message(queue_id))
        except InProgress:
            raise UnknownMessage(queue_id) from None
        except CorruptMessage:
            pass                  # held all the same: a human is looking at it
        self._fresh.pop(queue_id, None)
        try:
            os.close(create_file(self.paths.hold_flag(queue_id)))
        except FileExistsError:
            pass
        return self._run_blocking(fsync_directory, self.paths.hold)

    def release(self, queue_id: str) -> Deferred:
        if not self.exists(queue_id):
            raise UnknownMessage(queue_id)
        unlink_quietly(self.paths.hold_flag(queue_id))
        return self._run_blocking(fsync_directory, self.paths.hold)

    # -- suspension: every delivery stopped, persisted (a drain by `mailrelay queue transfer --hold`) --

    def suspension(self) -> Optional[dict]:
        """The suspension record, or None when deliveries run (an unreadable record counts as one:
        suspended is the safe reading of a file that says the postmaster stopped delivery)."""
        try:
            data = self.paths.suspended.read_bytes()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            return {"since": 0.0, "in_flight": None, "idle": False, "unreadable": True}
        return record if isinstance(record, dict) else {"since": 0.0, "in_flight": None, "idle": False}

    def set_suspension(self, record: Optional[dict]) -> None:
        if record is None:
            if unlink_quietly(self.paths.suspended):
                fsync_directory(self.paths.root)
            return
        make_directory(self.paths.tmp)
        atomic_write(self.paths.tmp, self.paths.suspended, json.dumps(record, sort_keys=True).encode())

    def forget_fresh(self, queue_id: str) -> None:
        self._fresh.pop(queue_id, None)

    # -- control channel (see control.py) --------------------------------------------------------

    @property
    def request_dir(self) -> Path:
        return self.paths.control

    def post_request(self, verb: str, queue_id: Optional[str] = None) -> Path:
        """CLI side: ask the running relay to act (e.g. "flush", "hold" + id)."""
        make_directory(self.paths.control)
        return control.post_request(self.paths.control, verb, queue_id)

    def take_requests(self) -> list[tuple[str, Optional[str]]]:
        """Relay side: pending (verb, queue id or None) requests, oldest first, each taken once."""
        return control.take_requests(self.paths.control)

    def watch_requests(self, handler: Callable[[str, Optional[str]], object],
                       interval: float = control.POLL_INTERVAL) -> control.RequestPoller:
        """Relay side: call handler(verb, queue_id) for each request, polling every `interval` seconds
        on the clock, until stopService()."""
        if self._poller is not None:
            self._poller.stop()
        self._poller = control.RequestPoller(self.take_requests, handler, self._clock, interval)
        self._poller.start()
        return self._poller


def _read_all(fd: int) -> bytes:
    """The whole of a small file (a state file is a few hundred bytes) from its descriptor."""
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _unlink_message(paths: SpoolPaths, queue_id: str) -> set[Path]:
    """Remove the message's files; the directories that changed."""
    if not unlink_quietly(paths.message(queue_id)):
        raise UnknownMessage(queue_id)
    changed = {paths.queue}
    if unlink_quietly(paths.state_file(queue_id)):
        changed.add(paths.state)
    if unlink_quietly(paths.hold_flag(queue_id)):
        changed.add(paths.hold)
    return changed


def _fsync_all(directories: tuple[Path, ...]) -> None:
    for directory in directories:
        fsync_directory(directory)
