"""Measuring helpers for the relay benchmarks (performance against Postfix): not part of the relay.

Where it sits: outside the message's journey, timing it.  smtp-source (Postfix's load generator) sends
messages into a relay (Postfix or mailrelay) which relays them to smtp-sink; the sink's running counter
(`smtp-sink -c`) says when the last one has arrived.  In: the sink's counter file, the relay's address,
the smtp-source arguments.  Out: one JSON line per measured run, and the comparison table.

relay_vs_postfix.sh calls this file as a command (`harness.py port|wait-port|run|table|mailrelay-conf`);
memory.py imports it.  Standard library only, so it runs with any Python 3.11.  SMTP: the discarding
sink below speaks just enough of RFC 5321 (§4.1.1 commands, §4.5.2 dot-stuffing and end of data) for a
relay to deliver to it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional, Sequence

POLL_SECONDS = 0.01           # how often the sink counter is read during a run
_COUNTER_TAIL = 256           # bytes read from the end of the counter file: more than one record
_MESG = re.compile(rb"mesg=(\d+)")


# --- ports and processes ------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free on `host` now (port 0); the caller binds it soon after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for_port(host: str, port: int, timeout: float,
                  alive: Callable[[], bool] = lambda: True) -> bool:
    """True once something accepts on host:port; False after `timeout` s or as soon as not alive()."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


# --- the smtp-sink counter ----------------------------------------------------------------------

def parse_counter(tail: bytes) -> int:
    """Messages received, from the end of `smtp-sink -c` output.

    smtp-sink writes one record per event, "sess=S quit=Q mesg=M" followed by CR; only a record that
    already has its CR is complete, so a record caught half-written is never read as a smaller number.
    """
    end = tail.rfind(b"\r")
    if end < 0:
        return 0
    start = tail.rfind(b"\r", 0, end) + 1
    match = _MESG.search(tail[start:end])
    return int(match.group(1)) if match else 0


def read_counter(f: BinaryIO) -> int:
    """The count from an open `smtp-sink -c` output file (read from its end)."""
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - _COUNTER_TAIL))
    return parse_counter(f.read())


def sink_count(counter_file: Path) -> int:
    try:
        with open(counter_file, "rb") as f:
            return read_counter(f)
    except FileNotFoundError:
        return 0


# --- one measured run ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RunResult:
    relay: str                 # "ceiling" | "postfix" | "mailrelay"
    load: str                  # the load's label, e.g. "-s 20 -m 5000 -l 2048"
    run: int
    messages: int              # what smtp-source was asked to send
    status: str                # "ok" | "timeout" | "source-failed" | "skipped" | "failed"
    accept_seconds: Optional[float] = None    # start → smtp-source exited
    e2e_seconds: Optional[float] = None       # start → the sink counted `messages` more
    delivered: int = 0                        # what the sink counted during the run
    elapsed: float = 0.0
    detail: str = ""

    @property
    def accept_rate(self) -> Optional[float]:
        return self.messages / self.accept_seconds if self.accept_seconds else None

    @property
    def e2e_rate(self) -> Optional[float]:
        if self.e2e_seconds:
            return self.messages / self.e2e_seconds
        if self.status == "timeout" and self.elapsed:
            return self.delivered / self.elapsed      # what it managed: shown marked, never as a pass
        return None


def measure(relay: str, load: str, run: int, messages: int, source_cmd: Sequence[str],
            counter_file: Path, timeout: float) -> RunResult:
    """Run smtp-source once; time its exit (accept) and the sink reaching +messages (end to end)."""
    counter = open(counter_file, "ab+")              # kept open: one read per poll, no reopening
    baseline = read_counter(counter)
    start = time.monotonic()
    errors = tempfile.TemporaryFile()                # a file, not a pipe: a chatty source never blocks
    source = subprocess.Popen(list(source_cmd), stdout=subprocess.DEVNULL, stderr=errors)
    accepted = e2e = None
    delivered = 0
    try:
        while True:                                   # bounded by `timeout`
            now = time.monotonic() - start
            if accepted is None and source.poll() is not None:
                accepted = now
                if source.returncode != 0:
                    break
            delivered = read_counter(counter) - baseline
            if delivered >= messages and accepted is not None:
                e2e = now
                break
            if now > timeout:
                break
            time.sleep(POLL_SECONDS)
    finally:
        counter.close()
        if source.poll() is None:
            source.kill()
        source.wait()
        errors.seek(0)
        error = errors.read(65536).decode(errors="replace").strip()
        errors.close()
    elapsed = time.monotonic() - start
    if accepted is not None and source.returncode != 0:
        status, detail = "source-failed", _last_line(error) or f"exit status {source.returncode}"
    elif e2e is None:
        status, detail = "timeout", f"{delivered}/{messages} delivered in {timeout:.0f}s"
        if accepted is None:
            detail += ", smtp-source still sending"
    else:
        status, detail = "ok", ""
    return RunResult(relay, load, run, messages, status, accepted if status != "source-failed" else None,
                     e2e, delivered, elapsed, detail)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def load_results(path: Path) -> list[RunResult]:
    results = []
    with open(path) as f:
        for line in f:
            if line.strip():
                results.append(RunResult(**json.loads(line)))
    return results


