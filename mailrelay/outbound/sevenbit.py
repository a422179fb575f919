# -*- test-case-name: tests.test_sevenbit, tests.test_smtputf8 -*-
"""Converting a spooled message to 7-bit MIME for a next hop that does not offer 8BITMIME, and re-encoding
lines over 998 octets for every next hop.

Its job in the message's journey: between the spool and the delivery client.  The spool notes whether a
message has 8-bit octets (`Envelope.octets`) and lines over 998 octets (`Envelope.long_lines`); the
client, once it has the next hop's EHLO, asks `needs_downgrade()` and, if so, `downgrade()` for a form
of it the hop may take, and sends that instead: no 8-bit data to a server without 8BITMIME (RFC 6152 3),
and no line over 998 octets to any server (RFC 5322 2.1.1, RFC 5321 4.5.3.1.6), 8BITMIME or not.  In: a
spooled message (queue_id, envelope, size, open()).  Out: the same message converted, or a `554 5.6.3`
refusal (RFC 3463: conversion required but not supported), which bounces.

Policy (RFC 2045 6.4/6.7, RFC 2046 5, RFC 6152; the conversion is the one Postfix's smtp client makes
unless `disable_mime_output_conversion` is set):
- Every leaf part (text, application, ...) whose body needs re-encoding is re-encoded as
  quoted-printable, its Content-Transfer-Encoding field replaced; leaves that need nothing are copied
  as they are.  multipart/* and message/rfc822 are never encoded (RFC 2045 6.4): their parts are walked
  recursively and their own "8bit"/"binary" label becomes "7bit".  MIME-Version: 1.0 is added to the
  message's header (and to one inside message/rfc822) when missing.  8-bit octets in a multipart
  preamble or epilogue (text that MIME readers ignore) are quoted-printable-escaped in place, so that
  nothing 8-bit is left.
- Refused (554 5.6.3), since no conversion keeps their meaning: an 8-bit octet in any header field (at
  the top or in a part: RFC 2047 encoding would change the fields a signature or a reader relies on); an
  SMTPUTF8 message; 8-bit octets inside a part already declared quoted-printable or base64 (malformed);
  or inside message/* types that allow no encoding (message/partial, message/external-body,
  message/delivery-status, ...) or a multipart without a boundary.  message/global* may be encoded
  (RFC 6532 3.5) and is.
- A message with nothing to re-encode is returned unchanged, byte for byte.
- "Needs re-encoding" is one predicate (`Needs`): an 8-bit octet (when the hop takes no 8-bit) or a line
  over 998 octets (RFC 5321 4.5.3.1.6).  For a hop with 8BITMIME only the parts with such lines are
  re-encoded (8-bit parts without them go as they are, their labels kept).
- Lines over 998 octets: in a part without an encoding (7bit/8bit/binary), the part is re-encoded
  quoted-printable, as for 8-bit; in a base64 part the long lines are cut into 76-character lines
  (RFC 2045 6.8: line breaks, and characters outside the alphabet, which are dropped, mean nothing to a
  decoder); in a quoted-printable part the long lines are decoded and encoded again, with soft line
  breaks (RFC 2045 6.7 (5)), so the decoded octets stay the same.  A header line over 998 octets is
  folded: CRLF inserted before a space or tab after the field's colon (RFC 5322 2.2.3: unfolding gives
  the same field back); one with no place to fold within 998 octets (e.g. one 1,000-character word) is
  refused, 554 5.6.3.  Other encodings, and message/* or multipart types, with such lines are refused.

Memory stays bounded whatever the message size (50 MiB is allowed): two streaming passes over the spool
file, one line at a time — the first decides which parts need re-encoding (and whether the message can
be converted at all), the second writes the converted form to an unlinked temporary file in the spool's
tmp/ directory (mode 0600, removed by the kernel once closed, even after a crash).  Only a header block
is held whole (parsed by the stdlib `email` package; at most MAX_HEADER_BLOCK octets), and nesting is
limited to MAX_DEPTH.  The work blocks: it runs in a thread pool, never on the reactor thread.  DKIM
signing, when the hop signs, happens after converting, on the converted form (outbound/signing.py).
"""
from __future__ import annotations

import binascii
import io
import os
import re
import tempfile
from dataclasses import dataclass, replace
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any, BinaryIO, Optional

