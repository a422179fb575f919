"""Which Redis client for the relay: txredisapi (Twisted-native) against redis-py's asyncio client
running under Twisted's asyncio reactor, measured on this machine.

What is measured, for each client, in a process of its own (a reactor is chosen once per process):
- `sequential`: EVALSHA of the GCRA script (mailrelay.cluster.gcra) one call after another, each
  waiting for the previous reply: the cost one SMTP session sees per MAIL FROM;
- `concurrent`: the same call from 50 callers at once (each starts its next call when its reply came),
  total calls per second: the cost many sessions together see;
- `message`: what one message with one recipient costs its session with `[cluster] redis` and
  `[suppression]` on: the GCRA EVALSHA at MAIL FROM, then the GET of the recipient's suppression key at
  RCPT TO, one after the other; messages per second (1e6 / it: the microseconds a message waits);
- `reactor`: what the reactor itself costs the relay, without Redis: round trips of a 40-byte line over
  a loopback TCP connection between a Twisted client and a Twisted server in one process, under the
  reactor the client needs (epoll, twistd's default, for txredisapi; asyncio for redis-py).
Each figure is the median of `--runs` runs (default 3).

    .venv/bin/python benchmarks/redis_client.py [--calls 5000] [--runs 3]

It starts its own redis-server (`--save "" --appendonly no`) on a free loopback port in a temporary
directory and stops it at the end.  Needs redis-server, txredisapi and redis (redis-py) installed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mailrelay.cluster import gcra  # noqa: E402

CONCURRENCY = 50


def _gcra_args(i: int) -> tuple[list, list]:
    # Many keys, a generous limit: every call is an allowed one that writes (the common, dearer case).
    return [f"bench:gcra:{i % 100}"], ["", 1_000_000, 60, 1_000_000, 1]


def _child(client: str, port: int, calls: int) -> None:
    """Runs in its own process: install the reactor, measure, print one JSON line."""
    if client == "redis-py":
        from twisted.internet import asyncioreactor
        asyncioreactor.install()
    from twisted.internet import defer, protocol, reactor, task
    from twisted.protocols import basic

    results: dict = {"client": client}

    @defer.inlineCallbacks
    def reactor_cost():
        class Echo(basic.LineReceiver):
            def lineReceived(self, line):
                self.sendLine(line)

        class Pinger(basic.LineReceiver):
            def connectionMade(self):
                self.factory.ready.callback(self)

            def lineReceived(self, line):
                d, self.waiting = self.waiting, None
                d.callback(line)

            def ping(self):
                self.waiting = defer.Deferred()
                self.sendLine(b"x" * 40)
                return self.waiting

        server = protocol.ServerFactory.forProtocol(Echo)
        port_ = reactor.listenTCP(0, server, interface="127.0.0.1")
        factory = protocol.ClientFactory.forProtocol(Pinger)
        factory.ready = defer.Deferred()
        reactor.connectTCP("127.0.0.1", port_.getHost().port, factory)
        pinger = yield factory.ready
        started = time.perf_counter()
        for _ in range(calls):
            yield pinger.ping()
        results["reactor"] = calls / (time.perf_counter() - started)
        pinger.transport.loseConnection()
        yield port_.stopListening()

    @defer.inlineCallbacks
    def measure(call, get):
        yield call(0)              # connected, script loaded
        started = time.perf_counter()
        for i in range(calls):
            yield call(i)
        results["sequential"] = calls / (time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(calls):
            yield call(i)
            yield get(f"bench:suppression:user{i % 100}@example.net")
        results["message"] = calls / (time.perf_counter() - started)

        @defer.inlineCallbacks
        def worker(w):
            for i in range(calls // CONCURRENCY):
                yield call(w * 1000 + i)
        started = time.perf_counter()
        yield defer.gatherResults([worker(w) for w in range(CONCURRENCY)])
        results["concurrent"] = (calls // CONCURRENCY) * CONCURRENCY / (time.perf_counter() - started)

    @defer.inlineCallbacks
    def run_txredisapi():
        import txredisapi

        conn = yield txredisapi.Connection("127.0.0.1", port, dbid=0, reconnect=False)
        sha = yield conn.script_load(gcra.GCRA)

        def call(i):
            keys, args = _gcra_args(i)
            return conn.evalsha(sha, keys, args)
        yield measure(call, conn.get)
        yield conn.disconnect()

    @defer.inlineCallbacks
    def run_redis_py():
        import redis.asyncio as aioredis

        conn = aioredis.Redis(host="127.0.0.1", port=port, db=0)
        sha = yield defer.Deferred.fromFuture(asyncio_future(conn.script_load(gcra.GCRA)))

        def call(i):
            keys, args = _gcra_args(i)
            return defer.Deferred.fromFuture(asyncio_future(conn.evalsha(sha, len(keys), *keys, *args)))

        def get(key):
            return defer.Deferred.fromFuture(asyncio_future(conn.get(key)))
        yield measure(call, get)
        yield defer.Deferred.fromFuture(asyncio_future(conn.aclose()))

    def asyncio_future(coroutine):
        import asyncio
        return asyncio.ensure_future(coroutine)

    @defer.inlineCallbacks
    def main(_reactor):
        yield reactor_cost()
        yield (run_txredisapi() if client == "txredisapi" else run_redis_py())
        print(json.dumps(results), flush=True)

    task.react(main)     # exits the process


def _run_child(client: str, port: int, calls: int) -> dict:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", client, "--port", str(port),
                           "--calls", str(calls)], capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{client} run failed: {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", choices=("txredisapi", "redis-py"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.port, args.calls)
        return 0
    from tests.support.redisserver import RedisServer

    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(directory).start()
        try:
            figures: dict = {}
            for client in ("txredisapi", "redis-py"):
                runs = [_run_child(client, server.port, args.calls) for _ in range(args.runs)]
                figures[client] = {k: statistics.median(r[k] for r in runs)
                                   for k in ("sequential", "concurrent", "message", "reactor")}
        finally:
            server.stop()
    print(f"EVALSHA GCRA round trips per second, median of {args.runs} runs of {args.calls} calls "
          f"(redis-server {_redis_version()} on loopback, {os.cpu_count()} CPUs)")
    print(f"{'client':<36} {'sequential':>11} {'50 concurrent':>14} {'message':>8} {'reactor echo':>13}")
    for client, label in (("txredisapi", "txredisapi (epoll reactor)"),
                          ("redis-py", "redis-py asyncio (asyncio reactor)")):
        f = figures[client]
        print(f"{label:<36} {f['sequential']:>11,.0f} {f['concurrent']:>14,.0f} {f['message']:>8,.0f} "
              f"{f['reactor']:>13,.0f}")
    for client in figures:
        f = figures[client]
        print(f"{client}: {1e6 / f['sequential']:.0f} us per sequential call, "
              f"{1e6 / f['concurrent']:.0f} us of relay time per call under concurrency, "
              f"{1e6 / f['message']:.0f} us of Redis waits per message (MAIL + one RCPT)")
    return 0


def _redis_version() -> str:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
        return out.split("v=", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
