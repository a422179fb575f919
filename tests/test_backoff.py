"""Retry intervals: first_retry doubling to max_retry, with downward jitter in (base*(1-j), base]."""
from __future__ import annotations

import random

from twisted.trial import unittest

from mailrelay.queue.backoff import DEFAULT_JITTER, Backoff


class _Fixed:
    """A random source that always answers the same number."""

    def __init__(self, value: float):
        self.value = value

    def random(self) -> float:
        return self.value


class BaseDelayTests(unittest.TestCase):
    def test_base_delay_starts_at_first_retry_and_doubles_up_to_max_retry(self):
        backoff = Backoff(300.0, 4 * 3600.0)
        self.assertEqual([backoff.base_delay(n) for n in range(1, 9)],
                         [300.0, 600.0, 1200.0, 2400.0, 4800.0, 9600.0, 14400.0, 14400.0])

    def test_zero_or_negative_attempts_count_as_the_first(self):
        backoff = Backoff(300.0, 3600.0)
        self.assertEqual(backoff.base_delay(0), 300.0)
        self.assertEqual(backoff.base_delay(-3), 300.0)

    def test_huge_attempt_counts_stay_at_max_retry_without_overflow(self):
        self.assertEqual(Backoff(1.0, 60.0).base_delay(10 ** 6), 60.0)

    def test_without_jitter_next_delay_is_the_base_delay(self):
        backoff = Backoff(300.0, 4 * 3600.0, jitter=0.0)
        self.assertEqual([backoff.next_delay(n) for n in (1, 2, 3, 10)], [300.0, 600.0, 1200.0, 14400.0])


class JitterTests(unittest.TestCase):
    def test_jitter_stays_within_bounds_for_many_seeds(self):
        # Property: for every seed and attempt count, base*(1-j) < delay <= base, and never above max_retry.
        for seed in range(500):
            backoff = Backoff(300.0, 4 * 3600.0, rng=random.Random(seed))
            for attempts in range(1, 15):
                base = backoff.base_delay(attempts)
                delay = backoff.next_delay(attempts)
                self.assertGreater(delay, base * (1 - DEFAULT_JITTER))
                self.assertLessEqual(delay, base)
                self.assertLessEqual(delay, 4 * 3600.0)

    def test_jitter_extremes_of_the_random_source(self):
        self.assertEqual(Backoff(100.0, 1000.0, jitter=0.2, rng=_Fixed(0.0)).next_delay(1), 100.0)
        self.assertAlmostEqual(Backoff(100.0, 1000.0, jitter=0.2, rng=_Fixed(0.999999)).next_delay(1),
                               80.0, places=3)

    def test_jitter_spreads_delays_of_messages_deferred_together(self):
        backoff = Backoff(300.0, 3600.0, rng=random.Random(7))
        delays = {round(backoff.next_delay(1), 3) for _ in range(50)}
        self.assertGreater(len(delays), 40)
        self.assertGreater(max(delays) - min(delays), 300.0 * DEFAULT_JITTER / 2)

    def test_same_seed_gives_the_same_sequence(self):
        first = Backoff(60.0, 600.0, rng=random.Random(42))
        second = Backoff(60.0, 600.0, rng=random.Random(42))
        self.assertEqual([first.next_delay(n) for n in range(1, 8)], [second.next_delay(n) for n in range(1, 8)])

    def test_invalid_parameters_are_refused(self):
        self.assertRaises(ValueError, Backoff, 300.0, 3600.0, jitter=1.0)
        self.assertRaises(ValueError, Backoff, 300.0, 3600.0, jitter=-0.1)
        self.assertRaises(ValueError, Backoff, 0.0, 3600.0)
        self.assertRaises(ValueError, Backoff, 600.0, 300.0)
