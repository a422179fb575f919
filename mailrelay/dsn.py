# -*- test-case-name: tests.test_dsn, tests.test_metrics, tests.test_smtputf8 -*-
"""Delivery status notifications: telling the envelope sender what became of a message (RFC 3464).

Job in the journey: the last stage.  When the scheduler gives up on recipients (a 5xx, or the queue
lifetime ran out) or a message has waited long enough to deserve a warning, it calls this reporter.
In: a spooled message (envelope + message file) and RecipientResults.  Out: a new message in the spool —
a multipart/report; report-type=delivery-status (RFC 3462/6522) with a human-readable part, a
message/delivery-status part (RFC 3464 §2) and the original header block as text/rfc822-headers —
from the null reverse-path <> to the original envelope sender, then handed to the scheduler so it
travels through the normal routes and policies like any other message.

RFCs: RFC 3464 (DSN format), RFC 6522 (multipart/report), RFC 3463 (status codes), RFC 5321 §4.5.5
and §6.1 (DSNs are sent from <>, and never about a message from <>: no bounce loops), RFC 3834
(Auto-Submitted), RFC 5322 (dates), RFC 6533 (internationalised DSNs); RFC 3461 (the sender's requests:
ENVID as Original-Envelope-Id, ORCPT as Original-Recipient, RET=FULL returns the whole message with a
failure report when it is at most MAX_RETURN_BYTES, else its header block; success reports
"relayed"/"delivered" for NOTIFY=SUCCESS); RFC 8689 §5 (a report about a REQUIRETLS message goes
with REQUIRETLS itself and returns only headers).

RFC 6533: a DSN about an SMTPUTF8 message (a UTF-8 envelope address, or UTF-8 header fields under
SMTPUTF8) is a multipart/report; report-type=global-delivery-status whose status part is
message/global-delivery-status (8bit, §6.1), with `utf-8;` address types (§3) for UTF-8 addresses
(`rfc822;` stays for ASCII ones); its returned header block is message/global-headers (§6.3) when it
holds UTF-8.  Such a DSN is itself spooled with `smtputf8` set, so it travels only to a next hop that
offers SMTPUTF8 (or with its domains as A-labels, outbound/offer.py).
"""
from __future__ import annotations

import re
import io
import uuid
from email.generator import BytesGenerator
from email.message import EmailMessage, Message, MIMEPart
from email.headerregistry import Address
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime, make_msgid
from datetime import datetime, timezone
from typing import Iterable, Optional

from twisted.internet import defer
from zope.interface import implementer

from mailrelay import dsnparams
from mailrelay.envelope import Envelope
from mailrelay.interfaces import IDeliveryReporter
from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.dsn")

MAX_HEADER_BYTES = 64 * 1024      # the original header block quoted in a DSN is cut here
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
# Fold only beyond RFC 5322's hard limit: a long remote word in Diagnostic-Code must stay plain text,
# not become an RFC 2047 encoded word that DSN parsers would not decode.
_POLICY = SMTP.clone(max_line_length=998)
_POLICY_UTF8 = SMTPUTF8.clone(max_line_length=998)

MAX_RETURN_BYTES = 1024 * 1024    # RET=FULL: a message up to this size comes back whole; larger, its headers


def read_headers(message, limit: int = MAX_HEADER_BYTES) -> bytes:
    """The message's header block (up to, not including, the blank line), at most `limit` bytes,
    cut at a line end.  A small bounded read from the local spool file."""
    with message.open() as f:
        data = f.read(limit + 2)
    end = data.find(b"\r\n\r\n")
    if data.startswith(b"\r\n"):
        return b""
    if end >= 0 and end + 2 <= limit:
        return data[:end + 2]
    if end < 0 and len(data) <= limit:          # a message that is all headers, no body
        return data if data.endswith(b"\r\n") or not data else data + b"\r\n"
    cut = data[:limit].rfind(b"\r\n")       # over-long block: keep whole lines only
    return data[:cut + 2] if cut >= 0 else b""