from twisted.internet import defer, threads
from zope.interface import implementer

from mailrelay.outbound.dotstuff import CHUNK_SIZE
from mailrelay.interfaces import ISelfConvertingMessage, ISpooledMessage
from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.delivery")

MAX_LINE = 998                   # octets without CRLF (RFC 5321 4.5.3.1.6)
BASE64_LINE = 76                 # RFC 2045 6.8
MAX_HEADER_BLOCK = 1024 * 1024   # one header block held for parsing, at most
MAX_DEPTH = 50                   # nested multipart / message/rfc822 levels
READ_LIMIT = 64 * 1024           # a longer "line" is read in pieces

_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")            # RFC 5322 3.6.8, and 4.5.8's obsolete space before ":"
_CTE = re.compile(rb"content-transfer-encoding[ \t]*:", re.IGNORECASE)
_MIME_VERSION = re.compile(rb"mime-version[ \t]*:", re.IGNORECASE)
_DASHES = re.compile(rb"^--", re.MULTILINE)
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=]+")
_IDENTITY = ("", "7bit", "8bit", "binary")          # RFC 2045 6.2: no encoding applied
_ENCODABLE_MESSAGES = ("message/global", "message/global-headers", "message/global-delivery-status",
                       "message/global-disposition-notification")    # RFC 6532 3.5, RFC 6533


class Unconvertible(Exception):
    """The message needs converting but cannot be converted; the text says why."""


@dataclass(frozen=True)
class Needs:
    """What the next hop takes: whether a line of content needs re-encoding for it."""
    eight_bit_ok: bool = False
    max_line: int = MAX_LINE

    def line(self, line: bytes) -> bool:
        if not self.eight_bit_ok and not line.isascii():
            return True
        return len(line) - (2 if line.endswith(b"\r\n") else 0) > self.max_line


SEVEN_BIT = Needs()


def needs_for(extensions: dict) -> Needs:
    """What a next hop offering `extensions` takes."""
    return Needs(eight_bit_ok=b"8BITMIME" in extensions)


# -- the client's side ------------------------------------------------------------------------------------


def is_7bit(message: Any) -> bool:
    """Whether the message is plain ASCII (read in chunks, never whole)."""
    with message.open() as f:
        while chunk := f.read(CHUNK_SIZE):
            if not chunk.isascii():
                return False
    return True


def needs_downgrade(message: Any, extensions: dict) -> bool:
    """Whether `message` must be converted before it goes to a server offering `extensions`."""
    if message.envelope.long_lines:
        return True                          # RFC 5322 2.1.1: no line over 998 octets to any hop
    if b"8BITMIME" in extensions:
        return False
    octets = message.envelope.octets
    if octets is not None:
        return octets != "7bit"              # known from receiving, whatever BODY= was declared
    # A spool file from before `octets` existed: trust the declaration, as before.
    return message.envelope.body == "8BITMIME" and not is_7bit(message)


def downgrade(message: Any, host: str, extensions: Optional[dict] = None) -> defer.Deferred:
    """A Deferred firing with `message` in the form a hop offering `extensions` takes (None: no 8BITMIME):
    7-bit MIME, or for a hop with 8BITMIME its lines over 998 octets re-encoded (another message object,
    or `message` itself when nothing needed converting), or with the (code, status, text) that settles it.
    Never fails.  An ISelfConvertingMessage (one DKIM signs) converts itself, so that it is signed after
    converting."""
    needs = needs_for(extensions or {})
    if ISelfConvertingMessage.providedBy(message):
        d = message.seven_bit(needs)
    else:
        d = threads.deferToThread(convert_message, message, needs)
    long_only = needs.eight_bit_ok or message.envelope.octets == "7bit"

    def converted(result: Any) -> Any:
        if long_only:
            log.info("{queue_id}: lines over 998 octets re-encoded for {host}",
                     queue_id=message.queue_id, host=host)
        else:
            log.info("{queue_id}: converted to 7-bit MIME for {host}, which does not offer 8BITMIME",
                     queue_id=message.queue_id, host=host)
        return result

    def failed(failure):
        if failure.check(Unconvertible) and long_only:
            return 554, "5.6.3", f"a line over 998 octets must be re-encoded for {host}, and {failure.value}"
        if failure.check(Unconvertible):
            return 554, "5.6.3", f"8-bit message, but {host} does not offer 8BITMIME, and {failure.value}"
        log.failure("{queue_id}: converting to 7-bit MIME failed", failure,
                    queue_id=message.queue_id)
        return 451, "4.3.0", "local error converting the message to 7-bit MIME"
    return d.addCallbacks(converted, failed)


