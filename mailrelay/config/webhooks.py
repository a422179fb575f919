# -*- test-case-name: tests.test_webhook, tests.test_config, tests.test_logger -*-
"""`[[webhook]]`: where per-recipient delivery events are POSTed (mailrelay.events).

Part of the first stage of the journey (mailrelay.config).  In: the `_Reader`s of the `[[webhook]]`
tables.  Out: a tuple of `WebhookConfig`, or a ConfigError naming `webhook[N].key`.  The secret file is
opened here to prove it readable and not empty; its content is never put into the config, an error or a
log line (it is read again where the signature is made).  The CA file is parsed as PEM certificates.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from mailrelay.config.model import WEBHOOK_EVENTS, WebhookConfig
from mailrelay.config.reader import _closed, _Reader
from mailrelay.config.transport_auth import _check_pem


def _webhooks(tables: Optional[list[_Reader]]) -> tuple[WebhookConfig, ...]:
    seen: dict[str, str] = {}
    return tuple(_webhook(t, seen) for t in tables or ())


def _webhook(t: _Reader, seen: dict[str, str]) -> WebhookConfig:
    d = WebhookConfig("")
    url = _url(t)
    if url in seen:
        # The outbox is kept per URL (<spool>/webhooks/): two tables for one URL would share it.
        t.fail("url", f'"{display_url(url)}" is already used by {seen[url]}')
    seen[url] = t.prefix
    secret = t.path("secret_file", readable=True, allow_empty=True)
    if secret is not None and t.checks_files() and not _has_content(secret):
        t.fail("secret_file", f"{secret} is empty (the HMAC key is its content, stripped)")
    ca_file = t.path("ca_file", readable=True, allow_empty=True)
    if ca_file is not None and t.checks_files():
        _check_pem(t, "ca_file", ca_file)
    return _closed(t, WebhookConfig(
        url=url, events=_events(t), secret_file=secret, ca_file=ca_file,
        timeout=t.duration("timeout", d.timeout),
        max_pending=t.integer("max_pending", d.max_pending, low=1),
        concurrency=t.integer("concurrency", d.concurrency, low=1, high=64),
    ))


def _url(t: _Reader) -> str:
    url = t.text("url", required=True).strip()
    try:
        parts = urlsplit(url)
        _ = parts.port                 # raises ValueError for a port out of range or not a number
    except ValueError as e:
        t.fail("url", f"not a URL: {e}")
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        t.fail("url", f'"{display_url(url)}" is not an http:// or https:// URL')
    if parts.username is not None or parts.password is not None:
        t.fail("url", "must not hold credentials (give secret_file: receivers check the signature)")
    if parts.fragment:
        t.fail("url", "must not have a #fragment")
    return url


def _events(t: _Reader) -> tuple[str, ...]:
    events = t.texts("events", WEBHOOK_EVENTS)
    if not events:
        t.fail("events", "empty; leave the key out for all four")
    for i, event in enumerate(events):
        if event not in WEBHOOK_EVENTS:
            t.fail(f"events[{i}]", f'"{event}" is not one of ' + ", ".join(f'"{e}"' for e in WEBHOOK_EVENTS))
        if event in events[:i]:
            t.fail(f"events[{i}]", f'"{event}" is listed twice')
    return events


def _has_content(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return bool(f.read(64 * 1024).strip())
    except OSError:
        return False


def display_url(url: str) -> str:
    """The URL as logs, metrics and `mailrelay queue` show it: scheme, host, port and path, never a query
    (it may carry a token) nor user information."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable url>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}" + ("?…" if parts.query else "")
