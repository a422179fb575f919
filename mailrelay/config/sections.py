# -*- test-case-name: tests.test_config, tests.test_logger, tests.test_routes -*-
"""The sections of tap.conf, one function each: a table in, a frozen section dataclass out.

Part of the first stage of the journey (mailrelay.config).  In: a `_Reader` for one table ([limits],
[[permit]], [transports.NAME], ...).  Out: its dataclass from mailrelay.config.model, or a ConfigError
naming the key.  Files the relay must read at start (TLS pair, DKIM keys, LDAP CA and secret,
transport secrets and CAs) are opened here.  RFCs: 4954 §4 and 8314 §3.3 (no password before TLS),
6376 §3.1/§5.4 and 8301 §3.2 (DKIM selectors, signed headers, key sizes), 5321 §4.1.2 (hostname).
"""
from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Mapping, Optional, Sequence

from mailrelay.config.model import (
    AUTH_MECHANISMS, DEFAULT_ENDPOINTS, DEFAULT_LISTENERS, DEFAULT_TRANSPORT_PORTS, DELIVERY_PROCESS,
    DIRECTORY_FSYNC, DKIM_MODES, LISTENER_KINDS, LOG_FORMATS, MAX_THROTTLE_PAUSE, TLS_POLICIES,
    TRANSPORT_SECURITY, AuthConfig, ClusterConfig, DeliveryConfig, DKIMConfig, DKIMKey, HTTPConfig, IPNetwork,
    LDAPConfig, Limits, Listener, LogConfig, MetricsConfig, Permit, QueueConfig, Route, SendmailConfig,
    SuppressionConfig, Throttle, TLSConfig, Transport,
)
from mailrelay.cluster.url import RedisURL
from mailrelay.config.reader import _closed, _Reader
from mailrelay.config.transport_auth import transport_auth
from mailrelay.config.transport_host import transport_host
from mailrelay.config.values import _DOMAIN, _HOSTNAME, _SELECTOR, ascii_domain, domain_text, parse_host_port


def _hostname(root: _Reader) -> str:
    name = root.text("hostname")
    if name is None:
        return socket.getfqdn()
    if not _HOSTNAME.fullmatch(name):
        root.fail("hostname", f'"{name}" is not a host name (it is used in the banner, EHLO and Received)')
    return name


def _postmaster(root: _Reader) -> Optional[str]:
    address = root.text("postmaster")
    if address is None:
        return None
    local, at, domain = address.rpartition("@")
    if not at or not local or any(c in local for c in ' "<>()[]\\,;:') or not _DOMAIN.fullmatch(domain):
        root.fail("postmaster", f'"{address}" is not a mailbox (local@domain)')
    return address


def _tls(t: _Reader) -> TLSConfig:
    cert, key = t.path("cert", readable=True), t.path("key", readable=True)
    if (cert is None) != (key is None):
        t.fail("key" if key is None else "cert", "give both cert and key, or neither (self-signed)")
    if cert is not None and t.checks_files():
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
    if kind == "http" and require_tls:
        t.fail("require_tls", 'not for an "http" listener: give it an ssl: endpoint for TLS')
    if kind == "submission" and not require_tls:
        # RFC 8314 §3.3 / RFC 4954 §4: submission needs TLS before AUTH; use kind = "relay" to allow plaintext.
        t.fail("require_tls", 'is always true on a "submission" listener; use kind = "relay" for plaintext')
    proxy_protocol, trusted = t.flag("proxy_protocol", False), _networks(t, "trusted_proxies")
    _check_proxies(t, endpoint, proxy_protocol, trusted)
    return _closed(t, Listener(kind, endpoint, require_tls, proxy_protocol, trusted))


def _check_proxies(t: _Reader, endpoint: str, proxy_protocol: bool, trusted: tuple[IPNetwork, ...]) -> None:
    """`trusted_proxies` goes with `proxy_protocol` (HAProxy's proxy-protocol.txt sections 2 and 5: take
    the header only from known proxies, never guess whether it is there), and never trusts every address."""
    if proxy_protocol and not trusted:
        t.fail("trusted_proxies", 'required with proxy_protocol = true: the addresses or networks of the '
                                  'proxies, e.g. ["10.0.0.5/32"]')
    if trusted and not proxy_protocol:
        t.fail("trusted_proxies", "only means something with proxy_protocol = true")
    for i, network in enumerate(trusted):
        if network.prefixlen == 0:
            # Trusting every address would let any client claim any address, a permit network's included.
            t.fail(f"trusted_proxies[{i}]", f'"{network}" trusts every address; name the proxies')
    if proxy_protocol and endpoint.split(":", 1)[0].lower() == "ssl":
        t.fail("endpoint", 'proxy_protocol needs a plain endpoint ("tcp:..."): the header comes before TLS, '
                           'and a "submissions" listener starts TLS after it')


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
        max_line_length=_line_length(t, d.max_line_length),
    ))


