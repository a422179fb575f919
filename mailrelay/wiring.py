# -*- test-case-name: tests.test_structure, tests.test_queue_front, tests.test_dns_cache, tests.test_operations -*-
"""The composition root: the one module that knows every stage. It turns a `Config` into the services
of the receiving process (`receiving_process`: log, spool, cluster link, listeners and either the
delivery side inline or the delivery process standing in for it) and of the delivery process
(`delivery_worker`), and builds again what a reload may swap (`build_receiving_parts`,
`build_delivery_parts`, `reread`).

The stages (config → server → spool → delivery → dsn → events, cluster at the side) never import this
module: each only knows the next through mailrelay.interfaces, and what it needs is handed to it here.
Only mailrelay.service (the receiving process's lifecycle: reload, graceful stop) and the delivery
process's entry point (mailrelay.delivery_main) call it; the command line may (tests/test_structure.py).
What `[cluster]` adds around the local parts is mailrelay.cluster.wiring, called from here alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from twisted.application import strports
from twisted.application.service import IService
from twisted.internet import defer
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mailrelay import tls
from mailrelay.config import Config, ConfigError, load
from mailrelay.interfaces import IIncomingQueue, IMessageWriter, IPooledNextHop
from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.service")

LISTEN_BACKLOG = 1024   # Twisted's default of 50 drops connects when hundreds of clients arrive at once


@implementer(IMessageWriter)
class _NotifyingWriter:
    """A spool writer whose successful commit also tells the scheduler the message is there."""

    def __init__(self, writer: Any, scheduler: Any) -> None:
        self._writer, self._scheduler = writer, scheduler
        self.queue_id = writer.queue_id

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    @property
    def size(self) -> int:
        return int(self._writer.size)

    def commit(self) -> defer.Deferred:
        """The spool's commit, but the session hears of it first: its 250 goes out before the scheduler
        (or the pipe to the delivery process) does any work for the message."""
        done: defer.Deferred = defer.Deferred()

        def committed(queue_id: str) -> None:
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

    def __init__(self, spool: Any, scheduler: Any) -> None:
        self._spool, self._scheduler = spool, scheduler

    @property
    def logs_queued(self) -> bool:
        """True when the scheduler writes each message's "queued" line (the delivery process does, as
        Postfix's qmgr does); the session then leaves it out."""
        return bool(self._scheduler.logs_queued)        # IScheduler declares it

    def new_message(self, envelope: Any) -> _NotifyingWriter:
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
    policy: Any
    portal: Any


@dataclass
class DeliveryParts:
    """What a reload may swap on the delivery side: routes and next hops (behind DKIM), and the MX
    resolver with its DNS cache (kept by the next parts while `nameservers` stay the same)."""
    router: Any
    transports: dict
    direct: Any
    resolver: Any = None

    def install(self, scheduler: Any, config: Config, replacing: Optional[DeliveryParts] = None) -> None:
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


def build_receiving_parts(config: Config, reactor: Any, limiter: Any = None) -> ReceivingParts:
    """Policy and AUTH portal for `config`. Raises ConfigError or ValueError (unreadable CA or secret).
    `limiter`: the message budgets of the policy being replaced (a reload keeps them)."""
    from mailrelay.server.policy import PermitPolicy
    from mailrelay.server.realm import build_portal

    checkers: list = []
    if config.auth.password_file is not None:
        from mailrelay.server.passwords import PasswordFileChecker

        checkers.append(PasswordFileChecker(config.auth.password_file, reactor=reactor))
    if config.auth.ldap is not None:
        from mailrelay.server.ldap import LDAPChecker

        checkers.append(LDAPChecker(config.auth.ldap, reactor=reactor))
    return ReceivingParts(PermitPolicy(config.permits, config.limits, clock=reactor, limiter=limiter),
                          build_portal(checkers) if checkers else None)


def build_delivery_parts(config: Config, reactor: Any, previous: Optional[DeliveryParts] = None,
                         metrics: Any = None, tls_reports: Any = None) -> DeliveryParts:
    """Routes and next hops (behind DKIM) for `config`; the MX resolver (and its DNS cache) of
    `previous` is kept when it asks the same nameservers. `metrics` counts the smarthosts' OAuth2 token
    fetches and the TLS policy outcomes of direct delivery; `tls_reports` (an ITLSReportSink, default
    none) is told each of those outcomes. Raises ValueError (unreadable secrets, bad keys)."""
    from mailrelay.outbound.dns import MXResolver
    from mailrelay.outbound.mx import MXDelivery
    from mailrelay.queue.routes import Router
    from mailrelay.outbound.smarthost import SmarthostTransport

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


