# -*- test-case-name: tests.test_queue_front, tests.test_dns_cache, tests.test_operations -*-
"""Wiring: one `Config` in, one Twisted `IService` out — the whole relay, ready to add to any Application.

    from mailrelay.config import load
    from mailrelay.service import make_service
    make_service(load("tap.conf")).setServiceParent(application)

The journey it assembles: listeners (server) → spool (durable) → scheduler → next hops (smarthost
transports, direct MX, each behind DKIM) → DSNs. Each stage only knows the next through
mailrelay.interfaces. `RelayService.reload()` (SIGHUP under twistd) swaps in what a new config changes —
permit rules, passwords, LDAP, limits, routes, transports, DKIM keys, queue timings — without touching
connections or the queue; a config that fails validation is refused and the old one stays in force.
The counters behind the limits (message budgets, AUTH attempts, open connections) outlive a reload and
take its new limits at once. A changed RESTART_ONLY key gets one warning line per reload, for as
long as it differs from what was bound at start.

Graceful shutdown (`stopService`; SIGTERM under twistd): the listeners stop accepting; idle SMTP
sessions get 421 4.3.2 and sessions in a transaction may finish it within `shutdown_grace` seconds
(RFC 5321 §3.8); meanwhile the scheduler starts nothing new and lets deliveries in flight finish within
its own bound; only then are the spool, metrics and log stopped.  Everything not delivered stays in
the spool for the next start (docs/crash-safety.md).
"""
from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Optional

from twisted.application import service, strports
from twisted.internet import defer
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mailrelay import tls
from mailrelay.config import Config, ConfigError, load
from mailrelay.interfaces import IIncomingQueue, IMessageWriter, IPooledNextHop
from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.service")

# Keys a reload cannot change: they are bound to sockets, files, processes or identities made at start.
RESTART_ONLY = ("hostname", "spool", "tls", "listeners", "metrics", "log", "delivery.process", "suppression",
                "http", "cluster", "delivery.tls_reports")


def restart_only(config: Config) -> dict:
    """The values of the RESTART_ONLY keys (dotted paths) in `config`."""
    values = {}
    for key in RESTART_ONLY:
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        values[key] = value
    return values


@implementer(IMessageWriter)
class _NotifyingWriter:
    """A spool writer whose successful commit also tells the scheduler the message is there."""

    def __init__(self, writer, scheduler):
        self._writer, self._scheduler = writer, scheduler
        self.queue_id = writer.queue_id

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    @property
    def size(self) -> int:
        return self._writer.size

    def commit(self):
        """The spool's commit, but the session hears of it first: its 250 goes out before the scheduler
        (or the pipe to the delivery process) does any work for the message."""
        done = defer.Deferred()

        def committed(queue_id):
            done.callback(queue_id)
            try:
                self._scheduler.enqueue(queue_id)
            except Exception:
                # Durable and answered: a scheduler hiccup must not turn into a second copy. The message
                # is picked up from the spool at the next start (or flush) at the latest.
                log.failure("{queue_id}: could not schedule the committed message", queue_id=queue_id)

        self._writer.commit().addCallbacks(committed, done.errback)
        return done

    def abort(self) -> None:
        self._writer.abort()


@implementer(IIncomingQueue)
class QueueFront:
    """What the listeners hand messages to: the spool, with the scheduler told of every commit."""

    def __init__(self, spool, scheduler):
        self._spool, self._scheduler = spool, scheduler

    @property
    def logs_queued(self) -> bool:
        """True when the scheduler writes each message's "queued" line (the delivery process does, as
        Postfix's qmgr does); the session then leaves it out."""
        return bool(self._scheduler.logs_queued)        # IScheduler declares it

    def new_message(self, envelope):
        return _NotifyingWriter(self._spool.new_message(envelope), self._scheduler)


