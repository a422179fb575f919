"""The HTTP injection API's accept rate beside SMTP's, on one relay (a small, light benchmark).

Where it sits: outside the message's journey, timing its front doors.  It starts mailrelay (twistd) on
loopback with a tap.conf like relay_vs_postfix.sh's (harness.mailrelay_conf: every recipient goes to a
discarding sink) plus an `http` listener and one API key, then sends the same N small messages twice,
from `--clients` threads each: over SMTP (one session per client, one transaction per message, the
client waiting for each 250) and over HTTP (one keep-alive connection per client, one
`POST /v1/messages` per message, waiting for each 202).  Both answers come only after the spool's
fsync, so both rates are durable accepts.  Out: messages/s for each, one line each.  Standard library
only (plus the relay under test).

    python3 benchmarks/http_vs_smtp.py                       # 200 messages each way, 4 clients
    python3 benchmarks/http_vs_smtp.py --messages 2000 --clients 8

The machine it runs on decides the numbers: run it with nothing else busy, or compare only the ratio.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from harness import DiscardSink, free_port, mailrelay_conf, pid_alive, wait_for_port
from memory import REPO, find_venv

MESSAGE = ("From: bench@example.org\r\nTo: sink@example.net\r\nSubject: bench\r\n\r\n"
           + "La de da de da.\r\n" * 40)


def http_conf(base: str, http_port: int) -> str:
    """harness.mailrelay_conf with an http listener and its key file."""
    return base.replace("[limits]", f'[[listen]]\nkind = "http"\nendpoint = "tcp:{http_port}:interface=127.0.0.1"'
                        '\n\n[http]\napi_keys_file = "apikeys"\n\n[limits]', 1) + \
        '\n[[permit]]\nusers = ["bench"]\nsenders = ["example.org"]\n'


def smtp_client(port: int, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo("bench.localhost")
        for _ in range(count):
            smtp.sendmail("bench@example.org", ["sink@example.net"], MESSAGE)


def http_client(port: int, key: str, count: int) -> None:
    body = json.dumps({"from": "bench@example.org", "to": ["sink@example.net"], "message": MESSAGE}).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for _ in range(count):
            connection.request("POST", "/v1/messages", body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
            if response.status != 202:
                raise RuntimeError(f"HTTP {response.status}: {answer[:200]!r}")
    finally:
        connection.close()


def rate(messages: int, clients: int, client: Callable[[int], None]) -> float:
    """Messages per second with `clients` threads sharing `messages`."""
    share = [messages // clients + (i < messages % clients) for i in range(clients)]
    errors: list[BaseException] = []

    def run(count: int) -> None:
        try:
            client(count)
        except BaseException as e:       # reported below, with the rate left out
            errors.append(e)
    threads = [threading.Thread(target=run, args=(count,)) for count in share if count]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]!r}")
    return messages / elapsed


def start_relay(venv: Path, workdir: Path, sink_port: int) -> tuple[subprocess.Popen, int, int, str]:
    """twistd with an SMTP relay and an http listener; (process, SMTP port, HTTP port, API key)."""
    smtp_port, http_port = free_port(), free_port()
    config = workdir / "tap.conf"
    config.write_text(http_conf(mailrelay_conf(smtp_port, sink_port, workdir / "spool", max_connections=100),
                                http_port))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    made = subprocess.run([str(venv / "bin" / "python"), "-m", "mailrelay.cli.main", "apikey", "bench",
                           "--config", str(config)], capture_output=True, text=True, check=True, env=env)
    with open(workdir / "twistd.log", "ab") as log:
        process = subprocess.Popen([str(venv / "bin" / "twistd"), "-n", "--pidfile=", "mailrelay", "--config",
                                    str(config)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, smtp_port, http_port, made.stdout.splitlines()[-1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200, help="messages each way (default 200)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    args = parser.parse_args(argv)
    venv = find_venv()
    if venv is None:
        print("http_vs_smtp: no virtualenv with bin/twistd (set MAILRELAY_VENV)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-http-bench-", dir=os.environ.get("BENCH_TMPDIR")))
    sink = DiscardSink().start()
    process = None
    try:
        process, smtp_port, http_port, key = start_relay(venv, workdir, sink.port)
        for port in (smtp_port, http_port):
            if not wait_for_port("127.0.0.1", port, 30, lambda: pid_alive(process.pid)):
                tail = (workdir / "twistd.log").read_text(errors="replace")[-2000:]
                print("http_vs_smtp: the relay did not start:\n" + tail, file=sys.stderr)
                return 1
        smtp = rate(args.messages, args.clients, lambda n: smtp_client(smtp_port, n))
        api = rate(args.messages, args.clients, lambda n: http_client(http_port, key, n))
        print(f"SMTP accept rate: {smtp:8.1f} messages/s ({args.messages} messages, {args.clients} clients)")
        print(f"HTTP accept rate: {api:8.1f} messages/s ({args.messages} messages, {args.clients} clients)")
        sink.wait_for(2 * args.messages, 60)
        return 0
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
