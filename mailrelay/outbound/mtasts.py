# -*- test-case-name: tests.test_mtasts -*-
"""MTA-STS (RFC 8461): a recipient domain's policy — discovered in DNS, fetched over HTTPS, parsed
strictly, cached durably — and which of its MX hosts it allows.

Job in the journey: outbound.tlspolicy asks `MTASTS.policy_for(domain)` before direct delivery to a
domain; the answer (`StsAnswer`) is the policy to apply (or none) and, when something went wrong, the
RFC 8460 result type to report.  In: the domain; the resolver (IDNSLookup: `_mta-sts.DOMAIN` TXT and the
policy host's addresses, through `[delivery] nameservers`); the policy cache (outbound.mtasts_cache).
Out: `Policy` values: mode, max_age, MX patterns.

RFC 8461 as implemented here:
- 3.1: exactly one TXT record starting "v=STSv1" (others are discarded), with an `id` of 1-32
  alphanumerics; anything else is "no policy published".
- 3.2: the policy at https://mta-sts.DOMAIN/.well-known/mta-sts.txt: `version: STSv1`, `mode`
  enforce | testing | none, `max_age` (0..31557600 seconds), one `mx` line or more unless the mode is
  none; unknown keys ignored; LF or CRLF line ends.
- 3.3: fetched with a verified certificate for the policy host (`[delivery] ca_file`, else the system's
  trust), no redirect followed (a 3xx is a failed fetch), only a 200 with media type text/plain, at most
  MAX_POLICY_SIZE bytes, within FETCH_TIMEOUT seconds.  The host is resolved through the delivery
  resolver, not the system's, and connected to with happy eyeballs (outbound.eyeballs).
- 4.1: an MX host matches a pattern equal to its name, or "*.rest" where it is one label more than
  "rest" (case-insensitive, trailing dots ignored).
- 5.1: a policy is used until max_age after it was fetched; a new one is fetched when the TXT id
  differs from the cached policy's, or the cached one is older than REFRESH_AFTER (or half its max_age,
  so that it is renewed before it expires); when no policy can be
  fetched (or the TXT record is gone) a cached one that has not expired is still applied.  A domain whose
  fetch failed is not asked again for RETRY_AFTER seconds (3.3 asks senders to rate-limit fetches).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet import defer
from twisted.python.failure import Failure

from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.delivery.mtasts")

MAX_AGE_LIMIT = 31557600         # RFC 8461 3.2: max_age is at most one year
MAX_POLICY_SIZE = 64 * 1024      # RFC 8461 3.3: "a maximum size of 64 KiB"
FETCH_TIMEOUT = 60.0             # RFC 8461 3.3 suggests a timeout of at least one minute
REFRESH_AFTER = 86400.0          # a cached policy older than this is fetched again (a failure keeps it)
RETRY_AFTER = 300.0              # seconds a failed fetch is not repeated for the same domain and id
MODES = ("enforce", "testing", "none")
_ID = re.compile(r"[A-Za-z0-9]{1,32}")                                   # RFC 8461 3.1 sts-id
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")               # sts-ext-name
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")                    # sts-ext-value
_POLICY_KEY = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_MX_PATTERN = re.compile(r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                         r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?")


class PolicyInvalid(ValueError):
    """A TXT record or policy that breaks RFC 8461's grammar; str() says where."""


class FetchFailed(Exception):
    """No policy could be fetched: `result_type` is "sts-policy-fetch-error", "sts-webpki-invalid"
    (the policy host's certificate) or "sts-policy-invalid" (a body that is no policy)."""

    def __init__(self, result_type: str, detail: str):
        super().__init__(detail)
        self.result_type = result_type


def parse_txt(strings: list[str]) -> Optional[str]:
    """The policy id from a domain's `_mta-sts` TXT records (each its strings joined), or None when
    there is no (single, valid) record: RFC 8461 3.1."""
    candidates = [s for s in strings if s.startswith("v=STSv1")]
    if len(candidates) != 1:
        return None        # "If the number of resulting records is not one ... assume no policy"
    fields = [f.strip(" \t") for f in candidates[0].split(";")]
    if fields and fields[-1] == "":
        fields.pop()       # a trailing ";" is allowed
    if not fields or fields[0] != "v=STSv1":
        return None
    found = None
    for field in fields[1:]:
        name, eq, value = field.partition("=")
        if not eq or not _EXT_NAME.fullmatch(name) or not _EXT_VALUE.fullmatch(value):
            return None
        if name == "id":
            if found is not None or not _ID.fullmatch(value):
                return None
            found = value
    return found


@dataclass(frozen=True)
class Policy:
    """A parsed policy (RFC 8461 3.2); `text` is the body as served (the TLS report's policy-string)."""
    mode: str
    max_age: int
    mx: tuple[str, ...]
    text: str = ""

    @property
    def strings(self) -> tuple[str, ...]:
        return tuple(line.rstrip("\r") for line in self.text.split("\n") if line.strip())

    def allows(self, host: str) -> bool:
        """RFC 8461 4.1: whether `host` matches one of the policy's MX patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: an exact name, or "*." and the rest: the host has exactly one more label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return pattern == host


def parse_policy(body: bytes) -> Policy:
    """The policy in `body` (RFC 8461 3.2), or PolicyInvalid."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyInvalid("the policy is not UTF-8 text") from None
    values: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line[:-1] if line.endswith("\r") else line      # RFC 8461 3.2: CRLF or LF ends a line
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon or not _POLICY_KEY.fullmatch(key):
            raise PolicyInvalid(f"line {number} is not 'key: value'")
        value = value.strip(" \t")
        if key == "mx":
            if not _MX_PATTERN.fullmatch(value):
                raise PolicyInvalid(f"line {number}: {value[:80]!r} is not an MX pattern")
            mx.append(value.lower().rstrip("."))
        elif key in ("version", "mode", "max_age"):
            if key in values:
                raise PolicyInvalid(f"line {number}: {key} given twice")
            values[key] = value
        # other keys: extensions, ignored (RFC 8461 3.2)
    if values.get("version") != "STSv1":
        raise PolicyInvalid("no 'version: STSv1'")
    mode = values.get("mode")
    if mode not in MODES:
        raise PolicyInvalid(f"mode must be enforce, testing or none, not {mode!r}")
    age = values.get("max_age", "")
    if not (age.isascii() and age.isdigit() and len(age) <= 10) or int(age) > MAX_AGE_LIMIT:
        raise PolicyInvalid(f"max_age must be 0..{MAX_AGE_LIMIT} seconds, not {age[:20]!r}")
    if mode != "none" and not mx:
        raise PolicyInvalid(f"mode {mode} needs at least one mx line")
    return Policy(mode, int(age), tuple(mx), text)