def server_tls_options(config: Config) -> dict:
    """The relay's own certificate (the configured one, or a self-signed one kept in the spool), as
    one mailrelay.tls.ServerTLS per listener kind: each kind has its own cipher policy."""
    kinds = [listener.kind for listener in config.listeners if listener.kind != "http"]   # http: its endpoint
    if config.tls.cert is not None:
        return tls.listener_options(config.tls.cert, config.tls.key, kinds)
    path, created = tls.ensure_self_signed(config.spool, config.hostname)
    log.warn(
        "no [tls] cert configured: using the self-signed certificate {path} for {hostname}{new}",
        path=str(path), hostname=config.hostname, new=" (generated now)" if created else "",
    )
    return tls.listener_options(path, None, kinds)


@dataclass
class ReceivingParts:
    """What a reload may swap on the receiving side: the relay policy and the AUTH portal."""
    policy: object
    portal: object


@dataclass
class DeliveryParts:
    """What a reload may swap on the delivery side: routes and next hops (behind DKIM), and the MX
    resolver with its DNS cache (kept by the next parts while `nameservers` stay the same)."""
    router: object
    transports: dict
    direct: object
    resolver: object = None

    def install(self, scheduler, config: Config, replacing: Optional["DeliveryParts"] = None) -> None:
        """Give the scheduler these parts; the ones they replace close their idle cached connections
        (deliveries still running on them QUIT when they finish) and a resolver no longer used."""
        scheduler.reconfigure(self.router, self.transports, self.direct, config.queue, config.delivery,
                              throttles=config.throttles)
        if replacing is not None:
            replacing.close_idle()
            if replacing.resolver is not None and replacing.resolver is not self.resolver:
                replacing.resolver.retire()

    def close_idle(self) -> defer.Deferred:
        """QUIT on the idle connections the next hops keep for reuse (on stop, or once replaced)."""
        hops = [*self.transports.values(), self.direct]
        return defer.DeferredList([defer.maybeDeferred(hop.close_idle) for hop in hops
                                   if IPooledNextHop.providedBy(hop)], consumeErrors=True)


def build_receiving_parts(config: Config, reactor, limiter=None) -> ReceivingParts:
    """Policy and AUTH portal for `config`. Raises ConfigError or ValueError (unreadable CA or secret).
    `limiter`: the message budgets of the policy being replaced (a reload keeps them)."""
    from mailrelay.server.policy import PermitPolicy
    from mailrelay.server.realm import build_portal

    checkers = []
    if config.auth.password_file is not None:
        from mailrelay.server.passwords import PasswordFileChecker

        checkers.append(PasswordFileChecker(config.auth.password_file, reactor=reactor))
    if config.auth.ldap is not None:
        from mailrelay.server.ldap import LDAPChecker

        checkers.append(LDAPChecker(config.auth.ldap, reactor=reactor))
    return ReceivingParts(PermitPolicy(config.permits, config.limits, clock=reactor, limiter=limiter),
                          build_portal(checkers) if checkers else None)


def build_delivery_parts(config: Config, reactor, previous: Optional[DeliveryParts] = None,
                         metrics=None, tls_reports=None) -> DeliveryParts:
    """Routes and next hops (behind DKIM) for `config`; the MX resolver (and its DNS cache) of
    `previous` is kept when it asks the same nameservers. `metrics` counts the smarthosts' OAuth2 token
    fetches and the TLS policy outcomes of direct delivery; `tls_reports` (an ITLSReportSink, default
    none) is told each of those outcomes. Raises ValueError (unreadable secrets, bad keys)."""
    from mailrelay.delivery.dns import MXResolver
    from mailrelay.delivery.mx import MXDelivery
    from mailrelay.delivery.routes import Router
    from mailrelay.delivery.smarthost import SmarthostTransport

    outbound = dkim_wrapper(config, reactor)
    resolver = previous.resolver if previous is not None else None
    if resolver is None or not resolver.serves(config.delivery.nameservers, config.delivery.dns_cache_size):
        resolver = MXResolver(config.delivery.nameservers, reactor, cache_size=config.delivery.dns_cache_size,
                              metrics=metrics)
    return DeliveryParts(
        router=Router(config.routes),
        transports={name: outbound(SmarthostTransport(t, config.hostname, clock=reactor, reactor=reactor,
                                                      source_address=config.delivery.source_address,
                                                      metrics=metrics))
                    for name, t in config.transports.items()},
        direct=outbound(MXDelivery(config.delivery, config.hostname, reactor=reactor, resolver=resolver,
                                   spool=config.spool, metrics=metrics, tls_reports=tls_reports)),
        resolver=resolver,
    )


def reread(path, build, reactor, source: Optional[bytes] = None, delivery_only: bool = False):
    """(config, build(config, reactor)) from the config file (or `source`, its bytes as the main process
    read them), or None — with one log line — when it or what it names is refused; nothing is changed
    before both are built (reload, in either process; the delivery process's with `delivery_only`)."""
    try:
        config = load(path, source, delivery_only)
        return config, build(config, reactor)
    except (ConfigError, ValueError, OSError) as e:
        log.error("reload refused, the running configuration stays in force: {error}", error=str(e))
        return None


def build_events(config: Config, reactor, metrics):
    """The `[[webhook]]` delivery events (mailrelay.events): outboxes in the spool and their senders, in
    the process that runs the scheduler. Always built: a reload may add the first webhook."""
    from mailrelay.events.service import DeliveryEvents

    return DeliveryEvents(config.spool, config.webhooks, reactor, drop_after=config.queue.lifetime,
                          metrics=metrics)


def build_scheduler(config: Config, spool, parts: DeliveryParts, reactor, metrics, events=None, throttle=None):
    """The scheduler over `spool` with `parts`' routes and next hops, and its DSN reporter (unless
    `[queue] bounces = false`) — in the main process, or in the delivery process. `events`: the
    IDeliveryEvents told of every outcome (build_events), or None. `throttle`: the `[[throttle]]` state
    shared with other relays (cluster.wiring.shared_throttle), or None for the scheduler's own."""
    from mailrelay.delivery.scheduler import STATUS_FILE, Scheduler

    reporter = None
    if config.queue.bounces:
        from mailrelay.dsn import DSNReporter

        reporter = DSNReporter(spool, config.hostname, clock=reactor, lifetime=config.queue.lifetime,
                               metrics=metrics)
    suppression = None
    if config.suppression.enabled:
        from mailrelay.spool.suppression import SuppressionList, SuppressionRecorder

        suppression = SuppressionRecorder(SuppressionList(config.spool, config.suppression.duration, reactor),
                                          getattr(spool, "run_blocking", None))
    scheduler = Scheduler(spool, parts.router, parts.transports, parts.direct, config.queue, config.delivery,
                          reporter, clock=reactor, metrics=metrics, suppression=suppression, events=events,
                          throttles=config.throttles, throttle=throttle, status_path=config.spool / STATUS_FILE)
    if throttle is not None:
        throttle.on_ready = scheduler.wake       # a booking answered: the deliveries waiting may go
    if reporter is not None:
        reporter.scheduler = scheduler
    return scheduler


def tls_report_store(config: Config, reactor):
    """The TLS report store in the spool (RFC 8460), or None with `[delivery] tls_reports = false`."""
    if not config.delivery.tls_reports:
        return None
    from mailrelay.delivery.tlsrpt_store import TLSReportStore, store_directory

    return TLSReportStore(store_directory(config.spool), clock=reactor)


def tls_report_service(config: Config, sink, spool, scheduler, reactor):
    """The daily TLS report run (delivery.tlsrpt_send) beside `scheduler`, in the process that
    delivers; None without a store."""
    if sink is None:
        return None
    from mailrelay.delivery.tlsrpt_send import TLSReportSender, TLSReportService, https_post, txt_lookup
    from mailrelay.delivery.tlsverify import load_trust

    # `[delivery] ca_file` is the trust of delivery's HTTPS too (MTA-STS policy hosts, report endpoints).
    post = https_post(reactor, load_trust(config.delivery.ca_file) if config.delivery.ca_file else None)
    sender = TLSReportSender(config.hostname, sink.directory, spool, txt_lookup(config.delivery.nameservers, reactor),
                             post, reactor, spooled=scheduler.enqueue)
    return TLSReportService(sink, sender, reactor)


