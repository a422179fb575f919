# -*- test-case-name: tests.test_dotstuff, tests.test_delivery_client -*-
"""Dot-stuffing for the outgoing DATA phase (RFC 5321 section 4.5.2), correct across chunk boundaries.

Journey: the delivery client streams a spooled message (CRLF lines, not dot-stuffed) to the next hop.
In: the message as chunks of any size, split anywhere.  Out: the same bytes with a "." added before every
line that starts with ".", and finally the end-of-data terminator.  `StuffingProducer` does this from an
open file straight into a transport, one chunk at a time (flat memory whatever the message size).

Why not Twisted's `SMTPClient.transformChunk`: it stuffs each 16 KiB chunk on its own, so a "." line that
starts exactly at a chunk boundary (and the message's first line) goes out unstuffed — a premature end of
data downstream, i.e. SMTP smuggling — and it turns CRLF into CR CR LF.  This transform keeps one bit of
state (are we at the start of a line?) between chunks and never rewrites line endings.
"""
from __future__ import annotations

from typing import BinaryIO, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IPullProducer
from zope.interface import implementer

from mailrelay.net import write_now

CRLF = b"\r\n"
CHUNK_SIZE = 64 * 1024


class DotStuffer:
    """A stateful transform: call `stuff(chunk)` for every chunk, then `terminator()` once."""

    def __init__(self) -> None:
        self._at_line_start = True   # the first line of the message is a line start too
        self._tail = b""             # the last two bytes seen, to choose the terminator

    def stuff(self, chunk: bytes) -> bytes:
        """The chunk with every line-initial "." doubled (RFC 5321 4.5.2)."""
        if not chunk:
            return b""
        # A line starts after any LF, not only after CRLF: should a bare LF ever reach us, a lenient
        # downstream server that ends DATA on "\n.\n" must still not see an end there (SMTP smuggling).
        out = chunk.replace(b"\n.", b"\n..")
        if self._at_line_start and chunk[:1] == b".":
            out = b"." + out
        self._at_line_start = chunk[-1:] == b"\n"
        self._tail = (self._tail + chunk[-2:])[-2:]
        return out

    def terminator(self) -> bytes:
        """The end-of-data mark: ".\\r\\n" after a final CRLF (or an empty message), else CRLF first."""
        if self._tail == CRLF or not self._tail:
            return b"." + CRLF
        return CRLF + b"." + CRLF


def stuff_all(data: bytes) -> bytes:
    """Stuff a whole message at once and add the terminator (convenience for small messages and tests)."""
    stuffer = DotStuffer()
    return stuffer.stuff(data) + stuffer.terminator()


@implementer(IPullProducer)
class StuffingProducer:
    """Streams an open binary file, dot-stuffed and terminated, into a consumer (a transport).

    `source` is buffered (a file opened "rb", io.BufferedReader, BytesIO): its read(n) comes back short
    only at the end, so the last piece and the terminator go out in one write, straight to the kernel
    when nothing waits before them (net.write_now). A 2 KiB message is then one send(), not two sends
    a reactor turn apart.
    `start()` returns a Deferred firing (with None) once the terminator is written, or failing when the
    file cannot be read or the consumer stops us (connection lost).  The file is closed either way.
    `on_progress` is called for every chunk written (the client resets its idle timeout there)."""

    def __init__(self, source: BinaryIO, consumer: IConsumer, on_progress: Callable[[], None] = lambda: None):
        self._source, self._consumer, self._on_progress = source, consumer, on_progress
        self._stuffer = DotStuffer()
        self._done: defer.Deferred | None = None
        self._registered = False

    def start(self) -> defer.Deferred:
        done = self._done = defer.Deferred()
        self._registered = True
        self._consumer.registerProducer(self, False)     # may write everything and fire `done` at once
        return done

    def resumeProducing(self) -> None:
        if self._done is None or self._done.called:
            return
        try:
            chunk = self._source.read(CHUNK_SIZE)
        except OSError as e:
            self._finish(e)
            return
        if len(chunk) == CHUNK_SIZE:
            self._consumer.write(self._stuffer.stuff(chunk))
            self._on_progress()
            return
        self._unregister()                       # the last write: nothing more to ask us for
        write_now(self._consumer, self._stuffer.stuff(chunk) + self._stuffer.terminator())
        self._on_progress()
        self._finish(None)

    def stopProducing(self) -> None:
        if self._done is not None and not self._done.called:
            self._finish(defer.CancelledError("body transfer stopped"))

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self._consumer.unregisterProducer()

    def _finish(self, error: Exception | None) -> None:
        self._source.close()
        self._unregister()
        done, self._done = self._done, None
        assert done is not None       # every caller checks that a transfer is under way
        if error is None:
            done.callback(None)
        else:
            done.errback(error)
