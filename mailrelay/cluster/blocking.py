# -*- test-case-name: tests.test_suppression -*-
"""A blocking Redis client for the command line (`mailrelay suppression` with `[cluster] redis`): one
socket, RESP2, a few commands, every wait bounded.  The relay itself never uses it (cluster/redis.py)."""
from __future__ import annotations

import socket
import ssl
from typing import Optional

from mailrelay.cluster.url import RedisURL


class RedisError(Exception):
    """Redis could not be reached or refused a command (the message never holds the password)."""


class BlockingRedis:
    def __init__(self, url: RedisURL, timeout: float = 3.0, ca_file: Optional[str] = None):
        self.url = url
        try:
            sock = socket.create_connection((url.host, url.port), timeout=timeout)
            if url.tls:
                context = ssl.create_default_context(cafile=ca_file)
                sock = context.wrap_socket(sock, server_hostname=url.host)
        except (OSError, ssl.SSLError) as e:
            raise RedisError(f"cannot reach Redis {url}: {e}") from None
        self._sock = sock
        self._file = sock.makefile("rb")
        if url.password is not None:
            self.command("AUTH", *([url.username] if url.username else []), url.password)
        if url.db:
            self.command("SELECT", str(url.db))

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def command(self, *words):
        data = b"*%d\r\n" % len(words)
        for word in words:
            raw = word if isinstance(word, bytes) else str(word).encode("utf-8")
            data += b"$%d\r\n%s\r\n" % (len(raw), raw)
        try:
            self._sock.sendall(data)
            return self._reply()
        except OSError as e:
            raise RedisError(f"Redis {self.url}: {e}") from None

    def _reply(self):
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise RedisError(f"Redis {self.url}: connection closed")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            raise RedisError(f"Redis {self.url} refused: {rest.decode('utf-8', 'replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            value = self._file.read(size + 2)[:-2]
            return value.decode("utf-8", "replace")
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._reply() for _ in range(count)]
        raise RedisError(f"Redis {self.url}: unexpected reply")