def _clean(text: str) -> str:
    """Remote words and addresses in header-like fields: no CR, LF or other controls (header injection)."""
    return _CONTROLS.sub("?", text)


def _status(result) -> str:
    """The result's RFC 3463 status, or the generic X.0.0 of its reply class when it is malformed."""
    if _STATUS.match(result.status or "") and result.status[0] == str(result.code)[0]:
        return result.status
    return f"{str(result.code)[0] if 400 <= result.code < 600 else '4'}.0.0"


def read_message(message, limit: int = MAX_RETURN_BYTES) -> Optional[bytes]:
    """The whole message, ending in CRLF, or None when it is over `limit` bytes."""
    with message.open() as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        return None
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def address_field(address: str) -> str:
    """A Final-/Original-Recipient value: `rfc822; addr`, or `utf-8; addr` for a UTF-8 address in a
    message/global-delivery-status (RFC 6533 3, utf-8-addr-unitext)."""
    return f"{'rfc822' if address.isascii() else 'utf-8'}; {_clean(address)}"


def is_global(envelope: Envelope, recipients: Iterable[str] = ()) -> bool:
    """Whether a DSN about this message is an RFC 6533 one: the message needed SMTPUTF8."""
    if envelope.smtputf8 and envelope.utf8_headers:
        return True
    return not all(a.isascii() for a in (envelope.sender, *envelope.recipients, *recipients))


GLOBAL_TYPES = ("message/global-delivery-status", "message/global-headers")


class _Generator(BytesGenerator):
    """The stdlib generator, which writes message/* payloads as ASCII only, with the RFC 6532 3.5 /
    RFC 6533 6 types written as the UTF-8 text they are (8bit)."""

    def _handle_message(self, msg) -> None:
        if msg.get_content_type() in GLOBAL_TYPES and isinstance(msg.get_payload(), str):
            # The generator's private output file and message/* hook: the stdlib has no public ones, and
            # typeshed declares neither.
            self._fp.write(msg.get_payload().encode("utf-8", "surrogateescape"))  # type: ignore[attr-defined]
            return
        super()._handle_message(msg)  # type: ignore[misc]


def _field_block(fields: Iterable[tuple[str, str]]) -> Message:
    block = Message(policy=_POLICY)
    for name, value in fields:
        block[name] = value
    return block


