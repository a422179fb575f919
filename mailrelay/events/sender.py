# -*- test-case-name: tests.test_webhook -*-
"""POSTs to one webhook URL: the events of its outbox, until each is answered 2xx.

In: the outbox (store.Outbox) of one URL and its `[[webhook]]` config.  Out: HTTP POSTs of each event
document as it is stored, `Content-Type: application/json`, signed when `secret_file` is set:

    X-Mailrelay-Signature: sha256=<hex HMAC-SHA256 (RFC 2104, FIPS 180-4) of the body, keyed with the
                           secret file's content, stripped>
    X-Mailrelay-Event: <the event's id>

TLS is verified (RFC 6125 / RFC 9110 section 4.3.4: the certificate must chain to `ca_file`'s CAs, else
the system's, and name the URL's host).  Redirects are not followed (RFC 9110 section 15.4: a 3xx is
not a 2xx; a signed body is never replayed to a host the config does not name).

At most `concurrency` POSTs are in flight; each is bounded by `timeout` (connect to the last byte of
the answer).  Any answer but 2xx, a timeout or a connection failure puts the event back first in line
and pauses the URL for a jittered, doubling interval (RETRY_FIRST up to RETRY_MAX, queue.backoff);
after the pause one POST probes, and full concurrency returns with the first 2xx.  The first
connection failure after a 2xx is retried at once, without a pause: a kept-alive connection the
receiver closed just as it was reused looks like that.  A 4xx other than
408 and 429 (RFC 9110 sections 15.5.9, RFC 6585 section 4: "try again later") is a refusal of that very
event: it is retried like the rest, but given up — logged and counted — once the event is older than
`drop_after` (the `[queue] lifetime`), so one document a receiver will never take cannot hold the URL's
backlog for ever.  Events are sent oldest first, but with concurrency and retries there is no ordering
guarantee: receivers order by `time` and dedupe by `id`.
"""
from __future__ import annotations

import hashlib
import hmac
import random
from pathlib import Path
from typing import Callable, Optional

from twisted.internet import defer

from mailrelay.config import WebhookConfig
from mailrelay.queue.backoff import Backoff
from mailrelay.events.store import Outbox, StoredEvent
from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.events")

RETRY_FIRST = 5.0
RETRY_MAX = 900.0
RETRIED_4XX = (408, 429)     # RFC 9110 §15.5.9 Request Timeout, RFC 6585 §4 Too Many Requests
USER_AGENT = "mailrelay-webhook/1"
IDLE_CONNECTION = 20         # seconds a kept-alive connection to a receiver may stay idle (the pool takes an int)
POST_RESULTS = ("ok", "refused", "server_error", "timeout", "error", "dropped")

Post = Callable[[str, bytes, dict], defer.Deferred]     # (url, body, headers) -> Deferred[status code]


def read_key(path: Optional[Path]) -> Optional[bytes]:
    """The HMAC key: the secret file's content, stripped; None without a file."""
    if path is None:
        return None
    return Path(path).read_bytes().strip()


def signature(key: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


class TreqPoster:
    """POST over treq with verified TLS (`ca_file`'s CAs, else the system's) and a connection pool of
    `concurrency` kept-alive connections.  `post` fires with the status code; the body is discarded."""

    def __init__(self, reactor, ca_file: Optional[Path], concurrency: int, connect_timeout: float):
        from treq.client import HTTPClient
        from twisted.internet import ssl
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

        trust = None
        if ca_file is not None:
            from cryptography import x509
            from cryptography.hazmat.primitives import serialization

            certs = x509.load_pem_x509_certificates(Path(ca_file).read_bytes())
            trust = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in certs])
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = concurrency
        self._pool.retryAutomatically = False       # a POST is never re-sent behind our back
        # Idle connections are dropped before common server keep-alive timeouts (60-75 s) drop them:
        # a POST on a connection the server just closed fails without an answer (RFC 9112 section 9.3).
        self._pool.cachedConnectionTimeout = IDLE_CONNECTION

        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust),
                      connectTimeout=connect_timeout, pool=self._pool)
        self._client = HTTPClient(agent)

    def post(self, url: str, body: bytes, headers: dict) -> defer.Deferred:
        import treq

        d = self._client.post(url, data=body, headers=headers, allow_redirects=False)
        return d.addCallback(lambda response: treq.collect(response, lambda data: None)
                             .addCallback(lambda _: response.code))

    def close(self) -> defer.Deferred:
        return self._pool.closeCachedConnections()