# -- the converted message --------------------------------------------------------------------------------


class _Reader(io.RawIOBase):
    """Reads the converted file with pread: any number of readers at once, each at its own offset."""

    def __init__(self, fd: int, size: int):
        self._fd, self._size, self._offset = fd, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = os.pread(self._fd, min(len(buffer), self._size - self._offset), self._offset)
        buffer[:len(data)] = data
        self._offset += len(data)
        return len(data)


@implementer(ISpooledMessage)
class ConvertedMessage:
    """A spooled message seen in its converted form, under the original's queue id and path.  The form
    lives in an unlinked temporary file, closed (and so gone) with this object."""

    def __init__(self, original: Any, converted: BinaryIO, size: int, needs: Needs = SEVEN_BIT):
        self._original, self._file, self.size = original, converted, size
        self.queue_id, self.path = original.queue_id, original.path
        if needs.eight_bit_ok:      # only long lines re-encoded: 8-bit parts stay 8-bit
            self.envelope = replace(original.envelope, long_lines=False)
        else:
            self.envelope = replace(original.envelope, body="7BIT", octets="7bit", long_lines=False)

    def open(self) -> BinaryIO:
        return io.BufferedReader(_Reader(self._file.fileno(), self.size), CHUNK_SIZE)


def convert_message(message: Any, needs: Needs = SEVEN_BIT) -> Any:
    """Blocking (run it in a thread): `message` converted so that nothing in it needs re-encoding for
    `needs`, or `message` itself when nothing does.  Raises Unconvertible."""
    envelope = message.envelope
    if envelope.smtputf8 and envelope.utf8_headers is not False and not needs.eight_bit_ok:
        # RFC 6532 3.5: UTF-8 header fields have no 7-bit form a reader would take as the same message.
        raise Unconvertible("it is an SMTPUTF8 message with UTF-8 header fields (RFC 6532), which cannot be "
                            "converted")
    with message.open() as f:
        plan = _Walk(f, needs, None, []).run()
    if not any(plan):
        return message
    try:
        out = tempfile.TemporaryFile(dir=_tmp_dir(message))
    except OSError:
        out = tempfile.TemporaryFile()          # the spool's tmp/ not writable here: the system's (0600 too)
    try:
        with message.open() as f:
            _Walk(f, needs, out, plan).run()
        out.flush()                     # readers use the descriptor (pread), not this buffered object
        size = out.tell()
    except BaseException:
        out.close()
        raise
    return ConvertedMessage(message, out, size, needs)


def _tmp_dir(message: Any) -> Optional[str]:
    """The spool's tmp/ directory beside the message's queue/ (same disk, private), if there is one."""
    path = message.path
    if path is None:
        return None
    tmp = Path(path).parent.parent / "tmp"
    return str(tmp) if tmp.is_dir() else None


# -- the walk ---------------------------------------------------------------------------------------------


