"""mailrelay.spool.threads: blocking work on the spool's own threads, results back on the reactor."""
from __future__ import annotations

import threading

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailrelay.spool.threads import BlockingThreads


class BlockingThreadsTests(unittest.TestCase):
    def setUp(self):
        self.threads = BlockingThreads(reactor, 2, "test-spool")
        self.threads.start()
        self.addCleanup(lambda: self.threads.running and self.threads.stop())

    @defer.inlineCallbacks
    def test_the_work_runs_on_another_thread_and_the_result_arrives_on_the_reactors(self):
        fired_on = []
        d = self.threads.run(lambda a, b: (threading.current_thread().name, a + b), 2, 3)
        d.addCallback(lambda result: fired_on.append(threading.current_thread()) or result)
        name, total = yield d
        self.assertEqual(total, 5)
        self.assertTrue(name.startswith("test-spool-"))
        self.assertIs(fired_on[0], threading.main_thread())

    @defer.inlineCallbacks
    def test_an_exception_becomes_the_failure_of_that_call_only(self):
        def broken():
            raise OSError(28, "No space left on device")

        with self.assertRaises(OSError):
            yield self.threads.run(broken)
        self.assertEqual((yield self.threads.run(lambda: "still working")), "still working")

    @defer.inlineCallbacks
    def test_two_threads_run_two_jobs_at_once(self):
        both_in = threading.Barrier(2, timeout=10)
        results = yield defer.gatherResults([self.threads.run(both_in.wait) for _ in range(2)])
        self.assertEqual(sorted(results), [0, 1])

    @defer.inlineCallbacks
    def test_stop_lets_queued_work_finish_and_then_refuses_more(self):
        gate, done = threading.Event(), []
        jobs = [self.threads.run(gate.wait, 10) for _ in range(2)]     # both threads busy
        jobs.append(self.threads.run(lambda: done.append(1)))          # ... and this one waits in the queue
        threading.Timer(0.1, gate.set).start()
        self.threads.stop()                 # returns once the threads have ended
        self.assertEqual(done, [1])
        self.assertEqual((yield defer.gatherResults(jobs)), [True, True, None])
        self.assertFalse(any(t.is_alive() for t in threading.enumerate() if t.name.startswith("test-spool-")))
        with self.assertRaises(RuntimeError):
            self.threads.run(lambda: None)
