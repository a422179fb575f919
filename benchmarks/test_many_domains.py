# -*- test-case-name: benchmarks.test_many_domains -*-
"""Tests of many_domains.py's pieces: the zone it serves, the recipients it spreads, the sink counter it
reads, the injector, the CPU time of a process tree, and the table of medians and ratios.

    .venv/bin/python -m twisted.trial benchmarks/test_many_domains.py

Real files and a real loopback SMTP server (harness.DiscardSink, port 0); no root, no Postfix, no
timing assertions.  Not part of `trial tests`: benchmarks/ is not a package of the relay.
"""
from __future__ import annotations

import sys
from pathlib import Path

from twisted.trial import unittest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import many_domains  # noqa: E402
from harness import DiscardSink  # noqa: E402
from many_domains import MX_ADDRESS, ZONE, Run  # noqa: E402


class ZoneTests(unittest.TestCase):
    def test_every_domain_has_its_own_mx_name_and_all_share_one_address(self):
        records = many_domains.zone(3)
        names = [records[(f"d{n}.{ZONE}", "MX")][0].split()[1] for n in range(3)]
        self.assertEqual(len(set(names)), 3)
        self.assertEqual({records[(name.rstrip("."), "A")][0] for name in names}, {MX_ADDRESS})
        self.assertIn((ZONE, "SOA"), records)       # negative answers carry an SOA (RFC 2308)

    def test_recipients_go_round_robin_over_the_domains_or_all_to_one(self):
        many = many_domains.recipients("many", 7, 3)
        self.assertEqual([r.split("@")[1] for r in many][:4], [f"d0.{ZONE}", f"d1.{ZONE}", f"d2.{ZONE}", f"d0.{ZONE}"])
        self.assertEqual(len(set(many)), 7)
        self.assertEqual({r.split("@")[1] for r in many_domains.recipients("one", 5, 3)}, {f"one.{ZONE}"})


class SinkCounterTests(unittest.TestCase):
    def sink(self, data: bytes) -> many_domains.Sink:
        sink = object.__new__(many_domains.Sink)      # only the counter file: no smtp-sink process
        sink.counter = Path(self.mktemp())
        sink.counter.write_bytes(data)
        return sink

    def test_sessions_and_messages_from_the_last_complete_record(self):
        sink = self.sink(b"sess=1 quit=0 mesg=3\rsess=2 quit=1 mesg=7\rsess=3 quit=1 mesg=1")
        self.assertEqual(sink.read(), (2, 7))       # the half-written record is not read as mesg=1

    def test_nothing_yet_is_zero(self):
        self.assertEqual(self.sink(b"").read(), (0, 0))


class InjectorTests(unittest.TestCase):
    def test_every_message_arrives_over_pipelined_sessions(self):
        server = DiscardSink().start()
        self.addCleanup(server.stop)
        rcpts = many_domains.recipients("many", 45, 9)
        many_domains.inject(server.port, rcpts, size=1024)
        self.assertTrue(server.wait_for(45, 10))
        self.assertEqual(server.messages, 45)

    def test_a_refusal_fails_the_injection(self):
        with self.assertRaises(RuntimeError):
            many_domains.inject(1, ["u@d0.bench.test"])       # nothing listens on port 1


class TableTests(unittest.TestCase):
    def test_medians_and_ratios(self):
        results = {"mailrelay": {"many": [Run(100, 10, 0), Run(300, 30, 0), Run(200, 20, 0)], "one": [Run(400, 5, 0)]},
                   "postfix": {"many": [Run(100, 40, 1000)], "one": [Run(200, 10, 1000)]}}
        text = many_domains.table(results, 5000, 500)
        self.assertIn("| 5,000 to 500 domains | delivery rate (msg/s) | 200 | 100 | 2.00 |", text)
        self.assertIn("| 5,000 to 500 domains | connections to the MX | 20 | 40 | 0.50 |", text)
        self.assertIn("| 5,000 to one domain | DNS questions | 0 | 1,000 | 0.00 |", text)
        self.assertIn("| mailrelay: many domains / one domain | delivery rate | | | 0.50 |", text)

    def test_cpu_per_message(self):
        results = {"mailrelay": {"many": [Run(100, 10, 0, 2.5), Run(300, 30, 0, 1.5), Run(200, 20, 0, 2.0)],
                                 "one": [Run(400, 5, 0, 1.0)]},
                   "postfix": {"many": [Run(100, 40, 1000, 4.0)], "one": [Run(200, 10, 1000, 4.0)]}}
        text = many_domains.table(results, 5000, 500)
        self.assertIn("| 5,000 to 500 domains | relay CPU per message (ms) | 2.00 | 4.00 | 0.50 |", text)
        self.assertIn("| mailrelay: many domains / one domain | CPU per message | | | 2.00 |", text)
        self.assertIn("| postfix: many domains / one domain | CPU per message | | | 1.00 |", text)


class TreeCPUTests(unittest.TestCase):
    def test_a_child_that_burns_cpu_counts_after_it_is_waited_for(self):
        import os
        import subprocess
        before = many_domains.tree_cpu(os.getpid())
        child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.3\n"
                                  "while time.process_time() < end: pass"])
        child.wait()
        self.assertGreaterEqual(many_domains.tree_cpu(os.getpid()) - before, 0.25)   # its cutime, once reaped
