# -*- test-case-name: tests.test_spool, tests.test_smtputf8 -*-
"""Receiving one message into the spool: the IMessageWriter the SMTP session writes DATA into.

In: the envelope, then the message bytes in pieces (CRLF lines, already un-dot-stuffed).  Out: a file
queue/<id>, marked in progress (message.IN_PROGRESS) until on commit() a CommitJob the Spool finishes in
its thread pool (the size written, file fsync, directory fsync) before the Deferred fires — only then may
the session answer 250 (RFC 5321 §4.1.1.4 and §6.1: once 250 is sent the relay is responsible for it).

Memory stays bounded: at most BUFFER_LIMIT bytes are held; beyond that they go to the file (plain
writes from the reactor thread, no fsync there). A message that fits in the buffer is not on disk at
all before its commit. Whether the content has 8-bit octets is noted as it is written (one `isascii`
per piece, in C) and stored in the envelope (`octets`), and so is whether a line is longer than 998
octets (`long_lines`; RFC 5321 4.5.3.1.6: delivery re-encodes such a message), and whether the header
block holds a non-ASCII octet (`utf8_headers`: with SMTPUTF8 declared, RFC 6532 UTF-8 header fields,
which only a next hop offering SMTPUTF8 may receive).  A file already on disk
gets the final envelope line written over its in-progress one at commit, padded to the same length with
spaces, which JSON ignores (`true` is one character shorter than the `false` written first).

A write error (disk full) is kept and reported by commit(), so the session can answer
451 4.3.0 (server/transaction.py) instead of seeing an exception in the middle of DATA.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable

from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from mailrelay.envelope import OCTETS_WIDTH, Envelope
from mailrelay.interfaces import IMessageWriter
from mailrelay.spool.message import encode_header
from mailrelay.spool.files import CommitJob, SpoolPaths, create_file, unlink_quietly, write_all

BUFFER_LIMIT = 64 * 1024
OCTETS_PENDING = "?" * OCTETS_WIDTH      # in the envelope of a file on disk until the commit says 7bit / 8bit
MAX_LINE = 998                           # octets without CRLF (RFC 5321 4.5.3.1.6, RFC 5322 2.1.1)


class LineWatch:
    """Whether any line of a stream given in pieces (split anywhere) is longer than MAX_LINE octets
    without its CRLF.  Pieces are looked at with C-level find/split, never byte by byte in Python."""

    def __init__(self) -> None:
        self.found = False
        self._run = 0            # octets of the line still open at the end of the last piece
        self._cr = False         # ... and whether its last octet is a CR

    STEP = (MAX_LINE + 1) // 2     # a run of 999 octets without LF holds a whole window of this many

    @classmethod
    def _inner(cls, data: bytes, first: int, last: int) -> bool:
        """Whether a line between the LFs at `first` and `last` is long: windows of STEP octets are
        probed for an LF (one C-level find each); only a window without one has its line measured."""
        at = first + 1
        while at + cls.STEP <= last:
            if data.find(b"\n", at, at + cls.STEP) >= 0:
                at += cls.STEP
                continue
            start = data.rfind(b"\n", first, at) + 1
            end = data.find(b"\n", at + cls.STEP, last + 1)
            if end - start - (data[end - 1] == 13) > MAX_LINE:      # 13: its CR is not content
                return True
            at = end + 1
        return False

    def feed(self, data: bytes) -> None:
        if self.found or not data:
            return
        last = data.rfind(b"\n")
        if last < 0:
            self._run += len(data)
            self._cr = data.endswith(b"\r")
            self.found = self._run > MAX_LINE + 1
            return
        if self._run + last > MAX_LINE:          # else no line up to the last LF can be long
            first = data.find(b"\n")
            cr = data[first - 1:first] == b"\r" if first else self._cr
            self.found = self._run + first - cr > MAX_LINE or self._inner(data, first, last)
        self._run = len(data) - last - 1
        self._cr = self._run > 0 and data.endswith(b"\r")
        self.found = self.found or self._run > MAX_LINE + 1


class HeaderWatch:
    """Whether the header block (up to the first empty line, RFC 5322 2.1) of a stream given in pieces
    holds a non-ASCII octet.  Looks only at the pieces before the block ends."""

    def __init__(self) -> None:
        self.found = False
        self._done = False
        self._tail = b""          # the last octets of the block so far: a CRLF CRLF may span two pieces

    def feed(self, data: bytes) -> None:
        if self._done or not data:
            return
        if not self._tail and data.startswith(b"\r\n"):
            self._done = True      # an empty line first: no header block at all
            return
        window = self._tail + data if self._tail else data
        end = window.find(b"\r\n\r\n")
        block = window if end < 0 else window[:end]
        self.found = not block.isascii()
        self._done = self.found or end >= 0
        self._tail = window[-3:]


@implementer(IMessageWriter)
class MessageWriter:
    """States: open → committing → committed | failed; open → aborted. Made by Spool.new_message()."""

    def __init__(self, queue_id: str, envelope: Envelope, paths: SpoolPaths,
                 enqueue_commit: Callable[[CommitJob], Deferred]) -> None:
        self.queue_id = queue_id
        self.envelope = envelope
        self._header = b""          # as first written to disk (a big message spills before its commit)
        self._eight_bit = False
        self._lines = LineWatch()
        self._head = HeaderWatch()
        self._final_path = paths.message(queue_id)
        self._enqueue_commit = enqueue_commit
        self._buffer = bytearray()
        self._fd: int | None = None
        self._size = 0
        self._error: OSError | None = None
        self.state = "open"

    @property
    def size(self) -> int:
        """Message bytes written so far."""
        return self._size

    @property
    def buffered(self) -> int:
        """Bytes held in memory right now (never more than BUFFER_LIMIT)."""
        return len(self._buffer)

    def write(self, data: bytes) -> None:
        if self.state != "open":
            raise RuntimeError(f"write to a message that is {self.state}")
        if self._error is not None:
            return
        self._size += len(data)
        if not self._eight_bit and not data.isascii():
            self._eight_bit = True
        self._lines.feed(data)
        self._head.feed(data)
        if len(self._buffer) + len(data) <= BUFFER_LIMIT:
            self._buffer += data
            return
        try:
            self._spill(data)
        except OSError as e:
            self._error = e
            self._discard()

    def _spill(self, data: bytes) -> None:
        if self._fd is None:
            self._fd = create_file(self._final_path)
            self._header = encode_header(replace(self.envelope, octets=OCTETS_PENDING, long_lines=False,
                                                 utf8_headers=False))
            write_all(self._fd, self._header)
        write_all(self._fd, self._buffer)
        self._buffer.clear()
        if len(data) <= BUFFER_LIMIT:
            self._buffer += data
        else:
            write_all(self._fd, data)     # a big piece goes straight through, never copied

    def _discard(self) -> None:
        self._buffer = bytearray()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        unlink_quietly(self._final_path)

    def commit(self) -> Deferred:
        """A Deferred firing with the queue id once the message is durable in queue/."""
        if self.state != "open":
            raise RuntimeError(f"commit of a message that is {self.state}")
        if self._error is not None:
            self.state = "failed"
            return fail(self._error)
        self.envelope = replace(self.envelope, octets="8bit" if self._eight_bit else "7bit",
                                long_lines=self._lines.found, utf8_headers=self._head.found)
        header = encode_header(self.envelope)
        if self._fd is not None:
            # OCTETS_WIDTH keeps `octets` the same length; `"long_lines":true` and `"utf8_headers":true`
            # are each one shorter than the `false` on disk: spaces before the envelope line's newline
            # (JSON whitespace) make up for it.
            short = len(self._header) - len(header)
            if not 0 <= short <= 2:
                raise AssertionError("spool header changed length")
            header = header[:-1] + b" " * short + b"\n"
        job = CommitJob(self.queue_id, self._fd, header, bytes(self._buffer), self._size,
                        self._final_path, self.envelope)
        self._fd, self._buffer = None, bytearray()   # the job owns the file descriptor now
        self.state = "committing"
        d = self._enqueue_commit(job)
        d.addCallbacks(self._committed, self._failed)
        return d

    def _committed(self, _: object) -> str:
        self.state = "committed"
        return self.queue_id

    def _failed(self, failure):
        self.state = "failed"
        return failure

    def abort(self) -> None:
        """Throw the message away. Idempotent; a no-op once commit() was called, since the message may
        already be durable (a lost 250 means a possible duplicate, never a lost message)."""
        if self.state in ("open", "failed"):
            self._discard()
            if self.state == "open":
                self.state = "aborted"
