# -*- test-case-name: tests.test_delivery_process -*-
"""The delivery process: `[delivery] process = "separate"` runs the scheduler and the next hops here, on
the machine's second core, while the main process receives and spools.

    python -m mailrelay.delivery.worker --config tap.conf      (started by delivery.process, not by hand)

In (stdin, one line each): `enqueue QUEUEID` for a message the main process just committed, `reload`
(re-read the config: routes, transports, DKIM keys, queue timings), `flush [QUEUEID]` (due now) and
`metrics SEQ`, answered on `--reply-fd` (the main process's `[metrics] endpoint` serves what comes back:
`metrics SEQ LENGTH`, a newline, LENGTH bytes of the delivery families' text exposition). End of stdin
means stop: deliveries in flight finish (bounded, Scheduler.stopService) and the process exits. Log lines
go to `[log] file` when one is set, else to standard output as events, one JSON object a line,
redacted (mailrelay.logrelay.PipeObserver), gathered for LOG_BATCH_DELAY: that is a pipe to the main
process, which publishes them as events of its own log (delivery.process, mailrelay.logrelay). The
spool is shared: the main process holds its lock and ran recovery before starting this one. With
`--config-on-stdin` the config is the bytes the main process validated (its first line); the files
only the receiving side reads ([tls], [auth]) are not opened here either.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import os
import sys

from twisted.application import service
from twisted.internet import defer, stdio
from twisted.logger import globalLogBeginner
from twisted.protocols.basic import LineOnlyReceiver

from mailrelay.logger import Logger
from mailrelay.logrelay import PipeObserver
from mailrelay.logs import log_queued

log = Logger(namespace="mailrelay.delivery.worker")
# Seconds a log line may wait before it goes up the pipe: one write (and one read in the receiving
# process) per batch, not per line; a kill -9 can lose at most this much of the log.
LOG_BATCH_DELAY = 0.01
queued_log = Logger(namespace="mailrelay.queue")


class Commands(LineOnlyReceiver):
    """The main process's orders, on stdin."""

    delimiter = b"\n"
    MAX_LENGTH = 4 * 1024 * 1024       # a `reload` line carries the whole config file (base64)

    def __init__(self, worker: "DeliveryWorker", reactor):
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
            self.transport.write(f"metrics {argument} {len(text)}\n".encode("ascii") + text)
        else:
            log.warn("delivery process: unknown command {line!r}", line=line[:80])

    def connectionLost(self, reason=None) -> None:
        if self.reactor.running:
            self.reactor.stop()      # the main process is gone or stopping: finish up and exit


class DeliveryWorker(service.MultiService):
    """Spool (not its owner), webhook events, scheduler, DSN reporter and next hops for one config."""

    def __init__(self, config, reactor):
        super().__init__()
        from mailrelay.cluster import wiring as cluster
        from mailrelay.metrics import Metrics, metrics_service
        from mailrelay.service import (build_delivery_parts, build_events, build_scheduler, tls_report_service,
                                       tls_report_store)
        from mailrelay.spool.store import Spool

        self.config, self.reactor = config, reactor
        self.metrics = Metrics()
        self.spool = Spool(config.spool, clock=reactor, reactor=reactor, owner=False,
                           directory_fsync=config.queue.directory_fsync)
        self.spool.setServiceParent(self)
        self.tls_reports = tls_report_store(config, reactor)      # RFC 8460: None when tls_reports is off
        self.parts = build_delivery_parts(config, reactor, metrics=self.metrics, tls_reports=self.tls_reports)
        self.events = build_events(config, reactor, self.metrics)   # webhooks: outboxes and senders
        self.events.setServiceParent(self)
        # `[cluster] redis`: this process's own link, for the [[throttle]] state the relays share.
        self.cluster = cluster.redis_link(config, reactor, self.metrics)
        throttle = cluster.shared_throttle(self.cluster)
        if self.cluster is not None:
            self.cluster.setServiceParent(self)
            throttle.setServiceParent(self)
        self.scheduler = build_scheduler(config, self.spool, self.parts, reactor, self.metrics, self.events,
                                         throttle)
        self.scheduler.setServiceParent(self)
        reports = tls_report_service(config, self.tls_reports, self.spool, self.scheduler, reactor)
        if reports is not None:
            reports.setServiceParent(self)
        if config.metrics.delivery_endpoint:
            metrics_service(config.metrics.delivery_endpoint, self.metrics, reactor=reactor).setServiceParent(self)

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
        from mailrelay.service import build_delivery_parts, reread

        loaded = reread(self.config.path, lambda config, reactor: build_delivery_parts(config, reactor, self.parts,
                                                                              metrics=self.metrics,
                                                                              tls_reports=self.tls_reports),
                        self.reactor, source, delivery_only=True)
        if loaded is not None:
            self.config, parts = loaded
            parts.install(self.scheduler, self.config, replacing=self.parts)
            self.parts = parts
            self.events.reconfigure(self.config.webhooks, self.config.queue.lifetime)

    def stopService(self):
        """Deliveries in flight first (bounded), then the idle cached connections, then the spool."""
        service.Service.stopService(self)
        rest = [child for child in reversed(list(self)) if child is not self.scheduler]
        d = defer.maybeDeferred(self.scheduler.stopService)
        d.addBoth(lambda _: self.parts.close_idle())
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


