# -*- test-case-name: tests.test_spool -*-
"""The control channel: how `mailrelay queue flush|hold|release|delete` reaches a running relay.

In (CLI side): a verb and maybe a queue id.  Out (relay side): the same, within one poll interval.

A request is an EMPTY file in <spool>/control/ whose name is the whole request:

    <20-digit nanosecond timestamp>-<8 hex random>.<verb>[.<queue id>]
    e.g. 01767225600000000000-1a2b3c4d.hold.0SNV4X2A9Q7M1K3Z

Creating an empty file with O_EXCL is atomic, so there is no partial request to read: a name either
parses completely or is not ours (dot-files, junk), in which case the relay removes it and moves on.
Verbs are lower-case words ([a-z][a-z-]*); the relay decides which it understands. The relay takes
requests oldest first and deletes each as it takes it (at most once: a request lost in a crash is simply
repeated by the operator).
"""
from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path
from typing import Callable, Optional

from twisted.internet.task import LoopingCall

from mailrelay.logger import Logger
from mailrelay.spool.ids import is_valid_queue_id
from mailrelay.spool.files import create_file, unlink_quietly

POLL_INTERVAL = 0.5
_NAME_RE = re.compile(r"(\d{20})-([0-9a-f]{8})\.([a-z][a-z-]{0,31})(?:\.([0-9A-Z]{16}))?\Z")
_VERB_RE = re.compile(r"[a-z][a-z-]{0,31}\Z")

Request = tuple[str, Optional[str]]


def request_name(verb: str, queue_id: Optional[str] = None, now_ns: Optional[int] = None) -> str:
    if not _VERB_RE.match(verb):
        raise ValueError(f"bad control verb {verb!r}")
    if queue_id is not None and not is_valid_queue_id(queue_id):
        raise ValueError(f"bad queue id {queue_id!r}")
    stamp = time.time_ns() if now_ns is None else now_ns
    name = f"{stamp:020d}-{secrets.token_hex(4)}.{verb}"
    return name if queue_id is None else f"{name}.{queue_id}"


def parse_request_name(name: str) -> Optional[Request]:
    """(verb, queue id or None) for a well-formed request name; None for anything else."""
    match = _NAME_RE.match(name)
    if match is None or (match.group(4) is not None and not is_valid_queue_id(match.group(4))):
        return None
    return match.group(3), match.group(4)


def post_request(directory: Path, verb: str, queue_id: Optional[str] = None) -> Path:
    """Drop one request (CLI side). Returns the file created."""
    while True:
        path = directory / request_name(verb, queue_id)
        try:
            os.close(create_file(path))
        except FileExistsError:
            continue
        return path


def take_requests(directory: Path) -> list[Request]:
    """Every pending request, oldest first, each removed as it is taken (relay side)."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    requests = []
    for name in names:
        if name.startswith("."):
            continue                      # someone's temp file: not a request, not ours to remove
        request = parse_request_name(name)
        if unlink_quietly(directory / name) and request is not None:
            requests.append(request)      # unlinked by us: taken exactly once
    return requests


class RequestPoller:
    """Polls the control directory every `interval` seconds on `clock` and calls handler(verb, queue_id)
    for each request. The relay starts it after the spool. A handler that raises (an unknown id, say) is
    logged and polling goes on; so does an unreadable control directory."""

    _log = Logger()

    def __init__(self, take: Callable[[], list[Request]], handler: Callable[[str, Optional[str]], object],
                 clock, interval: float = POLL_INTERVAL) -> None:
        self._take = take
        self._handler = handler
        self._interval = interval
        self._loop = LoopingCall(self._poll)
        self._loop.clock = clock

    def _poll(self) -> None:
        try:
            requests = self._take()
        except OSError:
            self._log.failure("spool control: cannot read requests")
            return
        for verb, queue_id in requests:
            try:
                self._handler(verb, queue_id)
            except Exception:
                self._log.failure("spool control: request {verb} {queue_id} failed",
                                  verb=verb, queue_id=queue_id)

    def start(self) -> None:
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
