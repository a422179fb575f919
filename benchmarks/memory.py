"""Memory of a running mailrelay: is a message streamed, is a session cheap?

Where it sits: outside the message's journey, watching the relay process while the journey happens.
It starts mailrelay (twistd) on loopback with a tap.conf like relay_vs_postfix.sh's, whose one route
goes to a discarding sink run here, then:

  (a) relays one 50 MiB message (sent with smtplib) and prints the relay's RSS before and after and its
      peak while relaying (/proc/PID/status VmRSS, VmHWM; the peak is reset first through
      /proc/PID/clear_refs), against the target: peak growth < 30 MiB, i.e. the message is streamed in
      and out, never held whole;
  (b) holds 1000 idle SMTP connections (each has read its 220 banner) and prints the RSS, against the
      target: < 200 MiB.

    /work/venv/bin/python benchmarks/memory.py [--size-mib 50] [--connections 1000] [--keep]

Exit status: 0 both targets met, 1 a target missed, 2 could not measure.  Loopback only, OS-chosen
ports, every wait bounded; the relay it started is stopped (by its pid) and its directory removed.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from harness import DiscardSink, free_port, mailrelay_conf, pid_alive, wait_for_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MIB = 1024 * 1024
TARGET_GROWTH_MIB = 30
TARGET_IDLE_MIB = 200
LINE = b"x" * 76 + b"\r\n"            # RFC 5321 §4.5.3.1.6: lines well under 1000 octets


def find_venv() -> Optional[Path]:
    """$MAILRELAY_VENV, ./.venv, the checkout's .venv, /work/venv: the first with bin/twistd."""
    candidates = [os.environ.get("MAILRELAY_VENV"), Path.cwd() / ".venv", REPO / ".venv", "/work/venv"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "bin" / "twistd").exists():
            return Path(candidate)
    return None


# --- /proc -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Memory:
    rss_kib: int        # VmRSS: resident now
    hwm_kib: int        # VmHWM: resident at the peak (since start, or since reset_peak)

    @property
    def rss_mib(self) -> float:
        return self.rss_kib / 1024

    @property
    def hwm_mib(self) -> float:
        return self.hwm_kib / 1024


def memory_of(pid: int) -> Memory:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])      # "12345 kB"
    return Memory(fields["VmRSS"], fields["VmHWM"])


