# -*- test-case-name: tests.test_tlsrpt, tests.test_tlsrpt_end_to_end -*-
"""Sending TLS reports (RFC 8460 section 5): the daily run in the process that delivers, and the same
work for `mailrelay tlsrpt send`.

Journey: the TLS report store (outbound.tlsrpt_store) has counted each direct-to-MX session's TLS
outcome.  A run takes what was gathered (past UTC days; with `include_today`, today's so far too), and
for each policy domain looks up its reporting policy at `_smtp._tls.DOMAIN` (TXT, through the configured
nameservers); a domain that publishes none gets nothing (RFC 8460 3).  Otherwise one report per domain
and day (outbound.tlsrpt_report) goes to each `rua`:

- mailto: a multipart/report message, written into our own spool from the null reverse-path <> (as DSNs
  are: a report that bounces makes no bounce of its own), From: postmaster@hostname, then delivered by
  the scheduler like any message (routes, DKIM signing for the hostname's domain);
- https: a POST of the gzipped report (Content-Type application/tlsrpt+gzip, RFC 8460 5.4) over
  verified TLS; one that fails is kept in <spool>/tlsrpt/outbox/ and retried every RETRY_FIRST seconds,
  doubling, for up to OUTBOX_LIFETIME (the next day's report supersedes it).

A domain is marked done once its reports are spooled, posted or kept for retry, so a run stopped
half-way (a crash) resumes with the next domain: a report is sent at most twice, only that one in flight.
A DNS failure leaves the domain for the next run; a batch older than BATCH_LIFETIME is dropped.
Schedule: the first run RUN_AFTER_START after start (days missed while stopped), then every day at a
random time in the first JITTER seconds after 00:00 UTC (RFC 8460 4.1: spread the load), for the day just
ended.  One run at a time across processes (the store's report lock).
"""
from __future__ import annotations

import json
import os
import random
import secrets
from pathlib import Path
from typing import Any, Callable, Optional

from twisted.application import service
from twisted.internet import defer, task

from mailrelay.outbound import tlsrpt_report as rpt
from mailrelay.outbound import tlsrpt_store as store
from mailrelay.envelope import Envelope
from mailrelay.logger import Logger
from mailrelay.spool.files import atomic_write, make_directory, unlink_quietly

log = Logger(namespace="mailrelay.tlsrpt")

RUN_AFTER_START = (60.0, 600.0)      # seconds after start of the first run (random in this range)
JITTER = 3600.0                      # the daily run: at 00:00 UTC + random(60 s, JITTER)
RETRY_FIRST = 300.0                  # an https report that failed: again after 5 min, doubling ...
RETRY_MAX = 6 * 3600.0               # ... at most this interval
OUTBOX_LIFETIME = 24 * 3600.0        # ... given up after a day
OUTBOX_POLL = 60.0
BATCH_LIFETIME = 3 * 86400           # a batch a DNS failure kept this long is dropped
POST_TIMEOUT = 60.0
MAX_RESPONSE = 64 * 1024


class TemporaryLookup(Exception):
    """The reporting policy could not be looked up (SERVFAIL, timeout): try the domain next run."""


class ReportRunBusy(Exception):
    """Another report run (the daily one, or `mailrelay tlsrpt send`) holds the report lock."""


def txt_lookup(nameservers, reactor: Any, timeout: float = 10.0) -> Callable[[str], defer.Deferred]:
    """lookup(domain) → Deferred[list of rua URIs, or None]: _smtp._tls.DOMAIN TXT through `nameservers`
    (the system resolver when empty), on a thread; fails with TemporaryLookup."""
    import dns.exception
    import dns.resolver
    from twisted.internet.threads import deferToThreadPool

    from mailrelay.outbound.dns import make_resolver

    resolver = make_resolver(nameservers, timeout)

    def blocking(domain: str) -> Optional[list[str]]:
        try:
            answer = resolver.resolve(f"_smtp._tls.{domain}.", "TXT", search=False, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.DNSException as e:
            raise TemporaryLookup(f"_smtp._tls.{domain}: {type(e).__name__}") from None
        if answer.rrset is None:
            return None
        # RFC 7208-style: a TXT record's strings are one text, concatenated (RFC 8460 3).
        texts = [b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset]
        return rpt.parse_record(texts)

    return lambda domain: deferToThreadPool(reactor, reactor.getThreadPool(), blocking, domain)


def https_post(reactor: Any, trust_root: Any = None, timeout: float = POST_TIMEOUT) -> Callable:
    """post(url, body) → Deferred[HTTP status]: treq over verified TLS (`trust_root`, else the
    platform's trust store), no redirects followed, nothing kept open."""
    import treq
    from treq.client import HTTPClient
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust_root),
                  connectTimeout=timeout, pool=HTTPConnectionPool(reactor, persistent=False))
    client = HTTPClient(agent)

    def post(url: str, body: bytes) -> defer.Deferred:
        if not url.lower().startswith("https://"):
            return defer.fail(ValueError("only https: report URIs are posted"))
        headers: dict[bytes | str, list[bytes | str]] = {"Content-Type": [rpt.MEDIA_TYPE]}
        d = client.post(url, data=body, headers=headers)
        d.addTimeout(timeout, reactor)

        def drained(response):
            size = []

            def collect(data: bytes) -> None:
                size.append(len(data))
                if sum(size) > MAX_RESPONSE:
                    raise ValueError("response too large")
            return treq.collect(response, collect).addCallback(lambda _: response.code)
        return d.addCallback(drained)

    return post


