"""tap.conf: the configuration contract (../shared/spec/config.md) as typed, immutable objects.

First stage of the journey: everything the relay does is decided by one `Config`, loaded once at start
(and again on SIGHUP) from a TOML file.  In: a path.  Out: a frozen `Config`, or `ConfigError`, whose
`str()` is one line naming the file, the key path (`route[2].transport`) and what is wrong.

Durations: "90s", "5m", "4h", "5d" or bare seconds.  Sizes: "50MiB", "10MB", "512KiB" or bytes.
Relative paths are resolved against the directory of the config file.  Files the relay must read at
start (TLS certificate and key, DKIM keys, LDAP CA and secret, transport secrets and CAs) are opened
here, so a typo is refused at start and not at the first message.  `auth.password_file` is not:
`mailrelay passwd` creates it.
"""
from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, NoReturn, Optional

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A config problem: `file: key: message`, one line."""

    def __init__(self, file: str, key: str, message: str):
        message = " ".join(str(message).split())   # one line, whatever tomllib or the OS said
        self.file, self.key, self.message = str(file), key, message
        super().__init__(f"{self.file}: {key}: {message}" if key else f"{self.file}: {message}")


@dataclass(frozen=True)
class TLSConfig:
    cert: Optional[Path] = None
    key: Optional[Path] = None


LISTENER_KINDS = ("relay", "submission", "submissions")


@dataclass(frozen=True)
class Listener:
    kind: str                  # one of LISTENER_KINDS
    endpoint: str              # Twisted server endpoint string, e.g. "tcp:587:interface=127.0.0.1"
    require_tls: bool = False  # always True for "submission"; ignored for "submissions"


DEFAULT_LISTENERS = (
    Listener("relay", "tcp:25", False),
    Listener("submission", "tcp:587", True),
    Listener("submissions", "tcp:465", False),
)


@dataclass(frozen=True)
class Limits:
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    messages_per_minute: int = 0
    auth_failures_per_minute: int = 5
    idle_timeout: float = 300.0
    session_timeout: float = 1800.0   # added key: an overall deadline per connection


@dataclass(frozen=True)
class LDAPConfig:
    urls: tuple[str, ...]
    starttls: bool = False
    ca_file: Optional[Path] = None
    timeout: float = 5.0
    bind_dn: Optional[str] = None
    search_base: Optional[str] = None
    search_filter: Optional[str] = None
    service_dn: Optional[str] = None
    service_password_file: Optional[Path] = None
    require_group: Optional[str] = None
    cache: float = 300.0


@dataclass(frozen=True)
class AuthConfig:
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    password_file: Optional[Path] = None
    ldap: Optional[LDAPConfig] = None


@dataclass(frozen=True)
class Permit:
    networks: tuple[IPNetwork, ...] = ()
    users: tuple[str, ...] = ()
    anyone: bool = False
    senders: tuple[str, ...] = ("*",)
    recipients: tuple[str, ...] = ("*",)
    check_from_header: bool = True


# With no [[permit]] at all: authenticated users may relay anything, nobody else may relay.
DEFAULT_PERMITS = (Permit(users=("*",)),)


@dataclass(frozen=True)
class DKIMKey:
    domain: str
    selector: str
    key_file: Path


@dataclass(frozen=True)
class DKIMConfig:
    mode: str = "sign"                  # "sign" | "passthrough"
    keys: tuple[DKIMKey, ...] = ()
    verify: bool = False                # added key: check incoming signatures, add Authentication-Results
    headers: tuple[str, ...] = ()       # added key: header fields to sign; () = the default list
    expire: float = 0.0                 # added key: x= this long after signing; 0 = no x= tag


@dataclass(frozen=True)
class QueueConfig:
    first_retry: float = 300.0
    max_retry: float = 4 * 3600.0
    lifetime: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0   # 0 = never
    bounces: bool = True


TLS_POLICIES = ("none", "opportunistic", "required", "verify")


@dataclass(frozen=True)
class DeliveryConfig:
    tls: str = "opportunistic"
    concurrency: int = 100
    concurrency_per_domain: int = 10
    mx_port: int = 25
    nameservers: tuple[tuple[str, int], ...] = ()   # ("127.0.0.1", 5353); empty: system resolver
    source_address: str = ""
    process: str = "inline"     # added key: "separate" runs delivery in a second process (a second core)


TRANSPORT_SECURITY = ("starttls", "tls", "none")


@dataclass(frozen=True)
class Transport:
    name: str
    host: str
    port: int = 587
    security: str = "starttls"
    verify: bool = True
    username: Optional[str] = None
    password_file: Optional[Path] = None
    ca_file: Optional[Path] = None      # added key: trust these CAs instead of the system store


@dataclass(frozen=True)
class Route:
    transport: str
    recipients: tuple[str, ...] = ("*",)
    senders: tuple[str, ...] = ("*",)
    after_attempts: int = 0


@dataclass(frozen=True)
class MetricsConfig:
    endpoint: Optional[str] = None      # absent: off
    delivery_endpoint: Optional[str] = None   # added key: the delivery process's metrics ([delivery] process)


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"                # "text" | "json"
    file: str = ""


@dataclass(frozen=True)
class SendmailConfig:
    server: str = "127.0.0.1:587"
    security: str = "starttls"
    verify: bool = True
    username: Optional[str] = None
    password_file: Optional[Path] = None
    ca_file: Optional[Path] = None      # added key: trust these CAs instead of the system store


@dataclass(frozen=True)
class Config:
    path: Path
    hostname: str
    spool: Path
    tls: TLSConfig = TLSConfig()
    listeners: tuple[Listener, ...] = DEFAULT_LISTENERS
    limits: Limits = Limits()
    auth: AuthConfig = AuthConfig()
    permits: tuple[Permit, ...] = DEFAULT_PERMITS
    dkim: DKIMConfig = DKIMConfig()
    queue: QueueConfig = QueueConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    transports: Mapping[str, Transport] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    sendmail: SendmailConfig = SendmailConfig()


DKIM_MODES = ("sign", "passthrough")
DELIVERY_PROCESS = ("inline", "separate")
LOG_FORMATS = ("text", "json")
AUTH_MECHANISMS = ("PLAIN", "LOGIN")   # password mechanisms; offered only over TLS (RFC 4954 §4)
DEFAULT_ENDPOINTS = {"relay": "tcp:25", "submission": "tcp:587", "submissions": "tcp:465"}
DEFAULT_TRANSPORT_PORTS = {"starttls": 587, "tls": 465, "none": 25}


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


def _domain_pattern(text: str, addresses: bool) -> str:
    """A normalised "*", "example.org", "*.example.org" (or "user@example.org"); ValueError if bad."""
    text = text.strip()
    if text == "*":
        return text
    local, at, domain = text.rpartition("@")
    if at and not addresses:
        raise ValueError(f'"{text}" is an address; only domains ("example.org", "*.example.org", "*") here')
    if at and (not local or any(c.isspace() for c in local)):
        raise ValueError(f'bad pattern "{text}": write "example.org" for the whole domain')
    bare = domain[2:] if domain.startswith("*.") else domain
    if not _DOMAIN.fullmatch(bare):
        raise ValueError(f'bad pattern "{text}": expected "*", "example.org", "*.example.org"'
                         + (' or "user@example.org"' if addresses else ""))
    return f"{local}@{domain.lower()}" if at else domain.lower()


# --- the reader: typed access to one TOML table that knows its key path ------------------------------

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

    def __init__(self, file: str, base: Path, path: str, data: dict):
        self.file, self.base, self.prefix, self.data = file, base, path, data
        self.seen: set[str] = set()

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
        return _Reader(self.file, self.base, path, data)

    def close(self) -> None:
        for key in self.data:
            if key not in self.seen:
                hint = difflib.get_close_matches(key, sorted(self.seen), n=1)
                self.fail(key, "unknown key" + (f' (did you mean "{hint[0]}"?)' if hint else ""))

    # --- scalars

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

    def flag(self, key: str, default: bool) -> bool:
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

    def path(self, key: str, default: Optional[Path] = None, readable: bool = False,
             allow_empty: bool = False) -> Optional[Path]:
        """A path relative to the config file's directory; with `readable`, opened once to prove it."""
        value = self.text(key)
        if value is None or (allow_empty and value == ""):
            return default
        if not value.strip() or "\0" in value:
            self.fail(key, "empty path" if not value.strip() else "NUL in path")
        path = self.base / value     # an absolute value replaces the base
        if readable:
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


