# -*- test-case-name: tests.test_routes, tests.test_mtasts, tests.test_policy -*-
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
    """Decides who may relay what. All methods are synchronous and cheap but check_sender (see
    there); None means accepted, a Reply means refused with that reply."""

    def identify(client):
        """The identity a client relays as (user name, or the permit rule that matched, e.g. "permit[0]"),
        or None when no rule matches this client at all."""

    def check_sender(client, sender):
        """MAIL FROM: `client` is an envelope.ClientInfo, `sender` the address ("" for <>).  The one
        method that may instead return a Deferred firing with None or a Reply (never failing): when
        the rate limit it charges is shared through Redis (IRateCounter), within a bounded wait."""

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
    size = Attribute("The number of message octets written so far (int): once committed, the size as spooled, "
                     "our Received header included — what the 250 reply, the log line and metrics report.")

    def write(data):
        """Append bytes of the message (headers and body). Memory use must not grow with message size."""

    def commit():
        """Make the message durable: the rest written to its file (created under its final name in queue/),
        its size put in place of the in-progress mark, the file fsync'd, then the directory fsync'd (one
        for a batch of commits; none where the file's fsync already made its name durable). No rename.
        Returns a Deferred firing with the queue id once it is; only then may the server answer 250."""

    def abort():
        """Throw the partial message away. Safe to call more than once, and after a failed commit."""


class IIncomingQueue(Interface):
    """What the server hands accepted messages to."""

    logs_queued = Attribute(
        'True when something behind this queue writes each committed message\'s "queued" log line (the '
        'delivery process does, as Postfix\'s qmgr does); the server (SMTP session, HTTP API) then leaves '
        'it out.  False: the server writes it.')

    def new_message(envelope):
        """Start receiving a message with this envelope.Envelope; returns an IMessageWriter."""


class ISpool(IIncomingQueue):
    """The durable queue directory: one file per message (envelope + body), plus per-recipient state."""

    def queue_ids():
        """The ids of every complete message in the spool, oldest first."""

    def load(queue_id):
        """A spool.SpooledMessage: envelope, body access and per-recipient state."""

    def state_of(queue_id):
        """The per-recipient delivery state alone ({} before the first save), without opening the message
        (what the scheduler's start-up scan reads)."""

    def is_held(queue_id):
        """Whether the message is held (a persisted flag), without opening it."""

    def save_state(queue_id, state):
        """Atomically replace the per-recipient delivery state of a message (a JSON-able dict)."""

    def remove(queue_id):
        """Delete a message once every recipient has a final answer."""


class ISpoolControl(ISpool):
    """The queue CLI's hand on a spool (Postfix's postsuper -h/-H and postqueue -f): hold flags, the
    control requests a running relay polls, and the spool-wide suspension a drain (`mailrelay queue
    transfer --hold`) leaves behind. The scheduler relies on every method here."""

    def hold(queue_id):
        """Keep a message but stop delivering it (a persisted flag). Returns a Deferred."""

    def release(queue_id):
        """Deliver a held message again. Returns a Deferred."""

    def take_requests():
        """Relay side: pending (verb, queue id or None) control requests, oldest first, each taken once."""

    def suspension():
        """The spool-wide suspension record (a dict: since, in_flight, idle), or None when deliveries run.
        Persisted: a relay started on a suspended spool delivers nothing until it is resumed."""

    def set_suspension(record):
        """Write (a dict) or clear (None) the suspension record, atomically and durably."""

    def take_fresh(queue_id):
        """The just-committed message kept in memory for its first load (a SpooledMessage), taken out,
        or None: the scheduler then loads it from the files."""

    def forget_fresh(queue_id):
        """Drop any copy of the message kept in memory since its commit: the files are the truth again
        (another process may change them while deliveries are suspended)."""


class IScheduler(Interface):
    """Runs the queue: decides when each message is tried, and by which route."""

    logs_queued = Attribute(
        'True when the scheduler writes each enqueued message\'s "queued" log line itself (the delivery '
        'process stand-in, queue.process.DeliveryProcess); service.QueueFront passes it on.')

    def enqueue(queue_id):
        """A message was committed to the spool: try it as soon as limits allow."""

    def flush(queue_id=None):
        """Make every message (or the one named) due now, whatever its next attempt says; in either
        `[delivery] process` mode (the delivery process gets the order down its pipe)."""


class ISpooledMessage(Interface):
    """A message as the delivery side reads it: the spool's own (spool.message.SpooledMessage), or a form of
    one made on the way out (outbound.signing.PrefixedMessage, with header lines in front; outbound.sevenbit.
    ConvertedMessage, re-encoded).  What INextHop.deliver is given."""

    queue_id = Attribute("The spool's id for the message (str); every log line about the message names it.")
    envelope = Attribute("Its envelope.Envelope: sender, recipients, BODY=, octets, long_lines, SMTPUTF8, DSN.")
    size = Attribute("The number of octets open() gives.")
    path = Attribute("The queue file the octets are read from (a pathlib.Path), or None when they are not read "
                     "from a spool file.  A converted form is written beside it, in the spool's tmp/.")

    def open():
        """A new binary file object at the first octet of the message, ending at its last; the caller
        streams it (nothing reads the whole message into memory) and closes it."""