# --- the table ----------------------------------------------------------------------------------

def median_rate(results: Iterable[RunResult], attribute: str) -> tuple[Optional[float], bool]:
    """(median of the runs' rates, whether every run counted finished); None if no run has a rate."""
    usable = [r for r in results if r.status in ("ok", "timeout")]
    rates = [getattr(r, attribute) for r in usable]
    rates = [x for x in rates if x is not None]
    if not rates:
        return None, False
    return statistics.median(rates), all(r.status == "ok" for r in usable)


def _cell(rate: Optional[float], complete: bool = True) -> str:
    if rate is None:
        return "-"
    return f"{rate:,.0f}" + ("" if complete else "*")


def _ratio(mine: Optional[float], theirs: Optional[float], complete: bool = True) -> str:
    if mine is None or not theirs:
        return "-"
    return f"{mine / theirs:.2f}x" + ("" if complete else "*")


def format_table(results: Sequence[RunResult]) -> str:
    """Medians per load and relay, the ratio mailrelay/Postfix, and the ceiling, as aligned text."""
    loads = list(dict.fromkeys(r.load for r in results))
    header = ("load", "ceiling e2e", "postfix acc", "postfix e2e", "mailrelay acc", "mailrelay e2e",
              "ratio acc", "ratio e2e", "runs")
    rows = [header]
    for load in loads:
        of = {relay: [r for r in results if r.load == load and r.relay == relay]
              for relay in ("ceiling", "postfix", "mailrelay")}
        ceiling, c_ok = median_rate(of["ceiling"], "e2e_rate")
        p_acc, pa_ok = median_rate(of["postfix"], "accept_rate")
        p_e2e, pe_ok = median_rate(of["postfix"], "e2e_rate")
        m_acc, ma_ok = median_rate(of["mailrelay"], "accept_rate")
        m_e2e, me_ok = median_rate(of["mailrelay"], "e2e_rate")
        runs = "/".join(str(sum(r.status == "ok" for r in of[k])) for k in ("postfix", "mailrelay"))
        rows.append((load, _cell(ceiling, c_ok), _cell(p_acc, pa_ok), _cell(p_e2e, pe_ok),
                     _cell(m_acc, ma_ok), _cell(m_e2e, me_ok), _ratio(m_acc, p_acc, ma_ok and pa_ok),
                     _ratio(m_e2e, p_e2e, me_ok and pe_ok), runs))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_problems(results: Sequence[RunResult]) -> str:
    return "\n".join(f"  {r.relay} run {r.run} of {r.load}: {r.status}: {r.detail}"
                     for r in results if r.status != "ok")


# --- a mailrelay configuration equivalent to the private Postfix ---------------------------------

def mailrelay_conf(port: int, sink_port: int, spool: Path, *, max_connections: int = 2000,
                   max_message_size: str = "50MiB", delivery_process: str = "separate",
                   listener: str = "", limits: str = "", permits: str = "", tables: str = "") -> str:
    """tap.conf text: one loopback relay listener, 127.0.0.0/8 allowlisted, every recipient to the sink.

    The limits are raised so that they never decide a benchmark: Postfix exempts $mynetworks from its
    per-client connection limits (smtpd_client_event_limit_exceptions), so mailrelay gets the same room.
    Delivery runs in its own process (`[delivery] process`), as Postfix's smtp(8) runs apart from smtpd(8):
    both relays may use both cores. MAILRELAY_DELIVERY_PROCESS=inline measures the single-process relay.
    `listener`, `limits`: more lines for the listener and [limits]; `permits`: [[permit]] tables before
    the one for 127.0.0.0/8; `tables`: more tables at the end (cluster.py's nodes use all four).
    """
    return f'''# Written by benchmarks/harness.py: the mailrelay side of the Postfix comparison.
hostname = "mailrelay-bench.localhost"
spool = "{spool}"

[[listen]]
kind = "relay"
endpoint = "tcp:{port}:interface=127.0.0.1"
{listener}
[limits]
max_message_size = "{max_message_size}"
max_connections = {max_connections}
max_connections_per_ip = {max_connections}
{limits}
{permits}[[permit]]
networks = ["127.0.0.0/8"]

[transports.sink]
host = "127.0.0.1"
port = {sink_port}
security = "none"
verify = false

[[route]]
recipients = ["*"]
transport = "sink"

[delivery]
process = "{os.environ.get("MAILRELAY_DELIVERY_PROCESS", delivery_process)}"
{tables}'''


# --- a discarding SMTP sink (memory.py's next hop) ----------------------------------------------

