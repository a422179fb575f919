# -*- test-case-name: tests.test_capabilities, tests.test_delivery_client, tests.test_chunking -*-
"""Secrets a next hop holds (a smarthost password, an OAuth2 client secret, a refresh token, a bearer
token): a wrapper that never shows its value in a repr, a log line or a traceback.

In: the path of a secret file, or the bytes of a secret.  Out: a `Secret`; only `reveal()` gives the
bytes back, at the one place they go on the wire.
"""
from __future__ import annotations

from pathlib import Path


class Secret:
    """A secret that shows as <hidden> in every repr, so no log line or traceback can carry it."""
    __slots__ = ("_value",)

    def __init__(self, value: bytes):
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "<hidden>"

    __str__ = __repr__


def read_secret(path: Path) -> Secret:
    """A secret file's content without its trailing newline (LF or CRLF)."""
    data = Path(path).read_bytes()
    return Secret(data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data)
