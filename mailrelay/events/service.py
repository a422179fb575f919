# -*- test-case-name: tests.test_webhook -*-
"""The IDeliveryEvents service: every `[[webhook]]` URL's outbox and sender, in the process that runs
the scheduler (the delivery process with `[delivery] process = "separate"`, else the relay's own).

In: outcomes from the scheduler (`emit`), the `[[webhook]]` tables (at start and on reload).  Out: one
event document per subscribed URL, appended to that URL's outbox (store.py) and sent from there
(sender.py); the backlog per URL for metrics.

Reload: a URL still configured keeps its outbox and takes the new events, secret, trust and limits; a
new URL's outbox is read (events left by an earlier config included) and sent; a URL no longer
configured stops being sent to, and its backlog stays on disk untouched — shown by `mailrelay queue`
as not configured, sent again if the URL comes back, removed by deleting its directory.
Stop: no new POST, the ones in flight are abandoned (their events stay), appends still being written
finish, then the outbox thread ends.
"""
from __future__ import annotations

from functools import partial
import random
from pathlib import Path
from typing import Optional

from twisted.application import service
from twisted.internet import defer, task
from zope.interface import implementer

from mailrelay.config import WebhookConfig
from mailrelay.config.webhooks import display_url
from mailrelay.events.event import event_body, new_id
from mailrelay.events.sender import TreqPoster, WebhookSender, read_key
from mailrelay.events.store import Outbox
from mailrelay.interfaces import IDeliveryEvents
from mailrelay.logger import Logger
from mailrelay.spool.threads import BlockingThreads

log = Logger(namespace="mailrelay.events")


CLOSE_WAIT = 2.0         # seconds a stop waits for the webhook clients' idle connections to close


