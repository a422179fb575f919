# -*- test-case-name: tests.test_http_api, tests.test_cluster_end_to_end -*-
"""The API key file: who may use the HTTP injection API, and how `mailrelay apikey` writes it.

Where it sits in the journey: the HTTP listener (server/http.py) hands it the bearer token of each
request; `ApiKeyFile.identify` answers with the key's NAME — the authenticated identity `[[permit]]
users` rules, limits and DKIM see, exactly as a SMTP AUTH user — or None (401).

In: `[http] api_keys_file`, one `name:sha256:<64 hex digits>` a line, blank lines and `#` comments
allowed.  The file is re-read when its inode, size or mtime change (one stat per request); a missing
file means no keys.  Out: names for the listener; `new_key` / `set_key` for the command line.

Why SHA-256 and not argon2 as for passwords: a key is 32 random bytes (`secrets.token_urlsafe(32)`,
256 bits), not something a person chose, so no dictionary or brute force can find it from its hash;
a slow hash protects only guessable secrets, and here it would make every request cost a 64 MiB
argon2 check (a denial of service for the price of a POST).  The file holds only hashes, so a stolen
copy lets nobody in.  Each request's hash is compared with every stored one in constant time
(hmac.compare_digest, all entries, no early exit): timing says nothing about which bytes matched.
Names follow the password file's rule (no ':', whitespace or control characters).  A key is never
logged; malformed lines are named by line number only.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from twisted import logger as twisted_logger   # the type of a class-level Logger seen from an instance

from mailrelay.logger import Logger
from mailrelay.server.passwords import _atomic_write, _replace_entry, parse_entries, valid_user_name

HASH_PREFIX = "sha256:"
_HASH = re.compile(r"sha256:[0-9a-f]{64}\Z")
KEY_BYTES = 32
MAX_KEY_LENGTH = 512      # a bearer token longer than this is no key of ours: not even hashed


def new_key() -> str:
    """A fresh key: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(KEY_BYTES)


def hash_key(key: str) -> str:
    """How a key is stored: `sha256:` and the hex SHA-256 of its UTF-8 text."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def set_key(path: Path, name: str) -> str:
    """Create or replace NAME's key in the file (atomically, mode 0600, other lines kept); returns the
    new key, which exists nowhere else: the file keeps only its hash.  ValueError for a bad name."""
    if not valid_user_name(name):
        raise ValueError("name must not be empty or contain ':', whitespace or control characters")
    key = new_key()
    path = Path(path)
    try:
        old = path.read_bytes().decode("utf-8", "surrogateescape").splitlines()
    except FileNotFoundError:
        old = []
    _atomic_write(path, "".join(line + "\n" for line in _replace_entry(old, name, f"{name}:{hash_key(key)}")))
    return key


def parse_key_file(data: bytes, source: str, log: Optional[twisted_logger.Logger] = None) -> dict[str, str]:
    """The `name -> stored hash` entries; malformed and duplicate lines skipped, logged by line number."""
    return parse_entries(data, source, _HASH.match, "API key", "duplicate API key entry skipped", log)


@dataclass(frozen=True)
class _Snapshot:
    stamp: Optional[tuple] = None
    entries: dict = field(default_factory=dict)     # name -> "sha256:<hex>"


class ApiKeyFile:
    """The keys of `[http] api_keys_file`, re-read when the file changes."""

    log = Logger()

    def __init__(self, path: Path):
        self.path = Path(path)
        self._snapshot = _Snapshot()
        self._missing_logged = False

    def identify(self, key: str) -> Optional[str]:
        """The NAME whose key this is, or None.  Every entry is compared, in constant time."""
        if not key or len(key) > MAX_KEY_LENGTH:
            return None
        presented = hash_key(key).encode("ascii")
        found = None
        for name, stored in self._entries().items():
            if hmac.compare_digest(presented, stored.encode("ascii")) and found is None:
                found = name
        return found

    def _entries(self) -> dict[str, str]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if not self._missing_logged:
                self.log.warn("API key file {file} does not exist: every HTTP request is refused (401)",
                              file=str(self.path))
                self._missing_logged = True
            self._snapshot = _Snapshot()
            return {}
        except OSError as e:
            self.log.error("cannot read API key file {file}: {error}", file=str(self.path), error=e.strerror)
            return {}
        self._missing_logged = False
        if (st.st_ino, st.st_size, st.st_mtime_ns) != self._snapshot.stamp:
            self._snapshot = self._read()
        return self._snapshot.entries

    def _read(self) -> _Snapshot:
        try:
            with open(self.path, "rb") as f:     # stamp and contents from one open file
                st = os.fstat(f.fileno())
                data = f.read()
        except OSError as e:
            self.log.error("cannot read API key file {file}: {error}", file=str(self.path), error=e.strerror)
            return _Snapshot()
        entries = parse_key_file(data, str(self.path), self.log)
        self.log.info("API key file {file} loaded: {count} keys", file=str(self.path), count=len(entries))
        return _Snapshot((st.st_ino, st.st_size, st.st_mtime_ns), entries)
