"""Direct delivery: hand a message to the recipient domain's own mail exchangers (no smarthost).

Job in the journey: the next hop the scheduler uses when no route names a transport.  In: a spooled
message and its recipients of one domain (deliver), or several such messages (deliver_batch: they
share one connection to each exchanger tried).  Out: a Deferred firing with one RecipientResult per
recipient (never failing): 2xx delivered, 5xx bounced, 4xx to be retried later by the scheduler.

How: resolve the domain (delivery.dns: MX by preference, shuffled among equals, implicit MX, null MX),
then try the exchangers in order with the delivery client on `[delivery] mx_port`, under the
`[delivery] tls` policy, bound to `source_address` when set (and then only to addresses of its family).
Each exchanger's addresses are raced by delivery.eyeballs (RFC 8305: IPv6 first, families alternating,
a new attempt every 250 ms, the first connection wins); a session that fails before MAIL FROM leaves
the addresses not yet tried for another race.  A 2xx or 5xx settles a recipient; a 4xx or a failed
connection leaves it for the next exchanger; what is unsettled after the last one keeps its last 4xx.
RFC 5321 §5.1 (trying exchangers in order), RFC 5321 §4.2 (reply classes), RFC 3207 and RFC 7435
(opportunistic TLS: a failed handshake falls back to plaintext once, on the same address), RFC 7505.

Connection reuse: sessions that end cleanly wait in a delivery.pool.ConnectionPool keyed by exchanger
name, port, security and TLS options (built once per exchanger name and kept, so equal checks share
one object), and the next batch to that exchanger — for any domain it serves — starts at MAIL FROM on it.
`close_idle()` says QUIT on them all.

Reported as soon as settled (docs/crash-safety.md section 2): with `on_settled`, a job whose every
recipient has a final answer (2xx or 5xx, from this exchanger or an earlier one) is handed over right
after that reply, and the next job on the connection waits for the record.  A job with a recipient
left at 4xx is reported at the end, once the later exchangers have had their say.

TLS reports (RFC 8460): with a `tls_reports` sink (interfaces.ITLSReportSink), the TLS outcome of every
new session with an exchanger (delivery.tlsoutcome) is recorded for the recipient domain, as
"no-policy-found" (no MTA-STS or DANE policy applied; RFC 8460 4.4 reports those sessions too).
"""
from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Any, Callable, Optional

from OpenSSL import SSL
from twisted.internet import defer, endpoints, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from mailrelay.config import DeliveryConfig
from mailrelay.delivery.connect import deliver_over
from mailrelay.delivery.job import Job, OnSettled, SessionParams, Timeouts
from mailrelay.delivery.dns import MXHost, MXResolver, ResolutionFailed
from mailrelay.delivery.eyeballs import CONNECTION_ATTEMPT_DELAY, HappyEyeballsEndpoint, interleave
from mailrelay.delivery.pool import ConnectionPool, PoolKey
from mailrelay.delivery.results import RecipientResult, SessionResult, settle_all
from mailrelay.envelope import domain_of
from mailrelay.interfaces import IBatchNextHop, INextHop, ITLSReportSink
from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.delivery.mx")

MAX_ADDRESSES = 10     # connection attempts per delivery, over all exchangers (Postfix: smtp_mx_address_limit)
TLS_OPTIONS_KEPT = 128  # exchanger names whose client TLS options (an SSL context each) are kept for reuse

# [delivery] tls → the client's security mode.  "required" and "verify" both insist on STARTTLS;
# "verify" also checks the certificate chain and the exchanger's name.
_SECURITY = {"none": "none", "opportunistic": "opportunistic", "required": "starttls", "verify": "starttls"}


@implementer(IOpenSSLClientConnectionCreator)
class UnverifiedTLS:
    """Client TLS that encrypts without authenticating (RFC 7435 opportunistic security), with SNI."""

    def __init__(self, hostname: str):
        self._hostname = hostname
        self._context = ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2).getContext()

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if not _is_address(self._hostname):
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        connection.set_connect_state()
        return connection


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def _family(address: str) -> int:
    return ipaddress.ip_address(address).version