@dataclass(frozen=True)
class StsAnswer:
    """What policy_for() found: the policy to apply (None: no MTA-STS for this domain now); the TXT id;
    and a problem met on the way (result type, detail) for the TLS report, or None."""
    policy: Optional[Policy]
    policy_id: Optional[str] = None
    problem: Optional[tuple[str, str]] = None
    cached: bool = False


class MTASTS:
    """Policy discovery, fetch and cache (see the module docstring).  `fetch(domain)` returns a Deferred
    firing with the policy body (bytes) or failing with FetchFailed; `cache` is an
    mtasts_cache.PolicyCache; `lookup` an IDNSLookup."""

    def __init__(self, lookup: Any, fetch: Any, cache: Any, clock: Any):
        self.lookup, self.fetch, self.cache, self.clock = lookup, fetch, cache, clock
        self._failed: dict[str, tuple[Optional[str], float]] = {}     # domain -> (id, retry not before)
        self._in_flight: dict[str, list[defer.Deferred]] = {}   # domain -> callers waiting for one discovery

    def policy_for(self, domain: str) -> defer.Deferred:
        """Deferred[StsAnswer]; never fails.  Concurrent calls for one domain share one discovery.
        The domain is looked up, fetched and cached under its A-label (IDNA) form."""
        domain = domain.lower().rstrip(".")
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return defer.succeed(StsAnswer(None))      # no DNS name: no policy can exist
        # each caller its own: a caller's callbacks never see another's
        mine: defer.Deferred[StsAnswer] = defer.Deferred()
        waiters = self._in_flight.get(domain)
        if waiters is not None:
            waiters.append(mine)
            return mine
        waiters = self._in_flight[domain] = [mine]
        d = defer.maybeDeferred(self._discover, domain)
        d.addErrback(self._unexpected, domain)

        def done(result):
            del self._in_flight[domain]
            for waiter in waiters:
                waiter.callback(result)
        d.addCallback(done)
        return mine

    def _unexpected(self, failure: Failure, domain: str) -> StsAnswer:
        log.failure("{domain}: MTA-STS discovery failed locally", failure, domain=domain)
        cached = self.cache.get(domain, self.clock.seconds())
        return StsAnswer(cached.policy if cached else None, cached=cached is not None)

    @defer.inlineCallbacks
    def _discover(self, domain: str):
        from mailrelay.outbound.dns import ResolutionFailed

        now = self.clock.seconds()
        cached = self.cache.get(domain, now)        # None when absent or expired (RFC 8461 5.1)
        try:
            answer = yield self.lookup.lookup(f"_mta-sts.{domain}", "TXT")
            policy_id = parse_txt(list(answer.records))
        except ResolutionFailed:
            policy_id = None                        # unknown: a cached policy still holds (5.1)
        if policy_id is None:
            # RFC 8461 5.1: no live record, but an unexpired cached policy: apply it.
            return StsAnswer(cached.policy if cached else None, cached.policy_id if cached else None,
                             cached=cached is not None)
        refresh = min(REFRESH_AFTER, (cached.policy.max_age / 2) if cached is not None else 0)
        if cached is not None and cached.policy_id == policy_id and now - cached.fetched_at < refresh:
            return StsAnswer(cached.policy, policy_id, cached=True)
        failed = self._failed.get(domain)
        if failed is not None and failed[0] == policy_id and now < failed[1]:
            return StsAnswer(cached.policy if cached else None, policy_id, cached=cached is not None)
        try:
            body = yield self.fetch(domain)
            policy = parse_policy(body)
        except (FetchFailed, PolicyInvalid) as e:
            result = e.result_type if isinstance(e, FetchFailed) else "sts-policy-invalid"
            self._failed[domain] = (policy_id, now + RETRY_AFTER)
            log.info("{domain}: MTA-STS policy (id {id}) not fetched: {why}; {then}", domain=domain,
                     id=policy_id, why=str(e),
                     then="the cached policy stays in force" if cached else "delivering as without a policy")
            return StsAnswer(cached.policy if cached else None, policy_id, (result, str(e)),
                             cached=cached is not None)
        self._failed.pop(domain, None)
        self.cache.put(domain, policy, policy_id, now)
        if cached is None or cached.policy != policy:
            log.info("{domain}: MTA-STS policy id {id}: mode {mode}, max_age {age}, mx {mx}", domain=domain,
                     id=policy_id, mode=policy.mode, age=policy.max_age, mx=" ".join(policy.mx) or "-")
        return StsAnswer(policy, policy_id)


def policy_url(domain: str, port: int = 443) -> str:
    """RFC 8461 3.3: the well-known URL of a domain's policy."""
    netloc = f"mta-sts.{domain}" + ("" if port == 443 else f":{port}")
    return f"https://{netloc}/.well-known/mta-sts.txt"
