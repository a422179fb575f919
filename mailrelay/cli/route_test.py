"""`mailrelay route-test ADDRESS [--sender S] [--from-domain D] --config F`: what the relay would do with a
recipient, without sending anything — the route (and any fallback after failed attempts), the transport or
the MX hosts resolved with the configured DNS, the TLS policy, and the DKIM keys that would sign.

Exit status: 0 when the address can be routed, 1 when DNS says it cannot (null MX, no such domain), 2 for a
config error or a temporary DNS failure. Nothing is written and no connection is made except DNS queries.
"""
from __future__ import annotations

import sys

from mailrelay.config import Config, ConfigError, load
from mailrelay.delivery.dns import ResolutionFailed, address_literal, check_domain, make_resolver, resolve_sync
from mailrelay.delivery.routes import Router
from mailrelay.envelope import domain_of

ATTEMPTS_SHOWN = 10     # fallback routes with after_attempts up to this are listed


def register(subparsers) -> None:
    parser = subparsers.add_parser("route-test", help="show how a recipient would be delivered")
    parser.add_argument("address")
    parser.add_argument("--sender", default="", help="envelope sender (default: <>)")
    parser.add_argument("--from-domain", help="From: header domain for DKIM (default: the sender's)")
    parser.add_argument("--config", required=True)
    parser.set_defaults(func=run)


def describe_route(config: Config, route, index: int | None) -> list[str]:
    source = config.delivery.source_address
    if route is None:
        return ["route: none matches: direct delivery by MX",
                f"tls: {config.delivery.tls} (delivery.tls), port {config.delivery.mx_port}"
                + (f", from {source} (delivery.source_address)" if source else "")]
    t = config.transports[route.transport]
    auth = f", AUTH as {t.username} (only over TLS)" if t.username else ""
    bind = t.bind_address(source)
    origin = f"transports.{t.name}.source_address" if t.source_address else "delivery.source_address"
    return [f"route: route[{index}] -> transport {route.transport}"
            + (f" (after {route.after_attempts} failed attempts)" if route.after_attempts else ""),
            f"transport: {t.host}:{t.port} security={t.security} verify={'yes' if t.verify else 'no'}{auth}"
            + (f", from {bind} ({origin})" if bind else "")]


def mx_lines(config: Config, domain: str) -> tuple[list[str], int]:
    try:
        hosts = address_literal(domain)
        if hosts is None:
            check_domain(domain)
            hosts = resolve_sync(make_resolver(config.delivery.nameservers), domain)
    except ResolutionFailed as e:
        return [f"mx: {e.reply}"], (2 if e.temporary else 1)
    lines = [f"mx: {h.preference:>3} {h.name} [{', '.join(h.addresses)}]" for h in hosts]
    return lines, 0


def dkim_lines(config: Config, from_domain: str) -> list[str]:
    if config.dkim.mode != "sign":
        return ["dkim: passthrough: messages are never signed or altered"]
    from mailrelay.dkim.signer import Signer
    from mailrelay.dkim.keys import SigningKey, load_private_key

    signer = Signer(SigningKey(k.domain, k.selector, load_private_key(k.key_file)) for k in config.dkim.keys)
    keys = signer.keys_for(from_domain) if from_domain else []
    if not keys:
        return [f"dkim: no key for {from_domain or '(no domain)'}: sent unsigned"]
    return [f"dkim: signs as d={k.domain} s={k.selector} ({k.algorithm.decode()})" for k in keys]


def run(args) -> int:
    try:
        config = load(args.config)
    except ConfigError as e:
        print(f"mailrelay route-test: {e}", file=sys.stderr)
        return 2
    domain = domain_of(args.address)
    if not domain:
        print(f"mailrelay route-test: {args.address!r} has no domain", file=sys.stderr)
        return 2
    router = Router(config.routes)
    first = router.route(args.sender, args.address, 0)
    lines = [f"recipient: {args.address}", f"sender: <{args.sender}>"]
    lines += describe_route(config, first, _index(config, first))
    status = 0
    if first is None:
        found, status = mx_lines(config, domain)
        lines += found
    seen = {id(first)}
    for attempts in range(1, ATTEMPTS_SHOWN + 1):
        later = router.route(args.sender, args.address, attempts)
        if id(later) not in seen:
            seen.add(id(later))
            lines += [f"after {attempts} failed attempt(s):"] + [
                "  " + line for line in describe_route(config, later, _index(config, later))
            ]
    from_domain = args.from_domain or domain_of(args.sender)
    lines += dkim_lines(config, from_domain)
    print("\n".join(lines))
    return status


def _index(config: Config, route) -> int | None:
    return None if route is None else next(i for i, r in enumerate(config.routes) if r is route)
