# -*- test-case-name: tests.test_crossthread -*-
"""mailrelay.crossthread: a copy that another thread's resize interrupted is read again, a bounded number
of times."""
from __future__ import annotations

from twisted.trial import unittest

from mailrelay.crossthread import TRIES, read_unlocked


class ReadUnlocked(unittest.TestCase):
    def test_a_read_interrupted_by_a_resize_is_tried_again(self):
        calls = []

        def read():
            calls.append(1)
            if len(calls) < TRIES:
                raise RuntimeError("dictionary changed size during iteration")
            return ["copied"]
        self.assertEqual(read_unlocked(read, None), ["copied"])
        self.assertEqual(len(calls), TRIES)

    def test_a_read_that_never_completes_gives_the_fallback_after_the_tries(self):
        calls = []

        def read():
            calls.append(1)
            raise RuntimeError("set changed size during iteration")
        self.assertEqual(read_unlocked(read, "fallback"), "fallback")
        self.assertEqual(len(calls), TRIES)

    def test_other_errors_are_not_hidden(self):
        self.assertRaises(KeyError, read_unlocked, lambda: {}["x"], None)