def reread(path: Any, build: Callable[[Config, Any], Any], reactor: Any, source: Optional[bytes] = None,
           delivery_only: bool = False) -> Optional[tuple[Config, Any]]:
    """(config, build(config, reactor)) from the config file (or `source`, its bytes as the main process
    read them), or None — with one log line — when it or what it names is refused; nothing is changed
    before both are built (reload, in either process; the delivery process's with `delivery_only`)."""
    try:
        config = load(path, source, delivery_only)
        return config, build(config, reactor)
    except (ConfigError, ValueError, OSError) as e:
        log.error("reload refused, the running configuration stays in force: {error}", error=str(e))
        return None


def build_events(config: Config, reactor: Any, metrics: Any) -> Any:
    """The `[[webhook]]` delivery events (mailrelay.events): outboxes in the spool and their senders, in
    the process that runs the scheduler. Always built: a reload may add the first webhook."""
    from mailrelay.events.service import DeliveryEvents

    return DeliveryEvents(config.spool, config.webhooks, reactor, drop_after=config.queue.lifetime,
                          metrics=metrics)


def build_scheduler(config: Config, spool: Any, parts: DeliveryParts, reactor: Any, metrics: Any,
                    events: Any = None, throttle: Any = None) -> Any:
    """The scheduler over `spool` with `parts`' routes and next hops, and its DSN reporter (unless
    `[queue] bounces = false`) — in the main process, or in the delivery process. `events`: the
    IDeliveryEvents told of every outcome (build_events), or None. `throttle`: the `[[throttle]]` state
    shared with other relays (cluster.wiring.shared_throttle), or None for the scheduler's own."""
    from mailrelay.queue.scheduler import STATUS_FILE, Scheduler

    reporter: Any = None
    if config.queue.bounces:
        from mailrelay.dsn import DSNReporter

        reporter = DSNReporter(spool, config.hostname, clock=reactor, lifetime=config.queue.lifetime,
                               metrics=metrics)
    suppression = None
    if config.suppression.enabled:
        from mailrelay.spool.suppression import SuppressionList, SuppressionRecorder

        suppression = SuppressionRecorder(SuppressionList(config.spool, config.suppression.duration, reactor),
                                          spool.run_blocking)
    scheduler = Scheduler(spool, parts.router, parts.transports, parts.direct, config.queue, config.delivery,
                          reporter, clock=reactor, metrics=metrics, suppression=suppression, events=events,
                          throttles=config.throttles, throttle=throttle, status_path=config.spool / STATUS_FILE)
    if throttle is not None:
        throttle.on_ready = scheduler.wake       # a booking answered: the deliveries waiting may go
    if reporter is not None:
        reporter.scheduler = scheduler
    return scheduler


def tls_report_store(config: Config, reactor: Any) -> Any:
    """The TLS report store in the spool (RFC 8460), or None with `[delivery] tls_reports = false`."""
    if not config.delivery.tls_reports:
        return None
    from mailrelay.outbound.tlsrpt_store import TLSReportStore, store_directory

    return TLSReportStore(store_directory(config.spool), clock=reactor)


def tls_report_service(config: Config, sink: Any, spool: Any, scheduler: Any, reactor: Any) -> Any:
    """The daily TLS report run (outbound.tlsrpt_send) beside `scheduler`, in the process that
    delivers; None without a store."""
    if sink is None:
        return None
    from mailrelay.outbound.tlsrpt_send import TLSReportSender, TLSReportService, https_post, txt_lookup
    from mailrelay.outbound.tlsverify import load_trust

    # `[delivery] ca_file` is the trust of delivery's HTTPS too (MTA-STS policy hosts, report endpoints).
    post = https_post(reactor, load_trust(config.delivery.ca_file) if config.delivery.ca_file else None)
    sender = TLSReportSender(config.hostname, sink.directory, spool, txt_lookup(config.delivery.nameservers, reactor),
                             post, reactor, spooled=scheduler.enqueue)
    return TLSReportService(sink, sender, reactor)


def suppression_watcher(config: Config, reactor: Any, metrics: Any) -> Any:
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


def dkim_wrapper(config: Config, reactor: Any) -> Callable[[Any], Any]:
    """A function putting each next hop behind DKIM signing/verification, or leaving it as it is."""
    from mailrelay.dkim.build import build_signer, build_verifier

    signer, verifier = build_signer(config), build_verifier(config)
    if signer is None and verifier is None:
        return lambda hop: hop
    from mailrelay.outbound.signing import DKIMHop

    return lambda hop: DKIMHop(hop, signer=signer, verifier=verifier, reactor=reactor)


def with_backlog(endpoint: str) -> str:
    """A tcp/ssl endpoint string with a listen backlog of LISTEN_BACKLOG unless it names its own."""
    kind = endpoint.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in endpoint:
        return f"{endpoint}:backlog={LISTEN_BACKLOG}"
    return endpoint


