# -*- test-case-name: tests.test_config_reference -*-
"""The reader: typed access to one TOML table that knows its key path.

Part of the first stage of the journey (mailrelay.config).  In: a parsed TOML table, the config file's
name and directory, and the table's key path ("permit[1]").  Out: typed values (strings, integers,
flags, choices, durations, sizes, endpoints, patterns, paths, sub-tables), each refused with a
ConfigError naming the full key path; `close()` refuses any key nobody asked for (a typo).
"""
from __future__ import annotations

import difflib
import os
import stat
from pathlib import Path
from typing import Any, Literal, NoReturn, Optional, overload

from mailrelay.config.model import ConfigError
from mailrelay.config.values import _domain_pattern, _is_number, parse_duration, parse_size

_MISSING = object()


def _kind(value: Any) -> str:
    for types, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                        (list, "an array"), (dict, "a table")):
        if isinstance(value, types):
            return name
    return f"a {type(value).__name__}"   # TOML dates and times


class _Reader:
    """One TOML table at a key path ("permit[1]").  Every getter names the full key in its errors and
    remembers the key as known; `close()` then refuses any key nobody asked for (a typo)."""

    def __init__(self, file: str, base: Path, path: str, data: dict, skip_files: tuple[str, ...] = ()):
        """`skip_files`: tables ("tls", "auth") whose files are not opened to prove them (the delivery
        process never reads them: one gone since the relay started must not stop delivery)."""
        self.file, self.base, self.prefix, self.data = file, base, path, data
        self.skip_files = skip_files
        self.seen: set[str] = set()

    def checks_files(self) -> bool:
        """False inside a table of `skip_files`."""
        return not any(self.prefix == p or self.prefix.startswith((p + ".", p + "[")) for p in self.skip_files)

    def where(self, key: str | None) -> str:
        if key is None:
            return self.prefix
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str | None, message: str) -> NoReturn:
        raise ConfigError(self.file, self.where(key), message)

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, check, expected: str) -> Any:
        """The raw value of `key` (or _MISSING) if `check(value)`, else a type error."""
        self.seen.add(key)
        value = self.data.get(key, _MISSING)
        if value is not _MISSING and not check(value):
            self.fail(key, f"expected {expected}, got {_kind(value)}")
        return value

    def child(self, path: str, data: dict) -> "_Reader":
        return _Reader(self.file, self.base, path, data, self.skip_files)

    def close(self) -> None:
        for key in self.data:
            if key not in self.seen:
                hint = difflib.get_close_matches(key, sorted(self.seen), n=1)
                self.fail(key, "unknown key" + (f' (did you mean "{hint[0]}"?)' if hint else ""))

    # --- scalars

    # A str default, or required=True, gives a str; otherwise the value may be missing (None).
    @overload
    def text(self, key: str, default: str, required: bool = False) -> str: ...
    @overload
    def text(self, key: str, default: None = None, *, required: Literal[True]) -> str: ...
    @overload
    def text(self, key: str, default: Optional[str] = None, required: bool = False) -> Optional[str]: ...

    def text(self, key: str, default: Optional[str] = None, required: bool = False) -> Optional[str]:
        value = self.get(key, lambda v: isinstance(v, str), "a string")
        if value is _MISSING:
            if required:
                self.fail(key, "missing (required)")
            return default
        return value

    def integer(self, key: str, default: int, low: int = 0, high: Optional[int] = None) -> int:
        # TOML booleans are not integers here, though Python's bool is an int subclass.
        value = self.get(key, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
        if value is _MISSING:
            return default
        if value < low or (high is not None and value > high):
            self.fail(key, f"{value} is out of range: " + (f"{low}..{high}" if high is not None else f"at least {low}"))
        return value

    def port(self, key: str, default: int) -> int:
        return self.integer(key, default, 1, 65535)

    @overload
    def flag(self, key: str, default: bool) -> bool: ...
    @overload
    def flag(self, key: str, default: None) -> Optional[bool]: ...

    def flag(self, key: str, default: Optional[bool]) -> Optional[bool]:
        value = self.get(key, lambda v: isinstance(v, bool), "true or false")
        return default if value is _MISSING else value

    def choice(self, key: str, default: Optional[str], choices: tuple[str, ...]) -> str:
        value = self.text(key, default, required=default is None)
        if value not in choices:
            self.fail(key, f'"{value}" is not one of ' + ", ".join(f'"{c}"' for c in choices))
        return value

    def duration(self, key: str, default: float, allow_zero: bool = False) -> float:
        value = self.get(key, lambda v: isinstance(v, str) or _is_number(v), 'a duration like "5m"')
        if value is _MISSING:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            self.fail(key, str(e))
        if seconds == 0 and not allow_zero:
            self.fail(key, "must be more than 0")
        return seconds

    def size(self, key: str, default: int) -> int:
        value = self.get(key, lambda v: isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)),
                         'a size like "50MiB" or bytes')
        if value is _MISSING:
            return default
        try:
            size = parse_size(value)
        except ValueError as e:
            self.fail(key, str(e))
        if size == 0:
            self.fail(key, "must be more than 0")
        return size

    @overload
    def endpoint(self, key: str, default: str) -> str: ...
    @overload
    def endpoint(self, key: str, default: None) -> Optional[str]: ...

    def endpoint(self, key: str, default: Optional[str]) -> Optional[str]:
        """A Twisted server endpoint string, parsed (not listened on) to catch mistakes now."""
        from twisted.internet.endpoints import serverFromString
        value = self.text(key, default)
        if value is None:
            return None
        try:
            parsed = serverFromString(object(), value)   # the endpoint only keeps the reactor until listen()
        except Exception as e:   # ValueError, TypeError, KeyError, OSError: each plugin parses its own way
            self.fail(key, f'bad endpoint "{value}": {e}')
        port = getattr(parsed, "_port", None)
        if isinstance(port, int) and not 0 <= port <= 65535:
            self.fail(key, f'bad endpoint "{value}": port {port} is out of range')
        return value

    # --- lists

    def texts(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """A string or an array of strings, as a tuple."""
        value = self.get(key, lambda v: isinstance(v, (str, list)), "a string or an array of strings")
        if value is _MISSING:
            return default
        items = [value] if isinstance(value, str) else value
        for i, item in enumerate(items):
            if not isinstance(item, str):
                self.fail(f"{key}[{i}]", f"expected a string, got {_kind(item)}")
        return tuple(items)

    def patterns(self, key: str, addresses: bool) -> tuple[str, ...]:
        """Domain (or address) match patterns; default "*"."""
        items = self.texts(key, ("*",))
        if not items:
            self.fail(key, 'empty; write ["*"] for any, or leave the key out')
        result = []
        for i, item in enumerate(items):
            try:
                result.append(_domain_pattern(item, addresses))
            except ValueError as e:
                self.fail(f"{key}[{i}]", str(e))
        return tuple(result)

    # --- paths

    @overload
    def path(self, key: str, default: Path, readable: bool = False, allow_empty: bool = False) -> Path: ...
    @overload
    def path(self, key: str, default: None = None, readable: bool = False,
             allow_empty: bool = False) -> Optional[Path]: ...

    def path(self, key: str, default: Optional[Path] = None, readable: bool = False,
             allow_empty: bool = False) -> Optional[Path]:
        """A path relative to the config file's directory; with `readable`, opened once to prove it."""
        value = self.text(key)
        if value is None or (allow_empty and value == ""):
            return default
        if not value.strip() or "\0" in value:
            self.fail(key, "empty path" if not value.strip() else "NUL in path")
        path = self.base / value     # an absolute value replaces the base
        if readable and self.checks_files():
            problem = _unreadable(path)
            if problem:
                self.fail(key, f"cannot read {path}: {problem}")
        return path

    # --- nested tables

    def table(self, key: str) -> "_Reader":
        """The sub-table `key` (empty when absent)."""
        value = self.get(key, lambda v: isinstance(v, dict), f"a table ([{self.where(key)}])")
        return self.child(self.where(key), {} if value is _MISSING else value)

    def tables(self, key: str) -> Optional[list["_Reader"]]:
        """The array of tables `key` ([[key]]), or None when absent."""
        value = self.get(key, lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v),
                         f"an array of tables ([[{self.where(key)}]])")
        if value is _MISSING:
            return None
        return [self.child(f"{self.where(key)}[{i}]", t) for i, t in enumerate(value)]


def _unreadable(path: Path) -> Optional[str]:
    """Why `path` cannot be read as a regular file, or None.  Opened non-blocking and never read here:
    a FIFO or a device named by mistake must not hang the start."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return e.strerror
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if stat.S_ISDIR(mode):
        return "is a directory"
    return None if stat.S_ISREG(mode) else "not a regular file"


def _closed(reader: _Reader, value):
    reader.close()
    return value
