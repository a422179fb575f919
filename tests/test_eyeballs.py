"""Happy eyeballs (RFC 8305), the algorithm alone: outbound.eyeballs over scripted endpoints on a task.Clock.

Each fake endpoint records when it was asked to connect and hands back a Deferred the test settles:
`succeed()` builds the protocol through the factory it was given (as a TCP connection does, in the same
call as the Deferred fires), `fail()` errbacks it, and a cancel is recorded.  The real-socket side
(loopback DNS, sinks on ::1 and 127.0.0.x, a listener that drops SYNs) is in test_eyeballs_end_to_end.
"""
from __future__ import annotations

from twisted.internet import defer, error, protocol, task
from twisted.trial import unittest

from mailrelay.outbound.eyeballs import (
    CONNECTION_ATTEMPT_DELAY, AllAttemptsFailed, HappyEyeballsEndpoint, _OnceFactory, interleave,
)

V6A, V6B, V6C = "2001:db8::1", "2001:db8::2", "2001:db8::3"
V4A, V4B = "192.0.2.1", "192.0.2.2"


class FakeAttempt:
    """One connection attempt: its address, when it started, its Deferred, whether it was cancelled."""

    def __init__(self, address: str, started: float, factory):
        self.address, self.started, self.factory = address, started, factory
        self.cancelled = False
        self.deferred = defer.Deferred(canceller=self._cancel)

    def _cancel(self, d):
        self.cancelled = True
        d.errback(error.ConnectingCancelledError(self.address))

    def succeed(self):
        proto = self.factory.buildProtocol(self.address)
        if proto is None:
            self.deferred.errback(error.NoProtocol())
        else:
            self.deferred.callback(proto)
        return proto

    def fail(self, exc: Exception | None = None):
        self.deferred.errback(exc or error.ConnectionRefusedError(self.address))


class FakeNetwork:
    """endpoint_for(address): an endpoint whose connect() records a FakeAttempt (or fails at once for
    addresses in `unreachable`, like connect() on a host without an IPv6 route)."""

    def __init__(self, clock: task.Clock, unreachable=()):
        self.clock = clock
        self.attempts: list[FakeAttempt] = []
        self.unreachable = set(unreachable)

    def endpoint_for(self, address: str):
        network = self

        class Endpoint:
            def connect(self, factory):
                if address in network.unreachable:
                    network.attempts.append(FakeAttempt(address, network.clock.seconds(), factory))
                    return defer.fail(error.ConnectError(string=f"{address}: network unreachable"))
                attempt = FakeAttempt(address, network.clock.seconds(), factory)
                network.attempts.append(attempt)
                return attempt.deferred
        return Endpoint()

    def started(self) -> list[tuple[str, float]]:
        return [(a.address, round(a.started, 3)) for a in self.attempts]

    def attempt(self, address: str) -> FakeAttempt:
        return next(a for a in self.attempts if a.address == address)


class Client(protocol.Protocol):
    pass