def suppression_watcher(config: Config, reactor, metrics):
    """The receiving side of `[suppression]` (spool.suppression): the list RCPT is judged by, kept
    up to date from the spool, its size a metrics gauge; None when suppression is off."""
    if not config.suppression.enabled:
        return None
    from mailrelay.spool.suppression import SuppressionList, SuppressionWatcher

    journal = SuppressionList(config.spool, config.suppression.duration, reactor)
    metrics.watch_suppression(journal.size)
    return SuppressionWatcher(journal, reactor)


def own_authserv_id(config: Config) -> Optional[str]:
    """The authserv-id of the Authentication-Results we add (dkim/build.py: the hostname), when we add
    them: incoming fields claiming it are forged and removed (server/authres.py)."""
    return config.hostname if config.dkim.verify else None


def dkim_wrapper(config: Config, reactor):
    """A function putting each next hop behind DKIM signing/verification, or leaving it as it is."""
    from mailrelay.dkim.build import build_signer, build_verifier

    signer, verifier = build_signer(config), build_verifier(config)
    if signer is None and verifier is None:
        return lambda hop: hop
    from mailrelay.delivery.signing import DKIMHop

    return lambda hop: DKIMHop(hop, signer=signer, verifier=verifier, reactor=reactor)


LISTEN_BACKLOG = 1024   # Twisted's default of 50 drops connects when hundreds of clients arrive at once


def with_backlog(endpoint: str) -> str:
    """A tcp/ssl endpoint string with a listen backlog of LISTEN_BACKLOG unless it names its own."""
    kind = endpoint.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in endpoint:
        return f"{endpoint}:backlog={LISTEN_BACKLOG}"
    return endpoint


