# -*- test-case-name: tests.test_cli_route_policy -*-
"""The TLS policy lines of `mailrelay route-test` for direct delivery: the domain's MTA-STS policy (RFC
8461: the TXT id, the policy as the relay's cache holds it or as fetched now, its mode and MX patterns)
and each exchanger's DANE TLSA records (RFC 7672) with whether the resolver authenticated them — then
what each exchanger would get (outbound.tlspolicy's precedence: DANE, then MTA-STS, then `[delivery]
tls`).

Blocking, for the command line: DNS through the configured `nameservers` (dnspython), the policy over
HTTPS with the stdlib — the policy host resolved through the same nameservers, its certificate checked
against `[delivery] ca_file` or the system's trust, no redirect followed, at most 64 KiB.  Nothing is
written (the relay's own cache is only read).
"""
from __future__ import annotations

import http.client
import socket
import ssl
import time
from typing import Optional

from mailrelay.config import Config
from mailrelay.outbound.dane import TLSA, usable
from mailrelay.outbound.dns import MXHost, ResolutionFailed, lookup_sync
from mailrelay.outbound.mtasts import (
    MAX_POLICY_SIZE, Policy, PolicyInvalid, parse_policy, parse_txt, policy_url,
)
from mailrelay.outbound.mtasts_cache import PolicyCache

TIMEOUT = 30.0


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to `address` while naming (SNI, certificate, Host) the policy host."""

    def __init__(self, host: str, address: str, port: int, context: ssl.SSLContext):
        super().__init__(host, port, timeout=TIMEOUT, context=context)
        self._address, self._context_for_host = address, context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context_for_host.wrap_socket(sock, server_hostname=self.host)


def fetch_policy(resolver, domain: str, port: int, ca_file) -> tuple[Optional[Policy], str]:
    """(policy, "") fetched now, or (None, why not)."""
    host = f"mta-sts.{domain}"
    addresses: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            addresses += lookup_sync(resolver, host, rdtype).records
        except ResolutionFailed:
            pass
    if not addresses:
        return None, f"{host} has no address"
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    connection = _PinnedHTTPS(host, addresses[0], port, context)
    try:
        connection.request("GET", "/.well-known/mta-sts.txt", headers={"Accept": "text/plain"})
        response = connection.getresponse()
        if response.status != 200:
            return None, f"HTTP status {response.status} (redirects are not followed)"
        kind = (response.getheader("content-type") or "").split(";")[0].strip().lower()
        if kind != "text/plain":
            return None, f"media type {kind!r}, not text/plain"
        body = response.read(MAX_POLICY_SIZE + 1)
        if len(body) > MAX_POLICY_SIZE:
            return None, f"policy over {MAX_POLICY_SIZE} bytes"
        return parse_policy(body), ""
    except (OSError, http.client.HTTPException) as e:
        return None, f"cannot fetch {policy_url(domain, port)}: {e}"
    except PolicyInvalid as e:
        return None, f"invalid policy: {e}"
    finally:
        connection.close()


def sts_lines(config: Config, resolver, domain: str) -> tuple[list[str], Optional[Policy]]:
    if not config.delivery.mta_sts:
        return ["mta-sts: off (delivery.mta_sts)"], None
    try:
        answer = lookup_sync(resolver, f"_mta-sts.{domain}", "TXT")
        policy_id = parse_txt(list(answer.records))
    except ResolutionFailed as e:
        answer, policy_id = None, None
        lines = [f"mta-sts: TXT lookup failed: {e.reply.text}"]
    else:
        lines = [f"mta-sts: TXT id {policy_id}" if policy_id else "mta-sts: no (valid) _mta-sts TXT record"]
    cached = PolicyCache(config.spool).get(domain, time.time())
    policy: Optional[Policy]
    if cached is not None and (policy_id is None or cached.policy_id == policy_id):
        age = int(time.time() - cached.fetched_at)
        lines.append(f"mta-sts: cached policy id {cached.policy_id}, fetched {age}s ago")
        policy = cached.policy
    elif policy_id is not None:
        policy, why = fetch_policy(resolver, domain, config.delivery.mta_sts_port, config.delivery.ca_file)
        if policy is None:
            lines.append(f"mta-sts: policy not fetched: {why}"
                         + ("; the cached one applies" if cached else "; delivered as without a policy"))
            policy = cached.policy if cached else None
        else:
            lines.append("mta-sts: policy fetched now")
    else:
        policy = None
    if policy is not None:
        lines.append(f"mta-sts: mode {policy.mode}, max_age {policy.max_age}s, mx {' '.join(policy.mx) or '-'}")
    return lines, policy


def dane_lines(config: Config, resolver, host: MXHost) -> tuple[list[str], Optional[tuple]]:
    """The host's DANE lines and its TLSA records when DANE would apply (None: it would not)."""
    if not config.delivery.dane:
        return [], None
    if not host.secure:
        return [f"dane: {host.name}: MX or address answers not authenticated: DANE does not apply"], None
    name = f"_{config.delivery.mx_port}._tcp.{host.name}"
    try:
        answer = lookup_sync(resolver, name, "TLSA")
    except ResolutionFailed as e:
        return [f"dane: {name}: lookup failed ({e.reply.text}): the host would not be tried"], ()
    if not answer.records:
        return [f"dane: {name}: no TLSA records"], None
    records = tuple(TLSA.from_rdata(r) for r in answer.records)
    state = "authenticated" if answer.authenticated else "NOT authenticated: ignored"
    lines = [f"dane: {name} ({state}): {r.text()}" + ("" if r.usable else " (unusable)") for r in records]
    return lines, records if answer.authenticated else None


def policy_lines(config: Config, resolver, domain: str, hosts: list[MXHost]) -> list[str]:
    lines, policy = sts_lines(config, resolver, domain)
    for host in hosts:
        found, records = dane_lines(config, resolver, host)
        lines += found
        lines.append(f"tls: {host.name}: {_verdict(config, host, policy, records)}")
    return lines


def _verdict(config: Config, host: MXHost, policy: Optional[Policy], records) -> str:
    if records == ():
        return "not tried (TLSA lookup failed)"
    if records:
        return ("DANE: STARTTLS required, a TLSA record must match" if usable(records)
                else "DANE, no usable record: STARTTLS required, unauthenticated")
    if policy is not None and policy.mode in ("enforce", "testing"):
        if not policy.allows(host.name):
            return ("not tried: not an MX host of the MTA-STS policy" if policy.mode == "enforce"
                    else "MTA-STS testing: not an MX host of the policy (reported only)")
        if policy.mode == "enforce":
            return "MTA-STS enforce: STARTTLS required, certificate chain and name checked"
        return "MTA-STS testing: certificate checked and reported, delivered either way"
    return f"delivery.tls = {config.delivery.tls}"
