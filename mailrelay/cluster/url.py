# -*- test-case-name: tests.test_cluster_redis, tests.test_cluster_link -*-
"""`[cluster] redis`: the URL of the shared Redis, parsed, and shown only with its password masked.

`redis://[[user]:password@]host[:port][/db]`, or `rediss://` for TLS.  Imported by the config stage to
validate the key, so it imports nothing of Twisted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from urllib.parse import unquote, urlsplit

DEFAULT_PORT = 6379


@dataclass(frozen=True)
class RedisURL:
    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> "RedisURL":
        """ValueError (with the password masked) for anything but redis:// or rediss:// with a host."""
        parts = urlsplit(url)
        shown = masked(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f'"{shown}" is no redis:// or rediss:// URL')
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f'"{shown}": bad port') from None
        if not parts.hostname:
            raise ValueError(f'"{shown}": no host')
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f'"{shown}": the path must be a database number, e.g. /0')
        if parts.query or parts.fragment:
            raise ValueError(f'"{shown}": no query or fragment is understood')
        return cls(parts.hostname, port, int(path or 0), unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password is not None else None, parts.scheme == "rediss")

    def __str__(self) -> str:
        """The URL as it may be shown: never the password."""
        auth = ""
        if self.username or self.password is not None:
            auth = f"{self.username or ''}{':***' if self.password is not None else ''}@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{auth}{host}:{self.port}/{self.db}"


def masked(url: str) -> str:
    """`url` with the password (whatever sits between ':' and '@' after the scheme) as ***."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"
