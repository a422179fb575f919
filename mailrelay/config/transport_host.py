# -*- test-case-name: tests.test_config, tests.test_logger, tests.test_routes -*-
"""Where a `[transports.NAME]` is and which protocol it speaks: `host`, `port`, `security`, `protocol`.

Part of the first stage of the journey (mailrelay.config), called by sections._transport.  In: the
transport's `_Reader`.  Out: the keyword values for config.Transport (host, port, security, protocol,
unix_path), or a ConfigError naming the key.

`host` is a name or address reached at `port`, or `unix:PATH` (also `unix:path=PATH`, as in a Twisted
client endpoint string): a local socket, e.g. Dovecot's `unix:/run/dovecot/lmtp`; a relative PATH is
relative to the config file.  A unix socket takes no `port`, and no TLS (`security` defaults to, and must
be, "none": TLS across a socket inside one machine protects nothing) and so no AUTH (RFC 4954 section 4:
never without TLS).  `protocol` is "smtp" (RFC 5321) or "lmtp" (RFC 2033: LHLO, then one reply per
recipient after the data; section 5: never on port 25, so its default port is 24).
"""
from __future__ import annotations

from typing import Any

from mailrelay.config.model import DEFAULT_TRANSPORT_PORTS, LMTP_PORT, TRANSPORT_PROTOCOLS, TRANSPORT_SECURITY
from mailrelay.config.reader import _Reader

UNIX_PREFIX = "unix:"


def transport_host(t: _Reader) -> dict[str, Any]:
    """host, port, security, protocol and unix_path for config.Transport."""
    protocol = t.choice("protocol", "smtp", TRANSPORT_PROTOCOLS)
    host = t.text("host", required=True).strip()
    if not host or any(c.isspace() for c in host):
        t.fail("host", f'"{host}" is not a host name')
    if not host.lower().startswith(UNIX_PREFIX):
        security = t.choice("security", "starttls", TRANSPORT_SECURITY)
        default_port = LMTP_PORT if protocol == "lmtp" else DEFAULT_TRANSPORT_PORTS[security]
        return {"host": host, "port": t.port("port", default_port), "security": security,
                "protocol": protocol, "unix_path": None}
    path = host[len(UNIX_PREFIX):]
    if path.startswith("path="):
        path = path[len("path="):]
    if not path or "\0" in path or ":" in path:
        t.fail("host", f'"{host}" is not unix:PATH (a socket path, no other endpoint arguments)')
    security = t.choice("security", "none", TRANSPORT_SECURITY)
    if security != "none":
        t.fail("security", f'"{security}" on a unix: socket; a local socket takes security = "none"')
    if t.has("port"):
        t.port("port", 1)
        t.fail("port", "not used with a unix: host")
    unix_path = t.base / path
    return {"host": f"{UNIX_PREFIX}{unix_path}", "port": 0, "security": security, "protocol": protocol,
            "unix_path": unix_path}
