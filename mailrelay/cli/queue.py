# -*- test-case-name: tests.test_cli_queue, tests.test_webhook -*-
"""`mailrelay queue list|show ID|flush [ID]|hold ID|release ID|delete ID|bounce ID|suspend|resume|
webhooks|throttle|transfer --config FILE`.

The operator's hand on the middle of the journey: the messages waiting in the spool between the SMTP
session's 250 and their last delivery attempt (Postfix's postqueue -p/-f and postsuper -h/-H/-d).
In: the config (for `spool`), an action, maybe a queue id.  Out: text (or `--json`) on stdout, and:

- with a running relay (it holds <spool>/lock): the action is posted as a request in <spool>/control/
  (spool/control.py); the scheduler takes requests every 0.5 s, so it acts within a second.
- with a stopped relay: this process takes the spool lock itself for the few milliseconds it needs (so a
  relay starting meanwhile cannot race it; it refuses to start instead) and acts on the spool:
  hold/release set or clear the persisted hold flag, delete removes message, state and flag (no DSN),
  flush sets every pending recipient's `next_attempt` to 0 ("now" in queue/state.py), and bounce
  gives every pending recipient the final answer the scheduler itself records for a bounce request
  (done="bounced", not yet reported, scheduler.ADMIN_BOUNCE), which the scheduler reports in a DSN
  (RFC 3464) and then removes the message as soon as it starts.

`list` ends with one line per webhook outbox (events.store: pending events, oldest, last error), and
`webhooks` shows only those.  Reading (list, show, webhooks) never takes the lock: queue and state
files are replaced atomically.  `throttle`
(and the end of `list`) shows the running relay's `[[throttle]]` state from <spool>/throttle.json,
which its scheduler rewrites every few seconds and removes when it stops (queue.shaping).
Failures are one line on stderr, never a traceback: an unknown id exits 1, a config error exits 2.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mailrelay.cli import transfer
from mailrelay.cli.common import EXIT_FAILED, EXIT_OK, CLIError, error, guarded, load_config
from mailrelay.config import Config
from mailrelay.cli.queue_format import (HEADER_CAP, QueueEntry, entry_dict, paused_destinations, printable,
                                        sender_text, show_lines, summary_line, throttle_lines, webhook_dict,
                                        webhook_lines)
from mailrelay.cli.queue_listing import list_queue
from mailrelay.config.webhooks import display_url
from mailrelay.events.store import read_backlog
from mailrelay.queue.control import ADMIN_BOUNCE
from mailrelay.queue.shaping import STATUS_FILE, read_status
from mailrelay.queue.state import BOUNCED, MessageState, StateError
from mailrelay.spool import CorruptMessage, Spool, SpoolLocked, UnknownMessage
from mailrelay.spool.files import acquire_lock
from mailrelay.spool.ids import is_valid_queue_id
from mailrelay.spool.message import check_file, read_header

PROG = "mailrelay queue"

_ACTIONS = (   # name, help, queue id ("required" | "optional" | None), --json
    ("list", "one line per waiting message, and a summary", None, True),
    ("show", "a message's envelope, per-recipient state and header section", "required", True),
    ("flush", "make every message (or one) due now", "optional", False),
    ("hold", "keep a message but stop delivering it", "required", False),
    ("release", "deliver a held message again", "required", False),
    ("delete", "remove a message without a DSN", "required", False),
    ("bounce", "give up on a message's pending recipients, with a DSN to the sender", "required", False),
    ("suspend", "stop every delivery (persisted) until resume; mail is still accepted", None, False),
    ("resume", "deliver again after suspend or `transfer --hold`", None, False),
    ("webhooks", "the delivery events waiting for each [[webhook]] URL", None, True),
    ("throttle", "the running relay's throttled destinations: pauses, connections, rates, what waits", None,
     True),
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "queue", help="inspect and manage the spool of a running or stopped relay",
        description="Inspect and manage the messages waiting in the relay's spool.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, metavar="FILE", help="the relay's tap.conf")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text, takes_id, has_json in _ACTIONS:
        action = actions.add_parser(name, parents=[common], help=help_text, description=help_text)
        if takes_id == "required":
            action.add_argument("queue_id", metavar="ID", help="the queue id, as `queue list` shows it")
        elif takes_id == "optional":
            action.add_argument("queue_id", metavar="ID", nargs="?", help="only this message")
        if has_json:
            action.add_argument("--json", action="store_true", help="print JSON with full detail")
    transfer.register(actions, common)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, clock=None) -> int:
    """Carry out one queue action; `clock` (default: the reactor) gives the time ages are measured to."""
    if clock is None:
        from twisted.internet import reactor as clock

    def act() -> int:
        config = load_config(args.config)
        spool = Spool(config.spool, clock=clock, directory_fsync=config.queue.directory_fsync)
        return _HANDLERS[args.action](spool, args, clock.seconds(), config)
    return guarded(PROG, "spool", act)


# -- reading the spool -----------------------------------------------------------------------------

def read_entry(spool: Spool, queue_id: str, held: Optional[set[str]] = None) -> Optional[QueueEntry]:
    """The message as the CLI shows it; None if it is gone (delivered since it was listed).  A damaged
    state or queue file is reported in `problem`, never raised: one bad message must not hide the rest.
    `held`: the held ids (Spool.held_ids()) when reading many, else each message's flag is looked up."""
    try:
        message = spool.load(queue_id, None if held is None else queue_id in held)
    except UnknownMessage:
        return None
    except CorruptMessage as e:
        return _damaged_entry(spool, queue_id, str(e))
    try:
        state = MessageState.from_dict(message.state, message.envelope.recipients)
    except StateError as e:
        problem = f"delivery state: {e}"
        return QueueEntry(queue_id, message.envelope, message.size, message.held, None, problem)
    return QueueEntry(queue_id, message.envelope, message.size, message.held, state)


