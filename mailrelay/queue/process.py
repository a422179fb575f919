# -*- test-case-name: tests.test_delivery_process -*-
"""The main process's end of `[delivery] process = "separate"`: starts the delivery process
(mailrelay.delivery_main), tells it of every committed message, forwards reloads, logs what it logs,
starts it again if it dies, and stops it gracefully.

Python runs one thread at a time, so one process uses one core; receiving (sessions, spool writes) and
delivering (scheduler, next hops, DKIM) then share it. Two processes use two. They share nothing but the
spool directory and a pipe: committed queue ids go down the child's stdin (`enqueue ID`). A message is
durable before its id is sent; if the pipe or the child is lost, the child's next start finds the message
in the spool anyway.

Configuration: the child runs the bytes of the config file this process validated (`config` and
`reload` lines carry them, base64), never the file as it may read later: a child started again after a
crash, or at a moment the file is half edited, delivers with what this process runs.

Orders down the same pipe: `flush [ID]` (make every message, or one, due now) and `metrics SEQ` (the
delivery side's metrics families, for `[metrics] endpoint` here). The child answers the latter on its fd 3,
a pipe of its own: `metrics SEQ LENGTH`, a newline, then LENGTH bytes of text exposition.

Log lines: with `[log] file` the child appends to that file itself. Without one it sends its events up
its standard output, one JSON object a line, in batches (queue.worker.LOG_BATCH_DELAY), and `log_text`
publishes them as events of this process's log (mailrelay.logrelay), with their namespace, level, time,
queue id and fields: a daemonised twistd's log file, rotated by twistd, gets them like our own. What
the child writes to its standard error (a traceback, a refused config) is logged here as warnings.
"""
from __future__ import annotations

import base64
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from mailrelay.interfaces import IScheduler
from mailrelay.logger import Logger
from mailrelay.logrelay import publish_lines
from mailrelay.logs import log_queued
from mailrelay.net import write_now

log = Logger(namespace="mailrelay.delivery.process")

RESTART_DELAY = 1.0      # seconds before a delivery process that died is started again ...
RESTART_MAX = 60.0       # ... doubling while it keeps dying within STABLE seconds of its start
STABLE = 30.0
STOP_BOUND = 60.0        # the child's own stop waits up to 30 s for deliveries in flight; then TERM, KILL
METRICS_WAIT = 2.0       # seconds a scrape waits for the child's metrics; then it goes out without them
REPLY_FD = 3             # the child's end of the pipe its answers come up


class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self, owner: "DeliveryProcess"):
        self.owner = owner
        self.ended: defer.Deferred = defer.Deferred()
        self._partial = {1: b"", 2: b""}      # bytes after the last newline, per pipe

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == REPLY_FD:
            self.owner.child_reply(data)
            return
        # Split on newlines before decoding: a read may end inside a multi-byte UTF-8 character.
        whole, _, self._partial[fd] = (self._partial.get(fd, b"") + data).rpartition(b"\n")
        if whole:
            self.owner.child_output(fd, whole.decode("utf-8", "backslashreplace") + "\n")

    def processEnded(self, reason) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self.owner.child_output(fd, rest.decode("utf-8", "backslashreplace") + "\n")
        self._partial = {1: b"", 2: b""}
        self.ended.callback(None)      # how it ended is logged by child_ended, not raised
        self.owner.child_ended(self, reason)


def enqueue_line(queue_id: str, message=None) -> str:
    """`enqueue ID` or `enqueue ID SIZE OFFSET ENVELOPE-JSON` (the envelope JSON is one line)."""
    if message is None:
        return f"enqueue {queue_id}\n"
    envelope = message.envelope.to_json().decode("utf-8")
    return f"enqueue {queue_id} {message.size} {message.data_offset} {envelope}\n"


def config_line(verb: str, source: bytes) -> bytes:
    """`config B64` / `reload B64`: the config file's bytes on one line."""
    return verb.encode("ascii") + b" " + base64.b64encode(source) + b"\n"


