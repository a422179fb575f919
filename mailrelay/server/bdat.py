# -*- test-case-name: tests.test_server_bdat -*-
"""CHUNKING (RFC 3030): the BDAT command of a server session, its chunks read by count, not by lines.

Its job in the message's journey: the other way into the spool besides DATA.  In: `BDAT <size> [LAST]`
command lines and then exactly <size> octets each, handed over by the session's input path (session.py
`_process`), pipelined (RFC 2920) or not.  Out: one reply per chunk; the chunks' content streamed to the
same IMessageWriter as DATA's (transaction.py `_open_message`), through the same DataReader, in its
`dots=False` mode: no dot-stuffing to undo and no end-of-data sequence — a chunk may hold CRLF "." CRLF
or a whole SMTP dialogue and it is content (SMTP smuggling: CVE-2023-51764 class) — while bare LF is
normalised and bare CR, NUL, over-long lines and size are refused exactly as for DATA.  The last chunk's
250 is sent only once the message is committed, as for DATA.

The rules (RFC 3030 section 2 unless noted):
- Every chunk's octets are read, whatever the answer, so the session stays in step: a BDAT without MAIL
  and RCPT is answered `503 5.5.1` after its chunk; so is one after a refused chunk's transaction ended.
- A chunk that makes the message fail (size, content, the queue) is answered with the refusal, after
  its octets; so is every further chunk of the transaction (pipelined ones the client sent before it saw
  the refusal), up to and including LAST, which ends it.  `552 5.3.4` as soon as the sizes declared
  exceed `max_message_size` (RFC 1870 6.3; the chunk is then discarded unread-by-the-reader).
- Content refusals found only at the end (a last line ending in a bare CR) are answered at LAST; a
  last line without a line end gets CRLF (RFC 5322 2.3: lines end in CRLF).
- DATA, and RCPT, once a BDAT chunk has been taken: `503 5.5.1`; the client must RSET.  MAIL is refused
  as a nested MAIL.  RSET, EHLO/HELO and STARTTLS throw the partial message away.
- A size that is not 1 to 20 decimal digits (2^64 has 20): the chunk's length is unknown, so where the
  next command starts is unknown; reading on would execute the chunk's octets as commands (the danger
  RFC 3030 section 2 itself warns of).  Answered `501 5.5.4` and the connection is closed
  (RFC 5321 7.8).  A readable size with a bad end marker (`BDAT 10 LATER`): the chunk is read and
  discarded, `501 5.5.4`, and a BDAT message in progress is thrown away.

`BdatMixin` is one part of `RelaySession`; it uses the session's state (`_inbuf`, `_inpos`, `_mail`,
`_rcpts`, `_reader`, `_writer`, `_write_failed`, `_limits`, `_ip`, `_log`), its helpers (`_send`,
`_reply`, `_count`, `_close`, `_abort_writer`, `_reset_transaction`, `_reset_transaction_safely`) and
the transaction's (`_new_reader`, `_open_message`, `_end_of_data`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from mailrelay.interfaces import Reply
from mailrelay.server.data import TOO_BIG, DataReader
from mailrelay.server.replies import LOCAL_ERROR, refusal_reason

MAX_SIZE_DIGITS = 20
_SIZE = re.compile(r"[0-9]{1,%d}" % MAX_SIZE_DIGITS)
BAD_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT <size> [LAST]")
UNREADABLE_SIZE = Reply(501, "5.5.4", "Syntax: BDAT <size> [LAST]; the chunk size is unreadable, "
                                      "closing connection")
NEED_RCPT = Reply(503, "5.5.1", "Need MAIL and RCPT before BDAT")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "DATA after BDAT: send RSET first")    # RFC 3030 2
RCPT_AFTER_BDAT = Reply(503, "5.5.1", "RCPT after BDAT: send RSET first")


def parse_bdat(argument: str) -> Optional[tuple[int, bool, bool]]:
    """BDAT's argument as (size, last, well formed), or None when the size cannot be read."""
    words = argument.split()
    if not words or not _SIZE.fullmatch(words[0]):
        return None
    size = int(words[0])
    if len(words) == 1:
        return size, False, True
    last = words[1].upper() == "LAST"
    return size, last, last and len(words) == 2


@dataclass
class BdatMessage:
    """The message a transaction's BDAT chunks are building."""
    reader: DataReader
    declared: int = 0                   # the chunk sizes so far
    refusal: Optional[Reply] = None     # once set, every further chunk is answered with it


@dataclass
class Chunk:
    """The chunk being read: how many octets are still to come, and what becomes of them."""
    size: int
    left: int
    last: bool
    reply: Optional[Reply] = None       # answered with this (its octets discarded): no message takes them


