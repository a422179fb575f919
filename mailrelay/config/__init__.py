# -*- test-case-name: tests.test_config, tests.test_config_reference, tests.test_throttle_config -*-
"""tap.conf: the configuration contract (docs/config.md) as typed, immutable objects.

First stage of the journey: everything the relay does is decided by one `Config`, loaded once at start
(and again on SIGHUP) from a TOML file.  In: a path.  Out: a frozen `Config`, or `ConfigError`, whose
`str()` is one line naming the file, the key path (`route[2].transport`) and what is wrong.

Durations: "90s", "5m", "4h", "5d" or bare seconds.  Sizes: "50MiB", "10MB", "512KiB" or bytes.
Relative paths are resolved against the directory of the config file.  Files the relay must read at
start (TLS certificate and key, DKIM keys, LDAP CA and secret, transport secrets and CAs) are opened
here, so a typo is refused at start and not at the first message.  `auth.password_file` is not:
`mailrelay passwd` creates it.

The package, by stage: `model` (the frozen dataclasses, defaults, allowed values, ConfigError),
`values` (durations, sizes, host:port, patterns), `reader` (typed access to one TOML table by key
path), `sections` (one function per table), `openrelay` (permit rules that would relay for anyone are
refused) and, here, `load`, which reads the file and assembles a `Config`.  Every name other modules
use is importable from `mailrelay.config` itself.
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from types import MappingProxyType

from mailrelay.config.model import (
    AUTH_MECHANISMS, DEFAULT_ENDPOINTS, DEFAULT_LISTENERS, DEFAULT_PERMITS, DEFAULT_TRANSPORT_PORTS,
    DELIVERY_PROCESS, DKIM_MODES, LISTENER_KINDS, LOG_FORMATS, TLS_POLICIES, TRANSPORT_SECURITY,
    AuthConfig, ClusterConfig, Config, ConfigError, DeliveryConfig, DKIMConfig, DKIMKey, HTTPConfig, IPNetwork,
    LDAPConfig,
    Limits, Listener, LogConfig, MetricsConfig, OAuth2Config, Permit, QueueConfig, Route, SendmailConfig,
    SuppressionConfig, Throttle, TLSConfig, Transport, WEBHOOK_EVENTS, WebhookConfig,
)
from mailrelay.config.openrelay import refuse_open_relay
from mailrelay.config.reader import _Reader
from mailrelay.config.sections import (
    _auth, _cluster, _delivery, _dkim, _hostname, _http, _limits, _listeners, _log, _metrics, _permit, _postmaster,
    _queue, _route, _sendmail, _suppression, _throttles, _tls, _transports,
)
from mailrelay.config.webhooks import _webhooks
from mailrelay.config.values import parse_duration, parse_host_port, parse_size

__all__ = [
    "AUTH_MECHANISMS", "DEFAULT_ENDPOINTS", "DEFAULT_LISTENERS", "DEFAULT_PERMITS", "DEFAULT_TRANSPORT_PORTS",
    "DELIVERY_PROCESS", "DKIM_MODES", "LISTENER_KINDS", "LOG_FORMATS", "TLS_POLICIES", "TRANSPORT_SECURITY",
    "AuthConfig", "ClusterConfig", "Config", "ConfigError", "DeliveryConfig", "DKIMConfig", "DKIMKey", "HTTPConfig",
    "IPNetwork",
    "LDAPConfig", "Limits", "Listener", "LogConfig", "MetricsConfig", "OAuth2Config", "Permit", "QueueConfig",
    "Route", "SendmailConfig", "SuppressionConfig", "Throttle", "TLSConfig", "Transport", "WEBHOOK_EVENTS",
    "WebhookConfig", "load", "parse_duration",
    "parse_host_port", "parse_size",
]


def _read_toml(file: str, source: bytes | None = None) -> tuple[dict, bytes]:
    try:
        if source is None:
            with open(file, "rb") as f:
                source = f.read()
        return tomllib.loads(source.decode("utf-8")), source
    except OSError as e:
        raise ConfigError(file, "", f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(file, "", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, "", f"TOML syntax error: {e}") from None


# Tables whose files only the receiving side reads: the delivery process does not open them.
RECEIVING_FILES = ("tls", "auth")


def load(path: str | Path, source: bytes | None = None, delivery_only: bool = False) -> Config:
    """Read and validate a tap.conf; raise ConfigError (one line) on any problem. `source`: the file's
    bytes as read before (a delivery process gets them from the main process), not read again.
    `delivery_only`: the files of RECEIVING_FILES are not opened (the main process proved them)."""
    file = str(path)
    absolute = Path(os.path.abspath(file))
    data, source = _read_toml(file, source)
    root = _Reader(file, absolute.parent, "", data, RECEIVING_FILES if delivery_only else ())
    hostname = _hostname(root)
    transports = _transports(root.table("transports"))
    permits = root.tables("permit")
    listeners = _listeners(root.tables("listen"), root)
    config = Config(
        path=absolute,
        hostname=hostname,
        spool=root.path("spool", absolute.parent / "spool"),
        tls=_tls(root.table("tls")),
        listeners=listeners,
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
        http=_http(root.table("http"), listeners),
        postmaster=_postmaster(root),
        source=source,
        suppression=_suppression(root.table("suppression")),
        webhooks=_webhooks(root.tables("webhook")),
        cluster=_cluster(root.table("cluster")),
        throttles=_throttles(root.tables("throttle") or ()),
    )
    root.close()
    if permits:   # after every key is known good: a typo is named as a typo first
        refuse_open_relay(permits, config.permits)
    return config
