"""Tests of the peers' helpers (peers.py, peers.sh): durability verdicts, configurations, the table.

    .venv/bin/python -m twisted.trial benchmarks/test_peers.py

The strace excerpts are the shapes the three relays produced on this machine (paths shortened); the
verdict must come from the order of the sync calls and the 250, never from the relay's name.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peers  # noqa: E402
from harness import RunResult  # noqa: E402

EXIM_TRACE = """\
570   18:17:44.784533 write(5<socket:[1243754]>, "354 Enter message\\r\\n", 19) = 19
570   18:17:44.785397 fsync(3</spool/input/1xZBNI-00009C-2W-D>) = 0
570   18:17:44.787472 fsync(4</spool/input/hdr.1xZBNI-00009C-2W>) = 0
570   18:17:44.788720 fsync(4</spool/input>) = 0
571   18:17:44.792271 write(5, "250 OK id=1xZBNI-00009C-2W\\r\\n", 28) = -1 EBADF (Bad file descriptor)
570   18:17:44.792301 write(5<socket:[1243754]>, "250 OK id=1xZBNI-00009C-2W\\r\\n", 28) = 28
572   18:17:44.804836 fsync(6</spool/input/1xZBNI-00009C-2W-J>) = 0
"""

OPENSMTPD_TRACE = """\
30107 18:17:45.870001 writev(12<socket:[1244393]>, [{iov_base="250 2.0.0 Ok\\r\\n", iov_len=14}], 1) = 14
30107 18:17:45.876976 writev(12<socket:[1244393]>, [{iov_base="354 Enter mail\\r\\n", iov_len=16}], 1) = 16
30110 18:17:45.878000 write(7</temporary/ec760014>, "Received: from vm (localhost [127.0.0.1])", 41) = 41
30107 18:17:45.879292 writev(12<socket:[1244393]>, [{iov_base="250 2.0.0 Message accepted\\r\\n", iov_len=28}], 1) = 28
+++ exited with 0 +++
"""


class StraceSummaryTests(unittest.TestCase):
    def test_sync_calls_between_the_354_and_the_250_mean_fsync_before_250(self):
        verdict, evidence = peers.strace_summary(EXIM_TRACE)
        self.assertTrue(verdict.startswith("fsync before 250"), verdict)
        self.assertIn("3 sync call(s)", verdict)
        # The reply the client saw is the evidence, not the failed copy from the forked process.
        replies = [line for line in evidence if '"250 ' in line]
        self.assertEqual(len(replies), 1)
        self.assertTrue(replies[0].endswith("= 28"), replies[0])
        self.assertTrue(any("-J>" in line for line in evidence))       # the later sync is shown too

    def test_no_sync_call_at_all(self):
        verdict, evidence = peers.strace_summary(OPENSMTPD_TRACE)
        self.assertTrue(verdict.startswith("no fsync at all"), verdict)
        self.assertEqual(len(evidence), 2)                                 # the 354 and its 250
        self.assertIn("Message accepted", evidence[1])

    def test_sync_calls_only_after_the_250(self):
        trace = OPENSMTPD_TRACE + '30106 18:17:45.990000 fsync(9</queue/ec/ec760014/envelope>) = 0\n'
        verdict, _ = peers.strace_summary(trace)
        self.assertTrue(verdict.startswith("no fsync before 250"), verdict)

    def test_a_trace_without_the_message_says_nothing_was_observed(self):
        verdict, evidence = peers.strace_summary("123 12:00:00.0 write(3, \"x\", 1) = 1\n")
        self.assertTrue(verdict.startswith("not observed"), verdict)
        self.assertEqual(evidence, [])
        verdict, _ = peers.strace_summary(EXIM_TRACE.splitlines()[0] + "\n")
        self.assertTrue(verdict.startswith("not observed"), verdict)


class ConfigTests(unittest.TestCase):
    def test_exim_relays_everything_to_the_sink_with_raised_limits(self):
        text = peers.exim_conf(2525, 2600, Path("/w/exim"), "/w/root/usr/sbin/exim4")
        for line in ("daemon_smtp_ports = 2525", "port = 2600", "route_list = * 127.0.0.1",
                     "spool_directory = /w/exim/spool", "exim_path = /w/root/usr/sbin/exim4",
                     "smtp_accept_max = 2000", "smtp_connect_backlog = 1024", "host_lookup =",
                     "local_interfaces = 127.0.0.1", "accept hosts = 127.0.0.0/8", "self = send"):
            self.assertIn(line + "\n", text)
        self.assertNotIn("disable_fsync", text)

    def test_opensmtpd_listens_on_loopback_and_relays_to_the_sink(self):
        text = peers.opensmtpd_conf(2525, 2600)
        self.assertIn("listen on 127.0.0.1 port 2525\n", text)
        self.assertIn("relay host smtp://127.0.0.1:2600", text)
        self.assertIn("match from src 127.0.0.0/8 for any", text)


class TableTests(unittest.TestCase):
    def result(self, relay, load, accept, e2e, status="ok", messages=1000):
        return RunResult(relay, load, 1, messages, status,
                         messages / accept if accept else None, messages / e2e if e2e else None,
                         messages if status == "ok" else 0, 1.0, "" if status == "ok" else "why")

    def test_a_row_per_load_and_relay_with_mailrelays_ratio_and_durability(self):
        results = [
            self.result("ceiling", "L1", 2000, 2000),
            self.result("postfix", "L1", 300, 300),
            self.result("mailrelay", "L1", 600, 400),
            self.result("exim", "L1", 80, 80),
            RunResult("opensmtpd", "L1", 1, 1000, "failed", detail="not running"),
        ]
        table = peers.format_table(results, {"exim": "fsync before 250", "opensmtpd": "not run"})
        lines = table.splitlines()
        self.assertEqual(len(lines), 2 + 3)                     # header, rule, postfix/exim/opensmtpd
        exim = next(line for line in lines if " exim " in line).split()
        self.assertEqual(exim[:5], ["L1", "exim", "80", "80", "600"])
        self.assertEqual(exim[6:9], ["7.50x", "5.00x", "1/1"])
        self.assertTrue(lines[next(i for i, x in enumerate(lines) if " exim " in x)]
                        .endswith("fsync before 250"))
        postfix = next(line for line in lines if " postfix " in line).split()
        self.assertEqual(postfix[6:8], ["2.00x", "1.33x"])
        self.assertTrue(postfix[-1] == "-")                     # no durability given: a dash
        opensmtpd = next(line for line in lines if " opensmtpd " in line).split()
        self.assertEqual(opensmtpd[2:4], ["-", "-"])
        self.assertEqual(opensmtpd[6:8], ["-", "-"])
        self.assertFalse(any("ceiling" in line for line in lines))


class LibraryPackageTests(unittest.TestCase):
    def test_debian_package_names_of_shared_libraries(self):
        for soname, package in (("libidn.so.12", "libidn12"), ("libevent-2.1.so.7", "libevent-2.1-7"),
                                ("libfoo2.so.0", "libfoo2-0"), ("libpcre2-8.so.0", "libpcre2-8-0")):
            out = subprocess.run(["bash", "-c", f'. "{HERE}/peers.sh" && library_package {soname}'],
                                 capture_output=True, text=True, check=True).stdout.strip()
            self.assertEqual(out, package, soname)
