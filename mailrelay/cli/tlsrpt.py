# -*- test-case-name: tests.test_tlsrpt, tests.test_tlsrpt_end_to_end -*-
"""`mailrelay tlsrpt send --config FILE`: send the TLS reports (RFC 8460) due now.

It does what the relay's daily run does (outbound.tlsrpt_send), at once, and with today's results so
far: it takes the results gathered since the last report from <spool>/tlsrpt/ (a rename under the
store's journal lock: the running relay's next append starts a new file, nothing is counted twice or
lost), and sends each domain that publishes `_smtp._tls` a report — mail reports into the spool,
https reports posted from here.  One report run at a time: a daily run under way makes this one wait
for it (up to WAIT seconds).

With a running relay (it holds <spool>/lock) each mail report is followed by a `flush` request in
<spool>/control/ (spool/control.py), so the relay delivers it within a second; a failed https POST is
left in <spool>/tlsrpt/outbox/ for the relay to retry.  With a stopped relay, this process holds the
spool lock while it writes (a relay starting meanwhile refuses to start), and the reports go out when
the relay starts.

Output: one line per report destination ("... mail to ... queued as ID", "... POST to ...: HTTP 200");
exit 0 when all were sent (or none was due), 1 when one failed (or tls_reports is off), 2 for the config.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import cast

from mailrelay.cli.common import EXIT_FAILED, EXIT_OK, CLIError, guarded, load_config

PROG = "mailrelay tlsrpt"
WAIT = 60.0          # seconds to wait for a report run already under way


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tlsrpt", help="TLS reports (RFC 8460) to domains that ask for them",
        description="TLS reports (RFC 8460) to the domains that publish _smtp._tls.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    send = actions.add_parser("send", help="send now what was gathered since the last report",
                              description="Send every domain that asks for TLS reports a report of the "
                                          "results gathered since its last one, now.")
    send.add_argument("--config", required=True, metavar="FILE", help="the relay's tap.conf")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return guarded(PROG, "spool", lambda: _send(args))


def _send(args: argparse.Namespace) -> int:
    from mailrelay.spool import Spool, SpoolLocked
    from mailrelay.spool.files import SpoolPaths, acquire_lock, ensure_directories

    config = load_config(args.config)
    if not config.delivery.tls_reports:
        raise CLIError(f"{config.path}: [delivery] tls_reports is false: no TLS results are gathered, "
                       "no reports sent")
    paths = SpoolPaths(config.spool)
    ensure_directories(paths)
    lock = None
    if not Spool.in_use(config.spool):
        try:
            lock = acquire_lock(paths.lock)
        except SpoolLocked:
            lock = None          # a relay started just now: hand it the reports like a running one
    try:
        lines = _run_reactor(config, paths, running=lock is None)
    finally:
        if lock is not None:
            os.close(lock)
    for _, line in lines:
        print(line)
    if not lines:
        print("no TLS reports due")
    return EXIT_OK if all(ok for ok, _ in lines) else EXIT_FAILED


def _run_reactor(config, paths, running: bool) -> list:
    """The report run on a reactor of our own (DNS lookups on threads, https through treq)."""
    from twisted.internet import defer, reactor, task
    from twisted.internet.base import ReactorBase
    from twisted.python.failure import Failure

    from mailrelay.outbound.tlsrpt_send import ReportRunBusy, TLSReportSender, https_post, txt_lookup
    from mailrelay.outbound.tlsrpt_store import store_directory
    from mailrelay.spool import Spool
    from mailrelay.spool.control import post_request

    spool = Spool(config.spool, clock=reactor, directory_fsync=config.queue.directory_fsync)   # not started:
    spooled = (lambda queue_id: post_request(paths.control, "flush", queue_id)) if running else (lambda _: None)
    sender = TLSReportSender(config.hostname, store_directory(config.spool), spool,
                             txt_lookup(config.delivery.nameservers, reactor), https_post(reactor), reactor,
                             spooled=spooled)
    outcome: dict = {}

    @defer.inlineCallbacks
    def main():
        deadline = time.monotonic() + WAIT
        while True:
            try:
                lines = yield sender.run(include_today=True)
                return lines
            except ReportRunBusy:
                if time.monotonic() > deadline:
                    raise CLIError("another TLS report run is still in progress; try again later") from None
                yield task.deferLater(reactor, 1.0, lambda: None)

    def done(result):
        outcome["result"] = result
        reactor.stop()

    reactor.callWhenRunning(lambda: main().addBoth(done))
    # The installed reactor is a ReactorBase; IReactorCore.run declares no installSignalHandlers.
    cast(ReactorBase, reactor).run(installSignalHandlers=False)
    result = outcome.get("result")
    if isinstance(result, Failure):
        result.raiseException()
    return result or []