class ISelfConvertingMessage(ISpooledMessage):
    """Optional: a message that makes its own form for a next hop that cannot take it as it is — DKIM's
    signed message, which is converted and then signed again, as a signature covers what is sent
    (RFC 6376 5.3).  outbound.sevenbit.downgrade asks such a message instead of converting it."""

    def seven_bit(needs):
        """A Deferred firing with the message's form for a hop that takes `needs` (outbound.sevenbit.Needs),
        or failing with sevenbit.Unconvertible when it has none."""


class INextHop(Interface):
    """One way out: a smarthost transport, or direct MX delivery."""

    def deliver(message, recipients):
        """Send a spooled message (an ISpooledMessage) to `recipients` (all of one route) in one transaction.

        Returns a Deferred firing with a list of IRecipientResult (delivery.RecipientResult), one per
        recipient, each with the reply that settles it (2xx delivered, 4xx retry, 5xx bounce).
        Connection-level failures give every recipient a 4xx result; the Deferred itself does not fail."""


class IRecipientResult(Interface):
    """What a next hop answers for one recipient on one attempt (queue.results.RecipientResult): the
    scheduler reads every attribute here, none of them optional."""

    recipient = Attribute("The recipient address the result settles.")
    code = Attribute("The SMTP reply code (int): 2xx delivered, 4xx retried, 5xx failed for good.")
    status = Attribute("The RFC 3463 enhanced status code, its class agreeing with `code`.")
    text = Attribute("The reply text, printable ASCII.")
    remote_host = Attribute('The host that answered, or "" when none did.')
    tls = Attribute('What protected the session that gave it (outbound.tlsinfo: "none", "tls1.3", ...), '
                    "or None when no SMTP session said (a DNS failure, no connection).")
    tls_verified = Attribute("True when that TLS authenticated the server.")
    tls_verified_by = Attribute("ITLSVerification.tls_verified_by of that session, or None.")
    sender_refused = Attribute("Settled by the next hop's refusal of MAIL FROM: a verdict on the sender, "
                               "never on this recipient (it does not suppress the recipient).")
    remote_reply = Attribute("The code and status are the next hop's own reply, not the relay's verdict on a "
                             "failed connection, timeout or handshake.")
    dsn_passed = Attribute("Delivered to a hop that offers DSN (RFC 3461): it reports on its own.")
    final = Attribute("Delivered into the mailbox itself (no further hop): NOTIFY=SUCCESS gets a "
                      '"delivered" DSN rather than a "relayed" one (RFC 3464 2.3.3).')
    next_host = Attribute("A permanent answer from this server only: direct delivery tries the domain's other "
                          "exchangers before it stands (REQUIRETLS, RFC 8689 4.2.1).")
    delivered = Attribute("True for a 2xx `code`.")
    temporary = Attribute("True for a 4xx `code`.")
    permanent = Attribute("True for a 5xx `code`.")


class IBatchNextHop(INextHop):
    """A next hop that can carry several messages on one connection (connection reuse). Optional: the
    scheduler batches only hops that provide it and calls deliver() once per message otherwise."""

    def deliver_batch(jobs, on_settled=None):
        """Send `jobs` (a list of queue.job.Job: a spooled message and its recipients, all bound
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


class IPooledNextHop(INextHop):
    """A next hop that keeps idle connections for reuse (outbound.pool). Optional: the relay closes them
    on stop, and when a reload replaces the hop, only for hops that provide it."""

    def close_idle():
        """QUIT every idle connection and keep none from now on; a Deferred firing once they are closed."""


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

    def success(message, results, action):
        """A success DSN (RFC 3461 NOTIFY=SUCCESS) for a spooled message. `action`: "relayed" (handed to
        a next hop that does not offer DSN, RFC 3461 6.2.1) or "delivered" (into the mailbox itself);
        `results`: a delivery.RecipientResult per such recipient, with the reply that accepted it."""


class IDeliveryEvents(Interface):
    """Hears every per-recipient outcome the scheduler records (the webhook events, mailrelay.events).
    Optional: a scheduler without one emits nothing."""

    def emit(kind, queue_id, sender, recipient, reply, attempt, next_hop, transport):
        """One outcome: `kind` "delivered" | "deferred" | "bounced" | "expired"; `reply` a Reply (the one
        that settled it, or for "expired" the RFC 3463 4.4.7 status with the last reply in its text);
        `attempt` the recipient's attempt number (1 for the first); `next_hop` the host that answered,
        else the transport name; `transport` "direct" or the transport's name.

        Cheap and never blocking on a receiver: returns a Deferred that fires (never fails) once the
        event is durable in the outbox, or at once when nobody subscribes to `kind` or it was dropped
        (outbox full, disk error: logged and counted). Delivery never waits on the HTTP side."""


class IRateCounter(Interface):
    """Message budgets per identity (`messages_per_minute`): server.ratelimit.RateLimiter on its own,
    cluster.shared.SharedRateLimiter across the relays naming one Redis."""

    rate = Attribute("The rate (events a minute) of the last check.")

    def allow(key, rate=None):
        """Take one event for `key` at `rate` a minute: True (taken) or False (over the limit), or a
        Deferred firing with one of them within a bounded wait; never fails."""


class IAttemptWindow(Interface):
    """AUTH attempts per client key over the last minute (`auth_failures_per_minute`):
    server.factory.FailureWindow on its own, cluster.shared.SharedFailureWindow across relays."""

    limit = Attribute("Attempts allowed in the window (0: no limit).")

    def set_limit(limit):
        """A reload's new limit, applied at once to the keys already counted."""

    def over_limit(count):
        """True when `count` attempts in the window are more than the limit."""

    def count(key):
        """The attempts counted for `key` in the window, as known here (synchronous)."""

    def exhausted(key):
        """True when `key` may not start another attempt now (synchronous)."""

    def record(key):
        """Count one attempt as its check starts: the attempts in the window including it, or a
        Deferred firing with that number within a bounded wait; never fails."""

    def refund(key):
        """Take back `key`'s latest attempt (it succeeded)."""


