# -*- test-case-name: tests.test_server_bdat -*-
"""CHUNKING (RFC 3030): the BDAT command of a server session, its chunks read by count, not by lines.

Its job in the message's journey: the other way into the spool besides DATA.  In: `BDAT <size> [LAST]`
command lines and then exactly <size> octets each, handed over by the session's input path (session.py
`_process`), pipelined (RFC 2920) or not.  Out: one reply per chunk; the chunks' content streamed to the
same IMessageWriter as DATA's (transaction.py `open_message`), through the same DataReader, in its
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

`BdatReceiver` belongs to the session's TransactionHandler (transaction.py), whose envelope, content
path (`new_envelope`, `new_reader`, `open_message`, `finish`) and state it uses; it answers through the
session's ISessionChannel (replies.py).  The protocol hands it a chunk's octets straight from its input
buffer (`feed`, then `done` once the chunk is complete).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from mailrelay.interfaces import Reply
from mailrelay.logger import Logger
from mailrelay.server import replies
from mailrelay.server.data import TOO_BIG, DataReader
from mailrelay.server.replies import LOCAL_ERROR, SESSION_LOG_NAMESPACE, ISessionChannel, refusal_reason

log = Logger(namespace=SESSION_LOG_NAMESPACE)

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


class BdatReceiver:
    """BDAT for one session's TransactionHandler: the chunk being read, the message they build."""

    def __init__(self, transactions, channel: ISessionChannel, limits) -> None:
        self._transactions = transactions        # the TransactionHandler that owns this
        self._channel = channel
        self._limits = limits
        self.chunk: Optional[Chunk] = None       # a chunk being read: input is counted, not lines
        self.message: Optional[BdatMessage] = None

    @property
    def reading(self) -> bool:
        """A chunk's octets are still to come: the next input is content, not a command."""
        return self.chunk is not None

    def command(self, rest: str) -> None:
        parsed = parse_bdat(rest)
        transactions = self._transactions
        if parsed is None:
            self._channel.reply(UNREADABLE_SIZE)
            transactions.abort()
            self._channel.close()
            return
        size, last, well_formed = parsed
        chunk = Chunk(size, size, last)
        try:
            chunk.reply = self._start_chunk(size, well_formed)
        except Exception:
            # Whatever went wrong, the chunk's octets are still read (never run as commands).
            log.failure("error at a BDAT command from {ip}", ip=transactions.client_address)
            transactions.abort()
            chunk.reply = LOCAL_ERROR
        if size == 0:
            self._chunk_done(chunk)
        else:
            self.chunk = chunk

    def _start_chunk(self, size: int, well_formed: bool) -> Optional[Reply]:
        """Take a chunk into its transaction's message (opened by the first chunk); the reply to give
        after its octets instead, when no message takes them."""
        if not well_formed:
            return BAD_SYNTAX
        transactions = self._transactions
        if not transactions.has_recipients:
            return NEED_RCPT
        message = self.message
        envelope = transactions.new_envelope() if message is None else None
        if message is None:
            message = self.message = BdatMessage(transactions.new_reader(dots=False))
        message.declared += size
        if message.refusal is None and message.declared > self._limits.max_message_size:
            self._refuse_message(message, TOO_BIG)      # RFC 1870 6.3: known before a byte is read
        elif envelope is not None:
            transactions.open_message(envelope)
        return None

    def feed(self, buffer: bytes, start: int) -> tuple[int, bool]:
        """Read what `buffer[start:]` holds of the current chunk: (the position after its octets,
        whether the chunk is complete — then `done` answers it)."""
        chunk, message = self.chunk, self.message
        assert chunk is not None        # the session feeds chunks only while `reading`
        end = min(len(buffer), start + chunk.left)
        if end > start:
            if chunk.reply is None:
                assert message is not None      # no reply of its own: _start_chunk took it into the message
                if message.refusal is None:
                    whole = start == 0 and end == len(buffer)
                    message.reader.feed(buffer if whole else buffer[start:end])
            chunk.left -= end - start
        return end, not chunk.left

    def done(self) -> None:
        """The current chunk is complete: answer it."""
        chunk, self.chunk = self.chunk, None
        try:
            assert chunk is not None    # called once `feed` has completed the chunk
            self._chunk_done(chunk)
        except Exception:
            log.failure("error at the end of a BDAT chunk from {ip}", ip=self._transactions.client_address)
            self._transactions.abort()
            self._channel.reply(LOCAL_ERROR)

    def _chunk_done(self, chunk: Chunk) -> None:
        """All of a chunk's octets are read: answer it (for LAST: refuse, or commit and then answer)."""
        transactions = self._transactions
        if chunk.reply is not None:
            if chunk.reply is BAD_SYNTAX and self.message is not None:
                transactions.abort()         # a chunk of the message was lost: the message with it
            if chunk.reply.code == 503:
                self.answer(chunk.reply)     # out of order: not a refused message (as DATA's 503)
            else:
                self._channel.reply(chunk.reply)
            return
        message = self.message
        assert message is not None          # no reply of its own: _start_chunk took it into the message
        refusal = message.refusal
        if refusal is None:
            reader = message.reader
            if chunk.last and reader.outcome is None:
                reader.finish()
            refusal = reader.outcome or (LOCAL_ERROR if transactions.write_failed else None)
            if refusal is None:
                if chunk.last:
                    self.message = None
                    transactions.finish(reader)     # the policy's look at the headers, commit, 250
                else:
                    self._channel.send(250, "2.0.0", f"Ok: {chunk.size} octets")
                return
            self._refuse_message(message, refusal)
        if chunk.last:
            transactions.clear()
        self.answer(refusal)                # counted once, in _refuse_message

    def answer(self, reply: Reply) -> None:
        """A reply not counted as a refusal (an out-of-order command, or one counted already)."""
        self._channel.send(reply.code, reply.status, reply.text)

    def _refuse_message(self, message: BdatMessage, refusal: Reply) -> None:
        """The message fails: its partial content is thrown away; what is left of it will be discarded."""
        message.refusal = refusal
        self._transactions.abort_writer()
        replies.count(self._transactions.metrics, "refused", refusal_reason(refusal))
