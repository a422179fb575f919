# -*- test-case-name: tests.test_backoff -*-
"""Retry intervals: how long a temporarily failed recipient waits before its next attempt.

In: the number of failed attempts so far.  Out: a delay in seconds.  The base interval is
`first_retry`, doubling after each failure, capped at `max_retry` (config.md [queue]; Postfix and
KumoMTA do the same).  The jitter is *downward only*: the delay is drawn from
(base * (1 - jitter), base], so `max_retry` stays a true ceiling and the first retry never comes
later than `first_retry`, while messages deferred together (one remote outage) spread out instead
of coming back in one burst.  RFC 5321 §4.5.4.1 (retry strategy) asks for intervals of about 30
minutes "in general" and allows variable ones; the defaults (5m doubling to 4h) are Postfix's.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

DEFAULT_JITTER = 0.2

# 2**64 times any sane first_retry is far past any max_retry: stop doubling there (no float overflow).
_MAX_DOUBLINGS = 64


class RandomSource(Protocol):
    def random(self) -> float:
        """A float in [0, 1)."""


@dataclass(frozen=True)
class Backoff:
    first_retry: float
    max_retry: float
    jitter: float = DEFAULT_JITTER
    rng: RandomSource = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), not {self.jitter!r}")
        if self.first_retry <= 0 or self.max_retry < self.first_retry:
            raise ValueError("need 0 < first_retry <= max_retry")

    def base_delay(self, attempts: int) -> float:
        """The un-jittered interval after `attempts` failed attempts (1 → first_retry)."""
        doublings = min(max(attempts, 1) - 1, _MAX_DOUBLINGS)
        return min(self.first_retry * 2.0 ** doublings, self.max_retry)

    def next_delay(self, attempts: int) -> float:
        """The jittered interval, in (base * (1 - jitter), base]."""
        return self.base_delay(attempts) * (1.0 - self.jitter * self.rng.random())