def child_environment() -> dict:
    """Ours, with the directory this mailrelay was imported from first on the path: the child runs the
    same code as the main process, installed or not."""
    import mailrelay

    env = dict(os.environ)
    here = str(Path(mailrelay.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    return env


@implementer(IScheduler)
class DeliveryProcess(service.Service):
    """Stands in for the scheduler in the main process (`enqueue`), running the real one in a child."""

    logs_queued = True      # each message's "queued" line comes from here or from the child (QueueFront)

    def __init__(self, config_path, reactor, python: str = sys.executable, spool=None,
                 log_text: Optional[Callable[[str], None]] = None, source: Optional[bytes] = None):
        """`spool`: ours; what it remembers of a fresh commit (size, offset, envelope) goes down the pipe
        with the id, so the child need not read the file back to start delivering it. `log_text`: takes
        the child's log lines (whole lines, one event each: mailrelay.logrelay); default: published on
        twisted.logger's global publisher. `source`: the config file's bytes as validated (Config.source);
        None: the child reads the file itself."""
        self.config_path, self.reactor, self.python, self.spool = str(config_path), reactor, python, spool
        self.source = source
        self._log_text = log_text or (lambda text: publish_lines(globalLogPublisher, text))
        self._child: Optional[_ChildProtocol] = None
        self._transport: Optional[IProcessTransport] = None
        self._restart: Optional[IDelayedCall] = None
        self._outgoing: list[tuple] = []       # (queue id, SpooledMessage or None) for this turn
        self._started_at = 0.0
        self._delay = RESTART_DELAY
        self.restarts = 0
        self._flushes: list[str] = []          # flush orders given while no child was there to take them
        self._asked: dict[int, defer.Deferred] = {}      # metrics requests awaiting the child's answer
        self._sequence = 0
        self._replies = b""

    def startService(self) -> None:
        super().startService()
        self._spawn()

    def _spawn(self) -> None:
        self._restart = None
        self._started_at = self.reactor.seconds()
        self._child = _ChildProtocol(self)
        self._transport = transport = self.reactor.spawnProcess(
            self._child, self.python, [self.python, "-m", "mailrelay.delivery_main", "--config", self.config_path,
                                       "--reply-fd", str(REPLY_FD)]
            + (["--config-on-stdin"] if self.source is not None else []),
            env=child_environment(), childFDs={0: "w", 1: "r", 2: "r", REPLY_FD: "r"},
        )
        if self.source is not None:
            self._write(config_line("config", self.source))
        log.info("delivery process started (pid {pid})", pid=transport.pid)
        flushes, self._flushes = self._flushes, []
        for line in flushes:             # after its recovery has scheduled the spool: they still apply
            self._write(line.encode("ascii"))

    def flush(self, queue_id: Optional[str] = None) -> None:
        """Make every message (or one) due now, in the child (as Scheduler.flush); a flush given while the
        child is being restarted is handed to the next one."""
        line = f"flush {queue_id}\n" if queue_id else "flush\n"
        if self._transport is None:
            if self.running:
                self._flushes.append(line)
            return
        self._send_enqueued()              # ids committed this turn first: they are part of "every"
        self._write(line.encode("ascii"))

    # -- the child's metrics, for [metrics] endpoint -------------------------------------------------------

    def metrics_text(self, timeout: float = METRICS_WAIT) -> defer.Deferred:
        """The child's DELIVERY_FAMILIES as exposition text (bytes), or None if it has not answered
        within `timeout` seconds (stopped, restarting, stuck): a scrape never waits longer."""
        if self._transport is None:
            return defer.succeed(None)
        self._sequence += 1
        sequence = self._sequence
        answer: defer.Deferred = defer.Deferred()
        self._asked[sequence] = answer
        timer = self.reactor.callLater(timeout, self._answer, sequence, None)

        def cancel(result):
            if timer.active():
                timer.cancel()
            return result
        answer.addBoth(cancel)
        self._write(f"metrics {sequence}\n".encode("ascii"))
        return answer

    def _answer(self, sequence: int, text: Optional[bytes]) -> None:
        waiting = self._asked.pop(sequence, None)
        if waiting is not None:
            waiting.callback(text)

    def child_reply(self, data: bytes) -> None:
        """Bytes from the child's fd 3: `metrics SEQ LENGTH` lines, each followed by LENGTH bytes."""
        self._replies += data
        while True:
            head, newline, rest = self._replies.partition(b"\n")
            if not newline:
                return
            try:
                verb, number, size = head.split(b" ")
                sequence, length = int(number), int(size)
                if verb != b"metrics" or length < 0:
                    raise ValueError(head)
            except ValueError:
                log.warn("delivery process: unreadable reply {head!r}", head=head[:80])
                self._replies = rest
                continue
            if len(rest) < length:
                return
            self._replies = rest[length:]
            self._answer(sequence, rest[:length])

    def enqueue(self, queue_id: str) -> None:
        """Tell the child; the ids committed in one reactor turn go down the pipe in one write. The child
        writes the message's "queued" line when it reads the description (so the receiving process
        spends nothing on it); a message it will not be told of gets its line here."""
        fresh = self.spool.take_fresh(queue_id) if self.spool else None
        if self._transport is None or fresh is None:
            self._log_queued(queue_id, fresh)
            if self._transport is None:
                return   # the child is being restarted; at start it schedules everything in the spool
        self._outgoing.append((queue_id, fresh))
        if len(self._outgoing) == 1:
            self.reactor.callLater(0, self._send_enqueued)

    def _send_enqueued(self) -> None:
        items, self._outgoing = self._outgoing, []
        if self._transport is None:
            for queue_id, fresh in items:          # the child went away meanwhile
                if fresh is not None:
                    self._log_queued(queue_id, fresh)
            return
        if items:
            self._write("".join(enqueue_line(queue_id, fresh) for queue_id, fresh in items).encode("ascii"))

    @staticmethod
    def _log_queued(queue_id: str, message) -> None:
        if message is None:
            log_queued(log, queue_id)
        else:
            log_queued(log, queue_id, message.envelope, message.size)

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return                       # no child to tell (callers check first)
        stdin = getattr(transport, "pipes", {}).get(0)   # twisted's Process keeps its pipes there
        if stdin is not None:
            write_now(stdin, data)       # straight into the pipe when nothing is queued before it
        else:
            transport.write(data)

    def child_output(self, fd: int, text: str) -> None:
        """Whole lines from the child: its log (fd 1) or its standard error (fd 2)."""
        if fd == 1:
            self._log_text(text)
            return
        for line in text.splitlines():
            if line.strip():
                log.warn("delivery process: {line}", line=line)

    def reload(self, source: Optional[bytes] = None) -> None:
        """The main process applied a reload: `source`, the bytes it validated, are the child's too (and
        any later child's)."""
        if source is not None:
            self.source = source
        if self._transport is not None:
            self._write(config_line("reload", self.source) if self.source is not None else b"reload\n")

    def child_ended(self, child: _ChildProtocol, reason) -> None:
        if child is not self._child:
            return
        self._transport = None
        self._replies = b""
        for sequence in list(self._asked):
            self._answer(sequence, None)
        if self.running:
            self.restarts += 1
            if self.reactor.seconds() - self._started_at >= STABLE:
                self._delay = RESTART_DELAY          # it ran for a while: this is not a crash loop
            log.error("delivery process ended unexpectedly ({reason}); starting it again in {delay} s",
                      reason=reason.getErrorMessage(), delay=self._delay)
            self._restart = self.reactor.callLater(self._delay, self._spawn)
            self._delay = min(self._delay * 2, RESTART_MAX)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        if self._transport is None:
            return defer.succeed(None)
        self._send_enqueued()             # ids still waiting for this turn's write go first
        transport = self._transport
        ended = self._child.ended if self._child is not None else defer.succeed(None)
        self._transport = None
        transport.closeStdin()            # the child's signal to finish its deliveries and exit
        timers = [self.reactor.callLater(STOP_BOUND, self._signal, transport, "TERM"),
                  self.reactor.callLater(STOP_BOUND + 5, self._signal, transport, "KILL")]

        def done(_):
            for timer in timers:
                if timer.active():
                    timer.cancel()
            log.info("delivery process stopped")

        return ended.addBoth(done)

    @staticmethod
    def _signal(transport, name: str) -> None:
        try:
            transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass
