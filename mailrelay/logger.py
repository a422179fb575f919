# -*- test-case-name: tests.test_logger, tests.test_logrelay -*-
"""twistd's own text log, written cheaply, and installed through twistd's own hooks.

- `Logger`: twisted.logger.Logger whose emit() checks the level against a frozen set. Twisted's builds
  and sorts the list of LogLevel constants on every call: a third of a log line's cost. Everything in
  mailrelay logs through this class (same namespace rules, same events, same observers).
- `event_text(event)`: the event's message, as twisted.logger.formatEvent renders it, by
  str.format_map when that gives the same text.
- `classic_text(event)`: exactly twisted.logger.formatEventAsClassicLogText(event) (twistd's own line,
  `<time> [<namespace>#<level>] <text>`), with the timestamp formatted once per second and the
  message rendered by event_text; events it cannot render identically (a failure, a `log_system`,
  Twisted's `{f()}` call syntax, a missing key) go to Twisted's own formatter. An event with a
  credential field (mailrelay.redaction) is rendered from its redacted copy.
- `observer()`: the ILogObserver factory for `twistd --logger mailrelay.logger.observer` (standard
  output, as twistd's --logger observers write).
- `twistd_observer(server_options)`: the observer twistd itself would start for those options
  (`--logfile`, `-n`, a log file rotated on SIGUSR1), writing classic_text; None where twistd's own
  choice must stand (`--syslog`, `--logger`, a daemon told to log to stdout).
- `TwistdLog`: the service the plugin's makeService returns around the relay. When twistd attaches it
  to the application it has just made, it sets that observer as the application's ILogObserver
  component, which twistd's AppLogger.start looks up before choosing one of its own; so
  `twistd -n mailrelay --config tap.conf` writes these lines with no extra flag.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from typing import Any, Optional, cast

from twisted import logger as _twisted_logger
from twisted.application import service
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import (FileLogObserver, ILogObserver, LogLevel, formatEvent, formatEventAsClassicLogText,
                            formatTime)
from twisted.python import logfile
from twisted.python.components import Componentized

from mailrelay.redaction import needs_redaction, redact, scrub

_LEVELS = frozenset(LogLevel.iterconstants())


class Logger(_twisted_logger.Logger):

    def emit(self, level: LogLevel, format: Optional[str] = None, **kwargs: object) -> None:
        if level not in _LEVELS:
            super().emit(level, format, **kwargs)      # Twisted reports the invalid level
            return
        kwargs.update(log_logger=self, log_level=level, log_namespace=self.namespace,
                      log_source=self.source, log_format=format, log_time=time.time())
        trace = kwargs.get("log_trace")
        if isinstance(trace, list):          # Twisted's event tracing (Logger.emit does the same)
            trace.append((self, self.observer))
        self.observer(kwargs)


_second: Optional[int] = None
_stamp = ""


def _time_stamp(when: float) -> str:
    """formatTime(when): the classic format has whole seconds, so one rendering serves a second."""
    global _second, _stamp
    second = int(when)
    if second != _second:
        _second, _stamp = second, formatTime(second)
    return _stamp


def event_text(event: dict) -> str:
    """formatEvent(event) (no traceback), by str.format_map when that is the same text."""
    fmt = event.get("log_format")
    if isinstance(fmt, str) and "()" not in fmt:
        try:
            return fmt.format_map(event)
        except Exception:
            pass
    return formatEvent(event)      # its "Unable to format event" text, or "" without a format


def classic_text(event: dict) -> Optional[str]:
    if needs_redaction(event):
        event, secrets = redact(event)
        line = _classic_text(event)
        return scrub(line, secrets) if line is not None else None
    return _classic_text(event)


def _classic_text(event: dict) -> Optional[str]:
    fmt = event.get("log_format")
    when = event.get("log_time")
    level = event.get("log_level")
    if (not isinstance(fmt, str) or "()" in fmt or "log_failure" in event or "log_system" in event
            or not isinstance(when, float) or not math.isfinite(when)
            or not isinstance(level, type(LogLevel.info))):
        return formatEventAsClassicLogText(event)
    try:
        text = fmt.format_map(event)
    except Exception:
        return formatEventAsClassicLogText(event)      # its "Unable to format event" line
    if not text:
        return None
    namespace = event.get("log_namespace", "-")
    line = f"{_time_stamp(when)} [{namespace}#{level.name}] {text}"
    return line.replace("\n", "\n\t") + "\n"


def text_observer(stream: Any) -> FileLogObserver:
    """twistd's text log observer (textFileLogObserver's lines) writing to `stream`."""
    return FileLogObserver(stream, classic_text)


def observer() -> FileLogObserver:
    """`twistd --logger mailrelay.logger.observer`: twistd's text lines on standard output."""
    return text_observer(sys.stdout)


def twistd_observer(options: Any) -> Optional[FileLogObserver]:
    """The observer twistd's logger would make for `options` (twistd's ServerOptions), writing
    classic_text: `--logfile=-` or `-n` with no `--logfile` → standard output; else the file
    (`twistd.log` by default), rotated on SIGUSR1 unless something already handles that signal.
    None where twistd must choose: `--syslog`, `--logger`, or a daemon given `--logfile=-` (twistd
    then refuses to start, with its own message)."""
    if options is None or options.get("syslog") or options.get("logger"):
        return None
    name = options.get("logfile") or ""
    nodaemon = bool(options.get("nodaemon"))
    if name == "-":
        return text_observer(sys.stdout) if nodaemon else None
    if nodaemon and not name:
        return text_observer(sys.stdout)
    log_file = logfile.LogFile.fromFullPath(name or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):      # as twistd does: SIGUSR1 rotates the log file

        def rotate(signum, frame):
            from twisted.internet import reactor

            cast(IReactorFromThreads, reactor).callFromThread(log_file.rotate)
        signal.signal(signal.SIGUSR1, rotate)
    return text_observer(log_file)


class TwistdLog(service.MultiService):
    """`relay` under twistd: gives the application twistd attaches it to `observer` as its
    ILogObserver (unless it has one already), which twistd starts logging to. Started, stopped and
    named through to `relay`, its only child."""

    def __init__(self, relay: service.IService, observer: Optional[ILogObserver]):
        super().__init__()
        self.relay, self.observer = relay, observer
        relay.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        if (self.observer is not None and isinstance(parent, Componentized)
                and parent.getComponent(ILogObserver, None) is None):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)
