# -*- test-case-name: tests.test_spool_crash, tests.test_spool -*-
"""Start-up recovery: make the spool consistent after a crash, without ever deleting mail.

In: a spool directory left by a relay that stopped in any way (SIGKILL, power loss).  Out: the ids of the
complete messages, to be queued again, and a report of what was cleaned.

- tmp/ holds only state files never renamed into place: removed.
- queue/ files still marked in progress (message.IN_PROGRESS, or not even a whole first line) were being
  received: no 250 was sent for them (it follows the size, the fsync and the directory fsync): removed.
- queue/ files that fail the format check otherwise (message.py) or have a foreign name go to corrupt/.
- state/ and hold/ entries without a message are orphans of a remove() cut short: removed (the state of
  a quarantined message goes to corrupt/ with it).
Blocking.  Run against the whole spool only before the relay starts receiving, never from the CLI
against a running relay (it would throw away the files of messages being received).  A relay starting
over a deep queue takes a `snapshot()` of the directories first (three listdirs: nothing opened) and
runs `recover(paths, snapshot)` in a thread while it already listens: only the files that existed
before it started are looked at, so the messages it receives meanwhile are never touched, and a
leftover in-progress or corrupt file is harmless until then (the spool's readers skip InProgress files
as not there yet, and report a corrupt one).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mailrelay.spool.ids import is_valid_queue_id
from mailrelay.spool.message import CorruptMessage, InProgress, check_file
from mailrelay.spool.files import SpoolPaths, ensure_directories, fsync_directory, unlink_quietly


@dataclass(frozen=True)
class RecoveryReport:
    queued: tuple[str, ...]                  # complete messages, oldest first
    quarantined: tuple[tuple[str, str], ...]  # (queue file name, why) moved to corrupt/
    torn_temp_files: int                      # tmp/ files and queue/ files still in progress, removed
    orphans_removed: int


def _entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


@dataclass(frozen=True)
class Snapshot:
    """The names in each spool directory at one moment (before the relay received anything)."""
    tmp: tuple[str, ...]
    queue: tuple[str, ...]
    state: tuple[str, ...]
    hold: tuple[str, ...]


def snapshot(paths: SpoolPaths) -> Snapshot:
    ensure_directories(paths)
    return Snapshot(*(tuple(_entries(d)) for d in (paths.tmp, paths.queue, paths.state, paths.hold)))


def _quarantine(paths: SpoolPaths, source: Path) -> None:
    target = paths.corrupt / source.name
    n = 0
    while os.path.lexists(target):
        n += 1
        target = paths.corrupt / f"{source.name}.{n}"
    try:
        os.rename(source, target)
    except FileNotFoundError:
        pass                              # delivered and removed since the snapshot: nothing to keep


def _empty_tmp(paths: SpoolPaths, names: tuple[str, ...]) -> int:
    count = 0
    for name in names:
        path = paths.tmp / name
        if path.is_file() or path.is_symlink():
            count += unlink_quietly(path)
        else:
            _quarantine(paths, path)      # not ours to delete: keep it for a human
    return count


def _check_queue(paths: SpoolPaths, names: tuple[str, ...]) -> tuple[list[str], list[tuple[str, str]], int]:
    queued, quarantined, torn = [], [], 0
    for name in names:
        path = paths.queue / name
        try:
            if not is_valid_queue_id(name) or path.is_symlink() or not path.is_file():
                raise CorruptMessage("not a queue file name")
            check_file(path)
        except InProgress:
            torn += unlink_quietly(path)      # being received when we stopped: never acknowledged
        except CorruptMessage as e:
            if not os.path.lexists(path):
                continue                  # delivered and removed since the snapshot
            _quarantine(paths, path)
            quarantined.append((name, str(e)))
        else:
            queued.append(name)
    return queued, quarantined, torn


def _prune(paths: SpoolPaths, directory: Path, names: tuple[str, ...], suffix: str, keep: set[str],
           quarantined: set[str]) -> int:
    removed = 0
    for name in names:
        queue_id = name[: len(name) - len(suffix)] if name.endswith(suffix) else ""
        if queue_id in keep:
            continue
        if queue_id in quarantined or not (directory / name).is_file():
            _quarantine(paths, directory / name)
        else:
            removed += unlink_quietly(directory / name)
    return removed


def recover(paths: SpoolPaths, names: "Snapshot | None" = None) -> RecoveryReport:
    """Repair the spool; with `names`, only the files listed there (see the module's docstring)."""
    names = names if names is not None else snapshot(paths)
    torn = _empty_tmp(paths, names.tmp)
    queued, quarantined, cut_short = _check_queue(paths, names.queue)
    torn += cut_short
    keep, lost = set(queued), {name for name, _ in quarantined}
    orphans = (_prune(paths, paths.state, names.state, ".json", keep, lost)
               + _prune(paths, paths.hold, names.hold, "", keep, lost))
    for directory in (paths.tmp, paths.queue, paths.state, paths.hold, paths.corrupt):
        fsync_directory(directory)
    return RecoveryReport(tuple(queued), tuple(quarantined), torn, orphans)