class _Walk:
    """One pass over a message.  Without `out` it decides: run() returns the plan, one entry per header
    block (True: a line to fold), leaf (None, or how to re-encode it: "qp", "base64", "quoted-printable")
    and preamble/epilogue line group (True: re-encode), in walk order, and raises Unconvertible.  With
    `out` and that plan it writes the converted message.

    Lines are read in pieces of at most READ_LIMIT octets: a piece that does not start a line
    (`_continues`) is never taken for a boundary delimiter or a header field."""

    def __init__(self, f: BinaryIO, needs: Needs, out: Optional[BinaryIO], plan: list):
        self._f, self._needs, self._out = f, needs, out
        self._plan = iter(plan) if out is not None else None
        self._decided: list = []
        self._pushed: Optional[tuple[bytes, bool]] = None
        self._continues = False          # the last line read is the rest of a longer line
        self._open = False               # the last piece read did not end its line
        self._carry = b""                # quoted-printable re-encoding: the start of an unfinished piece

    def run(self) -> list:
        self._entity(0, (), "text/plain", top=True)
        return self._decided

    # lines

    def _next(self) -> bytes:
        if self._pushed is not None:
            (line, self._continues), self._pushed = self._pushed, None
            return line
        line = self._f.readline(READ_LIMIT)
        if line.endswith(b"\r"):
            line += self._f.read(1)      # never split a CRLF between two pieces
        self._continues, self._open = self._open, bool(line) and not line.endswith(b"\n")
        return line

    def _push(self, line: bytes) -> None:
        self._pushed = (line, self._continues)

    def _write(self, data: bytes) -> None:
        if self._out is not None:
            self._out.write(data)

    def _decide(self, flag: Any) -> Any:
        """Pass 1 records a decision; pass 2 replays it (both walk the same way)."""
        if self._plan is None:
            self._decided.append(flag)
            return flag
        return next(self._plan)

    def _delimiter(self, line: bytes, boundaries: tuple) -> Optional[tuple[int, bool]]:
        """(level, closing) when `line` is the delimiter of one of `boundaries` (RFC 2046 5.1.1)."""
        if self._continues or not line.startswith(b"--"):
            return None
        for level in range(len(boundaries) - 1, -1, -1):
            boundary = boundaries[level]
            if line.startswith(boundary, 2):
                rest = line[2 + len(boundary):].rstrip(b" \t\r\n")
                if rest in (b"", b"--"):
                    return level, rest == b"--"
        return None

    def _relabel(self, cte: str) -> Optional[str]:
        """A container's new Content-Transfer-Encoding: "7bit" once nothing 8-bit is left in it."""
        return "7bit" if cte in ("8bit", "binary") and not self._needs.eight_bit_ok else None

    # entities

    def _entity(self, depth: int, boundaries: tuple, default_type: str, top: bool = False) -> None:
        if depth > MAX_DEPTH:
            raise Unconvertible(f"its MIME structure is nested more than {MAX_DEPTH} levels deep")
        lines, separator = self._header_block(boundaries)
        fields = Message() if not lines else BytesHeaderParser(policy=compat32).parsebytes(b"".join(lines))
        fields.set_default_type(default_type)
        ctype = fields.get_content_type()
        cte = str(fields.get("content-transfer-encoding", "")).strip().lower()
        boundary = fields.get_boundary() if ctype.startswith("multipart/") else None
        if boundary:
            self._headers(lines, separator, top, self._relabel(cte))
            self._multipart(depth, boundaries, boundary.encode("utf-8", "surrogateescape"),
                            "message/rfc822" if ctype == "multipart/digest" else "text/plain")
        elif ctype == "message/rfc822" and cte in _IDENTITY:
            self._headers(lines, separator, top, self._relabel(cte))
            self._entity(depth + 1, boundaries, "text/plain", top=True)    # a message: MIME-Version too
        else:
            self._leaf(lines, separator, top, boundaries, ctype, cte)

    def _header_block(self, boundaries: tuple) -> tuple[list[bytes], bytes]:
        """The header lines of an entity (over-long ones folded, in pass 2), and what ended them: the empty
        line, or b"" (a body line, a delimiter or the end came first; it is left to be read)."""
        lines: list[bytes] = []
        total, fold = 0, False
        while True:
            line = self._next()
            if line in (b"\r\n", b"\n"):
                break
            is_field = not self._continues and (_FIELD.match(line) or (lines and line[:1] in (b" ", b"\t")))
            if not line or not is_field or self._delimiter(line, boundaries):
                if line:
                    self._push(line)
                line = b""
                break
            while self._open:                   # a field line longer than READ_LIMIT is held whole
                line += self._next()
                if total + len(line) > MAX_HEADER_BLOCK:
                    raise Unconvertible("a header block is too big to convert")
            if self._needs.line(line):
                if not self._needs.eight_bit_ok and not line.isascii():
                    raise Unconvertible("8-bit octets in a header field cannot be converted")
                folded = _fold(line)            # too long: RFC 5322 2.2.3 folding
                if folded is None:
                    raise Unconvertible("a header field line longer than 998 octets has no space or tab "
                                        "to fold it at")
                line, fold = folded, True
            total += len(line)
            if total > MAX_HEADER_BLOCK:
                raise Unconvertible("a header block is too big to convert")
            lines.append(line)
        self._decide(fold)                      # pass 2 folds each line itself; this keeps the plan in step
        return lines, line

    def _headers(self, lines: list[bytes], separator: bytes, top: bool, cte: Optional[str]) -> None:
        """Write a header block, its Content-Transfer-Encoding replaced by `cte` (when given), and in a
        message's header (`top`: the message's own, or one inside message/rfc822) MIME-Version added if
        it is missing."""
        if self._out is None:
            return
        if cte is None and not top:
            self._write(b"".join(lines) + separator)         # nothing to change: byte for byte
            return
        kept, skipping, has_version = [], False, False
        for line in lines:
            if line[:1] in (b" ", b"\t"):
                if not skipping:
                    kept.append(line)
                continue
            skipping = cte is not None and bool(_CTE.match(line))
            has_version = has_version or bool(_MIME_VERSION.match(line))
            if not skipping:
                kept.append(line)
        if top and not has_version:
            kept.append(b"MIME-Version: 1.0\r\n")
        if cte is not None:
            kept.append(b"Content-Transfer-Encoding: " + cte.encode("ascii") + b"\r\n")
        if kept == lines:
            self._write(b"".join(lines) + separator)
        else:
            self._write(b"".join(kept) + (separator or b"\r\n"))   # a changed block ends in an empty line

    def _multipart(self, depth: int, boundaries: tuple, boundary: bytes, default_type: str) -> None:
        inner = boundaries + (boundary,)
        own = len(boundaries)
        ended = self._text_lines(inner)          # the preamble
        while ended is not None and ended[0] == own:
            line = self._next()
            self._write(line)
            if ended[1]:                         # the close delimiter: the epilogue follows
                self._text_lines(boundaries)
                return
            self._entity(depth + 1, inner, default_type)
            line = self._next()
            if not line:
                return
            self._push(line)
            ended = self._delimiter(line, inner)
            if ended is None:
                return                           # cannot happen: the part read up to a delimiter

    def _text_lines(self, boundaries: tuple) -> Optional[tuple[int, bool]]:
        """Copy a preamble or epilogue up to a delimiter of `boundaries` (left to be read; returned) or the
        end (None).  MIME readers ignore these lines; any that need it are escaped as quoted-printable."""
        if self._out is None:
            needed = False
            while True:
                line = self._next()
                ended = self._delimiter(line, boundaries) if line else None
                if not line or ended is not None:
                    if line:
                        self._push(line)
                    self._decide(needed)
                    return ended
                needed = needed or self._needs.line(line)
        self._decide(False)                      # keeps the plan in step; here each line decides itself
        while True:
            line = self._next()
            if not line:
                return None
            ended = self._delimiter(line, boundaries)
            if ended is not None:
                self._push(line)
                return ended
            self._write(_qp_line(line) if self._continues or self._needs.line(line) else line)

    def _leaf(self, lines: list[bytes], separator: bytes, top: bool, boundaries: tuple, ctype: str,
              cte: str) -> None:
        """A part that is not a container: re-encoded as quoted-printable if any line of it needs it (a
        base64 or quoted-printable one: its long lines re-wrapped)."""
        if self._out is None:
            self._decide(self._plan_leaf(ctype, cte, *self._scan_body(boundaries)))
            return
        how = self._decide(None)
        # MIME-Version where we give the part an encoding; a part only re-wrapped or folded keeps its header.
        self._headers(lines, separator, top and how == "qp", "quoted-printable" if how == "qp" else None)
        while True:
            line = self._next()
            if not line or self._delimiter(line, boundaries):
                if line:
                    self._push(line)
                break
            if how == "qp":
                self._write(_qp_line(line))
            elif how is not None and (self._continues or self._carry or self._needs.line(line)):
                self._write(_base64_lines(line) if how == "base64" else self._requote(line))
            else:
                self._write(line)
        if self._carry:                          # the part ended inside a line (no CRLF at the very end)
            self._write(_qp_line(binascii.a2b_qp(self._carry)))
            self._carry = b""

    def _plan_leaf(self, ctype: str, cte: str, needed: bool, eight_bit: bool) -> Optional[str]:
        """How a leaf is re-encoded (None: not at all), or Unconvertible."""
        if not needed:
            return None
        # RFC 2045 6.4: multipart/* (here one without a boundary) and message/* are never encoded.
        composite = ctype.startswith("multipart/") or (ctype.startswith("message/")
                                                      and ctype not in _ENCODABLE_MESSAGES)
        if composite:
            raise Unconvertible(f"a {ctype} part holds octets that cannot be converted")
        if cte in _IDENTITY:
            return "qp"
        if eight_bit or cte not in ("base64", "quoted-printable"):
            raise Unconvertible(f"a Content-Transfer-Encoding {cte} part holds octets that cannot be converted")
        return cte                                # only over-long lines: re-wrapped (RFC 2045 6.7, 6.8)

    def _scan_body(self, boundaries: tuple) -> tuple[bool, bool]:
        """(whether a line needs re-encoding, whether one has an 8-bit octet the hop does not take)."""
        needed = eight_bit = False
        while True:
            line = self._next()
            if not line or self._delimiter(line, boundaries):
                if line:
                    self._push(line)
                return needed, eight_bit
            if self._needs.line(line):
                needed = True
                eight_bit = eight_bit or (not self._needs.eight_bit_ok and not line.isascii())

    def _requote(self, line: bytes) -> bytes:
        """A long line (or piece of one) of a quoted-printable part, decoded and encoded again in lines
        of at most 76 characters; the decoded octets are the same.  An escape or trailing white space at
        the end of a piece waits for the next piece (`_carry`)."""
        hard = line.endswith(b"\r\n")
        content, self._carry = self._carry + (line[:-2] if hard else line), b""
        if hard:
            content = content.rstrip(b" \t")      # RFC 2045 6.7 (3): trailing white space is not content
            if content.endswith(b"="):             # a soft line break already: the line goes on
                return _qp_line(binascii.a2b_qp(content[:-1]))
            return _qp_line(binascii.a2b_qp(content) + b"\r\n")
        cut = len(content.rstrip(b" \t"))
        if len(content) - cut > READ_LIMIT:
            cut = len(content)                    # a run of spaces that long: encoded as it is
        escape = content.rfind(b"=", max(0, cut - 2), cut)
        if escape >= 0:
            cut = escape                          # "=XX" split between pieces: wait for the rest
        content, self._carry = content[:cut], content[cut:]
        return _qp_line(binascii.a2b_qp(content))


