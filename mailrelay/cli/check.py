# -*- test-case-name: tests.test_cli_check, tests.test_webhook, tests.test_http_api -*-
"""`mailrelay check --config FILE`: validate a tap.conf and say what it means, before the relay runs it.

Not a stage of the message's journey but its rehearsal: in, a config path; out, a few human-readable
lines on stdout (hostname, spool, listeners, auth, permit rules, DKIM keys, queue timings, delivery
policy, transports, routes) and exit 0, or the loader's one-line error on stderr and exit 2.  Never a
traceback, whatever the file is (missing, a directory, binary, not TOML).  Secrets are never printed:
only the paths of the files that hold them.
"""
from __future__ import annotations

import argparse
import sys

from mailrelay.config import Config, ConfigError, LDAPConfig, Permit, load
from mailrelay.config.webhooks import display_url

EXIT_OK, EXIT_CONFIG = 0, 2

_LISTENER_TLS = {
    "relay": "STARTTLS offered",
    "submission": "STARTTLS required before AUTH and MAIL",
    "submissions": "implicit TLS",
    "http": "HTTP API POST /v1/messages; TLS only with an ssl: endpoint",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "check", help="validate a config file and print what it means",
        description="Validate a tap.conf and print what the relay would do with it.",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="the tap.conf to check")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load(args.config)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    except Exception as e:   # a loader bug must still be one line, not a traceback
        print(f"{args.config}: cannot check: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_CONFIG
    for label, text in describe(config):
        print(f"{label:<12} {text}")
    print(f"ok: {config.path}")
    return EXIT_OK


def human_duration(seconds: float) -> str:
    """300.0 → "5m", 5400.0 → "90m", 0 → "0s"."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def human_size(size: int) -> str:
    """52428800 → "50 MiB"."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def _list(items) -> str:
    return ", ".join(str(i) for i in items) or "(none)"


def _ldap(ldap: LDAPConfig) -> str:
    ignored = " (search_base/search_filter unused)" if ldap.bind_dn and ldap.search_base else ""
    how = (f"bind as {ldap.bind_dn}{ignored}" if ldap.bind_dn else
           f"search {ldap.search_base} for {ldap.search_filter}"
           + (f" as {ldap.service_dn}" if ldap.service_dn else " anonymously"))
    group = (f", member of {ldap.require_group}" + (" (nested groups too)" if ldap.nested_groups else "")
             if ldap.require_group else "")
    tls = ", STARTTLS" if ldap.starttls else ""
    return f"{_list(ldap.urls)}{tls}: {how}{group}; cache {human_duration(ldap.cache)}"


def _auth(config: Config) -> str:
    auth = config.auth
    if not auth.mechanisms:
        return "no AUTH offered"
    parts = [f"{_list(auth.mechanisms)}, over TLS only"]
    if auth.password_file:
        missing = "" if auth.password_file.exists() else " (not there yet: `mailrelay passwd` creates it)"
        parts.append(f"password file {auth.password_file}{missing}")
    if len(parts) == 1 and not auth.ldap:
        parts.append("no password file or LDAP: every AUTH will fail")
    parts.append("Received names the user" if auth.received_shows_user else "Received does not name the user")
    return "; ".join(parts)


def _permit(permit: Permit) -> str:
    if permit.anyone:
        who = "any client"
    elif permit.networks:
        who = f"clients from {_list(permit.networks)}"
    else:
        who = "any authenticated user" if permit.users == ("*",) else f"users {_list(permit.users)}"
    header = ("; From: header held to the senders" if permit.holds_from_header else
              "" if permit.anyone or "*" in permit.senders else "; a From: outside the senders goes unsigned")
    return f"{who} may send from {_list(permit.senders)} to {_list(permit.recipients)}{header}"


def _transport_auth(t) -> str:
    """How a transport logs in: the kind and the files that hold its secrets, never a secret."""
    kind = t.auth_kind
    cert = f", client certificate {t.client_cert} (key {t.client_key})" if t.client_cert else ""
    if kind == "password":
        return f", auth password: login {t.username} (password from {t.password_file}){cert}"
    if kind == "none":
        return f", auth none{cert}"
    o = t.oauth2
    if o.grant == "refresh_token":
        grant = f"refresh-token grant (refresh token from {o.refresh_token_file}" + (
            f", client secret from {o.client_secret_file})" if o.client_secret_file else ")")
    else:
        grant = f"client-credentials grant (client secret from {o.client_secret_file})"
    scope = f", scope {o.scope}" if o.scope else ""
    ca = f", endpoint CA {o.ca_file}" if o.ca_file else ""
    return (f", auth {kind} as {t.username}: OAuth2 token from {o.token_url}, client id {o.client_id}, "
            f"{grant}{scope}{ca}{cert}")


def describe(config: Config) -> list[tuple[str, str]]:
    """(label, text) lines saying what `config` makes the relay do."""
    lines = [("hostname", config.hostname), ("spool", str(config.spool))]
    tls = config.tls
    lines.append(("tls", f"cert {tls.cert}, key {tls.key}" if tls.cert else
                  "no [tls]: a self-signed certificate is generated into the spool"))
    for listener in config.listeners:
        required = listener.kind == "relay" and listener.require_tls
        note = _LISTENER_TLS[listener.kind] + (", required before MAIL" if required else "")
        if listener.proxy_protocol:
            note += "; PROXY protocol from " + ", ".join(str(n) for n in listener.trusted_proxies) + " only"
        lines.append(("listen", f"{listener.kind} on {listener.endpoint} ({note})"))
    if config.http.api_keys_file is not None:
        lines.append(("http", f"API keys in {config.http.api_keys_file}"))
    limits = config.limits
    rate = f"{limits.messages_per_minute}/min per client" if limits.messages_per_minute else "no rate limit"
    lines.append(("limits", f"{human_size(limits.max_message_size)} per message, {limits.max_recipients} "
                  f"recipients, lines up to {human_size(limits.max_line_length)}; {limits.max_connections} "
                  f"connections ({limits.max_connections_per_ip} per IP); "
                  f"{rate}; {limits.auth_failures_per_minute} AUTH failures/min per IP; idle "
                  f"{human_duration(limits.idle_timeout)}, session {human_duration(limits.session_timeout)}"))
    lines.append(("auth", _auth(config)))
    if config.auth.ldap:
        lines.append(("ldap", _ldap(config.auth.ldap)))
    lines += [(f"permit[{i}]", _permit(p)) for i, p in enumerate(config.permits)]
    lines.append(("postmaster", f"<postmaster> and <postmaster@{config.hostname}> go to {config.postmaster}, "
                  "from anyone" if config.postmaster else "not set: <postmaster> is judged like any recipient"))
    lines.append(("dkim", f"{config.dkim.mode}" + "".join(
        f"; {k.selector}._domainkey.{k.domain} ({k.key_file})" for k in config.dkim.keys)))
    queue = config.queue
    warning = f"after {human_duration(queue.delay_warning)}" if queue.delay_warning else "never"
    lines.append(("queue", f"retry after {human_duration(queue.first_retry)}, doubling up to "
                  f"{human_duration(queue.max_retry)}; bounce after {human_duration(queue.lifetime)}; "
                  f"delay warning {warning}; DSNs {'on' if queue.bounces else 'off'}; directory fsync "
                  + ("after every commit" if queue.directory_fsync == "always"
                     else "after commits unless on ext4 or XFS (auto)")))
    d = config.delivery
    resolver = _list(f"{h}:{p}" for h, p in d.nameservers) if d.nameservers else "the system resolver"
    source = f", from {d.source_address}" if d.source_address else ""
    lines.append(("delivery", f"direct to MX port {d.mx_port}, TLS {d.tls}; {d.concurrency} connections "
                  f"({d.concurrency_per_domain} per domain); DNS via {resolver}{source}; "
                  + (f"in a separate process, {d.process_nice} nice steps below" if d.process == "separate"
                     else "in the main process")))
    sts = f"MTA-STS on (policies from port {d.mta_sts_port})" if d.mta_sts else "MTA-STS off"
    dane = "DANE on (when the resolver authenticates answers)" if d.dane else "DANE off"
    trust = f"CAs from {d.ca_file}" if d.ca_file else "the system's CAs"
    lines.append(("tls policies", f"{sts}; {dane}; MX certificates and policy hosts checked against {trust}"))
    s = config.suppression
    lines.append(("suppression", f"on: a 5.1.x or 5.2.1 failure refuses RCPT to the address for "
                  f"{human_duration(s.duration)} (list in {config.spool / 'suppression.jsonl'})"
                  if s.enabled else "off"))
    c = config.cluster
    if c.redis:
        from mailrelay.cluster.url import RedisURL

        lines.append(("cluster", f"Redis {RedisURL.parse(c.redis)} shares messages_per_minute, "
                      f"auth_failures_per_minute and the suppression list (keys {c.key_prefix}*); each call "
                      f"waits at most {c.timeout:g}s, then this relay's own counters decide"))
    else:
        lines.append(("cluster", "off: every limit is this relay's own"))
    for t in config.transports.values():
        login = _transport_auth(t)
        ca = f", CA {t.ca_file}" if t.ca_file else ""
        verify = "verified" if t.verify else "NOT verified"
        bind = t.bind_address(d.source_address)
        source = (f", from {bind}" + ("" if t.source_address else " ([delivery] source_address)")) if bind else ""
        lines.append(("transport", f"{t.name}: {t.place} {t.security}, certificate {verify}{ca}{login}"
                      f"{source}"))
    for i, r in enumerate(config.routes):
        after = f" after {r.after_attempts} failed attempts" if r.after_attempts else ""
        lines.append((f"route[{i}]", f"to {_list(r.recipients)} from {_list(r.senders)} via {r.transport}{after}"))
    if not config.routes:
        lines.append(("route", "none: everything goes direct to MX"))
    for i, w in enumerate(config.webhooks):
        signed = "signed (HMAC-SHA256)" if w.secret_file else "unsigned"
        trust = f", CAs from {w.ca_file}" if w.ca_file else ""
        lines.append((f"webhook[{i}]", f"{', '.join(w.events)} to {display_url(w.url)}, {signed}{trust}"))
    for i, rule in enumerate(config.throttles):
        rate = f"{rule.messages_per_minute}/min" if rule.messages_per_minute else "no rate limit"
        cap = f"{rule.connections} connections" if rule.connections else "no connection cap of its own"
        pause = (f"pause {human_duration(rule.pause)} on 421 / 4.7.x, doubling up to 1h" if rule.pause
                 else "no pause")
        lines.append((f"throttle[{i}]", f"each of {_list(rule.domains)}: {rate}, {cap}, {pause}"))
    joined = " (the delivery process's included)" if d.process == "separate" else ""
    lines.append(("metrics", f"{config.metrics.endpoint}{joined}" if config.metrics.endpoint else "off"))
    if config.metrics.delivery_endpoint and d.process == "separate":
        lines.append(("metrics", f"delivery process alone on {config.metrics.delivery_endpoint}"))
    lines.append(("log", f"{config.log.format} to {config.log.file or 'the twistd log'}"))
    return lines
