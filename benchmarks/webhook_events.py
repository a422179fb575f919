"""What a delivery event costs per recipient outcome (mailrelay.events).

    .venv/bin/python benchmarks/webhook_events.py [--events 20000] [--burst 100]

Three numbers, on a real outbox in BENCH_TMPDIR (default /var/tmp: a real disk, so fsync costs what it
costs in production):
- `emit` on the reactor thread: building the JSON document and queueing it for the outbox thread —
  the time the delivery path itself spends per outcome (no webhook configured: the early return);
- durable: `burst` outcomes emitted at once (as one batch of deliveries settles), waited for until
  fsync'd, repeated; wall time per event and fsyncs per event (group commit);
- nothing is sent (the URL is not reachable): the receiver side plays no part in these numbers.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import defer, task  # noqa: E402

from mailrelay.config import WebhookConfig  # noqa: E402
from mailrelay.events import store  # noqa: E402
from mailrelay.events.service import DeliveryEvents  # noqa: E402
from mailrelay.interfaces import Reply  # noqa: E402


class NoPost:
    def post(self, url, body, headers):
        return defer.Deferred()        # never answers: the receiver is down

    def close(self):
        pass


@defer.inlineCallbacks
def measure(reactor, events: int, burst: int):
    directory = Path(tempfile.mkdtemp(dir=os.environ.get("BENCH_TMPDIR", "/var/tmp")))
    fsyncs = [0]
    real = os.fsync

    def counted(fd):
        fsyncs[0] += 1
        real(fd)
    store.os.fsync = counted
    hook = WebhookConfig("https://127.0.0.1:9/hook", max_pending=events * 2, concurrency=1)
    service = DeliveryEvents(directory, (hook,), reactor, drop_after=86400.0, poster=lambda c: NoPost())
    service.startService()
    none = DeliveryEvents(directory / "none", (), reactor, drop_after=86400.0)
    reply = Reply(250, "2.0.0", "OK queued as 4F2A1B")

    def emit(target, i):
        return target.emit("delivered", "0QX7Z8AB", "app@example.org", f"user{i}@example.net", reply, 1,
                           "mx.example.net", "direct")

    start = time.perf_counter()
    for i in range(events):
        emit(none, i)
    baseline = (time.perf_counter() - start) / events

    cpu, waited, done = 0.0, 0.0, 0
    fsyncs[0] = 0
    while done < events:
        t0 = time.perf_counter()
        ds = [emit(service, done + i) for i in range(burst)]
        t1 = time.perf_counter()
        yield defer.DeferredList(ds)
        cpu += t1 - t0
        waited += time.perf_counter() - t0
        done += burst
    yield service.stopService()
    print(f"events: {done} in bursts of {burst}, outbox on {directory}")
    print(f"emit, no webhook configured:         {baseline * 1e6:8.2f} µs per outcome")
    print(f"emit, one webhook (reactor thread):  {cpu / done * 1e6:8.2f} µs per outcome")
    print(f"durable (emit to fsync'd), per event:{waited / done * 1e6:8.2f} µs wall, "
          f"{fsyncs[0] / done:.3f} fsyncs per event ({fsyncs[0]} in all)")
    print(f"outbox size: {sum(p.stat().st_size for p in directory.rglob('*.events')) / done:.0f} bytes per event")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f}")
    shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--burst", type=int, default=100)
    args = parser.parse_args()
    task.react(measure, (args.events, args.burst))


if __name__ == "__main__":
    main()
