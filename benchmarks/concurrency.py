"""Concurrency: many sessions at once, mailrelay beside a private Postfix in one run.

    N clients ──SMTP──▶ relay ──SMTP──▶ DiscardSink (harness.py)

For each relay:
  (a) `--held` (2,000) sessions opened and held after EHLO: how many got their 220 and EHLO reply within 10 s, and the
      memory (PSS, every process of the relay together) they cost, per session;
  (b) `--sessions` (500) clients at once, each sending `--per-session` (10) messages of 2 KiB on its one
      session: seconds until the sink has every message, messages per second, memory at the peak.
Postfix runs as shipped except for its listener and relayhost (deep_queue.py's private instance): its
`default_process_limit` of 100 smtpd processes is the stock behaviour being compared, so sessions beyond
100 wait in the listen queue for their 220.  Needs root (Postfix).  Prints one table; asserts nothing.
Options: --held N, --sessions N, --per-session N, --only mailrelay|postfix.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from deep_queue import SINK, Mailrelay, Postfix, descendants, first_banner, rss_kib  # noqa: E402
from harness import DiscardSink  # noqa: E402
from memory import raise_fd_limit  # noqa: E402

BODY = (b"From: bench@example.org\r\nTo: sink@example.net\r\nSubject: concurrency\r\n\r\n"
        + (b"x" * 76 + b"\r\n") * 26)


def read_reply(f) -> bytes:
    while True:
        line = f.readline(1024)
        if not line or line[3:4] != b"-":
            return line


def hold_sessions(port: int, count: int, stack: ExitStack) -> int:
    """Open `count` sessions, EHLO on each; the number that got a 220 and a 250 within 10 s in all."""
    sockets = []
    for _ in range(count):
        try:
            s = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        except OSError:
            break
        sockets.append(s)
    served = 0
    deadline = time.monotonic() + 10            # 10 s for all of them, not each
    for s in sockets:
        try:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            f = s.makefile("rb")
            if read_reply(f).startswith(b"220"):
                s.sendall(b"EHLO bench.example.org\r\n")
                if read_reply(f).startswith(b"250"):
                    served += 1
        except OSError:
            pass
    return served


def one_session(port: int, messages: int, errors: list) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            f = s.makefile("rb")
            read_reply(f)
            s.sendall(b"EHLO bench.example.org\r\n")
            read_reply(f)
            for _ in range(messages):
                for command in (b"MAIL FROM:<bench@example.org>\r\n", b"RCPT TO:<sink@example.net>\r\n",
                                b"DATA\r\n"):
                    s.sendall(command)
                    reply = read_reply(f)
                    if reply[:1] not in (b"2", b"3"):
                        errors.append(reply)
                        return
                s.sendall(BODY + b".\r\n")
                reply = read_reply(f)
                if not reply.startswith(b"250"):
                    errors.append(reply)
                    return
            s.sendall(b"QUIT\r\n")
    except OSError as e:
        errors.append(str(e).encode())


def measure(relay, sink: DiscardSink, args: argparse.Namespace, say) -> dict:
    out: dict = {}
    relay.start()
    if first_banner(relay.port, 60) is None:
        raise RuntimeError(f"{relay.name} did not answer")
    time.sleep(1)
    before = rss_kib(descendants(relay.root()))
    with ExitStack() as stack:
        out["held"] = hold_sessions(relay.port, args.held, stack)
        time.sleep(1)
        out["held_kib"] = (rss_kib(descendants(relay.root())) - before) / max(1, out["held"])
    say(f"  {relay.name}: {out['held']} of {args.held} sessions served, "
        f"{out['held_kib']:.1f} KiB each")
    time.sleep(2)
    start_count = sink.messages
    errors: list = []
    threads = [threading.Thread(target=one_session, args=(relay.port, args.per_session, errors), daemon=True)
               for _ in range(args.sessions)]
    peak = 0
    start = time.monotonic()
    for t in threads:
        t.start()
    total = args.sessions * args.per_session
    while any(t.is_alive() for t in threads) and time.monotonic() - start < 300:
        peak = max(peak, rss_kib(descendants(relay.root())))
        time.sleep(0.2)
    sink.wait_for(start_count + total, 30)
    out["seconds"] = time.monotonic() - start
    out["delivered"] = sink.messages - start_count
    out["rate"] = out["delivered"] / out["seconds"]
    out["peak_mib"] = peak / 1024
    out["errors"] = len(errors)
    say(f"  {relay.name}: {out['delivered']} of {total} delivered in {out['seconds']:.1f} s, "
        f"{len(errors)} sessions failed, peak {out['peak_mib']:.0f} MiB")
    relay.stop()
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--per-session", type=int, default=10)
    parser.add_argument("--only", choices=("mailrelay", "postfix"))
    args = parser.parse_args(argv)
    raise_fd_limit(args.held * 3 + args.sessions * 3 + 1024)
    if not Path(SINK).exists():
        subprocess.run(["bash", "-c", "echo 'postfix postfix/main_mailer_type select No configuration' | "
                        "debconf-set-selections && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix"],
                       check=True, stdout=subprocess.DEVNULL)
    work = Path(tempfile.mkdtemp(prefix="concurrency-", dir=os.environ.get("BENCH_TMPDIR", "/var/tmp")))
    work.chmod(0o755)
    say = lambda text: print(text, flush=True)   # noqa: E731
    say(f"concurrency: {os.cpu_count()} CPUs, {args.held} held sessions, {args.sessions} x {args.per_session} "
        "messages")
    results = {}
    sink = DiscardSink().start()
    try:
        for kind in (Postfix, Mailrelay):
            if args.only and kind.name != args.only:
                continue
            relay = kind(work, sink.port)
            if kind is Mailrelay:          # room for every session, as Postfix exempts $mynetworks
                text = relay.config.read_text().replace("max_connections = 2000",
                                                        f"max_connections = {args.held + args.sessions + 100}")
                relay.config.write_text(text.replace("max_connections_per_ip = 2000",
                                                     f"max_connections_per_ip = {args.held + args.sessions + 100}"))
            try:
                results[kind.name] = measure(relay, sink, args, say)
            finally:
                relay.stop()
    finally:
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print("| concurrency | mailrelay | Postfix |\n| --- | --- | --- |")
    rows = [("sessions served of " + str(args.held) + " opened at once", "held", "d"),
            ("memory per held session (KiB, PSS)", "held_kib", ".1f"),
            (f"{args.sessions} x {args.per_session} messages: seconds", "seconds", ".1f"),
            ("messages per second", "rate", ".0f"),
            ("peak memory, all processes (MiB, PSS)", "peak_mib", ".0f"),
            ("sessions that failed", "errors", "d")]
    for label, key, fmt in rows:
        cells = [format(results[n][key], fmt) if n in results else "-" for n in ("mailrelay", "postfix")]
        print(f"| {label} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