def _damaged_entry(spool: Spool, queue_id: str, problem: str) -> Optional[QueueEntry]:
    held = spool.is_held(queue_id)
    try:
        header = check_file(spool.paths.message(queue_id))
    except CorruptMessage as e:
        if not spool.exists(queue_id):
            return None
        return QueueEntry(queue_id, None, 0, held, None, str(e))
    return QueueEntry(queue_id, header.envelope, header.size, held, None, problem)


def read_headers(path: Path, cap: int = HEADER_CAP) -> tuple[bytes, bool]:
    """The message's header section (up to the first empty line, RFC 5322 §2.1), at most `cap` bytes
    of it; True when it was cut.  The body is never read beyond what `cap` lets in."""
    with open(path, "rb") as f:
        f.seek(read_header(f).data_offset)
        data = f.read(cap + 1)
    blank = re.search(rb"^\r?$", data, re.MULTILINE)
    if blank is not None and blank.end() < len(data):
        return data[:blank.start()], False
    if len(data) <= cap:
        return data, False               # a message that is all header
    cut = data.rfind(b"\n", 0, cap) + 1 or cap
    return data[:cut], True


def _queue_id(spool: Spool, text: str) -> str:
    """The id `text` names, if such a message is in the spool; one-line failure (exit 1) otherwise."""
    queue_id = text.strip().upper()
    if not (is_valid_queue_id(queue_id) and spool.exists(queue_id)):
        raise CLIError(f"no message {printable(text)} in {spool.directory}")
    return queue_id


def _entry(spool: Spool, queue_id: str) -> QueueEntry:
    entry = read_entry(spool, queue_id)
    if entry is None:
        raise CLIError(f"no message {queue_id} in {spool.directory}")
    return entry


# -- list, show ------------------------------------------------------------------------------------

def do_list(spool: Spool, args: argparse.Namespace, now: float, config: Config) -> int:
    held = spool.held_ids()
    ids = spool.queue_ids()
    if args.json:
        entries = [e for e in (read_entry(spool, q, held) for q in ids) if e is not None]
        print(json.dumps([entry_dict(e) for e in entries], indent=2))
        return EXIT_OK
    status = _throttle_status(spool, config)
    paused = paused_destinations(status, now)
    summary = list_queue(ids, lambda queue_id: read_entry(spool, queue_id, held), now, paused, sys.stdout)
    print("\n".join([summary_line(summary.count, summary.held, summary.oldest, now)]
                    + webhook_lines(read_backlog(config.spool), _shown(config), now)))
    if paused:
        print("\n".join(throttle_lines(status, now, running=True)))
    suspended = spool.suspension()
    if suspended is not None:
        print(f"deliveries suspended {_age(now - float(suspended.get('since') or now))} ago "
              f"(in flight: {suspended.get('in_flight', '?')}): `mailrelay queue resume` delivers again")
    return EXIT_OK