class DeliveryStage:
    """The delivery side for one config, in the process that runs the scheduler (the receiving one
    inline, else the delivery process): next hops, webhook events, the shared `[[throttle]]` state (with
    a cluster `link`), the scheduler with its DSN reporter, the TLS report run."""

    def __init__(self, config: Config, spool: Any, reactor: Any, metrics: Any, link: Any = None) -> None:
        from mailrelay.cluster import wiring as cluster

        self.config, self.metrics = config, metrics
        self.tls_reports = tls_report_store(config, reactor)      # RFC 8460: None when tls_reports is off
        self.parts = build_delivery_parts(config, reactor, metrics=metrics, tls_reports=self.tls_reports)
        self.events = build_events(config, reactor, metrics)   # webhooks: outboxes and senders
        self.throttle = cluster.shared_throttle(link)         # [[throttle]] for the cluster, or None
        self.scheduler = build_scheduler(config, spool, self.parts, reactor, metrics, self.events, self.throttle)
        self.reports = tls_report_service(config, self.tls_reports, spool, self.scheduler, reactor)

    def services(self) -> list:
        """What to start, in this order: events before the scheduler (stopped after it), the report run
        beside it."""
        return [s for s in (self.events, self.throttle, self.scheduler, self.reports) if s is not None]

    def rebuild(self, config: Config, reactor: Any) -> DeliveryParts:
        """The parts for `config`, keeping this stage's resolver when it still serves (reload)."""
        return build_delivery_parts(config, reactor, self.parts, metrics=self.metrics, tls_reports=self.tls_reports)

    def apply(self, config: Config, parts: DeliveryParts) -> None:
        """Hand the scheduler the parts `rebuild` made for `config`; the webhooks take it too."""
        parts.install(self.scheduler, config, replacing=self.parts)
        self.config, self.parts = config, parts
        self.events.reconfigure(config.webhooks, config.queue.lifetime)

    def close_idle(self) -> defer.Deferred:
        return self.parts.close_idle()


@dataclass
class ReceivingProcess:
    """The receiving process for one config, built and not started: `services` in start order (log,
    spool, cluster link, suppression, the delivery side or the delivery process, metrics, listeners)."""
    config: Config
    log_service: Any
    metrics: Any
    spool: Any
    cluster: Any
    suppression: Any
    limiter: Any                       # the message budgets: they outlive every reload
    scheduler: Any                     # the Scheduler (inline) or the DeliveryProcess (separate)
    stage: Optional[DeliveryStage]     # inline only
    services: list = field(default_factory=list)
    listeners: list = field(default_factory=list)
    factories: list = field(default_factory=list)


def receiving_process(config: Config, reactor: Any) -> ReceivingProcess:
    """Everything the receiving process runs for `config`. Raises ConfigError or ValueError."""
    from mailrelay import logs
    from mailrelay.cluster import wiring as cluster
    from mailrelay.metrics import Metrics, metrics_service
    from mailrelay.spool.store import Spool

    log_service = logs.install(config.log)
    metrics = Metrics()
    spool = Spool(config.spool, clock=reactor, reactor=reactor, directory_fsync=config.queue.directory_fsync)
    link = cluster.redis_link(config, reactor, metrics)    # None: no [cluster] redis
    suppression = suppression_watcher(config, reactor, metrics)   # None: [suppression] off
    suppression_check = cluster.shared_suppression(link, suppression.journal if suppression is not None else None)
    receiving = build_receiving_parts(config, reactor, cluster.shared_limiter(link, config, reactor))
    services: list = [s for s in (log_service, spool, link, suppression) if s is not None]
    stage: Optional[DeliveryStage] = None
    scheduler: Any
    if config.delivery.process == "separate":
        build_delivery_parts(config, reactor, metrics=metrics)      # built here too: a bad one stops the start
        from mailrelay.queue.process import DeliveryProcess

        scheduler = DeliveryProcess(config.path, reactor, spool=spool, log_text=log_service.relay,
                                    source=config.source)
        services.append(scheduler)
    else:
        stage = DeliveryStage(config, spool, reactor, metrics, link)
        scheduler = stage.scheduler
        services.extend(stage.services())
    built = ReceivingProcess(config, log_service, metrics, spool, link, suppression, receiving.policy.limiter,
                             scheduler, stage, services)
    if config.metrics.endpoint:
        # Separate: the delivery families come from the delivery process, over its pipe, per scrape.
        delivery_side = scheduler.metrics_text if stage is None else None
        services.append(metrics_service(config.metrics.endpoint, metrics, reactor=reactor, delivery=delivery_side))
    _listen(built, receiving, suppression_check, reactor)
    return built


def _listen(built: ReceivingProcess, parts: ReceivingParts, suppression: Any, reactor: Any) -> None:
    from mailrelay.cluster.wiring import shared_window
    from mailrelay.server.factory import ConnectionCounter, FailureWindow, RelayServerFactory

    config = built.config
    tls_options = server_tls_options(config)     # per listener kind, built once: tls is restart-only
    queue = QueueFront(built.spool, built.scheduler)
    # One count for all listeners: max_connections is "in all", and a client gets one AUTH-failure budget.
    connections = ConnectionCounter(config.limits.max_connections, config.limits.max_connections_per_ip)
    auth_failures = shared_window(built.cluster, FailureWindow(config.limits.auth_failures_per_minute, reactor))
    for index, listener in enumerate(config.listeners):
        wrapped: Any
        if listener.kind == "http":
            wrapped = _http_factory(listener, config, parts, queue, reactor, built.metrics, connections)
            built.factories.append(wrapped)
        else:
            factory = RelayServerFactory(
                hostname=config.hostname, listener=listener, limits=config.limits, portal=parts.portal,
                mechanisms=config.auth.mechanisms, policy=parts.policy, queue=queue,
                tls_options=None if listener.kind == "submissions" else tls_options[listener.kind], clock=reactor,
                metrics=built.metrics, connections=connections, auth_failures=auth_failures,
                authserv_id=own_authserv_id(config), postmaster=config.postmaster,
                received_shows_user=config.auth.received_shows_user, suppression=suppression,
            )
            built.factories.append(factory)
            implicit = listener.kind == "submissions"
            wrapped = TLSMemoryBIOFactory(tls_options[listener.kind], False, factory) if implicit else factory
            if listener.proxy_protocol:       # the PROXY header first: before the banner, before TLS on 465
                from mailrelay.server.proxylistener import ProxyProtocolFactory

                wrapped = ProxyProtocolFactory(wrapped, listener.trusted_proxies, name=f"listen[{index}]",
                                               clock=reactor, metrics=built.metrics)
        listening: IService = strports.service(with_backlog(listener.endpoint), wrapped, reactor=reactor)
        listening.setName(f"listen[{index}]")
        built.services.append(listening)
        built.listeners.append(listening)


def _http_factory(listener: Any, config: Config, parts: ReceivingParts, queue: QueueFront, reactor: Any,
                  metrics: Any, connections: Any) -> Any:
    """The HTTP injection API (server/http.py); TLS, when wanted, comes from an ssl: endpoint."""
    from mailrelay.server.apikeys import ApiKeyFile
    from mailrelay.server.http import ApiFactory

    keys = config.http.api_keys_file
    if keys is None:            # config.sections refuses an http listener without it
        raise ValueError('[http] api_keys_file: required with a [[listen]] kind = "http"')
    return ApiFactory(hostname=config.hostname, listener=listener, limits=config.limits,
                      policy=parts.policy, queue=queue, keys=ApiKeyFile(keys),
                      clock=reactor, metrics=metrics, authserv_id=own_authserv_id(config),
                      received_shows_user=config.auth.received_shows_user, connections=connections)


def delivery_worker(config: Config, reactor: Any) -> Any:
    """The delivery process's service for `config` (queue.worker.DeliveryWorker): the spool (not its
    owner), its own `[cluster]` link for the shared `[[throttle]]` state, the delivery side, and
    `[metrics] delivery_endpoint`. Raises ValueError (unreadable secrets, bad keys)."""
    from mailrelay.cluster import wiring as cluster
    from mailrelay.queue.worker import DeliveryWorker
    from mailrelay.metrics import Metrics, metrics_service
    from mailrelay.spool.store import Spool

    metrics = Metrics()
    spool = Spool(config.spool, clock=reactor, reactor=reactor, owner=False,
                  directory_fsync=config.queue.directory_fsync)
    link = cluster.redis_link(config, reactor, metrics)   # this process's own link
    stage = DeliveryStage(config, spool, reactor, metrics, link)
    services = [s for s in (spool, link, *stage.services()) if s is not None]
    if config.metrics.delivery_endpoint:
        services.append(metrics_service(config.metrics.delivery_endpoint, metrics, reactor=reactor))

    def reload(source: Optional[bytes]) -> bool:
        """Apply the config the main process just applied (`source`, its bytes), or re-read the file."""
        loaded = reread(stage.config.path, stage.rebuild, reactor, source, delivery_only=True)
        if loaded is None:
            return False
        stage.apply(*loaded)
        return True

    return DeliveryWorker(spool=spool, scheduler=stage.scheduler, metrics=metrics, services=services,
                          reload=reload, close_idle=stage.close_idle)