def reset_peak(pid: int) -> bool:
    """Set VmHWM back to the current RSS (Linux: "5" into clear_refs); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- the relay under test ----------------------------------------------------------------------

class Relay:
    """mailrelay under twistd, in `workdir`, relaying everything to 127.0.0.1:`sink_port`."""

    def __init__(self, venv: Path, workdir: Path, sink_port: int, max_connections: int):
        self.port = free_port()
        self.workdir = workdir
        self.config = workdir / "tap.conf"
        self.log = workdir / "twistd.log"
        self.config.write_text(mailrelay_conf(self.port, sink_port, workdir / "spool",
                                              max_connections=max_connections,
                                              max_message_size="100MiB"))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                       os.environ.get("PYTHONPATH")])))
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(venv / "bin" / "twistd"), "-n", "--pidfile=", "mailrelay", "--config",
                 str(self.config)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid

    def wait_listening(self, timeout: float = 30) -> bool:
        return wait_for_port("127.0.0.1", self.port, timeout, lambda: pid_alive(self.pid))

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


# --- (a) one big message -----------------------------------------------------------------------

def send_message(port: int, body_bytes: int, timeout: float = 300) -> int:
    """One message of about `body_bytes` (whole lines) through smtplib; returns the body bytes sent."""
    lines_per_piece = MIB // len(LINE)
    lines_left = body_bytes // len(LINE)
    with smtplib.SMTP("127.0.0.1", port, local_hostname="memory.localhost", timeout=timeout) as smtp:
        smtp.ehlo()
        smtp.mail("bench@example.org", [f"SIZE={body_bytes + 1024}"])
        smtp.rcpt("sink@example.net")
        code, reply = smtp.docmd("DATA")
        if code != 354:
            raise smtplib.SMTPDataError(code, reply)
        smtp.send(b"From: <bench@example.org>\r\nTo: <sink@example.net>\r\n"
                  b"Subject: memory benchmark\r\n\r\n")
        while lines_left > 0:                     # about 1 MiB at a time, never the whole body
            lines = min(lines_left, lines_per_piece)
            smtp.send(LINE * lines)
            lines_left -= lines
        smtp.send(b".\r\n")                      # the body has no line starting with ".": no stuffing
        code, reply = smtp.getreply()
        if code != 250:
            raise smtplib.SMTPDataError(code, reply)
    return body_bytes // len(LINE) * len(LINE)


def measure_big_message(relay: Relay, sink: DiscardSink, size_mib: int) -> bool:
    send_message(relay.port, 64 * 1024)              # warm-up: code paths loaded, connections made
    if not sink.wait_for(1, 60):
        raise RuntimeError("the warm-up message never reached the sink")
    exact = reset_peak(relay.pid)
    before = memory_of(relay.pid)
    sink_bytes = sink.bytes
    started = time.monotonic()
    body = send_message(relay.port, size_mib * MIB)
    if not sink.wait_for(2, 300):
        raise RuntimeError(f"the {size_mib} MiB message did not reach the sink within 300 s")
    seconds = time.monotonic() - started
    after = memory_of(relay.pid)
    received = sink.bytes - sink_bytes
    if received < body:
        raise RuntimeError(f"the sink received {received} bytes, less than the {body} bytes of the body")
    growth = after.hwm_mib - before.rss_mib
    passed = growth < TARGET_GROWTH_MIB
    print(f"(a) a {size_mib} MiB message relayed in {seconds:.1f} s ({received / MIB:.1f} MiB at the sink):"
          f" RSS {before.rss_mib:.1f} MiB before, {after.rss_mib:.1f} MiB after, peak {after.hwm_mib:.1f} MiB"
          + ("" if exact else " (peak since start: clear_refs refused)"))
    print(f"    peak growth {growth:.1f} MiB (target < {TARGET_GROWTH_MIB} MiB): "
          + ("PASS" if passed else "FAIL"))
    return passed


# --- (b) idle connections ----------------------------------------------------------------------

def measure_idle_connections(relay: Relay, count: int) -> bool:
    before = memory_of(relay.pid)
    with ExitStack() as stack:
        opened = 0
        for _ in range(count):
            conn = stack.enter_context(socket.create_connection(("127.0.0.1", relay.port), timeout=10))
            banner = conn.recv(512)
            if not banner.startswith(b"220"):
                print(f"    connection {opened + 1} was answered {banner[:80]!r}")
                break
            opened += 1
        time.sleep(0.5)                          # let the relay finish whatever the banners started
        during = memory_of(relay.pid)
    per_connection = (during.rss_kib - before.rss_kib) / max(opened, 1)
    passed = opened == count and during.rss_mib < TARGET_IDLE_MIB
    print(f"(b) {opened} idle connections: RSS {during.rss_mib:.1f} MiB (before {before.rss_mib:.1f} MiB, "
          f"{per_connection:.0f} KiB per connection)")
    print(f"    target < {TARGET_IDLE_MIB} MiB with {count} held: " + ("PASS" if passed else "FAIL"))
    return passed


# --- main --------------------------------------------------------------------------------------

def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))   # the relay inherits it


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=50)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--keep", action="store_true", help="keep the relay's directory and log")
    args = parser.parse_args(argv)

    venv = find_venv()
    if venv is None:
        print("memory.py: no virtualenv with bin/twistd (set MAILRELAY_VENV)", file=sys.stderr)
        return 2
    raise_fd_limit(args.connections * 2 + 256)
    base = os.environ.get("BENCH_TMPDIR", "/var/tmp")
    workdir = Path(tempfile.mkdtemp(prefix="relaymemory.", dir=base if os.path.isdir(base) else None))
    sink = DiscardSink().start()
    relay = Relay(venv, workdir, sink.port, max_connections=args.connections + 100)
    try:
        if not relay.wait_listening():
            print("memory.py: mailrelay did not start listening; its log ends:\n" + relay.log_tail(),
                  file=sys.stderr)
            return 2
        print(f"memory.py: mailrelay pid {relay.pid} on 127.0.0.1:{relay.port} ({venv}), "
              f"sink 127.0.0.1:{sink.port}")
        big = measure_big_message(relay, sink, args.size_mib)
        idle = measure_idle_connections(relay, args.connections)
        return 0 if big and idle else 1
    except (OSError, smtplib.SMTPException, RuntimeError) as e:
        print(f"memory.py: could not measure: {e}\n{relay.log_tail()}", file=sys.stderr)
        return 2
    finally:
        relay.stop()
        sink.stop()
        if args.keep:
            print(f"kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
