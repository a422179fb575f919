# -*- test-case-name: tests.test_mx, tests.test_capabilities, tests.test_tlsrpt_delivery -*-
"""Direct delivery: hand a message to the recipient domain's own mail exchangers (no smarthost).

Job in the journey: the next hop the scheduler uses when no route names a transport.  In: a spooled
message and its recipients of one domain (deliver), or several such messages (deliver_batch: they
share one connection to each exchanger tried).  Out: a Deferred firing with one RecipientResult per
recipient (never failing): 2xx delivered, 5xx bounced, 4xx to be retried later by the scheduler.

How: resolve the domain (outbound.dns: MX by preference, shuffled among equals, implicit MX, null MX),
ask outbound.tlspolicy how each exchanger must be approached (DANE, RFC 7672; MTA-STS, RFC 8461; else
`[delivery] tls`: an exchanger a policy forbids is never connected to), then try the exchangers in order
with the delivery client on `[delivery] mx_port`, bound to `source_address` when set (and then only to
addresses of its family).  Each session's TLS outcome goes back to outbound.tlspolicy for reporting.
Each exchanger's addresses are raced by outbound.eyeballs (RFC 8305: IPv6 first, families alternating,
a new attempt every 250 ms, the first connection wins); a session that fails before MAIL FROM leaves
the addresses not yet tried for another race.  A 2xx or 5xx settles a recipient; a 4xx or a failed
connection leaves it for the next exchanger; what is unsettled after the last one keeps its last 4xx.
RFC 5321 §5.1 (trying exchangers in order), RFC 5321 §4.2 (reply classes), RFC 3207 and RFC 7435
(opportunistic TLS: a failed handshake falls back to plaintext once, on the same address, but never under
DANE, an enforced MTA-STS policy, "required" or "verify"), RFC 7505, RFC 8689 (a REQUIRETLS message
refused by one exchanger tries the next; a message tagged `TLS-Required: No` is sent as opportunistic
TLS would send it when the TLS policy — `[delivery] tls`, MTA-STS or DANE — cannot be met).

Connection reuse: sessions that end cleanly wait in an outbound.pool.ConnectionPool keyed by the address
connected to, port, source address, security and TLS requirement (outbound.pool.ByAddress), and the next
batch to any exchanger with that address — for any domain, under any exchanger name — starts at MAIL
FROM on it, provided the connection's TLS proved what that batch's policy needs: nothing (opportunistic,
"required", unusable TLSA records: any name at the address may share) or, for DANE, MTA-STS and
"verify", the same host name and TLSA set or policy (the TLS options object, built once per exchanger
name and policy and kept, so equal checks share one object).
`close_idle()` says QUIT on them all.

Reported as soon as settled (docs/crash-safety.md section 2): with `on_settled`, a job whose every
recipient has a final answer (2xx or 5xx, from this exchanger or an earlier one) is handed over right
after that reply, and the next job on the connection waits for the record.  A job with a recipient
left at 4xx is reported at the end, once the later exchangers have had their say.

TLS reports (RFC 8460): with a `tls_reports` sink (interfaces.ITLSReportSink), outbound.tlspolicy
records the TLS outcome of every new session with an exchanger for the recipient domain, under the
policy that applied ("sts", "tlsa", or "no-policy-found": RFC 8460 4.4 reports those sessions too).
"""
from __future__ import annotations

import ipaddress
from typing import Any, Callable, Optional

from twisted.internet import defer, endpoints
from zope.interface import implementer

from mailrelay.config import DeliveryConfig
from mailrelay.outbound.connect import deliver_over
from mailrelay.queue.job import Job, OnSettled, SessionParams, Timeouts
from mailrelay.outbound.dns import MXHost, MXResolver, ResolutionFailed
from mailrelay.outbound.eyeballs import CONNECTION_ATTEMPT_DELAY, HappyEyeballsEndpoint, interleave
from mailrelay.outbound.pool import UNAUTHENTICATED, ByAddress, ConnectionPool
from mailrelay.outbound.requiretls import tls_optional
from mailrelay.queue.results import RecipientResult, SessionResult, settle_all
from mailrelay.outbound.tlspolicy import HostPlan, TLSPolicies
from mailrelay.outbound.tlsverify import UnverifiedTLS
from mailrelay.envelope import domain_of
from mailrelay.interfaces import IBatchNextHop, IDNSLookup, INextHop, IPooledNextHop
from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.delivery.mx")

MAX_ADDRESSES = 10     # connection attempts per delivery, over all exchangers (Postfix: smtp_mx_address_limit)

