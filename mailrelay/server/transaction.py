# -*- test-case-name: tests.test_server_network, tests.test_server_session -*-
"""The mail transaction of a server session: MAIL, RCPT, DATA and the commit before 250.

Its job in the message's journey: turn one client transaction into one committed spool message.  In:
MAIL FROM / RCPT TO / DATA command lines and then the DATA bytes, handed over by the session.  Out:
the policy asked at MAIL, RCPT and end of data; an IMessageWriter from the incoming queue filled with
our `Received` header and the un-dot-stuffed content (forged Authentication-Results removed: authres.py);
`250 2.0.0 Ok: queued as <id>` only once the writer's commit has succeeded, otherwise 451 4.3.0 and the
partial message thrown away.

Implements RFC 5321 §4.1.1.2-4 (MAIL, RCPT, DATA), §4.1.4 (command order), §4.5.3.1.8 (452 for
recipients beyond the limit, never dropped), §4.4 (trace header), RFC 6531 §3.4 (SMTPUTF8: the
transaction's flag, in the envelope and the Received keyword), RFC 1870 §6.1 (SIZE), RFC 3207 §4
and RFC 4954 §6 / RFC 6409 §4.3 (530 before STARTTLS or AUTH where required), RFC 3461 §4 (NOTIFY,
ORCPT, RET, ENVID kept in the envelope) and RFC 8689 §2, §4.1 (REQUIRETLS only over TLS, kept).

BDAT (bdat.py) opens, fills and ends its message with the same `_new_reader`, `_open_message` and
`_end_of_data`, so both ways in share one content path and one commit.

`TransactionMixin` is one part of `RelaySession` (session.py); it uses the session's state (`_helo`,
`_esmtp`, `_user`, `_tls_on`, `_ip`, `_mail`, `_identity`, `_rcpts`, `_rcpt_params`, `_reader`, `_writer`,
`_content_filter`, `_headers`, `_write_failed`, `_envelope`, `_inbuf`, `_inpos`, `_clock`, `_limits`,
`factory`, `hostname`) and its helpers (`_send`, `_reply`, `_count`, `_set_busy`, `_abort_writer`,
`_reset_transaction`, `_reset_transaction_safely`, `client_info`, `_tls_description`, `_log`,
`_log_unexpected`).
"""
from __future__ import annotations

from typing import Optional

from twisted.internet import defer

from mailrelay.envelope import Envelope
from mailrelay.interfaces import Reply
from mailrelay.logs import log_queued
from mailrelay.server import addresses
from mailrelay.server import params as esmtp_params
from mailrelay.server.authres import AuthResultsFilter
from mailrelay.server.data import DataReader, HeaderCollector, pass_content
from mailrelay.server.received import protocol_name, received_header
from mailrelay.server.replies import LOCAL_ERROR


