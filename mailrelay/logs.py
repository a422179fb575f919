# -*- test-case-name: tests.test_logs, tests.test_logger, tests.test_logrelay -*-
"""Structured logs: one line per event, each carrying the queue id, so one message can be followed
from receipt to delivery (`grep 3F2A... mail.log`).

Place in the journey: beside every stage.  Everything in mailrelay logs through twisted.logger
(`Logger(namespace="mailrelay...")`) with event fields; message events carry `queue_id` and `stage`
plus whatever applies:

    stage        received | queued | attempt | delivered | deferred | bounced | expired | ...
    client       the client's address ("203.0.113.5" or "host[203.0.113.5]")
    identity     the AUTH user or the matched permit rule
    sender       the envelope sender (no angle brackets)       recipient / recipients
    size         bytes         nrcpt        recipient count      tls      "TLSv1.3" or absent/None
    remote       the next hop's host      hop / transport  "direct" or the transport name
    delay        seconds since receipt    attempts         attempts so far
    reply        "250 2.0.0 ok"  (or code / status / text, as the scheduler logs them)

In: those events, from twisted.logger's global publisher.  Out: lines on `[log] file`, in one of two
formats (`[log] format`):

- "text", like Postfix:  `<time> <level> <namespace>: 3F2A: from=<a@b>, size=1234, nrcpt=2 (queue active)`
  and `... 3F2A: to=<c@d>, relay=mx.example, delay=1.2, status=sent (250 2.0.0 ok)`; an event without a
  queue id is its formatted message.  Control characters become "?" (no forged log lines).
- "json": one object per line: time (ISO 8601 UTC), level, namespace, message, and every event field
  that is not twisted.logger's own (`log_*`); values JSON cannot hold are written as their repr().

Only events whose namespace is "mailrelay" or below it are written, at level info and above.
REDACTION (mailrelay.redaction): a field whose name contains password, secret, passwd, credential,
auth_data or token (any case, at any depth of a dict) is written as "[redacted]", the message text is
formatted from the redacted event, and the values of such fields (4 characters or longer) are scrubbed
from any other text.

Where lines go (`install`): `file` set → appended there (line-buffered), besides twistd's own log.
`file` empty and format "text" → nothing extra: twistd's own log already prints every event (in
mailrelay.logger's renderer, which the plugin installs through twistd), the delivery process's too
(its events come up a pipe and are published here: LogService.relay, mailrelay.logrelay).
`file` empty and format "json" → JSON lines on the process's original standard output (sys.__stdout__,
what systemd or a container collects; twistd may print its own text log there too unless given
`--logfile`; under a daemonising twistd stdout is /dev/null, so set `file`).

Standards: times are RFC 3339 / ISO 8601 UTC with milliseconds; JSON is RFC 8259, one object per line.
"""
from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timezone
from typing import Any, Optional, TextIO

from constantly import NamedConstant
from twisted.application import service
from twisted.logger import ILogObserver, LogLevel, Logger, LogPublisher, formatEvent, globalLogPublisher
from zope.interface import implementer

from mailrelay.config import LogConfig
from mailrelay.logrelay import REMOTE_FAILURE, TEXT, publish_lines
from mailrelay.redaction import (MIN_SCRUB_LENGTH, REDACTED, SENSITIVE_WORDS, is_sensitive, redact,  # noqa: F401
                                 scrub, scrub_value)

NAMESPACE = "mailrelay"

# Postfix's word for the outcome of a delivery stage (status=sent, status=deferred, ...).
STATUS_WORDS = {"delivered": "sent", "deferred": "deferred", "bounced": "bounced", "expired": "expired"}
MESSAGE_STAGES = ("received", "queued", "attempt", *STATUS_WORDS)

# CWE-117 (log injection): a CR or LF from a client (EHLO, address, reply text) would forge a log line.
_CONTROLS = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")
_HEADER_KEYS = ("time", "level", "namespace", "message")


# -- the Postfix-like body of a message event -----------------------------------------------------

def _angle(address: object) -> str:
    return f"<{address}>"


def _recipients(event: dict) -> list[str]:
    if "recipient" in event:
        return [str(event["recipient"])]
    recipients = event.get("recipients")
    if isinstance(recipients, (list, tuple)):
        return [str(r) for r in recipients]
    return [str(recipients)] if recipients else []


def _reply(event: dict) -> Optional[str]:
    if event.get("reply"):
        return str(event["reply"])
    if "code" in event:
        parts = (event.get("code"), event.get("status"), event.get("text"))
        return " ".join(str(p) for p in parts if p not in (None, ""))
    return None


