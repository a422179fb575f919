# -*- test-case-name: tests.test_passwords, tests.test_cli_passwd -*-
"""The password file: who may log in with SMTP AUTH PLAIN/LOGIN, and how `mailrelay passwd` edits it.

Where it sits in the journey: the session's AUTH command (RFC 4954) hands the portal a username and
password; `PasswordFileChecker` answers with the user name (the avatar id the realm turns into a
RelayUser) or UnauthorizedLogin (535 5.7.8).  What that user may relay is the policy's business.

In: `auth.password_file`, one `user:hash` a line, blank lines and `#` comments allowed; a hash is
argon2id (`$argon2id$...`, argon2-cffi) or bcrypt (`$2b$`, `$2a$`, `$2y$`).  The file is re-read when
its inode, size or mtime change (one stat per login); a missing file means no users.
Out: avatar ids for the portal; `hash_password` / `set_password` for the command line.

Hashing is deliberately slow, so every verification runs in a thread pool, never on the reactor thread.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import argon2
import bcrypt
from twisted import logger as twisted_logger   # the type of a class-level Logger seen from an instance
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from mailrelay.logger import Logger
from mailrelay.server.realm import TemporaryAuthFailure

BCRYPT_PREFIXES = ("$2b$", "$2a$", "$2y$")
ARGON2ID_PREFIX = "$argon2id$"
_BCRYPT_HASH = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}\Z")
# PHC string format, as argon2-cffi writes it: parameters, then base64 (no padding) salt and hash.
_ARGON2ID_HASH = re.compile(r"\$argon2id\$v=19\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{11,}\Z")
_BAD_NAME_CHARS = re.compile(r"[:\s\x00-\x1f\x7f]")
# RFC 9106 4: argon2id is memory-hard, each check takes its `m` (64 MiB with argon2-cffi's defaults).
# Unbounded, ten unauthenticated AUTH attempts at once filled the reactor's ten threads (and starved
# its DNS lookups) with 640 MiB (CWE-400); at most this many run at once, the others wait their turn.
MAX_CONCURRENT_VERIFICATIONS = 2


def valid_user_name(user: str) -> bool:
    """A user name can be stored in the file: not empty, no ':', whitespace or control characters."""
    return bool(user) and not _BAD_NAME_CHARS.search(user)


def hash_password(password: str) -> str:
    """An argon2id hash of `password` with argon2-cffi's default (RFC 9106 low-memory) parameters."""
    return argon2.PasswordHasher().hash(password)


def valid_hash(stored: str) -> bool:
    """`stored` looks like an argon2id or bcrypt hash we can verify."""
    return bool(_ARGON2ID_HASH.match(stored) or _BCRYPT_HASH.match(stored))


def verify_password(stored: str, password: bytes) -> bool:
    """Check `password` against one stored hash.  Slow on purpose: call it off the reactor thread."""
    if stored.startswith(ARGON2ID_PREFIX):
        try:
            return argon2.PasswordHasher().verify(stored, password)
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False
    if stored.startswith(BCRYPT_PREFIXES):
        # bcrypt only ever used the first 72 bytes; bcrypt >= 5 refuses longer input instead of
        # truncating, so truncate as every bcrypt hash in existing files was made.
        try:
            return bcrypt.checkpw(password[:72], stored.encode("ascii"))
        except ValueError:
            return False
    return False


@dataclass(frozen=True)
class _Stamp:
    """What tells us the file changed: inode, size and modification time."""
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "_Stamp":
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class _Snapshot:
    stamp: Optional[_Stamp] = None
    users: dict = field(default_factory=dict)    # user name -> hash


def parse_entries(data: bytes, source: str, valid_value: Callable[[str], Any], what: str, duplicate: str,
                  log: Optional[twisted_logger.Logger] = None) -> dict[str, str]:
    """The `name -> stored value` entries of a `name:value` file (the password file, the API key file);
    malformed lines (a bad name, or a value `valid_value` refuses) and repeated names are skipped and
    logged by file name and line number (never their content: it may hold a hash)."""
    entries: dict[str, str] = {}
    for number, raw in enumerate(data.splitlines(), start=1):
        line = raw.decode("utf-8", "replace").strip()
        if not line or line.startswith("#"):
            continue
        name, colon, stored = line.partition(":")
        stored = stored.strip()
        if not colon or not valid_user_name(name) or not valid_value(stored):
            if log is not None:
                log.warn("{file}:{line}: malformed {what} entry skipped", file=source, line=number, what=what)
            continue
        if name in entries:
            if log is not None:
                log.warn("{file}:{line}: " + duplicate, file=source, line=number)
            continue
        entries[name] = stored
    return entries


