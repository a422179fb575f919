"""`mailrelay suppression list [--json] | add ADDRESS [--reason TEXT] | remove ADDRESS --config FILE`.

The operator's hand on the suppression list (spool/suppression.py): the recipients refused at RCPT
because their delivery failed for good.  In: the config (for `spool` and `[suppression] duration`), an
action, maybe an address.  Out: text (or `--json`) on stdout, and for add/remove one durable record
appended to `<spool>/suppression.jsonl` under the writers' lock.  That works the same with the relay
running (its receiving process sees the change within a second: it polls the journal) or stopped.

Failures are one line on stderr, never a traceback: a config error exits 2; removing an address that
is not listed, or adding one that is not `local@domain`, exits 1.
"""
from __future__ import annotations

import argparse
import json
import time

from mailrelay.cli.check import human_duration
from mailrelay.cli.common import EXIT_OK, CLIError, guarded, load_config
from mailrelay.config import Config
from mailrelay.spool.files import make_directory
from mailrelay.spool.suppression import SuppressionList, clean_text, rfc3339, utc

PROG = "mailrelay suppression"
REASON_LIMIT = 200


class _WallClock:
    @staticmethod
    def seconds() -> float:
        return time.time()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "suppression", help="list, add or remove suppressed recipient addresses",
        description="The addresses RCPT is refused for because their delivery failed for good.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, metavar="FILE", help="the relay's tap.conf")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="the addresses suppressed now")
    listing.add_argument("--json", action="store_true", help="print JSON with full detail")
    add = actions.add_parser("add", parents=[common], help="suppress an address by hand")
    add.add_argument("address", metavar="ADDRESS")
    add.add_argument("--reason", default="", metavar="TEXT", help="why (shown in the RCPT refusal)")
    remove = actions.add_parser("remove", parents=[common], help="lift an address's suppression")
    remove.add_argument("address", metavar="ADDRESS")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, clock=None) -> int:
    def act() -> int:
        config = load_config(args.config)
        journal = SuppressionList(config.spool, config.suppression.duration, clock or _WallClock())
        return {"list": do_list, "add": do_add, "remove": do_remove}[args.action](journal, args, config)
    return guarded(PROG, "suppression list", act)


def _status(config: Config) -> str:
    if config.suppression.enabled:
        return f"suppression is on: {human_duration(config.suppression.duration)} per address"
    return "suppression is off in the config: listed addresses are not refused until it is enabled"


def do_list(journal: SuppressionList, args: argparse.Namespace, config: Config) -> int:
    journal.refresh()
    entries = journal.entries()
    if args.json:
        print(json.dumps([{
            "address": e.address, "since": rfc3339(e.since), "until": rfc3339(journal.expires(e)),
            "source": e.source, "reply": e.reply, "remote_host": e.remote_host, "queue_id": e.queue_id,
            "reason": e.reason} for e in entries], indent=2))
        return EXIT_OK
    for e in entries:
        print(f"{clean_text(e.address, 254)}  since {utc(e.since)}  until {utc(journal.expires(e))}  {e.why()}")
    noun = "address" if len(entries) == 1 else "addresses"
    print(f"{len(entries)} {noun} suppressed; {_status(config)}")
    return EXIT_OK


def _checked_address(text: str) -> str:
    local, at, domain = text.strip().rpartition("@")
    if (not at or not local or "." not in domain or any(c in domain for c in " <>[]@\\\"")
            or any(ord(c) < 33 or ord(c) == 127 for c in local + domain) or len(text) > 254):
        raise CLIError(f"{clean_text(text, 100)!r} is not an address (local@domain)")
    return f"{local}@{domain}"


def _ensure_spool(config: Config) -> None:
    if not config.spool.exists():
        config.spool.parent.mkdir(parents=True, exist_ok=True)
        make_directory(config.spool)


def do_add(journal: SuppressionList, args: argparse.Namespace, config: Config) -> int:
    address = _checked_address(args.address)
    _ensure_spool(config)
    entry = journal.add(address, source="operator", reason=clean_text(" ".join(args.reason.split()),
                                                                      REASON_LIMIT))
    print(f"{address} suppressed until {utc(journal.expires(entry))}; a running relay refuses RCPT to it "
          f"within a second; {_status(config)}")
    return EXIT_OK


def do_remove(journal: SuppressionList, args: argparse.Namespace, config: Config) -> int:
    address = args.address.strip()
    entry = journal.remove(address) if journal.path.exists() else None
    if entry is None:
        raise CLIError(f"{clean_text(address, 254)} is not suppressed")
    print(f"{clean_text(address, 254)} is no longer suppressed (it was since {utc(entry.since)} "
          f"{entry.why()}); a running relay accepts RCPT to it within a second")
    return EXIT_OK
