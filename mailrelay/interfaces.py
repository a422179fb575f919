"""The seams between the stages of a message's journey.

    server (session, policy) --IIncomingQueue--> spool --IScheduler--> delivery (router, next hop) --> dsn

Each stage depends only on the interfaces here and on the plain values in `envelope`, so a test (or an
embedding application) can put any piece in place of another, as twisted.names does with IResolver.
"""
from __future__ import annotations

from dataclasses import dataclass
from zope.interface import Attribute, Interface


@dataclass(frozen=True)
class Reply:
    """An SMTP reply with its RFC 3463 enhanced status code, e.g. Reply(550, "5.7.1", "Relay access denied")."""
    code: int
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


class IRelayPolicy(Interface):
    """Decides who may relay what (the one place issue 'access control' replaces). All methods are
    synchronous and cheap; None means accepted, a Reply means refused with that reply."""

    def identify(client):
        """The identity a client relays as (user name, or the permit rule that matched, e.g. "permit[0]"),
        or None when no rule matches this client at all."""

    def check_sender(client, sender):
        """MAIL FROM: `client` is an envelope.ClientInfo, `sender` the address ("" for <>)."""

    def check_recipient(client, sender, recipient):
        """RCPT TO: may `client` relay mail from `sender` to `recipient`?"""

    def check_message(client, sender, headers):
        """After DATA: `headers` is the message's header block (bytes, CRLF line ends)."""

    def signing_senders(client):
        """The sender patterns ("*", domains, addresses) whose From: addresses the relay may DKIM-sign for
        `client`'s mail; () when it must never sign it (a stranger: an `anyone` rule or no rule)."""


class IMessageWriter(Interface):
    """One message being received. Lines arrive already un-dot-stuffed and with CRLF line ends."""

    queue_id = Attribute("The queue id given to this message, known before the first byte is written.")

    def write(data):
        """Append bytes of the message (headers and body). Memory use must not grow with message size."""

    def commit():
        """Make the message durable (fsync file, rename, fsync directory). Returns a Deferred firing with
        the queue id once it is; only then may the server answer 250."""

    def abort():
        """Throw the partial message away. Safe to call more than once, and after a failed commit."""


class IIncomingQueue(Interface):
    """What the server hands accepted messages to."""

    def new_message(envelope):
        """Start receiving a message with this envelope.Envelope; returns an IMessageWriter."""


class ISpool(IIncomingQueue):
    """The durable queue directory: one file per message (envelope + body), plus per-recipient state."""

    def queue_ids():
        """The ids of every complete message in the spool, oldest first."""

    def load(queue_id):
        """A spool.SpooledMessage: envelope, body access and per-recipient state."""

    def save_state(queue_id, state):
        """Atomically replace the per-recipient delivery state of a message (a JSON-able dict)."""

    def remove(queue_id):
        """Delete a message once every recipient has a final answer."""


class IScheduler(Interface):
    """Runs the queue: decides when each message is tried, and by which route."""

    def enqueue(queue_id):
        """A message was committed to the spool: try it as soon as limits allow."""

    def flush(queue_id=None):
        """Make every message (or the one named) due now, whatever its next attempt says; in either
        `[delivery] process` mode (the delivery process gets the order down its pipe)."""


class INextHop(Interface):
    """One way out: a smarthost transport, or direct MX delivery."""

    def deliver(message, recipients):
        """Send a spooled message to `recipients` (all of one route) in one transaction.

        Returns a Deferred firing with a list of delivery.RecipientResult, one per recipient, each with
        the reply that settles it (2xx delivered, 4xx retry, 5xx bounce). Connection-level failures give
        every recipient a 4xx result; the Deferred itself does not fail."""


class IBatchNextHop(INextHop):
    """A next hop that can carry several messages on one connection (connection reuse). Optional: the
    scheduler batches only hops that provide it and calls deliver() once per message otherwise."""

    def deliver_batch(jobs, on_settled=None):
        """Send `jobs` (a list of delivery.job.Job: a spooled message and its recipients, all bound
        for this one next hop) over one connection, one transaction per job, in order.

        `on_settled(index, results)`, when given, is called as soon as job `index` has its final
        per-recipient results (after the reply to its final dot, a refused MAIL FROM, or when every RCPT
        failed), at most once per job; it may return a Deferred, and the next job (its MAIL FROM) is not
        started before that fires — so the caller's record of job k is durable before job k+1 is offered
        (docs/crash-safety.md section 2).  A hop may leave some jobs unreported (connection lost, or a
        recipient still waiting for another exchanger).

        Returns a Deferred firing with one list of delivery.RecipientResult per job, in the order of
        `jobs`, with the same meaning as deliver()'s — every job, the reported ones included. A connection
        lost part-way settles the jobs not yet answered with a 4xx result; the Deferred itself does not
        fail.  Older hops without `on_settled` still work: the scheduler then records at the end."""


class IRouter(Interface):
    def route(sender, recipient, attempts):
        """The config.Route that applies (first match), or None for direct MX delivery."""


class IDeliveryReporter(Interface):
    """Tells the envelope sender what became of a message (the DSN module, RFC 3464). The scheduler never
    calls it for the null reverse-path <>. Either method may return a Deferred; a failure means "not
    reported": the scheduler keeps the message and asks again later."""

    def bounce(message, results):
        """One failure DSN for a spooled message. `results`: a delivery.RecipientResult per recipient that
        failed for good — permanent (5xx) ones carry the remote refusal; expired ones (queue lifetime
        reached) carry status 4.4.7 and the last reply in their text."""

    def delay(message, recipients):
        """The one delay DSN for a spooled message. `recipients`: a delivery.RecipientResult per recipient
        still pending, each with its last (temporary) reply."""


class ITLSReportSink(Interface):
    def record(policy_domain, policy_type, policy_strings, mx_host, result_type, success, detail):
        """One TLS outcome of a direct-to-MX connection attempt. policy_type "sts" | "tlsa" | "no-policy-found";
        policy_strings: the policy text lines (STS policy lines or TLSA records) or (); result_type per RFC 8460 4.3
        (e.g. "starttls-not-supported", "certificate-host-mismatch", "certificate-expired", "certificate-not-trusted",
        "validation-failure", "tlsa-invalid", "dnssec-invalid", "sts-policy-fetch-error", "sts-policy-invalid",
        "sts-webpki-invalid") or None when success is True; detail: dict with optional sending-mta-ip,
        receiving-ip, receiving-mx-helo, additional-information."""