def _fold(line: bytes, limit: int = MAX_LINE) -> Optional[bytes]:
    """A header line folded into lines of at most `limit` octets (RFC 5322 2.2.3: CRLF inserted before
    a space or tab; after the field's colon, and never leaving a line of white space only), or None when
    that cannot be done."""
    hard = line.endswith(b"\r\n")
    content = line[:-2] if hard else line
    start = 1 if content[:1] in (b" ", b"\t") else content.find(b":") + 1    # never inside the field name
    pieces = []
    while len(content) > limit:
        end = min(limit + 1, len(content.rstrip(b" \t")))      # fold before white space that text follows
        at = max(content.rfind(b" ", max(start, 1), end), content.rfind(b"\t", max(start, 1), end))
        if at <= 0 or not content[:at].strip(b" \t"):
            return None
        pieces.append(content[:at] + b"\r\n")
        content, start = content[at:], 1
    pieces.append(content + (b"\r\n" if hard else b""))
    return b"".join(pieces)


def _base64_lines(line: bytes) -> bytes:
    """A long line (or piece of one) of a base64 part as lines of 76 characters (RFC 2045 6.8: a decoder
    ignores line breaks and every character outside the base64 alphabet, which is dropped)."""
    content = _NOT_BASE64.sub(b"", line)
    return b"".join(content[i:i + BASE64_LINE] + b"\r\n" for i in range(0, len(content), BASE64_LINE))


def _qp_line(line: bytes) -> bytes:
    """One line quoted-printable (RFC 2045 6.7), lines of at most 76 characters, CRLF ends; a piece of an
    over-long line (no CRLF yet) ends in a soft line break."""
    hard = line.endswith(b"\r\n")
    content = line[:-2] if hard else line
    # istext=False: a CR or LF inside (a decoded "=0D" or "=0A") stays an escaped octet, not a line break.
    encoded = binascii.b2a_qp(content, quotetabs=False, istext=False, header=False).replace(b"\n", b"\r\n")
    # A line starting "--" might read as a boundary delimiter of an enclosing multipart: escape the dash
    # (that line may then be 78 characters long; decoders take it, and it stays far below 998).
    encoded = _DASHES.sub(b"=2D-", encoded)
    return encoded + (b"\r\n" if hard else b"=\r\n")