def parse_password_file(data: bytes, source: str, log: Optional[twisted_logger.Logger] = None) -> dict[str, str]:
    """The `user -> hash` entries of a password file's contents (see parse_entries)."""
    return parse_entries(data, source, valid_hash, "password", "duplicate entry for a user skipped", log)


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """twisted.cred checker for IUsernamePassword against a password file; the avatar id is the user name."""

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(self, path: Path, threadpool=None, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self._path = Path(path)
        self._reactor = reactor
        self._threadpool = threadpool
        self._snapshot = _Snapshot()
        self._missing_logged = False
        self._verifying = defer.DeferredSemaphore(MAX_CONCURRENT_VERIFICATIONS)

    def requestAvatarId(self, credentials) -> defer.Deferred:
        password = _as_bytes(credentials.password)
        if not password:
            # An empty password never logs in (and costs nothing: no file, no hash).
            return defer.fail(UnauthorizedLogin())
        try:
            users = self._users()
        except OSError as e:
            self.log.error("cannot read password file {file}: {error}", file=str(self._path),
                           error=e.strerror)
            return defer.fail(TemporaryAuthFailure("password file unreadable"))
        user = _as_text(credentials.username)
        known = users.get(user) if user is not None else None
        # An unknown user still costs one full verification, against another user's hash (the
        # result is ignored), so response time does not tell which names exist (enumeration by
        # timing).  With no users at all there is nothing to tell apart.
        target = known or next(iter(users.values()), None)
        if target is None:
            return defer.fail(UnauthorizedLogin())
        pool = self._threadpool or self._reactor.getThreadPool()
        d = self._verifying.run(deferToThreadPool, self._reactor, pool, verify_password, target, password)
        d.addCallback(self._outcome, user if known else None)
        return d

    @staticmethod
    def _outcome(ok: bool, user: Optional[str]) -> str:
        if not ok or user is None:
            raise UnauthorizedLogin()
        return user

    def _users(self) -> dict[str, str]:
        """The current entries, re-read only when the file's stamp changed."""
        try:
            stamp = _Stamp.of(os.stat(self._path))
        except FileNotFoundError:
            if not self._missing_logged:
                self.log.warn("password file {file} does not exist: no user can log in",
                              file=str(self._path))
                self._missing_logged = True
            self._snapshot = _Snapshot()
            return {}
        self._missing_logged = False
        if stamp != self._snapshot.stamp:
            self._snapshot = self._read()
        return self._snapshot.users

    def _read(self) -> _Snapshot:
        # Stamp and contents come from the same open file, so a replacement between the stat and
        # the read cannot pair old contents with the new stamp.
        with open(self._path, "rb") as f:
            stamp = _Stamp.of(os.fstat(f.fileno()))
            data = f.read()
        users = parse_password_file(data, str(self._path), self.log)
        self.log.info("password file {file} loaded: {count} users", file=str(self._path),
                      count=len(users))
        return _Snapshot(stamp, users)


def _as_bytes(value) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value or b"")


def _as_text(value) -> Optional[str]:
    if isinstance(value, str):
        return value
    try:
        return bytes(value or b"").decode("utf-8")
    except UnicodeDecodeError:
        return None


def set_password(path: Path, user: str, password: str) -> None:
    """Add or replace `user`'s entry with a new argon2id hash, keeping every other line and comment.

    The file is rewritten atomically: a temporary file in the same directory (mode 0600), fsync,
    rename over the old one, fsync of the directory.  Raises ValueError for an unusable user name or
    an empty password, OSError when the file cannot be written."""
    if not valid_user_name(user):
        raise ValueError("user name must not be empty or contain ':', whitespace or control characters")
    if not password:
        raise ValueError("empty password")
    path = Path(path)
    entry = f"{user}:{hash_password(password)}"
    try:
        old = path.read_bytes().decode("utf-8", "surrogateescape").splitlines()
    except FileNotFoundError:
        old = []
    _atomic_write(path, "".join(line + "\n" for line in _replace_entry(old, user, entry)))


def _replace_entry(lines: list[str], user: str, entry: str) -> list[str]:
    """The first line for `user` becomes `entry`, later ones go; no line for `user`: appended."""
    out, done = [], False
    for line in lines:
        if line.strip().partition(":")[0] == user:     # a comment starts with '#', never a user
            if not done:
                out.append(entry)
            done = True
        else:
            out.append(line)
    if not done:
        out.append(entry)
    return out


def _atomic_write(path: Path, text: str) -> None:
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            os.fchmod(f.fileno(), 0o600)
            _keep_owner(f.fileno(), path)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _keep_owner(fd: int, path: Path) -> None:
    """When root edits the relay's file, the relay must still be able to read it afterwards."""
    try:
        st = os.stat(path)
        os.fchown(fd, st.st_uid, st.st_gid)
    except (FileNotFoundError, PermissionError):
        pass
