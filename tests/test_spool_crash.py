"""Crash safety of the spool: every message whose commit fired survives a SIGKILL, body intact.

A real child process (tests/support/spool_crash.py) commits messages and prints each id once its commit
Deferred fired; the test kills it with SIGKILL after a random number of acknowledgements, then recovers
the spool in this process. SIGKILL does not drop the page cache, so this checks the ordering (nothing is
acknowledged before its size is written and it is fsync'd; files still in progress are recognised and
removed), not the fsyncs themselves.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from twisted.trial import unittest

from mailrelay.spool import Spool
from tests.support.spool_crash import body_for, envelope_for

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MESSAGES = 400          # the child exits by itself after this many, so the test can never hang


def run_and_kill(directory: Path, kill_after: int) -> tuple[list[tuple[int, str]], bytes]:
    """Start the writer, SIGKILL it after `kill_after` acknowledged ids; every (n, id) it printed."""
    child = subprocess.Popen([sys.executable, "-m", "tests.support.spool_crash", str(directory),
                              str(MESSAGES)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    lines = []
    try:
        while len(lines) < kill_after:
            line = child.stdout.readline()
            if not line:
                break
            lines.append(line)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        rest, errors = child.communicate()
    lines.extend(rest.splitlines(keepends=True))      # printed before it died: acknowledged too
    acknowledged = []
    for line in lines:
        if line.endswith(b"\n"):                        # a cut-off last line was never acknowledged
            n, queue_id = line.split()
            acknowledged.append((int(n), queue_id.decode("ascii")))
    return acknowledged, errors


class CrashTests(unittest.TestCase):

    def check_one_crash(self, kill_after: int) -> None:
        directory = Path(self.mktemp()).resolve()      # the child runs in the project root
        acknowledged, errors = run_and_kill(directory, kill_after)
        self.assertGreaterEqual(len(acknowledged), min(kill_after, MESSAGES), errors.decode(errors="replace"))

        spool = Spool(directory)
        self.assertFalse(Spool.in_use(directory))       # the kernel dropped the dead relay's lock
        recovered = spool.recover()

        for n, queue_id in acknowledged:
            self.assertIn(queue_id, recovered)
            message = spool.load(queue_id)
            octets = "7bit" if body_for(n).isascii() else "8bit"    # patched in place at commit when spilled
            *lines, last = body_for(n).split(b"\n")    # and long_lines (a last line without LF: over 999)
            long_lines = any(len(line) - line.endswith(b"\r") > 998 for line in lines) or len(last) > 999
            self.assertEqual(message.envelope, replace(envelope_for(n), octets=octets, long_lines=long_lines,
                                                       utf8_headers=False))     # an ASCII header block
            with message.open() as f:
                self.assertEqual(f.read(), body_for(n), f"message {n} ({queue_id})")
        self.assertEqual(os.listdir(directory / "tmp"), [])
        self.assertEqual(os.listdir(directory / "corrupt"), [])

    def test_every_acknowledged_message_survives_sigkill_at_random_points(self):
        rng = random.Random()
        for kill_after in (1, rng.randint(2, 30), rng.randint(30, 120)):
            self.check_one_crash(kill_after)
