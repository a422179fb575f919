# -*- test-case-name: tests.test_server_data -*-
"""The DATA phase reader: raw bytes after `354` in, un-dot-stuffed CRLF content out.

Its job in the message's journey: between the server session (which hands it every byte the client
sends after `354`) and the spool's IMessageWriter (which gets the content in large chunks as it is
read, so memory never grows with the message).  In: raw chunks exactly as `dataReceived` got them,
split anywhere.  Out: content chunks through `sink(bytes)`, then, once the end of data is found, the
bytes that followed it (pipelined commands) and `outcome`, a Reply when the message must be refused.

Policy (RFC 5321 4.1.1.4, 4.5.2, 4.5.3.1.6; CVE-2023-51764/51765/51766 and CVE-2024-27305 class):

- DATA ends ONLY at CRLF "." CRLF: a "." line that is preceded or followed by a bare LF or a bare CR
  is NOT the end.  Ending on `\\n.\\n` & co. is what lets a message smuggle a second one past a relay.
  The `CRLF` that ended the DATA command counts as the first CRLF, so an empty message is `.CRLF`.
- A bare LF (LF without CR before it) ends a line and is normalised to CRLF (Postfix 3.9
  `smtpd_forbid_bare_newline = normalize`, mox).  A lone "." on such a line stays in the content as
  "." (it is not a terminator, and was not dot-stuffed by the client).
- A bare CR (CR not followed by LF) anywhere refuses the message: `550 5.6.11`, answered only after
  the real end of data (reading on to CRLF.CRLF).  Nothing sensible can be made of it, and passing it
  on lets a downstream server that treats CR as a line end split the message.
- A NUL octet anywhere refuses the message: `550 5.6.0`, answered only after the real end of data.
  SMTP smuggling (SEC Consult 2023, CVE-2023-51764 class): a next hop that strips NULs reads
  `\\r\\n\\x00.\\r\\n` as an end of data, so a NUL is never passed on (neither 7bit nor 8bit data
  may hold one: RFC 2045 2.7, 2.8).
- A text line over `max_line` octets (excluding CRLF; `[limits] max_line_length`, 64 KiB by default)
  refuses the message: we answer `554 5.6.0` after the real end of data.  554 "transaction failed"
  with 5.6.0 "other media error" is the most precise pair: the content, not the mailbox or the
  system, is at fault.  Lines over 998 octets (RFC 5321 4.5.3.1.6) up to that bound are accepted, as
  Postfix does: the spool notes them and delivery re-encodes them, so none ever leaves
  (outbound/sevenbit.py).  The reader never drops back to command mode mid-body (stock Twisted
  answers 500 and executes the rest of the body as commands); a line over the bound is discarded as
  it streams, never buffered beyond `max_line` octets.
- Over `max_size` content octets (counted as they stream): `552 5.3.4` after the real end of data;
  further bytes are discarded (RFC 1870 section 6.3).
- Once the message is refused nothing more is passed to `sink`.

BDAT (RFC 3030) content is read by the same class with `dots=False`: its chunks are counted by the
session (server/bdat.py), so there is no end-of-data sequence and no dot-stuffing to undo — a "." line,
even CRLF "." CRLF, is content — while every rule above about bare LF, bare CR, NUL, line length and
size holds the same.  `finish()` ends such content; a last line without a line end gets CRLF.

Lines are found with `bytes.find`/`bytes.count` over whole chunks; a chunk of ordinary lines (all
CRLF, none starting with ".", none too long) is passed on in one piece without a per-line loop.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

from mailrelay.interfaces import Reply

MAX_TEXT_LINE = 998        # octets, excluding CRLF (RFC 5321 4.5.3.1.6)

BARE_CR = Reply(550, "5.6.11", "Message refused: bare CR in message content (use CRLF line ends)")
NUL_OCTET = Reply(550, "5.6.0", "Message refused: NUL octet in message content")


def line_too_long(limit: int) -> Reply:
    """The refusal of a message with a text line over `limit` octets."""
    return Reply(554, "5.6.0", f"Message refused: a text line is longer than {limit} octets, "
                               f"the most this relay accepts")


LINE_TOO_LONG = line_too_long(MAX_TEXT_LINE)
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")


class DataReader:
    """Reads one message's DATA phase incrementally. See the module docstring for the policy."""

    def __init__(self, sink: Callable[[bytes], None], max_size: int, max_line: int = MAX_TEXT_LINE, *,
                 dots: bool = True):
        self._sink = sink
        self._dots = dots            # DATA: dot-stuffed, ends at CRLF.CRLF; BDAT (False): neither
        self._max_size = max_size
        self._max_line = max_line
        self._too_long = LINE_TOO_LONG if max_line == MAX_TEXT_LINE else line_too_long(max_line)
        self._partial = bytearray()  # start of an incomplete line (bounded by max_line + 2)
        self._skipping = False       # inside an over-long line: discard until LF
        self._skip_ends_cr = False   # last discarded byte was CR (for a CRLF split across chunks)
        self._prev_crlf = True       # the previous line ended with CRLF (DATA's own CRLF at first)
        self.size = 0                # content octets accepted so far
        self.bare_lf_lines = 0       # lines whose bare LF was normalised (for logging)
        self.outcome: Optional[Reply] = None
        self.finished = False

    def feed(self, data: bytes) -> Optional[bytes]:
        """Consume `data`. Returns None while the message continues, or once the terminating CRLF.CRLF
        is found, the bytes after it (possibly b""), which belong to the command stream."""
        if self.finished:
            raise RuntimeError("DataReader.feed after the end of data")
        if self._skipping:
            kept = self._skip(data)
            if kept is None:
                return None
            data = kept
        if b"\n" not in data:
            # The line goes on: grown in place, so a long line sent in tiny pieces costs linear time,
            # not a copy of everything so far per piece.
            self._keep_partial(data)
            return None
        buf = b"".join((self._partial, data)) if self._partial else data
        self._partial = bytearray()
        last_lf = buf.rfind(b"\n")
        out: list[bytes] = []
        rest = self._lines(buf, last_lf + 1, out)
        self._emit(out)
        if rest is not None:
            self.finished = True
            return rest
        self._keep_partial(buf[last_lf + 1:])
        return None

    def finish(self) -> None:
        """The end of BDAT content (BDAT LAST): pass on the last line, with CRLF when it has no line end
        (a CR left at the very end is a bare CR).  Only for `dots=False`: DATA ends at CRLF.CRLF."""
        if self._dots or self.finished:
            raise RuntimeError("DataReader.finish is for BDAT content, once")
        self.finished = True
        partial, self._partial, self._skipping = bytes(self._partial), bytearray(), False
        if partial:
            out: list[bytes] = []
            self._line(partial, False, out)
            self._emit(out)

    def _skip(self, data: bytes) -> Optional[bytes]:
        """Discard the rest of an over-long line; return what follows its LF, or None if not there yet."""
        lf = data.find(b"\n")
        if lf < 0:
            if data:
                self._skip_ends_cr = data.endswith(b"\r")
            return None
        self._prev_crlf = data[lf - 1:lf] == b"\r" if lf else self._skip_ends_cr
        self._skipping = False
        return data[lf + 1:]

    def _keep_partial(self, tail: bytes) -> None:
        # An incomplete line longer than any line we take (max_line + CRLF) will be refused anyway: drop it
        # now and skip to its LF, so a client sending no LF cannot make us buffer without bound.
        if len(self._partial) + len(tail) > self._max_line + 1:
            self._refuse(self._too_long)
            self._partial = bytearray()
            self._skipping = True
            self._skip_ends_cr = tail.endswith(b"\r")
        else:
            self._partial += tail

    def _lines(self, buf: bytes, end: int, out: list[bytes]) -> Optional[bytes]:
        """Process the complete lines in buf[:end]; return the bytes after CRLF.CRLF if found there."""
        region = buf if end == len(buf) else buf[:end]
        if self._is_plain(region):
            out.append(region)
            self._prev_crlf = True
            return None
        term = region.find(b"\r\n.\r\n") if self._dots else -1
        if term >= 0 and self._is_plain(region[:term + 2]):
            # The usual last chunk: plain lines, then CRLF.CRLF — taken whole, not line by line. The
            # first such sequence is the end (CVE-2024-27305: nothing else ends DATA).
            out.append(region[:term + 2])
            self._prev_crlf = True
            return buf[term + 5:]
        pos = 0
        while pos < end:
            lf = buf.find(b"\n", pos, end)
            line = buf[pos:lf]
            pos = lf + 1
            crlf = line.endswith(b"\r")
            if crlf:
                line = line[:-1]
            if line == b"." and crlf and self._prev_crlf and self._dots:
                return buf[pos:]        # the one and only end of data: CRLF . CRLF
            self._line(line, crlf, out)
        return None

    def _is_plain(self, region: bytes) -> bool:
        """True when every line in region ends in CRLF, has no CR or NUL inside, no leading "." and fits."""
        if b"\x00" in region:
            return False
        lines = region.count(b"\n")
        if region.count(b"\r\n") != lines or region.count(b"\r") != lines:
            return False
        if self._dots and (region.startswith(b".") or b"\n." in region):
            return False
        if len(region) > self._max_line + 2 and max(map(len, region.split(b"\n"))) > self._max_line + 1:
            return False
        return True

    def _line(self, line: bytes, crlf: bool, out: list[bytes]) -> None:
        if not crlf:
            self.bare_lf_lines += 1     # bare LF: normalised to CRLF (Postfix 3.9 / mox policy)
        if b"\r" in line:
            self._refuse(BARE_CR)       # bare CR: refused, never forwarded (SMTP smuggling class)
        if b"\x00" in line:
            self._refuse(NUL_OCTET)     # NUL: refused, never forwarded (SMTP smuggling, CVE-2023-51764 class)
        if len(line) > self._max_line:
            self._refuse(self._too_long)  # our bound; memory stays bounded
        if line[:1] == b"." and line != b"." and self._dots:
            line = line[1:]             # RFC 5321 4.5.2 transparency: remove the stuffed dot
        out.append(line + b"\r\n")
        self._prev_crlf = crlf

    def _emit(self, out: list[bytes]) -> None:
        if not out or self.outcome is not None:
            return
        chunk = b"".join(out)
        self.size += len(chunk)
        if self.size > self._max_size:
            self._refuse(TOO_BIG)       # RFC 1870 6.3: refuse after the end, discard the rest
            return
        self._sink(chunk)

    def _refuse(self, reply: Reply) -> None:
        if self.outcome is None:
            self.outcome = reply


