"""The queue at depth: mailrelay and a private Postfix side by side, each with the same dead next hop.

    smtp-source ──SMTP──▶ relay ──SMTP──▶ 127.0.0.1:P   (smtp-sink, stopped while the queue fills)

For each relay, in one run on this machine (needs root: Postfix's master starts as root; Debian's
postfix is installed with "No configuration" if missing, as relay_vs_postfix.sh does):

1. fresh: 5,000 messages end to end with the sink up (the relay's own fresh rate), then the sink stops;
2. fill: `--messages` (30,000) messages in chunks of 5,000 (smtp-source -s 20 -l 2048), each chunk
   timed: the accept rate of the last chunk against the first;
3. at depth: memory (PSS) of every process of the relay (mailrelay: twistd and its delivery child; Postfix:
   master and all its children) against the same with an empty queue, per queued message; CPU while
   idle for 10 s; `mailrelay queue list` against `postqueue -p`;
4. restart: stop, start, seconds until the first 220 and until the relay is idle again (CPU under 5%
   of a core over a second);
5. drain: the sink comes back, the queue is flushed (`mailrelay queue flush`, `postqueue -f`): seconds
   until the first message arrives, the drain rate, and the longest wait for a 220 seen by a probe
   connecting every 0.2 s throughout.

Prints one table, figures for both relays and the ratio (mailrelay / Postfix, or the reverse where less
is better, marked). Nothing here asserts anything: it measures. Options: --messages N, --only
mailrelay|postfix, --keep (the work directory). Environment: MAILRELAY_VENV (the virtualenv with
bin/twistd), BENCH_TMPDIR (default /var/tmp: a real disk, so that fsyncs cost what they cost).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import free_port, mailrelay_conf, pid_alive, sink_count, wait_for_port  # noqa: E402
from memory import find_venv  # noqa: E402

REPO = HERE.parent
SOURCE, SINK = "/usr/sbin/smtp-source", "/usr/sbin/smtp-sink"
CHUNK = 5000
SESSIONS = 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- /proc: a relay is a tree of processes --------------------------------------------------------

def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def rss_kib(pids: list[int]) -> int:
    """Memory of the processes together: the sum of their PSS (a shared page counted once in all, split
    between its sharers; RSS would count Postfix's shared libraries once per process)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except (OSError, IndexError, ValueError):
            pass
    return total


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])      # utime, stime
        except (OSError, IndexError):
            pass
    return total / CLK_TCK


def cpu_share(root: Callable[[], int], seconds: float) -> float:
    """Share of one core the relay's processes used over `seconds`."""
    before = cpu_seconds(descendants(root()))
    time.sleep(seconds)
    return (cpu_seconds(descendants(root())) - before) / seconds


def wait_idle(root: Callable[[], int], timeout: float, threshold: float = 0.05) -> Optional[float]:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cpu_share(root, 1.0) < threshold:
            return time.monotonic() - start
    return None


def banner_seconds(port: int, timeout: float = 30.0) -> Optional[float]:
    """Connect and read the 220: seconds, or None on failure."""
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            if not s.recv(512).startswith(b"220"):
                return None
            s.sendall(b"QUIT\r\n")
    except OSError:
        return None
    return time.monotonic() - start


def first_banner(port: int, timeout: float) -> Optional[float]:
    """Seconds from now until the port answers 220 (polling every 20 ms)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if banner_seconds(port, timeout=2.0) is not None:
            return time.monotonic() - start
        time.sleep(0.02)
    return None


class Probe(threading.Thread):
    """A new connection every 0.2 s; the longest wait for its 220."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.worst, self.failed = port, 0.0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            waited = banner_seconds(self.port)
            if waited is None:
                self.failed += 1
            else:
                self.worst = max(self.worst, waited)
            self._halt.wait(0.2)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


# --- the sink and the load --------------------------------------------------------------------------

