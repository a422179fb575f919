# -*- test-case-name: tests.test_delivery_client, tests.test_tls_policy, tests.test_connection_cache -*-
"""The outgoing ESMTP client: one connection, one or more messages, a result for every recipient.

Journey: the scheduler picks a next hop (smarthost transport or MX host); the next hop connects and runs
this protocol, which hands spooled messages to the remote server.
In: `SessionParams` (our HELO name, TLS mode, credentials, timeouts) and a list of `Job`s (a spooled
message and the recipients to try).  Out: one `results.SessionResult` — a `RecipientResult` per recipient
per job — delivered through the `finished` Deferred, which never fails: a refused connection, a timeout,
a failed TLS handshake or a lost connection settle every unsettled recipient with a 4xx result.

Implements RFC 5321 (section 3 transactions, 4.2 replies, 4.5.2 dot-stuffing, 4.5.3.2 timeouts),
RFC 3207 (STARTTLS), RFC 4954 (AUTH, only over TLS; the mechanisms in outbound.sasl), RFC 1870 (SIZE), RFC 6152
(8BITMIME), RFC 6531 (SMTPUTF8), RFC 3461 (DSN) and RFC 8689 (REQUIRETLS) through outbound.offer,
RFC 3463 (enhanced status codes in every result).

Each job reported as soon as it is settled (crash safety, docs/crash-safety.md section 2): with an
`on_settled(index, results)` callback, a job's final results are handed over right after the reply that
settles it (the reply to the final dot, a refused MAIL FROM, the last refused RCPT), and the next job's
MAIL FROM waits until the Deferred it returns has fired — the caller's record of job k is durable before
job k+1 is offered, so a kill -9 can duplicate at most the one message in flight on a connection.

Connection reuse: see outbound.connect.

Built on Twisted's LineReceiver (reply lines) and TimeoutMixin (the reply timer) alone.  Collaborators
it owns: outbound.starttls.StartTLS (STARTTLS and the peer's judgement) and outbound.sasl.ClientLogin
(AUTH) per connection, outbound.ledger.Ledger (every recipient's result) per session.  (It was built on
twisted.mail.smtp.ESMTPClient, whose states had all been rewritten here: traced, only that class's
__init__ still ran — benchmarks/client_trace.py.)
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Optional, cast

from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IConsumer, IHandshakeListener, ITLSTransport
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.outbound import sevenbit
from mailrelay.outbound.dotstuff import StuffingProducer
from mailrelay.outbound import offer
from mailrelay.queue.job import Job, OnSettled, SessionParams, valid_address
from mailrelay.outbound.ledger import Ledger
from mailrelay.outbound.pool import ConnectionPool, PoolKey
from mailrelay.queue.results import SessionResult, from_reply, parse_reply, printable
from mailrelay.outbound.sasl import ClientLogin, LoginFailed, PasswordLogin
from mailrelay.outbound.starttls import StartTLS, TLSFailed
from mailrelay.interfaces import ITLSVerification
from mailrelay.logger import Logger
from mailrelay.net import no_delay, write_now

log = Logger(namespace="mailrelay.delivery")

SECURITY_MODES = ("none", "opportunistic", "starttls", "tls")
MAX_REPLY_LINES = 100
QUIT_TIMEOUT = 10.0        # seconds to wait for the reply to QUIT on an idle connection

# A reply the client waits for: (command it answers, what a timeout names, codes that are success,
# handler for those, handler for any other code).  Replies are matched to these in order (RFC 2920 3.1).
Awaited = tuple[str, str, Any, Callable, Callable]


@implementer(IHandshakeListener, ITLSVerification)
class DeliveryClient(LineReceiver, TimeoutMixin):
    """One client connection.  Each `_on_*` method handles the reply to the command that preceded it.
    `tls_verified_by` (ITLSVerification) says what authenticated its TLS, once the handshake is done."""

    MAX_LENGTH = 4096      # reply lines are at most 512 octets (RFC 5321 4.5.3.1.5); be lenient, not unbounded
    transport: ITLSTransport     # a TCP connection (TLS, or able to start it); set before connectionMade

    def __init__(self, params: SessionParams, jobs: list[Job], clock: Any,
                 pool: Optional[ConnectionPool] = None, pool_key: Optional[PoolKey] = None,
                 on_settled: Optional[OnSettled] = None):
        self.params = params
        self.identity = params.helo.encode("ascii")      # what EHLO / HELO / LHLO name us
        self._clock = clock
        # TimeoutMixin's clock: its callLater attribute is the documented hook for replacing it.
        self.callLater = clock.callLater     # type: ignore[method-assign]
        self._pool, self._pool_key = pool, pool_key
        self._host = params.remote_host
        self._extensions: dict[bytes, bytes] = {}
        self._reply: list[bytes] = []      # the lines of a multi-line reply so far
        self._tls = StartTLS(params.security, params.tls_options, self._host)
        self._greeted = False
        self._login = ClientLogin(params.login or (PasswordLogin(params.username, params.password or b"")
                                                   if params.username else None), self._host)
        self._awaiting: deque[Awaited] = deque()
        self._command = "connect"
        self._connected_at: Optional[float] = None
        self._fit_for_reuse = True       # once False (a 421, an error, a limit reached) never parked again
        self._parked = self._lost = False
        self._close_waiters: list[defer.Deferred] = []
        self._begin(jobs, reused=False, on_settled=on_settled)

    def _begin(self, jobs: list[Job], reused: bool, on_settled: Optional[OnSettled] = None) -> None:
        """The state of one session (a list of jobs) on this connection."""
        self._ledger = Ledger(jobs)      # every recipient's result so far, and the session's failure
        self._on_settled = on_settled
        self._reported: set[int] = set()
        self.finished: defer.Deferred = defer.Deferred()
        self._mail_answered = self._in_transaction = False
        self._job_index = -1
        self._rcpt_index = -1
        self._accepted: list[int] = []
        self._pipelined = self._mail_refused = False
        self._producer: Optional[StuffingProducer] = None
        self._reused, self._heard_back = reused, False
        self.stale = False     # a reused connection that was dead before its first reply: try a fresh one

    @property
    def jobs(self) -> list[Job]:
        """This session's jobs (a job's message is replaced by its converted form when one is sent)."""
        return self._ledger.jobs

    # -- plumbing: connection, replies, timeouts ------------------------------------------------------

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self._connected_at = self._clock.seconds()
        self._name_server(self.params.remote_host)
        self.setTimeout(self.params.timeouts.reply)
        try:
            self._tls.connected(self.transport)
        except TLSFailed as e:
            return self._abort(*e.failure)
        self._expect((220,), self._on_greeting, self._on_bad_greeting, "connect", "the greeting")

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        self._tls.heard()
        # RFC 5321 4.2: "NNN SP text" ends a reply, "NNN-text" continues it; anything else is garbage.
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            return self._abort(421, "4.5.0", f"malformed reply from {self._host}: {printable(line, 80)}")
        self._reply.append(line[4:])
        if len(self._reply) > MAX_REPLY_LINES:
            return self._abort(421, "4.5.0", f"over-long multi-line reply from {self._host}")
        if line[3:4] == b"-":
            return None
        code, text, self._reply = int(line[:3]), b"\n".join(self._reply), []
        if code >= 400:
            self._note_refusal(code, text)
        if not self._heard_back:
            self._heard_back = True
            if self._reused and code == 421:
                # The server ended the idle session on its side (RFC 5321 3.8) just as we reused it:
                # the jobs were never tried here; deliver_over gives them a fresh connection.
                self.stale = True
                return self._closing(code, text)
        if self._awaiting:
            self._command, _, codes, on_ok, on_fail = self._awaiting.popleft()
        else:
            codes, on_ok, on_fail = (), self._on_unasked_reply, self._on_unasked_reply
        handler = on_ok if code in codes else on_fail
        try:
            handler(code, text)
        except Exception:
            log.failure("delivery client error talking to {host}", host=self._host)
            self._abort(451, "4.3.0", "local error in the delivery client")

    def _note_refusal(self, code: int, text: bytes) -> None:
        # 421 (RFC 5321 3.8) or "too many" (RFC 3463 X.5.3, e.g. 452 4.5.3 at a per-connection message
        # limit): this connection has had its fill and must not be parked for another batch.
        if code == 421 or parse_reply(code, text)[0][1:] == ".5.3":
            self._fit_for_reuse = False

    def lineLengthExceeded(self, line: bytes) -> None:
        self._abort(421, "4.5.0", f"over-long reply line from {self._host}")

    def timeoutConnection(self) -> None:
        # RFC 5321 4.5.3.2: a peer that stops answering is a temporary failure, never a hang.
        self._abort(421, "4.4.2", f"timed out waiting for {self._waiting_for} from {self._host}")

    @property
    def _waiting_for(self) -> str:
        return self._awaiting[0][1] if self._awaiting else "a reply"

    def _expect(self, codes, on_ok: Callable, on_fail: Optional[Callable] = None,
                command: str = "", waiting_for: str = "") -> None:
        """From now on the next reply goes to `on_ok` (its code in `codes`) or `on_fail`; nothing else
        is awaited any more."""
        self._awaiting.clear()
        self._awaiting.append((command, waiting_for or f"the reply to {command}", codes, on_ok,
                               on_fail or self._on_unexpected))

    def _send(self, line: bytes, command: str, codes, on_ok: Callable, on_fail: Optional[Callable] = None) -> None:
        self._expect(codes, on_ok, on_fail, command)
        self.sendLine(line)

    def sendLine(self, line: bytes) -> None:
        write_now(self.transport, line + self.delimiter)

    def _on_unexpected(self, code: int, text: bytes) -> None:
        self._fail_from_reply(code, text, self._command)

    def _fail_from_reply(self, code: int, text: bytes, context: str) -> None:
        """A reply that ends the session: every unsettled recipient gets it, as a temporary failure."""
        self._record_failure(code, text, context)
        self._quit()

    def _closing(self, code: int, text: bytes) -> None:
        """421: the server is closing the connection (RFC 5321 3.8); everything unsettled waits for later."""
        self._record_failure(code, text, self._command)
        self._close()

    def _record_failure(self, code: int, text: bytes, context: str) -> None:
        self._fit_for_reuse = False
        self._ledger.fail_with_reply(code, text, context, self._host)

    def _abort(self, code: int, status: str, text: str) -> None:
        self._fit_for_reuse = False
        self._ledger.fail(code, status, text)
        self.transport.abortConnection()

    def _quit(self) -> None:
        self._send(b"QUIT", "QUIT", range(0, 1000), self._close, self._close)

    def _close(self, code: int = 0, text: bytes = b"") -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.setTimeout(None)
        self._lost = True
        if self._parked:
            self._parked = False
            assert self._pool is not None and self._pool_key is not None     # parked by _end_session
            self._pool.forget(self._pool_key, self)      # closed by the server while idle: just drop it
        if self._producer is not None:
            self._producer.stopProducing()
        if not self.finished.called:
            if self._reused and not self._heard_back:
                self.stale = True
            if self._ledger.failure is None:
                self._ledger.failure = self._failure_from(reason)
            self.finished.callback(self._session_result())
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _session_result(self) -> SessionResult:
        return self._ledger.session_result(self._host, self._tls, not self._mail_answered, self._reused)

    def _failure_from(self, reason: Failure) -> tuple[int, str, str]:
        why = printable(str(reason.value).encode("utf-8", "replace"), 200)
        during_handshake = self._tls.lost(why)
        if during_handshake is not None:
            return during_handshake
        if not self._greeted:
            return 421, "4.4.2", f"connection to {self._host} lost before the greeting: {why}"
        return 421, "4.4.2", f"connection to {self._host} lost while waiting for {self._waiting_for}"

    # -- session set-up: greeting, EHLO, STARTTLS (outbound.starttls), AUTH (outbound.sasl) ----------

    def _on_greeting(self, code: int, text: bytes) -> None:
        self._greeted = True
        self._ehlo()

    def _on_bad_greeting(self, code: int, text: bytes) -> None:
        # A 554 greeting refuses this connection, not the message: try later or elsewhere, never bounce.
        self._greeted = True
        self._fail_from_reply(code, text, "connect")

    def _ehlo(self) -> None:
        self._send(b"EHLO " + self.identity, "EHLO", (250,), self._on_ehlo, self._on_ehlo_refused)

    def _on_ehlo_refused(self, code: int, text: bytes) -> None:
        # RFC 5321 3.2: an old server without EHLO gets HELO — but then no STARTTLS and no AUTH.
        if 500 <= code < 600 and self.params.security in ("none", "opportunistic") and not self.params.username:
            self._send(b"HELO " + self.identity, "HELO", (250,), self._on_helo)
        else:
            self._fail_from_reply(code, text, "EHLO")

    def _on_helo(self, code: int, text: bytes) -> None:
        self._extensions = {}
        self._next_job()

    def _on_ehlo(self, code: int, text: bytes) -> None:
        self._extensions = offer.ehlo_extensions(text)
        self._maybe_starttls()

    def _maybe_starttls(self) -> None:
        try:
            if self._tls.wanted(self._extensions):
                return self._send(b"STARTTLS", "STARTTLS", (220,), self._on_starttls, self._on_starttls_refused)
        except TLSFailed as e:
            self._ledger.failure = e.failure
            return self._quit()
        self._maybe_auth()

    def _on_starttls_refused(self, code: int, text: bytes) -> None:
        if self._tls.refusal_ends_session(code):
            return self._fail_from_reply(code, text, "STARTTLS")
        self._maybe_auth()

    def _on_starttls(self, code: int, text: bytes) -> None:
        # CVE-2011-0411 class: plaintext the server pipelined behind its 220 must not be read as if it came
        # through TLS; and RFC 3207 4.2: forget everything learned before TLS, EHLO again.
        self.clearLineBuffer()
        self._extensions = {}
        try:
            self._tls.start(self.transport)
        except TLSFailed as e:
            return self._abort(*e.failure)
        self._ehlo()

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake is done (implicit TLS, or after STARTTLS)."""
        try:
            self._tls.handshake_completed(self.transport)
        except TLSFailed as e:
            self._abort(*e.failure)

    @property
    def tls_verified_by(self) -> Optional[str]:
        return self._tls.tls_verified_by

    def _maybe_auth(self) -> None:
        if not self._login.wanted:
            return self._next_job()
        try:
            command = self._login.begin(self._extensions.get(b"AUTH", b""), self._tls.active)
        except LoginFailed as e:
            self._ledger.failure = e.failure
            return self._quit()
        self._send(command, "AUTH", (235, 334), self._on_auth_step, self._on_auth_refused)

    def _on_auth_step(self, code: int, text: bytes) -> None:
        """235: in.  334: the mechanism's next response (outbound.sasl), if it has one."""
        if code == 235:
            self._login.succeeded()
            return self._next_job()
        try:
            response = self._login.respond(text)
        except LoginFailed as e:
            return self._abort(*e.failure)
        self._send(response, "AUTH", (235, 334), self._on_auth_step, self._on_auth_refused)

    def _on_auth_refused(self, code: int, text: bytes) -> None:
        self._fail_from_reply(code, self._login.refused(code, text), "AUTH")

    # -- transactions: MAIL, RCPT, DATA, once per job --------------------------------------------------

    def _next_job(self) -> None:
        if self._report_settled():
            return      # _pause carries on once the caller has recorded the job
        if self._in_transaction:
            self._in_transaction = False
            return self._send(b"RSET", "RSET", (250,), lambda code, text: self._next_job())
        self._job_index += 1
        if self._job_index >= len(self.jobs):
            return self._end_session()
        job = self.jobs[self._job_index]
        refusal = offer.refusal(job, self._extensions, self._host, self._tls.protection, self.params.after_tls_failure)
        if refusal is not None:
            # RFC 8689 4.2.1: a server unfit for REQUIRETLS says nothing of the domain's other servers.
            self._ledger.settle_rest(self._job_index, self._host, *refusal,
                                     next_host=refusal[1] in offer.REQUIRETLS_STATUSES)
            return self._next_job()
        if sevenbit.needs_downgrade(job.message, ext := self._extensions):   # RFC 6152 3; RFC 5322 2.1.1: 998
            return self._pause(sevenbit.downgrade(job.message, self._host, ext), self._downgraded, "converting")
        self._start_transaction(job)

    def _downgraded(self, outcome: Any) -> None:
        """The job's message converted for the hop, or the (code, status, text) that settles it (sevenbit.py)."""
        if isinstance(outcome, tuple):
            self._ledger.settle_rest(self._job_index, self._host, *outcome)
            return self._next_job()
        job = self.jobs[self._job_index] = Job(outcome, self.jobs[self._job_index].recipients)
        self._start_transaction(job)

    def _start_transaction(self, job: Job) -> None:
        """MAIL FROM, then one RCPT TO per recipient and DATA, each after the reply to the one before —
        or, to a server that offers PIPELINING, all in one write with the replies matched in order
        (RFC 2920 3.1: DATA ends the group; Postfix's smtp client does the same)."""
        self._mail_refused = False
        valid = self._ledger.settle_invalid(self._job_index, self._host)
        self._pipelined = b"PIPELINING" in self._extensions and bool(valid)
        if not self._pipelined:
            return self._send(offer.mail_command(job, self._extensions), "MAIL FROM", range(200, 300), self._on_mail,
                              self._on_mail_refused)
        self._rcpt_index, self._accepted = len(job.recipients), []
        self._expect(range(200, 300), self._on_mail, self._on_mail_refused, "MAIL FROM")
        lines = [offer.mail_command(job, self._extensions)]
        for i in valid:
            lines.append(offer.rcpt_command(job, job.recipients[i], self._extensions))
            on_reply = self._pipelined_rcpt(i)
            self._awaiting.append(("RCPT TO", "the reply to RCPT TO", range(200, 300), on_reply, on_reply))
        self._send_data(lines)

    def _send_data(self, lines: list[bytes]) -> None:
        """DATA after `lines` (pipelined MAIL and RCPTs, or none), in one write; outbound.chunking: BDAT."""
        self._awaiting.append(("DATA", "the reply to DATA", (354,), self._on_pipelined_354 if lines else
                               self._on_data, self._on_data_refused))
        write_now(self.transport, self.delimiter.join([*lines, b"DATA"]) + self.delimiter)

    def _pipelined_rcpt(self, index: int) -> Callable:
        def on_reply(code: int, text: bytes) -> None:
            if not self._mail_refused:       # after a refused MAIL FROM the RCPTs only get 503s
                self._rcpt_reply(index, code, text)
        return on_reply

    def _on_pipelined_354(self, code: int, text: bytes) -> None:
        if self._accepted and not self._mail_refused:
            return self._on_data(code, text)
        # RFC 2920 3.1: DATA accepted although no recipient was: end it at once with an empty body.
        self._send(b".", "end of data", range(0, 1000), self._on_empty_data_end)

    def _on_empty_data_end(self, code: int, text: bytes) -> None:
        self._in_transaction = False
        return self._closing(code, text) if code == 421 else self._next_job()

    def _report_settled(self) -> bool:
        """Hand the job just settled to `on_settled`; True when the session now waits for its Deferred."""
        index = self._job_index
        if self._on_settled is None or index < 0 or index in self._reported:
            return False
        self._reported.add(index)
        d = defer.maybeDeferred(self._on_settled, index, self._ledger.job_results(index, self._host, self._tls))
        d.addErrback(lambda f: log.failure("recording a settled job failed", f))
        self._pause(d, lambda _: self._next_job(), "recording")
        return True

    def _pause(self, d: defer.Deferred, then: Callable, doing: str) -> None:
        """Our own work (the disk, a conversion) first, then then(result): no reply is due meanwhile."""
        self.setTimeout(None)
        self._expect((), self._on_unasked_reply, self._on_unasked_reply, f"nothing ({doing})", f"nothing ({doing})")

        def resume(result: Any) -> None:
            if not (self._lost or self.finished.called):   # else finished already carries every result
                self.setTimeout(self.params.timeouts.reply)
                then(result)
        d.addCallback(resume)

    def _on_unasked_reply(self, code: int, text: bytes) -> None:
        # A reply nobody asked for (often 421, RFC 5321 3.8): the session cannot be trusted to go on.
        self._fit_for_reuse = False
        self._record_failure(code, text, "the end of a transaction")
        self._close()

    def _on_mail_refused(self, code: int, text: bytes) -> None:
        self._mail_answered = True
        if 400 <= code < 500:
            self._fit_for_reuse = False     # often a per-connection throttle: the next batch starts afresh
        if not 400 <= code < 600:
            return self._on_unexpected(code, text)
        result = from_reply("", code, text, self._host)
        self._ledger.settle_rest(self._job_index, self._host, result.code, result.status, result.text,
                                 sender_refused=True, remote_reply=result.remote_reply)     # the sender's fate
        if code == 421:
            return self._closing(code, text)
        if self._pipelined:
            self._mail_refused = True        # the replies to the RCPTs and DATA already sent still come
            return None
        return self._next_job()

    def _on_mail(self, code: int, text: bytes) -> None:
        self._mail_answered = self._in_transaction = True
        if self._pipelined:
            return None                      # the RCPTs and DATA are on their way already
        self._rcpt_index, self._accepted = -1, []
        self._next_rcpt()

    def _next_rcpt(self) -> None:
        recipients = self.jobs[self._job_index].recipients
        self._rcpt_index += 1
        while self._rcpt_index < len(recipients) and not valid_address(recipients[self._rcpt_index]):
            self._rcpt_index += 1            # settled by Ledger.settle_invalid
        if self._rcpt_index < len(recipients):
            job = self.jobs[self._job_index]
            return self._send(offer.rcpt_command(job, recipients[self._rcpt_index], self._extensions), "RCPT TO",
                              range(0, 1000), self._on_rcpt)
        if not self._accepted:
            return self._next_job()        # every RCPT failed: no DATA (RFC 5321 3.3)
        self._send_data([])

    def _on_rcpt(self, code: int, text: bytes) -> None:
        if self._rcpt_reply(self._rcpt_index, code, text):
            self._next_rcpt()

    def _rcpt_reply(self, index: int, code: int, text: bytes) -> bool:
        """Record the reply to RCPT TO for recipient `index`; False when it ended the session (421)."""
        if 200 <= code < 300:
            self._accepted.append(index)
            return True
        self._ledger.settle_reply(self._job_index, index, code, text, self._host)
        if code == 421:
            self._closing(code, text)
            return False
        return True

    def _settle_accepted(self, code: int, text: bytes) -> None:
        self._ledger.settle_accepted(self._job_index, self._accepted, code, text, self._host,
                                     b"DSN" in self._extensions)

    def _on_data_refused(self, code: int, text: bytes) -> None:
        if not 400 <= code < 600:
            # A 2xx to DATA itself is no delivery (no body was sent): the server is confused, hang up.
            self._settle_accepted(451, text)
            return self._abort(421, "4.5.0", f"{self._host} answered DATA with {code} instead of 354")
        self._settle_accepted(code, text)
        return self._closing(code, text) if code == 421 else self._next_job()

    def _on_data(self, code: int, text: bytes) -> None:
        # Nothing is expected while the body streams; a reply now is the server giving up early.
        self._expect((), self._on_early_reply, self._on_early_reply, "the message body",
                     "the end of the body transfer")
        consumer = cast(IConsumer, self.transport)     # a TCP or TLS transport is a consumer (registerProducer)
        self._producer = StuffingProducer(self.jobs[self._job_index].message.open(), consumer, self.resetTimeout)
        self._producer.start().addCallbacks(self._on_body_sent, self._on_body_failed)

    def _on_early_reply(self, code: int, text: bytes) -> None:
        self._settle_accepted(code if 400 <= code < 600 else 451, text)
        self._abort(421, "4.4.2", f"{self._host} replied before the end of the message")

    def _on_body_sent(self, _: None) -> None:
        self._producer = None
        self.setTimeout(self.params.timeouts.data_end)
        self._expect(range(0, 1000), self._on_data_end, None, "end of data")

    def _on_body_failed(self, reason: Failure) -> None:
        self._producer = None
        if not reason.check(defer.CancelledError):      # cancelled: the connection is already going away
            log.failure("cannot read {queue_id}", reason,
                        queue_id=self.jobs[self._job_index].message.queue_id)
            self._abort(451, "4.3.0", "local error reading the queued message")

    def _on_data_end(self, code: int, text: bytes) -> None:
        # The reply to the final dot settles every accepted recipient at once (RFC 5321 3.3).
        self.setTimeout(self.params.timeouts.reply)
        self._settle_accepted(code, text)
        self._in_transaction = False
        return self._closing(code, text) if code == 421 else self._next_job()

    # -- the end of a session: QUIT, or park in the connection cache ------------------------------------

    def _end_session(self) -> None:
        """Every job is settled.  A clean connection waits in the pool for the next batch (Postfix's
        connection cache); anything else, or a full pool, ends with QUIT as before."""
        if (self._pool is None or self._pool_key is None or not self._fit_for_reuse or self._ledger.failure is not None
                or self._tls.failed):
            return self._quit()
        if not self._pool.park(self._pool_key, self):
            return self._quit()
        self._parked = True
        self.setTimeout(None)                  # the pool's idle timer rules now
        self._expect((), self._on_idle_reply, self._on_idle_reply, "nothing (idle)", "nothing (idle)")
        self.finished.callback(self._session_result())

    def _on_idle_reply(self, code: int, text: bytes) -> None:
        # Unasked-for words on an idle connection are the server closing it (421, RFC 5321 3.8) or
        # confusion: either way it is not fit to carry mail.  Drop it without a QUIT.
        self._fit_for_reuse = self._parked = False
        assert self._pool is not None and self._pool_key is not None     # parked by _end_session
        self._pool.forget(self._pool_key, self)
        self.transport.loseConnection()

    def age(self) -> float:
        """Seconds since the connection was made."""
        return 0.0 if self._connected_at is None else self._clock.seconds() - self._connected_at

    def _name_server(self, name: str) -> None:
        """How results, AUTH and TLS messages name the server: "mx.example[192.0.2.1]", or the name alone
        when it is the address or the peer has none (a UNIX socket's IAddress)."""
        peer = self.transport.getPeer()
        address = peer.host if isinstance(peer, (IPv4Address, IPv6Address)) else None
        self._host = f"{name}[{address}]" if address and address != name else name
        self._login.host = self._tls.host = self._host

    def reuse(self, jobs: list[Job], on_settled: Optional[OnSettled] = None,
              remote_host: Optional[str] = None) -> defer.Deferred:
        """Run `jobs` on this parked connection, from MAIL FROM on: greeting, EHLO, TLS and AUTH still hold.
        Fires like `finished` (SessionResult, never failing); `stale` then tells whether the connection
        proved dead before its first reply, so that nothing was tried.  `on_settled` as for __init__;
        `remote_host`: the name results give the server from now on (direct delivery reuses a connection
        for another exchanger name at the same address)."""
        self._parked = False
        if remote_host is not None:
            self._name_server(remote_host)
        self._begin(jobs, reused=True, on_settled=on_settled)
        self.setTimeout(self.params.timeouts.reply)
        self._next_job()
        return self.finished

    def quit_idle(self) -> defer.Deferred:
        """Say QUIT on the idle connection and close it (RFC 5321 4.1.1.10); fires once it is closed."""
        self._parked = False
        closed: defer.Deferred[None] = defer.Deferred()
        if self._lost:
            closed.callback(None)
            return closed
        self._close_waiters.append(closed)
        self.setTimeout(min(self.params.timeouts.reply, QUIT_TIMEOUT))
        self._quit()
        return closed


