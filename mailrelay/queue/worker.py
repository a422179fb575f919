# -*- test-case-name: tests.test_delivery_process -*-
"""The delivery process's side of `[delivery] process = "separate"`: the service that runs the scheduler
and the next hops there (DeliveryWorker, its parts built by mailrelay.wiring and handed in), the reader
of the main process's orders (Commands) and the batching of its log lines (TickBufferedStream). The
process itself starts in mailrelay.delivery_main.

In (stdin, one line each): `enqueue QUEUEID` for a message the main process just committed, `reload`
(re-read the config: routes, transports, DKIM keys, queue timings), `flush [QUEUEID]` (due now) and
`metrics SEQ`, answered on `--reply-fd` (the main process's `[metrics] endpoint` serves what comes back:
`metrics SEQ LENGTH`, a newline, LENGTH bytes of the delivery families' text exposition). End of stdin
means stop: deliveries in flight finish (bounded, Scheduler.stopService) and the process exits. The
spool is shared: the main process holds its lock and ran recovery before starting this one.
"""
from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from twisted.application import service
from twisted.internet import defer
from twisted.protocols.basic import LineOnlyReceiver

from mailrelay.logger import Logger
from mailrelay.logs import log_queued

if TYPE_CHECKING:
    from mailrelay.metrics import Metrics

log = Logger(namespace="mailrelay.delivery.worker")
# Seconds a log line may wait before it goes up the pipe: one write (and one read in the receiving
# process) per batch, not per line; a kill -9 can lose at most this much of the log.
LOG_BATCH_DELAY = 0.01
queued_log = Logger(namespace="mailrelay.queue")


class Commands(LineOnlyReceiver):
    """The main process's orders, on stdin."""

    delimiter = b"\n"
    MAX_LENGTH = 4 * 1024 * 1024       # a `reload` line carries the whole config file (base64)

    def __init__(self, worker: DeliveryWorker, reactor: Any) -> None:
        self.worker, self.reactor = worker, reactor

    def lineReceived(self, line: bytes) -> None:
        verb, _, argument = line.decode("utf-8", "replace").strip().partition(" ")
        if verb == "enqueue" and argument:
            queue_id, _, described = argument.partition(" ")
            if described:
                self.worker.remember(queue_id, described)
            self.worker.scheduler.enqueue(queue_id)
        elif verb == "reload":
            self.worker.reload(decode_source(argument) if argument else None)
        elif verb == "flush":
            self.worker.scheduler.flush(argument or None)
        elif verb == "metrics" and argument.isdigit():
            from mailrelay.metrics import delivery_text

            text = delivery_text(self.worker.metrics)
            if self.transport is not None:      # None only before connectionMade
                self.transport.write(f"metrics {argument} {len(text)}\n".encode("ascii") + text)
        else:
            log.warn("delivery process: unknown command {line!r}", line=line[:80])

    def connectionLost(self, reason=None) -> None:
        if self.reactor.running:
            self.reactor.stop()      # the main process is gone or stopping: finish up and exit


class DeliveryWorker(service.MultiService):
    """The delivery process's service: its children (spool — not its owner —, webhook events, scheduler,
    DSN reporter, next hops, ...) come built, in start order, from the composition root
    (mailrelay.wiring.delivery_worker); this runs the main process's orders against them and stops them
    in the order that loses nothing."""

    def __init__(self, spool: Any, scheduler: Any, metrics: Metrics, services: Iterable[service.IService],
                 reload: Callable[[Optional[bytes]], object], close_idle: Callable[[], defer.Deferred]) -> None:
        """`reload(source)`: apply the config the main process applied (its bytes, or None: re-read the
        file); `close_idle()`: QUIT on the next hops' idle cached connections, once deliveries are done."""
        super().__init__()
        self.spool, self.scheduler, self.metrics = spool, scheduler, metrics
        self._reload, self._close_idle = reload, close_idle
        for child in services:
            child.setServiceParent(self)

    def remember(self, queue_id: str, described: str) -> None:
        """`SIZE OFFSET ENVELOPE-JSON` from the main process: the message as it committed it."""
        from mailrelay.envelope import Envelope
        from mailrelay.spool.message import SpooledMessage

        try:
            size, offset, envelope = described.split(" ", 2)
            message = SpooledMessage(queue_id, Envelope.from_json(envelope), int(size),
                                     self.spool.paths.message(queue_id), int(offset))
        except (ValueError, TypeError, KeyError):
            log.warn("delivery process: {queue_id}: unreadable description; read from the spool instead",
                     queue_id=queue_id)
            return
        self.spool.remember_fresh(message)
        # Postfix's qmgr writes "queue active"; here too the delivery side writes it, from the envelope the
        # main process described, before anything is tried (the receiving process spends nothing on it).
        log_queued(queued_log, queue_id, message.envelope, message.size)

    def reload(self, source: bytes | None = None) -> None:
        """Apply the config the main process just applied (`source`, its bytes), or re-read the file."""
        self._reload(source)

    def stopService(self) -> defer.Deferred:
        """Deliveries in flight first (bounded), then the idle cached connections, then the spool."""
        service.Service.stopService(self)
        rest = [child for child in reversed(list(self)) if child is not self.scheduler]
        d = defer.maybeDeferred(self.scheduler.stopService)
        d.addBoth(lambda _: self._close_idle())
        d.addBoth(lambda _: defer.DeferredList([defer.maybeDeferred(c.stopService) for c in rest],
                                               consumeErrors=True))
        return d


class TickBufferedStream:
    """Log text collected for `delay` seconds (0: one reactor turn) and written with one system call,
    not one write (and flush) per event: the delivery process logs four lines per message."""

    def __init__(self, stream, reactor, delay: float = 0.0):
        self._stream, self._reactor, self._delay = stream, reactor, delay
        self._parts: list[str] = []
        self._pending = False

    def write(self, text: str) -> None:
        self._parts.append(text)
        if not self._pending:
            self._pending = True
            self._reactor.callLater(self._delay, self.drain)

    def flush(self) -> None:
        """A file observer flushes after every event; the real write happens once per turn (drain)."""

    def drain(self) -> None:
        self._pending = False
        parts, self._parts = self._parts, []
        if parts:
            try:
                self._stream.write("".join(parts))
                self._stream.flush()
            except (OSError, ValueError):
                pass          # the main process (our stdout) went away


def decode_source(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        log.warn("delivery process: unreadable config in a reload order; the file is read instead")
        return None