class RelayService(service.MultiService):
    """The whole relay. Children start in journey order (log, spool, scheduler, metrics, listeners) and
    stop gracefully: listeners close first and their sessions drain (bounded by `shutdown_grace`) while
    the scheduler lets deliveries in flight finish (bounded); the spool is closed last."""

    def __init__(self, config: Config, reactor=None, handle_sighup: bool = False,
                 shutdown_grace: Optional[float] = None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        from mailrelay import logs
        from mailrelay.metrics import Metrics, metrics_service
        from mailrelay.server.factory import SHUTDOWN_GRACE
        from mailrelay.spool.store import Spool

        self.setName("mailrelay")
        self.config, self.reactor, self._handle_sighup = config, reactor, handle_sighup
        # What was bound at start (sockets, spool, process, ...): a reload compares against this, never
        # against the last config read, so a key changed and changed back is in force again, silently.
        self.bound = restart_only(config)
        self.shutdown_grace = SHUTDOWN_GRACE if shutdown_grace is None else shutdown_grace
        self.listeners: list = []
        self.log_service = logs.install(config.log)
        self.log_service.setServiceParent(self)
        self.metrics = Metrics()
        self.spool = Spool(config.spool, clock=reactor, reactor=reactor,
                           directory_fsync=config.queue.directory_fsync)
        self.spool.setServiceParent(self)
        from mailrelay.cluster import wiring as cluster

        self.cluster = cluster.redis_link(config, reactor, self.metrics)    # None: no [cluster] redis
        if self.cluster is not None:
            self.cluster.setServiceParent(self)
        self.suppression = suppression_watcher(config, reactor, self.metrics)   # None: [suppression] off
        if self.suppression is not None:
            self.suppression.setServiceParent(self)
        self.suppression_check = cluster.shared_suppression(
            self.cluster, self.suppression.journal if self.suppression is not None else None)
        receiving = build_receiving_parts(config, reactor, cluster.shared_limiter(self.cluster, config, reactor))
        self._limiter = receiving.policy.limiter        # the message budgets: they outlive every reload
        self.delivery: Optional[DeliveryParts] = None      # next hops live here only when delivery is inline
        self.events = None                                 # so do the webhook events (mailrelay.events)
        # built here in either mode: a bad one stops the start
        self.tls_reports = tls_report_store(config, reactor) if config.delivery.process == "inline" else None
        delivery = build_delivery_parts(config, reactor, metrics=self.metrics, tls_reports=self.tls_reports)
        if config.delivery.process == "separate":
            from mailrelay.delivery.process import DeliveryProcess

            self.scheduler = DeliveryProcess(config.path, reactor, spool=self.spool,
                                             log_text=self.log_service.relay, source=config.source)
        else:
            self.delivery = delivery
            self.events = build_events(config, reactor, self.metrics)
            self.events.setServiceParent(self)           # started before the scheduler, stopped after it
            throttle = cluster.shared_throttle(self.cluster)     # [[throttle]] for the cluster, or None
            if throttle is not None:
                throttle.setServiceParent(self)
            self.scheduler = build_scheduler(config, self.spool, delivery, reactor, self.metrics, self.events,
                                             throttle)
        self.scheduler.setServiceParent(self)
        reports = tls_report_service(config, self.tls_reports, self.spool, self.scheduler, reactor)
        if reports is not None:
            reports.setServiceParent(self)
        if config.metrics.endpoint:
            # Separate: the delivery families come from the delivery process, over its pipe, per scrape.
            delivery_side = self.scheduler.metrics_text if self.delivery is None else None
            metrics_service(config.metrics.endpoint, self.metrics, reactor=reactor,
                            delivery=delivery_side).setServiceParent(self)
        self.factories = []
        self._listen(config, receiving, reactor)

    def _listen(self, config: Config, parts: ReceivingParts, reactor) -> None:
        from mailrelay.cluster.wiring import shared_window
        from mailrelay.server.factory import ConnectionCounter, FailureWindow, RelayServerFactory

        tls_options = server_tls_options(config)     # per listener kind, built once: tls is restart-only
        queue = QueueFront(self.spool, self.scheduler)
        # One count for all listeners: max_connections is "in all", and a client gets one AUTH-failure budget.
        connections = ConnectionCounter(config.limits.max_connections, config.limits.max_connections_per_ip)
        auth_failures = shared_window(self.cluster, FailureWindow(config.limits.auth_failures_per_minute, reactor))
        for index, listener in enumerate(config.listeners):
            if listener.kind == "http":
                self._listen_http(index, listener, config, parts, queue, reactor, connections)
                continue
            factory = RelayServerFactory(
                hostname=config.hostname, listener=listener, limits=config.limits, portal=parts.portal,
                mechanisms=config.auth.mechanisms, policy=parts.policy, queue=queue,
                tls_options=None if listener.kind == "submissions" else tls_options[listener.kind], clock=reactor,
                metrics=self.metrics, connections=connections, auth_failures=auth_failures,
                authserv_id=own_authserv_id(config), postmaster=config.postmaster,
                received_shows_user=config.auth.received_shows_user,
                suppression=self.suppression_check,
            )
            self.factories.append(factory)
            implicit = listener.kind == "submissions"
            wrapped = TLSMemoryBIOFactory(tls_options[listener.kind], False, factory) if implicit else factory
            if listener.proxy_protocol:       # the PROXY header first: before the banner, before TLS on 465
                from mailrelay.server.proxylistener import ProxyProtocolFactory

                wrapped = ProxyProtocolFactory(wrapped, listener.trusted_proxies, name=f"listen[{index}]",
                                               clock=reactor, metrics=self.metrics)
            listening = strports.service(with_backlog(listener.endpoint), wrapped, reactor=reactor)
            listening.setName(f"listen[{index}]")
            listening.setServiceParent(self)
            self.listeners.append(listening)

    def _listen_http(self, index: int, listener, config: Config, parts: ReceivingParts, queue, reactor,
                     connections) -> None:
        """The HTTP injection API (server/http.py); TLS, when wanted, comes from an ssl: endpoint."""
        from mailrelay.server.apikeys import ApiKeyFile
        from mailrelay.server.http import ApiFactory

        factory = ApiFactory(hostname=config.hostname, listener=listener, limits=config.limits,
                             policy=parts.policy, queue=queue, keys=ApiKeyFile(config.http.api_keys_file),
                             clock=reactor, metrics=self.metrics, authserv_id=own_authserv_id(config),
                             received_shows_user=config.auth.received_shows_user, connections=connections)
        self.factories.append(factory)
        listening = strports.service(with_backlog(listener.endpoint), factory, reactor=reactor)
        listening.setName(f"listen[{index}]")
        listening.setServiceParent(self)
        self.listeners.append(listening)

    # -- reload ------------------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config file and apply it; False (and the old config in force) when it is refused."""
        def build(config: Config, reactor):   # delivery parts too in either mode: a bad one refuses the reload
            return (build_receiving_parts(config, reactor, limiter=self._limiter),
                    build_delivery_parts(config, reactor, self.delivery, metrics=self.metrics,
                                         tls_reports=self.tls_reports))

        loaded = reread(self.config.path, build, self.reactor)
        if loaded is None:
            return False
        config, (parts, delivery) = loaded
        for key, value in restart_only(config).items():
            if value != self.bound[key]:
                log.warn("reload: {key} changed; that takes effect only after a restart", key=key)
        self._limiter = parts.policy.limiter
        for factory in self.factories:
            factory.reconfigure(limits=config.limits, portal=parts.portal, mechanisms=config.auth.mechanisms,
                                policy=parts.policy, authserv_id=own_authserv_id(config),
                                postmaster=config.postmaster,
                                received_shows_user=config.auth.received_shows_user)
        if self.delivery is not None:
            delivery.install(self.scheduler, config, replacing=self.delivery)
            self.delivery = delivery
            self.events.reconfigure(config.webhooks, config.queue.lifetime)
        else:
            self.scheduler.reload(config.source)     # the bytes just validated, not the file again
        self.config = config
        log.info("reload: {path} applied", path=str(config.path))
        return True

    def privilegedStartService(self) -> None:
        # twistd binds the listeners here, before startService: a SIGHUP from then on (a log rotation, a
        # deploy script that saw the port open) must reload, not kill the process with its default action.
        self._install_sighup()
        super().privilegedStartService()

    def startService(self) -> None:
        self._install_sighup()         # started without privilegedStartService (embedded): install it now
        super().startService()

    def _install_sighup(self) -> None:
        if self._handle_sighup:
            signal.signal(signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self.reload))

    # -- graceful shutdown -------------------------------------------------------------------------------

    def stopService(self) -> defer.Deferred:
        """Stop accepting, drain the SMTP sessions and the deliveries in flight (both bounded, side by
        side), then stop the rest (metrics, spool, log) in reverse start order."""
        service.Service.stopService(self)
        log.info("shutting down: closing the listeners; transactions in progress may finish within {grace}s",
                 grace=self.shutdown_grace)
        accepting = _stop_all(reversed(self.listeners))
        sessions = accepting.addCallback(lambda _: self._drain_sessions())
        deliveries = defer.maybeDeferred(self.scheduler.stopService)
        rest = [child for child in reversed(list(self)) if child not in self.listeners and child is not self.scheduler]
        d = defer.DeferredList([sessions, deliveries], consumeErrors=True)
        d.addCallback(_log_failures, "draining sessions and deliveries")
        if self.delivery is not None:
            d.addCallback(lambda _: self.delivery.close_idle())
        d.addCallback(lambda _: _stop_all(rest))
        d.addCallback(lambda _: log.info("shut down: everything not delivered stays in the spool"))
        return d

    def _drain_sessions(self) -> defer.Deferred:
        return _stop_all(self.factories, lambda factory: factory.shut_down(self.shutdown_grace))


def _stop_all(things, stop=lambda child: child.stopService()) -> defer.Deferred:
    """Stop several things at once; fires when all are done, each failure logged, never failing."""
    d = defer.DeferredList([defer.maybeDeferred(stop, thing) for thing in things], consumeErrors=True)
    return d.addCallback(_log_failures, "stopping a service")


def _log_failures(results, what: str) -> None:
    for ok, value in results:
        if not ok:
            log.failure("shutdown: {what} failed", value, what=what)


def make_service(config: Config, reactor=None, handle_sighup: bool = False,
                 shutdown_grace: Optional[float] = None) -> RelayService:
    """Build the whole relay for `config` as one MultiService (not yet started). `handle_sighup`: re-read
    the config file on SIGHUP (the twistd plugin turns it on; an embedding application may call reload()).
    `shutdown_grace`: seconds a transaction in progress may take to finish at shutdown (default
    server.factory.SHUTDOWN_GRACE)."""
    return RelayService(config, reactor=reactor, handle_sighup=handle_sighup, shutdown_grace=shutdown_grace)
