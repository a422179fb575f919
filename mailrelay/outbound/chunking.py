# -*- test-case-name: tests.test_chunking -*-
"""Outgoing CHUNKING (RFC 3030): the message sent in BDAT chunks instead of DATA, when the hop offers it.

Journey: the delivery client (outbound.client) reaches the point of sending a job's body; this subclass
sends `BDAT <n>` chunks there instead of DATA when the server's EHLO (or LHLO) offered CHUNKING.
In: the job's spooled message (open() at its first octet, already converted for the hop by
outbound.sevenbit: 7-bit for a hop without 8BITMIME, no line over 998 octets).  Out: the same results
as for DATA; the reply to the last chunk settles the accepted recipients as the reply to the final dot
would (one reply per recipient over LMTP: outbound.lmtp).

- RFC 3030 2: each chunk is exactly <n> octets of the message, nothing stuffed, nothing escaped, and
  the last one says LAST.  CHUNK_SIZE bounds a chunk (and so what is in memory for one connection).
  A message that does not end in CRLF gets one added to its last chunk, as DATA's terminator adds it,
  so the next hop stores the same octets whichever way they went.  BINARYMIME is never declared.
- RFC 3030 4.2 / RFC 2920: with PIPELINING the first chunk goes in the same write as MAIL FROM and the
  RCPTs (a message of one chunk is one write and one wait, where DATA needs two); later chunks follow
  the first one's reply, at most WINDOW of them awaiting a reply at once.  Without PIPELINING each
  chunk waits for the reply to the one before.
- RFC 3030 2: a chunk refused (4xx/5xx) fails the transaction: its reply settles the accepted
  recipients, no further chunk is sent, the replies to chunks already on their way are read and
  discarded, and the transaction is ended with RSET.
- Used when offered and `use_chunking` is true (the default, from measurement: docs/decisions.md).
"""
from __future__ import annotations

from typing import Any, BinaryIO, Optional

from twisted.internet import protocol
from twisted.python.failure import Failure

from mailrelay.outbound.client import DeliveryClient
from mailrelay.queue.job import Job, OnSettled
from mailrelay.logger import Logger
from mailrelay.net import write_now

log = Logger(namespace="mailrelay.delivery")

CHUNK_SIZE = 256 * 1024     # octets per BDAT chunk
WINDOW = 4                  # chunks awaiting their reply at once, with PIPELINING
CRLF = b"\r\n"


class ChunkReader:
    """A message file as (chunk, last) pairs of at most `size` octets (plus a CRLF added to the last
    chunk of a message that lacks one).  One chunk is read ahead, so the last is known as such.
    `source` is buffered: read(n) comes back short only at its end."""

    def __init__(self, source: BinaryIO, size: int):
        self._source, self._size = source, size
        self._ahead = source.read(size)
        self._tail = b""
        self.done = False

    def next(self) -> tuple[bytes, bool]:
        data = self._ahead
        self._ahead = self._source.read(self._size) if len(data) == self._size else b""
        self._tail = (self._tail + data[-2:])[-2:]
        last = not self._ahead
        if last:
            self.close()
            if self._tail and self._tail != CRLF:
                data += CRLF
        return data, last

    def close(self) -> None:
        self.done = True
        self._source.close()


class ChunkingClient(DeliveryClient):
    """DeliveryClient with BDAT: see the module docstring."""

    use_chunking = True

    def _begin(self, jobs: list[Job], reused: bool, on_settled: Optional[OnSettled] = None) -> None:
        self._chunks: Optional[ChunkReader] = None
        self._chunks_awaited = 0          # chunks sent whose reply has not come
        self._chunks_failed = False       # a chunk was refused: read the rest of the replies, then RSET
        super()._begin(jobs, reused, on_settled)

    def _send_data(self, lines: list[bytes]) -> None:
        if not (self.use_chunking and b"CHUNKING" in self._extensions):
            return super()._send_data(lines)
        try:
            self._chunks = ChunkReader(self.jobs[self._job_index].message.open(), CHUNK_SIZE)
        except OSError:
            return self._unreadable()
        self._chunks_awaited, self._chunks_failed = 0, False
        self._send_chunk(lines)

    @property
    def _window(self) -> int:
        return WINDOW if b"PIPELINING" in self._extensions else 1     # RFC 3030 4.2

    def _send_chunk(self, lines: Any = ()) -> bool:
        """The next chunk, after `lines` in the same write; False when the file could not be read."""
        assert self._chunks is not None       # set by _send_data for the BDAT transfer under way
        try:
            data, last = self._chunks.next()
        except OSError:
            self._unreadable()
            return False
        command = b"BDAT %d" % len(data) + (b" LAST" if last else b"")
        self._chunks_awaited += 1
        if last:
            # Every reply code goes to _on_last_chunk: over LMTP the first of the per-recipient replies
            # may be a 5xx for one recipient while the next are 250s (RFC 2033 4.3).
            self._awaiting.append(("BDAT LAST", "the reply to BDAT LAST", range(0, 1000), self._on_last_chunk,
                                   self._on_last_chunk))
            self.setTimeout(self.params.timeouts.data_end)     # RFC 5321 4.5.3.2: as for the final dot
        else:
            self._awaiting.append(("BDAT", "the reply to BDAT", range(200, 300), self._on_chunk,
                                   self._on_chunk_refused))
        write_now(self.transport, self.delimiter.join([*lines, command]) + self.delimiter + data)
        return True

    def _unreadable(self) -> None:
        log.failure("cannot read {queue_id}", Failure(),
                    queue_id=self.jobs[self._job_index].message.queue_id)
        self._abort(451, "4.3.0", "local error reading the queued message")

    def _transaction_dead(self) -> bool:
        """No chunk may follow: one was refused, MAIL FROM was, or no recipient was accepted."""
        return self._chunks_failed or self._mail_refused or not self._accepted

    def _on_chunk(self, code: int, text: bytes) -> None:
        self._chunks_awaited -= 1
        if self._transaction_dead():
            self._chunks_failed = True
            return self._drained()
        assert self._chunks is not None       # a BDAT reply: the transfer is still under way
        while self._chunks_awaited < self._window and not self._chunks.done:
            if not self._send_chunk():
                return

    def _on_chunk_refused(self, code: int, text: bytes) -> None:
        self._chunks_awaited -= 1
        if not self._chunks_failed:
            # RFC 3030 2: the transaction has failed; no further chunk, whatever is still in the pipe.
            self._chunks_failed = True
            self._settle_accepted(code if 400 <= code < 600 else 451, text)
            if code == 421:
                return self._closing(code, text)
        self._drained()

    def _on_last_chunk(self, code: int, text: bytes) -> None:
        self._chunks_awaited -= 1
        if self._transaction_dead():
            return self._drained()
        self._chunks = None
        self._on_data_end(code, text)       # settles the accepted recipients, as the reply to the final dot

    def _drained(self) -> None:
        """After a failed chunk: once every chunk sent has its reply, RSET (RFC 3030 2) and the next job."""
        if self._chunks_awaited:
            return
        if self._chunks is not None:
            self._chunks.close()
            self._chunks = None
        self.setTimeout(self.params.timeouts.reply)
        self._next_job()          # _in_transaction is still set when MAIL FROM was accepted: RSET first

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._chunks is not None and not self._chunks.done:
            self._chunks.close()
        super().connectionLost(reason)
