# -*- test-case-name: tests.test_server_parts, tests.test_server_network, tests.test_server_session -*-
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

BDAT (bdat.py: BdatReceiver, owned by this handler) opens, fills and ends its message with the same
`new_reader`, `open_message` and `finish`, so both ways in share one content path and one commit.

`TransactionHandler` is a collaborator of the protocol (session.py), one per connection.  It keeps the
envelope under construction in the session's state.Transaction, reads the client's in state.Connection
(HELO, TLS, the authenticated user), answers through the session's ISessionChannel (replies.py) and
takes the policy, the incoming queue and the listener's settings from the factory.  The protocol owns
the input: it hands this handler the command lines, then DATA's bytes (`feed_data`, `data_done`) or a
chunk's (`feed_chunk`, `chunk_done`), and asks `reading_chunk` / `reading_data` which way the next
bytes go.
"""
from __future__ import annotations

from typing import Optional

from twisted.internet import defer

from mailrelay.envelope import Envelope
from mailrelay.interfaces import IMessageWriter, Reply
from mailrelay.logger import Logger
from mailrelay.logs import log_queued
from mailrelay.server import addresses, replies
from mailrelay.server import params as esmtp_params
from mailrelay.server.authres import AuthResultsFilter
from mailrelay.server.bdat import DATA_AFTER_BDAT, RCPT_AFTER_BDAT, BdatReceiver
from mailrelay.server.data import DataReader, HeaderCollector, pass_content
from mailrelay.server.received import protocol_name, received_header
from mailrelay.server.replies import LOCAL_ERROR, SESSION_LOG_NAMESPACE, ISessionChannel
from mailrelay.server.state import Connection, Transaction

log = Logger(namespace=SESSION_LOG_NAMESPACE)


class TransactionHandler:
    """MAIL, RCPT, DATA, BDAT (through its BdatReceiver) and the end of data, for one session."""

    def __init__(self, factory, limits, connection: Connection, transaction: Transaction,
                 channel: ISessionChannel, clock) -> None:
        self._factory = factory
        self._limits = limits
        self._connection = connection
        self._transaction = transaction
        self._channel = channel
        self._clock = clock
        self._reader: Optional[DataReader] = None      # DATA's content reader (and BDAT's, at its end)
        self._writer: Optional[IMessageWriter] = None  # the spool writer of the message being received
        self._content_filter: Optional[AuthResultsFilter] = None
        self._headers: Optional[HeaderCollector] = None
        self._write_failed = False
        self._envelope: Optional[Envelope] = None
        self.chunks = BdatReceiver(self, channel, limits)

    # -- what the protocol asks ------------------------------------------------------------------

    @property
    def reading_chunk(self) -> bool:
        """A BDAT chunk's octets are still to come: the next input is counted, not lines."""
        return self.chunks.chunk is not None

    @property
    def reading_data(self) -> bool:
        """DATA's content is being read (up to CRLF.CRLF)."""
        return self._reader is not None

    @property
    def receiving(self) -> bool:
        """Message content is being read: DATA, or BDAT chunks before the LAST one (not the commit)."""
        return self._reader is not None or self.chunks.message is not None

    @property
    def writing(self) -> bool:
        """A spool writer is open: content being received, or a commit under way."""
        return self._writer is not None

    def abort(self) -> None:
        """Throw away the message being received (if any) and end the transaction."""
        self.abort_writer()
        self.clear()

    def clear(self) -> None:
        """The transaction is over: its state and its content path are forgotten."""
        self._transaction.clear()
        self._reader = self._writer = self._content_filter = self._headers = self._envelope = None
        self._write_failed = False
        self.chunks.message = None

    def abort_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.abort()
            except Exception:
                log.failure("abort of a partial message failed")

    @property
    def has_recipients(self) -> bool:
        """MAIL and at least one RCPT were accepted: content may follow."""
        return self._transaction.mail is not None and bool(self._transaction.recipients)

    @property
    def client_address(self) -> str:
        return self._connection.address

    @property
    def metrics(self):
        """The relay's mailrelay.metrics.Metrics, or None."""
        return self._factory.metrics

    @property
    def write_failed(self) -> bool:
        """The queue refused the message, or writing its content failed: its end is answered 451."""
        return self._write_failed

    # -- MAIL ------------------------------------------------------------------------------------

    def mail(self, rest: str) -> None:
        channel = self._channel
        refusal = self._mail_refusal()
        if refusal is not None:
            channel.reply(refusal)
            return
        parsed = addresses.parse_mail(rest)
        if not isinstance(parsed, Reply) and parsed.smtputf8 and not self._connection.esmtp:
            parsed = addresses.SMTPUTF8_NEEDS_EHLO     # RFC 6531 3.2: an extension only EHLO offers
        if isinstance(parsed, Reply):
            channel.reply(parsed)
            return
        if parsed.params.get("REQUIRETLS") and not self._connection.tls:
            # RFC 8689 2: REQUIRETLS may only be given on a TLS session (we offer it only there).
            channel.reply(esmtp_params.REQUIRETLS_NEEDS_TLS)
            return
        if parsed.size is not None and parsed.size > self._limits.max_message_size:
            channel.send(552, "5.3.4", "Message size exceeds fixed maximum message size")   # RFC 1870 6.1
            return
        client = channel.client_info()
        policy = self._factory.policy
        identity = policy.identify(client)
        refusal = policy.check_sender(client, parsed.sender)
        if isinstance(refusal, defer.Deferred):
            # A shared rate limit (cluster.shared) answers within its bounded wait; meanwhile input
            # waits unread (RFC 2920: replies keep their order).
            channel.hold()
            refusal.addCallback(self._sender_checked, parsed, identity, True)
            refusal.addErrback(self._unexpected)
            return
        self._sender_checked(refusal, parsed, identity, False)

    def _sender_checked(self, refusal: Optional[Reply], parsed, identity: Optional[str], waited: bool) -> None:
        if refusal is not None:
            self._channel.reply(refusal)
        else:
            self._transaction.begin(parsed, identity)
            self._channel.send(250, "2.1.0", "Sender ok")
        if waited:
            self._channel.release()

    def _mail_refusal(self) -> Optional[Reply]:
        connection, factory = self._connection, self._factory
        if connection.helo is None:
            return Reply(503, "5.5.1", "Send EHLO/HELO first")
        if self._transaction.open:
            return Reply(503, "5.5.1", "Nested MAIL command")
        if factory.require_tls and not connection.tls:
            return Reply(530, "5.7.0", "Must issue a STARTTLS command first")    # RFC 3207 4
        if factory.require_auth and connection.user is None:
            return Reply(530, "5.7.0", "Authentication required")              # RFC 4954 6, RFC 6409 4.3
        return None

    # -- RCPT ------------------------------------------------------------------------------------

    def rcpt(self, rest: str) -> None:
        channel, transaction = self._channel, self._transaction
        if self.chunks.message is not None:
            self.chunks.answer(RCPT_AFTER_BDAT)    # the message (and its Received header) is under way
            return
        if transaction.mail is None:
            channel.send(503, "5.5.1", "Need MAIL before RCPT")
            return
        parsed = addresses.parse_rcpt(rest, transaction.mail.smtputf8)
        if isinstance(parsed, Reply):
            channel.reply(parsed)
            return
        if len(transaction.recipients) >= self._limits.max_recipients:
            channel.send(452, "4.5.3", "Too many recipients")     # RFC 5321 4.5.3.1.8: 452, never dropped
            return
        recipient = parsed.recipient
        factory = self._factory
        if factory.postmaster and self._is_postmaster(recipient):
            # RFC 5321 4.5.1: mail to the postmaster is accepted from anyone; it goes to the configured
            # mailbox (a fixed destination: no relaying), whatever the permit rules say.
            recipient = factory.postmaster
        else:
            refusal = factory.policy.check_recipient(channel.client_info(), transaction.mail.sender, recipient)
            if refusal is not None:
                channel.reply(refusal)
                return
            # A recipient that failed for good lately (spool.suppression) gets 550 5.1.1 saying since
            # when and why; asked only once the policy has let the client relay to it (no list for
            # strangers).  A list shared through Redis (cluster.shared) answers within its bounded wait.
            suppression = factory.suppression
            reply = suppression.refusal(recipient) if suppression is not None else None
            if isinstance(reply, defer.Deferred):
                channel.hold()
                reply.addCallback(self._recipient_checked, recipient, True, parsed.params)
                reply.addErrback(self._unexpected)
                return
            if reply is not None:
                self._recipient_checked(reply, recipient, False, parsed.params)
                return
        self._recipient_checked(None, recipient, False, parsed.params)

    def _recipient_checked(self, suppressed: Optional[Reply], recipient: str, waited: bool,
                           params: Optional[dict] = None) -> None:
        if suppressed is not None:
            replies.count(self._factory.metrics, "refused", "suppressed")
            log.info("RCPT to {recipient} from {ip} refused: suppressed", recipient=recipient,
                     ip=self._connection.address)
            self._channel.send(suppressed.code, suppressed.status, suppressed.text)
        else:
            self._transaction.add_recipient(recipient, params)
            self._channel.send(250, "2.1.5", "Recipient ok")
        if waited:
            self._channel.release()

    def _is_postmaster(self, recipient: str) -> bool:
        lowered = recipient.lower()
        return lowered == "postmaster" or lowered == f"postmaster@{self._factory.hostname.lower()}"

    # -- DATA ------------------------------------------------------------------------------------

    def data(self, rest: str) -> None:
        if self.chunks.message is not None:
            self.chunks.answer(DATA_AFTER_BDAT)    # RFC 3030 2: DATA and BDAT never in one transaction
            return
        if not self.has_recipients:
            self._channel.send(503, "5.5.1", "Need MAIL and RCPT before DATA")
            return
        if rest.strip():
            self._channel.send(501, "5.5.4", "DATA takes no arguments")
            return
        envelope = self.new_envelope()        # before the 354: should it fail, DATA gets the 451
        self._reader = self.new_reader(dots=True)
        # The 354 first: the client's body is on its way while the spool writer is set up.
        self._channel.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.open_message(envelope)

    def bdat(self, rest: str) -> None:
        """BDAT <size> [LAST] (RFC 3030): its chunk is read by count, by `feed_chunk`."""
        self.chunks.command(rest)

    def feed_data(self, data: bytes) -> Optional[bytes]:
        """DATA's content as it arrives; None while it goes on, else the bytes after CRLF.CRLF (then
        `data_done` answers it)."""
        reader = self._reader
        assert reader is not None       # the session feeds DATA's bytes only while `reading_data`
        return reader.feed(data)

    def data_done(self) -> None:
        """DATA's CRLF.CRLF was read: refuse, or commit and only then answer 250."""
        try:
            reader = self._reader
            assert reader is not None   # the reader that has just found CRLF.CRLF (feed_data)
            self.finish(reader)
        except Exception:
            log.failure("error at the end of data from {ip}", ip=self._connection.address)
            self.abort()
            self._channel.reply(LOCAL_ERROR)

    def feed_chunk(self, buffer: bytes, start: int) -> tuple[int, bool]:
        """A BDAT chunk's octets from `buffer[start:]`: (where its octets end in `buffer`, whether the
        chunk is complete — then `chunk_done` answers it)."""
        return self.chunks.feed(buffer, start)

    def chunk_done(self) -> None:
        self.chunks.done()

    # -- the content path DATA and BDAT share -----------------------------------------------------

    def new_reader(self, dots: bool) -> DataReader:
        """The content reader of a new message: DATA's (dot-stuffed) or BDAT's (RFC 3030: counted)."""
        return DataReader(self._write_content, self._limits.max_message_size, self._limits.max_line_length,
                          dots=dots)

    def open_message(self, envelope: Envelope) -> None:
        """The spool writer of the message whose content now begins, our Received header first in it.
        Should the queue refuse, the content is still read, and its end is answered 451
        (`write_failed`)."""
        factory = self._factory
        self._envelope, self._headers = envelope, HeaderCollector()
        try:
            writer = self._writer = factory.queue.new_message(envelope)
            writer.write(self._received(writer.queue_id, envelope))
            if factory.authserv_id:
                # RFC 8601 5: a field claiming our own authserv-id from outside is forged; dropped.
                self._content_filter = AuthResultsFilter(writer.write, factory.authserv_id)
        except Exception:
            log.failure("the queue refused a new message")
            self.abort_writer()
            self._write_failed = True      # the data is read and dropped; its end is answered 451

    def new_envelope(self) -> Envelope:
        transaction, connection = self._transaction, self._connection
        client = self._channel.client_info()
        mail = transaction.mail
        assert mail is not None     # asked only once MAIL and RCPT were accepted (has_recipients)
        return Envelope(
            sender=mail.sender, recipients=tuple(transaction.recipients), received_at=self._clock.seconds(),
            client_address=connection.address, client_helo=connection.helo or "", identity=transaction.identity,
            body=mail.body, tls=client.tls, smtputf8=mail.smtputf8,
            dkim_senders=self._dkim_senders(client, mail.sender), params=transaction.envelope_params(),
        )

    def _dkim_senders(self, client, sender: str) -> tuple[str, ...]:
        """Whose From: our keys may sign (dkim/permission.py): the client's rule's `senders`, or none at
        all when a recipient was taken only through the postmaster exception (it lets anyone in)."""
        policy, postmaster, transaction = self._factory.policy, self._factory.postmaster, self._transaction
        if postmaster and postmaster in transaction.recipients and \
                policy.check_recipient(client, sender, postmaster) is not None:
            return ()
        return tuple(policy.signing_senders(client))                   # IRelayPolicy

    def _received(self, queue_id: str, envelope: Envelope) -> bytes:
        connection = self._connection
        return received_header(
            helo=envelope.client_helo, address=connection.address, hostname=self._factory.hostname,
            protocol=protocol_name(esmtp=connection.esmtp, tls=connection.tls,
                                   authenticated=connection.user is not None, utf8=envelope.smtputf8),
            queue_id=queue_id, recipients=envelope.recipients, when=envelope.received_at,
            tls=envelope.tls, user=connection.user, show_user=self._factory.received_shows_user,
        )

    def _write_content(self, chunk: bytes) -> None:
        """DataReader's sink: straight to the writer, so memory does not grow with the message."""
        if self._write_failed:
            return
        writer, headers = self._writer, self._headers
        assert writer is not None and headers is not None   # open_message set them before any content
        write = writer.write if self._content_filter is None else self._content_filter.feed
        try:
            pass_content(chunk, headers, write)
        except Exception:
            log.failure("writing message content failed")
            self._write_failed = True

    def finish(self, reader: DataReader) -> None:
        """The content read by `reader` is complete: refuse, or commit and only then answer 250."""
        self._reader = None
        outcome = reader.outcome
        if outcome is None and self._write_failed:
            outcome = LOCAL_ERROR
        if outcome is None:
            mail, headers = self._transaction.mail, self._headers
            assert mail is not None and headers is not None     # the message open_message began
            outcome = self._factory.policy.check_message(self._channel.client_info(), mail.sender, headers.headers)
        if outcome is not None:
            self.abort()
            self._channel.reply(outcome)
            return
        writer, envelope = self._writer, self._envelope
        assert writer is not None       # not write_failed: open_message's writer took all the content
        content_filter = self._content_filter
        if content_filter is not None and not self._finish_filter(content_filter, writer):
            return
        self._channel.hold()
        d = defer.maybeDeferred(writer.commit)
        size = writer.size       # IMessageWriter.size: as spooled (with our Received header)
        d.addCallbacks(self._committed, self._commit_failed, callbackArgs=(envelope, size))
        d.addErrback(self._unexpected)

    def _finish_filter(self, content_filter: AuthResultsFilter, writer: IMessageWriter) -> bool:
        self._content_filter = None
        try:
            content_filter.finish()
        except Exception:
            log.failure("writing message content failed")
            self.abort()
            self._channel.reply(LOCAL_ERROR)
            return False
        if content_filter.removed:
            log.info("{queue_id}: removed {count} Authentication-Results field(s) claiming to be ours "
                     "(forged, from {ip})", queue_id=writer.queue_id, count=content_filter.removed,
                     ip=self._connection.address)
        return True

    def _committed(self, queue_id, envelope: Envelope, size: int) -> None:
        factory = self._factory
        self._writer = None
        self.clear()
        self._connection.accepted += 1
        self._channel.send(250, "2.0.0", f"Ok: queued as {queue_id}")    # the client waits for nothing else
        if not factory.queue.logs_queued:                            # IIncomingQueue declares it
            log_queued(log, queue_id, envelope, size)       # else the delivery process writes it
        replies.count(factory.metrics, "accepted", factory.listener.kind, size)
        self._channel.release()

    def _commit_failed(self, failure) -> None:
        log.failure("commit of a message from {ip} failed", failure, ip=self._connection.address)
        self.abort()
        self._channel.send(451, "4.3.0", "Could not queue the message, try again later")
        self._channel.release()

    def _unexpected(self, failure) -> None:
        log.failure("unexpected error in {ip}'s session", failure, ip=self._connection.address)
        self._channel.reply(LOCAL_ERROR)
        self._channel.release()
