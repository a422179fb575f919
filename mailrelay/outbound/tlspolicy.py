# -*- test-case-name: tests.test_tls_policy -*-
"""Which TLS each mail exchanger of a recipient domain must offer, and the record of what it did:
DANE (RFC 7672), MTA-STS (RFC 8461) and `[delivery] tls`, decided per exchanger.

Job in the journey: direct delivery (outbound.mx) resolves a domain, then asks `TLSPolicies.plan(domain,
hosts)` for one `HostPlan` per exchanger: the security mode and STARTTLS options for its sessions,
whether a failed check defers (`enforce`), or a `refusal` when it must not be tried at all.  After each
session outbound.mx calls `report(plan, session)`, which tells the ITLSReportSink (TLS reporting, RFC
8460), the metrics and, for failures, the log.

Precedence, per exchanger:
1. DANE, when `[delivery] dane` is on, the MX answer and the host's address answers were authenticated
   (RFC 7672 2.2.1 and 2.2.2) and `_PORT._tcp.HOST` has authenticated TLSA records: usable ones → STARTTLS
   required and the chain must match (outbound.dane); only unusable ones → STARTTLS required, not
   authenticated (RFC 7672 2.2); a TLSA lookup that fails → the host is not tried (4.7.5, RFC 7672
   2.2: an unknown answer could be an attack).  An unauthenticated TLSA answer is ignored.  DANE wins
   over MTA-STS for a host that has it (RFC 8461 2), the MX pattern check included.
2. MTA-STS, when `[delivery] mta_sts` is on and the domain has a policy in mode enforce or testing: a
   host matching the policy's MX patterns gets STARTTLS with the chain checked against `ca_file` (or the
   system's trust) and its name checked; under enforce a host that does not match is not tried, and a
   failed check defers (never plaintext, never another MX outside the policy); under testing delivery
   goes on as before and the failure is only recorded (RFC 8461 5).
3. `[delivery] tls`: "verify" checks chain and name (and defers on failure), "required" insists on
   STARTTLS, "opportunistic" uses it when offered, "none" never does.
Smarthost routes never come here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from mailrelay.outbound.dane import TLSA, usable
from mailrelay.outbound.dns import MXHost, ResolutionFailed
from mailrelay.outbound.tlsverify import PolicyTLS, UnverifiedTLS, Verdict, load_trust, policy_context
from mailrelay.interfaces import ITLSReportSink, Reply
from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.delivery.tlspolicy")

# [delivery] tls → the client's security mode ("required" and "verify" both insist on STARTTLS).
SECURITY = {"none": "none", "opportunistic": "opportunistic", "required": "starttls", "verify": "starttls"}
TLS_KEPT = 256          # PolicyTLS objects kept for reuse by exchanger and policy (their SSL context is shared)


@implementer(ITLSReportSink)
class NoReports:
    """The sink when nothing gathers TLS reports: every outcome is dropped."""

    def record(self, policy_domain, policy_type, policy_strings, mx_host, result_type, success, detail):
        return None


@dataclass(frozen=True)
class HostPlan:
    """How one exchanger is to be approached.  `kind`: "dane", "dane-unusable" (TLSA records, none
    usable), "mta-sts", "verify", or the plain `[delivery] tls` value; `security` and `tls_options` go
    to the client (SessionParams); `plaintext_fallback`: a failed handshake may be retried in clear
    (RFC 7435, opportunistic only); `refusal`: the host is not to be tried, and why."""
    host: MXHost
    kind: str
    security: str
    tls_options: Any = None
    plaintext_fallback: bool = False
    refusal: Optional[Reply] = None
    policy_domain: str = ""
    policy_type: str = "no-policy-found"
    policy_strings: tuple[str, ...] = ()
    problem: Optional[tuple[str, str]] = None      # recorded once before the host is tried (e.g. tlsa-invalid)


class TLSPolicies:
    """Plans (see the module docstring).  `lookup`: IDNSLookup; `mtasts`: an outbound.mtasts.MTASTS or
    None (off); `dane`: whether TLSA records are used; `sink`: ITLSReportSink; `metrics`: a
    mailrelay.metrics.Metrics or None."""

    def __init__(self, tls: str, *, lookup: Any = None, mtasts: Any = None, dane: bool = False,
                 mx_port: int = 25, ca_file: Any = None, trust: Any = None, sink: Any = None, metrics: Any = None):
        self.tls, self.lookup, self.mtasts, self.dane = tls, lookup, mtasts, dane and lookup is not None
        self.mx_port = mx_port
        self.trust = trust if trust is not None else (load_trust(ca_file) if ca_file is not None else None)
        self.sink = sink if sink is not None else NoReports()
        self.metrics = metrics
        self._kept: dict[tuple, PolicyTLS] = {}
        self._plain: dict[str, Any] = {}
        self._contexts: dict[bool, Any] = {}    # DANE or not -> the SSL context every PolicyTLS of it shares

    # -- planning ---------------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def plan(self, domain: str, hosts: list[MXHost]):
        """Deferred[list[HostPlan]], one per host, in order; never fails."""
        literal = domain.startswith("[")
        sts = None
        if self.mtasts is not None and not literal:
            answer = yield self.mtasts.policy_for(domain)
            if answer.problem is not None:
                self._record(domain, "sts", answer.policy.strings if answer.policy else (), None,
                             answer.problem[0], False, answer.problem[1])
            if answer.policy is not None and answer.policy.mode in ("enforce", "testing"):
                sts = answer.policy
        plans = []
        for host in hosts:
            tlsa = None
            if self.dane and host.secure and not literal:
                tlsa = yield self._tlsa(host)
            plans.append(self._plan_host(domain, host, tlsa, sts))
        return plans

    @defer.inlineCallbacks
    def _tlsa(self, host: MXHost):
        """The host's TLSA records (a tuple, maybe empty), None when there are none to heed, or a
        ResolutionFailed when the lookup failed."""
        try:
            answer = yield self.lookup.lookup(f"_{self.mx_port}._tcp.{host.name}", "TLSA")
        except ResolutionFailed as e:
            return e
        if not answer.authenticated or not answer.records:
            return None        # RFC 7672 2.1.1: an insecure answer is no DANE; none at all: no DANE
        return tuple(TLSA.from_rdata(r) for r in answer.records)

    def _plan_host(self, domain: str, host: MXHost, tlsa: Any, sts: Any) -> HostPlan:
        if isinstance(tlsa, ResolutionFailed):
            why = f"the TLSA lookup for {host.name} failed: {tlsa.reply.text}"
            return HostPlan(host, "dane", "starttls", refusal=Reply(451, "4.7.5", why), policy_domain=domain,
                            policy_type="tlsa", problem=("dnssec-invalid", why))
        if tlsa:
            strings = tuple(r.text() for r in tlsa)
            records = usable(tlsa)
            if records:
                options = self._options(host.name, "dane", records=records, policy=f"DANE ({host.name})")
                return HostPlan(host, "dane", "starttls", options, policy_domain=domain, policy_type="tlsa",
                                policy_strings=strings)
            # RFC 7672 2.2: TLSA records, none usable: TLS is still required, without authentication.
            return HostPlan(host, "dane-unusable", "starttls", self._unverified(host.name), policy_domain=domain,
                            policy_type="tlsa", policy_strings=strings,
                            problem=("tlsa-invalid", f"no usable TLSA record for {host.name}"))
        if sts is not None:
            enforce = sts.mode == "enforce"
            name = f"the MTA-STS policy of {domain}"
            if not sts.allows(host.name):
                why = f"{host.name} is not an MX host allowed by {name} ({' '.join(sts.mx)})"
                refusal = Reply(451, "4.7.5", why) if enforce else None
                base = self._base(host)
                return HostPlan(host, "mta-sts" if enforce else base.kind, base.security, base.tls_options,
                                base.plaintext_fallback, refusal, domain, "sts", sts.strings,
                                problem=("validation-failure", why))
            options = self._options(host.name, "mta-sts", enforce=enforce, policy=name)
            if enforce:
                return HostPlan(host, "mta-sts", "starttls", options, policy_domain=domain, policy_type="sts",
                                policy_strings=sts.strings)
            security = "starttls" if self.tls in ("required", "verify") else "opportunistic"
            # RFC 8461 5: "testing" changes nothing about delivery; failures are only reported.
            return HostPlan(host, "mta-sts-testing", security, options, plaintext_fallback=security != "starttls",
                            policy_domain=domain, policy_type="sts", policy_strings=sts.strings)
        base = self._base(host)
        return HostPlan(host, base.kind, base.security, base.tls_options, base.plaintext_fallback,
                        policy_domain=domain)

    def base(self, host: MXHost, domain: str = "") -> HostPlan:
        """The plan without any policy: `[delivery] tls` alone."""
        plan = self._base(host)
        return HostPlan(host, plan.kind, plan.security, plan.tls_options, plan.plaintext_fallback,
                        policy_domain=domain)

    def _base(self, host: MXHost) -> HostPlan:
        security = SECURITY[self.tls]
        options: Optional[IOpenSSLClientConnectionCreator]
        if self.tls == "verify":
            options = self._options(host.name, "verify", policy='[delivery] tls = "verify"')
        else:
            options = self._unverified(host.name) if security != "none" else None
        return HostPlan(host, self.tls, security, options, plaintext_fallback=self.tls == "opportunistic")

    def _options(self, name: str, kind: str, *, records=(), enforce: bool = True, policy: str = "") -> PolicyTLS:
        key = (name, kind, records, enforce, policy)
        options = self._kept.pop(key, None)
        if options is None:
            # A new options object per exchanger and policy (a connection it verified is reused only for
            # that same one, outbound.pool), over one shared context: past TLS_KEPT exchangers, building
            # a context (the system's trust loaded into it) for every batch would cost more than the mail.
            dane_kind = kind == "dane"
            context = self._contexts.get(dane_kind)
            if context is None:
                context = self._contexts[dane_kind] = policy_context(kind, self.trust)
            options = PolicyTLS(name, kind, trust=self.trust, records=records, enforce=enforce, policy=policy,
                                context=context)
        self._kept[key] = options
        while len(self._kept) > TLS_KEPT:
            self._kept.pop(next(iter(self._kept)))
        return options

    def _unverified(self, name: str):
        options = self._plain.pop(name, None) or UnverifiedTLS(name)
        self._plain[name] = options
        while len(self._plain) > TLS_KEPT:
            self._plain.pop(next(iter(self._plain)))
        return options

    # -- reporting --------------------------------------------------------------------------------------

    def refused(self, plan: HostPlan) -> None:
        """`plan`'s host is not tried (its refusal): recorded as a failure."""
        result, detail = plan.problem or ("validation-failure", plan.refusal.text if plan.refusal else "")
        self._record(plan.policy_domain, plan.policy_type, plan.policy_strings, plan.host.name, result, False, detail)

    def before(self, plan: HostPlan) -> None:
        """A problem known before the session (an MX outside a testing policy, unusable TLSA records)."""
        if plan.problem is not None and plan.refusal is None:
            self._record(plan.policy_domain, plan.policy_type, plan.policy_strings, plan.host.name,
                         plan.problem[0], False, plan.problem[1])

    def report(self, plan: HostPlan, session: Any, address: Optional[str] = None) -> None:
        """One session's TLS outcome (session: queue.results.SessionResult; `address`: the exchanger's
        address it ran on, RFC 8460 4.3 receiving-ip); a session on a reused connection was counted when
        that connection was made."""
        if session.reused or plan.problem is not None:
            return         # counted when the connection was made / by before(): one record per session
        verdict: Optional[Verdict] = session.tls_verdict
        if verdict is None:
            if session.tls_failed:
                verdict = Verdict(None, "validation-failure", f"the TLS handshake with {plan.host.name} failed",
                                  enforce=not plan.plaintext_fallback)
            elif session.tls is not None:
                verdict = Verdict(None)
            elif session.starttls_missing:
                verdict = Verdict(None, "starttls-not-supported", f"{plan.host.name} did not offer STARTTLS",
                                  enforce=plan.security == "starttls")
            else:
                return         # no TLS wanted, or the session ended before STARTTLS could be offered
        success = verdict.ok and (plan.kind in ("dane", "mta-sts", "mta-sts-testing", "verify")
                                  or session.tls is not None)
        detail = {"failure-reason-code": verdict.detail} if verdict.detail else {}
        if address:
            detail["receiving-ip"] = address
        self._record(plan.policy_domain, plan.policy_type, plan.policy_strings, plan.host.name,
                     verdict.result_type, success, detail)
        if not verdict.ok:
            log.info("{domain}: {host}: TLS {what} ({policy}): {result}: {detail}", domain=plan.policy_domain,
                     host=plan.host.name, what="refused" if verdict.enforce else "check failed, delivered anyway",
                     policy=plan.kind, result=verdict.result_type, detail=verdict.detail)

    def _record(self, domain, policy_type, strings, mx_host, result_type, success, detail) -> None:
        if self.metrics is not None:
            self.metrics.tls_policy_result(policy_type, result_type or "success")
        if not isinstance(detail, dict):       # RFC 8460 4.3: the reason, for whoever debugs the failure
            detail = {"failure-reason-code": detail} if detail else {}
        try:
            self.sink.record(domain, policy_type, tuple(strings), mx_host, result_type, success, detail)
        except Exception:
            log.failure("recording a TLS outcome for {domain} failed", domain=domain)