class DSNBuilder:
    """Builds the bytes of one DSN (RFC 3464); no I/O.  `now` is unix time."""

    def __init__(self, hostname: str):
        self.hostname = hostname

    def message_fields(self, envelope: Envelope) -> list[tuple[str, str]]:
        # RFC 3464 §2.2: per-message fields; Reporting-MTA is required; RFC 3461 §6.3 ENVID comes back.
        fields = [("Reporting-MTA", f"dns; {self.hostname}")]
        envid = dsnparams.envid(envelope)
        if envid:
            fields.append(("Original-Envelope-Id", _clean(envid)))
        fields.append(("Arrival-Date", _date(envelope.received_at)))
        return fields

    def recipient_fields(self, result, action: str, now: float,
                         retry_until: Optional[float], envelope: Optional[Envelope] = None) -> list[tuple[str, str]]:
        # RFC 3464 §2.3: Final-Recipient, Action and Status are required for each recipient; the
        # ORCPT the client gave (RFC 3461 §4.2) comes back first, as Original-Recipient (§2.3.1).
        orcpt = dsnparams.orcpt(envelope, result.recipient) if envelope is not None else None
        fields = [("Original-Recipient", _clean(orcpt))] if orcpt else []
        fields += [
            ("Final-Recipient", address_field(result.recipient)),
            ("Action", action),
            ("Status", _status(result)),
        ]
        if result.remote_host:
            fields.append(("Remote-MTA", f"dns; {_clean(result.remote_host)}"))
        fields.append(("Diagnostic-Code", f"smtp; {result.code} {_status(result)} {_clean(result.text)}"))
        fields.append(("Last-Attempt-Date", _date(now)))
        if retry_until is not None and action == "delayed":
            fields.append(("Will-Retry-Until", _date(retry_until)))
        return fields

    def human_text(self, envelope: Envelope, results, action: str, returned: str = "headers") -> str:
        lead = _LEADS[action]
        attached = {"headers": "The headers of your message are attached.",
                    "full": "Your message is attached.",
                    "too-large": f"Your message is larger than {MAX_RETURN_BYTES} bytes; only its headers are "
                                 "attached."}[returned]
        lines = [f"This is the mail system at {self.hostname}.", "", lead, ""]
        for r in results:
            where = f" (from {_clean(r.remote_host)})" if r.remote_host else ""
            lines.append(f"<{_clean(r.recipient)}>: {r.code} {_status(r)} {_clean(r.text)}{where}")
        lines += ["", attached]
        return "\n".join(lines) + "\n"

    def build(self, envelope: Envelope, results, action: str, headers: bytes, now: float,
              retry_until: Optional[float] = None, full: Optional[bytes] = None,
              too_large: bool = False) -> bytes:
        """The DSN as bytes with CRLF line ends, ready for the spool.  `full`: the whole message to
        return (RET=FULL) instead of `headers`; `too_large`: RET=FULL was asked for a larger message.
        An RFC 6533 report returns the header block only."""
        results = list(results)
        glob = is_global(envelope, (r.recipient for r in results))
        if glob:
            full = None
        utf8 = glob or not (envelope.sender.isascii() and all(r.recipient.isascii() for r in results))
        policy = _POLICY_UTF8 if utf8 else _POLICY
        report = EmailMessage(policy=policy)
        self._set_headers(report, envelope, action, now)
        returned = "full" if full is not None else "too-large" if too_large else "headers"
        report.set_content(self.human_text(envelope, results, action, returned), cte="8bit" if utf8 else "7bit")
        report.make_mixed()
        report.set_type("multipart/report")                   # RFC 6522 §3: the container of a DSN
        # RFC 6533 §6.1: the report-type names the status part's subtype
        report.set_param("report-type", "global-delivery-status" if glob else "delivery-status")
        # typeshed's EmailMessage.attach takes only an EmailMessage; the stdlib attaches any Message (the
        # status and header parts are plain Message objects on purpose: no MIME-Version, no set_content).
        if glob:
            report.attach(self._global_status_part(envelope, results, action, now, retry_until))  # type: ignore[arg-type]
        else:
            report.attach(self._status_part(envelope, results, action, now, retry_until))  # type: ignore[arg-type]
        # A mark nobody can predict (a remote reply quoted above cannot forge it) where a returned
        # message goes back byte for byte: re-serialising it could refold or re-encode its fields.
        mark = f"@@returned-{uuid.uuid4().hex}@@"
        report.attach(_headers_part(headers, glob and envelope.smtputf8) if full is None  # type: ignore[arg-type]
                      else _message_part(full, mark))
        out = io.BytesIO()
        _Generator(out, policy=policy).flatten(report)
        data = out.getvalue()
        if full is not None:
            data = data.replace(mark.encode("ascii") + b"\r\n", full, 1)
        return data

    def _set_headers(self, report: EmailMessage, envelope: Envelope, action: str, now: float) -> None:
        report["From"] = Address("Mail Delivery System", "MAILER-DAEMON", self.hostname)
        try:
            if envelope.sender.isascii():
                report["To"] = Address(addr_spec=envelope.sender)
            else:
                report["To"] = f"<{_clean(envelope.sender)}>"     # RFC 6532 3.2: a UTF-8 mailbox
        except Exception:       # a quoted address the header registry refuses: cosmetic only
            report["To"] = "undisclosed-recipients:;"
        report["Subject"] = _SUBJECTS[action]
        report["Date"] = _date(now)
        report["Message-ID"] = make_msgid(domain=self.hostname)
        report["Auto-Submitted"] = "auto-replied"          # RFC 3834 §5: no auto-reply to this

    def _status_part(self, envelope, results, action, now, retry_until) -> Message:
        part = Message(policy=_POLICY)
        part["Content-Type"] = "message/delivery-status"
        blocks: list[Message | str] = [_field_block(self.message_fields(envelope))]
        blocks += [_field_block(self.recipient_fields(r, action, now, retry_until, envelope)) for r in results]
        part.set_payload(blocks)
        return part

    def _global_status_part(self, envelope, results, action, now, retry_until) -> Message:
        """message/global-delivery-status (RFC 6533 §6.1): the same fields, as UTF-8 text, 8bit."""
        blocks = [self.message_fields(envelope)]
        blocks += [self.recipient_fields(r, action, now, retry_until, envelope) for r in results]
        part = Message(policy=_POLICY_UTF8)
        part["Content-Type"] = "message/global-delivery-status"
        part["Content-Transfer-Encoding"] = "8bit"
        part.set_payload("\r\n".join("".join(f"{name}: {value}\r\n" for name, value in block)
                                      for block in blocks))
        return part


