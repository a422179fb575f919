# -*- test-case-name: tests.test_logrelay -*-
"""The delivery process's log lines, written into the main process's log.

Where it sits: beside the journey. With `[delivery] process = "separate"` and no `[log] file`, the
delivery process (mailrelay.delivery.worker) renders its events as twistd's classic text lines. It sends
them down its standard output in batches. Here they join this process's log, wherever twistd or the
embedding application sends it: a log file that twistd rotates, the log of a daemonised twistd (whose
standard output is /dev/null), syslog, or JSON on standard output.
In: text made of whole lines.  Out: events on a twisted.logger publisher.

- **Every observer is a classic text observer** that mailrelay.logger sped up (twistd's own log, the
  usual case). The batch then goes as one event, which classic_text writes unchanged (RAW_TEXT). The
  lines are byte for byte the delivery process's, with one write per batch.
- **Otherwise** each line becomes an event again: its namespace and level are read from the line, its
  text becomes the message, and `queue_id` is set when the text starts with one. The event's time is
  when it arrived, because the classic line has whole seconds only.
"""
from __future__ import annotations

import re
import time
from typing import Iterable

from twisted.logger import LogLevel

from mailrelay.logger import RAW_TEXT
from mailrelay.spool.ids import ID_LENGTH, is_valid_queue_id

WORKER_NAMESPACE = "mailrelay.delivery.worker"

# `<time> [<namespace>#<level>] <text>`, as twisted.logger.formatEventAsClassicLogText writes it.
_CLASSIC = re.compile(r"\S+ \[([^\]#]*)(?:#(\w+))?\] (.*)", re.DOTALL)


def relay_text(publisher, text: str, classic_observers: Iterable[object] = ()) -> None:
    """Publish `text` (whole classic lines) on `publisher`. `classic_observers`: the observers that
    write RAW_TEXT as it is. When they are all that `publisher` has, one event carries the batch."""
    if not text:
        return
    observers = list(getattr(publisher, "_observers", ()))
    raw = {id(observer) for observer in classic_observers}
    if observers and all(id(observer) in raw for observer in observers):
        publisher({RAW_TEXT: text, "log_namespace": WORKER_NAMESPACE, "log_level": LogLevel.info,
                   "log_format": None, "log_time": time.time()})
        return
    for event in events_from_text(text):
        publisher(event)


def events_from_text(text: str) -> list[dict]:
    """Classic text lines back into events. A line starting with a tab continues the one before it
    (a multi-line message or a traceback). A line in no known shape is kept whole, as an info event."""
    now = time.time()
    events: list[dict] = []
    for line in text.split("\n"):
        if not line:
            continue
        if line.startswith("\t") and events:
            events[-1]["log_text"] += "\n" + line[1:]
            continue
        match = _CLASSIC.fullmatch(line)
        namespace, level, message = WORKER_NAMESPACE, LogLevel.info, line
        if match is not None:
            namespace, message = match.group(1) or WORKER_NAMESPACE, match.group(3)
            try:
                level = LogLevel.levelWithName(match.group(2) or "info")
            except Exception:
                level = LogLevel.info
        event = {"log_namespace": namespace, "log_level": level, "log_format": "{log_text}",
                 "log_text": message, "log_time": now}
        if message[ID_LENGTH:ID_LENGTH + 2] == ": " and is_valid_queue_id(message[:ID_LENGTH]):
            event["queue_id"] = message[:ID_LENGTH]
        events.append(event)
    return events