# --- the sections, one function each ----------------------------------------------------------------

def _hostname(root: _Reader) -> str:
    name = root.text("hostname")
    if name is None:
        return socket.getfqdn()
    if not _HOSTNAME.fullmatch(name):
        root.fail("hostname", f'"{name}" is not a host name (it is used in the banner, EHLO and Received)')
    return name


def _tls(t: _Reader) -> TLSConfig:
    cert, key = t.path("cert", readable=True), t.path("key", readable=True)
    if (cert is None) != (key is None):
        t.fail("key" if key is None else "cert", "give both cert and key, or neither (self-signed)")
    if cert is not None:
        from mailrelay.tls import server_options   # loads the pair now: a mismatch is refused at start
        try:
            server_options(cert, key)
        except ValueError as e:
            t.fail("cert", str(e))
    return _closed(t, TLSConfig(cert, key))


def _listener(t: _Reader, seen: dict[str, str]) -> Listener:
    kind = t.choice("kind", None, LISTENER_KINDS)
    endpoint = t.endpoint("endpoint", DEFAULT_ENDPOINTS[kind])
    if endpoint in seen:
        t.fail("endpoint", f'"{endpoint}" is already used by {seen[endpoint]}')
    seen[endpoint] = t.prefix
    require_tls = t.flag("require_tls", kind == "submission")
    if kind == "submission" and not require_tls:
        # RFC 8314 §3.3 / RFC 4954 §4: submission needs TLS before AUTH; use kind = "relay" to allow plaintext.
        t.fail("require_tls", 'is always true on a "submission" listener; use kind = "relay" for plaintext')
    return _closed(t, Listener(kind, endpoint, require_tls))