class SmtpSink:
    def __init__(self, work: Path, port: int):
        self.counter = work / f"sink-{port}-{time.monotonic_ns()}.counter"
        self.process = subprocess.Popen([SINK, "-c", "-u", "nobody", f"127.0.0.1:{port}", "1024"],
                                        stdout=open(self.counter, "wb"), stderr=subprocess.DEVNULL)
        if not wait_for_port("127.0.0.1", port, 10, lambda: self.process.poll() is None):
            raise RuntimeError("smtp-sink did not start")

    def count(self) -> int:
        return sink_count(self.counter)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def source(port: int, messages: int) -> float:
    """smtp-source: `messages` of 2 KiB over SESSIONS sessions; seconds until every one had its 250."""
    start = time.monotonic()
    subprocess.run([SOURCE, "-4", "-s", str(SESSIONS), "-m", str(messages), "-l", "2048",
                    "-f", "bench@example.org", "-t", "sink@example.net", f"127.0.0.1:{port}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
    return time.monotonic() - start


def wait_count(sink: SmtpSink, target: int, timeout: float, first: Optional[list] = None) -> Optional[float]:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        n = sink.count()
        if first is not None and not first and n > 0:
            first.append(time.monotonic() - start)
        if n >= target:
            return time.monotonic() - start
        time.sleep(0.01)
    return None


# --- the two relays -------------------------------------------------------------------------------

class Mailrelay:
    name = "mailrelay"

    def __init__(self, work: Path, hop_port: int):
        self.venv = find_venv()
        if self.venv is None:
            raise RuntimeError("no virtualenv with bin/twistd (set MAILRELAY_VENV)")
        self.dir = work / "mailrelay"
        self.dir.mkdir()
        self.port = free_port()
        self.config = self.dir / "tap.conf"
        self.config.write_text(mailrelay_conf(self.port, hop_port, self.dir / "spool"))
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.dir / "twistd.log", "ab") as log:
            self.process = subprocess.Popen([str(self.venv / "bin" / "twistd"), "-n", "--pidfile=", "mailrelay",
                                             "--config", str(self.config)], cwd=REPO, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)

    def root(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def cli(self, *argv: str) -> float:
        start = time.monotonic()
        subprocess.run([str(self.venv / "bin" / "mailrelay"), "queue", *argv, "--config", str(self.config)],
                       check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)))
        return time.monotonic() - start

    def list_queue(self) -> float:
        return self.cli("list")

    def flush(self) -> None:
        self.cli("flush")


