# -*- test-case-name: tests.test_authres -*-
"""Forged Authentication-Results: removed on the way in (RFC 8601 section 5).

Where it sits: between the DATA reader and the spool writer, when the relay verifies DKIM and so adds
`Authentication-Results: <hostname>; dkim=...` itself on the way out.  A header field that already
claims that authserv-id came from outside and would be read downstream as our verdict: it is dropped
before the message is spooled.  Fields naming any other authserv-id are kept, byte for byte.

In: content chunks (CRLF lines, split anywhere) as the session receives them.  Out: the same bytes to
`sink`, minus those fields.  Only the header block is held, and at most `limit` bytes of it: a header
block longer than that is passed on unfiltered (the policy's header copy has the same bound), which a
client could use only to hide a forged field behind 256 KiB of headers that most receivers refuse.
"""
from __future__ import annotations

import re
from typing import Callable

FIELD_NAME = b"authentication-results"
_COMMENT = re.compile(rb"\((?:[^()\\]|\\.)*\)")     # RFC 5322 3.2.2 comments (not nested)


def authserv_id(value: bytes) -> str:
    """The authserv-id of an Authentication-Results value: its first token, comments and folding
    removed, lower-cased (RFC 8601 2.2: `authserv-id [CFWS authres-version] ( no-result / 1*resinfo )`)."""
    text = _COMMENT.sub(b" ", value.replace(b"\r\n", b"")).split(b";", 1)[0]
    words = text.split()
    return words[0].decode("latin-1").lower().rstrip(".") if words else ""


def fields(block: bytes) -> list[bytes]:
    """A header block (CRLF lines, without the empty line ending it) split into whole fields, each with
    its continuation lines and final CRLF."""
    out: list[bytes] = []
    for line in block.splitlines(keepends=True):
        if out and line[:1] in (b" ", b"\t"):
            out[-1] += line
        else:
            out.append(line)
    return out


def is_ours(field: bytes, our_id: str) -> bool:
    name, colon, value = field.partition(b":")
    return bool(colon) and name.strip().lower() == FIELD_NAME and authserv_id(value) == our_id


class AuthResultsFilter:
    """Feed content chunks; call finish() at the end of data. States: holding the header block →
    passing everything through."""

    def __init__(self, sink: Callable[[bytes], None], our_id: str, limit: int = 256 * 1024):
        self._sink, self._our_id, self._limit = sink, our_id.lower().rstrip("."), limit
        self._held = bytearray()
        self._passing = False
        self.removed = 0           # fields dropped (for the log)

    def feed(self, chunk: bytes) -> None:
        if self._passing:
            self._sink(chunk)
            return
        if not self._held and chunk.startswith(b"\r\n"):
            self._pass(b"", chunk)          # no header block at all
            return
        start = max(0, len(self._held) - 3)
        self._held += chunk
        end = self._held.find(b"\r\n\r\n", start)
        if end >= 0:
            block, rest = bytes(self._held[:end + 2]), bytes(self._held[end + 2:])
            self._pass(self._filtered(block), rest)
        elif len(self._held) > self._limit:
            self._pass(bytes(self._held), b"")

    def finish(self) -> None:
        """The end of data: a message that is all header (no empty line) is filtered now."""
        if not self._passing:
            self._pass(self._filtered(bytes(self._held)), b"")

    def _filtered(self, block: bytes) -> bytes:
        every = fields(block)
        kept = [f for f in every if not is_ours(f, self._our_id)]
        self.removed += len(every) - len(kept)
        return b"".join(kept)

    def _pass(self, head: bytes, rest: bytes) -> None:
        self._passing, self._held = True, bytearray()
        if head:
            self._sink(head)
        if rest:
            self._sink(rest)