def batch_scheduling(nice: int = 0) -> bool:
    """Ask Linux for SCHED_BATCH (sched(7)): waking up (a message down the pipe, a reply from a next
    hop) no longer preempts the receiving process mid-session. And run `nice` steps nicer than it
    (`[delivery] process_nice`): when the two want the same core, a client waiting for its 250 goes
    first and a queued message waits a little, then has the core to itself. With a core each, nothing
    changes. No privilege is needed; elsewhere (or if refused) nothing changes. True when SCHED_BATCH
    took effect."""
    if nice:
        try:
            os.nice(nice)
        except (AttributeError, OSError):
            pass
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        return False
    return True


def decode_source(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        log.warn("delivery process: unreadable config in a reload order; the file is read instead")
        return None


def read_config_line(fd: int = 0) -> tuple[bytes | None, bytes]:
    """The main process's first line, `config B64`, read before the reactor runs: (the config bytes, or
    None if the line is not one, and whatever came after the line, for the command reader)."""
    buffered = b""
    while b"\n" not in buffered:
        chunk = os.read(fd, 65536)
        if not chunk:
            return None, buffered
        buffered += chunk
    line, _, rest = buffered.partition(b"\n")
    verb, _, argument = line.partition(b" ")
    if verb != b"config":
        return None, buffered
    try:
        return base64.b64decode(argument, validate=True), rest
    except (binascii.Error, ValueError):
        return None, rest


def main(argv=None) -> int:
    from mailrelay.config import ConfigError, load

    parser = argparse.ArgumentParser(prog="mailrelay-delivery")
    parser.add_argument("--config", required=True)
    parser.add_argument("--reply-fd", type=int, default=None,
                        help="answers to `metrics` go here (default: standard error)")
    parser.add_argument("--config-on-stdin", action="store_true",
                        help="the config file's bytes come first on stdin (`config B64`), as the main "
                             "process validated them; --config then only names the file")
    args = parser.parse_args(argv)
    source, pending = read_config_line() if args.config_on_stdin else (None, b"")
    if args.config_on_stdin and source is None:
        print(f"mailrelay delivery process: {args.config}: no configuration from the main process",
              file=sys.stderr)
        return 2
    try:
        config = load(args.config, source, delivery_only=True)    # the receiving side's files: not ours
    except ConfigError as e:
        print(f"mailrelay delivery process: {e}", file=sys.stderr)
        return 2
    batch_scheduling(config.delivery.process_nice)
    from twisted.internet import reactor

    if config.log.file:
        from mailrelay import logs

        globalLogBeginner.beginLoggingTo([], redirectStandardIO=False)
        logs.install(config.log).startService()
    else:
        stream = TickBufferedStream(sys.stdout, reactor, LOG_BATCH_DELAY)   # to the main process's log
        reactor.addSystemEventTrigger("after", "shutdown", stream.drain)
        globalLogBeginner.beginLoggingTo([PipeObserver(stream)], redirectStandardIO=False)
    worker = DeliveryWorker(config, reactor)
    worker.startService()
    reactor.addSystemEventTrigger("before", "shutdown", worker.stopService)
    reply_fd = args.reply_fd if args.reply_fd is not None else sys.stderr.fileno()
    commands = Commands(worker, reactor)
    stdio.StandardIO(commands, stdout=reply_fd)
    if pending:
        commands.dataReceived(pending)      # orders that came in the same read as the config
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