def _listeners(tables: Optional[list[_Reader]], root: _Reader) -> tuple[Listener, ...]:
    if tables is None:
        return DEFAULT_LISTENERS
    if not tables:
        root.fail("listen", "empty; leave it out for the default listeners (ports 25, 587, 465)")
    seen: dict[str, str] = {}
    return tuple(_listener(t, seen) for t in tables)


def _limits(t: _Reader) -> Limits:
    d = Limits()
    return _closed(t, Limits(
        max_message_size=t.size("max_message_size", d.max_message_size),
        max_recipients=t.integer("max_recipients", d.max_recipients, low=1),
        max_connections=t.integer("max_connections", d.max_connections, low=1),
        max_connections_per_ip=t.integer("max_connections_per_ip", d.max_connections_per_ip, low=1),
        messages_per_minute=t.integer("messages_per_minute", d.messages_per_minute),
        auth_failures_per_minute=t.integer("auth_failures_per_minute", d.auth_failures_per_minute, low=1),
        idle_timeout=t.duration("idle_timeout", d.idle_timeout),
        session_timeout=t.duration("session_timeout", d.session_timeout),
    ))


def _ldap(t: _Reader) -> LDAPConfig:
    urls = t.texts("url", ())
    if not urls:
        t.fail("url", "missing (required): an ldap:// or ldaps:// URL, or a list of them")
    for i, url in enumerate(urls):
        if not url.lower().startswith(("ldap://", "ldaps://")):
            t.fail(f"url[{i}]" if not isinstance(t.data["url"], str) else "url",
                   f'"{url}" is not an ldap:// or ldaps:// URL')
    bind_dn, base, search = t.text("bind_dn"), t.text("search_base"), t.text("search_filter")
    service_dn, secret = t.text("service_dn"), t.path("service_password_file", readable=True)
    if bind_dn is None and base is None and search is None:
        t.fail(None, "needs bind_dn (direct bind), or search_base and search_filter (search, then bind)")
    if (base is None) != (search is None):
        t.fail("search_filter" if search is None else "search_base", "search_base and search_filter go together")
    for key, value in (("bind_dn", bind_dn), ("search_filter", search)):
        if value is not None and "{user}" not in value:
            t.fail(key, 'must contain "{user}", where the login name goes (escaped)')
    if service_dn is not None and secret is None:
        t.fail("service_password_file", "required with service_dn")
    if secret is not None and service_dn is None:
        t.fail("service_dn", "required with service_password_file")
    return _closed(t, LDAPConfig(
        urls=urls,
        starttls=t.flag("starttls", False),
        ca_file=t.path("ca_file", readable=True),
        timeout=t.duration("timeout", 5.0),
        bind_dn=bind_dn, search_base=base, search_filter=search,
        service_dn=service_dn, service_password_file=secret,
        require_group=t.text("require_group"),
        cache=t.duration("cache", 300.0, allow_zero=True),
    ))


def _auth(t: _Reader) -> AuthConfig:
    mechanisms = []
    for i, name in enumerate(t.texts("mechanisms", AUTH_MECHANISMS)):
        if name.upper() not in AUTH_MECHANISMS:
            t.fail(f"mechanisms[{i}]", f'"{name}" is not one of ' + ", ".join(AUTH_MECHANISMS))
        if name.upper() not in mechanisms:
            mechanisms.append(name.upper())
    ldap = _ldap(t.table("ldap")) if t.has("ldap") else None
    return _closed(t, AuthConfig(tuple(mechanisms), t.path("password_file"), ldap))


