"""Crash-test helper: `python -m tests.support.spool_crash SPOOL_DIR COUNT`.

Runs a real Spool on the real reactor with several messages in flight at once (so group commits,
temp files and thread-pool fsyncs are all under way when the test SIGKILLs it), and prints
"<n> <queue id>" on stdout, flushed, only after message n's commit Deferred has fired: every printed
id is a message the relay would have answered 250 for. Exits by itself after COUNT messages.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from mailrelay.envelope import Envelope
from mailrelay.spool import Spool

LANES = 6
PIECE = 40_000


def envelope_for(n: int) -> Envelope:
    return Envelope(sender=f"sender{n}@example.org", recipients=(f"r{n}@example.net",),
                    received_at=1767225600.0 + n)


def body_for(n: int) -> bytes:
    """Deterministic, binary, of varied size: most small, every 5th about 1 MiB (spills: its file is in
    queue/, in progress, while it is written)."""
    size = 1_000_000 + n if n % 5 == 0 else 100 + (n * 7919) % 150_000
    seed = hashlib.sha256(b"%d" % n).digest()
    block = hashlib.sha256(seed).digest() * 2048                 # 64 KiB
    head = b"Subject: message %d\r\n\r\n" % n
    return head + (block * (size // len(block) + 1))[:size]


def main(directory: str, count: int) -> None:
    from twisted.internet import reactor

    spool = Spool(Path(directory))
    spool.startService()
    state = {"next": 0, "done": 0}

    def start_one() -> None:
        n = state["next"]
        if n >= count:
            return
        state["next"] += 1
        write_piece(spool.new_message(envelope_for(n)), body_for(n), 0, n)

    def write_piece(message_writer, body: bytes, offset: int, n: int) -> None:
        # One piece per reactor turn, as DATA arrives from a client: the lanes interleave, so a kill
        # finds messages half-written in tmp/ as well as commits in the thread pool.
        if offset < len(body):
            message_writer.write(body[offset:offset + PIECE])
            reactor.callLater(0, write_piece, message_writer, body, offset + PIECE, n)
        else:
            message_writer.commit().addCallback(committed, n)

    def committed(queue_id: str, n: int) -> None:
        sys.stdout.write(f"{n} {queue_id}\n")
        sys.stdout.flush()
        state["done"] += 1
        if state["done"] == count:
            spool.stopService().addCallback(lambda _: reactor.stop())
        else:
            reactor.callLater(0, start_one)

    for _ in range(LANES):
        reactor.callWhenRunning(start_one)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
