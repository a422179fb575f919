# -*- test-case-name: tests.test_operations, tests.test_shutdown, tests.test_dns_cache -*-
"""One `Config` in, one Twisted `IService` out — the whole relay, ready to add to any Application.

    from mailrelay.config import load
    from mailrelay.service import make_service
    make_service(load("tap.conf")).setServiceParent(application)

The journey it runs: listeners (server) → spool (durable) → scheduler → next hops (smarthost
transports, direct MX, each behind DKIM) → DSNs. mailrelay.wiring (the composition root) builds it;
this module is its lifecycle in the receiving process. `RelayService.reload()` (SIGHUP under twistd)
swaps in what a new config changes — permit rules, passwords, LDAP, limits, routes, transports, DKIM
keys, queue timings — without touching connections or the queue; a config that fails validation is
refused and the old one stays in force.
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
from typing import Any, Callable, Iterable, Optional

from twisted.application import service
from twisted.internet import defer

from mailrelay import wiring
from mailrelay.config import Config
from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.service")

# Keys a reload cannot change: they are bound to sockets, files, processes or identities made at start.
RESTART_ONLY = ("hostname", "spool", "tls", "listeners", "metrics", "log", "delivery.process", "suppression",
                "http", "cluster", "delivery.tls_reports")


def restart_only(config: Config) -> dict:
    """The values of the RESTART_ONLY keys (dotted paths) in `config`."""
    values = {}
    for key in RESTART_ONLY:
        value: Any = config
        for part in key.split("."):
            value = getattr(value, part)
        values[key] = value
    return values


class RelayService(service.MultiService):
    """The whole relay. Children start in journey order (log, spool, scheduler, metrics, listeners) and
    stop gracefully: listeners close first and their sessions drain (bounded by `shutdown_grace`) while
    the scheduler lets deliveries in flight finish (bounded); the spool is closed last. What runs comes
    from the composition root (mailrelay.wiring.receiving_process); this is its lifecycle."""

    def __init__(self, config: Config, reactor: Any = None, handle_sighup: bool = False,
                 shutdown_grace: Optional[float] = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        from mailrelay.server.factory import SHUTDOWN_GRACE

        self.setName("mailrelay")
        self.config, self.reactor, self._handle_sighup = config, reactor, handle_sighup
        # What was bound at start (sockets, spool, process, ...): a reload compares against this, never
        # against the last config read, so a key changed and changed back is in force again, silently.
        self.bound = restart_only(config)
        self.shutdown_grace = SHUTDOWN_GRACE if shutdown_grace is None else shutdown_grace
        built = wiring.receiving_process(config, reactor)
        self.log_service, self.metrics, self.spool = built.log_service, built.metrics, built.spool
        self.cluster = built.cluster                  # None: no [cluster] redis
        self.suppression = built.suppression          # None: [suppression] off
        self._limiter = built.limiter                 # the message budgets: they outlive every reload
        self.scheduler = built.scheduler
        self.stage = built.stage                      # the delivery side, when it runs in this process
        self.listeners, self.factories = built.listeners, built.factories
        for child in built.services:
            child.setServiceParent(self)

    @property
    def delivery(self) -> Optional[wiring.DeliveryParts]:
        """The next hops in force, when delivery is inline (else they live in the delivery process)."""
        return self.stage.parts if self.stage is not None else None

    @property
    def events(self) -> Any:
        """The webhook events (mailrelay.events), when delivery is inline."""
        return self.stage.events if self.stage is not None else None

    @property
    def tls_reports(self) -> Any:
        """The TLS report store (RFC 8460), when delivery is inline and `tls_reports` is on."""
        return self.stage.tls_reports if self.stage is not None else None

    # -- reload ------------------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config file and apply it; False (and the old config in force) when it is refused."""
        stage = self.stage

        # Delivery parts too in either mode: a bad one refuses the reload.
        def build(config: Config, reactor: Any) -> tuple:
            delivery = (stage.rebuild(config, reactor) if stage is not None
                        else wiring.build_delivery_parts(config, reactor, metrics=self.metrics))
            return wiring.build_receiving_parts(config, reactor, limiter=self._limiter), delivery

        loaded = wiring.reread(self.config.path, build, self.reactor)
        if loaded is None:
            return False
        config, (parts, delivery) = loaded
        for key, value in restart_only(config).items():
            if value != self.bound[key]:
                log.warn("reload: {key} changed; that takes effect only after a restart", key=key)
        self._limiter = parts.policy.limiter
        for factory in self.factories:
            factory.reconfigure(limits=config.limits, portal=parts.portal, mechanisms=config.auth.mechanisms,
                                policy=parts.policy, authserv_id=wiring.own_authserv_id(config),
                                postmaster=config.postmaster,
                                received_shows_user=config.auth.received_shows_user)
        if stage is not None:
            stage.apply(config, delivery)
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
        stage = self.stage
        if stage is not None:
            d.addCallback(lambda _: stage.close_idle())
        d.addCallback(lambda _: _stop_all(rest))
        d.addCallback(lambda _: log.info("shut down: everything not delivered stays in the spool"))
        return d

    def _drain_sessions(self) -> defer.Deferred:
        return _stop_all(self.factories, lambda factory: factory.shut_down(self.shutdown_grace))


def _stop_all(things: Iterable[Any], stop: Callable[[Any], Any] = lambda child: child.stopService()) -> defer.Deferred:
    """Stop several things at once; fires when all are done, each failure logged, never failing."""
    d = defer.DeferredList([defer.maybeDeferred(stop, thing) for thing in things], consumeErrors=True)
    return d.addCallback(_log_failures, "stopping a service")


def _log_failures(results: list, what: str) -> None:
    for ok, value in results:
        if not ok:
            log.failure("shutdown: {what} failed", value, what=what)


def make_service(config: Config, reactor: Any = None, handle_sighup: bool = False,
                 shutdown_grace: Optional[float] = None) -> RelayService:
    """Build the whole relay for `config` as one MultiService (not yet started). `handle_sighup`: re-read
    the config file on SIGHUP (the twistd plugin turns it on; an embedding application may call reload()).
    `shutdown_grace`: seconds a transaction in progress may take to finish at shutdown (default
    server.factory.SHUTDOWN_GRACE)."""
    return RelayService(config, reactor=reactor, handle_sighup=handle_sighup, shutdown_grace=shutdown_grace)
