# -*- test-case-name: tests.test_config, tests.test_logger, tests.test_routes -*-
"""What a loaded tap.conf is: the frozen dataclasses, their defaults and the allowed values.

Part of the first stage of the journey (mailrelay.config).  In: nothing; this module only declares.
Out: `Config` and its sections, each a frozen dataclass whose defaults are the contract's
(docs/config.md), the tuples of allowed values the sections are checked against, and
`ConfigError`, the one-line refusal every stage of loading raises.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

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


LISTENER_KINDS = ("relay", "submission", "submissions", "http")


@dataclass(frozen=True)
class Listener:
    kind: str                  # one of LISTENER_KINDS
    endpoint: str              # Twisted server endpoint string, e.g. "tcp:587:interface=127.0.0.1"
    require_tls: bool = False  # always True for "submission"; ignored for "submissions"
    proxy_protocol: bool = False   # a PROXY protocol v1/v2 header (HAProxy) comes first on every connection
    trusted_proxies: tuple[IPNetwork, ...] = ()   # with proxy_protocol: who may connect (others: closed)


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
    # Added key: the longest text line DATA accepts (octets without CRLF).  Lines over 998 (RFC 5321
    # 4.5.3.1.6) are accepted up to this and re-encoded before they leave (outbound/sevenbit.py).
    max_line_length: int = 64 * 1024


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
    nested_groups: bool = True          # added key: membership through groups inside require_group counts
    group_base: Optional[str] = None    # added key: where nested groups are searched (default: its dc= suffix)


@dataclass(frozen=True)
class AuthConfig:
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    password_file: Optional[Path] = None
    ldap: Optional[LDAPConfig] = None
    received_shows_user: bool = False   # name the authenticated user in the Received field


@dataclass(frozen=True)
class Permit:
    networks: tuple[IPNetwork, ...] = ()
    users: tuple[str, ...] = ()
    anyone: bool = False
    senders: tuple[str, ...] = ("*",)
    recipients: tuple[str, ...] = ("*",)
    check_from_header: Optional[bool] = None    # unset: true for `users` rules, false for `networks` rules

    @property
    def holds_from_header(self) -> bool:
        """Is the From: header held to `senders`? Never on an `anyone` rule (an inbound gateway)."""
        if self.anyone:
            return False
        return self.check_from_header if self.check_from_header is not None else bool(self.users)


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
    directory_fsync: str = "auto"       # added key: "auto" | "always" (spool.fsinfo)


TLS_POLICIES = ("none", "opportunistic", "required", "verify")


@dataclass(frozen=True)
class DeliveryConfig:
    tls: str = "opportunistic"
    concurrency: int = 100
    concurrency_per_domain: int = 10
    mx_port: int = 25
    nameservers: tuple[tuple[str, int], ...] = ()   # ("127.0.0.1", 5353); empty: system resolver
    source_address: str = ""
    process: str = "separate"   # "separate": delivery in a second process (a second core); "inline": one
    process_nice: int = 10      # added key: how much nicer (nice(2)) that process runs than the receiving one
    mta_sts: bool = True        # RFC 8461: fetch, cache and obey MTA-STS policies (direct-to-MX only)
    mta_sts_port: int = 443     # the HTTPS port policies are fetched from
    dane: bool = True           # RFC 7672: TLSA records from answers the resolver marks authenticated
    ca_file: Optional[Path] = None   # trust for MX certificates and policy hosts; None: the system's
    tls_reports: bool = True    # RFC 8460: daily TLS-RPT reports to domains that publish _smtp._tls
    dns_cache_size: int = 10_000    # added key: DNS answers direct delivery keeps (about 3.5 KiB each); 0: none


TRANSPORT_SECURITY = ("starttls", "tls", "none")
TRANSPORT_PROTOCOLS = ("smtp", "lmtp")     # RFC 5321 / RFC 2033
LMTP_PORT = 24                             # RFC 2033 section 5: never 25; 24 is the customary LMTP port
TRANSPORT_AUTH = ("password", "xoauth2", "oauthbearer", "none")
OAUTH2_AUTH = ("xoauth2", "oauthbearer")


@dataclass(frozen=True)
class OAuth2Config:
    """Where and how a transport gets its OAuth2 bearer token (RFC 6749): the client-credentials grant
    with `client_secret_file`, or the refresh-token grant with `refresh_token_file` (the client secret,
    when given too, then authenticates the client, RFC 6749 section 6)."""
    token_url: str
    client_id: str
    client_secret_file: Optional[Path] = None
    refresh_token_file: Optional[Path] = None
    scope: str = ""
    ca_file: Optional[Path] = None      # trust for the token endpoint; None: the system's

    @property
    def grant(self) -> str:
        """"refresh_token" or "client_credentials"."""
        return "refresh_token" if self.refresh_token_file is not None else "client_credentials"


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
    source_address: str = ""            # bind this transport's connections here; "": [delivery] source_address
    auth: str = ""                      # TRANSPORT_AUTH; "": "password" with a username, else "none"
    oauth2: Optional["OAuth2Config"] = None     # with auth "xoauth2" / "oauthbearer"
    client_cert: Optional[Path] = None  # TLS client certificate (PEM) presented to the smarthost
    client_key: Optional[Path] = None
    protocol: str = "smtp"              # TRANSPORT_PROTOCOLS: "lmtp" is RFC 2033 (one reply per recipient)
    unix_path: Optional[Path] = None    # host = "unix:PATH": a local (AF_UNIX) socket instead of host:port

    def bind_address(self, delivery_default: str) -> str:
        """The address this transport's connections leave from: its own, else [delivery]'s ("" = any)."""
        return self.source_address or delivery_default

    @property
    def place(self) -> str:
        """Where it is and how it is spoken to, for people: "host:port" or "unix:PATH", "LMTP " before."""
        where = self.host if self.unix_path is not None else f"{self.host}:{self.port}"
        return ("LMTP " if self.protocol == "lmtp" else "") + where

    @property
    def auth_kind(self) -> str:
        """One of TRANSPORT_AUTH: `auth`, or by default "password" with a username and "none" without."""
        return self.auth or ("password" if self.username else "none")


@dataclass(frozen=True)
class Route:
    transport: str
    recipients: tuple[str, ...] = ("*",)
    senders: tuple[str, ...] = ("*",)
    after_attempts: int = 0


MAX_THROTTLE_PAUSE = 3600.0     # a pause doubles while it goes on, up to this


@dataclass(frozen=True)
class Throttle:
    """One `[[throttle]]` rule: how deliveries to each recipient domain it matches are shaped.  Every
    domain it matches is its own destination, with its own rate, connections and pauses."""
    domains: tuple[str, ...] = ("*",)
    messages_per_minute: int = 0        # smooth: one message every 60/N seconds, no burst; 0 = no limit
    connections: int = 0                # connections to the destination at once; 0 = no cap of its own
    pause: float = 60.0                 # after a "slow down" reply; doubling up to MAX_THROTTLE_PAUSE; 0 = never

    @property
    def interval(self) -> float:
        """Seconds between the starts of two messages to one destination (0: no rate limit)."""
        return 60.0 / self.messages_per_minute if self.messages_per_minute else 0.0


@dataclass(frozen=True)
class SuppressionConfig:
    enabled: bool = False               # a 5.1.x / 5.2.1 failure suppresses the address (spool.suppression)
    duration: float = 30 * 86400.0


WEBHOOK_EVENTS = ("delivered", "deferred", "bounced", "expired")


@dataclass(frozen=True)
class WebhookConfig:
    """One `[[webhook]]`: where per-recipient delivery events are POSTed (mailrelay.events)."""
    url: str
    events: tuple[str, ...] = WEBHOOK_EVENTS
    secret_file: Optional[Path] = None  # HMAC-SHA256 key (the file's content, stripped); None: unsigned
    ca_file: Optional[Path] = None      # trust for the receiver; None: the system's
    timeout: float = 10.0               # added key: seconds one POST may take, connect to last body byte
    max_pending: int = 100_000          # added key: events kept for this URL; beyond: new ones dropped
    concurrency: int = 4                # added key: POSTs in flight to this URL at once


@dataclass(frozen=True)
class ClusterConfig:
    redis: str = field(default="", repr=False)   # "" = no cluster; the URL may hold a password: no repr
    key_prefix: str = "mailrelay:"      # added key: every key the relay writes in Redis starts with this
    timeout: float = 0.1                # added key: the bounded wait of one Redis call, then local counters
    ca_file: Optional[Path] = None      # added key: trust for a rediss:// server; default: the system's


@dataclass(frozen=True)
class MetricsConfig:
    endpoint: Optional[str] = None      # absent: off
    delivery_endpoint: Optional[str] = None   # added key: the delivery process's metrics ([delivery] process)


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"                # "text" | "json"
    file: str = ""


@dataclass(frozen=True)
class HTTPConfig:
    api_keys_file: Optional[Path] = None    # `name:sha256:<hex>` lines, written by `mailrelay apikey`


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
    http: HTTPConfig = HTTPConfig()
    postmaster: Optional[str] = None    # added key: where RCPT TO:<postmaster> goes (RFC 5321 4.5.1)
    # The file's bytes as validated: a delivery process runs exactly these, whatever the file says later.
    source: bytes = field(default=b"", repr=False, compare=False)
    suppression: SuppressionConfig = SuppressionConfig()
    webhooks: tuple[WebhookConfig, ...] = ()
    cluster: ClusterConfig = ClusterConfig()
    throttles: tuple[Throttle, ...] = ()     # [[throttle]] rules, first match wins


DKIM_MODES = ("sign", "passthrough")
DELIVERY_PROCESS = ("inline", "separate")
DIRECTORY_FSYNC = ("auto", "always")
LOG_FORMATS = ("text", "json")
AUTH_MECHANISMS = ("PLAIN", "LOGIN")   # password mechanisms; offered only over TLS (RFC 4954 §4)
DEFAULT_ENDPOINTS = {"relay": "tcp:25", "submission": "tcp:587", "submissions": "tcp:465",
                     "http": "tcp:8025:interface=127.0.0.1"}
DEFAULT_TRANSPORT_PORTS = {"starttls": 587, "tls": 465, "none": 25}
