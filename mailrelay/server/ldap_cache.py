# -*- test-case-name: tests.test_ldap -*-
"""Remembering recent successful LDAP logins, so a busy submission port does not bind for every message.

Part of AUTH against LDAP (mailrelay.server.ldap).  In: (user, password) pairs the directory accepted,
and later (user, password) pairs to look up.  Out: yes/no.  Only a salted scrypt hash of the password is
kept (salt random per cache, so per process), never the password itself; an entry expires `ttl` seconds
after the login that stored it (time from the clock passed in).  A different password is a miss and goes
to the directory, so a changed password works at once and a wrong one is never accepted from here.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

# Memory-hard on purpose: a dump of the process memory should not give the passwords away cheaply.
# n=2**10, r=8 costs 1 MiB and ~10 ms per hash: LDAPChecker computes digest() in a worker thread.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**10, 8, 1
MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    expires: float


class CredentialCache:
    """user → (salted password hash, expiry).  ttl <= 0 turns the cache off."""

    def __init__(self, ttl: float, clock: IReactorTime):
        self._ttl = ttl
        self._clock = clock
        self._salt = os.urandom(16)
        self._entries: dict[str, _Entry] = {}

    @property
    def enabled(self) -> bool:
        return self._ttl > 0

    def digest(self, user: str, password: bytes) -> bytes:
        """The salted hash kept for (user, password). Slow on purpose; safe to call from any thread."""
        salt = self._salt + user.encode("utf-8")
        return hashlib.scrypt(password, salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)

    def has_entry(self, user: str) -> bool:
        """Whether a lookup for `user` could hit (worth computing a digest for)."""
        entry = self._entries.get(user)
        if entry is not None and entry.expires <= self._clock.seconds():
            del self._entries[user]
            entry = None
        return entry is not None

    def remember(self, user: str, password: bytes) -> None:
        if self.enabled:
            self.remember_digest(user, self.digest(user, password))

    def remember_digest(self, user: str, digest: bytes) -> None:
        if not self.enabled:
            return
        now = self._clock.seconds()
        if len(self._entries) >= MAX_ENTRIES:
            self._entries = {u: e for u, e in self._entries.items() if e.expires > now}
        if len(self._entries) < MAX_ENTRIES:
            self._entries[user] = _Entry(digest, now + self._ttl)

    def check(self, user: str, password: bytes) -> bool:
        """True when this user logged in with this very password less than ttl ago."""
        return self.has_entry(user) and self.check_digest(user, self.digest(user, password))

    def check_digest(self, user: str, digest: bytes) -> bool:
        entry = self._entries.get(user)
        if entry is None:
            return False
        if entry.expires <= self._clock.seconds():
            del self._entries[user]
            return False
        return hmac.compare_digest(entry.digest, digest)

    def forget(self, user: str) -> None:
        self._entries.pop(user, None)

    def __len__(self) -> int:
        return len(self._entries)
