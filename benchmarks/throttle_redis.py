"""What a `[[throttle]]` shared through `[cluster] redis` costs per throttled delivery (cluster/throttle.py).

For each rule shape — a rate only (one booking: THROTTLE_RESERVE), and a rate with a connection cap (the
booking, then RELEASE at the end of the connection) — a SharedThrottle on a RedisLink to a real
redis-server on loopback runs the scheduler's cycle for one delivery: ready_at (the booking goes out),
the answer (on_ready), start, finish.  Measured:
- `sequential`: one destination, one delivery after the other: the wait a delivery sees (µs);
- `parallel`: 50 destinations at once: deliveries per second, and the relay's CPU time per delivery
  (process time / deliveries: what the delivery process spends on Redis for each);
- the Redis calls per delivery (counted at the link), and a PING one after the other for reference.
The rule's rate is high enough (10^9/min) never to hold a start back: what is timed is the cost.

    .venv/bin/python benchmarks/throttle_redis.py [--deliveries 3000] [--runs 3]

It starts its own redis-server (`--save "" --appendonly no`) on a free loopback port and stops it at the end.
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

PARALLEL = 50


def _measure(port: int, deliveries: int, runs: int) -> dict:
    from twisted.internet import defer, reactor

    from mailrelay.cluster.redis import RedisLink
    from mailrelay.cluster.throttle import SharedThrottle
    from mailrelay.cluster.url import RedisURL
    from mailrelay.config import Throttle

    link = RedisLink(RedisURL.parse(f"redis://127.0.0.1:{port}/0"), reactor, timeout=1.0, prefix="bench:")
    calls = [0]
    evalsha = link.evalsha

    def counted(script, keys, args):
        calls[0] += 1
        return evalsha(script, keys, args)
    link.evalsha = counted
    throttle = SharedThrottle(link)
    rules = {"rate": Throttle(domains=("*",), messages_per_minute=10 ** 9, pause=60.0),
             "rate+connections": Throttle(domains=("*",), messages_per_minute=10 ** 9, connections=1000,
                                          pause=60.0)}
    results: dict = {}
    waiting: dict[str, defer.Deferred] = {}

    def woken():
        for d in list(waiting.values()):
            reactor.callLater(0, d.callback, None) if not d.called else None
        waiting.clear()
    throttle.on_ready = woken

    @defer.inlineCallbacks
    def one(destination: str, rule) -> defer.Deferred:
        while True:
            now = reactor.seconds()
            ready = throttle.ready_at(destination, rule, now)
            if ready is not None and ready <= now:
                break
            view = throttle._views.get(destination)
            if view is None or not view.pending:
                yield deferLater(max(0.0, (ready or now) - now))     # a booked time: the scheduler's wake-up
                continue
            d = waiting.setdefault(destination, defer.Deferred())
            yield d
        throttle.start(destination, rule, reactor.seconds())
        throttle.finish(destination)

    @defer.inlineCallbacks
    def lane(destination: str, rule, count: int):
        for _ in range(count):
            yield one(destination, rule)

    @defer.inlineCallbacks
    def main():
        while not link.up:
            yield deferLater(0.02)
        start = time.perf_counter()
        for _ in range(deliveries):
            yield link.call("PING")
        results["ping_sequential_us"] = round((time.perf_counter() - start) / deliveries * 1e6)
        for name, rule in rules.items():
            seq, par, cpu, per = [], [], [], []
            for run in range(runs):
                calls[0] = 0
                start = time.perf_counter()
                yield lane(f"seq{run}.{name}", rule, deliveries)
                seq.append((time.perf_counter() - start) / deliveries * 1e6)
                per.append(calls[0] / deliveries)
                start, cpu0 = time.perf_counter(), time.process_time()
                each = max(1, deliveries // PARALLEL)
                yield defer.gatherResults([lane(f"par{run}.{i}.{name}", rule, each) for i in range(PARALLEL)])
                total = each * PARALLEL
                par.append(total / (time.perf_counter() - start))
                cpu.append((time.process_time() - cpu0) / total * 1e6)
                yield deferLater(0.2)          # the RELEASE calls still in flight
            results[name] = {"sequential_us": round(statistics.median(seq)),
                             "parallel_per_s": round(statistics.median(par)),
                             "cpu_us_per_delivery": round(statistics.median(cpu)),
                             "redis_calls_per_delivery": round(statistics.median(per), 2)}

    def deferLater(seconds):
        from twisted.internet import task
        return task.deferLater(reactor, seconds, lambda: None)

    def done(result):
        if hasattr(result, "printTraceback"):
            result.printTraceback(file=sys.stderr)
        link.stopService()
        reactor.stop()
        return result
    link.startService()
    reactor.callWhenRunning(lambda: main().addBoth(done))
    reactor.run()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deliveries", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    from tests.support.ports import free_port

    port = free_port()
    directory = tempfile.mkdtemp(prefix="mailrelay-bench-redis-")
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", directory, "--logfile", os.path.join(directory, "log")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        results = _measure(port, args.deliveries, args.runs)
        version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
        print(json.dumps({"redis": version, "deliveries": args.deliveries, "runs": args.runs, **results}, indent=2))
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
