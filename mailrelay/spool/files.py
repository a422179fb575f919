# -*- test-case-name: tests.test_spool, tests.test_spool_crash, tests.test_spool_threads -*-
"""The spool's directories and the blocking file operations on them (fsync, rename, unlink).

In: paths and bytes.  Out: durable files.  Everything here blocks and is thread-safe (no shared state):
the Spool service calls these from its thread pool, never from the reactor thread, whenever they fsync.
Size written, file fsync'd, queue/ fsync'd: only then may the session answer 250 (RFC 5321 §6.1: a
relay that has accepted a message must not lose it, even in a crash).

Layout under the spool directory (each 0700, files 0600):
    tmp/      state files being written (anything here at start is torn)
    queue/    one file per queue id (see message.py for the format): complete messages, and messages
              being received, created in place and marked in-progress in their size field until the
              commit writes the size and fsyncs them
    state/    <id>.json: the scheduler's per-recipient delivery state, replaced atomically
    hold/     <id>: an empty flag file; a held message is kept but not delivered
    corrupt/  queue files recovery could not read (kept for a human, never deleted)
    control/  requests from the `mailrelay queue` CLI to the running relay (see control.py)
    lock      flock()ed by the running relay, so a second relay (or a CLI) can tell it is running
"""
from __future__ import annotations

import fcntl
import os
import secrets
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

from mailrelay.envelope import Envelope
from mailrelay.spool.message import SIZE_OFFSET, encode_size

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


class SpoolLocked(RuntimeError):
    """Another process (a running relay) holds the spool lock."""


@dataclass(frozen=True)
class SpoolPaths:
    """Every path of the spool; the directories are computed once (a path join per message adds up)."""
    root: Path

    @cached_property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @cached_property
    def queue(self) -> Path:
        return self.root / "queue"

    @cached_property
    def state(self) -> Path:
        return self.root / "state"

    @cached_property
    def hold(self) -> Path:
        return self.root / "hold"

    @cached_property
    def corrupt(self) -> Path:
        return self.root / "corrupt"

    @cached_property
    def control(self) -> Path:
        return self.root / "control"

    @cached_property
    def suspended(self) -> Path:
        return self.root / "suspended"

    @cached_property
    def lock(self) -> Path:
        return self.root / "lock"

    def directories(self) -> tuple[Path, ...]:
        return (self.tmp, self.queue, self.state, self.hold, self.corrupt, self.control)

    def message(self, queue_id: str) -> Path:
        return self.queue / queue_id

    def state_file(self, queue_id: str) -> Path:
        return self.state / f"{queue_id}.json"

    def hold_flag(self, queue_id: str) -> Path:
        return self.hold / queue_id



def make_directory(path: Path) -> None:
    """Create `path` with mode 0700 (exactly, whatever the umask) unless it exists."""
    try:
        os.mkdir(path, DIRECTORY_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIRECTORY_MODE)


def ensure_directories(paths: SpoolPaths) -> None:
    if not paths.root.exists():
        paths.root.mkdir(parents=True, exist_ok=True)
        os.chmod(paths.root, DIRECTORY_MODE)
    for directory in paths.directories():
        make_directory(directory)


def create_file(path: Path) -> int:
    """A new file, 0600, opened for writing; fails if the name exists."""
    return os.open(path, _CREATE, FILE_MODE)


def write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_directory(path: Path) -> None:
    """Make the directory's entries (a rename, a new or removed name) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path) -> bool:
    """Remove a file if it is there; True when something was removed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def atomic_write(tmp_dir: Path, final: Path, data: bytes) -> None:
    """Replace `final` with `data`: write a temp file, fsync it, rename over `final`, fsync the directory.
    A crash leaves either the old content or the new, never a mixture."""
    tmp = tmp_dir / f"{final.name}.{secrets.token_hex(6)}.tmp"
    fd = create_file(tmp)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(tmp)
        raise
    os.close(fd)
    os.rename(tmp, final)
    fsync_directory(final.parent)


@dataclass(frozen=True)
class CommitJob:
    """One message's last step, handed to the thread pool: what is still to write and where it goes."""
    queue_id: str
    fd: Optional[int]       # the file in queue/ (a big message spilled there), or None: all still in `pending`
    header: bytes           # in-progress header with the final envelope: written first when fd is None (the
                            # file does not exist yet), else over the one on disk (the same length)
    pending: bytes
    size: int
    final_path: Path
    envelope: Optional[Envelope] = None   # kept so the spool can answer load() from memory


def finish_message(job: CommitJob) -> None:
    """Write the rest, put the size in place of the in-progress mark, fsync, close. The file was created
    under its final name in queue/, so this one fsync also carries its directory entry to the journal; the
    batch's directory fsync (commit_batch) makes that entry durable by POSIX's rules too."""
    fd, data = job.fd, job.pending
    if fd is None:
        fd = create_file(job.final_path)     # FileExistsError: someone else's file, left alone
        data = job.header + job.pending
    try:
        write_all(fd, data)
        if job.fd is not None:
            os.pwrite(fd, job.header, 0)     # the final envelope (octets known now), still marked in progress
        os.pwrite(fd, encode_size(job.size), SIZE_OFFSET)
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_batch(jobs: list[CommitJob], queue_dir: Path,
                 sync_directory: bool = True) -> list[Optional[Exception]]:
    """Group commit: each file completed and fsync'd, then ONE fsync of queue/ for the whole batch —
    unless `sync_directory` is False, on a filesystem where each file's own fsync made its name durable
    (fsinfo.py). Returns, per job, None (durable) or the exception that stopped it (its file is removed)."""
    results: list[Optional[Exception]] = []
    done = []
    for job in jobs:
        try:
            finish_message(job)
        except FileExistsError as e:
            results.append(e)
        except Exception as e:
            unlink_quietly(job.final_path)
            results.append(e)
        else:
            done.append(job)
            results.append(None)
    if done and sync_directory:
        try:
            fsync_directory(queue_dir)
        except OSError as e:
            # Not known to be durable: take the messages back, so that the client's retry after our
            # 4xx does not turn into a second copy (RFC 5321 §6.1: no 250 until the message is safe).
            for job in done:
                unlink_quietly(job.final_path)
            results = [e if r is None else r for r in results]
    return results


def acquire_lock(path: Path) -> int:
    """flock() the spool for this process; the kernel drops it when the process dies (even by SIGKILL)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolLocked(f"{path.parent} is in use by another process") from None
    return fd


def is_locked(path: Path) -> bool:
    """True when some process (a running relay) holds the spool lock."""
    try:
        fd = acquire_lock(path)
    except SpoolLocked:
        return True
    except FileNotFoundError:
        return False
    os.close(fd)
    return False