@implementer(INextHop, IBatchNextHop)
class MXDelivery:
    """Direct-to-MX next hop.  `resolver`, `trust_root` (for "verify"), `timeouts`, `pool` (idle
    connections; default a new ConnectionPool) and `send` (replacing the client's deliver_over, then
    called as send(endpoint, params, jobs, reactor), without connection reuse) may be replaced, mostly
    by tests.  `tls_reports`: an ITLSReportSink hearing every session's TLS outcome, or None."""

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
        tls_reports: Optional[ITLSReportSink] = None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.delivery = delivery
        self.hostname = hostname
        self.reactor = reactor
        self.resolver = resolver or MXResolver(delivery.nameservers, reactor)
        self.trust_root = trust_root
        self.timeouts = timeouts
        self.send = send
        self.pool = pool if pool is not None else ConnectionPool(reactor)
        self.tls_reports = tls_reports
        self._tls_kept: OrderedDict[str, Any] = OrderedDict()
        self.attempt_delay = CONNECTION_ATTEMPT_DELAY   # RFC 8305 §5 stagger between connection attempts
        self.plaintext_fallbacks = 0     # opportunistic TLS handshakes that failed and were retried in clear

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
                        queue_id=",".join(_queue_id(job.message) for job in jobs))
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
                settled = yield self._try_hosts(group, hosts, report)
            for i, job_results in zip(indexes, settled):
                results[i] = job_results
        return results

    def _candidates(self, hosts: list[MXHost]) -> list[tuple[MXHost, list[str]]]:
        """Each exchanger with its addresses in happy-eyeballs order (RFC 8305 §4: IPv6 first, then the
        families alternating); only our source address's family when one is set; MAX_ADDRESSES in all."""
        family = _family(self.delivery.source_address) if self.delivery.source_address else None
        left, candidates = MAX_ADDRESSES, []
        for host in hosts:
            addresses = interleave(a for a in host.addresses if family is None or _family(a) == family)[:left]
            if addresses:
                candidates.append((host, addresses))
                left -= len(addresses)
            if left <= 0:
                break
        return candidates

    @defer.inlineCallbacks
    def _try_hosts(self, jobs: list[Job], hosts: list[MXHost], on_settled: Optional[OnSettled] = None):
        final: list[dict[str, RecipientResult]] = [{} for _ in jobs]
        last: list[dict[str, RecipientResult]] = [{} for _ in jobs]
        answered_hosts: set[str] = set()
        reported: set[int] = set()
        for host, addresses in self._candidates(hosts):
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
                session = yield self._attempt(tried, host, endpoint, report)
                sessions += 1
                for (i, recipients), job_results in zip(pending, session.jobs):
                    for rcpt, result in zip(recipients, job_results):
                        # RFC 5321 §4.2.1: 2xx and 5xx are final; a 4xx leaves the recipient for the next exchanger.
                        (final[i] if result.delivered or result.permanent else last[i])[rcpt] = result
                if not session.before_mail:
                    answered_hosts.add(host.name)    # it answered (4xx): its other addresses would too
                untried = endpoint.untried()
                for i, recipients in pending:
                    unsettled = [last[i][r] for r in recipients if r not in final[i]]
                    if unsettled:
                        # remote_host names the address that answered ("mx[192.0.2.1]") when one did.
                        log.info("{queue_id}: {where}: {count} recipient(s) not settled: {reply}",
                                 queue_id=_queue_id(jobs[i].message), where=unsettled[0].remote_host or host.name,
                                 count=len(unsettled),
                                 reply=f"{unsettled[0].code} {unsettled[0].status} {unsettled[0].text}")
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
                if result.delivered or result.permanent:       # RFC 5321 §4.2.1: final answers
                    final[i][rcpt] = result
            if i in reported or any(r not in final[i] for r in jobs[i].recipients):
                return None
            reported.add(i)
            return on_settled(i, [final[i][r] for r in jobs[i].recipients])
        return report

    @defer.inlineCallbacks
    def _attempt(self, jobs: list[Job], host: MXHost, endpoint: HappyEyeballsEndpoint,
                 on_settled: Optional[OnSettled] = None):
        policy = self.delivery.tls
        session: SessionResult = yield self._session(jobs, host, endpoint, _SECURITY[policy], on_settled)
        self._report_tls(jobs, host, session)
        if endpoint.connected and endpoint.failures:     # e.g. a broken IPv6 route, hidden by the race
            log.info("{queue_id}: {host}: connected to {address} after {failed}", queue_id=_queue_ids(jobs),
                     host=host.name, address=endpoint.connected,
                     failed="; ".join(f"{a}: {reason.value}" for a, reason in endpoint.failures))
        if session.tls_failed and policy == "opportunistic":
            # RFC 7435 §3 / Twisted #10334: opportunistic TLS that fails its handshake is retried once in
            # plaintext on the same address; "required" and "verify" never fall back.
            self.plaintext_fallbacks += 1
            address = endpoint.connected
            log.info("{queue_id}: TLS handshake with {host}[{address}] failed; retrying once in plaintext",
                     queue_id=_queue_ids(jobs), host=host.name, address=address)
            again = self._eyeballs([address]) if address else endpoint
            session = yield self._session(jobs, host, again, "none", on_settled)
        return session

    def _report_tls(self, jobs: list[Job], host: MXHost, session: SessionResult) -> None:
        """RFC 8460: a new session's TLS outcome, for the daily report to the recipient domain."""
        outcome = session.tls_outcome
        if self.tls_reports is None or outcome is None or not jobs or not jobs[0].recipients:
            return
        try:
            self.tls_reports.record(domain_of(jobs[0].recipients[0]), "no-policy-found", (), host.name,
                                    outcome.result_type, outcome.success, outcome.detail)
        except Exception:       # statistics must never cost a delivery
            log.failure("recording a TLS outcome failed")

    def _session(self, jobs: list[Job], host: MXHost, endpoint: Any, security: str,
                 on_settled: Optional[OnSettled] = None) -> defer.Deferred:
        params = SessionParams(
            helo=self.hostname,
            remote_host=host.name,
            security=security,
            tls_options=self._tls_options(host.name) if security != "none" else None,
            timeouts=self.timeouts,
        )
        if self.send is not None:
            return self.send(endpoint, params, jobs, self.reactor)
        # Reuse per exchanger: whichever of its addresses the connection went to (RFC 8305 picks it).
        key = PoolKey(host.name, self.delivery.mx_port, security, params.tls_options)
        return deliver_over(endpoint, params, jobs, self.reactor, pool=self.pool, key=key, on_settled=on_settled)

    def _tls_options(self, name: str):
        """The client TLS options for an exchanger name, built once and kept (least recently used out)."""
        options = self._tls_kept.pop(name, None)
        if options is None:
            options = self._new_tls_options(name)
        self._tls_kept[name] = options
        while len(self._tls_kept) > TLS_OPTIONS_KEPT:
            self._tls_kept.popitem(last=False)
        return options

    def _new_tls_options(self, name: str):
        if self.delivery.tls == "verify":
            # Certificate chain and exchanger name checked (service_identity); no fallback on failure.
            return ssl.optionsForClientTLS(name.strip("[]"), trustRoot=self.trust_root)
        return UnverifiedTLS(name)

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


def _unreachable(recipient: str, hosts: list[MXHost]) -> RecipientResult:
    names = ", ".join(h.name for h in hosts) or "none"
    return RecipientResult(recipient, 451, "4.4.1", f"no usable address for any mail exchanger ({names})", "")


def _queue_id(message) -> str:
    return getattr(message, "queue_id", "?")


def _queue_ids(jobs: list[Job]) -> str:
    return ",".join(_queue_id(job.message) for job in jobs)
