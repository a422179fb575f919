# -*- test-case-name: tests.test_metrics, tests.test_cluster_redis, tests.test_server_bdat -*-
"""Prometheus metrics: what the relay counts along the message's journey, served at `/metrics`.

Place in the journey: beside every stage.  The listeners count connections, AUTH results, accepted and
refused messages and message sizes; the scheduler counts delivery attempts and per-recipient results
(and the latency from receipt to delivery) and lends a snapshot of the queue; the DSN reporter counts
the DSNs it sends.  In: calls to the small `Metrics` methods below.  Out: the Prometheus text
exposition format (0.0.4) over HTTP at `[metrics] endpoint` `/metrics` (any other path: 404).

Every collector lives in the `Metrics` object's own CollectorRegistry, never prometheus_client's
global REGISTRY, so any number of relays (or tests) can exist in one process.  Label values that come
from outside (a listener kind, an AUTH mechanism, a refusal reason) are folded into a fixed set, so a
client can never grow the number of time series.

Metrics (all prefixed `mailrelay_`):
    connections_total{listener}                      SMTP connections accepted, by listener kind
    auth_total{mechanism,result}                     AUTH outcomes: success | failure | temporary
    messages_accepted_total{listener}                messages committed to the spool (250 after DATA)
    messages_refused_total{reason}                   refusal replies to a client, by REFUSAL_REASONS
    message_size_bytes                               histogram of accepted message sizes
    delivery_attempts_total{transport}               deliveries started (one per next-hop transaction)
    delivery_results_total{transport,tls,verified,result}
                                                     per recipient: delivered | deferred | bounced;
                                                     tls: none | tls1.0 .. tls1.3 | tls | unknown;
                                                     verified: true | false (certificate and name)
    delivery_latency_seconds                         histogram: receipt to successful delivery
    dns_cache_lookups_total{result}                  direct delivery's DNS lookups: hit (from its cache) | miss
    dsn_sent_total{kind}                             DSNs queued: failed | delayed | relayed | delivered (RFC 3464)
    oauth2_token_fetches_total{transport,result}     OAuth2 token requests of a smarthost transport:
                                                     success | refused | server_error | bad_response |
                                                     unreachable | timeout (never the token itself)
    proxy_refused_total{reason}                      connections a PROXY protocol listener closed before
                                                     the session: untrusted | invalid | timeout
    queue_messages, queue_oldest_message_age_seconds, queue_held_messages
                                                     gauges read at scrape time from `watch_queue`
    delivery_process_up                              with `[delivery] process = "separate"` only: 1 when
                                                     this scrape includes the delivery process's families
    webhook_posts_total{url,result}                  POSTs of delivery events: ok | refused (4xx, 3xx) |
                                                     server_error | timeout | error (no answer) | dropped
    webhook_dropped_total{url,reason}                events given up: full (outbox at max_pending) | error
                                                     (outbox not writable) | refused (4xx past lifetime)
    webhook_pending{url}, webhook_oldest_event_age_seconds{url}
                                                     gauges: events not yet answered 2xx, per URL
    suppressed_addresses                             gauge: addresses on the suppression list, in force
                                                     (`watch_suppression`; absent while it is off)
    cluster_redis_up                                 gauge, with `[cluster] redis` only: 1 while the
                                                     shared counters answer, 0 while this relay counts
                                                     on its own (`watch_cluster`)
    cluster_redis_fallbacks_total{what}              decisions taken locally because Redis did not
                                                     answer: rate | auth | suppression | throttle (with
                                                     `[delivery] process = "separate"` the throttle's
                                                     link is the delivery process's: both families are
                                                     then on `[metrics] delivery_endpoint`)
    throttle_paused{destination}                     gauge: 1 while a [[throttle]] destination is paused
                                                     after a "slow down" reply, 0 once it resumed
    throttle_waiting{destination}                    gauge: deliveries waiting for a throttled destination
                                                     (its rate, connections or pause), not yet started
    throttle_connections{destination}                gauge: connections open to a throttled destination
    (`watch_throttles`; samples only with [[throttle]] rules; a destination appears while it has
    something to show: a pause in force or recent, a connection, a delivery waiting)

With `[delivery] process = "separate"` the families in DELIVERY_FAMILIES are counted in the delivery
process. `[metrics] endpoint` (main process) then asks that process for them over its pipe at every
scrape (bounded: `DeliveryProcess.metrics_text`) and serves them after its own, each family once: the
main process leaves out its own (empty) copies of those.  A delivery process that does not answer in
time costs the scrape its delivery families, never the scrape itself (`delivery_process_up 0`).

Standards: no SMTP RFC is implemented here; the output is the Prometheus text exposition format over
HTTP/1.1 (twisted.web).  Enhanced status codes (RFC 3463) stay in the replies; this module only counts.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector
from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.web import resource, server

from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.metrics")

LISTENERS = ("relay", "submission", "submissions", "http")
AUTH_MECHANISMS = ("PLAIN", "LOGIN")
AUTH_RESULTS = ("success", "failure", "temporary")
REFUSAL_REASONS = (
    "policy",               # relay or sender not permitted (RFC 5321 §3.6.2: never an open relay)
    "size",                 # SIZE parameter or body over [limits] max_message_size (RFC 1870)
    "syntax",               # malformed command, address or parameter
    "bare_cr",              # bare CR in DATA (SMTP smuggling)
    "bare_lf",              # bare LF in DATA, when refused rather than normalised
    "line_length",          # a line over RFC 5321 §4.5.3.1 limits
    "rate",                 # [limits] messages_per_minute
    "recipients",           # more than [limits] max_recipients (452 4.5.3)
    "auth_required",        # MAIL without the AUTH the listener requires
    "tls_required",         # MAIL or AUTH before STARTTLS where TLS is required
    "from_header",          # From: header outside what the identity may send as
    "local_error",          # the spool could not take the message (4xx)
    "connection_limit",     # [limits] max_connections / max_connections_per_ip (421 4.7.0)
    "suppressed",           # RCPT to an address on the suppression list (550 5.1.1)
    "other",
)
DELIVERY_RESULTS = ("delivered", "deferred", "bounced")
# What protected the session that settled a recipient (outbound.tlsinfo.LABELS), or "unknown" when no
# session said (a DNS failure, no connection, a local error).
TLS_LABELS = ("none", "tls1.0", "tls1.1", "tls1.2", "tls1.3", "tls", "unknown")
_TLS_VERSIONS = {"TLSv1": "tls1.0", "TLSv1.1": "tls1.1", "TLSv1.2": "tls1.2", "TLSv1.3": "tls1.3"}
DSN_KINDS = ("failed", "delayed", "relayed", "delivered")
# Why a PROXY protocol listener closed a connection before its session began (server/proxylistener.py).
PROXY_REFUSALS = ("untrusted", "invalid", "timeout")
OAUTH2_RESULTS = ("success", "refused", "server_error", "bad_response", "unreachable", "timeout")
# TLS policy outcomes of direct delivery (RFC 8460 4.3 policy and result types; "success" for none).
TLS_POLICY_TYPES = ("sts", "tlsa", "no-policy-found")
TLS_POLICY_RESULTS = (
    "success", "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
)

# Seconds: from a minute to past the default 5-day lifetime.
LATENCY_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400, 2 * 86400, 5 * 86400)
# Bytes: 1 KiB .. 100 MiB (the default [limits] max_message_size is 50 MiB).
SIZE_BUCKETS = tuple(2 ** n for n in range(10, 28, 2))

QueueSnapshot = Callable[[], "tuple[int, float, int]"]
# The families the scheduler and the DSN reporter count: where delivery runs in its own process, that
# process owns them (a new delivery-side metric belongs here too).
DELIVERY_FAMILIES = frozenset((
    "mailrelay_delivery_attempts", "mailrelay_delivery_results", "mailrelay_delivery_latency_seconds",
    "mailrelay_dsn_sent", "mailrelay_queue_messages", "mailrelay_queue_oldest_message_age_seconds",
    "mailrelay_queue_held_messages", "mailrelay_webhook_posts", "mailrelay_webhook_dropped",
    "mailrelay_webhook_pending", "mailrelay_webhook_oldest_event_age_seconds",
    "mailrelay_throttle_paused", "mailrelay_throttle_waiting", "mailrelay_throttle_connections",
    "mailrelay_tls_policy_results", "mailrelay_oauth2_token_fetches", "mailrelay_dns_cache_lookups",
))
WEBHOOK_RESULTS = ("ok", "refused", "server_error", "timeout", "error", "dropped")
WEBHOOK_DROPS = ("full", "error", "refused")
# (URL as shown, events pending, age of the oldest in seconds) per configured webhook URL.
WebhookBacklog = Callable[[], "list[tuple[str, int, float]]"]
# The delivery process's families, or None when it did not answer (see DeliveryProcess.metrics_text).
DeliveryText = Callable[[], "defer.Deferred[Optional[bytes]]"]


CLUSTER_FALLBACKS = ("rate", "auth", "suppression", "throttle")

def _fold(value: str, allowed: tuple[str, ...], other: str = "other") -> str:
    """A label value from the fixed set, or `other` (bounded cardinality whatever the input)."""
    return value if value in allowed else other


UNKNOWN = object()     # delivery_result(tls=UNKNOWN): the next hop did not say


def tls_label(tls: object) -> str:
    """A label from TLS_LABELS: a label itself ("tls1.3"), or an OpenSSL protocol name ("TLSv1.3", also
    followed by the cipher) folded to one; any other TLS description "tls"; "none" for plaintext (None,
    "" or "none"); "unknown" when the caller has nothing to say (pass `UNKNOWN`)."""
    if tls is UNKNOWN:
        return "unknown"
    if not tls:
        return "none"
    text = str(tls)
    if text in TLS_LABELS:
        return text
    return _TLS_VERSIONS.get(text.split(" ", 1)[0], "tls")


class _QueueCollector(Collector):
    """The three queue gauges, computed when Prometheus scrapes, from the snapshot callable.

    prometheus_client's Twisted resource serves scrapes from the reactor's threadpool: the callable
    runs in that thread and must only read (see Scheduler.queue_snapshot)."""

    def __init__(self) -> None:
        self.snapshot: Optional[QueueSnapshot] = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size, oldest, held = self._read()
        yield GaugeMetricFamily("mailrelay_queue_messages", "Messages in the queue, held ones included.",
                                value=size)
        yield GaugeMetricFamily("mailrelay_queue_oldest_message_age_seconds",
                                "Age of the oldest queued message (0 when the queue is empty).", value=oldest)
        yield GaugeMetricFamily("mailrelay_queue_held_messages", "Messages on hold.", value=held)

    def _read(self) -> tuple[int, float, int]:
        if self.snapshot is None:
            return 0, 0.0, 0
        try:
            size, oldest, held = self.snapshot()
            return int(size), max(0.0, float(oldest)), int(held)
        except Exception:
            # A broken snapshot must not break the whole scrape: the counters still matter.
            log.failure("queue snapshot for metrics failed")
            return 0, 0.0, 0


class _ThrottleCollector(Collector):
    """The throttle gauges, from the scheduler's `throttle_snapshot` at scrape time (in the scrape's
    thread: the snapshot only reads).  Label values are destinations a [[throttle]] rule matched."""

    def __init__(self, snapshot: Callable[[], Optional[tuple]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            snapshot = self.snapshot()
        except Exception:
            log.failure("throttle snapshot for metrics failed")
            snapshot = ([], {}, 0.0)
        # No [[throttle]] rule (None): the families without samples, like a labelled counter never counted.
        statuses, waiting, now = snapshot if snapshot is not None else ([], {}, 0.0)
        paused = GaugeMetricFamily("mailrelay_throttle_paused", "1 while the destination is paused after a "
                                   "slow-down reply.", labels=["destination"])
        queued = GaugeMetricFamily("mailrelay_throttle_waiting", "Deliveries waiting for a throttled "
                                   "destination.", labels=["destination"])
        open_ = GaugeMetricFamily("mailrelay_throttle_connections", "Connections open to a throttled "
                                  "destination.", labels=["destination"])
        shown = set()
        for status in statuses:
            shown.add(status.destination)
            paused.add_metric([status.destination], 1 if status.paused(now) else 0)
            open_.add_metric([status.destination], status.connections)
            queued.add_metric([status.destination], waiting.get(status.destination, 0))
        for destination in sorted(set(waiting) - shown):
            paused.add_metric([destination], 0)
            open_.add_metric([destination], 0)
            queued.add_metric([destination], waiting[destination])
        yield paused
        yield queued
        yield open_


class _SizeCollector(Collector):
    """One gauge read at scrape time from a callable (in the scrape's thread: it must only read)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self.name, self.documentation, self.read = name, documentation, read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            value = int(self.read())
        except Exception:
            log.failure("{name} for metrics failed", name=self.name)
            return
        yield GaugeMetricFamily(self.name, self.documentation, value=value)


class _WebhookCollector(Collector):
    """The two backlog gauges per webhook URL, read at scrape time (in the scrape's thread: reads only)."""

    def __init__(self) -> None:
        self.backlog: Optional[WebhookBacklog] = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            rows = list(self.backlog()) if self.backlog is not None else []
        except Exception:
            log.failure("webhook backlog for metrics failed")
            return
        pending = GaugeMetricFamily("mailrelay_webhook_pending", "Delivery events not yet answered 2xx.",
                                    labels=["url"])
        oldest = GaugeMetricFamily("mailrelay_webhook_oldest_event_age_seconds",
                                   "Age of the oldest delivery event not yet answered 2xx (0: none).",
                                   labels=["url"])
        for url, count, age in rows:
            pending.add_metric([url], count)
            oldest.add_metric([url], age)
        yield pending
        yield oldest


class Metrics:
    """Every mailrelay collector, registered in `registry` (a new private one by default)."""

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connections = Counter("mailrelay_connections", "SMTP connections accepted.", ["listener"],
                                   registry=r)
        self.auth_results = Counter("mailrelay_auth", "AUTH attempts by mechanism and result.",
                                    ["mechanism", "result"], registry=r)
        self.messages_accepted = Counter("mailrelay_messages_accepted", "Messages accepted into the queue.",
                                         ["listener"], registry=r)
        self.messages_refused = Counter("mailrelay_messages_refused", "Refusals sent to SMTP clients.",
                                        ["reason"], registry=r)
        self.message_size = Histogram("mailrelay_message_size_bytes", "Size of accepted messages.",
                                      buckets=SIZE_BUCKETS, registry=r)
        self.delivery_attempts = Counter("mailrelay_delivery_attempts", "Deliveries started.", ["transport"],
                                         registry=r)
        self.delivery_results = Counter("mailrelay_delivery_results", "Delivery results per recipient.",
                                        ["transport", "tls", "verified", "result"], registry=r)
        self.delivery_latency = Histogram("mailrelay_delivery_latency_seconds",
                                          "Time from receipt to delivery, per delivered recipient.",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.dsn_sent = Counter("mailrelay_dsn_sent", "Delivery status notifications queued.", ["kind"],
                                registry=r)
        self.oauth2_fetches = Counter("mailrelay_oauth2_token_fetches", "OAuth2 token requests by result.",
                                      ["transport", "result"], registry=r)
        self.proxy_refusals = Counter("mailrelay_proxy_refused", "Connections closed by a PROXY protocol "
                                      "listener before the session began.", ["reason"], registry=r)
        self.webhook_posts = Counter("mailrelay_webhook_posts", "POSTs of delivery events by result.",
                                     ["url", "result"], registry=r)
        self.webhook_drops = Counter("mailrelay_webhook_dropped", "Delivery events given up, by reason.",
                                     ["url", "reason"], registry=r)
        self.cluster_fallbacks = Counter("mailrelay_cluster_redis_fallbacks", "Decisions taken with this "
                                         "relay's own counters because Redis did not answer.", ["what"],
                                         registry=r)
        self.tls_policy_results = Counter("mailrelay_tls_policy_results", "TLS outcomes of direct delivery "
                                          "by policy type and RFC 8460 result.", ["policy", "result"], registry=r)
        self.dns_cache_lookups = Counter("mailrelay_dns_cache_lookups", "Direct delivery's DNS lookups "
                                         "answered from its cache (hit) or by a nameserver (miss).", ["result"],
                                         registry=r)
        self._queue = _QueueCollector()
        r.register(self._queue)
        self._webhooks = _WebhookCollector()
        r.register(self._webhooks)
        self._throttles = _ThrottleCollector(lambda: None)
        r.register(self._throttles)

    # -- call-site helpers: the listeners -----------------------------------------------------

    def proxy_refused(self, reason: str) -> None:
        """A PROXY protocol listener closed a connection, for one of PROXY_REFUSALS."""
        self.proxy_refusals.labels(_fold(reason, PROXY_REFUSALS)).inc()

    def connection(self, listener: str) -> None:
        """A connection was accepted on a listener of this kind ("relay" | "submission" | "submissions")."""
        self.connections.labels(_fold(listener, LISTENERS)).inc()

    def auth(self, result: str, mechanism: str = "") -> None:
        """An AUTH exchange ended: result "success" | "failure" | "temporary" (checker unavailable)."""
        self.auth_results.labels(_fold(mechanism.upper(), AUTH_MECHANISMS),
                                 _fold(result, AUTH_RESULTS, "failure")).inc()

    def accepted(self, listener: str, size: int) -> None:
        """A message was committed to the spool and answered 250; `size` in bytes."""
        self.messages_accepted.labels(_fold(listener, LISTENERS)).inc()
        self.message_size.observe(max(0, size))

    def refused(self, reason: str) -> None:
        """A refusal reply (4xx/5xx) was sent for one of REFUSAL_REASONS (others count as "other")."""
        self.messages_refused.labels(_fold(reason, REFUSAL_REASONS)).inc()

    # -- call-site helpers: delivery --------------------------------------------------------------

    def delivery_started(self, transport: str) -> None:
        """A next hop was asked to deliver: `transport` is "direct" or the transport's name."""
        self.delivery_attempts.labels(transport).inc()

    def delivery_result(self, transport: str, result: str, tls: object = UNKNOWN,
                        latency: Optional[float] = None, verified: bool = False) -> None:
        """One recipient's outcome on one attempt: `result` "delivered" | "deferred" | "bounced";
        `tls` as for tls_label(); `verified`: the next hop's certificate and name were checked (only
        counted as "true" for a TLS label); `latency` (seconds since receipt) for deliveries only."""
        result = _fold(result, DELIVERY_RESULTS, "deferred")
        label = tls_label(tls)
        checked = "true" if verified and label not in ("none", "unknown") else "false"
        self.delivery_results.labels(transport, label, checked, result).inc()
        if result == "delivered" and latency is not None:
            self.delivery_latency.observe(max(0.0, latency))

    def tls_policy_result(self, policy: str, result: str) -> None:
        """One TLS outcome of direct delivery: `policy` one of TLS_POLICY_TYPES, `result` one of
        TLS_POLICY_RESULTS (an RFC 8460 result type, or "success")."""
        self.tls_policy_results.labels(_fold(policy, TLS_POLICY_TYPES, "no-policy-found"),
                                       _fold(result, TLS_POLICY_RESULTS, "validation-failure")).inc()

    def dns_cache(self, hit: bool) -> None:
        """One DNS lookup of direct delivery (MX, A, AAAA, TLSA, TXT): from the cache or not (any thread)."""
        self.dns_cache_lookups.labels("hit" if hit else "miss").inc()

    def dsn(self, kind: str) -> None:
        """A DSN was queued to the sender: one of DSN_KINDS (its Action)."""
        self.dsn_sent.labels(_fold(kind, DSN_KINDS, "failed")).inc()

    def oauth2_fetch(self, transport: str, result: str) -> None:
        """A smarthost transport's token request ended: `result` one of OAUTH2_RESULTS."""
        self.oauth2_fetches.labels(transport, _fold(result, OAUTH2_RESULTS, "bad_response")).inc()

    def webhook_post(self, url: str, result: str) -> None:
        """One POST of a delivery event to `url` (as shown: no query) ended with one of WEBHOOK_RESULTS."""
        self.webhook_posts.labels(url, _fold(result, WEBHOOK_RESULTS, "error")).inc()

    def webhook_dropped(self, url: str, reason: str) -> None:
        """A delivery event for `url` was given up, for one of WEBHOOK_DROPS."""
        self.webhook_drops.labels(url, _fold(reason, WEBHOOK_DROPS, "error")).inc()

    def watch_webhooks(self, backlog: WebhookBacklog) -> None:
        """Read every webhook URL's backlog from `backlog` at every scrape; a later call replaces it."""
        self._webhooks.backlog = backlog

    # -- the queue gauges -------------------------------------------------------------------------

    def watch_queue(self, snapshot: QueueSnapshot) -> None:
        """Read (messages, oldest age in seconds, held messages) from `snapshot` at every scrape;
        a later call replaces the earlier one."""
        self._queue.snapshot = snapshot

    def cluster_fallback(self, what: str) -> None:
        """One decision taken locally (`what`: one of CLUSTER_FALLBACKS) because Redis did not answer."""
        self.cluster_fallbacks.labels(_fold(what, CLUSTER_FALLBACKS)).inc()

    def watch_cluster(self, up: Callable[[], int]) -> None:
        """Read whether the `[cluster] redis` link is up (1) or not (0) from `up` at every scrape."""
        self.registry.register(_SizeCollector("mailrelay_cluster_redis_up",
                                              "1 while the shared Redis counters answer, else 0.", up))
    def watch_throttles(self, snapshot: Callable[[], Optional[tuple]]) -> None:
        """Read ([throttle.DestinationStatus], {destination: deliveries waiting}, the scheduler's time)
        from `snapshot` at every scrape, or None for no throttle gauges at all; a later call replaces
        the earlier one."""
        self._throttles.snapshot = snapshot

    def watch_suppression(self, size: Callable[[], int]) -> None:
        """Read the number of suppressed addresses from `size` at every scrape."""
        self.registry.register(_SizeCollector("mailrelay_suppressed_addresses",
                                              "Addresses on the suppression list, in force.", size))


class _Families:
    """A view of a registry for generate_latest: only the families `keep(name)` accepts."""

    def __init__(self, registry: CollectorRegistry, keep: Callable[[str], bool]):
        self._registry, self._keep = registry, keep

    def collect(self) -> Iterator:
        return (family for family in self._registry.collect() if self._keep(family.name))


def delivery_text(metrics: Metrics) -> bytes:
    """The DELIVERY_FAMILIES of `metrics` in the text format: what the delivery process hands up."""
    return generate_latest(_Families(metrics.registry, DELIVERY_FAMILIES.__contains__))


class _Up:
    def __init__(self, up: bool):
        self.up = up

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("mailrelay_delivery_process_up",
                                "1 when this scrape includes the delivery process's metrics.",
                                value=1 if self.up else 0)


class JoinedMetricsResource(resource.Resource):
    """/metrics of the main process when a delivery process runs: this process's families but the
    DELIVERY_FAMILIES, then the delivery process's text, then `mailrelay_delivery_process_up`."""
    isLeaf = True

    def __init__(self, metrics: Metrics, delivery: DeliveryText):
        super().__init__()
        self._metrics, self._delivery = metrics, delivery

    def render_GET(self, request) -> object:
        finished: list[object] = []
        request.notifyFinish().addBoth(finished.append)     # the scraper may hang up meanwhile
        d = defer.maybeDeferred(self._delivery)
        d.addErrback(self._failed)
        d.addCallback(self._respond, request, finished)
        return server.NOT_DONE_YET

    @staticmethod
    def _failed(failure) -> None:
        log.failure("asking the delivery process for its metrics failed", failure)
        return None

    def _respond(self, theirs: Optional[bytes], request, finished: list) -> None:
        if finished:
            return
        own = generate_latest(_Families(self._metrics.registry, lambda name: name not in DELIVERY_FAMILIES))
        body = own + (theirs or b"") + generate_latest(_Up(theirs is not None))
        request.setHeader(b"Content-Type", CONTENT_TYPE_PLAIN_0_0_4.encode("ascii"))
        request.write(body)
        request.finish()


class _Root(resource.Resource):
    """Only /metrics exists; everything else is 404 (and no directory listing, no traceback)."""

    def getChild(self, path: bytes, request) -> resource.Resource:
        return resource.NoResource()

    def render(self, request) -> bytes:
        return resource.NoResource().render(request)


class _QuietSite(server.Site):
    """No access-log line per scrape: Prometheus asks every few seconds."""
    noisy = False

    def log(self, request) -> None:
        pass


def metrics_site(metrics: Metrics, delivery: Optional[DeliveryText] = None) -> server.Site:
    """The HTTP site serving `metrics` at /metrics, joined with the delivery process's families when
    `delivery` fetches them (JoinedMetricsResource)."""
    root = _Root()
    if delivery is not None:
        root.putChild(b"metrics", JoinedMetricsResource(metrics, delivery))
    else:
        # Imported here: prometheus_client.twisted imports the global reactor at import time.
        from prometheus_client.twisted import MetricsResource

        root.putChild(b"metrics", MetricsResource(registry=metrics.registry))
    return _QuietSite(root)


class MetricsService(service.Service):
    """Listens on a Twisted server endpoint while running; `port` is the IListeningPort once bound.
    A listen that fails at once (address in use, bad interface) raises from startService, so twistd
    does not start half-configured; a later failure is logged."""

    def __init__(self, endpoint, site: server.Site):
        self._endpoint, self._site = endpoint, site
        self.port = None
        self._listening: Optional[defer.Deferred] = None
        self._starting, self._early_failure = False, None

    def startService(self) -> None:
        super().startService()
        self._early_failure = None
        self._starting = True
        self._listening = self._endpoint.listen(self._site)
        self._listening.addCallbacks(self._bound, self._not_bound)
        self._starting = False
        if self._early_failure is not None:
            service.Service.stopService(self)
            self._early_failure.raiseException()

    def _bound(self, port) -> None:
        self.port = port
        address = port.getHost()
        log.info("metrics at http://{host}:{port}/metrics", host=getattr(address, "host", "?"),
                 port=getattr(address, "port", "?"))

    def _not_bound(self, failure) -> None:
        if self._starting:
            self._early_failure = failure
        elif not failure.check(defer.CancelledError):
            log.failure("metrics endpoint could not listen", failure)

    def stopService(self) -> Optional[defer.Deferred]:
        super().stopService()
        if self._listening is not None and not self._listening.called:
            self._listening.cancel()
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else None


def metrics_service(endpoint: str, metrics: Metrics, reactor=None,
                    delivery: Optional[DeliveryText] = None) -> service.IService:
    """A service listening on the Twisted server endpoint string `endpoint` (e.g.
    "tcp:9425:interface=127.0.0.1") and serving `metrics` at /metrics while running (with the delivery
    process's families when `delivery` fetches them)."""
    if reactor is None:
        from twisted.internet import reactor
    if endpoint.startswith(("tcp:", "tcp6:")) and "interface=" not in endpoint:
        log.warn("metrics endpoint {endpoint} listens on every interface; "
                 "add interface=127.0.0.1 to keep it local", endpoint=endpoint)
    listening = MetricsService(endpoints.serverFromString(reactor, endpoint), metrics_site(metrics, delivery))
    listening.setName("metrics")
    return listening
