#!/usr/bin/env python3
"""DKIM signing throughput on one core: mailrelay's Signer (OpenSSL RSA through cryptography, dkimpy for the
header) against dkimpy's own `dkim.sign` (pure-Python RSA), for RSA-2048 and Ed25519, on a 2 KiB message.

    python benchmarks/dkim_sign.py [--seconds 3]

Prints signatures per second (median of 5 runs) and the ratio. Nothing is asserted: this is a measurement.
"""
from __future__ import annotations

import argparse
import io
import statistics
import time

import dkim
from cryptography.hazmat.primitives import serialization

from mailrelay.dkim import keys
from mailrelay.dkim.keys import SigningKey
from mailrelay.dkim.signer import Signer

MESSAGE = (b"From: App <app@example.org>\r\nTo: user@example.com\r\nSubject: benchmark\r\n"
           b"Date: Sat, 28 Nov 2026 00:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\n"
           + b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n" * 27)


def rate(sign, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sign()
        count += 1
    return count / (time.perf_counter() - start)


def median_rate(sign, seconds: float, runs: int = 5) -> float:
    return statistics.median(rate(sign, seconds / runs) for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement (split over 5 runs)")
    args = parser.parse_args()
    rsa_key, ed_key = keys.generate("rsa", 2048), keys.generate("ed25519")
    rsa_pem = rsa_key.private_bytes(  # dkimpy's own parser wants PKCS#1
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())
    ours_rsa = Signer([SigningKey("example.org", "s", rsa_key)])
    ours_ed = Signer([SigningKey("example.org", "s", ed_key)])
    rows = [
        ("mailrelay Signer, RSA-2048", median_rate(lambda: ours_rsa.sign(io.BytesIO(MESSAGE)), args.seconds)),
        ("dkimpy dkim.sign, RSA-2048", median_rate(
            lambda: dkim.sign(MESSAGE, b"s", b"example.org", rsa_pem, canonicalize=(b"relaxed", b"relaxed")),
            args.seconds)),
        ("mailrelay Signer, Ed25519", median_rate(lambda: ours_ed.sign(io.BytesIO(MESSAGE)), args.seconds)),
    ]
    print(f"{len(MESSAGE)}-byte message, one core, median of 5 runs")
    for name, value in rows:
        print(f"  {name:<30} {value:8.0f} signatures/s")
    print(f"  RSA ratio mailrelay/dkimpy: {rows[0][1] / rows[1][1]:.1f}x (target: >= 1000/s for mailrelay RSA)")


if __name__ == "__main__":
    main()