MAX_LINE_LENGTH_BOUND = 1024 * 1024     # each session may hold one such line while it reads DATA


def _line_length(t: _Reader, default: int) -> int:
    """[limits] max_line_length: 998 (RFC 5321 4.5.3.1.6, strict) up to 1 MiB."""
    value = t.size("max_line_length", default)
    if not 998 <= value <= MAX_LINE_LENGTH_BOUND:
        t.fail("max_line_length", f"must be from 998 (the RFC 5321 line limit) to 1MiB, got {value}")
    return value


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
        nested_groups=t.flag("nested_groups", True),
        group_base=t.text("group_base"),
    ))


def _auth(t: _Reader) -> AuthConfig:
    mechanisms = []
    for i, name in enumerate(t.texts("mechanisms", AUTH_MECHANISMS)):
        if name.upper() not in AUTH_MECHANISMS:
            t.fail(f"mechanisms[{i}]", f'"{name}" is not one of ' + ", ".join(AUTH_MECHANISMS))
        if name.upper() not in mechanisms:
            mechanisms.append(name.upper())
    ldap = _ldap(t.table("ldap")) if t.has("ldap") else None
    return _closed(t, AuthConfig(tuple(mechanisms), t.path("password_file"), ldap,
                                 received_shows_user=t.flag("received_shows_user", False)))


def _networks(t: _Reader, key: str = "networks") -> tuple[IPNetwork, ...]:
    result = []
    for i, text in enumerate(t.texts(key, ())):
        try:
            result.append(ipaddress.ip_network(text.strip(), strict=False))   # host bits allowed: 10.1.2.3/8
        except ValueError:
            t.fail(f"{key}[{i}]", f'bad network "{text}": expected an address or CIDR like "10.0.0.0/8"')
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
        check_from_header=t.flag("check_from_header", None),
    ))


def _dkim_key(t: _Reader) -> DKIMKey:
    domain = t.text("domain", required=True)
    selector = t.text("selector", required=True)
    if not domain_text(domain):
        t.fail("domain", f'"{domain}" is not a domain')
    try:
        domain = ascii_domain(domain)      # d= is the A-label (RFC 6376 3.5, RFC 8616 4); either form here
    except ValueError as e:
        t.fail("domain", str(e))
    if not _SELECTOR.fullmatch(selector):
        t.fail("selector", f'"{selector}" is not a DKIM selector (RFC 6376 §3.1)')
    key_file = t.path("key_file", readable=True)
    if key_file is None:
        t.fail("key_file", "missing (required)")
    problem = _dkim_key_problem(key_file)
    if problem:
        t.fail("key_file", problem)
    return _closed(t, DKIMKey(domain, selector, key_file))


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
        directory_fsync=t.choice("directory_fsync", d.directory_fsync, DIRECTORY_FSYNC),
    ))


def _suppression(t: _Reader) -> SuppressionConfig:
    d = SuppressionConfig()
    return _closed(t, SuppressionConfig(enabled=t.flag("enabled", d.enabled),
                                        duration=t.duration("duration", d.duration)))


def _delivery(t: _Reader) -> DeliveryConfig:
    d = DeliveryConfig()
    nameservers = []
    for i, text in enumerate(t.texts("nameservers", ())):
        try:
            nameservers.append(parse_host_port(text, 53))
        except ValueError as e:
            t.fail(f"nameservers[{i}]", str(e))
    source = _source_address(t)
    return _closed(t, DeliveryConfig(
        tls=t.choice("tls", d.tls, TLS_POLICIES),
        concurrency=t.integer("concurrency", d.concurrency, low=1),
        concurrency_per_domain=t.integer("concurrency_per_domain", d.concurrency_per_domain, low=1),
        mx_port=t.port("mx_port", d.mx_port),
        nameservers=tuple(nameservers),
        source_address=source,
        process=t.choice("process", d.process, DELIVERY_PROCESS),
        process_nice=t.integer("process_nice", d.process_nice, low=0, high=19),
        mta_sts=t.flag("mta_sts", d.mta_sts),
        mta_sts_port=t.port("mta_sts_port", d.mta_sts_port),
        dane=t.flag("dane", d.dane),
        ca_file=_pem_file(t, "ca_file"),
        tls_reports=t.flag("tls_reports", d.tls_reports),
        dns_cache_size=t.integer("dns_cache_size", d.dns_cache_size, low=0, high=10_000_000),
    ))