class EyeballsTestCase(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.net = FakeNetwork(self.clock)
        self.factory = protocol.Factory.forProtocol(Client)

    def race(self, *addresses: str, delay: float = CONNECTION_ATTEMPT_DELAY):
        endpoint = HappyEyeballsEndpoint(self.clock, addresses, self.net.endpoint_for, delay)
        return endpoint, endpoint.connect(self.factory)


class OrderTests(unittest.TestCase):
    def test_ipv6_first_then_alternating_families_each_in_dns_order(self):
        self.assertEqual(interleave([V4A, V4B, V6A, V6B, V6C]), [V6A, V4A, V6B, V4B, V6C])
        self.assertEqual(interleave([V4A, V6A]), [V6A, V4A])

    def test_a_single_family_keeps_its_order_and_duplicates_go(self):
        self.assertEqual(interleave([V4B, V4A, V4B]), [V4B, V4A])
        self.assertEqual(interleave([V6B, V6A]), [V6B, V6A])
        self.assertEqual(interleave([]), [])

    def test_interleaving_twice_changes_nothing(self):
        once = interleave([V4A, V4B, V6A])
        self.assertEqual(interleave(once), once)

    def test_the_delay_is_bounded_as_rfc_8305_says(self):
        for delay in (0.05, 2.5):
            self.assertRaises(ValueError, HappyEyeballsEndpoint, task.Clock(), [V4A], lambda a: None, delay)
        self.assertRaises(ValueError, HappyEyeballsEndpoint, task.Clock(), [], lambda a: None)


class StaggerTests(EyeballsTestCase):
    def test_attempts_start_one_delay_apart_in_interleaved_order(self):
        _, d = self.race(V4A, V4B, V6A)
        self.assertEqual(self.net.started(), [(V6A, 0.0)])
        self.clock.advance(0.249)
        self.assertEqual(len(self.net.attempts), 1)      # nothing before the delay has passed
        self.clock.advance(0.001)
        self.clock.advance(0.25)
        self.assertEqual(self.net.started(), [(V6A, 0.0), (V4A, 0.25), (V4B, 0.5)])
        self.clock.advance(30)
        self.assertEqual(len(self.net.attempts), 3)
        self.assertNoResult(d)                           # every attempt still pending: still racing

    def test_a_refused_address_moves_on_at_once_and_the_stagger_restarts_from_there(self):
        _, d = self.race(V6A, V4A, V6B)
        self.clock.advance(0.05)
        self.net.attempt(V6A).fail()
        self.assertEqual(self.net.started(), [(V6A, 0.0), (V4A, 0.05)])
        self.clock.advance(0.25)
        self.assertEqual(self.net.started(), [(V6A, 0.0), (V4A, 0.05), (V6B, 0.3)])

    def test_an_address_failing_inside_connect_is_skipped_at_once(self):
        self.net.unreachable = {V6A, V6B}
        _, d = self.race(V6A, V4A, V6B, V4B)
        self.assertEqual(self.net.started(), [(V6A, 0.0), (V4A, 0.0)])
        self.clock.advance(0.25)                   # V6B fails inside connect(): V4B follows in the same call
        self.assertEqual(self.net.started(), [(V6A, 0.0), (V4A, 0.0), (V6B, 0.25), (V4B, 0.25)])
        self.net.attempt(V4B).succeed()
        self.assertIsInstance(self.successResultOf(d), Client)

    def test_the_configured_delay_is_used(self):
        self.race(V6A, V4A, delay=2.0)
        self.clock.advance(1.99)
        self.assertEqual(len(self.net.attempts), 1)
        self.clock.advance(0.01)
        self.assertEqual(len(self.net.attempts), 2)


class WinnerTests(EyeballsTestCase):
    def test_the_first_connection_wins_and_the_pending_ones_are_cancelled(self):
        endpoint, d = self.race(V6A, V4A, V6B, V4B)
        self.clock.pump([0.25, 0.25])                    # three started, the fourth not yet
        proto = self.net.attempt(V4A).succeed()
        self.assertIs(self.successResultOf(d), proto)
        self.assertEqual(endpoint.connected, V4A)
        self.assertEqual([(a.address, a.cancelled) for a in self.net.attempts],
                         [(V6A, True), (V4A, False), (V6B, True)])
        self.clock.advance(10)
        self.assertEqual(len(self.net.attempts), 3)      # no attempt after the winner
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(endpoint.failures, [])          # cancelled ones are not failures
        self.assertEqual(endpoint.untried(), [V6A, V6B, V4B])

    def test_a_quick_first_address_means_no_second_attempt(self):
        endpoint, d = self.race(V6A, V4A)
        self.clock.advance(0.01)
        self.net.attempt(V6A).succeed()
        self.successResultOf(d)
        self.clock.advance(5)
        self.assertEqual(self.net.started(), [(V6A, 0.0)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_hung_address_costs_one_delay_not_its_connect_timeout(self):
        # The first address never answers (its own 30 s timeout would fire at 30.0); the second answers
        # 10 ms after it is tried and wins at 0.26 s.
        hung_timeout = self.clock.callLater(30, lambda: self.net.attempt(V6A).fail(error.TimeoutError()))
        endpoint, d = self.race(V6A, V4A)
        self.clock.advance(0.25)
        self.clock.advance(0.01)
        self.net.attempt(V4A).succeed()
        self.successResultOf(d)
        self.assertEqual(self.clock.seconds(), 0.26)
        self.assertTrue(self.net.attempt(V6A).cancelled)
        hung_timeout.cancel()

    def test_only_one_protocol_is_ever_built(self):
        factory = _OnceFactory(self.factory)
        first = factory.buildProtocol(None)
        self.assertIsInstance(first, Client)
        self.assertIsNone(factory.buildProtocol(None))


class FailureTests(EyeballsTestCase):
    def test_every_address_failing_names_each_address_and_its_error(self):
        endpoint, d = self.race(V4A, V6A, V4B)
        self.net.attempt(V6A).fail(error.ConnectionRefusedError())
        self.net.attempt(V4A).fail(error.TimeoutError())
        self.assertNoResult(d)
        self.net.attempt(V4B).fail(error.ConnectionRefusedError())
        failure = self.failureResultOf(d, AllAttemptsFailed)
        self.assertIsInstance(failure.value, error.ConnectError)      # callers catching ConnectError still do
        self.assertEqual([a for a, _ in failure.value.failures], [V6A, V4A, V4B])
        text = str(failure.value)
        self.assertIn(f"{V6A}: Connection was refused", text)
        self.assertIn(f"{V4A}: User timeout caused connection failure", text)
        self.assertEqual(endpoint.untried(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_race_waits_for_a_slow_attempt_after_the_others_failed(self):
        _, d = self.race(V6A, V4A)
        self.clock.advance(0.25)
        self.net.attempt(V4A).fail()
        self.assertNoResult(d)                           # V6A may still answer
        self.net.attempt(V6A).succeed()
        self.successResultOf(d)

    def test_a_single_address_fails_with_its_own_error(self):
        _, d = self.race(V4A)
        self.net.attempt(V4A).fail(error.ConnectionRefusedError())
        self.failureResultOf(d, error.ConnectionRefusedError)

    def test_every_address_failing_inside_connect_fails_at_once(self):
        self.net.unreachable = {V6A, V6B}
        _, d = self.race(V6A, V6B)
        failure = self.failureResultOf(d, AllAttemptsFailed)
        self.assertEqual(len(failure.value.failures), 2)


class CancelTests(EyeballsTestCase):
    def test_cancelling_the_race_cancels_every_pending_attempt_and_starts_no_more(self):
        endpoint, d = self.race(V6A, V4A, V6B)
        self.clock.advance(0.25)
        d.cancel()
        self.failureResultOf(d, error.ConnectingCancelledError)
        self.assertEqual([(a.address, a.cancelled) for a in self.net.attempts], [(V6A, True), (V4A, True)])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(len(self.net.attempts), 2)
        self.assertIsNone(endpoint.connected)
        self.assertEqual(endpoint.untried(), [V6A, V4A, V6B])

    def test_cancelling_after_the_winner_changes_nothing(self):
        _, d = self.race(V6A)
        proto = self.net.attempt(V6A).succeed()
        d.cancel()
        self.assertIs(self.successResultOf(d), proto)