class Outbox:
    """https reports waiting for a retry: <directory>/outbox/ID.post, a JSON line (url, report id,
    created, attempts, next try) then the gzipped report; replaced atomically after each try."""

    def __init__(self, directory: Path, post: Callable, clock: Any):
        self.directory, self.post, self.clock = Path(directory) / "outbox", post, clock

    @defer.inlineCallbacks
    def send(self, url: str, body: bytes, report_id: str):
        """POST now; on failure keep it for retry.  Fires with (posted?, text for the log)."""
        try:
            code = yield self.post(url, body)
        except Exception as e:
            why = " ".join(str(e).split())[:200] or type(e).__name__
        else:
            if 200 <= code < 300:
                return True, f"HTTP {code}"
            why = f"HTTP {code}"
        now = self.clock.seconds()
        self._save(f"{int(now)}-{secrets.token_hex(6)}", {"url": url, "report_id": report_id, "created": now,
                                                          "attempts": 1, "next": now + RETRY_FIRST}, body)
        return False, f"failed ({why}); kept for retry"

    def _save(self, name: str, meta: dict, body: bytes) -> None:
        make_directory(self.directory.parent)
        make_directory(self.directory)
        tmp = self.directory.parent / "tmp"
        make_directory(tmp)
        atomic_write(tmp, self.directory / f"{name}.post", json.dumps(meta).encode() + b"\n" + body)

    @defer.inlineCallbacks
    def retry_due(self):
        """Try every kept report whose time has come (the relay's daily-run service calls this)."""
        names = sorted(os.listdir(self.directory)) if self.directory.is_dir() else []
        for name in names:
            if not name.endswith(".post"):
                continue
            path = self.directory / name
            try:
                meta_line, _, body = path.read_bytes().partition(b"\n")
                meta = json.loads(meta_line)
            except (OSError, ValueError):
                log.warn("TLS report outbox: unreadable {name} removed", name=name)
                unlink_quietly(path)
                continue
            now = self.clock.seconds()
            if meta.get("next", 0) > now:
                continue
            try:
                code = yield self.post(meta["url"], body)
                why = f"HTTP {code}"
                posted = 200 <= code < 300
            except Exception as e:
                why, posted = " ".join(str(e).split())[:200] or type(e).__name__, False
            if posted:
                log.info("TLS report {report_id} posted to {url} on retry", report_id=meta.get("report_id"),
                         url=meta["url"])
                unlink_quietly(path)
            elif now - meta.get("created", now) >= OUTBOX_LIFETIME:
                log.warn("TLS report {report_id} to {url} given up: {why}", report_id=meta.get("report_id"),
                         url=meta["url"], why=why)
                unlink_quietly(path)
            else:
                meta["attempts"] = meta.get("attempts", 1) + 1
                meta["next"] = now + min(RETRY_MAX, RETRY_FIRST * 2 ** (meta["attempts"] - 1))
                self._save(name[:-len(".post")], meta, body)


