# -*- test-case-name: tests.test_logrelay -*-
"""The delivery process's log events, carried up a pipe and published again in the main process.

Where it sits: beside the journey. With `[delivery] process = "separate"` and no `[log] file`, the
delivery process (mailrelay.queue.worker) writes each of its events to its standard output as one
JSON object on one line (`PipeObserver`, `event_line`), in batches. The main process
(mailrelay.queue.process) reads them back (`event_from_line`) and publishes them on its own
twisted.logger publisher (`publish_lines`): they are events there like its own, with their namespace,
level, time, queue id and fields, written by the same observers (twistd's log file, `[log]` JSON on
standard output, a daemonised twistd's log, syslog).

The line (RFC 8259 JSON, one object, newline-terminated; a newline inside a text is escaped, so a
traceback stays on its line):

    {"log_namespace": "mailrelay.delivery.scheduler", "log_level": "info", "log_time": 1795834572.25,
     "log_text": "<the message as the delivery process formatted it>", "log_system": "..." (if set),
     "log_failure": {"error": "ValueError: bad", "traceback": "Traceback ..."} (if set),
     "queue_id": "...", "stage": "delivered", ... every field of the event that is not Twisted's `log_*`}

Fields JSON cannot hold are written as their repr(). The delivery process redacts before writing
(mailrelay.redaction): a credential's value never goes up the pipe, neither in a field nor in the
message nor in a traceback. Published again, the event's format is "{log_text}" (every observer then
writes the delivery process's text); a failure's traceback follows its message there, as twistd's log
writes one, and `log_remote_failure` keeps the error and traceback apart for mailrelay.logs. A line that
is not such an object (something printed by a library) is published whole as an info event.
"""
from __future__ import annotations

import json
import time
from typing import Any, Optional

from twisted.logger import ILogObserver, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.logger import event_text
from mailrelay.redaction import plain_fields, redact, scrub, scrub_value

WORKER_NAMESPACE = "mailrelay.delivery.worker"
TEXT = "log_text"
REMOTE_FAILURE = "log_remote_failure"     # {"error": "Type: message", "traceback": text}
_KEPT = ("log_namespace", "log_time", "log_system")

_encode = json.JSONEncoder(ensure_ascii=False, check_circular=False, default=repr).encode
_decode = json.JSONDecoder().decode
_LEVELS = {level.name: level for level in LogLevel.iterconstants()}


def _failure(failure: Any, secrets: tuple[str, ...]) -> dict:
    try:
        error = f"{failure.type.__name__}: {failure.getErrorMessage()}"
    except Exception:
        error = "unprintable failure"
    try:
        traceback = failure.getTraceback()
    except BaseException as e:
        traceback = "(UNABLE TO OBTAIN TRACEBACK FROM EVENT):" + str(e)     # as Twisted writes it
    return {"error": scrub(error, secrets), "traceback": scrub(traceback, secrets)}


def event_line(event: dict) -> str:
    """One line (with its newline) carrying `event`, redacted."""
    secrets: tuple[str, ...] = ()
    fields = plain_fields(event)
    if fields is None:
        event, secrets = redact(event)
        record = scrub_value({key: value for key, value in event.items() if key[:4] != "log_"}, secrets)
    else:
        record = {name: event[name] for name in fields}
    for key in _KEPT:
        if key in event:
            record[key] = event[key]
    level = event.get("log_level")
    record["log_level"] = level.name if isinstance(level, type(LogLevel.info)) else "info"
    text = event_text(event)
    record[TEXT] = scrub(text, secrets) if secrets else text
    if event.get("log_failure") is not None:
        record["log_failure"] = _failure(event["log_failure"], secrets)
    if isinstance(record.get("failure"), Failure):      # twisted.python.log.err's: its traceback is in the text
        del record["failure"]
    try:
        return _encode(record) + "\n"
    except Exception:      # a field that even repr() cannot write
        return _encode({key: record[key] for key in (*_KEPT, "log_level", TEXT, "log_failure")
                        if key in record}) + "\n"


@implementer(ILogObserver)
class PipeObserver:
    """Writes every event as event_line() to `stream` (the delivery process's standard output, buffered:
    worker.TickBufferedStream)."""

    def __init__(self, stream: Any):
        self._stream = stream

    def __call__(self, event: dict) -> None:
        try:
            line = event_line(event)
        except Exception as e:   # a log line must never take delivery down, nor leak the event
            line = _encode({"log_namespace": WORKER_NAMESPACE, "log_level": "error", "log_time": time.time(),
                            TEXT: f"event could not be written ({type(e).__name__})"}) + "\n"
        self._stream.write(line)


def _plain(line: str, now: float) -> dict:
    return {"log_namespace": WORKER_NAMESPACE, "log_level": LogLevel.info, "log_format": "{log_text}",
            TEXT: line, "log_time": now}


def event_from_line(line: str, now: Optional[float] = None) -> dict:
    """The event a line of event_line() carries (a line in no such shape: an info event with its text)."""
    if now is None:
        now = time.time()
    try:
        event = _decode(line)
    except ValueError:
        return _plain(line, now)
    if not isinstance(event, dict) or not isinstance(event.get(TEXT), str):
        return _plain(line, now)
    event["log_level"] = _LEVELS.get(event.get("log_level"), LogLevel.info)
    event["log_format"] = "{log_text}"
    when = event.get("log_time")
    if not isinstance(when, float) or when != when:
        event["log_time"] = float(when) if isinstance(when, int) else now
    if not isinstance(event.get("log_namespace"), str):
        event["log_namespace"] = WORKER_NAMESPACE
    if "log_system" in event and not isinstance(event["log_system"], str):
        del event["log_system"]
    failure = event.pop("log_failure", None)
    if isinstance(failure, dict):
        error, traceback = str(failure.get("error", "")), str(failure.get("traceback", ""))
        event[REMOTE_FAILURE] = {"error": error, "traceback": traceback}
        event[TEXT] = "\n".join((event[TEXT], traceback))      # as twistd's log writes a failure
    return event


def publish_lines(publisher: Any, text: str) -> None:
    """Publish every line of `text` (whole lines of event_line()) on `publisher`, in order."""
    now = time.time()
    for line in text.split("\n"):
        if line:
            publisher(event_from_line(line, now))
