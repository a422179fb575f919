# -*- test-case-name: tests.test_delivery_process -*-
"""The delivery process's entry point: `[delivery] process = "separate"` runs the scheduler and the next
hops in this process, on the machine's second core, while the main process receives and spools.

    python -m mailrelay.delivery_main --config tap.conf      (started by queue.process, not by hand)

It reads the config, asks for batch scheduling, sets up the log, has the composition root
(mailrelay.wiring.delivery_worker) build the queue.worker.DeliveryWorker, and reads the main
process's orders (queue.worker.Commands) on stdin until it closes. Log lines go to `[log] file` when
one is set, else to standard output as events, one JSON object a line, redacted
(mailrelay.logrelay.PipeObserver), gathered for LOG_BATCH_DELAY: that is a pipe to the main process,
which publishes them as events of its own log (queue.process, mailrelay.logrelay). With
`--config-on-stdin` the config is the bytes the main process validated (its first line); the files
only the receiving side reads ([tls], [auth]) are not opened here either.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import os
import sys
from typing import Optional

from twisted.internet import stdio
from twisted.logger import globalLogBeginner

from mailrelay.queue.worker import LOG_BATCH_DELAY, Commands, TickBufferedStream
from mailrelay.logrelay import PipeObserver


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


def main(argv: Optional[list[str]] = None) -> int:
    from mailrelay.config import ConfigError, load
    from mailrelay.wiring import delivery_worker

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
    worker = delivery_worker(config, reactor)
    worker.startService()
    reactor.addSystemEventTrigger("before", "shutdown", worker.stopService)
    reply_fd = args.reply_fd if args.reply_fd is not None else sys.stderr.fileno()
    commands = Commands(worker, reactor)
    # mypy sees the Windows StandardIO (stdio.py picks one at run time); this is the POSIX one.
    stdio.StandardIO(commands, stdout=reply_fd)  # type: ignore[call-arg]
    if pending:
        commands.dataReceived(pending)      # orders that came in the same read as the config
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
