"""Tests of the benchmark helpers (harness.py, memory.py, steps.py): the numbers they print must be right.

    cd /work/main && /work/venv/bin/trial benchmarks/test_harness.py

Real files, real loopback sockets (port 0), real subprocesses standing in for smtp-source; no timing
assertions.  Not part of `trial tests`: benchmarks/ is not a package of the relay.
"""
from __future__ import annotations

import os
import smtplib
import socket
import sys
import textwrap
from pathlib import Path

from twisted.trial import unittest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import memory  # noqa: E402
import steps  # noqa: E402
from harness import RunResult  # noqa: E402


def record(mesg: int) -> bytes:
    return f"sess={mesg} quit={mesg} mesg={mesg}\r".encode()


class CounterTests(unittest.TestCase):
    def test_last_complete_record_gives_the_count(self):
        self.assertEqual(harness.parse_counter(record(1) + record(2) + record(3)), 3)

    def test_half_written_record_is_not_read_as_a_smaller_count(self):
        # "mesg=1" caught before "23\r" arrives must not read as 1.
        self.assertEqual(harness.parse_counter(record(122) + b"sess=123 quit=123 mesg=1"), 122)

    def test_no_record_yet_counts_zero(self):
        self.assertEqual(harness.parse_counter(b""), 0)
        self.assertEqual(harness.parse_counter(b"sess=0 quit=0 me"), 0)

    def test_sink_count_reads_the_end_of_a_long_file(self):
        path = Path(self.mktemp())
        path.write_bytes(b"".join(record(n) for n in range(1, 5001)))
        self.assertEqual(harness.sink_count(path), 5000)

    def test_missing_counter_file_counts_zero(self):
        self.assertEqual(harness.sink_count(Path(self.mktemp())), 0)


def fake_source(counter: Path, messages: int, status: int = 0, already: int = 0) -> list[str]:
    """A stand-in for smtp-source whose 'relay' delivered `messages` more to the sink's counter."""
    code = textwrap.dedent(f"""
        import sys
        with open({str(counter)!r}, "ab") as f:
            for n in range({already + 1}, {already + messages + 1}):
                f.write(("sess=%d quit=%d mesg=%d\\r" % (n, n, n)).encode())
        sys.exit({status})
    """)
    return [sys.executable, "-c", code]


class MeasureTests(unittest.TestCase):
    def setUp(self):
        self.counter = Path(self.mktemp())
        self.counter.write_bytes(b"")

    def test_run_that_delivers_everything_has_accept_and_end_to_end_times(self):
        result = harness.measure("postfix", "load", 1, 50, fake_source(self.counter, 50), self.counter, 30)
        self.assertEqual(result.status, "ok")
        self.assertEqual(result.delivered, 50)
        self.assertIsNotNone(result.accept_rate)
        self.assertGreaterEqual(result.e2e_seconds, result.accept_seconds)

    def test_messages_counted_before_the_run_are_not_counted_again(self):
        self.counter.write_bytes(b"".join(record(n) for n in range(1, 101)))
        source = fake_source(self.counter, 40, already=100)
        result = harness.measure("postfix", "load", 1, 50, source, self.counter, 0.3)
        self.assertEqual((result.status, result.delivered), ("timeout", 40))

    def test_run_that_delivers_too_few_times_out_and_says_how_many_arrived(self):
        result = harness.measure("mailrelay", "load", 1, 50, fake_source(self.counter, 20),
                                 self.counter, 0.3)
        self.assertEqual(result.status, "timeout")
        self.assertEqual(result.delivered, 20)
        self.assertIn("20/50 delivered", result.detail)
        self.assertIsNone(result.e2e_seconds)
        self.assertIsNotNone(result.e2e_rate)           # delivered/elapsed, shown marked

    def test_source_failure_is_reported_not_timed(self):
        result = harness.measure("mailrelay", "load", 1, 50, fake_source(self.counter, 0, status=1),
                                 self.counter, 30)
        self.assertEqual(result.status, "source-failed")
        self.assertIsNone(result.accept_rate)


class TableTests(unittest.TestCase):
    def run_result(self, relay, run, accept, e2e, status="ok", messages=1000):
        return RunResult(relay, "-s 20", run, messages, status, accept, e2e, messages, e2e or 10.0)

    def test_medians_and_ratio_of_mailrelay_to_postfix(self):
        results = [
            self.run_result("ceiling", 1, 0.1, 0.1),
            self.run_result("postfix", 1, 1.0, 2.0), self.run_result("postfix", 2, 1.0, 1.0),
            self.run_result("postfix", 3, 1.0, 4.0),        # e2e median 2.0 s → 500/s
            self.run_result("mailrelay", 1, 1.0, 1.0), self.run_result("mailrelay", 2, 1.0, 1.0),
            self.run_result("mailrelay", 3, 1.0, 1.0),      # 1000/s
        ]
        table = harness.format_table(results).splitlines()
        self.assertEqual(len(table), 3)
        cells = table[2].split()
        self.assertEqual(cells[-3:], ["1.00x", "2.00x", "3/3"])
        self.assertIn("10,000", table[2])                  # the ceiling
        self.assertIn("500", cells)

    def test_unfinished_runs_are_marked_and_failed_relays_show_no_number(self):
        results = [
            self.run_result("postfix", 1, 1.0, 1.0),
            RunResult("mailrelay", "-s 20", 1, 1000, "timeout", None, None, 300, 10.0, "300/1000"),
            RunResult("mailrelay", "-s 20", 2, 1000, "skipped"),
        ]
        row = harness.format_table(results).splitlines()[2]
        self.assertIn("30*", row)                          # 300 delivered in 10 s
        self.assertIn("0.03x*", row)
        self.assertIn("1/0", row)
        self.assertIn("timeout", harness.format_problems(results))

    def test_results_round_trip_through_the_json_lines_file(self):
        path = Path(self.mktemp())
        argv = ["record", "--relay", "mailrelay", "--load", "-s 1", "--run", "2", "--messages", "10",
                "--status", "failed", "--detail", "not running", "--out", str(path)]
        self.assertEqual(harness.main(argv), 0)
        self.assertEqual(harness.load_results(path),
                         [RunResult("mailrelay", "-s 1", 2, 10, "failed", detail="not running")])