@implementer(IDeliveryEvents)
class DeliveryEvents(service.Service):
    """`spool`: the spool directory; `webhooks`: the `[[webhook]]` configs; `drop_after`: seconds after
    which an event a URL keeps refusing with a 4xx is given up ([queue] lifetime); `poster(config)`:
    makes the HTTP client of one URL: `.post(url, body, headers)` firing with the status code, and
    `.close()` (default: TreqPoster); `clock`: IReactorTime."""

    def __init__(self, spool: Path, webhooks: tuple[WebhookConfig, ...], reactor, drop_after: float,
                 metrics=None, poster=None, rng: Optional[random.Random] = None):
        self.spool, self.reactor, self.drop_after, self._metrics = Path(spool), reactor, drop_after, metrics
        self._poster = poster or self._treq_poster
        self._rng = rng or random.Random()
        self._configs = tuple(webhooks)
        self._senders: dict[str, WebhookSender] = {}
        self._posters: dict[str, TreqPoster] = {}
        self._by_kind: dict[str, list[Outbox]] = {}
        self._threads = BlockingThreads(reactor, 1, "webhook-outbox")
        if metrics is not None:
            metrics.watch_webhooks(self.backlog)

    def _treq_poster(self, config: WebhookConfig):
        return TreqPoster(self.reactor, config.ca_file, config.concurrency, config.timeout)

    # -- IDeliveryEvents ---------------------------------------------------------------------------

    def emit(self, kind, queue_id, sender, recipient, reply, attempt, next_hop, transport) -> defer.Deferred:
        outboxes = self._by_kind.get(kind)
        if not outboxes:
            return defer.succeed(None)
        now = self.reactor.seconds()
        event_id = new_id()
        body = event_body(event_id, kind, queue_id, sender, recipient, now, reply, attempt, next_hop, transport)
        if len(outboxes) == 1:
            return outboxes[0].append(event_id, body, now)
        return defer.DeferredList([o.append(event_id, body, now) for o in outboxes])

    # -- the service -------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._threads.start()
        self._apply(self._configs)

    def reconfigure(self, webhooks: tuple[WebhookConfig, ...], drop_after: float) -> None:
        """A reloaded config (SIGHUP): see the module's docstring."""
        self._configs, self.drop_after = tuple(webhooks), drop_after
        if self.running:
            self._apply(self._configs)

    def _apply(self, configs: tuple[WebhookConfig, ...]) -> None:
        wanted = {c.url: c for c in configs}
        for url in [u for u in self._senders if u not in wanted]:
            sender = self._senders.pop(url)
            sender.stop()
            self._close_poster(url)
            sender.outbox.flushed().addBoth(lambda _, o: o.close(), sender.outbox)
            log.info("webhook {url}: no longer configured; its {count} waiting events stay in the spool",
                     url=sender.outbox.shown, count=sender.outbox.live)
        for url, config in wanted.items():
            try:
                key, post = read_key(config.secret_file), self._poster(config)
            except (OSError, ValueError) as e:
                # Proven at load; gone since. The URL keeps its outbox and is tried again at the next reload.
                log.error("webhook {url}: cannot read its secret or CA file ({error}); not sending",
                          url=display_url(url), error=type(e).__name__)
                continue
            existing = self._senders.get(url)
            if existing is not None:
                self._close_poster(url)
                self._posters[url] = post
                existing.outbox.max_pending = config.max_pending
                existing.reconfigure(config, post.post, key, self.drop_after)
                continue
            outbox = Outbox(self.spool, url, config.max_pending, self._threads.run, partial(self._ready, url),
                            on_drop=partial(self._drop, url))
            try:
                waiting = outbox.load()
            except OSError as e:
                log.error("webhook {url}: cannot read its outbox in {directory}: {error}; not sending",
                          url=outbox.shown, directory=str(outbox.directory), error=e.strerror)
                continue
            if waiting:
                log.info("webhook {url}: {count} events waiting from before", url=outbox.shown, count=waiting)
            self._posters[url] = post
            sender = WebhookSender(outbox, config, self.reactor, post.post, key, self.drop_after,
                                   rng=self._rng, metrics=self._metrics)
            self._senders[url] = sender
            sender.start()
        self._by_kind = {}
        for sender in self._senders.values():
            for kind in sender.config.events:
                self._by_kind.setdefault(kind, []).append(sender.outbox)

    def _ready(self, url: str) -> None:
        sender = self._senders.get(url)
        if sender is not None:
            sender.pump()

    def _drop(self, url: str, reason: str) -> None:
        if self._metrics is not None:
            sender = self._senders.get(url)
            self._metrics.webhook_dropped(sender.outbox.shown if sender else url, reason)

    def _close_poster(self, url: str) -> defer.Deferred:
        """Close the idle connections of `url`'s HTTP client; fires once they are closed."""
        poster = self._posters.pop(url, None)
        return defer.maybeDeferred(poster.close) if poster is not None else defer.succeed(None)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        for sender in self._senders.values():
            sender.stop()
        # Idle connections are closed, waited for at most CLOSE_WAIT (a TLS close waits on the peer);
        # a cancelled POST aborts its connection, which closes on the reactor's next turn.
        closing = [self._close_poster(url).addTimeout(CLOSE_WAIT, self.reactor) for url in list(self._posters)]
        closing.append(task.deferLater(self.reactor, 0, lambda: None))
        outboxes = [s.outbox for s in self._senders.values()]
        d = defer.DeferredList([o.flushed() for o in outboxes] + closing, consumeErrors=True)

        def close_all(_: object) -> None:
            for o in outboxes:
                o.close()
        d.addBoth(close_all)
        d.addBoth(lambda _: self._threads.stop())
        return d

    # -- the backlog -------------------------------------------------------------------------------

    def backlog(self) -> list[tuple[str, int, float]]:
        """(URL as shown, events outstanding, age of the oldest in seconds) per configured URL; read by
        the metrics collector in a scrape thread, so it only reads."""
        now = self.reactor.seconds()
        rows = []
        for sender in list(self._senders.values()):
            oldest = sender.outbox.oldest()
            rows.append((sender.outbox.shown, sender.outbox.live, 0.0 if oldest is None else max(0.0, now - oldest)))
        return rows
