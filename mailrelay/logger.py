# -*- test-case-name: tests.test_logger, tests.test_logrelay -*-
"""The two per-event costs of twisted.logger that showed up in the delivery process's profile, made
cheap without changing a byte of what is logged.

- `Logger`: twisted.logger.Logger whose emit() checks the level against a frozen set. Twisted's builds
  and sorts the list of LogLevel constants on every call: a third of a log line's cost. Everything in
  mailrelay logs through this class (same namespace rules, same events, same observers).
- `classic_text(event)`: exactly twisted.logger.formatEventAsClassicLogText(event) (twistd's own line,
  `<time> [<namespace>#<level>] <text>`), with the timestamp formatted once per second and the
  message rendered by str.format_map; events it cannot render identically (a failure, a
  `log_system`, Twisted's `{f()}` call syntax, a missing key) go to Twisted's own formatter.
- `speed_up_text_observers(publisher)`: twistd's own log observer (textFileLogObserver, default time
  format) given classic_text instead of Twisted's formatter: the same lines, written for less.
"""
from __future__ import annotations

import math
import time
from typing import Optional

from twisted import logger as _twisted_logger
from twisted.logger import (FileLogObserver, LogLevel, LogPublisher, formatEventAsClassicLogText, formatTime,
                            timeFormatRFC3339)

_LEVELS = frozenset(LogLevel.iterconstants())
# An event field holding lines already rendered by classic_text in another process (mailrelay.logrelay):
# classic_text writes them unchanged.
RAW_TEXT = "mailrelay_classic_text"


class Logger(_twisted_logger.Logger):

    def emit(self, level: LogLevel, format: Optional[str] = None, **kwargs: object) -> None:
        if level not in _LEVELS:
            super().emit(level, format, **kwargs)      # Twisted reports the invalid level
            return
        kwargs.update(log_logger=self, log_level=level, log_namespace=self.namespace,
                      log_source=self.source, log_format=format, log_time=time.time())
        if "log_trace" in kwargs:
            kwargs["log_trace"].append((self, self.observer))
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


def classic_text(event: dict) -> Optional[str]:
    fmt = event.get("log_format")
    if fmt is None and RAW_TEXT in event:
        return event[RAW_TEXT]
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


def _is_default_text_format(format_event) -> bool:
    """True for the formatEvent that textFileLogObserver(f) makes with its default time format."""
    code = getattr(format_event, "__code__", None)
    if code is None or getattr(format_event, "__qualname__", "") != "textFileLogObserver.<locals>.formatEvent":
        return False
    try:
        cells = dict(zip(code.co_freevars, (cell.cell_contents for cell in format_event.__closure__ or ())))
    except ValueError:            # an empty cell
        return False
    return cells.get("timeFormat") == timeFormatRFC3339


def speed_up_text_observers(publisher: LogPublisher) -> list[tuple[FileLogObserver, object]]:
    """Give every classic text observer of `publisher` (twistd's log file or stdout) classic_text.
    Anything else, or one with another time format, is left as it is. Returns what was changed, for
    restore_observers()."""
    changed = []
    for observer in list(getattr(publisher, "_observers", ())):
        if isinstance(observer, FileLogObserver) and _is_default_text_format(observer.formatEvent):
            changed.append((observer, observer.formatEvent))
            observer.formatEvent = classic_text
    return changed


def restore_observers(changed: list[tuple[FileLogObserver, object]]) -> None:
    for observer, format_event in changed:
        observer.formatEvent = format_event
