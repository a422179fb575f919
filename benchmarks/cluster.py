"""Several relays on one machine: mailrelay nodes behind HAProxy sharing one Redis, against one node.

    smtp-source ──▶ HAProxy (PROXY v2) ──▶ N × mailrelay (twistd, default config) ──▶ sink
                                              └──── one redis-server (shared limits) ────┘

Measures, in one run:
  1. one node alone, smtp-source straight at it, without and with `[cluster] redis`: messages/s end to end;
  2. N nodes (`--nodes`, default 3) behind HAProxy: the same load, messages/s end to end, and every
     message's Message-Id counted at the sink — delivered exactly once (none missing, none twice);
  3. the shared limit: the nodes reloaded (SIGHUP) with `[limits] messages_per_minute = L` for the one
     identity the load relays as, then `--burst` messages offered at once through HAProxy: how many the
     cluster accepted (one budget of L for all nodes, plus what refilled during the burst) against the
     N × L that unshared counters would let through.
The sink is a Python thread per session that reads every Message-Id (to count duplicates): on a two-core
machine it, not the relays, sets the ceiling of every rate here — compare the rows with each other, and
take absolute throughput from relay_vs_postfix.sh. Needs root-free tools only: Debian's haproxy, redis-
server and Postfix's smtp-source (installed as relay_vs_postfix.sh does when missing, which needs root).
Loopback only. Asserts nothing; prints a table. Options: --nodes N, --messages M, --sessions S, --limit
L, --burst B.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import free_port, mailrelay_conf, wait_for_port  # noqa: E402
from memory import find_venv, raise_fd_limit  # noqa: E402

REPO = HERE.parent
SOURCE = "/usr/sbin/smtp-source"
_MESSAGE_ID = re.compile(rb"^message-id:\s*(\S+)", re.I | re.M)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(b"220 sink.localhost ESMTP\r\n")
        while True:
            line = self.rfile.readline(4096)
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.wfile.write(b"250-sink.localhost\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go on\r\n")
                head, in_head = [], True
                while True:
                    chunk = self.rfile.readline(65536)
                    if not chunk:
                        return
                    if chunk == b".\r\n":
                        break
                    if in_head:
                        if chunk in (b"\r\n", b"\n"):
                            in_head = False
                        else:
                            head.append(chunk)
                self.server.received(b"".join(head))
                self.wfile.write(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 2.0.0 bye\r\n")
                return
            else:
                self.wfile.write(b"250 2.0.0 ok\r\n")


class CountingSink(socketserver.ThreadingTCPServer):
    """Counts every Message-Id it is given (the header block of each message)."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.port = self.server_address[1]
        self.ids: dict[bytes, int] = {}
        self.total = 0
        self._lock = threading.Lock()

    def received(self, head: bytes) -> None:
        match = _MESSAGE_ID.search(head)
        with self._lock:
            self.total += 1
            if match:
                self.ids[match.group(1)] = self.ids.get(match.group(1), 0) + 1

    def start(self) -> "CountingSink":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def wait_for(self, total: int, timeout: float) -> Optional[float]:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.total >= total:
                return time.monotonic() - start
            time.sleep(0.01)
        return None


def node_conf(port: int, sink_port: int, spool: Path, redis_port: Optional[int], proxy: bool,
              limit: int) -> str:
    """The benchmark's tap.conf (harness.mailrelay_conf) behind HAProxy, with the shared Redis and a
    permit rule of its own for the burst's client."""
    return mailrelay_conf(
        port, sink_port, spool,
        listener='proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\n' if proxy else "",
        limits=f"messages_per_minute = {limit}\n",
        permits='[[permit]]                 # the burst\'s client: an identity of its own ("permit[0]")\n'
                'networks = ["127.0.0.5/32"]\n\n',
        tables=f'\n[cluster]\nredis = "redis://127.0.0.1:{redis_port}/0"\n' if redis_port else "")


class Node:
    def __init__(self, venv: Path, work: Path, index: int, sink_port: int, redis_port: Optional[int],
                 proxy: bool, limit: int):
        self.dir = work / f"node{index}"
        self.dir.mkdir()
        self.port = free_port()
        self.config = self.dir / "tap.conf"
        self.redis_port, self.proxy, self.sink_port = redis_port, proxy, sink_port
        self.write(limit)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.dir / "twistd.log", "ab") as log:
            self.process = subprocess.Popen([str(venv / "bin" / "twistd"), "-n", "--pidfile=", "mailrelay",
                                             "--config", str(self.config)], cwd=REPO, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)

    def write(self, limit: int) -> None:
        self.config.write_text(node_conf(self.port, self.sink_port, self.dir / "spool", self.redis_port,
                                         self.proxy, limit))

    def reload(self, limit: int) -> None:
        self.write(limit)
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return s.recv(64).startswith(b"220")
    except OSError:
        return False