_LEADS = {
    "failed": ("Your message could not be delivered to the recipients below. The mail system has\n"
               "given up on them; the reason each was refused follows its address."),
    "delayed": ("Your message has not yet been delivered to the recipients below. The mail system\n"
                "is still trying and will tell you again only if it gives up. You need not resend it."),
    # RFC 3461 6.2.1: NOTIFY=SUCCESS, and the next hop does not offer DSN: we say so, and no more comes.
    "relayed": ("Your message was relayed to the recipients below, as you asked to be told. The next\n"
                "mail system does not send delivery notifications, so no further report will follow."),
    "delivered": "Your message was delivered to the recipients below, as you asked to be told.",
}
_SUBJECTS = {"failed": "Undelivered Mail Returned to Sender", "delayed": "Delayed Mail (still being retried)",
             "relayed": "Successful Mail Delivery Report", "delivered": "Successful Mail Delivery Report"}


def _message_part(full: bytes, mark: str) -> Message:
    """RFC 3461 RET=FULL: the returned message as message/rfc822 (`mark` is replaced in build)."""
    part = Message(policy=_POLICY)
    part["Content-Type"] = "message/rfc822"
    if not full.isascii():
        part["Content-Transfer-Encoding"] = "8bit"        # RFC 2046 5.2.1: 7bit, 8bit or binary only
    part.set_payload(mark + "\r\n")
    return part


def _headers_part(headers: bytes, smtputf8: bool = False) -> Message:
    if smtputf8 and not headers.isascii():
        # RFC 6533 §6.3: the UTF-8 header block of an SMTPUTF8 message, returned as it was (8bit).
        part = Message(policy=_POLICY_UTF8)
        part["Content-Type"] = "message/global-headers"
        part["Content-Transfer-Encoding"] = "8bit"
        part.set_payload(headers.decode("utf-8", "surrogateescape"))
        return part
    part = MIMEPart(policy=_POLICY)
    if headers.isascii():
        part.set_content(headers.decode("ascii"), subtype="rfc822-headers", charset="us-ascii", cte="7bit")
    else:
        # 8-bit header bytes (SMTPUTF8 or raw): quoted-printable keeps the DSN itself 7-bit safe.
        text = headers.decode("utf-8", "replace")
        part.set_content(text, subtype="rfc822-headers", charset="utf-8", cte="quoted-printable")
    return part


def _date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, timezone.utc))


