# -*- test-case-name: tests.test_cluster_redis -*-
"""A real redis-server on loopback for a test: its own port (ports.free_port), its own directory, no
persistence (`--save "" --appendonly no`), stopped (or killed, or restarted on the same port) at will."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

from tests.support.ports import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def available() -> bool:
    return os.access(REDIS_SERVER, os.X_OK)


class RedisServer:
    """`start()` launches redis-server on 127.0.0.1 and waits until it answers PING; `kill()` ends it
    with SIGKILL (a crash: connections reset), `start()` again brings it back on the same port, empty."""

    def __init__(self, directory: str, password: Optional[str] = None, port: Optional[int] = None,
                 tls: Optional[tuple[Path, Path, Path]] = None):
        """`tls`: (certificate, key, CA file): TLS only, on `port` (clients need no certificate)."""
        self.tls = tls
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}localhost:{self.port}/0"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory), "--daemonize", "no", "--protected-mode", "yes",
                "--logfile", str(self.directory / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            cert, key, ca = self.tls
            args[1:3] = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                         "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: see "
                                   f"{self.directory / 'redis.log'}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def command(self, *words: str) -> str:
        """One command through redis-cli (it comes with redis-server), its reply as text: for a test's
        own checks and set-up, outside the relay's client."""
        env = dict(os.environ, REDISCLI_AUTH=self.password) if self.password else None
        tls = ["--tls", "--cacert", str(self.tls[2])] if self.tls else []
        done = subprocess.run([REDIS_CLI, "-h", "127.0.0.1", "-p", str(self.port), *tls, *words], env=env,
                              capture_output=True, text=True, timeout=10)
        return done.stdout.strip()

    def ping(self) -> bool:
        try:
            return self.command("PING") == "PONG"
        except (OSError, subprocess.TimeoutExpired):
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
