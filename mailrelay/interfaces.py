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


class IThrottle(Interface):
    """The state behind `[[throttle]]`: per destination (a recipient domain a rule matched), when the next
    message may start (a smooth rate), how many connections are open, and whether it is paused after a
    "slow down" reply.  `rule` is the config.Throttle that matched (the scheduler looks it up; a reload
    may change it without losing any state), `now` and `started` are times on the scheduler's clock.

    Every answer comes at once, from memory: an implementation shared between relays (a store such as
    Redis) keeps a local view, brings it up to date on its own, and falls back to it alone when the store
    is unreachable.  The local one is mailrelay.delivery.throttle.LocalThrottle."""

    def ready_at(destination, rule, now):
        """When a new connection to `destination` may start: a time <= `now` for at once, a later time
        when a pause or the message rate holds it back, or None when every connection it may have is in
        use (then only `finish` helps)."""

    def start(destination, rule, now):
        """A connection to `destination` starts now with one message (call only once `ready_at` said so):
        it takes a connection slot and the next place in the message rate."""

    def finish(destination):
        """A connection that `start` counted is over: its slot is free."""

    def slowed(destination, rule, started, now, reply):
        """A delivery to `destination` that started at `started` got a "slow down" reply (`reply`, text
        for the log).  Returns (the end of the pause in force, True if this reply began a new pause).
        A reply to a delivery that started before the pause in force began belongs to that pause and
        changes nothing; otherwise the pause is `rule.pause`, doubled for each pause in a row, at most 1 h."""

    def succeeded(destination, started):
        """A delivery to `destination` that started at `started` was accepted: the pauses in a row are
        over, and the next one is `rule.pause` again (a delivery older than the latest pause says nothing)."""

    def status(now):
        """A list of throttle.DestinationStatus, one per destination with anything to show (a pause in
        force or past, a connection open, a rate position in the future).  Safe to call from a thread
        other than the reactor's: it only reads."""
