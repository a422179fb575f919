# -*- test-case-name: tests.test_polling -*-
"""Waiting, in a test on the real reactor, for something another party does (a sink receiving, a file
going, a subprocess logging): one polling loop for every such test.

    yield until(lambda: len(sink.messages) == 2, "two messages at the sink")
    value = yield eventually(lambda: counter.value(), timeout=10)    # the last value, true or not

`until` fails the test (twisted.trial's FailTest, an AssertionError) with what it waited for once
`timeout` seconds have passed; `eventually` fires with the last value instead, for a test that asserts
on it itself.  The condition may return a Deferred.  Waiting is bounded: a test never hangs on it.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.trial.unittest import FailTest

INTERVAL = 0.02        # seconds between two looks: the reactor runs (and threads report back) in between
TIMEOUT = 30.0


class _GaveUp(Exception):
    def __init__(self, last: Any):
        self.last = last


@defer.inlineCallbacks
def _poll(condition: Callable[[], Any], timeout: float, interval: float, clock):
    now = time.monotonic if clock is None else clock.seconds     # a task.Clock in the helper's own tests
    if clock is None:
        from twisted.internet import reactor as clock
    deadline = now() + timeout
    while True:
        value = yield defer.maybeDeferred(condition)
        if value:
            return value
        if now() >= deadline:
            raise _GaveUp(value)
        yield task.deferLater(clock, interval, lambda: None)


def until(condition: Callable[[], Any], what: str = "the condition", timeout: float = TIMEOUT,
          interval: float = INTERVAL, clock=None) -> defer.Deferred:
    """A Deferred firing with `condition()`'s first true value, looked at every `interval` seconds;
    failing with FailTest("gave up waiting for <what> after <timeout>s") when `timeout` passes first."""
    def gave_up(failure):
        failure.trap(_GaveUp)
        raise FailTest(f"gave up waiting for {what} after {timeout:g}s (last value: {failure.value.last!r})")
    return _poll(condition, timeout, interval, clock).addErrback(gave_up)


def eventually(condition: Callable[[], Any], timeout: float = TIMEOUT, interval: float = INTERVAL,
               clock=None) -> defer.Deferred:
    """A Deferred firing with `condition()`'s value: its first true one, or the last one looked at once
    `timeout` seconds have passed (the caller asserts on it)."""
    def gave_up(failure):
        failure.trap(_GaveUp)
        return failure.value.last
    return _poll(condition, timeout, interval, clock).addErrback(gave_up)
