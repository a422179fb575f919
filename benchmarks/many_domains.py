# -*- test-case-name: benchmarks.test_many_domains -*-
"""Direct MX delivery to many domains: mailrelay (default config) and a private Postfix side by side.

    injector ──SMTP──▶ relay ──MX lookup──▶ loopback DNS (127.0.0.35:53)
                             ──SMTP──────▶ smtp-sink on 127.0.0.2:25 (every MX host's address)

Two loads, each `--messages` messages of 2 KiB over 20 injecting sessions:
- many: spread round-robin over `--domains` domains (d0.bench.test ...), each with its own MX name
  (mx.dN.bench.test), all of them resolving to 127.0.0.2: per-domain DNS work, and connections that
  only a relay reusing them by address (or a new one per domain) can share;
- one: all to one domain (one.bench.test).
For each relay and load: the end-to-end delivery rate (first message injected to last one at the sink),
the connections the sink saw, the DNS questions the relay asked, and the relay's CPU time per message
(its whole process tree, reaped children included: on a shared machine far steadier than the rate);
medians of `--runs` runs and the ratios mailrelay / Postfix.  Before the runs each relay sends one
message to every domain (uncounted), so both start warm: mailrelay's DNS cache holds the answers (TTL
300 s), Postfix has no cache of its own and asks for every delivery, as it does in production without a
local caching resolver.

Nothing leaves this machine: the script runs itself in a private mount namespace (`unshare -m`) whose
/etc/resolv.conf (a bind mount) names only the loopback DNS server, so Postfix and anything else
resolving a name ask it alone; mailrelay is pointed at it with `[delivery]
nameservers`.  Postfix delivers MX on port 25 only, hence the sink on 127.0.0.2:25 (mailrelay's
`mx_port` default is 25 too).  Needs root (the namespace, port 25 and 53, Postfix's master), Debian's
postfix (installed with "No configuration" if missing, as relay_vs_postfix.sh does) and a virtualenv
with mailrelay (MAILRELAY_VENV, ./.venv, ...: memory.find_venv).  Reuses deep_queue.py's relays and
harness.py's helpers.  Nothing here asserts anything: it measures.

    .venv/bin/python benchmarks/many_domains.py                          # 5,000 x 500 domains, 3 runs
    .venv/bin/python benchmarks/many_domains.py --messages 1000 --domains 100 --runs 1    # a quick look

Options: --messages N, --domains N, --runs N, --only mailrelay|postfix, --timeout S (per run), --keep.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from deep_queue import CLK_TCK, SINK, SOURCE, Mailrelay, Postfix, descendants  # noqa: E402
from harness import wait_for_port  # noqa: E402

DNS_ADDRESS = "127.0.0.35"     # the only nameserver anything in the namespace knows
MX_ADDRESS = "127.0.0.2"       # every MX host's A record; the sink listens here on port 25
MX_PORT = 25
SESSIONS = 20
ZONE = "bench.test"            # RFC 6761 .test: never a real domain
NAMESPACE_FLAG = "MANY_DOMAINS_IN_NAMESPACE"
_COUNTER = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


# --- the loopback DNS server (a child process: tests/support/dnsserver.py on port 53) ----------------

def zone(domains: int) -> dict:
    records = {(ZONE, "SOA"): [f"ns.{ZONE}. admin.{ZONE}. 1 3600 600 86400 300"],
               (f"one.{ZONE}", "MX"): [f"10 mx.one.{ZONE}."], (f"mx.one.{ZONE}", "A"): [MX_ADDRESS]}
    for n in range(domains):
        records[(f"d{n}.{ZONE}", "MX")] = [f"10 mx.d{n}.{ZONE}."]
        records[(f"mx.d{n}.{ZONE}", "A")] = [MX_ADDRESS]
    return records


def serve_dns(domains: int, count_file: Path) -> None:
    """Run the DNS server until killed, writing how many questions it was asked to `count_file`."""
    sys.path.insert(0, str(REPO))
    from twisted.internet import reactor, task
    from tests.support.dnsserver import DNSServer

    server = DNSServer(zone(domains), ttl=300, shuffle=False)
    server.start(reactor, interface=DNS_ADDRESS, port=53)
    asked = [0]

    def write() -> None:
        asked[0] += len(server.queries)
        del server.queries[:]
        count_file.write_text(f"{asked[0]}\n")

    task.LoopingCall(write).start(0.2)
    reactor.run()


class DNS:
    def __init__(self, work: Path, domains: int):
        self.count_file = work / "dns.count"
        self.process = subprocess.Popen([sys.executable, __file__, "--serve-dns", str(domains), str(self.count_file)],
                                        stdout=open(work / "dns.log", "wb"), stderr=subprocess.STDOUT)
        if not wait_for_port(DNS_ADDRESS, 53, 20, lambda: self.process.poll() is None):
            raise RuntimeError(f"the DNS server did not start (see {work / 'dns.log'})")

    def asked(self) -> int:
        time.sleep(0.3)         # one more write of the count
        try:
            return int(self.count_file.read_text())
        except (OSError, ValueError):
            return 0

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


# --- the sink: smtp-sink on 127.0.0.2:25, its counter (sessions, messages) --------------------------

class Sink:
    def __init__(self, work: Path):
        self.counter = work / f"sink-{time.monotonic_ns()}.counter"
        self.process = subprocess.Popen([SINK, "-c", "-u", "nobody", f"{MX_ADDRESS}:{MX_PORT}", "1024"],
                                        stdout=open(self.counter, "wb"), stderr=subprocess.DEVNULL)
        if not wait_for_port(MX_ADDRESS, MX_PORT, 10, lambda: self.process.poll() is None):
            raise RuntimeError(f"smtp-sink did not start on {MX_ADDRESS}:{MX_PORT}")
        self.probe_sessions = 1      # wait_for_port's connection

    def read(self) -> tuple[int, int]:
        """(sessions, messages) so far, from the last complete record (harness.parse_counter's rule)."""
        try:
            data = self.counter.read_bytes()[-256:]
        except OSError:
            return 0, 0
        end = data.rfind(b"\r")
        match = _COUNTER.search(data[data.rfind(b"\r", 0, end) + 1:end]) if end >= 0 else None
        return (int(match.group(1)), int(match.group(3))) if match else (0, 0)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


# --- the injector: pipelined SMTP (RFC 2920), one thread per session ---------------------------------

def _reply(stream) -> int:
    while True:
        line = stream.readline()
        if len(line) < 4:
            raise ConnectionError(f"connection closed or bad reply {line!r}")
        if line[3:4] != b"-":
            return int(line[:3])


def _session(port: int, recipients: list[str], body: bytes, errors: list) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            stream = sock.makefile("rb")
            _reply(stream)
            sock.sendall(b"EHLO injector.bench.test\r\n")
            _reply(stream)
            for rcpt in recipients:
                sock.sendall(b"MAIL FROM:<bench@example.org>\r\nRCPT TO:<%s>\r\nDATA\r\n" % rcpt.encode())
                codes = (_reply(stream), _reply(stream), _reply(stream))
                if codes != (250, 250, 354):
                    raise ConnectionError(f"{rcpt}: {codes}")
                sock.sendall(b"To: <%s>\r\n%s.\r\n" % (rcpt.encode(), body))
                if _reply(stream) != 250:
                    raise ConnectionError(f"{rcpt}: refused after DATA")
            sock.sendall(b"QUIT\r\n")
    except (OSError, ConnectionError) as e:
        errors.append(str(e))


def inject(port: int, recipients: list[str], size: int = 2048) -> None:
    line = b"x" * 76 + b"\r\n"
    body = b"From: <bench@example.org>\r\nSubject: many domains\r\n\r\n" + line * (size // len(line))
    errors: list[str] = []
    threads = [threading.Thread(target=_session, args=(port, recipients[i::SESSIONS], body, errors))
               for i in range(SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"injection failed: {errors[0]} ({len(errors)} sessions)")


def recipients(load: str, messages: int, domains: int) -> list[str]:
    if load == "one":
        return [f"u{n}@one.{ZONE}" for n in range(messages)]
    return [f"u{n}@d{n % domains}.{ZONE}" for n in range(messages)]


# --- the two relays, as deep_queue.py runs them, but delivering by MX --------------------------------

class DirectMailrelay(Mailrelay):
    """mailrelay in its default configuration; only the listener and `nameservers` are set."""

    def __init__(self, work: Path):
        super().__init__(work, 0)
        self.config.write_text(f'''# Written by benchmarks/many_domains.py: direct MX delivery, defaults.
hostname = "mailrelay-bench.localhost"
spool = "{self.dir / "spool"}"

[[listen]]
kind = "relay"
endpoint = "tcp:{self.port}:interface=127.0.0.1"

[[permit]]
networks = ["127.0.0.0/8"]

[delivery]
nameservers = ["{DNS_ADDRESS}:53"]
''')


class DirectPostfix(Postfix):
    """The private Postfix of deep_queue.py without its relayhost: MX lookups through resolv.conf."""

    def __init__(self, work: Path):
        super().__init__(work, 0)
        main = self.dir / "etc" / "main.cf"
        text = re.sub(r"(?m)^relayhost = .*\n", "", main.read_text())
        main.write_text(text.replace("deep_queue.py: a loopback-only relay to one next hop",
                                     "many_domains.py: direct MX delivery"))


# --- runs ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    rate: float
    connections: int
    dns_questions: int
    cpu_ms: float = 0.0          # the relay's CPU time per message (its process tree), in milliseconds


def tree_cpu(root: int) -> float:
    """CPU seconds of `root` and its descendants, the exited children they waited for included (Postfix's
    smtp and cleanup processes come and go): far steadier on a shared machine than a rate."""
    total = 0
    for pid in descendants(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])      # utime, stime, cutime, cstime
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def wait_messages(sink: Sink, target: int, timeout: float) -> Optional[float]:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if sink.read()[1] >= target:
            return time.monotonic()
        time.sleep(0.01)
    return None


def settled_sessions(sink: Sink, quiet: float = 3.0, bound: float = 30.0) -> int:
    """Sessions once no new one has ended for `quiet` s (the relays close idle connections after 2 s)."""
    last, since, start = sink.read()[0], time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() - start < bound:
        time.sleep(0.1)
        now = sink.read()[0]
        if now != last:
            last, since = now, time.monotonic()
    return last


def one_run(relay, dns: DNS, work: Path, rcpts: list[str], timeout: float) -> Run:
    sink = Sink(work)
    try:
        asked = dns.asked()
        cpu = tree_cpu(relay.root())
        start = time.monotonic()
        inject(relay.port, rcpts)
        done = wait_messages(sink, len(rcpts), timeout)
        if done is None:
            raise RuntimeError(f"{relay.name}: only {sink.read()[1]} of {len(rcpts)} messages arrived in {timeout} s")
        used = tree_cpu(relay.root()) - cpu      # before the idle wait: idle connections cost next to nothing
        sessions = settled_sessions(sink) - sink.probe_sessions
        return Run(len(rcpts) / (done - start), sessions, dns.asked() - asked, used * 1000 / len(rcpts))
    finally:
        sink.stop()


def measure(relay, dns: DNS, work: Path, args, say) -> dict[str, list[Run]]:
    results: dict[str, list[Run]] = {"many": [], "one": []}
    relay.start()
    try:
        if not wait_for_port("127.0.0.1", relay.port, 60):
            raise RuntimeError(f"{relay.name} did not start")
        warm = [f"warm@d{n}.{ZONE}" for n in range(args.domains)] + [f"warm@one.{ZONE}"]
        one_run(relay, dns, work, warm, args.timeout)
        for run in range(args.runs):
            for load in ("many", "one"):
                r = one_run(relay, dns, work, recipients(load, args.messages, args.domains), args.timeout)
                results[load].append(r)
                say(f"  {relay.name} run {run + 1} {load}: {r.rate:.0f} msg/s, {r.connections} connections, "
                    f"{r.dns_questions} DNS questions, {r.cpu_ms:.2f} CPU ms/message")
    finally:
        relay.stop()
    return results


def table(results: dict[str, dict[str, list[Run]]], messages: int, domains: int) -> str:
    def median(relay: str, load: str, attribute: str) -> Optional[float]:
        runs = results.get(relay, {}).get(load, [])
        return statistics.median(getattr(r, attribute) for r in runs) if runs else None

    def cell(value: Optional[float], digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    rows = ["| load | figure | mailrelay | Postfix | mailrelay / Postfix |", "| --- | --- | --- | --- | --- |"]
    labels = {"many": f"{messages:,} to {domains:,} domains", "one": f"{messages:,} to one domain"}
    for load in ("many", "one"):
        for attribute, what in (("rate", "delivery rate (msg/s)"), ("connections", "connections to the MX"),
                                ("dns_questions", "DNS questions"), ("cpu_ms", "relay CPU per message (ms)")):
            mine, theirs = median("mailrelay", load, attribute), median("postfix", load, attribute)
            ratio = f"{mine / theirs:.2f}" if mine is not None and theirs else "-"
            digits = 2 if attribute == "cpu_ms" else 0
            rows.append(f"| {labels[load]} | {what} | {cell(mine, digits)} | {cell(theirs, digits)} | {ratio} |")
    for relay in ("mailrelay", "postfix"):
        many, one = median(relay, "many", "rate"), median(relay, "one", "rate")
        if many and one:
            rows.append(f"| {relay}: many domains / one domain | delivery rate | | | {many / one:.2f} |")
        many, one = median(relay, "many", "cpu_ms"), median(relay, "one", "cpu_ms")
        if many and one:
            rows.append(f"| {relay}: many domains / one domain | CPU per message | | | {many / one:.2f} |")
    return "\n".join(rows)


# --- setup: Postfix installed, then the private namespace -------------------------------------------

def install_postfix() -> None:
    """As relay_vs_postfix.sh's install_postfix: Debian's package with "No configuration"; a system
    Postfix the package may have started is stopped."""
    if Path("/usr/sbin/postfix").exists() and Path(SOURCE).exists() and Path(SINK).exists():
        return
    print("installing Debian's postfix (debconf: \"No configuration\")", flush=True)
    subprocess.run(["debconf-set-selections"], input=b"postfix postfix/main_mailer_type select No configuration\n",
                   check=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "postfix"], check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    try:
        pid = int(Path("/var/spool/postfix/pid/master.pid").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return
    subprocess.run(["postfix", "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def private_resolver(work: Path) -> None:
    """Inside the new mount namespace: /etc/resolv.conf names the loopback DNS server only."""
    resolv = work / "resolv.conf"
    resolv.write_text(f"nameserver {DNS_ADDRESS}\noptions attempts:1 timeout:2\n")
    resolv.chmod(0o644)
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)
    if Path("/etc/resolv.conf").read_text() != resolv.read_text():
        raise RuntimeError("the private /etc/resolv.conf is not in place")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-dns"]:
        serve_dns(int(argv[1]), Path(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--domains", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--only", choices=("mailrelay", "postfix"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("many_domains.py: needs root (a mount namespace, ports 25 and 53, Postfix's master)", file=sys.stderr)
        return 2
    if not os.environ.get(NAMESPACE_FLAG):
        install_postfix()
        # Everything from here on runs in a mount namespace of its own (its resolv.conf, below).
        return subprocess.call(["unshare", "--mount", "--propagation", "private", "--", sys.executable,
                                __file__, *argv], env=dict(os.environ, **{NAMESPACE_FLAG: "1"}))
    work = Path(tempfile.mkdtemp(prefix="many-domains-", dir=os.environ.get("BENCH_TMPDIR", "/var/tmp")))
    work.chmod(0o755)
    say = lambda text: print(text, flush=True)   # noqa: E731
    say(f"many_domains: {os.cpu_count()} CPUs, {args.messages:,} messages, {args.domains:,} domains, "
        f"{args.runs} run(s), work directory {work}")
    results: dict[str, dict[str, list[Run]]] = {}
    dns = None
    try:
        private_resolver(work)
        dns = DNS(work, args.domains)
        for kind in (DirectPostfix, DirectMailrelay):
            name = "postfix" if kind is DirectPostfix else "mailrelay"
            if args.only and args.only != name:
                continue
            results[name] = measure(kind(work), dns, work, args, say)
    finally:
        if dns is not None:
            dns.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results, args.messages, args.domains))
    return 0


if __name__ == "__main__":
    sys.exit(main())
