"""Where one session's time goes: the latency of each SMTP step, relay by relay.

Where it sits: outside the message's journey, timing it.  `smtp-source -s 1` is bound by the sum of
these steps, not by throughput, so the table says which step makes the difference.  In: relays as
NAME=HOST:PORT.  Out: per step (connect to banner, HELO, MAIL, RCPT, DATA, end of data to 250, QUIT,
close), the median milliseconds over `--sessions` sequential sessions, one column per relay, and each
relay's total.  Sessions alternate between the relays in rounds of `--round`, so that a slow phase
of the machine falls on all alike.  The message is what smtp-source sends (HELO, From/To/Date/
Message-Id, "La de da" lines up to `--size` bytes).  Standard library only.

    python3 benchmarks/steps.py postfix=127.0.0.1:2525 mailrelay=127.0.0.1:2526 --sessions 1000

relay_vs_postfix.sh runs it with `--steps` while both relays and the sink are up.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from email.utils import formatdate
from typing import Optional, Sequence

STEPS = ("banner", "helo", "mail", "rcpt", "data", "dot", "quit", "close")


class StepError(RuntimeError):
    """A relay answered a step with something other than the expected reply (or closed)."""


def message(size: int) -> bytes:
    """A dot-stuffed message body ending in CRLF.CRLF, about `size` bytes, like smtp-source's."""
    head = (f"From: <bench@example.org>\r\nTo: <sink@example.net>\r\nDate: {formatdate()}\r\n"
            f"Message-Id: <{time.time_ns()}@steps.localhost>\r\n\r\n").encode("ascii")
    lines, n = [head], len(head)
    while n < size:
        line = f"La de da de da {len(lines)}.\r\n".encode("ascii")
        lines.append(line)
        n += len(line)
    return b"".join(lines) + b".\r\n"


def _reply(sock: socket.socket, buffer: bytearray) -> int:
    """Read one whole (possibly multi-line) reply; its code."""
    while True:
        end = buffer.find(b"\r\n")
        while end >= 0:
            line = bytes(buffer[:end])
            del buffer[:end + 2]
            if line[3:4] != b"-":
                return int(line[:3]) if line[:3].isdigit() else 0
            end = buffer.find(b"\r\n")
        data = sock.recv(65536)
        if not data:
            raise StepError("connection closed")
        buffer += data


def one_session(host: str, port: int, body: bytes, timings: dict[str, list[float]]) -> None:
    """One smtp-source-like session; appends each step's seconds to `timings`."""
    clock = time.perf_counter
    start = clock()
    sock = socket.create_connection((host, port), timeout=30)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray()
        if _reply(sock, buffer) != 220:
            raise StepError("no 220 banner")
        timings["banner"].append(clock() - start)
        for step, command, expected in (
                ("helo", b"HELO steps.localhost\r\n", 250),
                ("mail", b"MAIL FROM:<bench@example.org>\r\n", 250),
                ("rcpt", b"RCPT TO:<sink@example.net>\r\n", 250),
                ("data", b"DATA\r\n", 354),
                ("dot", body, 250),
                ("quit", b"QUIT\r\n", 221)):
            t = clock()
            sock.sendall(command)
            code = _reply(sock, buffer)
            if code != expected:
                raise StepError(f"{step}: {code} (expected {expected})")
            timings[step].append(clock() - t)
        t = clock()
        sock.recv(1)            # the server closes after 221: wait for its FIN
        timings["close"].append(clock() - t)
    finally:
        sock.close()


def measure(relays: Sequence[tuple[str, str, int]], sessions: int, size: int,
            round_size: int = 50) -> dict[str, dict[str, list[float]]]:
    """{relay name: {step: [seconds, ...]}} over `sessions` sessions per relay, alternating."""
    timings = {name: {step: [] for step in STEPS} for name, _, _ in relays}
    done = 0
    while done < sessions:
        batch = min(round_size, sessions - done)
        for name, host, port in relays:
            body = message(size)
            for _ in range(batch):
                one_session(host, port, body, timings[name])
        done += batch
    return timings


def format_table(timings: dict[str, dict[str, list[float]]]) -> str:
    names = list(timings)
    rows = [["step", *names]]
    totals = {name: 0.0 for name in names}
    for step in STEPS:
        row = [step]
        for name in names:
            values = timings[name][step]
            median = statistics.median(values) * 1000 if values else float("nan")
            totals[name] += median
            row.append(f"{median:.3f}")
        rows.append(row)
    rows.append(["total", *(f"{totals[name]:.3f}" for name in names)])
    if len(names) == 2:
        rows[0].append(f"{names[1]} - {names[0]}")
        for row in rows[1:]:
            row.append(f"{float(row[2]) - float(row[1]):+.3f}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _relay(text: str) -> tuple[str, str, int]:
    name, _, address = text.partition("=")
    host, _, port = address.rpartition(":")
    if not name or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=HOST:PORT")
    return name, host, int(port)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="steps.py", description=__doc__.splitlines()[0])
    parser.add_argument("relays", nargs="+", type=_relay, metavar="NAME=HOST:PORT")
    parser.add_argument("--sessions", type=int, default=1000, help="sessions per relay (default 1000)")
    parser.add_argument("--size", type=int, default=2048, help="message bytes (default 2048)")
    parser.add_argument("--round", type=int, default=50, help="sessions per relay before switching")
    args = parser.parse_args(argv)
    before = os.getloadavg()
    try:
        timings = measure(args.relays, args.sessions, args.size, args.round)
    except (OSError, StepError) as e:
        print(f"steps.py: {e}", file=sys.stderr)
        return 1
    print(f"median milliseconds per step, {args.sessions} sequential sessions per relay, "
          f"{args.size}-byte messages (load average {before[0]:.2f} before, {os.getloadavg()[0]:.2f} after):")
    print(format_table(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
