# -*- test-case-name: tests.test_suppression -*-
"""`mailrelay suppression list [--json] | add ADDRESS [--reason TEXT] | remove ADDRESS --config FILE`.

The operator's hand on the suppression list (spool/suppression.py): the recipients refused at RCPT
because their delivery failed for good.  In: the config (for `spool` and `[suppression] duration`), an
action, maybe an address.  Out: text (or `--json`) on stdout, and for add/remove one durable record
appended to `<spool>/suppression.jsonl` under the writers' lock.  That works the same with the relay
running (its receiving process sees the change within a second: it polls the journal) or stopped.

With `[cluster] redis` the command acts on the shared list too (cluster/shared.py): `list` shows this
relay's entries and the cluster's, `add` and `remove` write to Redis as well as to the journal.  A Redis
that cannot be reached is one line on stderr; the journal is still changed, and the other relays
learn of the change only if a later `add` or `remove` reaches Redis.

Failures are one line on stderr, never a traceback: a config error exits 2; removing an address that
is not listed, or adding one that is not `local@domain`, exits 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional

from mailrelay.cli.check import human_duration
from mailrelay.cli.common import EXIT_OK, CLIError, guarded, load_config
from mailrelay.config import Config
from mailrelay.spool.files import make_directory
from mailrelay.spool.suppression import Entry, SuppressionList, address_key, clean_text, rfc3339, utc

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


class _Shared:
    """The cluster's list in Redis, for the command line; every method a no-op without `[cluster] redis`
    or when Redis cannot be reached (said once on stderr)."""

    def __init__(self, config: Config, now: float):
        self.prefix, self.now, self.duration = config.cluster.key_prefix, now, config.suppression.duration
        self.redis = None
        if not config.cluster.redis:
            return
        from mailrelay.cluster.blocking import BlockingRedis, RedisError
        from mailrelay.cluster.url import RedisURL

        self._error = RedisError
        try:
            ca = str(config.cluster.ca_file) if config.cluster.ca_file else None
            self.redis = BlockingRedis(RedisURL.parse(config.cluster.redis), ca_file=ca)
        except RedisError as e:
            self._warn(e)

    def _warn(self, error) -> None:
        print(f"{PROG}: {error}; only this relay's list is used", file=sys.stderr)
        self.redis = None

    def records(self) -> dict:
        """address key -> the record Redis holds for it ("add" or "remove")."""
        found: dict = {}
        if self.redis is None:
            return found
        try:
            cursor = "0"
            while True:
                cursor, keys = self.redis.command("SCAN", cursor, "MATCH", f"{self.prefix}suppression:*",
                                                  "COUNT", "1000")
                for key, raw in zip(keys, self.redis.command("MGET", *keys) if keys else []):
                    try:
                        record = json.loads(raw) if raw else None
                    except ValueError:
                        continue
                    if isinstance(record, dict):
                        found[key[len(self.prefix) + len("suppression:"):]] = record
                if cursor == "0":
                    return found
        except self._error as e:
            self._warn(e)
            return found

    def get(self, address: str) -> Optional[dict]:
        return self.records_of([address]).get(address_key(address))

    def records_of(self, addresses: list) -> dict:
        if self.redis is None:
            return {}
        keys = [address_key(a) for a in addresses]
        try:
            values = self.redis.command("MGET", *[f"{self.prefix}suppression:{k}" for k in keys])
        except self._error as e:
            self._warn(e)
            return {}
        out = {}
        for key, raw in zip(keys, values):
            try:
                record = json.loads(raw) if raw else None
            except ValueError:
                continue
            if isinstance(record, dict):
                out[key] = record
        return out

    def put(self, record: dict) -> None:
        if self.redis is None:
            return
        from mailrelay.cluster.shared import redis_record

        value = redis_record(record, self.duration, self.now)
        if value is None:
            return
        address, text, ttl = value
        try:
            self.redis.command("SET", f"{self.prefix}suppression:{address}", text, "PX", str(ttl))
        except self._error as e:
            self._warn(e)


def _merged(journal: SuppressionList, shared: _Shared, now: float) -> list[Entry]:
    """This relay's entries and the cluster's, combined as RCPT combines them (cluster.shared)."""
    entries = {address_key(e.address): e for e in journal.entries()}
    for key, record in shared.records().items():
        local = entries.get(key)
        if record.get("op") == "remove":
            if local is not None and local.since <= float(record.get("time", 0)):
                del entries[key]
            continue
        try:
            entry = Entry.from_record(record)
        except (KeyError, TypeError, ValueError):
            continue
        if journal.expires(entry) > now and (local is None or entry.since > local.since):
            entries[key] = entry
    return sorted(entries.values(), key=lambda e: e.since)


def do_list(journal: SuppressionList, args: argparse.Namespace, config: Config) -> int:
    journal.refresh()
    now = journal._clock.seconds()
    entries = _merged(journal, _Shared(config, now), now)
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
    _Shared(config, entry.since).put(entry.record())
    print(f"{address} suppressed until {utc(journal.expires(entry))}; a running relay refuses RCPT to it "
          f"within a second; {_status(config)}")
    return EXIT_OK


def do_remove(journal: SuppressionList, args: argparse.Namespace, config: Config) -> int:
    address = args.address.strip()
    entry = journal.remove(address) if journal.path.exists() else None
    now = journal._clock.seconds()
    shared = _Shared(config, now)
    record = shared.get(address)
    if entry is None and record is not None and record.get("op") == "add":
        try:
            entry = Entry.from_record(record)
        except (KeyError, TypeError, ValueError):
            entry = None
        if entry is not None and journal.expires(entry) <= now:
            entry = None
    if entry is not None:
        shared.put({"v": 1, "op": "remove", "address": address_key(address), "time": now})
    if entry is None:
        raise CLIError(f"{clean_text(address, 254)} is not suppressed")
    print(f"{clean_text(address, 254)} is no longer suppressed (it was since {utc(entry.since)} "
          f"{entry.why()}); a running relay accepts RCPT to it within a second")
    return EXIT_OK