def _throttle_status(spool: Spool, config: Config) -> Optional[dict]:
    """The running relay's throttle status (queue.shaping writes it), or None: no rule, or no relay
    running (a file a killed relay left behind says nothing about the present)."""
    if not config.throttles or not Spool.in_use(spool.directory):
        return None
    return read_status(spool.directory / STATUS_FILE)


def do_throttle(spool: Spool, args: argparse.Namespace, now: float, config: Config) -> int:
    running = Spool.in_use(spool.directory)
    status = _throttle_status(spool, config)
    if args.json:
        print(json.dumps({"running": running, "rules": len(config.throttles), "now": now,
                          "status": status}, indent=2))
    else:
        print("\n".join(throttle_lines(status, now, running)))
    return EXIT_OK


def _shown(config: Config) -> set[str]:
    return {display_url(w.url) for w in config.webhooks}


def do_webhooks(spool: Spool, args: argparse.Namespace, now: float, config: Config) -> int:
    """The webhook outboxes, read from the spool directly (relay running or not): never locks."""
    backlogs, shown = read_backlog(config.spool), _shown(config)
    if args.json:
        print(json.dumps([webhook_dict(b, shown) for b in backlogs], indent=2))
    else:
        print("\n".join(webhook_lines(backlogs, shown, now)) or "no webhook outboxes")
    return EXIT_OK


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def do_show(spool: Spool, args: argparse.Namespace, now: float, config: Config) -> int:
    entry = _entry(spool, _queue_id(spool, args.queue_id))
    headers, truncated = b"", False
    if entry.envelope is not None:
        headers, truncated = read_headers(spool.paths.message(entry.queue_id))
    if args.json:
        detail = entry_dict(entry)
        detail.update(headers=headers.decode("utf-8", "replace"), headers_truncated=truncated)
        print(json.dumps(detail, indent=2))
    else:
        print("\n".join(show_lines(entry, headers, truncated, now)))
    return EXIT_OK


# -- changing the spool ----------------------------------------------------------------------------

@contextmanager
def _stopped_relay(spool: Spool) -> Iterator[bool]:
    """True while this process holds the spool lock (the relay is stopped and cannot start meanwhile);
    False when a running relay holds it (then the action goes through the control channel)."""
    try:
        fd = acquire_lock(spool.paths.lock)
    except SpoolLocked:
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


def _change(spool: Spool, verb: str, queue_id: Optional[str], act) -> int:
    with _stopped_relay(spool) as stopped:
        if not stopped:
            spool.post_request(verb, queue_id)
            what = f"{verb} {queue_id}" if queue_id else verb
            print(f"{what}: requested from the running relay, which acts on it within a second")
            return EXIT_OK
        return act(spool, queue_id)


def _wait(d: Deferred) -> object:
    """The result of a spool operation (synchronous: the CLI never starts the spool's thread pool)."""
    results: list = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("spool operation did not complete")
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def do_hold(spool: Spool, args: argparse.Namespace, now: float, config: Config) -> int:
    return _change(spool, "hold", _queue_id(spool, args.queue_id), _hold)


def _hold(spool: Spool, queue_id: str) -> int:
    if spool.is_held(queue_id):
        print(f"{queue_id} was already held")
    else:
        _wait(spool.hold(queue_id))
        print(f"{queue_id} held: it stays in the spool and is not delivered until released")
    return EXIT_OK


def do_release(spool: Spool, args: argparse.Namespace, now: float, config: Config) -> int:
    return _change(spool, "release", _queue_id(spool, args.queue_id), _release)


def _release(spool: Spool, queue_id: str) -> int:
    if not spool.is_held(queue_id):
        print(f"{queue_id} was not held")
    else:
        _wait(spool.release(queue_id))
        print(f"{queue_id} released: the relay takes it up again when it starts")
    return EXIT_OK


def do_delete(spool: Spool, args: argparse.Namespace, now: float, config: Config) -> int:
    return _change(spool, "delete", _queue_id(spool, args.queue_id), _delete)


def _delete(spool: Spool, queue_id: str) -> int:
    _wait(spool.remove(queue_id))
    print(f"{queue_id} deleted, no DSN sent")
    return EXIT_OK


def do_flush(spool: Spool, args: argparse.Namespace, now: float, config: Config) -> int:
    if args.queue_id is not None:
        return _change(spool, "flush", _queue_id(spool, args.queue_id), _flush)
    if not spool.queue_ids():
        print("queue is empty: nothing to flush")
        return EXIT_OK
    return _change(spool, "flush", None, _flush)