class BdatMixin:
    """BDAT for RelaySession (before TransactionMixin in its bases: DATA and RCPT check here first)."""

    _chunk: Optional[Chunk]
    _bdat: Optional[BdatMessage]

    def do_BDAT(self, rest: str) -> None:
        parsed = parse_bdat(rest)
        if parsed is None:
            self._reply(UNREADABLE_SIZE)
            self._abort_writer()
            self._reset_transaction()
            self._close()
            return
        size, last, well_formed = parsed
        chunk = Chunk(size, size, last)
        try:
            chunk.reply = self._start_chunk(size, well_formed)
        except Exception:
            # Whatever went wrong, the chunk's octets are still read (never run as commands).
            self._log.failure("error at a BDAT command from {ip}", ip=self._ip)
            self._reset_transaction_safely()
            chunk.reply = LOCAL_ERROR
        if size == 0:
            self._chunk_done(chunk)
        else:
            self._chunk = chunk

    def _start_chunk(self, size: int, well_formed: bool) -> Optional[Reply]:
        """Take a chunk into its transaction's message (opened by the first chunk); the reply to give
        after its octets instead, when no message takes them."""
        if not well_formed:
            return BAD_SYNTAX
        if self._mail is None or not self._rcpts:
            return NEED_RCPT
        message = self._bdat
        envelope = self._new_envelope() if message is None else None
        if message is None:
            message = self._bdat = BdatMessage(self._new_reader(dots=False))
        message.declared += size
        if message.refusal is None and message.declared > self._limits.max_message_size:
            self._refuse_message(message, TOO_BIG)      # RFC 1870 6.3: known before a byte is read
        elif envelope is not None:
            self._open_message(envelope)
        return None

    def do_DATA(self, rest: str) -> None:
        if self._bdat is not None:
            self._answer(DATA_AFTER_BDAT)    # RFC 3030 2: DATA and BDAT never in one transaction
            return
        super().do_DATA(rest)

    def do_RCPT(self, rest: str) -> None:
        if self._bdat is not None:
            self._answer(RCPT_AFTER_BDAT)    # the message (and its Received header) is under way
            return
        super().do_RCPT(rest)

    def _feed_chunk(self) -> bool:
        """Read what has arrived of the current chunk; True once it is complete (and answered)."""
        chunk, message = self._chunk, self._bdat
        start = self._inpos
        end = min(len(self._inbuf), start + chunk.left)
        if end > start:
            if chunk.reply is None and message.refusal is None:
                whole = start == 0 and end == len(self._inbuf)
                message.reader.feed(self._inbuf if whole else self._inbuf[start:end])
            chunk.left -= end - start
            self._inpos = end
        if chunk.left:
            return False
        self._chunk = None
        try:
            self._chunk_done(chunk)
        except Exception:
            self._log.failure("error at the end of a BDAT chunk from {ip}", ip=self._ip)
            self._reset_transaction_safely()
            self._reply(LOCAL_ERROR)
        return True

    def _chunk_done(self, chunk: Chunk) -> None:
        """All of a chunk's octets are read: answer it (for LAST: refuse, or commit and then answer)."""
        if chunk.reply is not None:
            if chunk.reply is BAD_SYNTAX and self._bdat is not None:
                self._abort_writer()         # a chunk of the message was lost: the message with it
                self._reset_transaction()
            if chunk.reply.code == 503:
                self._answer(chunk.reply)    # out of order: not a refused message (as DATA's 503)
            else:
                self._reply(chunk.reply)
            return
        message = self._bdat
        if message.refusal is None:
            if chunk.last and message.reader.outcome is None:
                message.reader.finish()
            refusal = message.reader.outcome or (LOCAL_ERROR if self._write_failed else None)
            if refusal is not None:
                self._refuse_message(message, refusal)
            elif chunk.last:
                self._bdat, self._reader = None, message.reader
                self._end_of_data()          # the policy's look at the headers, then commit, then 250
                return
            else:
                self._send(250, "2.0.0", f"Ok: {chunk.size} octets")
                return
        if chunk.last:
            self._reset_transaction()
        self._answer(message.refusal)        # counted once, in _refuse_message

    def _answer(self, reply: Reply) -> None:
        self._send(reply.code, reply.status, reply.text)

    def _refuse_message(self, message: BdatMessage, refusal: Reply) -> None:
        """The message fails: its partial content is thrown away; what is left of it will be discarded."""
        message.refusal = refusal
        self._abort_writer()
        self._count("refused", refusal_reason(refusal))