class _SinkHandler(socketserver.StreamRequestHandler):
    """One SMTP session: every command accepted, message data counted and thrown away."""

    def handle(self) -> None:
        self.wfile.write(b"220 sink.localhost ESMTP discard\r\n")
        for _ in range(100_000):                       # bounded: a sink session is short
            line = self.rfile.readline(4096)
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.wfile.write(b"250-sink.localhost\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                 b"250 SIZE 0\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go on\r\n")
                size = self._discard_data()
                if size is None:
                    return
                self.server.received(size)
                self.wfile.write(b"250 2.0.0 discarded\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 2.0.0 bye\r\n")
                return
            else:
                self.wfile.write(b"250 2.0.0 ok\r\n")

    def _discard_data(self) -> Optional[int]:
        # RFC 5321 §4.1.1.4: the data ends at a line that is a lone "." (CRLF.CRLF); read by lines of
        # at most 64 KiB so a 50 MiB message never sits in this process either.
        size = 0
        at_line_start = True
        while True:
            chunk = self.rfile.readline(65536)
            if not chunk:
                return None
            if at_line_start and chunk == b".\r\n":
                return size
            size += len(chunk)
            at_line_start = chunk.endswith(b"\n")


class DiscardSink(socketserver.ThreadingTCPServer):
    """A loopback SMTP server on a port the OS picks; counts messages and bytes, keeps nothing."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1"):
        super().__init__((host, 0), _SinkHandler)
        self.port = self.server_address[1]
        self.messages = 0
        self.bytes = 0
        self._changed = threading.Condition()

    def received(self, size: int) -> None:
        with self._changed:
            self.messages += 1
            self.bytes += size
            self._changed.notify_all()

    def wait_for(self, messages: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.messages >= messages, timeout)

    def start(self) -> "DiscardSink":
        threading.Thread(target=self.serve_forever, name="discard-sink", daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


# --- command line (for relay_vs_postfix.sh) -----------------------------------------------------

def _cmd_run(args: argparse.Namespace) -> int:
    result = measure(args.relay, args.load, args.run, args.messages, args.source,
                     Path(args.counter), args.timeout)
    with open(args.out, "a") as f:
        f.write(json.dumps(asdict(result)) + "\n")
    rates = f"accept {_cell(result.accept_rate)}/s, end to end {_cell(result.e2e_rate)}/s"
    print(f"  {result.relay:<9} run {result.run}: {rates}"
          + (f"  [{result.status}: {result.detail}]" if result.status != "ok" else ""), flush=True)
    return 0 if result.status == "ok" else 3


def _cmd_record(args: argparse.Namespace) -> int:
    result = RunResult(args.relay, args.load, args.run, args.messages, args.status, detail=args.detail)
    with open(args.out, "a") as f:
        f.write(json.dumps(asdict(result)) + "\n")
    return 0


def _cmd_table(args: argparse.Namespace) -> int:
    results = load_results(Path(args.results))
    print(format_table(results))
    problems = format_problems(results)
    if any(r.status == "timeout" for r in results):
        print("\n* = the median includes runs that did not finish: their rate is what they delivered"
              " in the time allowed")
    if problems:
        print("\nruns that did not finish or did not run:")
        print(problems)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="harness.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("port", help="print a free loopback TCP port")
    wait = sub.add_parser("wait-port", help="exit 0 once HOST:PORT accepts")
    wait.add_argument("host")
    wait.add_argument("port", type=int)
    wait.add_argument("--timeout", type=float, default=30)
    wait.add_argument("--pid", type=int, help="give up as soon as this process has gone")
    run = sub.add_parser("run", help="one measured smtp-source run; appends a JSON line to --out")
    record = sub.add_parser("record", help="append a run that did not happen (skipped/failed)")
    for p in (run, record):
        p.add_argument("--relay", required=True)
        p.add_argument("--load", required=True)
        p.add_argument("--run", type=int, required=True)
        p.add_argument("--messages", type=int, required=True)
        p.add_argument("--out", required=True)
    run.add_argument("--counter", required=True, help="smtp-sink -c output file")
    run.add_argument("--timeout", type=float, default=120)
    run.add_argument("source", nargs=argparse.REMAINDER, help="-- smtp-source command line")
    record.add_argument("--status", required=True)
    record.add_argument("--detail", default="")
    table = sub.add_parser("table", help="print the comparison table from a results file")
    table.add_argument("results")
    conf = sub.add_parser("mailrelay-conf", help="print a tap.conf equivalent to the private Postfix")
    conf.add_argument("--port", type=int, required=True)
    conf.add_argument("--sink-port", type=int, required=True)
    conf.add_argument("--spool", required=True)
    args = parser.parse_args(argv)

    if args.command == "port":
        print(free_port())
        return 0
    if args.command == "wait-port":
        alive = (lambda: pid_alive(args.pid)) if args.pid else (lambda: True)
        return 0 if wait_for_port(args.host, args.port, args.timeout, alive) else 1
    if args.command == "run":
        if args.source[:1] == ["--"]:
            args.source = args.source[1:]
        return _cmd_run(args)
    if args.command == "record":
        return _cmd_record(args)
    if args.command == "table":
        return _cmd_table(args)
    print(mailrelay_conf(args.port, args.sink_port, Path(args.spool)), end="")
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)            # so `finally` blocks run: no smtp-source left behind


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
