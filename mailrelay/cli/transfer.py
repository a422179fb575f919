# -*- test-case-name: tests.test_queue_transfer -*-
"""`mailrelay queue transfer --to HOST:PORT [--hold] --config FILE`: hand every queued message to
another relay over SMTP, the way a node is drained before it is retired.

In: the spool of this relay (stopped, or running with `--hold`), the address of the relay that takes
over.  Out: each message's pending recipients sent there in one SMTP transaction per message (the
envelope as it was received: sender, BODY, SMTPUTF8 and the other parameters the delivery client
passes on), and each message removed from this spool only after the other relay's 250 for it.

Safety, message by message (RFC 5321 section 6.1: a 250 transfers responsibility):
- The next message is not offered before the previous one's removal (or its new state) is on disk
  (the delivery client's on_settled), so a crash or kill -9 of this command at any point sends at most
  the one message in flight a second time when it is run again, and loses none.
- Recipients the other relay refuses stay here, pending, with their state untouched (no attempt is
  counted, no DSN is sent): the local relay, or a second run, deals with them.
- A running relay delivers from the same spool: a transfer beside it would race its deliveries, so it
  is refused unless `--hold` is given.  `--hold` first suspends the relay's deliveries (a control
  request it carries out within a second; the suspension is persisted in the spool, so a restart
  stays suspended), waits until its deliveries in flight have ended, and only then takes over.  The
  relay keeps accepting mail while suspended (take the node out of the load balancer first); a
  transfer goes on until a pass over the spool finds nothing new.  `mailrelay queue resume` undoes it.
- With a stopped relay, this command holds the spool lock throughout, so the relay cannot start
  meanwhile; `--hold` then leaves the spool suspended for when it does.

Held messages (`mailrelay queue hold`) are left alone and listed; a message whose state cannot be read
is left for the postmaster.  Nothing is signed here: the receiving relay applies its own permit rules
(and DKIM) to this relay as its client.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from twisted.internet import defer, task
from twisted.python.failure import Failure

from mailrelay.cli.common import EXIT_FAILED, EXIT_OK, CLIError, error, guarded, load_config
from mailrelay.config import Config
from mailrelay.queue.job import Job
from mailrelay.queue.results import RecipientResult
from mailrelay.queue.state import DELIVERED, LastReply, MessageState, StateError
from mailrelay.spool import CorruptMessage, Spool, SpoolLocked, UnknownMessage
from mailrelay.spool.files import acquire_lock, fsync_directory

PROG = "mailrelay queue transfer"
BATCH = 50              # messages per connection
SUSPEND_POLL = 0.2      # seconds between looks at the running relay's suspension record
SECURITY = ("starttls", "tls", "opportunistic", "none")


def register(actions: Any, common: argparse.ArgumentParser) -> None:
    """Add `transfer` to `mailrelay queue`'s actions."""
    text = "hand every queued message to another relay over SMTP, removing each after its 250"
    parser = actions.add_parser("transfer", parents=[common], help=text, description=text)
    parser.add_argument("--to", required=True, metavar="HOST:PORT", help="the relay that takes the mail")
    parser.add_argument("--hold", action="store_true",
                        help="suspend a running relay's deliveries first (and leave them suspended)")
    parser.add_argument("--security", choices=SECURITY, default="starttls",
                        help="starttls (default: TLS required, any certificate unless --verify), tls "
                             "(implicit, port 465), opportunistic, none")
    parser.add_argument("--verify", action="store_true",
                        help="check the other relay's certificate and host name (against --ca-file, or the "
                             "system's trust)")
    parser.add_argument("--ca-file", metavar="FILE", help="trust these CAs for --verify")
    parser.add_argument("--wait", type=float, default=300.0, metavar="SECONDS",
                        help="how long --hold waits for the running relay's deliveries in flight (300)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    def act() -> int:
        config = load_config(args.config)
        host, port = _address(args.to)
        if args.ca_file and not os.access(args.ca_file, os.R_OK):
            raise CLIError(f"{args.ca_file}: cannot read the CA file")
        outcome: list[Any] = []

        def main(reactor: Any) -> defer.Deferred:
            d = defer.ensureDeferred(_transfer(reactor, config, args, host, port))
            return d.addBoth(outcome.append)        # a failure too: raised below, where guarded sees it
        try:
            task.react(main, [])
        except SystemExit:             # react always exits; our status is what _transfer returned
            pass
        if not outcome:
            raise CLIError("transfer did not complete")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return int(outcome[0])
    return guarded(PROG, "spool", act)


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CLIError(f"--to {text!r}: give HOST:PORT, e.g. 10.0.0.2:25 or [::1]:25")
    return host, int(port)


@dataclass
class Tally:
    messages: int = 0
    recipients: int = 0
    kept: dict[str, str] = field(default_factory=dict)     # queue id -> why it is still here
    held: int = 0


async def _transfer(reactor: Any, config: Config, args: argparse.Namespace, host: str, port: int) -> int:
    spool = Spool(config.spool, clock=reactor, directory_fsync=config.queue.directory_fsync)
    try:
        lock = acquire_lock(spool.paths.lock)
    except SpoolLocked:
        lock = None
    except FileNotFoundError:
        raise CLIError(f"{config.spool}: no spool there") from None
    try:
        if lock is None:
            if not args.hold:
                raise CLIError(f"the relay using {config.spool} is running: its deliveries would race the "
                               "transfer; stop it first, or give --hold to suspend its deliveries")
            await _suspend_running(reactor, spool, args.wait)
        elif args.hold:
            spool.set_suspension({"since": time.time(), "in_flight": 0, "idle": True, "pid": os.getpid()})
            print(f"{config.spool}: deliveries suspended for when the relay starts "
                  "(`mailrelay queue resume` undoes it)")
        tally = Tally()
        tried: set[str] = set()
        while True:                    # until a pass finds nothing it has not tried (mail keeps arriving)
            ids = [q for q in spool.queue_ids() if q not in tried]
            if not ids:
                break
            tried.update(ids)
            await _pass(reactor, spool, config, args, host, port, ids, tally)
        for directory in (spool.paths.queue, spool.paths.state):
            fsync_directory(directory)         # the removals, on disk before we say so
    finally:
        if lock is not None:
            os.close(lock)
    return _report(tally, host, port, config, resumed_hint=lock is None)


async def _suspend_running(reactor: Any, spool: Spool, wait: float) -> None:
    spool.post_request("suspend")
    print("asked the running relay to suspend its deliveries")
    deadline = reactor.seconds() + wait
    record: Optional[dict] = None
    while reactor.seconds() < deadline:
        record = spool.suspension()
        if record is not None and record.get("idle"):
            print("the running relay's deliveries are suspended and none is in flight")
            return
        await task.deferLater(reactor, SUSPEND_POLL, lambda: None)
    in_flight = record.get("in_flight") if record else "unknown"
    raise CLIError(f"the running relay did not finish its deliveries in flight within {wait:g} s "
                   f"(in flight: {in_flight}); it stays suspended: run the transfer again, or "
                   "`mailrelay queue resume`")


async def _pass(reactor: Any, spool: Spool, config: Config, args: argparse.Namespace, host: str, port: int,
                ids: list[str], tally: Tally) -> None:
    jobs: list[tuple[Job, MessageState]] = []
    for queue_id in ids:
        loaded = _load(spool, queue_id, tally)
        if loaded is not None:
            jobs.append(loaded)
    for start in range(0, len(jobs), BATCH):
        batch = jobs[start:start + BATCH]
        await _send(reactor, spool, config, args, host, port, batch, tally)


def _load(spool: Spool, queue_id: str, tally: Tally) -> Optional[tuple[Job, MessageState]]:
    try:
        message = spool.load(queue_id)
    except UnknownMessage:
        return None                                  # delivered or removed since it was listed
    except CorruptMessage as e:
        tally.kept[queue_id] = f"unreadable: {e}"
        return None
    if message.held:
        tally.held += 1
        tally.kept[queue_id] = "held (release it first, or it stays here)"
        return None
    try:
        state = MessageState.from_dict(message.state, message.envelope.recipients)
    except StateError as e:
        tally.kept[queue_id] = f"delivery state unreadable: {e}"
        return None
    pending = tuple(r.recipient for r in state.pending)
    if not pending:
        if state.unreported:
            tally.kept[queue_id] = "a DSN is still owed to its sender (the local relay sends it)"
        return None
    return Job(message, pending), state


async def _send(reactor: Any, spool: Spool, config: Config, args: argparse.Namespace, host: str, port: int,
                batch: list[tuple[Job, MessageState]], tally: Tally) -> None:
    implicit = args.security == "tls"
    policy = {"none": "none", "opportunistic": "opportunistic"}.get(args.security,
                                                                    "verify" if args.verify else "required")
    where = f"{host}:{port}"
    from mailrelay.outbound.smarthost import deliver_to_host   # the SMTP client and TLS: only when sending

    def settled(index: int, results: list[RecipientResult]) -> defer.Deferred:
        job, state = batch[index]
        return defer.maybeDeferred(_record, spool, job, state, results, where, tally)

    result = await deliver_to_host(
        host, port, [job for job, _ in batch], helo=config.hostname, tls_policy=policy, implicit_tls=implicit,
        ca_file=args.ca_file, reactor=reactor, clock=reactor, on_settled=settled)
    # Jobs the connection never settled (it was lost): their recipients stay here, untouched.
    for (job, _state), results in zip(batch, result.jobs):
        queue_id = job.message.queue_id
        if queue_id not in tally.kept and spool.exists(queue_id) and not all(r.delivered for r in results):
            tally.kept[queue_id] = _why(results)


def _record(spool: Spool, job: Job, state: MessageState, results: list[RecipientResult], where: str,
            tally: Tally) -> Optional[defer.Deferred]:
    """After the other relay's answers to one message: remove it if it has nothing left here, else save
    the recipients it took as delivered.  Done before the next message is offered."""
    queue_id = job.message.queue_id
    taken = [r for r in results if r.delivered]
    if not taken:
        tally.kept[queue_id] = _why(results)
        return None
    for r in taken:
        rcpt = state.get(r.recipient)
        state = state.with_recipient(replace(
            rcpt, done=DELIVERED, last_reply=LastReply(r.code, r.status, f"transferred to {where}: {r.text}",
                                                       r.remote_host)))
    tally.messages += 1
    tally.recipients += len(taken)
    if len(taken) < len(results):
        tally.kept[queue_id] = _why([r for r in results if not r.delivered])
    if state.pending or state.unreported:
        return spool.save_state(queue_id, state.to_dict())
    return spool.remove(queue_id)


def _why(results: list[RecipientResult]) -> str:
    refused = [r for r in results if not r.delivered]
    if not refused:
        return "not settled"
    first = refused[0]
    return f"{len(refused)} recipient(s) not taken: {first.code} {first.status} {first.text}".strip()


def _report(tally: Tally, host: str, port: int, config: Config, resumed_hint: bool) -> int:
    noun = "message" if tally.messages == 1 else "messages"
    print(f"transferred {tally.messages} {noun} ({tally.recipients} recipients) to {host}:{port}")
    for queue_id, why in sorted(tally.kept.items()):
        error(PROG, f"{queue_id} kept: {why}")
    if resumed_hint:
        print("the relay's deliveries stay suspended: `mailrelay queue resume --config ...` lets it "
              "deliver what is left")
    return EXIT_FAILED if tally.kept else EXIT_OK
