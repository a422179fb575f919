# -*- test-case-name: tests.test_capabilities, tests.test_dkim, tests.test_connection_reuse -*-
"""DKIM on the way out: an INextHop that signs and/or verifies, then hands the message to the real hop.

In: a spooled message and its recipients (or a batch of them, for a hop that reuses connections).
Out: the inner hop's results for the same message with the DKIM-Signature and Authentication-Results
headers prepended — the spooled bytes themselves are never changed, so a source signature survives
byte for byte (passthrough) and a retry simply signs again.
A message that must go to a next hop without 8BITMIME is converted to 7-bit MIME first, and one with
lines over 998 octets has them re-encoded for every hop, and signed after converting (`seven_bit`: DKIM
signs what is sent, RFC 6376 5.3); its Authentication-Results stay those of the message as received.
Only mail whose envelope says the client could use its From: domain is signed (permission.py).
The work (reading the spool file, hashing, RSA) runs in a thread pool, never on the reactor thread.
"""
from __future__ import annotations

import functools
import io

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from zope.interface import alsoProvides, implementer

from mailrelay.queue.results import settle_all
from mailrelay.queue.job import Job
from mailrelay.outbound.sevenbit import SEVEN_BIT, Needs, convert_message
from mailrelay.dkim.permission import may_sign
from mailrelay.interfaces import IBatchNextHop, INextHop, IPooledNextHop, ISelfConvertingMessage, ISpooledMessage
from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.dkim")


class _PrefixedReader(io.RawIOBase):
    def __init__(self, prefix: bytes, f):
        self._prefix, self._f = memoryview(prefix), f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


@implementer(ISpooledMessage)
class PrefixedMessage:
    """A spooled message seen with extra header lines in front, under its queue id, envelope and path."""

    def __init__(self, message, prefix: bytes):
        self._message, self.prefix = message, prefix
        self.queue_id, self.envelope, self.path = message.queue_id, message.envelope, message.path

    @property
    def size(self) -> int:
        return self._message.size + len(self.prefix)

    def open(self):
        return io.BufferedReader(_PrefixedReader(self.prefix, self._message.open()), 64 * 1024)


@implementer(ISelfConvertingMessage)
class SignedMessage(PrefixedMessage):
    """A message with its DKIM-Signature in front that, for a hop that cannot take it as it is, makes its
    own form: `convert(needs)` gives a Deferred of it, converted and then signed (outbound/sevenbit.py)."""

    def __init__(self, message, prefix: bytes, convert):
        super().__init__(message, prefix)
        self._convert = convert

    def seven_bit(self, needs=SEVEN_BIT):
        return self._convert(needs)


@implementer(INextHop)
class DKIMHop:
    def __init__(self, inner, signer=None, verifier=None, threadpool=None, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self._inner, self._signer, self._verifier = inner, signer, verifier
        self._reactor = reactor
        self._threadpool = threadpool or reactor.getThreadPool()
        if IBatchNextHop.providedBy(inner):
            alsoProvides(self, IBatchNextHop)     # batches only when the hop behind it can take them
        if IPooledNextHop.providedBy(inner):
            alsoProvides(self, IPooledNextHop)    # keeps idle connections when the hop behind it does

    def close_idle(self):
        """Close the idle connections the hop behind us keeps (IPooledNextHop, its connection cache)."""
        if IPooledNextHop.providedBy(self._inner):
            return self._inner.close_idle()
        return defer.succeed(None)

    def headers_for(self, message, received=None) -> bytes:
        """Runs in a worker thread: the header lines to put in front of `message` (verified as `received`,
        the message as it came, when that differs: a converted one)."""
        added = b""
        if self._verifier is not None:
            received = received or message
            with received.open() as f:
                added += self._verifier.results_header(f, received.size)
        if self._signer is not None:
            with message.open() as f:
                added = self._signer.sign(f, functools.partial(self._permitted, message)) + added
        return added

    def _prefixed(self, message, prefix: bytes):
        """What the inner hop gets: `message` with `prefix` in front, re-signed if it is converted."""
        if not prefix:
            return message
        return SignedMessage(message, prefix, lambda needs: deferToThreadPool(
            self._reactor, self._threadpool, self._seven_bit, message, prefix, needs))

    def _seven_bit(self, message, prefix: bytes, needs: Needs = SEVEN_BIT):
        """Runs in a worker thread: `message` converted for a hop that takes `needs`, then signed
        (sevenbit.Unconvertible when it cannot be converted)."""
        converted = convert_message(message, needs)
        if converted is message:
            return PrefixedMessage(message, prefix)      # nothing to convert: as signed before
        return PrefixedMessage(converted, self.headers_for(converted, received=message))

    def _permitted(self, message, addresses: list[str], header_block: bytes) -> bool:
        """Runs in a worker thread: may the sender of `message` use these From: addresses?"""
        if may_sign(message.envelope, addresses, header_block):
            return True
        shown = "".join(c if c.isprintable() else "?" for c in ", ".join(addresses)[:200])
        self._reactor.callFromThread(
            log.info, "dkim: {queue_id}: not signed: its client may not use the From: {addresses}",
            queue_id=message.queue_id, addresses=shown)
        return False

    def deliver(self, message, recipients):
        d = deferToThreadPool(self._reactor, self._threadpool, self.headers_for, message)

        def send(prefix: bytes):
            return self._inner.deliver(self._prefixed(message, prefix), recipients)

        def failed(failure):
            # Mail our domains must sign never leaves unsigned (DMARC would reject it): keep it queued.
            log.failure("dkim: {queue_id}: signing/verification failed; deferred", failure,
                        queue_id=message.queue_id)
            return list(settle_all(recipients, 451, "4.3.0", "DKIM signing failed, will retry"))

        d.addCallbacks(send, failed)
        return d

    def deliver_batch(self, jobs, on_settled=None):
        """IBatchNextHop: sign each message (in the thread pool), then hand the batch to the inner hop.
        A message that cannot be signed is kept back (451) on its own; the others still go.  `on_settled`
        is passed through with the inner hop's job positions mapped back to ours."""
        jobs = list(jobs)
        prepared = defer.DeferredList(
            [deferToThreadPool(self._reactor, self._threadpool, self.headers_for, job.message) for job in jobs],
            consumeErrors=True)

        def send(outcomes):
            results: list = [None] * len(jobs)
            ready: list[tuple[int, Job]] = []
            for index, (job, (ok, value)) in enumerate(zip(jobs, outcomes)):
                if ok:
                    ready.append((index, Job(self._prefixed(job.message, value), tuple(job.recipients))))
                else:
                    log.failure("dkim: {queue_id}: signing/verification failed; deferred", value,
                                queue_id=job.message.queue_id)
                    results[index] = list(settle_all(job.recipients, 451, "4.3.0", "DKIM signing failed, will retry"))
            if not ready:
                return results
            inner_jobs = [job for _, job in ready]
            inner_settled = None if on_settled is None else (
                lambda k, job_results: on_settled(ready[k][0], job_results))
            d = self._inner.deliver_batch(inner_jobs, on_settled=inner_settled)

            def merge(batch_results):
                for (index, _), job_results in zip(ready, batch_results):
                    results[index] = job_results
                return results
            return d.addCallback(merge)

        return prepared.addCallback(send)
