"""Other MTAs as relays beside mailrelay and Postfix: their configurations, durability, and table.

Where it sits: outside the message's journey, timing it.  relay_vs_postfix.sh --peers runs Exim and
OpenSMTPD (their Debian packages unpacked into the work directory, never installed: both conflict with
postfix) as relays between smtp-source and smtp-sink, interleaved with the other two; benchmarks/peers.sh
starts and stops them.  This file writes their configurations, reads an strace of one relayed message
to say whether a relay syncs its queue file before its 250 (RFC 5321 §6.1: a 250 to the end of data is
the relay taking responsibility for the message), and prints the table of mailrelay against each relay.

    peers.py exim-conf --port P --sink-port S --dir D --exim PATH
    peers.py opensmtpd-conf --port P --sink-port S
    peers.py strace-summary FILE          # verdict on the first line, then the evidence
    peers.py table RESULTS --durability NAME=TEXT ...

Standard library only.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import RunResult, _cell, _ratio, load_results, median_rate  # noqa: E402

PEERS = ("postfix", "exim", "opensmtpd")        # the relays mailrelay is compared with, in table order


# --- configurations -----------------------------------------------------------------------------

def exim_conf(port: int, sink_port: int, directory: Path, exim: str, user: str = "Debian-exim") -> str:
    """An Exim configuration equivalent to the private Postfix: loopback relay, all mail to the sink.

    Exim as shipped, except what a loopback relay to one next hop needs and the limits, which are
    raised so that they never decide the benchmark (Postfix exempts $mynetworks, mailrelay gets 2000):
    smtp_accept_max (default 20 connections), smtp_connect_backlog (default 20), remote_max_parallel.
    No host or ident lookups (the defaults of an empty configuration, said explicitly); the spool is
    fsynced as shipped (Exim syncs the -D and -H files and the input directory before the 250).
    """
    return f"""# Written by benchmarks/peers.py: Exim as a loopback relay to smtp-sink.
primary_hostname = exim-bench.localhost
exim_path = {exim}
keep_environment = LD_LIBRARY_PATH
spool_directory = {directory}/spool
log_file_path = {directory}/log/%slog
pid_file_path = {directory}/exim.pid
exim_user = {user}
exim_group = {user}
deliver_drop_privilege = true
daemon_smtp_ports = {port}
local_interfaces = 127.0.0.1
tls_advertise_hosts =
host_lookup =
rfc1413_hosts =
queue_only = false
smtp_connect_backlog = 1024
smtp_accept_max = 2000
smtp_accept_max_per_host = 2000
smtp_accept_queue_per_connection = 0
remote_max_parallel = 100
acl_smtp_rcpt = acl_rcpt

begin acl
acl_rcpt:
  accept hosts = 127.0.0.0/8
  deny message = relay not permitted

begin routers
sink:
  driver = manualroute
  route_list = * 127.0.0.1
  self = send
  transport = sink_smtp

begin transports
sink_smtp:
  driver = smtp
  port = {sink_port}
  allow_localhost
  hosts_avoid_tls = *

begin retry
* * F,1h,1m
"""


def opensmtpd_conf(port: int, sink_port: int) -> str:
    """An OpenSMTPD configuration: listen on loopback, relay everything to the sink.

    The queue is compiled in (/var/spool/smtpd; peers.sh mounts a private directory there) and so is
    the listen backlog (5, SMTPD_BACKLOG): neither can be set here.  OpenSMTPD looks up every client's
    reverse name; peers.sh gives it a resolv.conf that answers from its own /etc/hosts.
    """
    return f"""# Written by benchmarks/peers.py: OpenSMTPD as a loopback relay to smtp-sink.