def postfix_body(event: dict) -> str:
    """`QID: k=v, k=v, status=word (reply)` for a message event (call it on a redacted event)."""
    stage = event.get("stage")
    before_delivery = stage in ("received", "queued")
    items: list[tuple[str, object]] = []
    for key, name in (("client", "client"), ("identity", "identity")):
        if event.get(key):
            items.append((name, event[key]))
    if "sender" in event:
        items.append(("from", _angle(event["sender"])))
    recipients = _recipients(event)
    if recipients and not before_delivery:
        items.append(("to", ",".join(_angle(r) for r in recipients)))
    if event.get("remote") not in (None, "", "-"):
        items.append(("relay", event["remote"]))
    transport = event.get("transport", event.get("hop"))
    if transport:
        items.append(("transport", transport))
    for key in ("delay", "size"):
        if event.get(key) is not None:
            items.append((key, event[key]))
    nrcpt = event.get("nrcpt", len(recipients) if before_delivery and recipients else None)
    if nrcpt is not None:
        items.append(("nrcpt", nrcpt))
    if event.get("tls"):
        items.append(("tls", event["tls"]))
    if event.get("attempts") and not before_delivery:
        items.append(("attempts", event["attempts"]))
    if stage in STATUS_WORDS:
        items.append(("status", STATUS_WORDS[stage]))
    note = _reply(event) or ("queue active" if stage == "queued" else None if stage in STATUS_WORDS else stage)
    body = f"{event.get('queue_id')}: " + ", ".join(f"{k}={v}" for k, v in items)
    return f"{body} ({note})" if note else body


def log_message(logger: Logger, stage: str, queue_id: str, level: LogLevel = LogLevel.info,
                **fields: Any) -> None:
    """Emit a message event whose own text is the Postfix-like line (so twistd's log reads the same),
    e.g. log_message(log, "queued", qid, client=ip, identity=user, sender=s, recipients=rs, size=n)."""
    event = dict(fields, queue_id=queue_id, stage=stage)
    text = postfix_body(redact(event)[0])
    logger.emit(level, text.replace("{", "{{").replace("}", "}}"), **event)


def log_queued(logger: Logger, queue_id: str, envelope: Any = None, size: Optional[int] = None) -> None:
    """The line saying a message is in the queue (Postfix's "queue active"), from its envelope
    (envelope.Envelope: sender, recipients, client, identity, TLS) and its size as spooled."""
    if envelope is None:
        log_message(logger, "queued", queue_id, size=size)
        return
    log_message(logger, "queued", queue_id, client=envelope.client_address, identity=envelope.identity,
                sender=envelope.sender, recipients=list(envelope.recipients), size=size, tls=envelope.tls)


# -- formatting one event -------------------------------------------------------------------------