def _networks(t: _Reader) -> tuple[IPNetwork, ...]:
    result = []
    for i, text in enumerate(t.texts("networks", ())):
        try:
            result.append(ipaddress.ip_network(text.strip(), strict=False))   # host bits allowed: 10.1.2.3/8
        except ValueError:
            t.fail(f"networks[{i}]", f'bad network "{text}": expected an address or CIDR like "10.0.0.0/8"')
    return tuple(result)


def _permit(t: _Reader) -> Permit:
    # Never an open relay by accident: each rule says exactly one "who".
    anyone = t.flag("anyone", False)
    who = [k for k in ("networks", "users") if t.has(k)] + (["anyone"] if anyone else [])
    if not who:
        t.fail(None, 'no "who": give one of networks = [...], users = [...] or anyone = true')
    if len(who) > 1:
        t.fail(None, f"has both {who[0]} and {who[1]}; one who per rule (write two [[permit]] rules)")
    networks, users = _networks(t), t.texts("users", ())
    if who[0] in ("networks", "users") and not (networks or users):
        t.fail(who[0], "empty")
    return _closed(t, Permit(
        networks=networks, users=users, anyone=anyone,
        senders=t.patterns("senders", addresses=True),
        recipients=t.patterns("recipients", addresses=False),
        check_from_header=t.flag("check_from_header", True),
    ))


def _dkim_key(t: _Reader) -> DKIMKey:
    domain = t.text("domain", required=True)
    selector = t.text("selector", required=True)
    if not _DOMAIN.fullmatch(domain):
        t.fail("domain", f'"{domain}" is not a domain')
    if not _SELECTOR.fullmatch(selector):
        t.fail("selector", f'"{selector}" is not a DKIM selector (RFC 6376 §3.1)')
    key_file = t.path("key_file", readable=True)
    if key_file is None:
        t.fail("key_file", "missing (required)")
    problem = _dkim_key_problem(key_file)
    if problem:
        t.fail("key_file", problem)
    return _closed(t, DKIMKey(domain.lower(), selector, key_file))


def _dkim_key_problem(path: Path) -> Optional[str]:
    from mailrelay.dkim.keys import KeyError_, load_private_key   # RSA >= 1024 (RFC 8301 3.2) or Ed25519

    try:
        load_private_key(path)
    except KeyError_ as e:
        return str(e)
    return None


def _dkim(t: _Reader) -> DKIMConfig:
    mode = t.choice("mode", "sign", DKIM_MODES)
    keys, seen = [], set()
    for k in t.tables("key") or ():
        key = _dkim_key(k)
        if (key.domain, key.selector) in seen:
            k.fail("selector", f'a second key for {key.selector}._domainkey.{key.domain}')
        seen.add((key.domain, key.selector))
        keys.append(key)
    headers = tuple(h.lower() for h in t.texts("headers", ()))
    if headers and "from" not in headers:
        t.fail("headers", 'must include "From" (RFC 6376 5.4)')
    return _closed(t, DKIMConfig(
        mode, tuple(keys),
        verify=t.flag("verify", False),
        headers=headers,
        expire=t.duration("expire", 0.0, allow_zero=True),
    ))


def _queue(t: _Reader) -> QueueConfig:
    d = QueueConfig()
    first = t.duration("first_retry", d.first_retry)
    most = t.duration("max_retry", max(d.max_retry, first))
    if most < first:
        t.fail("max_retry", "is shorter than first_retry")
    return _closed(t, QueueConfig(
        first_retry=first, max_retry=most,
        lifetime=t.duration("lifetime", d.lifetime),
        delay_warning=t.duration("delay_warning", d.delay_warning, allow_zero=True),   # 0 = never
        bounces=t.flag("bounces", d.bounces),
    ))


