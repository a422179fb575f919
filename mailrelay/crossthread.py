# -*- test-case-name: tests.test_crossthread -*-
"""Reading the reactor thread's containers from another thread, without a lock.

The metrics collector runs in a threadpool thread and reads dicts and sets the reactor thread keeps
changing (the scheduler's queue, the throttle state, the suppression list).  `list(d.items())` copies
in one C-level call, but a resize by the other thread during the copy raises RuntimeError ("changed
size during iteration"): such a read is simply tried again, a few times, before giving `fallback`.
"""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")
TRIES = 3


def read_unlocked(read: Callable[[], T], fallback: T, tries: int = TRIES) -> T:
    """`read()`, tried again while another thread resized what it copies; `fallback` after `tries`."""
    for _ in range(tries):
        try:
            return read()
        except RuntimeError:
            continue
    return fallback
