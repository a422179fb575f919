# -*- test-case-name: tests.test_mtasts -*-
"""The durable MTA-STS policy cache (RFC 8461 5.1): one small JSON file per recipient domain in
`<spool>/mta-sts/`, kept across restarts, so a policy seen once protects the domain for its max_age
even when an attacker later blocks the TXT record or the policy host.

Job in the journey: outbound.mtasts reads a domain's cached policy before deciding to fetch, and
writes each policy it fetched.  In/out: `CachedPolicy` (the policy text as served, its TXT id, the
time it was fetched).  A policy past its max_age is never returned and its file is removed.  A file
that cannot be read or parsed is ignored (as if absent; logged once).

Writes are atomic (oauth2.write_atomically: a temporary file beside it, fsync, rename, fsync the
directory); they are rare (a domain's policy at most
once per fetch) and small, so they run where the caller is.  Domain names become file names as their
lower-case IDNA (A-label) form, which has only letters, digits, "-" and "."; anything else is refused.
`mailrelay route-test` reads the same files.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mailrelay.outbound.mtasts import Policy, PolicyInvalid, parse_policy
from mailrelay.outbound.oauth2 import write_atomically
from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.delivery.mtasts")

DIRECTORY = "mta-sts"
MEMORY_KEPT = 10_000           # domains whose policy (or absence) is also kept in memory
_SAFE = re.compile(r"[a-z0-9][a-z0-9.-]{0,252}")


@dataclass(frozen=True)
class CachedPolicy:
    policy: Policy
    policy_id: str
    fetched_at: float

    def expired(self, now: float) -> bool:
        return now >= self.fetched_at + self.policy.max_age


def file_name(domain: str) -> Optional[str]:
    try:
        name = domain.lower().rstrip(".").encode("idna").decode("ascii")
    except UnicodeError:
        return None
    if not _SAFE.fullmatch(name) or ".." in name:
        return None
    return name + ".json"


class PolicyCache:
    """Policies by domain, on disk under `spool`/mta-sts and in memory in front of it (only in memory
    when `spool` is None)."""

    def __init__(self, spool: Optional[Path]):
        self.directory = Path(spool) / DIRECTORY if spool is not None else None
        self._memory: dict[str, Optional[CachedPolicy]] = {}

    def get(self, domain: str, now: float) -> Optional[CachedPolicy]:
        """The domain's cached policy, or None when there is none or it has expired."""
        domain = domain.lower().rstrip(".")
        if domain in self._memory:
            cached = self._memory[domain]
        else:
            cached = self._read(domain)
            self._remember(domain, cached)
        if cached is not None and cached.expired(now):
            self.forget(domain)
            return None
        return cached

    def put(self, domain: str, policy: Policy, policy_id: str, now: float) -> None:
        domain = domain.lower().rstrip(".")
        cached = CachedPolicy(policy, policy_id, now)
        self._remember(domain, cached)
        name = file_name(domain)
        if name is None or self.directory is None:
            return
        record = {"domain": domain, "id": policy_id, "fetched_at": now, "policy": policy.text}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomically(self.directory / name, json.dumps(record).encode("utf-8"))
        except OSError as e:
            log.error("{domain}: cannot save the MTA-STS policy in {directory}: {why}", domain=domain,
                      directory=str(self.directory), why=e.strerror or str(e))

    def forget(self, domain: str) -> None:
        domain = domain.lower().rstrip(".")
        self._memory.pop(domain, None)
        name = file_name(domain)
        if name is not None and self.directory is not None:
            try:
                (self.directory / name).unlink()
            except OSError:
                pass

    def domains(self) -> list[str]:
        """Every domain with a policy file (for route-test and tests)."""
        if self.directory is None:
            return sorted(d for d, c in self._memory.items() if c is not None)
        try:
            return sorted(p.name[:-5] for p in self.directory.glob("*.json"))
        except OSError:
            return []

    def _remember(self, domain: str, cached: Optional[CachedPolicy]) -> None:
        if len(self._memory) >= MEMORY_KEPT:
            self._memory.pop(next(iter(self._memory)))
        self._memory[domain] = cached

    def _read(self, domain: str) -> Optional[CachedPolicy]:
        name = file_name(domain)
        if name is None or self.directory is None:
            return None
        path = self.directory / name
        try:
            record = json.loads(path.read_bytes())
            return CachedPolicy(parse_policy(record["policy"].encode("utf-8")), str(record["id"]),
                                float(record["fetched_at"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, PolicyInvalid) as e:
            log.warn("{domain}: ignoring the cached MTA-STS policy {path}: {why}", domain=domain,
                     path=str(path), why=str(e)[:200])
            return None

