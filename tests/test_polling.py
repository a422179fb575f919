# -*- test-case-name: tests.test_polling -*-
"""tests.support.polling: the one 'wait until' loop of the tests, on a task.Clock and on the reactor."""
from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from tests.support.polling import eventually, until


class UntilTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.looks = 0

    def later_true(self, after: int):
        def condition():
            self.looks += 1
            return self.looks > after and f"value after {self.looks} looks"
        return condition

    def test_fires_at_once_with_the_value_when_it_already_holds(self):
        d = until(lambda: ["there"], "a list", clock=self.clock)
        self.assertEqual(self.successResultOf(d), ["there"])

    def test_looks_again_every_interval_until_it_holds(self):
        d = until(self.later_true(3), "the fourth look", timeout=10, interval=0.5, clock=self.clock)
        self.clock.advance(0.5)
        self.clock.advance(0.5)
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.assertEqual(self.successResultOf(d), "value after 4 looks")
        self.assertEqual(self.looks, 4)

    def test_fails_with_what_it_waited_for_after_the_timeout(self):
        d = until(lambda: 0, "the sink to hear from us", timeout=1, interval=0.25, clock=self.clock)
        self.clock.pump([0.25] * 3)
        self.assertNoResult(d)
        self.clock.advance(0.25)
        failure = self.failureResultOf(d, unittest.FailTest)
        self.assertEqual(str(failure.value), "gave up waiting for the sink to hear from us after 1s (last value: 0)")
        self.assertIsInstance(failure.value, AssertionError)

    def test_a_deferred_condition_is_waited_for(self):
        answers = [defer.succeed(False), defer.succeed("yes")]
        d = until(lambda: answers.pop(0), "the second answer", interval=1, clock=self.clock)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(d), "yes")

    def test_an_exception_from_the_condition_is_not_swallowed(self):
        d = until(lambda: 1 / 0, "a number", clock=self.clock)
        self.failureResultOf(d, ZeroDivisionError)

    @defer.inlineCallbacks
    def test_on_the_real_reactor(self):
        flag = []
        from twisted.internet import reactor
        reactor.callLater(0.05, flag.append, "set")
        value = yield until(lambda: flag, "the flag", timeout=10)
        self.assertEqual(value, ["set"])


class EventuallyTests(unittest.TestCase):
    def test_the_last_value_once_the_timeout_passes(self):
        clock, values = task.Clock(), iter([0, "", None, []])
        d = eventually(lambda: next(values), timeout=3, interval=1, clock=clock)
        clock.pump([1, 1, 1])
        self.assertEqual(self.successResultOf(d), [])

    def test_the_first_true_value(self):
        clock, values = task.Clock(), iter([0, 7, 8])
        d = eventually(lambda: next(values), timeout=3, interval=1, clock=clock)
        clock.advance(1)
        self.assertEqual(self.successResultOf(d), 7)
