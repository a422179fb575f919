# -*- test-case-name: tests.test_spool, tests.test_delivery_process -*-
"""The queue file format, and a spooled message as the delivery side sees it.

In: an envelope.Envelope and the message bytes.  Out: one file per message, no pickle:

    MAILRELAY-SPOOL/1 size=00000000000000001234\\n     magic, format version, message size (20 digits)
    {"recipients":[...],"sender":...}\\n               Envelope.to_json(), one line (JSON escapes newlines)
    <exactly `size` bytes: the message, CRLF lines, not dot-stuffed (RFC 5321 §4.5.2 is the client's job)>

A file is created under its final name while the message is received, with IN_PROGRESS ("-" x 20) where
the size goes; the commit writes the size last, then fsyncs (Postfix likewise marks a finished queue file
in the file itself). So a file is accepted only when its magic line is ours, its size is digits, its
envelope parses and its length is exactly header + envelope + size. A file still marked in progress (or
not even as long as the magic line) is a message being received — or, at start-up, one a crash cut short
before its 250: InProgress, which readers skip and recovery removes. A torn file with a size (shorter)
or a foreign one (no magic) is CorruptMessage.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Optional

from zope.interface import implementer

from mailrelay.envelope import Envelope
from mailrelay.interfaces import ISpooledMessage

MAGIC = b"MAILRELAY-SPOOL/1 size="
SIZE_DIGITS = 20
SIZE_OFFSET = len(MAGIC)
HEADER_LENGTH = len(MAGIC) + SIZE_DIGITS + 1
IN_PROGRESS = b"-" * SIZE_DIGITS       # in place of the size until the commit
MAX_ENVELOPE_LINE = 8 * 1024 * 1024
FIRST_READ = 16 * 1024


class UnknownMessage(KeyError):
    """No complete message with this queue id (or the id is malformed)."""


class InProgress(UnknownMessage):
    """A message still being received (no complete message with this id yet), or one a crash cut short
    before it was acknowledged."""


class CorruptMessage(ValueError):
    """A queue file that is torn, foreign or unreadable; recovery moves it to <spool>/corrupt/."""


def encode_header(envelope: Envelope, size: Optional[int] = None) -> bytes:
    """The magic line and the envelope line. Without `size`, marked IN_PROGRESS: the commit patches the
    size in with `encode_size`."""
    envelope_line = envelope.to_json()
    if b"\n" in envelope_line or b"\r" in envelope_line:
        raise ValueError("envelope JSON must be one line")
    return MAGIC + (IN_PROGRESS if size is None else encode_size(size)) + b"\n" + envelope_line + b"\n"


def encode_size(size: int) -> bytes:
    return b"%0*d" % (SIZE_DIGITS, size)


@dataclass(frozen=True)
class ParsedHeader:
    envelope: Envelope
    size: int            # message bytes
    data_offset: int     # where the message starts in the file


def read_header(f: BinaryIO) -> ParsedHeader:
    """Parse and check a queue file opened in binary mode at offset 0; raise CorruptMessage."""
    magic_line = f.readline(HEADER_LENGTH)
    _check_magic(magic_line)
    envelope_line = f.readline(MAX_ENVELOPE_LINE)
    return _parsed(magic_line, envelope_line, os.fstat(f.fileno()).st_size)


def read_header_fd(fd: int) -> ParsedHeader:
    """read_header for a descriptor (os.open): one pread of the first 16 KiB holds the magic line and
    nearly every envelope, without a buffered file object (a reader of the whole queue opens 30,000)."""
    chunk = os.pread(fd, FIRST_READ, 0)
    magic_line = chunk[:HEADER_LENGTH]
    if magic_line.find(b"\n") not in (-1, HEADER_LENGTH - 1):
        magic_line = magic_line[:magic_line.index(b"\n") + 1]     # as readline: stop at the first newline
    _check_magic(magic_line)
    limit = HEADER_LENGTH + MAX_ENVELOPE_LINE          # what readline(MAX_ENVELOPE_LINE) would take
    end = chunk.find(b"\n", HEADER_LENGTH)
    while end < 0 and len(chunk) < limit:
        more = os.pread(fd, min(len(chunk), limit - len(chunk)), len(chunk))
        if not more:
            break
        start, chunk = len(chunk), chunk + more
        end = chunk.find(b"\n", start)
    envelope_line = chunk[HEADER_LENGTH:limit if end < 0 else end + 1]
    return _parsed(magic_line, envelope_line, os.fstat(fd).st_size)


def _check_magic(magic_line: bytes) -> None:
    if len(magic_line) < HEADER_LENGTH and MAGIC.startswith(magic_line[:len(MAGIC)]):
        raise InProgress("not written yet")      # created, its first bytes not there (yet)
    if len(magic_line) != HEADER_LENGTH or not magic_line.startswith(MAGIC) or magic_line[-1:] != b"\n":
        raise CorruptMessage("not a mailrelay queue file (bad magic line)")


def _parsed(magic_line: bytes, envelope_line: bytes, actual: int) -> ParsedHeader:
    digits = magic_line[SIZE_OFFSET:-1]
    if digits == IN_PROGRESS:
        raise InProgress("still being received")
    if not digits.isdigit():
        raise CorruptMessage("bad size field")
    size = int(digits)
    if not envelope_line.endswith(b"\n"):
        raise CorruptMessage("torn or over-long envelope line")
    try:
        envelope = Envelope.from_json(envelope_line)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise CorruptMessage(f"bad envelope: {e.__class__.__name__}") from None
    if not isinstance(envelope.sender, str) or not all(isinstance(r, str) for r in envelope.recipients):
        raise CorruptMessage("bad envelope: addresses must be strings")
    data_offset = HEADER_LENGTH + len(envelope_line)
    if actual != data_offset + size:
        raise CorruptMessage(f"torn file: {actual} bytes on disk, header says {data_offset + size}")
    return ParsedHeader(envelope, size, data_offset)


def check_file(path: Path) -> ParsedHeader:
    """Open and check one queue file; raise CorruptMessage (also for unreadable files), or InProgress."""
    try:
        with open(path, "rb") as f:
            return read_header(f)
    except OSError as e:
        raise CorruptMessage(f"unreadable: {e.strerror}") from None


@implementer(ISpooledMessage)
@dataclass(frozen=True)
class SpooledMessage:
    """One complete message in the spool. `state` is the scheduler's own JSON ({} before the first save)."""
    queue_id: str
    envelope: Envelope
    size: int
    path: Path
    data_offset: int
    state: dict = field(default_factory=dict)
    held: bool = False

    def open(self) -> BinaryIO:
        """A new binary file object positioned at the first message byte; it ends at the last one.
        The caller streams it (and closes it); nothing here reads the message into memory."""
        f = open(self.path, "rb")
        f.seek(self.data_offset)
        return f