def _time(event: dict) -> str:
    when = datetime.fromtimestamp(event.get("log_time") or 0.0, timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _level(event: dict) -> str:
    level = event.get("log_level")
    return level.name if isinstance(level, NamedConstant) else "info"


def _failure_summary(event: dict) -> Optional[str]:
    failure = event.get("log_failure")
    if failure is None:
        remote = event.get(REMOTE_FAILURE)      # one from the delivery process (mailrelay.logrelay)
        return remote["error"] if remote else None
    try:
        return f"{failure.type.__name__}: {failure.getErrorMessage()}"
    except Exception:
        return "unprintable failure"


def _message_text(clean: dict) -> str:
    text = formatEvent(clean) if clean.get("log_format") is not None else ""
    remote = clean.get(REMOTE_FAILURE)
    if remote and clean.get(TEXT) == text:      # the delivery process's failure: its traceback apart
        text = text.removesuffix("\n" + remote["traceback"])
    if "queue_id" in clean:
        prefix = f"{clean['queue_id']}:"
        if not text.startswith(prefix):
            text = f"{prefix} {text}" if text else prefix
    return text


def format_text(event: dict) -> str:
    """One text line (no newline) for an event, Postfix-like for message events."""
    clean, secrets = redact(event)
    if "queue_id" in clean and clean.get("stage") in MESSAGE_STAGES:
        body = postfix_body(clean)
    else:
        body = _message_text(clean)
    failure = _failure_summary(clean)
    if failure:
        body = f"{body} [{failure}]"
    line = f"{_time(clean)} {_level(clean)} {clean.get('log_namespace', '?')}: {body}"
    return _CONTROLS.sub("?", scrub(line, secrets))


def _json_value(value: Any) -> Any:
    """`value` if JSON can hold it (no NaN), else its repr()."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError, RecursionError):
        return repr(value)


def format_json(event: dict) -> str:
    """One JSON object (no newline) for an event."""
    clean, secrets = redact(event)
    record: dict[str, Any] = {
        "time": _time(clean), "level": _level(clean), "namespace": clean.get("log_namespace", "?"),
        "message": _message_text(clean),
    }
    for key, value in clean.items():
        if key.startswith("log_"):
            continue
        record[f"_{key}" if key in _HEADER_KEYS else key] = _json_value(value)
    failure = clean.get("log_failure")
    if failure is not None:
        record["error"] = _failure_summary(clean)
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            pass
    elif clean.get(REMOTE_FAILURE):
        record["error"] = clean[REMOTE_FAILURE]["error"]
        record["traceback"] = clean[REMOTE_FAILURE]["traceback"]
    return json.dumps(scrub_value(record, secrets), ensure_ascii=False, allow_nan=False)


def wanted(event: dict, min_level: LogLevel = LogLevel.info) -> bool:
    """Only mailrelay's own events, at `min_level` or above."""
    namespace = str(event.get("log_namespace") or "")
    if namespace != NAMESPACE and not namespace.startswith(NAMESPACE + "."):
        return False
    level = event.get("log_level")
    return not isinstance(level, NamedConstant) or level >= min_level


# -- the observer and the service -----------------------------------------------------------------

@implementer(ILogObserver)
class RelayLogObserver:
    """Writes mailrelay's events to `stream`, one line each, as "text" or "json"."""

    def __init__(self, kind: str, stream: TextIO, min_level: LogLevel = LogLevel.info):
        if kind not in ("text", "json"):
            raise ValueError(f"unknown log format {kind!r}")
        self._format = format_json if kind == "json" else format_text
        self._stream, self._min_level = stream, min_level

    def __call__(self, event: dict) -> None:
        if not wanted(event, self._min_level):
            return
        try:
            line = self._format(event)
        except Exception as e:   # a log line must never take the relay down, nor leak the event
            line = f"{_time(event)} error mailrelay.logs: event could not be formatted ({type(e).__name__})"
        self._stream.write(line + "\n")
        self._stream.flush()


def make_observer(log_config: LogConfig, stream: TextIO, min_level: LogLevel = LogLevel.info) -> ILogObserver:
    """An ILogObserver writing mailrelay's events to `stream` in `log_config.format`."""
    return RelayLogObserver(log_config.format, stream, min_level)


class LogService(service.Service):
    """Adds the observer to `publisher` (default: twisted.logger's global one) while running.

    Opens `log_config.file` in append mode, line-buffered, in privilegedStartService (before twistd
    drops privileges) or startService; `stream` replaces standard output for json with no file."""

    name = "log"

    def __init__(self, log_config: LogConfig, publisher: Optional[LogPublisher] = None,
                 stream: Optional[TextIO] = None):
        self.log_config = log_config
        self._publisher = publisher if publisher is not None else globalLogPublisher
        self._stdout = stream
        self._file: Optional[TextIO] = None
        self.observer: Optional[ILogObserver] = None

    def privilegedStartService(self) -> None:
        self._open_file()
        super().privilegedStartService()

    def _open_file(self) -> None:
        if self.log_config.file and self._file is None:
            self._file = open(self.log_config.file, "a", encoding="utf-8", errors="backslashreplace",
                              buffering=1)

    def _stream(self) -> Optional[TextIO]:
        if self.log_config.file:
            self._open_file()
            return self._file
        if self.log_config.format == "json":
            return self._stdout if self._stdout is not None else sys.__stdout__   # None under pythonw
        return None       # text with no file: twistd's own log already has every event

    def startService(self) -> None:
        stream = self._stream()         # an unwritable file fails here, before anything runs
        super().startService()
        if stream is not None:
            self.observer = make_observer(self.log_config, stream)
            self._publisher.addObserver(self.observer)

    def relay(self, text: str) -> None:
        """Whole lines of the delivery process's events (mailrelay.logrelay): published here, where every
        observer of this process's log writes them."""
        publish_lines(self._publisher, text)

    def stopService(self) -> None:
        super().stopService()
        if self.observer is not None:
            self._publisher.removeObserver(self.observer)
            self.observer = None
        if self._file is not None:
            self._file.close()
            self._file = None


def install(log_config: LogConfig, publisher: Optional[LogPublisher] = None,
            stream: Optional[TextIO] = None) -> LogService:
    """The service that writes mailrelay's log lines as `log_config` says while it runs; add it to the
    application first, so the other services' start-up events are written too."""
    return LogService(log_config, publisher, stream)
