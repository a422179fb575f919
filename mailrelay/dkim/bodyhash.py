# -*- test-case-name: tests.test_dkim -*-
"""The DKIM body hash (RFC 6376 3.4.3/3.4.4, 3.7) of a body read in chunks, in constant memory.

dkimpy canonicalises a whole body held in memory; a spooled message may be 50 MiB. The line-local steps
(trailing whitespace, whitespace runs) are dkimpy's own functions applied to runs of complete lines; the one
step that is not local — empty lines at the end of the body are ignored — is done here by holding back a
count of empty lines until a non-empty line follows.
"""
from __future__ import annotations

import hashlib

from dkim.canonicalization import ALGORITHMS, compress_whitespace, strip_trailing_whitespace


class BodyHasher:
    def __init__(self, canonicalization: bytes = b"relaxed"):
        self._algorithm = ALGORITHMS[canonicalization]
        self._relaxed = canonicalization == b"relaxed"
        self._hash = hashlib.sha256()
        self._partial = b""          # an incomplete last line, waiting for its CRLF
        self._held_empty = 0         # empty lines not yet known to be followed by content
        self._seen_content = False

    def update(self, data: bytes) -> None:
        data = self._partial + data
        end = data.rfind(b"\r\n")
        if end < 0:
            self._partial = data
            return
        self._partial = data[end + 2 :]
        self._lines(data[: end + 2])

    def _lines(self, lines: bytes) -> None:
        if self._relaxed:
            lines = compress_whitespace(strip_trailing_whitespace(lines))
        self._canonical(lines)

    def _canonical(self, lines: bytes) -> None:
        cut = _content_end(lines)
        if cut == 0:
            self._held_empty += len(lines) // 2
            return
        if self._held_empty:
            self._hash.update(b"\r\n" * self._held_empty)
        self._hash.update(lines[:cut])
        self._held_empty = (len(lines) - cut) // 2
        self._seen_content = True

    def digest(self) -> bytes:
        if self._partial:   # a last line without CRLF gets one (RFC 6376 3.4.3); as dkimpy, keep its trailing WSP
            last = compress_whitespace(self._partial) if self._relaxed else self._partial
            self._canonical(last + b"\r\n")
            self._partial = b""
        if not self._seen_content:
            return hashlib.sha256(self._algorithm.canonicalize_body(b"")).digest()
        return self._hash.digest()


def _content_end(lines: bytes) -> int:
    """Offset just past the CRLF that ends the last non-empty line of `lines` (CRLF-terminated), 0 if none."""
    tail = len(lines) - len(lines.rstrip(b"\r\n"))
    end = len(lines) - tail
    if tail % 2 or lines[end:] != b"\r\n" * (tail // 2):   # a stray CR or LF in the run: walk it pair by pair
        end = len(lines)
        while end >= 2 and lines[end - 2 : end] == b"\r\n":
            end -= 2
    return end + 2 if end > 0 else 0
