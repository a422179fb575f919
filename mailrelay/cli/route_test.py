# -*- test-case-name: tests.test_cli_route_test -*-
"""`mailrelay route-test ADDRESS [--sender S] [--from-domain D] --config F`: what the relay would do with a
recipient, without sending anything — the route (and any fallback after failed attempts), the transport or
the MX hosts resolved with the configured DNS, the TLS policy (for direct delivery: the domain's MTA-STS
policy, each exchanger's DANE records and whether they were authenticated, and what each exchanger would
get), how a smarthost would authenticate, and the DKIM keys that would sign.  For an OAuth2 transport it
asks the token endpoint for a token right now and says whether one came (and for how long it is valid)
or why not; the token itself is never shown.

Exit status: 0 when the address can be routed, 1 when DNS says it cannot (null MX, no such domain), 2 for a
config error, a temporary DNS failure or no OAuth2 token to be had. Nothing is written (except a refresh
token the endpoint rotates, saved as the relay would) and no connection is made except DNS queries, that
token request, and the MTA-STS policy fetch when the relay has no cached policy for the TXT record's id.
"""
from __future__ import annotations

import sys

from mailrelay.config import Config, ConfigError, load
from mailrelay.outbound.dns import ResolutionFailed, address_literal, check_domain, make_resolver, resolve_sync
from mailrelay.queue.routes import Router
from mailrelay.envelope import domain_of

ATTEMPTS_SHOWN = 10     # fallback routes with after_attempts up to this are listed


def register(subparsers) -> None:
    parser = subparsers.add_parser("route-test", help="show how a recipient would be delivered")
    parser.add_argument("address")
    parser.add_argument("--sender", default="", help="envelope sender (default: <>)")
    parser.add_argument("--from-domain", help="From: header domain for DKIM (default: the sender's)")
    parser.add_argument("--config", required=True)
    parser.set_defaults(func=run)


def auth_text(t) -> str:
    """How transport `t` logs in, without any secret."""
    kind = t.auth_kind
    cert = f", client certificate {t.client_cert}" if t.client_cert else ""
    if kind == "none":
        return "auth: none" + cert
    if kind == "password":
        return f"auth: password (PLAIN/LOGIN) as {t.username}, only over TLS{cert}"
    grant = "refresh-token" if t.oauth2.grant == "refresh_token" else "client-credentials"
    return f"auth: {kind} (OAuth2 bearer token) as {t.username}, {grant} grant from {t.oauth2.token_url}{cert}"


def token_text(t) -> tuple[str, bool]:
    """("token: ...", whether one was had) for an OAuth2 transport: one real request to its endpoint."""
    from twisted.internet import task

    from mailrelay.outbound.oauth2 import BearerToken, OAuth2TokenSource, blocking_post

    try:
        source = OAuth2TokenSource(t.name, t.oauth2, clock=task.Clock(), post=blocking_post(t.oauth2.ca_file))
    except OSError as e:
        return f"token: unavailable now: cannot read {e.filename}: {e.strerror}", False
    outcome: list = []
    source.token().addBoth(outcome.append)      # the blocking post has answered before token() returns
    if outcome and isinstance(outcome[0], BearerToken):
        return f"token: available now, valid for {int(outcome[0].expires_at)}s (not shown)", True
    reason = outcome[0].value if outcome else "no answer"
    return f"token: unavailable now: {reason} (mail for this transport would wait, 454 4.7.0)", False


def describe_route(config: Config, route, index: int | None, tokens: dict | None = None) -> list[str]:
    """The lines for `route`; with `tokens` (a dict kept across calls), an OAuth2 transport's token is
    asked for (once per transport): `tokens[name]` is (its line, whether one was had)."""
    source = config.delivery.source_address
    if route is None:
        return ["route: none matches: direct delivery by MX",
                f"tls: {config.delivery.tls} (delivery.tls), port {config.delivery.mx_port}"
                + (f", from {source} (delivery.source_address)" if source else "")]
    t = config.transports[route.transport]
    bind = t.bind_address(source)
    origin = f"transports.{t.name}.source_address" if t.source_address else "delivery.source_address"
    lines = [f"route: route[{index}] -> transport {route.transport}"
             + (f" (after {route.after_attempts} failed attempts)" if route.after_attempts else ""),
             f"transport: {t.place} security={t.security} verify={'yes' if t.verify else 'no'}"
             + (f", from {bind} ({origin})" if bind else ""),
             auth_text(t)]
    if t.oauth2 is not None and tokens is not None:
        if t.name not in tokens:
            tokens[t.name] = token_text(t)
        lines.append(tokens[t.name][0])
    return lines


def mx_lines(config: Config, domain: str) -> tuple[list[str], int]:
    """The MX hosts, then the TLS policy lines (cli.route_policy) of a domain that has a name."""
    resolver = make_resolver(config.delivery.nameservers)
    try:
        hosts = address_literal(domain)
        literal = hosts is not None
        if hosts is None:
            check_domain(domain)
            hosts = resolve_sync(resolver, domain)
    except ResolutionFailed as e:
        return [f"mx: {e.reply}"], (2 if e.temporary else 1)
    lines = [f"mx: {h.preference:>3} {h.name} [{', '.join(h.addresses)}]" + (" (authenticated)" if h.secure else "")
             for h in hosts]
    if not literal:
        from mailrelay.cli.route_policy import policy_lines

        lines += policy_lines(config, resolver, domain, hosts)
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
    tokens: dict = {}
    lines += describe_route(config, first, _index(config, first), tokens)
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
                "  " + line for line in describe_route(config, later, _index(config, later), tokens)
            ]
    from_domain = args.from_domain or domain_of(args.sender)
    lines += dkim_lines(config, from_domain)
    print("\n".join(lines))
    return 2 if status == 0 and not all(ok for _, ok in tokens.values()) else status


def _index(config: Config, route) -> int | None:
    return None if route is None else next(i for i, r in enumerate(config.routes) if r is route)
