# -*- test-case-name: tests.test_config, tests.test_logger, tests.test_routes -*-
"""Values inside tap.conf keys: durations, sizes, host:port and domain match patterns.

Part of the first stage of the journey (mailrelay.config).  In: one raw TOML value (a string or a
number).  Out: the typed value (seconds, bytes, ("host", port), a normalised pattern) or ValueError
with a message fit for a one-line ConfigError.  Also the syntax checks for our own hostname
(RFC 5321 §4.1.2) and DKIM selectors (RFC 6376 §3.1).
"""
from __future__ import annotations

import math
import re
from typing import Any

from mailrelay import idn

# --- values: durations, sizes, host:port ------------------------------------------------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_duration(value: str | int | float) -> float:
    """Seconds from "90s", "5m", "4h", "5d", "1h30m", "0" or a number of seconds; ValueError if bad."""
    if _is_number(value):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.replace(" ", "").lower()
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif text and _DURATION_PART.sub("", text) == "":
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
        else:
            raise ValueError(f'bad duration "{value}": use e.g. "90s", "5m", "4h", "5d" or seconds')
    else:
        raise ValueError(f'bad duration {value!r}: use e.g. "90s", "5m", "4h", "5d" or seconds')
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"bad duration {value!r}: must be a finite number of seconds, 0 or more")
    return seconds


def parse_size(value: str | int) -> int:
    """Bytes from "50MiB", "10MB", "512KiB", "1GiB", "2048" or an int; ValueError if bad."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip().lower())
        if not match or match.group(2) not in _SIZE_UNITS:
            raise ValueError(f'bad size "{value}": use e.g. "50MiB", "10MB", "512KiB" or bytes')
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    else:
        raise ValueError(f'bad size {value!r}: use e.g. "50MiB", "10MB", "512KiB" or bytes')
    if size < 0:
        raise ValueError(f"bad size {value!r}: must be 0 or more")
    return size


def parse_host_port(value: str, default_port: int) -> tuple[str, int]:
    """("host", port) from "host", "host:port", "[v6]:port", "[v6]" or a bare IPv6 address."""
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f'bad address "{value}": expected "[IPv6]" or "[IPv6]:port"')
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:                                   # "host" or a bare IPv6 address ("::1")
        host, port_text = text, None
    if not host or any(c.isspace() for c in host):
        raise ValueError(f'bad address "{value}": no host')
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f'bad address "{value}": the port must be 1..65535')
    return host, int(port_text)


# Domain syntax of RFC 5321 §4.1.2 (letters, digits, hyphens; dot-separated), for our own hostname: it
# goes verbatim into the banner, EHLO and Received lines, so nothing else may get in (no CR/LF, no space).
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_DOMAIN = re.compile(r"[\w-]+(\.[\w-]+)*")          # a match pattern: IDNs allowed, no spaces or "@"
_SELECTOR = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")   # RFC 6376 §3.1 selector


def domain_text(text: str) -> bool:
    """Whether `text` looks like a domain: ASCII by the pattern above; a U-label domain is judged by
    IDNA (ascii_domain), whose rules (combining marks, joiners, bidi) no regular expression states."""
    return bool(_DOMAIN.fullmatch(text)) if text.isascii() else bool(text) and not any(
        c.isspace() or c in "@,;<>()[]\\\"" for c in text)


def ascii_domain(text: str) -> str:
    """A domain as it is stored: lower case, an internationalised one as IDNA2008 A-labels (written as
    U-labels or A-labels in the file: RFC 5890, one domain); ValueError naming what IDNA refuses."""
    return idn.to_ascii(text)


def _domain_pattern(text: str, addresses: bool) -> str:
    """A normalised "*", "example.org", "*.example.org" (or "user@example.org"), its domain as A-labels;
    ValueError if bad."""
    text = text.strip()
    if text == "*":
        return text
    local, at, domain = text.rpartition("@")
    if at and not addresses:
        raise ValueError(f'"{text}" is an address; only domains ("example.org", "*.example.org", "*") here')
    if at and (not local or any(c.isspace() for c in local)):
        raise ValueError(f'bad pattern "{text}": write "example.org" for the whole domain')
    bare = domain[2:] if domain.startswith("*.") else domain
    if not domain_text(bare):
        raise ValueError(f'bad pattern "{text}": expected "*", "example.org", "*.example.org"'
                         + (' or "user@example.org"' if addresses else ""))
    domain = ("*." if domain.startswith("*.") else "") + ascii_domain(bare)
    return f"{local}@{domain}" if at else domain
