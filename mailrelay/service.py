"""Wiring: one `Config` in, one Twisted `IService` out — the whole relay, ready to add to any Application.

    from mailrelay.config import load
    from mailrelay.service import make_service
    make_service(load("tap.conf")).setServiceParent(application)

The journey it assembles: listeners (server) → spool (durable) → scheduler → next hops (smarthost
transports, direct MX) → DSNs. Each stage only knows the next through mailrelay.interfaces.
"""
from __future__ import annotations

from twisted.application import service, strports
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mailrelay import tls
from mailrelay.config import Config
from mailrelay.interfaces import IIncomingQueue, IMessageWriter

log = Logger(namespace="mailrelay")


@implementer(IMessageWriter)
class _NotifyingWriter:
    """A spool writer whose successful commit also tells the scheduler the message is there."""

    def __init__(self, writer, scheduler):
        self._writer, self._scheduler = writer, scheduler
        self.queue_id = writer.queue_id

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def commit(self):
        def committed(queue_id):
            self._scheduler.enqueue(queue_id)
            return queue_id

        return self._writer.commit().addCallback(committed)

    def abort(self) -> None:
        self._writer.abort()


@implementer(IIncomingQueue)
class QueueFront:
    """What the listeners hand messages to: the spool, with the scheduler told of every commit."""

    def __init__(self, spool, scheduler):
        self._spool, self._scheduler = spool, scheduler

    def new_message(self, envelope):
        return _NotifyingWriter(self._spool.new_message(envelope), self._scheduler)


def server_tls_options(config: Config):
    """The relay's own certificate: the configured one, or a self-signed one kept in the spool."""
    if config.tls.cert is not None:
        return tls.server_options(config.tls.cert, config.tls.key)
    path, created = tls.ensure_self_signed(config.spool, config.hostname)
    log.warn(
        "no [tls] cert configured: using the self-signed certificate {path} for {hostname}{new}",
        path=str(path), hostname=config.hostname, new=" (generated now)" if created else "",
    )
    return tls.server_options(path)


def build_checkers(config: Config, reactor) -> list:
    checkers = []
    if config.auth.password_file is not None:
        from mailrelay.server.passwords import PasswordFileChecker

        checkers.append(PasswordFileChecker(config.auth.password_file, reactor=reactor))
    if config.auth.ldap is not None:
        from mailrelay.server.ldap import LDAPChecker

        checkers.append(LDAPChecker(config.auth.ldap, reactor=reactor))
    return checkers


def dkim_wrapper(config: Config, reactor):
    """A function putting each next hop behind DKIM signing/verification, or leaving it as it is."""
    from mailrelay.dkim.build import build_signer, build_verifier

    signer, verifier = build_signer(config), build_verifier(config)
    if signer is None and verifier is None:
        return lambda hop: hop
    from mailrelay.dkim.hop import DKIMHop

    return lambda hop: DKIMHop(hop, signer=signer, verifier=verifier, reactor=reactor)


def make_service(config: Config, reactor=None) -> service.MultiService:
    """Build the whole relay for `config` as one MultiService (not yet started)."""
    if reactor is None:
        from twisted.internet import reactor
    from mailrelay.delivery.mx import MXDelivery
    from mailrelay.delivery.routes import Router
    from mailrelay.delivery.scheduler import Scheduler
    from mailrelay.delivery.smarthost import SmarthostTransport
    from mailrelay.server.factory import RelayServerFactory
    from mailrelay.server.policy import PermitPolicy
    from mailrelay.server.realm import build_portal
    from mailrelay.spool.store import Spool

    top = service.MultiService()
    top.setName("mailrelay")

    spool = Spool(config.spool, clock=reactor)
    spool.setServiceParent(top)

    outbound = dkim_wrapper(config, reactor)
    transports = {
        name: outbound(SmarthostTransport(t, config.hostname, clock=reactor, reactor=reactor))
        for name, t in config.transports.items()
    }
    direct = outbound(MXDelivery(config.delivery, config.hostname, reactor=reactor))
    reporter = None
    if config.queue.bounces:
        from mailrelay.dsn import DSNReporter

        reporter = DSNReporter(spool, config.hostname, clock=reactor, lifetime=config.queue.lifetime)
    scheduler = Scheduler(
        spool, Router(config.routes), transports, direct, config.queue, config.delivery,
        reporter, clock=reactor,
    )
    scheduler.setServiceParent(top)
    if reporter is not None:
        reporter.scheduler = scheduler

    checkers = build_checkers(config, reactor)
    portal = build_portal(checkers) if checkers else None
    policy = PermitPolicy(config.permits, config.limits, clock=reactor)
    tls_options = server_tls_options(config)
    queue = QueueFront(spool, scheduler)

    for index, listener in enumerate(config.listeners):
        factory = RelayServerFactory(
            hostname=config.hostname, listener=listener, limits=config.limits, portal=portal,
            mechanisms=config.auth.mechanisms, policy=policy, queue=queue,
            tls_options=None if listener.kind == "submissions" else tls_options, clock=reactor,
        )
        if listener.kind == "submissions":
            factory = TLSMemoryBIOFactory(tls_options, False, factory)
        listening = strports.service(listener.endpoint, factory, reactor=reactor)
        listening.setName(f"listen[{index}]")
        listening.setServiceParent(top)
    return top