__all__ = ["MXDelivery", "UnverifiedTLS"]


def _family(address: str) -> int:
    return ipaddress.ip_address(address).version


@implementer(INextHop, IBatchNextHop, IPooledNextHop)
class MXDelivery:
    """Direct-to-MX next hop.  `resolver`, `trust_root` (for "verify" and MTA-STS; default `[delivery]
    ca_file`, else the system's), `timeouts`, `pool` (idle connections; default a new ConnectionPool) and
    `send` (replacing the client's deliver_over, then called as send(endpoint, params, jobs, reactor),
    without connection reuse) may be replaced, mostly by tests.  `policies` decides each exchanger's TLS
    (outbound.tlspolicy); by default it is built from `[delivery]`: MTA-STS (its cache under `spool`, in
    memory only without one) and DANE when they are on and the resolver answers single lookups
    (IDNSLookup), outcomes told to `tls_reports` (an ITLSReportSink) and `metrics`."""

    def __init__(
        self,
        delivery: DeliveryConfig,
        hostname: str,
        reactor: Any = None,
        resolver: Optional[MXResolver] = None,
        trust_root: Any = None,
        timeouts: Timeouts = Timeouts(),
        send: Optional[Callable[..., defer.Deferred]] = None,
        pool: Optional[ConnectionPool] = None,
        policies: Optional[TLSPolicies] = None,
        spool: Any = None,
        tls_reports: Any = None,
        metrics: Any = None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.delivery = delivery
        self.hostname = hostname
        self.reactor = reactor
        self.resolver = resolver or MXResolver(delivery.nameservers, reactor, cache_size=delivery.dns_cache_size)
        self.trust_root = trust_root
        self.timeouts = timeouts
        self.send = send
        # One address may be every domain's exchanger (a hosting provider): as many idle connections to it
        # as deliveries may run at once, not the per-destination bound a smarthost's pool has.
        self.pool = pool if pool is not None else ConnectionPool(reactor, max_idle=max(1, delivery.concurrency))
        self.policies = policies if policies is not None else self._default_policies(spool, tls_reports, metrics)
        self.attempt_delay = CONNECTION_ATTEMPT_DELAY   # RFC 8305 §5 stagger between connection attempts
        self.plaintext_fallbacks = 0     # opportunistic TLS handshakes that failed and were retried in clear

    def _default_policies(self, spool: Any, sink: Any, metrics: Any) -> TLSPolicies:
        d = self.delivery
        lookup = self.resolver if IDNSLookup.providedBy(self.resolver) else None
        mtasts = None
        if d.mta_sts and lookup is not None:
            from mailrelay.outbound.mtasts import MTASTS
            from mailrelay.outbound.policyhttp import fetcher as treq_fetcher
            from mailrelay.outbound.mtasts_cache import PolicyCache

            fetch = treq_fetcher(self.reactor, lookup, d.mta_sts_port, d.ca_file)
            mtasts = MTASTS(lookup, fetch, PolicyCache(spool), self.reactor)
        return TLSPolicies(d.tls, lookup=lookup, mtasts=mtasts, dane=d.dane, mx_port=d.mx_port,
                           ca_file=d.ca_file, trust=self.trust_root, sink=sink, metrics=metrics)

    def deliver(self, message, recipients) -> defer.Deferred:
        """One RecipientResult per recipient (all of one domain), in order; the Deferred never fails."""
        return self.deliver_batch([Job(message, tuple(recipients))]).addCallback(lambda results: results[0])

    def deliver_batch(self, jobs, on_settled: Optional[OnSettled] = None) -> defer.Deferred:
        """IBatchNextHop: several messages for one recipient domain, all on one connection to each
        exchanger tried.  One list of RecipientResult per job, in order; the Deferred never fails.
        `on_settled(index, results)` hears of each job whose recipients are all settled for good as soon
        as they are (see the module docstring)."""
        jobs = [Job(job.message, tuple(job.recipients)) for job in jobs]
        d = defer.maybeDeferred(self._deliver_jobs, jobs, on_settled)

        def local_error(failure):
            log.failure("{queue_id}: direct delivery failed locally", failure,
                        queue_id=_queue_ids(jobs))
            return [list(settle_all(job.recipients, 451, "4.3.0", "local error in direct delivery"))
                    for job in jobs]

        return d.addErrback(local_error)

    @defer.inlineCallbacks
    def _deliver_jobs(self, jobs: list[Job], on_settled: Optional[OnSettled] = None):
        results: list[list[RecipientResult]] = [[] for _ in jobs]
        by_domain: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            if job.recipients:
                by_domain.setdefault(domain_of(job.recipients[0]), []).append(index)
        for domain, indexes in by_domain.items():     # the scheduler sends one domain per batch
            group = [jobs[i] for i in indexes]
            try:
                hosts = yield self.resolver.resolve(domain)
            except ResolutionFailed as e:
                log.info("{queue_id}: {domain}: {reply}", queue_id=_queue_ids(group), domain=domain,
                         reply=str(e.reply))
                settled = [list(settle_all(j.recipients, e.reply.code, e.reply.status, e.reply.text))
                           for j in group]
            else:
                report = None if on_settled is None else (
                    lambda k, job_results, indexes=indexes: on_settled(indexes[k], job_results))
                plans = yield self.policies.plan(domain, hosts)
                settled = yield self._try_hosts(group, plans, report)
            for i, job_results in zip(indexes, settled):
                results[i] = job_results
        return results

    def _candidates(self, plans: list[HostPlan]) -> list[tuple[HostPlan, list[str]]]:
        """Each exchanger with its addresses in happy-eyeballs order (RFC 8305 §4: IPv6 first, then the
        families alternating); only our source address's family when one is set; MAX_ADDRESSES in all.
        An exchanger its TLS policy refuses comes with no address (it is not tried)."""
        family = _family(self.delivery.source_address) if self.delivery.source_address else None
        left = MAX_ADDRESSES
        candidates: list[tuple[HostPlan, list[str]]] = []
        for plan in plans:
            if plan.refusal is not None:
                candidates.append((plan, []))
                continue
            host = plan.host
            addresses = interleave(a for a in host.addresses if family is None or _family(a) == family)[:left]
            if addresses:
                candidates.append((plan, addresses))
                left -= len(addresses)
            if left <= 0:
                break
        return candidates

    @defer.inlineCallbacks
    def _try_hosts(self, jobs: list[Job], plans: list[HostPlan], on_settled: Optional[OnSettled] = None):
        final: list[dict[str, RecipientResult]] = [{} for _ in jobs]
        last: list[dict[str, RecipientResult]] = [{} for _ in jobs]
        answered_hosts: set[str] = set()
        reported: set[int] = set()
        hosts = [plan.host for plan in plans]
        refused = 0
        for plan, addresses in self._candidates(plans):
            host = plan.host
            if plan.refusal is not None:
                # A TLS policy forbids this exchanger (RFC 8461 4.1 / RFC 7672 2.2): never connect to it.
                refused += 1
                self.policies.refused(plan)
                for i, job in enumerate(jobs):
                    for rcpt in job.recipients:
                        if rcpt not in final[i]:
                            last[i][rcpt] = RecipientResult(rcpt, plan.refusal.code, plan.refusal.status,
                                                            plan.refusal.text, host.name)
                continue
            self.policies.before(plan)
            untried, sessions = addresses, 0
            # RFC 5321 §5.1: an exchanger that failed before MAIL FROM (no connection, a 421 greeting,
            # a failed STARTTLS) leaves its other addresses to try, then the next exchanger.
            while untried and sessions < len(addresses) and host.name not in answered_hosts:
                pending = [(i, tuple(r for r in job.recipients if r not in final[i])) for i, job in enumerate(jobs)]
                pending = [(i, recipients) for i, recipients in pending if recipients]
                if not pending:
                    break
                tried = [Job(jobs[i].message, recipients) for i, recipients in pending]
                report = None if on_settled is None else self._reporter(jobs, pending, final, reported, on_settled)
                endpoint = self._eyeballs(untried)
                session = yield self._attempt(tried, plan, endpoint, report)
                sessions += 1
                for (i, recipients), job_results in zip(pending, session.jobs):
                    for rcpt, result in zip(recipients, job_results):
                        # RFC 5321 §4.2.1: 2xx and 5xx are final; a 4xx leaves the recipient for the next exchanger.
                        (final[i] if _final(result) else last[i])[rcpt] = result
                if not session.before_mail:
                    answered_hosts.add(host.name)    # it answered (4xx): its other addresses would too
                untried = endpoint.untried()
                for i, recipients in pending:
                    unsettled = [last[i][r] for r in recipients if r not in final[i]]
                    if unsettled:
                        # remote_host names the address that answered ("mx[192.0.2.1]") when one did.
                        log.info("{queue_id}: {where}: {count} recipient(s) not settled: {reply}",
                                 queue_id=jobs[i].message.queue_id, where=unsettled[0].remote_host or host.name,
                                 count=len(unsettled),
                                 reply=f"{unsettled[0].code} {unsettled[0].status} {unsettled[0].text}")
        if refused and refused == len(plans):
            # Said in the recipients' state (queue list/show) and the log: nothing was even tried.
            domain, refusal = plans[0].policy_domain, plans[-1].refusal
            assert refusal is not None          # every plan was refused
            why = f"mail waits: the TLS policy refuses every MX host of {domain}: {refusal.text}"
            log.info("{queue_id}: {domain}: {why}", queue_id=_queue_ids(jobs), domain=domain, why=why)
            return [list(settle_all(job.recipients, 451, "4.7.5", why)) for job in jobs]
        return [[final[i].get(r) or last[i].get(r) or _unreachable(r, hosts) for r in job.recipients]
                for i, job in enumerate(jobs)]

    @staticmethod
    def _reporter(jobs: list[Job], pending: list, final: list, reported: set[int],
                  on_settled: OnSettled) -> OnSettled:
        """The client's on_settled for one exchanger: position `k` of the session is job pending[k][0];
        it is passed on once every recipient of that job has a final (2xx/5xx) answer."""
        def report(k: int, job_results: list) -> Optional[defer.Deferred]:
            i, recipients = pending[k]
            for rcpt, result in zip(recipients, job_results):
                if _final(result):                              # RFC 5321 §4.2.1: final answers
                    final[i][rcpt] = result
            if i in reported or any(r not in final[i] for r in jobs[i].recipients):
                return None
            reported.add(i)
            return on_settled(i, [final[i][r] for r in jobs[i].recipients])
        return report

    @defer.inlineCallbacks
    def _attempt(self, jobs: list[Job], plan: HostPlan, endpoint: HappyEyeballsEndpoint,
                 on_settled: Optional[OnSettled] = None):
        host = plan.host
        session: SessionResult = yield self._session(jobs, host, endpoint, plan.security, on_settled,
                                                     plan.tls_options)
        self.policies.report(plan, session, endpoint.connected)
        if endpoint.connected and endpoint.failures:     # e.g. a broken IPv6 route, hidden by the race
            log.info("{queue_id}: {host}: connected to {address} after {failed}", queue_id=_queue_ids(jobs),
                     host=host.name, address=endpoint.connected,
                     failed="; ".join(f"{a}: {reason.value}" for a, reason in endpoint.failures))
        if session.tls_failed and plan.plaintext_fallback:
            session = yield self._plaintext_retry(jobs, host, endpoint, on_settled)
        elif not plan.plaintext_fallback and plan.security != "none" and _policy_failed(session):
            session = yield self._tls_optional_retry(jobs, host, endpoint, session, on_settled)
        return session

    def _plaintext_retry(self, jobs: list[Job], host: MXHost, endpoint: Any,
                         on_settled: Optional[OnSettled]) -> defer.Deferred:
        # RFC 7435 §3 / Twisted #10334: opportunistic TLS that fails its handshake is retried once in
        # plaintext on the same address; "required" and "verify" never fall back (but see below).
        self.plaintext_fallbacks += 1
        address = endpoint.connected
        log.info("{queue_id}: TLS handshake with {host}[{address}] failed; retrying once in plaintext",
                 queue_id=_queue_ids(jobs), host=host.name, address=address)
        again = self._eyeballs([address]) if address else endpoint
        return self._session(jobs, host, again, "none", on_settled, after_tls_failure=True)

    @defer.inlineCallbacks
    def _tls_optional_retry(self, jobs: list[Job], host: MXHost, endpoint: Any, session: SessionResult,
                            on_settled: Optional[OnSettled]):
        """The domain's TLS policy failed on this exchanger (no STARTTLS, or a handshake or certificate
        check that failed): the messages tagged `TLS-Required: No` (RFC 8689 4.2.2, outbound.requiretls)
        are tried once more as opportunistic TLS would send them; the others keep their 4xx."""
        optional = [k for k, job in enumerate(jobs) if tls_optional(job.message)]
        if not optional:
            return session
        subset = [jobs[k] for k in optional]
        log.info("{queue_id}: {host}: TLS policy {policy} failed; sent anyway (TLS-Required: No)",
                 queue_id=_queue_ids(subset), host=host.name, policy=self.delivery.tls)
        report = None if on_settled is None else (lambda k, results: on_settled(optional[k], results))
        again = self._eyeballs([endpoint.connected]) if endpoint.connected else endpoint
        retry = yield self._session(subset, host, again, "opportunistic", report, UnverifiedTLS(host.name))
        if retry.tls_failed:
            retry = yield self._plaintext_retry(subset, host, again, report)
        merged = list(session.jobs)
        for k, job_results in zip(optional, retry.jobs):
            merged[k] = job_results
        return SessionResult(tuple(merged), retry.tls, retry.tls_failed, session.before_mail and retry.before_mail)

    def _session(self, jobs: list[Job], host: MXHost, endpoint: Any, security: str,
                 on_settled: Optional[OnSettled] = None, tls_options: Any = None,
                 after_tls_failure: bool = False) -> defer.Deferred:
        params = SessionParams(
            helo=self.hostname,
            remote_host=host.name,
            security=security,
            tls_options=tls_options if security != "none" else None,
            timeouts=self.timeouts,
            after_tls_failure=after_tls_failure,
        )
        if self.send is not None:
            return self.send(endpoint, params, jobs, self.reactor)
        # Reuse by address: any idle connection to one of the addresses this session would race for
        # (RFC 8305), whichever exchanger name it was made for, if its TLS proved what this one needs.
        key = ByAddress(tuple(endpoint.addresses), self.delivery.mx_port, security,
                        _tls_requirement(security, params.tls_options), self.delivery.source_address or None)
        return deliver_over(endpoint, params, jobs, self.reactor, pool=self.pool, key=key, on_settled=on_settled)

    def _tls_options(self, name: str):
        """The client TLS options `[delivery] tls` alone gives an exchanger name (built once and kept)."""
        return self.policies.base(MXHost(name, 0, ())).tls_options

    def _eyeballs(self, addresses: list[str]) -> HappyEyeballsEndpoint:
        """One exchanger's addresses raced as RFC 8305 says, each attempt through `_endpoint`."""
        return HappyEyeballsEndpoint(self.reactor, addresses, self._endpoint, self.attempt_delay)

    def _endpoint(self, address: str):
        """The TCP endpoint of one connection attempt (its own connect timeout), bound to source_address."""
        bind = (self.delivery.source_address, 0) if self.delivery.source_address else None
        cls = endpoints.TCP6ClientEndpoint if _family(address) == 6 else endpoints.TCP4ClientEndpoint
        return cls(self.reactor, address, self.delivery.mx_port, timeout=self.timeouts.connect,
                   bindAddress=bind)

    def close_idle(self) -> defer.Deferred:
        """QUIT every idle connection and keep none from now on; fires once they are all closed."""
        return self.pool.close()

    def stop(self) -> None:
        """Stop the resolver's threads (also done at reactor shutdown)."""
        self.resolver.stop()


def _tls_requirement(security: str, tls_options: Any) -> Any:
    """What a parked connection's TLS must have proved to carry this session: nothing beyond the security
    mode when the certificate is not checked (opportunistic, "required", unusable TLSA: RFC 7435, RFC 7672
    2.2), so any exchanger name at the address will do; else the very options object that checked it,
    which stands for one host name and one TLSA set or MTA-STS policy (RFC 7672 3.2, RFC 8461 4.1): a
    connection verified for one name never carries mail whose policy wants another."""
    if security == "none":
        return None
    return UNAUTHENTICATED if isinstance(tls_options, UnverifiedTLS) else tls_options


def _final(result: RecipientResult) -> bool:
    """2xx and 5xx settle a recipient, except a 5xx about this exchanger alone (RFC 8689 4.2.1: a
    REQUIRETLS message tries every exchanger before it bounces)."""
    return result.delivered or (result.permanent and not result.next_host)


def _policy_failed(session: SessionResult) -> bool:
    """The session ended before MAIL FROM because the TLS policy could not be met: a failed handshake or
    certificate check (4.7.5: DANE, MTA-STS, "verify"), or no STARTTLS offered (4.7.4)."""
    return session.before_mail and (session.tls_failed or any(r.status in ("4.7.4", "4.7.5")
                                                              for r in session.results))


def _unreachable(recipient: str, hosts: list[MXHost]) -> RecipientResult:
    names = ", ".join(h.name for h in hosts) or "none"
    return RecipientResult(recipient, 451, "4.4.1", f"no usable address for any mail exchanger ({names})", "")


def _queue_ids(jobs: list[Job]) -> str:
    return ",".join(job.message.queue_id for job in jobs)      # ISpooledMessage.queue_id