class ConfigTests(unittest.TestCase):
    def test_generated_tap_conf_is_accepted_by_the_relay_config_loader(self):
        from mailrelay.config import load

        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "tap.conf"
        path.write_text(harness.mailrelay_conf(2525, 2526, directory / "spool", max_connections=1100))
        config = load(path)
        self.assertEqual([(listener.kind, listener.endpoint) for listener in config.listeners],
                         [("relay", "tcp:2525:interface=127.0.0.1")])
        self.assertEqual(config.limits.max_connections_per_ip, 1100)
        self.assertEqual([str(n) for n in config.permits[0].networks], ["127.0.0.0/8"])
        self.assertEqual((config.transports["sink"].port, config.transports["sink"].security),
                         (2526, "none"))
        self.assertEqual(config.routes[0].recipients, ("*",))


class LoopbackTests(unittest.TestCase):
    def test_free_port_is_bindable_on_loopback(self):
        port = harness.free_port()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))

    def test_wait_for_port_sees_a_listener_and_gives_up_when_the_process_is_gone(self):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            self.assertTrue(harness.wait_for_port("127.0.0.1", listener.getsockname()[1], 5))
        self.assertFalse(harness.wait_for_port("127.0.0.1", harness.free_port(), 30, lambda: False))

    def test_discard_sink_counts_a_message_sent_with_smtplib_and_keeps_nothing(self):
        sink = harness.DiscardSink().start()
        self.addCleanup(sink.stop)
        body = b"Subject: t\r\n\r\nline one\r\n.a dot-stuffed line\r\nlast\r\n"
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as smtp:
            refused = smtp.sendmail("a@example.org", ["b@example.net"], body)
        self.assertEqual(refused, {})
        self.assertTrue(sink.wait_for(1, 10))
        self.assertEqual(sink.messages, 1)
        # The stuffed dot arrives as "..a": the sink counts wire bytes, it does not unstuff.
        self.assertEqual(sink.bytes, len(body) + 1)


class StepsTests(unittest.TestCase):
    def test_every_step_of_every_session_is_timed_for_each_relay(self):
        sinks = [harness.DiscardSink().start(), harness.DiscardSink().start()]
        for sink in sinks:
            self.addCleanup(sink.stop)
        relays = [("one", "127.0.0.1", sinks[0].port), ("two", "127.0.0.1", sinks[1].port)]
        timings = steps.measure(relays, sessions=5, size=3000, round_size=2)
        self.assertEqual(sorted(timings), ["one", "two"])
        for name in timings:
            self.assertEqual({step: len(v) for step, v in timings[name].items()}, {s: 5 for s in steps.STEPS})
        self.assertTrue(sinks[0].wait_for(5, 10) and sinks[1].wait_for(5, 10))
        self.assertGreaterEqual(sinks[0].bytes, 3000)
        table = steps.format_table(timings).splitlines()
        self.assertEqual(table[0].split(), ["step", "one", "two", "two", "-", "one"])
        self.assertEqual([line.split()[0] for line in table[2:]], [*steps.STEPS, "total"])

    def test_the_message_is_dot_terminated_and_about_the_size_asked(self):
        body = steps.message(2048)
        self.assertTrue(body.endswith(b"\r\n.\r\n"))
        self.assertLess(abs(len(body) - 2048), 40)
        self.assertNotIn(b"\r\n.\r\n", body[:-3])

    def test_a_refused_step_is_an_error_naming_the_step(self):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]

            def refuse():
                conn, _ = listener.accept()
                with conn:
                    conn.sendall(b"220 hi\r\n")
                    conn.recv(100)
                    conn.sendall(b"250 hello\r\n")
                    conn.recv(100)
                    conn.sendall(b"550 5.7.1 no\r\n")
                    conn.recv(100)

            import threading
            threading.Thread(target=refuse, daemon=True).start()
            with self.assertRaises(steps.StepError) as caught:
                steps.measure([("r", "127.0.0.1", port)], sessions=1, size=100)
            self.assertIn("mail: 550", str(caught.exception))


class MemoryTests(unittest.TestCase):
    def test_memory_of_reads_rss_and_peak_of_a_process(self):
        mine = memory.memory_of(os.getpid())
        self.assertGreater(mine.rss_kib, 0)
        self.assertGreaterEqual(mine.hwm_kib, mine.rss_kib)

    def test_reset_peak_forgets_an_old_peak_and_a_new_one_is_seen(self):
        pid = os.getpid()
        big = bytearray(64 * 1024 * 1024)
        big[::4096] = b"x" * len(big[::4096])          # touch every page: resident
        del big
        if not memory.reset_peak(pid):
            raise unittest.SkipTest("/proc/self/clear_refs not writable here")
        after_reset = memory.memory_of(pid)
        self.assertLess(after_reset.hwm_kib, after_reset.rss_kib + 32 * 1024)
        big = bytearray(48 * 1024 * 1024)
        big[::4096] = b"x" * len(big[::4096])
        del big
        self.assertGreater(memory.memory_of(pid).hwm_kib, after_reset.rss_kib + 32 * 1024)