def _delivery(t: _Reader) -> DeliveryConfig:
    d = DeliveryConfig()
    nameservers = []
    for i, text in enumerate(t.texts("nameservers", ())):
        try:
            nameservers.append(parse_host_port(text, 53))
        except ValueError as e:
            t.fail(f"nameservers[{i}]", str(e))
    source = t.text("source_address", "").strip()
    if source:
        try:
            ipaddress.ip_address(source)
        except ValueError:
            t.fail("source_address", f'"{source}" is not an IP address')
    return _closed(t, DeliveryConfig(
        tls=t.choice("tls", d.tls, TLS_POLICIES),
        concurrency=t.integer("concurrency", d.concurrency, low=1),
        concurrency_per_domain=t.integer("concurrency_per_domain", d.concurrency_per_domain, low=1),
        mx_port=t.port("mx_port", d.mx_port),
        nameservers=tuple(nameservers),
        source_address=source,
        process=t.choice("process", d.process, DELIVERY_PROCESS),
    ))


def _transport(name: str, t: _Reader) -> Transport:
    security = t.choice("security", "starttls", TRANSPORT_SECURITY)
    host = t.text("host", required=True).strip()
    if not host or any(c.isspace() for c in host):
        t.fail("host", f'"{host}" is not a host name')
    username = t.text("username")
    password_file = t.path("password_file", readable=True)
    if username is not None and password_file is None:
        t.fail("password_file", "required with username (a file holding the password)")
    if password_file is not None and username is None:
        t.fail("username", "required with password_file")
    return _closed(t, Transport(
        name=name, host=host,
        port=t.port("port", DEFAULT_TRANSPORT_PORTS[security]),
        security=security,
        verify=t.flag("verify", True),
        username=username, password_file=password_file,
        ca_file=t.path("ca_file", readable=True),
    ))


def _transports(t: _Reader) -> dict[str, Transport]:
    transports = {name: _transport(name, t.table(name)) for name in list(t.data)}
    return _closed(t, transports)


def _route(t: _Reader, transports: Mapping[str, Transport]) -> Route:
    name = t.text("transport", required=True)
    if name not in transports:
        defined = ", ".join(sorted(transports)) or "none; add a [transports.NAME] table"
        t.fail("transport", f'no transport named "{name}" (defined: {defined})')
    return _closed(t, Route(
        transport=name,
        recipients=t.patterns("recipients", addresses=False),
        senders=t.patterns("senders", addresses=True),
        after_attempts=t.integer("after_attempts", 0),
    ))


def _metrics(t: _Reader) -> MetricsConfig:
    return _closed(t, MetricsConfig(t.endpoint("endpoint", None), t.endpoint("delivery_endpoint", None)))


def _log(t: _Reader) -> LogConfig:
    file = t.path("file", allow_empty=True)   # "" (the default): twistd's own log
    return _closed(t, LogConfig(t.choice("format", "text", LOG_FORMATS), str(file) if file else ""))


def _sendmail(t: _Reader) -> SendmailConfig:
    d = SendmailConfig()
    server = t.text("server", d.server)
    security = t.choice("security", d.security, TRANSPORT_SECURITY)
    try:
        parse_host_port(server, DEFAULT_TRANSPORT_PORTS[security])
    except ValueError as e:
        t.fail("server", str(e))
    return _closed(t, SendmailConfig(
        server=server, security=security,
        verify=t.flag("verify", d.verify),
        username=t.text("username"),
        # Read by mailrelay-sendmail when it runs (often on another host), not checked here.
        password_file=t.path("password_file"),
        ca_file=t.path("ca_file"),
    ))


def _read_toml(file: str) -> dict:
    try:
        with open(file, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(file, "", f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(file, "", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, "", f"TOML syntax error: {e}") from None


def load(path: str | Path) -> Config:
    """Read and validate a tap.conf; raise ConfigError (one line) on any problem."""
    file = str(path)
    absolute = Path(os.path.abspath(file))
    root = _Reader(file, absolute.parent, "", _read_toml(file))
    hostname = _hostname(root)
    transports = _transports(root.table("transports"))
    permits = root.tables("permit")
    config = Config(
        path=absolute,
        hostname=hostname,
        spool=root.path("spool", absolute.parent / "spool"),
        tls=_tls(root.table("tls")),
        listeners=_listeners(root.tables("listen"), root),
        limits=_limits(root.table("limits")),
        auth=_auth(root.table("auth")),
        permits=tuple(_permit(t) for t in permits) if permits else DEFAULT_PERMITS,
        dkim=_dkim(root.table("dkim")),
        queue=_queue(root.table("queue")),
        delivery=_delivery(root.table("delivery")),
        transports=MappingProxyType(transports),
        routes=tuple(_route(t, transports) for t in root.tables("route") or ()),
        metrics=_metrics(root.table("metrics")),
        log=_log(root.table("log")),
        sendmail=_sendmail(root.table("sendmail")),
    )
    root.close()
    return config
