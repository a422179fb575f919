#!/usr/bin/env python3
"""What one log line costs: twistd's own text log (mailrelay's renderer against Twisted's), and the way
of a delivery-process event to the main process's log (`[delivery] process = "separate"`, no
`[log] file`): written in the delivery process as one JSON line (mailrelay.logrelay.PipeObserver),
then read back, published and written by the main process's twistd observer.

    .venv/bin/python benchmarks/log_lines.py [--events 20000] [--batch 100]

Prints microseconds of this process's CPU time per event (process_time: a busy machine's other work
is not counted), the best of 5 runs (the events are a delivery line of the scheduler's
kind with eight fields; writes go to a sink that keeps nothing). Nothing is asserted: a measurement.
"""
from __future__ import annotations

import argparse
import time
import timeit

from twisted.logger import LogPublisher, textFileLogObserver

from mailrelay.logger import Logger, text_observer
from mailrelay.logrelay import PipeObserver, publish_lines


class Sink:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class Collect(Sink):
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)


def emit(log: Logger) -> None:
    log.info("{queue_id}: delivered {recipient} via {hop} ({remote}): {reply}", queue_id="1K19VKAPNF18XVGA",
             stage="delivered", recipient="user@example.com", hop="sink", remote="127.0.0.1",
             reply="250 2.0.0 Ok", delay=0.12, attempts=1)


def per_event(run, count: int) -> float:
    return min(timeit.repeat(run, number=1, repeat=5, timer=time.process_time)) / count * 1e6


def logger_to(observer) -> Logger:
    publisher = LogPublisher()
    publisher.addObserver(observer)
    return Logger(namespace="mailrelay.delivery.scheduler.Scheduler", observer=publisher)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=100, help="lines per read in the main process")
    args = parser.parse_args()
    n = args.events

    ours, twisted = logger_to(text_observer(Sink())), logger_to(textFileLogObserver(Sink()))
    for name, log in (("mailrelay's observer:  ", ours), ("Twisted's observer:    ", twisted)):
        cost = per_event(lambda: [emit(log) for _ in range(n)], n)      # noqa: B023 (run at once)
        print(f"twistd text log, {name}{cost:6.2f} µs/event")

    collected = Collect()
    child = logger_to(PipeObserver(collected))

    def in_child() -> None:
        collected.parts.clear()
        for _ in range(n):
            emit(child)
    print(f"delivery process, event -> JSON line:    {per_event(in_child, n):6.2f} µs/event")

    batch = "".join(collected.parts[:args.batch])
    main_publisher = LogPublisher()
    main_publisher.addObserver(text_observer(Sink()))
    rounds = max(1, n // args.batch)
    cost = per_event(lambda: [publish_lines(main_publisher, batch) for _ in range(rounds)], rounds * args.batch)
    print(f"main process, JSON line -> twistd line:  {cost:6.2f} µs/event (batches of {args.batch})")
    print(f"bytes per event on the pipe:             {len(batch) / args.batch:6.0f}")


if __name__ == "__main__":
    main()