def _pem_file(t: _Reader, key: str) -> Optional[Path]:
    """A CA file key: "" or absent is None (the system's trust); else a readable file of PEM certificates."""
    path = t.path(key, readable=True, allow_empty=True)
    if path is not None and t.checks_files():
        from cryptography import x509
        try:
            x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError) as e:
            t.fail(key, f"cannot load certificates from {path}: {' '.join(str(e).split())[:200]}")
    return path


def _source_address(t: _Reader) -> str:
    """`source_address`: an IP address to bind outgoing connections to, or "" (the default: any)."""
    source = t.text("source_address", "").strip()
    if source:
        try:
            ipaddress.ip_address(source)
        except ValueError:
            t.fail("source_address", f'"{source}" is not an IP address')
    return source


def _transport(name: str, t: _Reader) -> Transport:
    where = transport_host(t)
    security = where["security"]
    username = t.text("username")
    password_file = t.path("password_file", readable=True)
    if password_file is not None and username is None:
        t.fail("username", "required with password_file")
    login = transport_auth(t, security, username, password_file)
    if where["unix_path"] is not None and (username or login["auth"] not in ("", "none")):
        t.fail("username" if username else "auth", "no AUTH over a unix: socket (it has no TLS)")
    source_address = _source_address(t)
    if where["unix_path"] is not None and source_address:
        t.fail("source_address", "not used with a unix: host")
    return _closed(t, Transport(
        name=name, **where,
        verify=t.flag("verify", True),
        username=username, password_file=password_file,
        ca_file=t.path("ca_file", readable=True),
        source_address=source_address,
        **login,
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


def _throttle(t: _Reader) -> Throttle:
    d = Throttle()
    pause = t.duration("pause", d.pause, allow_zero=True)      # 0: a "slow down" reply pauses nothing
    if pause > MAX_THROTTLE_PAUSE:
        t.fail("pause", f"{pause:g}s is longer than 1h, the longest a pause grows to")
    return _closed(t, Throttle(
        domains=t.patterns("domains", addresses=False),
        messages_per_minute=t.integer("messages_per_minute", d.messages_per_minute, high=60_000),
        connections=t.integer("connections", d.connections, high=10_000),
        pause=pause,
    ))


def _throttles(tables: Sequence[_Reader]) -> tuple[Throttle, ...]:
    """[[throttle]] rules in order; a rule after one matching every domain could never apply."""
    rules: list[Throttle] = []
    for t in tables:
        rule = _throttle(t)
        catch_all = next((i for i, r in enumerate(rules) if "*" in r.domains), None)
        if catch_all is not None:
            t.fail(None, f'never applies: throttle[{catch_all}] matches every domain ("*") first')
        rules.append(rule)
    return tuple(rules)


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


def _http(t: _Reader, listeners: tuple[Listener, ...]) -> HTTPConfig:
    """[http]: where the HTTP injection API's keys are; required once a listener is of kind "http"."""
    keys = t.path("api_keys_file")          # may be missing at start: `mailrelay apikey` creates it
    if keys is None and any(listener.kind == "http" for listener in listeners):
        t.fail("api_keys_file", 'required with a [[listen]] kind = "http" (write keys with `mailrelay apikey`)')
    return _closed(t, HTTPConfig(keys))


def _cluster(t: _Reader) -> ClusterConfig:
    d = ClusterConfig()
    redis = t.text("redis", d.redis).strip()
    if redis:
        try:
            RedisURL.parse(redis)
        except ValueError as e:
            t.fail("redis", str(e))          # the message shows the URL with its password masked
    timeout = t.duration("timeout", d.timeout)
    if not 0 < timeout <= 5:
        t.fail("timeout", "must be more than 0 and at most 5s (every SMTP session may wait this long)")
    prefix = t.text("key_prefix", d.key_prefix)
    if any(c.isspace() for c in prefix):
        t.fail("key_prefix", "may not contain white space")
    return _closed(t, ClusterConfig(redis=redis, key_prefix=prefix, timeout=timeout,
                                    ca_file=t.path("ca_file", None, readable=True)))
