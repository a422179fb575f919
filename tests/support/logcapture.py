# -*- test-case-name: tests.test_ldap -*-
"""Every log event's text while a test runs: what was logged, and proof that secrets never were."""
from __future__ import annotations

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest


class LogLines:
    """The formatted text of every log event (and any failure's traceback) from now to the test's end.
    `raw`: each event's repr too, so a secret in a field no format string names is still caught."""

    def __init__(self, test: unittest.TestCase, raw: bool = False):
        self.lines: list[str] = []
        self._raw = raw
        globalLogPublisher.addObserver(self.observe)
        test.addCleanup(globalLogPublisher.removeObserver, self.observe)

    def observe(self, event) -> None:
        self.lines.append(formatEvent(event) or "")
        if self._raw:
            self.lines.append(repr(event))
        if "log_failure" in event:
            self.lines.append(event["log_failure"].getTraceback())

    def text(self) -> str:
        return "\n".join(self.lines)

    def take(self, word: str) -> list[str]:
        """The lines containing `word` since the last take, and forget every line."""
        found = [line for line in self.lines if word in line]
        self.lines = []
        return found