class Postfix:
    name = "postfix"

    def __init__(self, work: Path, hop_port: int):
        self.dir = work / "postfix"
        for sub in ("etc", "queue", "data"):
            (self.dir / sub).mkdir(parents=True)
        shutil.chown(self.dir / "data", "postfix")
        self.port = free_port()
        d = self.dir
        (d / "etc" / "main.cf").write_text(f"""# Written by deep_queue.py: a loopback-only relay to one next hop.
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-bench.localhost
mydomain = localhost
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 local delivery is disabled
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{hop_port}
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
""")
        (d / "etc" / "master.cf").write_text(f"""127.0.0.1:{self.port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
showq     unix  n - n - - showq
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
pickup    unix  n - n 60 1 pickup
""")

    def _postfix(self, *argv: str) -> None:
        subprocess.run(["script", "-qec", " ".join(["postfix", "-c", str(self.dir / "etc"), *argv]), "/dev/null"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        self._postfix("start")

    def root(self) -> int:
        for _ in range(100):
            try:
                return int((self.dir / "queue" / "pid" / "master.pid").read_text().strip())
            except (OSError, ValueError):
                time.sleep(0.05)
        raise RuntimeError("no Postfix master pid")

    def stop(self) -> None:
        try:
            pid = int((self.dir / "queue" / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return
        if not pid_alive(pid):
            return
        self._postfix("stop")
        for _ in range(200):
            if not pid_alive(pid):
                return
            time.sleep(0.05)
        self._postfix("abort")

    def list_queue(self) -> float:
        start = time.monotonic()
        subprocess.run(["postqueue", "-c", str(self.dir / "etc"), "-p"], check=True, stdout=subprocess.DEVNULL)
        return time.monotonic() - start

    def flush(self) -> None:
        subprocess.run(["postqueue", "-c", str(self.dir / "etc"), "-f"], check=True)


# --- one relay's run --------------------------------------------------------------------------------

@dataclass
class Figures:
    fresh_rate: float = 0.0
    chunk_rates: list[float] = field(default_factory=list)
    rss_empty_kib: int = 0
    rss_deep_kib: int = 0
    idle_cpu: float = 0.0
    list_seconds: float = 0.0
    restart_220: Optional[float] = None
    restart_idle: Optional[float] = None
    first_out: Optional[float] = None
    drain_rate: Optional[float] = None
    drain_worst_220: float = 0.0
    probe_failures: int = 0


def run_relay(relay, work: Path, hop_port: int, depth: int, say: Callable[[str], None]) -> Figures:
    f = Figures()
    relay.start()
    if first_banner(relay.port, 60) is None:
        raise RuntimeError(f"{relay.name} did not answer 220")
    sink = SmtpSink(work, hop_port)
    source(relay.port, 100)                                    # warm-up, uncounted
    wait_count(sink, 100, 120)
    start = time.monotonic()
    source(relay.port, CHUNK)
    if wait_count(sink, 100 + CHUNK, 600) is not None:
        f.fresh_rate = CHUNK / (time.monotonic() - start)
    say(f"  {relay.name}: fresh end to end {f.fresh_rate:.0f} msg/s")
    sink.stop()
    time.sleep(2)
    f.rss_empty_kib = rss_kib(descendants(relay.root()))
    for done in range(0, depth, CHUNK):
        seconds = source(relay.port, min(CHUNK, depth - done))
        f.chunk_rates.append(min(CHUNK, depth - done) / seconds)
        say(f"  {relay.name}: {done + CHUNK} queued, last chunk {f.chunk_rates[-1]:.0f} msg/s")
    wait_idle(relay.root, 300)
    f.rss_deep_kib = rss_kib(descendants(relay.root()))
    f.idle_cpu = cpu_share(relay.root, 10.0)
    f.list_seconds = relay.list_queue()
    say(f"  {relay.name}: at depth rss {f.rss_deep_kib / 1024:.0f} MiB, idle cpu {100 * f.idle_cpu:.1f}%, "
        f"queue list {f.list_seconds:.2f} s")
    relay.stop()
    relay.start()
    start = time.monotonic()
    f.restart_220 = first_banner(relay.port, 120)
    idle = wait_idle(relay.root, 300)
    f.restart_idle = None if idle is None else time.monotonic() - start
    say(f"  {relay.name}: restart 220 after {f.restart_220} s, idle after {f.restart_idle} s")
    sink = SmtpSink(work, hop_port)
    probe = Probe(relay.port)
    probe.start()
    first: list[float] = []
    start = time.monotonic()
    relay.flush()
    drained = wait_count(sink, depth, 1800, first)
    probe.stop()
    f.first_out = first[0] if first else None
    f.drain_rate = depth / drained if drained else None
    f.drain_worst_220, f.probe_failures = probe.worst, probe.failed
    say(f"  {relay.name}: first out {f.first_out} s, drain {f.drain_rate} msg/s, worst 220 {probe.worst:.2f} s")
    sink.stop()
    relay.stop()
    return f


def table(results: dict[str, Figures], depth: int) -> str:
    rows = []

    def row(label: str, get: Callable[[Figures], Optional[float]], fmt: str, less_is_better: bool = False):
        values = {name: get(fig) for name, fig in results.items()}
        cells = [("-" if values.get(n) is None else format(values[n], fmt)) for n in ("mailrelay", "postfix")]
        mine, theirs = values.get("mailrelay"), values.get("postfix")
        ratio = "-"
        if mine and theirs:
            value = theirs / mine if less_is_better else mine / theirs
            ratio = f"{value:.2f}x" + (" (inv)" if less_is_better else "")
        rows.append(f"| {label} | {cells[0]} | {cells[1]} | {ratio} |")

    row("fresh end-to-end rate (msg/s)", lambda f: f.fresh_rate, ".0f")
    row("accept rate, first 5,000 (msg/s)", lambda f: f.chunk_rates[0], ".0f")
    row(f"accept rate, last 5,000 of {depth:,} (msg/s)", lambda f: f.chunk_rates[-1], ".0f")
    row("last / first accept rate", lambda f: f.chunk_rates[-1] / f.chunk_rates[0], ".2f")
    row("memory (PSS), all processes, empty queue (MiB)", lambda f: f.rss_empty_kib / 1024, ".1f", True)
    row(f"memory (PSS), all processes, {depth:,} queued (MiB)", lambda f: f.rss_deep_kib / 1024, ".1f", True)
    row("memory per queued message (KiB)", lambda f: max(0, f.rss_deep_kib - f.rss_empty_kib) / depth, ".2f", True)
    row("CPU while idle at depth (% of a core)", lambda f: 100 * f.idle_cpu, ".2f", True)
    row("queue list (s)", lambda f: f.list_seconds, ".2f", True)
    row("restart: first 220 (s)", lambda f: f.restart_220, ".2f", True)
    row("restart: idle again (s)", lambda f: f.restart_idle, ".1f", True)
    row("flush: first message out (s)", lambda f: f.first_out, ".2f", True)
    row("drain rate (msg/s)", lambda f: f.drain_rate, ".0f")
    row("drain / fresh rate", lambda f: f.drain_rate / f.fresh_rate if f.drain_rate and f.fresh_rate else None,
        ".2f")
    row("longest wait for a 220 during the drain (s)", lambda f: f.drain_worst_220, ".2f", True)
    head = ("| at depth | mailrelay | Postfix | ratio (mailrelay / Postfix; (inv): Postfix / mailrelay, "
            "less is better) |\n| --- | --- | --- | --- |")
    return head + "\n" + "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--only", choices=("mailrelay", "postfix"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    if not (Path(SOURCE).exists() and Path(SINK).exists()):
        subprocess.run(["bash", "-c", "echo 'postfix postfix/main_mailer_type select No configuration' | "
                        "debconf-set-selections && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix"],
                       check=True, stdout=subprocess.DEVNULL)
    work = Path(tempfile.mkdtemp(prefix="deep-queue-", dir=os.environ.get("BENCH_TMPDIR", "/var/tmp")))
    work.chmod(0o755)
    say = lambda text: print(text, flush=True)   # noqa: E731
    say(f"deep_queue: {os.cpu_count()} CPUs, {args.messages:,} messages, work directory {work}")
    results: dict[str, Figures] = {}
    try:
        for kind in (Postfix, Mailrelay):
            if args.only and kind.name != args.only:
                continue
            hop_port = free_port()
            relay = kind(work, hop_port)
            try:
                results[kind.name] = run_relay(relay, work, hop_port, args.messages, say)
            finally:
                relay.stop()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results, args.messages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