class WebhookSender:
    """Sends one outbox.  `post`: a Post; `clock`: IReactorTime; `metrics`: a Metrics or None."""

    def __init__(self, outbox: Outbox, config: WebhookConfig, clock, post: Post, key: Optional[bytes],
                 drop_after: float, rng: Optional[random.Random] = None, metrics=None):
        self.outbox, self.config, self._clock, self._post, self._key = outbox, config, clock, post, key
        self.drop_after, self._metrics = drop_after, metrics
        self._backoff = Backoff(RETRY_FIRST, RETRY_MAX, rng=rng or random.Random())
        self._requests: dict[str, defer.Deferred] = {}
        self._retry_call = None
        self.failures = 0
        self.probing = False
        self._struck = False        # a connection failure since the last 2xx, retried at once
        self.running = False

    def reconfigure(self, config: WebhookConfig, post: Post, key: Optional[bytes], drop_after: float) -> None:
        """New events, secret, trust, timeout or limits for the same URL; POSTs in flight finish as they are."""
        self.config, self._post, self._key, self.drop_after = config, post, key, drop_after
        self.pump()

    def start(self) -> None:
        self.running = True
        self.pump()

    def stop(self) -> None:
        """No new POST; the ones in flight are cancelled and their events stay in the outbox."""
        self.running = False
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        requests, self._requests = self._requests, {}
        for d in requests.values():
            d.cancel()
        self.outbox.return_all()

    @property
    def paused(self) -> bool:
        return self._retry_call is not None and self._retry_call.active()

    def pump(self) -> None:
        limit = 1 if self.probing else self.config.concurrency
        while self.running and not self.paused and len(self._requests) < limit:
            event = self.outbox.take()
            if event is None:
                return
            self._send(event)

    def _send(self, event: StoredEvent) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "X-Mailrelay-Event": event.id}
        if self._key is not None:
            headers["X-Mailrelay-Signature"] = signature(self._key, event.body)
        d = defer.maybeDeferred(self._post, self.outbox.url, event.body, headers)
        self._requests[event.id] = d
        d.addTimeout(self.config.timeout, self._clock)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(event,), errbackArgs=(event,))
        d.addErrback(lambda f: log.failure("webhook {url}: handling an answer failed", f, url=self.outbox.shown))

    def _answered(self, code: int, event: StoredEvent) -> None:
        if self._requests.pop(event.id, None) is None:
            return                              # stopped meanwhile: the event is back in the outbox
        if 200 <= code < 300:
            self._count("ok")
            self.outbox.ack(event)
            if self.failures:
                log.info("webhook {url}: answering again", url=self.outbox.shown)
            self.failures, self.probing, self._struck = 0, False, False
            self.outbox.note(last_success_at=self._clock.seconds())
            self.pump()
            return
        if 400 <= code < 500 and code not in RETRIED_4XX:
            self._count("refused")
            if self._clock.seconds() - event.created > self.drop_after:
                self.outbox.ack(event)
                self._count("dropped")
                self._dropped("refused")
                log.warn("webhook {url}: event {id} refused with HTTP {code} past the message lifetime: given up",
                         url=self.outbox.shown, id=event.id, code=code)
                self.pump()
                return
        else:
            self._count("server_error" if code >= 500 else "refused")
        self._retry(event, f"HTTP {code}")

    def _failed(self, failure, event: StoredEvent) -> None:
        if self._requests.pop(event.id, None) is None:
            return
        if failure.check(defer.TimeoutError, defer.CancelledError):
            self._count("timeout")
            why = f"no answer within {self.config.timeout:g}s"
        else:
            self._count("error")
            why = " ".join(failure.getErrorMessage().split())[:200] or failure.type.__name__
            if not self.failures and not self._struck and self.running:
                # The first connection failure after answers: most likely a kept-alive connection the
                # receiver closed as we reused it (RFC 9112 section 9.3.1). Once, at once, on a new one.
                self._struck = True
                self.outbox.give_back(event)
                self.pump()
                return
        self._retry(event, why)

    def _retry(self, event: StoredEvent, why: str) -> None:
        self.outbox.give_back(event)
        self.outbox.note(last_error=why, last_error_at=self._clock.seconds())
        if self.paused or not self.running:
            return                              # one failure per pause: concurrent ones add nothing
        self.failures += 1
        delay = self._backoff.next_delay(self.failures)
        log.warn("webhook {url}: {why}; {waiting} events waiting, next try in {delay:.0f}s",
                 url=self.outbox.shown, why=why, waiting=self.outbox.live, delay=delay)
        self._retry_call = self._clock.callLater(delay, self._resume)

    def _resume(self) -> None:
        self._retry_call = None
        self.probing = True
        self.pump()

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.webhook_post(self.outbox.shown, result)

    def _dropped(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.webhook_dropped(self.outbox.shown, reason)