class ISuppressionCheck(Interface):
    """What RCPT asks of the suppression list: spool.suppression.SuppressionList on its own,
    cluster.shared.SharedSuppression with the cluster's entries."""

    def refusal(address):
        """None (not suppressed) or the Reply (550 5.1.1) refusing `address`, or a Deferred firing with
        one of them within a bounded wait; never fails."""


class IThrottle(Interface):
    """The state behind `[[throttle]]`: per destination (a recipient domain a rule matched), when the next
    message may start (a smooth rate), how many connections are open, and whether it is paused after a
    "slow down" reply.  `rule` is the config.Throttle that matched (the scheduler looks it up; a reload
    may change it without losing any state), `now` and `started` are times on the scheduler's clock.

    Every answer comes at once, from memory: an implementation shared between relays (a store such as
    Redis) keeps a local view, brings it up to date on its own, and falls back to it alone when the store
    is unreachable.  The local one is mailrelay.queue.throttle.LocalThrottle."""

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


class IDNSLookup(Interface):
    """A resolver that answers single questions with the AD bit kept (outbound.dns.MXResolver): what the
    TLS policies of direct delivery (MTA-STS TXT, DANE TLSA, the policy host's addresses) ask."""

    def lookup(name, rdtype):
        """Deferred[delivery.dns.Lookup]: the records of (name, "TXT" | "TLSA" | "A" | "AAAA"), whether
        the answer was authenticated, and whether the name exists; fails only with
        outbound.dns.ResolutionFailed when the answer is unknown (SERVFAIL, timeout)."""


class ITLSVerification(Interface):
    """What authenticated the TLS of one outgoing connection (outbound.client.DeliveryClient, and the
    outbound.tlsinfo.Negotiated it records)."""

    tls_verified_by = Attribute(
        '"dane" (RFC 7672: a TLSA record matched), "mta-sts" (RFC 8461: the chain and the MX name checked '
        'under an enforced or testing policy), "verify" (`[delivery] tls = "verify"`, or a smarthost with '
        'verify = true), or None: plaintext, or TLS that authenticated nobody.')


class ITLSPeerCheck(Interface):
    """Client TLS options (an IOpenSSLClientConnectionCreator) that judge the peer after the handshake,
    before any mail is offered: DANE and MTA-STS (outbound.tlspolicy)."""

    def check(connection):
        """The outbound.tlspolicy.Verdict for the pyOpenSSL connection whose handshake just completed."""

    def without_starttls(host):
        """(status, text) for a server that offers no STARTTLS although this policy needs TLS."""

    def refusal(host, verdict):
        """The reply text (4.7.5) for a session ended because `verdict` failed under this policy."""


class ITLSReportSink(Interface):
    """Where every TLS outcome of direct MX delivery is recorded, for TLS reporting (RFC 8460)."""

    def record(policy_domain, policy_type, policy_strings, mx_host, result_type, success, detail):
        """One outcome.  `policy_domain`: the recipient domain; `policy_type`: "sts", "tlsa" or
        "no-policy-found" (RFC 8460 4.3); `policy_strings`: the policy's lines (the MTA-STS policy text,
        or the TLSA records in presentation form), () when none; `mx_host`: the exchanger's name, or None
        for a failure before any (a policy fetch); `result_type`: an RFC 8460 4.3 result type
        ("starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
        "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
        "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"), None on success;
        `success`: whether the session was protected as the policy asks; `detail`: a short text for
        operators.  Called on the reactor thread; must not block and must not fail."""