def _flush(spool: Spool, queue_id: Optional[str]) -> int:
    flushed, held, unreadable = 0, 0, []
    ids = [queue_id] if queue_id else spool.queue_ids()
    for entry in filter(None, (read_entry(spool, q) for q in ids)):
        if entry.held:
            held += 1          # as with a running relay: a held message waits for its release
        elif entry.state is None:
            unreadable.append(entry.queue_id)
        elif _make_due(spool, entry):
            flushed += 1
    noun, them = ("message", "it") if flushed == 1 else ("messages", "them")
    print(f"{flushed} {noun} made due now: the relay tries {them} as soon as it starts"
          + (f"; {held} held, left alone (release them first)" if held else ""))
    if unreadable:
        error(PROG, f"state unreadable, not flushed: {', '.join(unreadable)}")
        return EXIT_FAILED
    return EXIT_OK


def _make_due(spool: Spool, entry: QueueEntry) -> bool:
    """Persist next_attempt = 0 ("now") for every pending recipient; True if one is pending."""
    state = entry.state
    assert state is not None    # the caller (_flush) skips an unreadable state
    if not state.pending:
        return False
    for rcpt in state.pending:
        state = state.with_recipient(replace(rcpt, next_attempt=0.0))
    if state != entry.state:
        _wait(spool.save_state(entry.queue_id, state.to_dict()))
    return True


def do_bounce(spool: Spool, args: argparse.Namespace, now: float, config: Config) -> int:
    return _change(spool, "bounce", _queue_id(spool, args.queue_id),
                   lambda spool, queue_id: _bounce(spool, queue_id, config.queue.bounces))


def _bounce(spool: Spool, queue_id: str, bounces: bool) -> int:
    entry = _entry(spool, queue_id)
    if entry.state is None or entry.envelope is None:
        raise CLIError(f"{queue_id}: cannot bounce: {printable(entry.problem or 'unreadable')}")
    pending = entry.state.pending
    if not pending:
        print(f"{queue_id} has no pending recipient: nothing to bounce")
        return EXIT_OK
    # The same final answer the scheduler records for a bounce request (Outcomes._close_pending): at
    # start it finds recipients bounced but not reported, sends the DSN (RFC 3464) and removes the message.
    state = entry.state
    for rcpt in pending:
        state = state.with_recipient(replace(rcpt, done=BOUNCED, reported=False, last_reply=ADMIN_BOUNCE))
    _wait(spool.save_state(queue_id, state.to_dict()))
    released = ""
    if entry.held:
        _wait(spool.release(queue_id))   # a held message is never looked at: its DSN would never go
        released = "; its hold was lifted, or the relay would never settle it"
    # RFC 5321 §4.5.5: never a DSN to the null reverse-path; the scheduler drops it and logs why.
    if not entry.envelope.sender:
        dsn = "records the bounce (no DSN: null sender)"
    elif not bounces:
        dsn = "records the bounce (no DSN: [queue] bounces is off)"
    else:
        dsn = f"sends a DSN to {sender_text(entry.envelope)}"
    noun = "recipient" if len(pending) == 1 else "recipients"
    print(f"{queue_id}: {len(pending)} {noun} bounced; the relay {dsn} when it starts{released}")
    return EXIT_OK


def do_suspend(spool: Spool, args: argparse.Namespace, now: float, config: Config) -> int:
    return _change(spool, "suspend", None, lambda spool, _: _suspend(spool, now))


def _suspend(spool: Spool, now: float) -> int:
    if spool.suspension() is None:
        spool.set_suspension({"since": now, "in_flight": 0, "idle": True, "pid": os.getpid()})
    print("deliveries suspended: the relay delivers nothing when it starts, until `mailrelay queue resume`")
    return EXIT_OK


def do_resume(spool: Spool, args: argparse.Namespace, now: float, config: Config) -> int:
    return _change(spool, "resume", None, _resume)


def _resume(spool: Spool, _queue_id: Optional[str]) -> int:
    if spool.suspension() is None:
        print("deliveries were not suspended")
    else:
        spool.set_suspension(None)
        print("deliveries resumed: the relay delivers again when it starts")
    return EXIT_OK


_HANDLERS = {
    "list": do_list, "show": do_show, "flush": do_flush, "hold": do_hold, "release": do_release,
    "delete": do_delete, "bounce": do_bounce, "suspend": do_suspend, "resume": do_resume,
    "webhooks": do_webhooks, "throttle": do_throttle,
}