_HEADER_START = re.compile(rb"[!-9;-~]+:|\r\n")


def pass_content(chunk: bytes, headers: "HeaderCollector", write: Callable[[bytes], None]) -> None:
    """Hand one content chunk from DataReader on to `write` (the spool writer, or the
    Authentication-Results filter before it), keeping a copy of the header block in `headers`.  Content
    that starts with body text gets an empty line first: our Received field must not run into it, and
    such content has no header block of its own (RFC 5322 2.1).  Both SMTP DATA and the HTTP API use it."""
    if headers.headers == b"" and not headers.complete and not _HEADER_START.match(chunk):
        write(b"\r\n")                  # content starts with body text: end our header block
        headers.complete = True         # ... and it has no header block of its own
    headers.feed(chunk)
    write(chunk)


class HeaderCollector:
    """Keeps a copy of a message's header block (up to the first empty line, at most `limit` octets)
    as content streams past, for IRelayPolicy.check_message.  Memory is bounded by `limit`."""

    def __init__(self, limit: int = 256 * 1024):
        self._limit = limit
        self._block = bytearray()
        self.complete = False

    def feed(self, chunk: bytes) -> None:
        if self.complete:
            return
        if not self._block and chunk.startswith(b"\r\n"):
            self.complete = True     # an empty line first: no header block at all
            return
        start = max(0, len(self._block) - 3)
        self._block += chunk[: self._limit + 4 - len(self._block)]
        end = self._block.find(b"\r\n\r\n", start)
        if end >= 0:
            del self._block[end + 2:]
            self.complete = True
        elif len(self._block) >= self._limit:
            del self._block[self._limit:]
            self.complete = True

    @property
    def headers(self) -> bytes:
        return bytes(self._block)
