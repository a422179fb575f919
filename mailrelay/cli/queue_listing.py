# -*- test-case-name: tests.test_queue_listing -*-
"""`mailrelay queue list` for a queue of any depth: each line written as its message is read (memory does
not grow with the queue), and a deep queue read by two processes at once.

What it costs is reading: every message's queue-file header and state file, two opens and two JSON
parses, some 40 µs of Python each.  Past PARALLEL_FROM messages, with a second core, a forked child
reads the newer half into an unlinked temporary file while this process reads and prints the older half;
then the child's lines follow, so the output is the same, in the same order, as one process gives.
Should the child fail, this process reads its half itself.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, TextIO

from mailrelay.cli.queue_format import QueueEntry, list_line, paused_note

PARALLEL_FROM = 4000        # below this one process is quicker than a fork and a second pass over a file


@dataclass
class Summary:
    """What the last line of `queue list` says: how many messages, how many held, the oldest arrival."""
    count: int = 0
    held: int = 0
    oldest: Optional[float] = None

    def add(self, entry: QueueEntry) -> None:
        self.count += 1
        self.held += entry.held
        if entry.envelope is not None:
            arrived = entry.envelope.received_at
            self.oldest = arrived if self.oldest is None else min(self.oldest, arrived)

    def merge(self, other: "Summary") -> None:
        self.count += other.count
        self.held += other.held
        if other.oldest is not None:
            self.oldest = other.oldest if self.oldest is None else min(self.oldest, other.oldest)


Reader = Callable[[str], Optional[QueueEntry]]


def write_lines(ids: Iterable[str], read: Reader, now: float, paused: dict[str, float], out: TextIO) -> Summary:
    """One line per message of `ids` that `read` still finds (a message delivered since the listing is
    left out), written to `out` as it is read."""
    summary = Summary()
    lines: list[str] = []
    for queue_id in ids:
        entry = read(queue_id)
        if entry is None:
            continue
        summary.add(entry)
        lines.append(list_line(entry, now) + paused_note(entry, paused, now))
        if len(lines) >= 256:
            out.write("\n".join(lines) + "\n")
            lines.clear()
    if lines:
        out.write("\n".join(lines) + "\n")
    return summary


def list_queue(ids: list[str], read: Reader, now: float, paused: dict[str, float], out: TextIO,
               parallel: Optional[bool] = None) -> Summary:
    """Every message's line on `out`, oldest first; the summary of them all.  `parallel`: None decides
    by depth and core count."""
    if parallel is None:
        parallel = len(ids) >= PARALLEL_FROM and (os.cpu_count() or 1) > 1
    if not parallel or len(ids) < 2:
        return write_lines(ids, read, now, paused, out)
    half = len(ids) // 2
    older, newer = ids[:half], ids[half:]
    out.flush()                       # nothing buffered may be written twice, by both processes
    spill = tempfile.TemporaryFile("w+", encoding="utf-8", errors="backslashreplace")
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:                      # the child: the newer half into the file, its summary up the pipe
        status = 1
        try:
            os.close(report_r)
            theirs = write_lines(newer, read, now, paused, spill)
            spill.flush()
            os.write(report_w, json.dumps([theirs.count, theirs.held, theirs.oldest]).encode("ascii"))
            status = 0
        finally:
            os._exit(status)          # never return into the parent's code (atexit, the reactor)
    os.close(report_w)
    summary = write_lines(older, read, now, paused, out)
    report = _read_pipe(report_r)
    _, status = os.waitpid(pid, 0)
    if status != 0 or not report:     # the child failed: read its half here
        spill.close()
        summary.merge(write_lines(newer, read, now, paused, out))
        return summary
    count, held, oldest = json.loads(report)
    summary.merge(Summary(count, held, oldest))
    out.flush()
    with spill:
        spill.seek(0)
        while chunk := spill.read(1 << 20):
            out.write(chunk)
    return summary


def _read_pipe(fd: int) -> bytes:
    chunks: list[bytes] = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)