def smtp_source(port: int, messages: int, sessions: int) -> tuple[float, str]:
    start = time.monotonic()
    done = subprocess.run([SOURCE, "-4", "-s", str(sessions), "-m", str(messages), "-l", "2048",
                           "-f", "bench@example.org", "-t", "sink@example.net", f"127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=1800)
    return time.monotonic() - start, done.stderr


def offer(port: int, count: int, workers: int = 20) -> tuple[int, int]:
    """`count` messages through `port` from `workers` clients at once, from 127.0.0.5 (the PROXY header
    carries it to the nodes: an identity the throughput runs never spent): (accepted, refused)."""
    accepted = refused = 0
    lock = threading.Lock()
    todo = list(range(count))

    def work() -> None:
        nonlocal accepted, refused
        while True:
            with lock:
                if not todo:
                    return
                n = todo.pop()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=30,
                                              source_address=("127.0.0.5", 0)) as s:
                    f = s.makefile("rb")
                    f.readline()
                    replies = []
                    s.sendall(b"EHLO bench.example.org\r\n")
                    while True:
                        line = f.readline()
                        if line[3:4] != b"-":
                            break
                    for command in (b"MAIL FROM:<bench@example.org>\r\n", b"RCPT TO:<sink@example.net>\r\n"):
                        s.sendall(command)
                        replies.append(f.readline())
                    ok = all(r.startswith(b"250") for r in replies)
                    if ok:
                        s.sendall(b"DATA\r\n")
                        f.readline()
                        s.sendall(b"Message-Id: <burst-%d@bench>\r\nSubject: burst\r\n\r\nx\r\n.\r\n" % n)
                        ok = f.readline().startswith(b"250")
                    s.sendall(b"QUIT\r\n")
            except OSError:
                ok = False
            with lock:
                if ok:
                    accepted += 1
                else:
                    refused += 1
    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return accepted, refused


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--limit", type=int, default=120)
    parser.add_argument("--burst", type=int, default=600)
    args = parser.parse_args(argv)
    venv = find_venv()
    for tool in ("haproxy", "redis-server"):
        if shutil.which(tool) is None:
            print(f"cluster.py: {tool} is not installed (apt-get install -y {tool})", file=sys.stderr)
            return 2
    if venv is None or not Path(SOURCE).exists():
        print("cluster.py: needs MAILRELAY_VENV (bin/twistd) and Postfix's smtp-source", file=sys.stderr)
        return 2
    raise_fd_limit(8192)
    work = Path(tempfile.mkdtemp(prefix="cluster-", dir=os.environ.get("BENCH_TMPDIR", "/var/tmp")))
    sink = CountingSink().start()
    procs: list = []
    nodes: list[Node] = []
    high = 10 ** 7                     # messages_per_minute that never decides the throughput runs
    try:
        redis_port = free_port()
        procs.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", str(work)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_port("127.0.0.1", redis_port, 10)
        # 1. one node alone, without and with the shared Redis
        rates = []
        for index, redis in ((0, None), (9, redis_port)):
            single = Node(venv, work, index, sink.port, redis, False, high)
            nodes.append(single)
            wait_for_port("127.0.0.1", single.port, 60)
            before = sink.total
            smtp_source(single.port, 100, args.sessions)            # warm-up
            sink.wait_for(before + 100, 120)
            before = sink.total
            start = time.monotonic()
            smtp_source(single.port, args.messages, args.sessions)
            sink.wait_for(before + args.messages, 600)
            rates.append(args.messages / (time.monotonic() - start))
            single.stop()
        alone_rate, one_rate = rates
        print(f"one node: {alone_rate:.0f} msg/s end to end without Redis, {one_rate:.0f} with", flush=True)
        # 2. N nodes behind HAProxy
        cluster = [Node(venv, work, i + 1, sink.port, redis_port, True, high) for i in range(args.nodes)]
        nodes.extend(cluster)
        front = free_port()
        cfg = work / "haproxy.cfg"
        cfg.write_text("global\n    maxconn 4000\n\ndefaults\n    mode tcp\n    timeout connect 5s\n"
                       "    timeout client 60s\n    timeout server 60s\n\nfrontend smtp\n"
                       f"    bind 127.0.0.1:{front}\n    default_backend nodes\n\nbackend nodes\n"
                       "    balance roundrobin\n"
                       + "".join(f"    server n{i} 127.0.0.1:{n.port} send-proxy-v2\n" for i, n in enumerate(cluster)))
        procs.append(subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        for n in cluster:
            wait_for_port("127.0.0.1", n.port, 60)
        if not wait_for_port("127.0.0.1", front, 20, lambda: procs[-1].poll() is None):
            print("cluster.py: haproxy did not start", file=sys.stderr)
            return 1
        before = sink.total
        smtp_source(front, 100, args.sessions)                  # warm-up
        sink.wait_for(before + 100, 120)
        sink.ids.clear()
        before = sink.total
        start = time.monotonic()
        _, err = smtp_source(front, args.messages, args.sessions)
        waited = sink.wait_for(before + args.messages, 600)
        n_rate = args.messages / (time.monotonic() - start) if waited is not None else 0.0
        time.sleep(3)                                  # anything delivered twice would arrive by now
        counts = list(sink.ids.values())
        twice = sum(1 for c in counts if c > 1)
        print(f"{args.nodes} nodes behind HAProxy: {n_rate:.0f} msg/s end to end; {len(counts)} distinct "
              f"Message-Ids of {args.messages}, {twice} delivered more than once", flush=True)
        # 3. one shared limit
        for n in cluster:
            n.reload(args.limit)
        time.sleep(3)
        accepted, refused = offer(front, args.burst)
        print(f"shared limit {args.limit}/min: {accepted} of {args.burst} accepted at once across "
              f"{args.nodes} nodes ({refused} refused); unshared counters would take up to "
              f"{args.nodes * args.limit}", flush=True)
        print()
        print("| cluster on one machine | figure |\n| --- | --- |")
        print(f"| one node without [cluster], end to end (msg/s) | {alone_rate:.0f} |")
        print(f"| one node with [cluster] redis, end to end (msg/s) | {one_rate:.0f} |")
        print(f"| {args.nodes} nodes behind HAProxy, end to end (msg/s) | {n_rate:.0f} |")
        print(f"| messages delivered / sent | {len(counts)} / {args.messages} |")
        print(f"| messages delivered more than once | {twice} |")
        print(f"| burst of {args.burst} against a shared {args.limit}/min | {accepted} accepted "
              f"(unshared: up to {args.nodes * args.limit}) |")
    finally:
        for n in nodes:
            n.stop()
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        sink.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