class TLSReportSender:
    """One report run over the store in `directory`.  `lookup(domain)` and `post(url, body)` as
    txt_lookup and https_post make them; `spool` takes the mail reports (an ISpool), `spooled(queue_id)`
    hears of each (the scheduler's enqueue, or a flush request to a running relay)."""

    def __init__(self, hostname: str, directory: Path, spool: Any, lookup: Callable, post: Callable,
                 clock: Any, spooled: Callable[[str], Any] = lambda queue_id: None):
        self.hostname, self.directory, self.spool = hostname, Path(directory), spool
        self.lookup, self.clock, self.spooled = lookup, clock, spooled
        self.outbox = Outbox(self.directory, post, clock)

    @defer.inlineCallbacks
    def run(self, include_today: bool):
        """Take and report; fires with one (ok, line) per report destination.  ReportRunBusy when
        another run holds the report lock."""
        lines: list[tuple[bool, str]] = []
        with store.report_lock(self.directory) as got:
            if not got:
                raise ReportRunBusy("another TLS report run is in progress")
            now = self.clock.seconds()
            for batch in store.take(self.directory, now, include_today):
                complete = True
                done = store.done_domains(batch)
                for domain, tallies in sorted(store.read_batch(batch).items()):
                    if domain in done:
                        continue
                    try:
                        sent = yield self._report(batch, domain, tallies)
                    except TemporaryLookup as e:
                        log.warn("TLS report for {domain} postponed: {why}", domain=domain, why=str(e))
                        complete = False
                        continue
                    lines.extend(sent)
                    store.mark_done(batch, domain)
                if complete or now - batch.end > BATCH_LIFETIME:
                    store.finish(batch)
        return lines

    @defer.inlineCallbacks
    def _report(self, batch: store.Batch, domain: str, tallies: dict):
        uris = yield self.lookup(domain)
        if not uris:
            return []                  # RFC 8460 3: no TLSRPT policy, no report
        report_id = rpt.new_report_id(batch.begin, domain, self.hostname)
        report = rpt.build_report(self.hostname, domain, batch.begin, batch.end, tallies, report_id)
        gz = rpt.report_bytes(report)
        filename = rpt.report_filename(self.hostname, domain, batch.begin, batch.end, secrets.token_hex(6))
        what = f"TLS report {report_id} for {domain} ({report['date-range']['start-datetime']} to " \
               f"{report['date-range']['end-datetime']})"
        lines = []
        mailboxes = [a for a in (rpt.mailto_address(u) for u in uris if u.lower().startswith("mailto:")) if a]
        if mailboxes:
            try:
                queue_id = yield self._spool(domain, mailboxes, report, gz, filename)
            except Exception as e:
                lines.append((False, f"{what}: cannot queue mail to {', '.join(mailboxes)}: {e}"))
            else:
                lines.append((True, f"{what}: mail to {', '.join(mailboxes)} queued as {queue_id}"))
        for url in (u for u in uris if u.lower().startswith("https:")):
            posted, text = yield self.outbox.send(url, gz, report_id)
            lines.append((posted, f"{what}: POST to {url}: {text}"))
        for ok, line in lines:
            (log.info if ok else log.warn)("{line}", line=line)
        return lines

    @defer.inlineCallbacks
    def _spool(self, domain: str, mailboxes: list[str], report: dict, gz: bytes, filename: str):
        now = self.clock.seconds()
        data = rpt.build_message(self.hostname, domain, mailboxes, report, gz, filename, now)
        envelope = Envelope(sender="", recipients=tuple(mailboxes), received_at=now, body="7BIT",
                            octets="7bit", long_lines=False,
                            dkim_senders=(self.hostname,))     # our own mail: From: postmaster@hostname
        writer = self.spool.new_message(envelope)
        try:
            writer.write(data)
            queue_id = yield writer.commit()
        except Exception:
            writer.abort()
            raise
        self.spooled(queue_id)
        return queue_id


class TLSReportService(service.Service):
    """The daily run (see the module docstring) and the outbox retries, in the process that delivers;
    at stop the store is flushed and fsync'd."""

    def __init__(self, sink: store.TLSReportStore, sender: TLSReportSender, clock: Any,
                 rng: Optional[random.Random] = None):
        self.sink, self.sender, self.clock = sink, sender, clock
        self.rng = rng or random.Random()
        self._call = None
        self._outbox = task.LoopingCall(self._retry)
        self._outbox.clock = clock
        self.running_run: Optional[defer.Deferred] = None

    def startService(self) -> None:
        super().startService()
        self._schedule(self.rng.uniform(*RUN_AFTER_START))
        self._outbox.start(OUTBOX_POLL, now=False)

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        if self._outbox.running:
            self._outbox.stop()
        self.sink.close()

    def _schedule(self, delay: float) -> None:
        self._call = self.clock.callLater(delay, self._daily)

    def next_delay(self) -> float:
        """Seconds to the next daily run: shortly after the coming 00:00 UTC."""
        now = self.clock.seconds()
        midnight = (int(now) // store.DAY + 1) * store.DAY
        return midnight + self.rng.uniform(60.0, JITTER) - now

    def _daily(self) -> defer.Deferred:
        self._schedule(self.next_delay())
        return self.run(include_today=False)

    def run(self, include_today: bool) -> defer.Deferred:
        """One report run now (the store flushed first); never fails (logged)."""
        self.sink.flush()
        d = self.sender.run(include_today)

        def failed(failure):
            if failure.check(ReportRunBusy):
                log.info("TLS reports: another run is in progress; this one is skipped")
            else:
                log.failure("TLS report run failed", failure)
            return []
        self.running_run = d.addErrback(failed)
        return self.running_run

    def _retry(self) -> defer.Deferred:
        return self.sender.outbox.retry_due().addErrback(lambda f: log.failure("TLS report outbox", f))