@implementer(IDeliveryReporter)
class DSNReporter:
    """Writes DSNs into the spool and enqueues them.  The lead sets `scheduler` after construction.

    `lifetime` (seconds, optional) adds Will-Retry-Until to delay reports.  `metrics`, a
    mailrelay.metrics.Metrics or None, counts every DSN queued."""

    def __init__(self, spool, hostname: str, clock=None, lifetime: Optional[float] = None, metrics=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.spool = spool
        self.clock = clock
        self.lifetime = lifetime
        self.scheduler = None
        self.metrics = metrics
        self.builder = DSNBuilder(hostname)

    def bounce(self, message, results) -> defer.Deferred:
        """A failure DSN for `results`; fires with the DSN's queue id, or None when none is due."""
        return self._report(message, list(results), "failed")

    def delay(self, message, recipients) -> defer.Deferred:
        """The delay warning for `recipients` (RecipientResults still pending); same return value."""
        return self._report(message, list(recipients), "delayed")

    def success(self, message, results, action: str) -> defer.Deferred:
        """A success DSN, `action` "relayed" or "delivered" (RFC 3461 6.2.1); same return value."""
        if action not in ("relayed", "delivered"):
            raise ValueError(f"not a success action: {action!r}")
        return self._report(message, list(results), action)

    def _report(self, message, results, action: str) -> defer.Deferred:
        envelope = message.envelope
        if envelope.sender == "":
            # RFC 5321 §6.1 / RFC 3464 §2: never a DSN about a message from <> (no bounce loops).
            log.info("{queue_id}: no {action} DSN for a message from <>",
                     queue_id=message.queue_id, action=action)
            return defer.succeed(None)
        if not results:
            return defer.succeed(None)
        try:
            data = self._build(message, results, action)
        except Exception:
            log.failure("{queue_id}: cannot build the {action} DSN", queue_id=message.queue_id, action=action)
            return defer.fail()
        return self._spool(message, data, action, len(results))

    def _build(self, message, results, action: str) -> bytes:
        now = self.clock.seconds()
        envelope = message.envelope
        retry_until = envelope.received_at + self.lifetime if self.lifetime else None
        full, too_large = None, False
        # RFC 3461 4.3: RET applies to failure reports only; RFC 8689 5: a REQUIRETLS message's report
        # behaves as RET=HDRS whatever RET said.
        if action == "failed" and dsnparams.ret(envelope) == "FULL" and not dsnparams.requiretls(envelope):
            full = read_message(message, MAX_RETURN_BYTES)
            too_large = full is None
        return self.builder.build(envelope, results, action, read_headers(message), now, retry_until,
                                  full=full, too_large=too_large)

    def _spool(self, message, data: bytes, action: str, count: int) -> defer.Deferred:
        original = message.envelope
        envelope = Envelope(
            sender="",
            recipients=(original.sender,),
            received_at=self.clock.seconds(),
            body="7BIT" if data.isascii() else "8BITMIME",
            # RFC 6533 §3: a DSN to a UTF-8 sender, or returning UTF-8 header fields, needs SMTPUTF8
            smtputf8=not original.sender.isascii() or is_global(original),
            dkim_senders=(self.builder.hostname,),     # our own report, From: MAILER-DAEMON@hostname
            # RFC 8689 5: a report about a REQUIRETLS message MUST go with REQUIRETLS too.
            params={"REQUIRETLS": True} if dsnparams.requiretls(original) else {},
        )
        writer = self.spool.new_message(envelope)
        try:
            writer.write(data)
            d = writer.commit()
        except Exception:
            writer.abort()
            return defer.fail()

        def committed(queue_id):
            log.info("{queue_id}: {action} DSN {dsn_id} for {count} recipient(s) queued to the sender",
                     queue_id=message.queue_id, action=action, dsn_id=queue_id, count=count)
            if self.metrics is not None:
                self.metrics.dsn(action)
            if self.scheduler is not None:
                self.scheduler.enqueue(queue_id)
            return queue_id

        def failed(failure):
            writer.abort()
            log.failure("{queue_id}: cannot spool the {action} DSN", failure,
                        queue_id=message.queue_id, action=action)
            return failure

        return d.addCallbacks(committed, failed)
