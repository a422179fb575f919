"""The cost of recording one TLS outcome in the TLS report store (outbound.tlsrpt_store), as direct MX
delivery pays it once per new session: the in-memory count, and the journal append that follows
(one per FLUSH_DELAY, however many sessions it carries), on the real reactor's clock.

    .venv/bin/python benchmarks/tlsrpt_record.py [--records 200000]

Prints the microseconds per record() call, and per record with the flush's cost spread over the
records it wrote (worst case: 1000 distinct domains, every record a failure with details).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from twisted.internet import task

from mailrelay.outbound.tlsrpt_store import TLSReportStore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()
    clock = task.Clock()
    clock.advance(time.time())
    with tempfile.TemporaryDirectory(dir="/var/tmp") as directory:
        store = TLSReportStore(Path(directory), clock=clock)
        detail = {"sending-mta-ip": "192.0.2.1", "receiving-ip": "198.51.100.7", "receiving-mx-helo": "mx.example"}
        for label, success in (("success", True), ("failure with details", False)):
            start = time.perf_counter()
            for n in range(args.records):
                store.record(f"d{n % 1000}.example", "no-policy-found", (), f"mx.d{n % 1000}.example",
                             None if success else "starttls-not-supported", success, detail)
            recorded = time.perf_counter() - start
            start = time.perf_counter()
            store.flush(sync=True)
            flushed = time.perf_counter() - start
            print(f"{label}: record() {recorded / args.records * 1e6:.2f} us; flush+fsync of 1000 policies "
                  f"{flushed * 1e3:.1f} ms (per record, had they come in one second: "
                  f"{(recorded + flushed) / args.records * 1e6:.2f} us)")


if __name__ == "__main__":
    main()
