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