class TransactionMixin:
    """MAIL, RCPT, DATA and the end of data, for RelaySession."""

    def do_MAIL(self, rest: str) -> None:
        refusal = self._mail_refusal()
        if refusal is not None:
            self._reply(refusal)
            return
        parsed = addresses.parse_mail(rest)
        if not isinstance(parsed, Reply) and parsed.smtputf8 and not self._esmtp:
            parsed = addresses.SMTPUTF8_NEEDS_EHLO     # RFC 6531 3.2: an extension only EHLO offers
        if isinstance(parsed, Reply):
            self._reply(parsed)
            return
        if parsed.params.get("REQUIRETLS") and not self._tls_on:
            # RFC 8689 2: REQUIRETLS may only be given on a TLS session (we offer it only there).
            self._reply(esmtp_params.REQUIRETLS_NEEDS_TLS)
            return
        if parsed.size is not None and parsed.size > self._limits.max_message_size:
            self._send(552, "5.3.4", "Message size exceeds fixed maximum message size")   # RFC 1870 6.1
            return
        client = self.client_info()
        identity = self.factory.policy.identify(client)
        refusal = self.factory.policy.check_sender(client, parsed.sender)
        if isinstance(refusal, defer.Deferred):
            # A shared rate limit (cluster.shared) answers within its bounded wait; meanwhile input
            # waits unread (RFC 2920: replies keep their order).
            self._set_busy(True)
            refusal.addCallback(self._sender_checked, parsed, identity, True)
            refusal.addErrback(self._log_unexpected)
            return
        self._sender_checked(refusal, parsed, identity, False)

    def _sender_checked(self, refusal: Optional[Reply], parsed, identity: Optional[str], waited: bool) -> None:
        if refusal is not None:
            self._reply(refusal)
        else:
            self._mail, self._identity, self._rcpts = parsed, identity, []
            self._send(250, "2.1.0", "Sender ok")
        if waited:
            self._set_busy(False)

    def _mail_refusal(self) -> Optional[Reply]:
        if self._helo is None:
            return Reply(503, "5.5.1", "Send EHLO/HELO first")
        if self._mail is not None:
            return Reply(503, "5.5.1", "Nested MAIL command")
        if self.factory.require_tls and not self._tls_on:
            return Reply(530, "5.7.0", "Must issue a STARTTLS command first")    # RFC 3207 4
        if self.factory.require_auth and self._user is None:
            return Reply(530, "5.7.0", "Authentication required")              # RFC 4954 6, RFC 6409 4.3
        return None

    def do_RCPT(self, rest: str) -> None:
        if self._mail is None:
            self._send(503, "5.5.1", "Need MAIL before RCPT")
            return
        parsed = addresses.parse_rcpt(rest, self._mail.smtputf8)
        if isinstance(parsed, Reply):
            self._reply(parsed)
            return
        if len(self._rcpts) >= self._limits.max_recipients:
            self._send(452, "4.5.3", "Too many recipients")     # RFC 5321 4.5.3.1.8: 452, never dropped
            return
        recipient = parsed.recipient
        if self.factory.postmaster and self._is_postmaster(recipient):
            # RFC 5321 4.5.1: mail to the postmaster is accepted from anyone; it goes to the configured
            # mailbox (a fixed destination: no relaying), whatever the permit rules say.
            recipient = self.factory.postmaster
        else:
            refusal = self.factory.policy.check_recipient(self.client_info(), self._mail.sender, recipient)
            if refusal is not None:
                self._reply(refusal)
                return
            # A recipient that failed for good lately (spool.suppression) gets 550 5.1.1 saying since
            # when and why; asked only once the policy has let the client relay to it (no list for
            # strangers).  A list shared through Redis (cluster.shared) answers within its bounded wait.
            suppression = self.factory.suppression
            reply = suppression.refusal(recipient) if suppression is not None else None
            if isinstance(reply, defer.Deferred):
                self._set_busy(True)
                reply.addCallback(self._recipient_checked, recipient, True, parsed.params)
                reply.addErrback(self._log_unexpected)
                return
            if reply is not None:
                self._recipient_checked(reply, recipient, False, parsed.params)
                return
        self._recipient_checked(None, recipient, False, parsed.params)

    def _recipient_checked(self, suppressed: Optional[Reply], recipient: str, waited: bool,
                           params: Optional[dict] = None) -> None:
        if suppressed is not None:
            self._count("refused", "suppressed")
            self._log.info("RCPT to {recipient} from {ip} refused: suppressed", recipient=recipient, ip=self._ip)
            self._send(suppressed.code, suppressed.status, suppressed.text)
        else:
            if recipient not in self._rcpts:
                self._rcpts.append(recipient)
                if params:
                    self._rcpt_params[recipient] = params    # NOTIFY, ORCPT (RFC 3461 4.1, 4.2)
            self._send(250, "2.1.5", "Recipient ok")
        if waited:
            self._set_busy(False)

    def _is_postmaster(self, recipient: str) -> bool:
        lowered = recipient.lower()
        return lowered == "postmaster" or lowered == f"postmaster@{self.hostname.lower()}"

    def do_DATA(self, rest: str) -> None:
        if self._mail is None or not self._rcpts:
            self._send(503, "5.5.1", "Need MAIL and RCPT before DATA")
            return
        if rest.strip():
            self._send(501, "5.5.4", "DATA takes no arguments")
            return
        envelope = self._new_envelope()       # before the 354: should it fail, DATA gets the 451
        self._reader = self._new_reader(dots=True)
        # The 354 first: the client's body is on its way while the spool writer is set up.
        self._write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self._open_message(envelope)

    def _new_reader(self, dots: bool) -> DataReader:
        """The content reader of a new message: DATA's (dot-stuffed) or BDAT's (RFC 3030: counted)."""
        return DataReader(self._write_content, self._limits.max_message_size, self._limits.max_line_length,
                          dots=dots)

    def _open_message(self, envelope: Envelope) -> None:
        """The spool writer of the message whose content now begins, our Received header first in it.
        Should the queue refuse, the content is still read, and its end is answered 451
        (`_write_failed`)."""
        self._envelope, self._headers = envelope, HeaderCollector()
        try:
            self._writer = self.factory.queue.new_message(envelope)
            self._writer.write(self._received(self._writer.queue_id, envelope))
            if self.factory.authserv_id:
                # RFC 8601 5: a field claiming our own authserv-id from outside is forged; dropped.
                self._content_filter = AuthResultsFilter(self._writer.write, self.factory.authserv_id)
        except Exception:
            self._log.failure("the queue refused a new message")
            self._abort_writer()
            self._write_failed = True      # the data is read and dropped; its end is answered 451

    def _new_envelope(self) -> Envelope:
        return Envelope(
            sender=self._mail.sender, recipients=tuple(self._rcpts), received_at=self._clock.seconds(),
            client_address=self._ip, client_helo=self._helo or "", identity=self._identity,
            body=self._mail.body, tls=self._tls_description(), smtputf8=self._mail.smtputf8,
            dkim_senders=self._dkim_senders(), params=self._envelope_params(),
        )

    def _envelope_params(self) -> dict:
        """The DSN and REQUIRETLS requests as the spool keeps them (layout: mailrelay/dsnparams.py)."""
        params = dict(self._mail.params)
        rcpts = {r: p for r, p in self._rcpt_params.items() if r in self._rcpts}
        if rcpts:
            params["RCPT"] = rcpts
        return params

    def _dkim_senders(self) -> tuple[str, ...]:
        """Whose From: our keys may sign (dkim/permission.py): the client's rule's `senders`, or none at
        all when a recipient was taken only through the postmaster exception (it lets anyone in)."""
        client, policy = self.client_info(), self.factory.policy
        postmaster = self.factory.postmaster
        if postmaster and postmaster in self._rcpts and \
                policy.check_recipient(client, self._mail.sender, postmaster) is not None:
            return ()
        return tuple(policy.signing_senders(client))                   # IRelayPolicy

    def _received(self, queue_id: str, envelope: Envelope) -> bytes:
        return received_header(
            helo=envelope.client_helo, address=self._ip, hostname=self.hostname,
            protocol=protocol_name(esmtp=self._esmtp, tls=self._tls_on, authenticated=self._user is not None,
                                   utf8=envelope.smtputf8),
            queue_id=queue_id, recipients=envelope.recipients, when=envelope.received_at,
            tls=envelope.tls, user=self._user, show_user=self.factory.received_shows_user,
        )

    def _write_content(self, chunk: bytes) -> None:
        """DataReader's sink: straight to the writer, so memory does not grow with the message."""
        if self._write_failed:
            return
        write = self._writer.write if self._content_filter is None else self._content_filter.feed
        try:
            pass_content(chunk, self._headers, write)
        except Exception:
            self._log.failure("writing message content failed")
            self._write_failed = True

    def _feed_data(self) -> bool:
        data = self._inbuf[self._inpos:] if self._inpos else self._inbuf
        self._inbuf, self._inpos = b"", 0
        rest = self._reader.feed(data)
        if rest is None:
            return False
        self._inbuf = rest
        try:
            self._end_of_data()
        except Exception:
            self._log.failure("error at the end of data from {ip}", ip=self._ip)
            self._reset_transaction_safely()
            self._reply(LOCAL_ERROR)
        return True

    def _end_of_data(self) -> None:
        """The client sent CRLF.CRLF: refuse, or commit and only then answer 250."""
        reader, self._reader = self._reader, None
        outcome = reader.outcome
        if outcome is None and self._write_failed:
            outcome = LOCAL_ERROR
        if outcome is None:
            outcome = self.factory.policy.check_message(
                self.client_info(), self._mail.sender, self._headers.headers
            )
        if outcome is not None:
            self._abort_writer()
            self._reset_transaction()
            self._reply(outcome)
            return
        writer, envelope = self._writer, self._envelope
        if self._content_filter is not None and not self._finish_filter(writer):
            return
        self._set_busy(True)
        d = defer.maybeDeferred(writer.commit)
        size = getattr(writer, "size", reader.size)       # as spooled (with our Received header)
        d.addCallbacks(self._committed, self._commit_failed, callbackArgs=(envelope, size))
        d.addErrback(self._log_unexpected)

    def _finish_filter(self, writer) -> bool:
        content_filter, self._content_filter = self._content_filter, None
        try:
            content_filter.finish()
        except Exception:
            self._log.failure("writing message content failed")
            self._abort_writer()
            self._reset_transaction()
            self._reply(LOCAL_ERROR)
            return False
        if content_filter.removed:
            self._log.info("{queue_id}: removed {count} Authentication-Results field(s) claiming to be ours "
                           "(forged, from {ip})", queue_id=writer.queue_id, count=content_filter.removed,
                           ip=self._ip)
        return True

    def _committed(self, queue_id, envelope: Envelope, size: int) -> None:
        self._writer = None
        self._reset_transaction()
        self._send(250, "2.0.0", f"Ok: queued as {queue_id}")    # the client waits for nothing else
        if not getattr(self.factory.queue, "logs_queued", False):
            log_queued(self._log, queue_id, envelope, size)       # else the delivery process writes it
        self._count("accepted", self.factory.listener.kind, size)
        self._set_busy(False)

    def _commit_failed(self, failure) -> None:
        self._log.failure("commit of a message from {ip} failed", failure, ip=self._ip)
        self._abort_writer()
        self._reset_transaction()
        self._send(451, "4.3.0", "Could not queue the message, try again later")
        self._set_busy(False)