listen on 127.0.0.1 port {port}
action "sink" relay host smtp://127.0.0.1:{sink_port}
match from src 127.0.0.0/8 for any action "sink"
"""


# --- durability: what an strace of one relayed message shows -------------------------------------

_SYNC = re.compile(r"\b(fsync|fdatasync|sync_file_range|syncfs|msync|sync)\(")
_REPLY_250 = re.compile(r'"250[ -]')
_REPLY_354 = re.compile(r'"354[ -]')
_FAILED = re.compile(r"= -1 E[A-Z]+")          # a write that failed carried no reply to the client


def strace_summary(text: str) -> tuple[str, list[str]]:
    """(verdict, evidence lines) from `strace -f -y` of a relay receiving and relaying one message.

    The 250 that answers the end of data is the first 250 written after the 354 (smtp-source does not
    pipeline DATA) by a write that did not fail: a forked Exim process flushing a copy of its parent's
    output buffer onto a closed descriptor gets EBADF, and the client never saw that one.  A sync call
    between the 354 and that 250 means the queue file was on disk before
    the relay took responsibility; the evidence is every sync call and that 250, in order.
    """
    lines = [line.rstrip() for line in text.splitlines() if line.strip()
             and not line.lstrip("0123456789 ").startswith(("+++", "---"))]
    start = next((n for n, line in enumerate(lines) if _REPLY_354.search(line)), None)
    if start is None:
        return "not observed (no 354 in the trace: the message did not reach this relay's trace)", []
    end = next((n for n in range(start + 1, len(lines))
                if _REPLY_250.search(lines[n]) and not _FAILED.search(lines[n])), None)
    if end is None:
        return "not observed (no 250 after the 354 in the trace)", []
    syncs = [n for n, line in enumerate(lines) if _SYNC.search(line) and "resumed>" not in line]
    before = [n for n in syncs if start < n < end]
    evidence = [_short(lines[n]) for n in sorted(set(syncs) | {start, end})]
    if before:
        verdict = f"fsync before 250 (observed: {len(before)} sync call(s) between the 354 and the 250)"
    elif syncs:
        verdict = f"no fsync before 250 (observed: {len(syncs)} sync call(s), all after the 250)"
    else:
        verdict = "no fsync at all (observed: no sync call while receiving and relaying the message)"
    return verdict, evidence


def _short(line: str, width: int = 160) -> str:
    return line if len(line) <= width else line[:width - 3] + "..."


# --- the table ----------------------------------------------------------------------------------

def format_table(results: Sequence[RunResult], durability: dict[str, str]) -> str:
    """Per load and relay: its medians, mailrelay's, the ratio mailrelay/relay, its durability."""
    loads = list(dict.fromkeys(r.load for r in results if r.relay != "ceiling"))
    relays = [p for p in PEERS if any(r.relay == p for r in results)]
    header = ("load", "relay", "acc", "e2e", "mailrelay acc", "mailrelay e2e", "ratio acc",
              "ratio e2e", "runs", "durability")
    rows = [header]
    for load in loads:
        mine = [r for r in results if r.load == load and r.relay == "mailrelay"]
        m_acc, ma_ok = median_rate(mine, "accept_rate")
        m_e2e, me_ok = median_rate(mine, "e2e_rate")
        for relay in relays:
            theirs = [r for r in results if r.load == load and r.relay == relay]
            t_acc, ta_ok = median_rate(theirs, "accept_rate")
            t_e2e, te_ok = median_rate(theirs, "e2e_rate")
            runs = f"{sum(r.status == 'ok' for r in theirs)}/{sum(r.status == 'ok' for r in mine)}"
            rows.append((load, relay, _cell(t_acc, ta_ok), _cell(t_e2e, te_ok), _cell(m_acc, ma_ok),
                         _cell(m_e2e, me_ok), _ratio(m_acc, t_acc, ma_ok and ta_ok),
                         _ratio(m_e2e, t_e2e, me_ok and te_ok), runs,
                         durability.get(relay, "-")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = ([row[0].ljust(widths[0]), row[1].ljust(widths[1])]
                 + [c.rjust(w) for c, w in zip(row[2:-1], widths[2:-1])] + [row[-1]])
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths[:-1]) + "  " + "-" * len(header[-1]))
    return "\n".join(lines)


# --- command line (for peers.sh) ----------------------------------------------------------------

def _durability(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, _, text = item.partition("=")
        out[name] = text
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="peers.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exim = sub.add_parser("exim-conf", help="print an Exim configuration")
    exim.add_argument("--dir", required=True, help="Exim's directory: spool/, log/ and its pid file")
    exim.add_argument("--exim", required=True, help="the exim binary (Exim re-executes itself)")
    exim.add_argument("--user", default="Debian-exim")
    osmtpd = sub.add_parser("opensmtpd-conf", help="print an OpenSMTPD configuration")
    for p in (exim, osmtpd):
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--sink-port", type=int, required=True)
    summary = sub.add_parser("strace-summary", help="durability verdict from an strace file")
    summary.add_argument("file")
    table = sub.add_parser("table", help="mailrelay against each relay, from a results file")
    table.add_argument("results")
    table.add_argument("--durability", action="append", default=[], metavar="NAME=TEXT")
    args = parser.parse_args(argv)

    if args.command == "exim-conf":
        print(exim_conf(args.port, args.sink_port, Path(args.dir), args.exim, args.user), end="")
    elif args.command == "opensmtpd-conf":
        print(opensmtpd_conf(args.port, args.sink_port), end="")
    elif args.command == "strace-summary":
        verdict, evidence = strace_summary(Path(args.file).read_text(errors="replace"))
        print(verdict)
        for line in evidence:
            print(f"    {line}")
    else:
        print(format_table(load_results(Path(args.results)), _durability(args.durability)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
