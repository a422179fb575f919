"""Outgoing BDAT (RFC 3030 CHUNKING) against DATA: the same relay delivering the same queued messages
to the same loopback sink, which offers CHUNKING in one run and not in the other.

Where it sits: outside the message's journey, timing its last step.  It starts mailrelay (twistd, with
its delivery process) on loopback with every recipient routed to a port where nothing listens yet,
submits N messages (each is accepted, tried once, and waits an hour for its retry), then starts the sink
there and flushes the queue (`mailrelay queue flush`).  The rate is the sink's: messages completed
between the first MAIL FROM it saw and the last message's end, so the submission and the flush's
latency take no part.  The relay uses BDAT whenever the hop offers CHUNKING, DATA otherwise, so the one
difference between the two runs is the body transfer: BDAT (pipelined with MAIL and RCPT, no
dot-stuffing) or DATA (a wait for 354, dot-stuffed, ended by CRLF.CRLF).  The sink reads both at the
speed of bytes.find / slicing (a DATA body is scanned for CRLF.CRLF, a chunk is counted), in a thread
of this process, and keeps nothing.  Out: msg/s for each mode and size, the median of `--runs`, and
BDAT's rate divided by DATA's.  The runs of the two modes alternate.

    .venv/bin/python benchmarks/bdat_vs_data.py                        # 2 KiB and 100 KiB, 3 runs each
    .venv/bin/python benchmarks/bdat_vs_data.py --messages 500 --large 200 --runs 1

The machine it runs on decides the numbers: run it with nothing else busy, or compare only the ratio.
Environment: MAILRELAY_VENV (bin/twistd, bin/mailrelay), BENCH_TMPDIR (default /var/tmp: a real disk).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from harness import free_port, mailrelay_conf, wait_for_port
from memory import REPO, find_venv

KIB = 1024


def make_message(size: int, n: int) -> bytes:
    head = (f"From: bench@example.org\r\nTo: sink@example.net\r\nSubject: bench {n}\r\n"
            f"Message-ID: <bench-{n}@example.org>\r\n\r\n").encode()
    line = b"La de da de da, a line of a benchmark message, 76 octets or so in all....\r\n"
    dotted = b".a line starting with a dot, stuffed for DATA, sent as it is with BDAT..\r\n"
    body = bytearray()
    while len(head) + len(body) < size:
        body += dotted if len(body) % (10 * len(line)) == 0 else line
    return head + bytes(body[:size - len(head) - 2]) + b"\r\n"


# -- the sink ---------------------------------------------------------------------------------------

class SinkState:
    def __init__(self, chunking: bool):
        self.chunking = chunking
        self.messages = 0
        self.first: Optional[float] = None
        self.last: Optional[float] = None
        self.bdat_seen = self.data_seen = False


class SinkProtocol(asyncio.Protocol):
    """SMTP, every command accepted; DATA and BDAT bodies counted and dropped."""

    def __init__(self, state: SinkState):
        self.state = state
        self.buf = b""
        self.mode = "command"        # "command" | "data" | "bdat"
        self.need = 0
        self.last_chunk = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(b"220 sink.localhost ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.buf:
            if self.mode == "bdat":
                took = min(self.need, len(self.buf))
                self.buf, self.need = self.buf[took:], self.need - took
                if self.need:
                    return
                self.mode = "command"
                if self.last_chunk:
                    self._message_done()
                else:
                    self.transport.write(b"250 2.0.0 chunk ok\r\n")
                continue
            if self.mode == "data":
                end = self.buf.find(b"\r\n.\r\n")       # the buffer keeps the CRLF before the body
                if end < 0:
                    self.buf = self.buf[-4:]            # nothing before these can start the end mark
                    return
                self.buf, self.mode = self.buf[end + 5:], "command"
                self._message_done()
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            line, self.buf = self.buf[:end], self.buf[end + 2:]
            self._command(line)

    def _command(self, line: bytes) -> None:
        verb = line[:4].upper()
        write = self.transport.write
        if verb in (b"EHLO", b"HELO"):
            write(b"250-sink.localhost\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n"
                  + (b"250-CHUNKING\r\n" if self.state.chunking else b"") + b"250 SIZE 0\r\n")
        elif verb == b"MAIL":
            if self.state.first is None:
                self.state.first = time.monotonic()
            write(b"250 2.1.0 ok\r\n")
        elif verb == b"DATA":
            self.state.data_seen = True
            self.mode, self.buf = "data", b"\r\n" + self.buf
            write(b"354 go on\r\n")
        elif verb == b"BDAT":
            self.state.bdat_seen = True
            words = line.split()
            self.need, self.last_chunk, self.mode = int(words[1]), len(words) > 2, "bdat"
        elif verb == b"QUIT":
            write(b"221 2.0.0 bye\r\n")
            self.transport.close()
        else:
            write(b"250 2.0.0 ok\r\n")

    def _message_done(self) -> None:
        self.state.messages += 1
        self.state.last = time.monotonic()
        self.transport.write(b"250 2.0.0 queued\r\n")


class Sink:
    """The sink on 127.0.0.1:port, in a thread with its own event loop."""

    def __init__(self, port: int, chunking: bool):
        self.state = SinkState(chunking)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(
                self.loop.create_server(lambda: SinkProtocol(self.state), "127.0.0.1", port))
            ready.set()
            self.loop.run_forever()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -- one run ------------------------------------------------------------------------------------------

def submit(port: int, messages: list[bytes], clients: int) -> None:
    def client(part: list[bytes]) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
            smtp.ehlo("bench.localhost")
            for message in part:
                smtp.sendmail("bench@example.org", ["sink@example.net"], message)
    threads = [threading.Thread(target=client, args=(messages[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def all_tried(spool_dir: Path, count: int) -> bool:
    """Every one of `count` queued messages has had its first (failed) attempt."""
    sys.path.insert(0, str(REPO))
    from mailrelay.queue.state import MessageState
    from mailrelay.spool.store import Spool
    spool = Spool(spool_dir)
    ids = spool.queue_ids()
    if len(ids) < count:
        return False
    for queue_id in ids:
        m = spool.load(queue_id)
        if not MessageState.from_dict(m.state, m.envelope.recipients).recipients[0].attempts:
            return False
    return True


def run_once(venv: Path, work: Path, chunking: bool, size: int, count: int, clients: int) -> float:
    """msg/s for `count` messages of `size` octets, BDAT (chunking) or DATA."""
    port, sink_port = free_port(), free_port()
    spool = work / "spool"
    conf = work / "tap.conf"
    conf.write_text(mailrelay_conf(port, sink_port, spool)
                    + '\n[queue]\nfirst_retry = "1h"\nmax_retry = "1h"\nbounces = false\n')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(work / "twistd.log", "ab") as log:
        relay = subprocess.Popen([str(venv / "bin" / "twistd"), "-n", "--pidfile=", "--logfile=-", "mailrelay",
                                  "--config", str(conf)], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    sink = None
    try:
        if not wait_for_port("127.0.0.1", port, 30, lambda: relay.poll() is None):
            raise RuntimeError("mailrelay did not start: " + (work / "twistd.log").read_text()[-2000:])
        submit(port, [make_message(size, n) for n in range(count)], clients)
        deadline = time.monotonic() + 300
        while not all_tried(spool, count):
            if time.monotonic() > deadline:
                raise RuntimeError("the first attempts did not all happen within 300 s")
            time.sleep(0.2)
        sink = Sink(sink_port, chunking)
        subprocess.run([str(venv / "bin" / "mailrelay"), "queue", "flush", "--config", str(conf)], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while sink.state.messages < count:
            if time.monotonic() > deadline or relay.poll() is not None:
                raise RuntimeError(f"only {sink.state.messages} of {count} delivered")
            time.sleep(0.05)
        s = sink.state
        if (s.bdat_seen, s.data_seen) != (chunking, not chunking):
            raise RuntimeError(f"expected {'BDAT' if chunking else 'DATA'} only; saw BDAT={s.bdat_seen} "
                               f"DATA={s.data_seen}")
        return (count - 1) / (s.last - s.first)
    finally:
        relay.send_signal(signal.SIGTERM)
        try:
            relay.wait(30)
        except subprocess.TimeoutExpired:
            relay.kill()
        if sink is not None:
            sink.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000, help="2 KiB messages per run")
    parser.add_argument("--large", type=int, default=300, help="100 KiB messages per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="submitting SMTP sessions at once")
    args = parser.parse_args()
    venv = find_venv()
    if venv is None:
        print("no virtualenv with bin/twistd: set MAILRELAY_VENV", file=sys.stderr)
        return 2
    base = Path(os.environ.get("BENCH_TMPDIR", "/var/tmp"))
    print(f"{'size':>8} {'mode':>5} {'runs (msg/s)':<24} {'median':>8}")
    medians: dict[tuple[int, bool], float] = {}
    for size, count in ((2 * KIB, args.messages), (100 * KIB, args.large)):
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.runs):
            for chunking in (False, True):       # interleaved: a change in the machine's load hits both
                work = Path(tempfile.mkdtemp(prefix="bdat-bench-", dir=base))
                try:
                    rates[chunking].append(run_once(venv, work, chunking, size, count, args.clients))
                finally:
                    shutil.rmtree(work, ignore_errors=True)
        for chunking in (False, True):
            medians[size, chunking] = median = statistics.median(rates[chunking])
            runs = " ".join(f"{r:.0f}" for r in rates[chunking])
            print(f"{size // KIB:>5} KiB {'BDAT' if chunking else 'DATA':>5} {runs:<24} {median:>8.0f}", flush=True)
    for size in (2 * KIB, 100 * KIB):
        print(f"{size // KIB:>5} KiB BDAT/DATA = {medians[size, True] / medians[size, False]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
