# -*- test-case-name: tests.test_http_api, tests.test_smtputf8 -*-
"""The HTTP injection API: `POST /v1/messages` on a `[[listen]] kind = "http"` listener.

Its job in the message's journey: a second front door beside SMTP, for applications without an SMTP
library.  In: an HTTP/1.1 request (twisted.web; TLS when the endpoint is `ssl:`) with
`Authorization: Bearer <key>` and a JSON body `{"from": ..., "to": [...], "message": "<RFC 5322 text>"}`,
optionally with `"dsn"` (RFC 3461 requests) and `"requiretls"` (RFC 8689, HTTPS only): http_params.py.
Out: one committed spool message, exactly as SMTP would have made it, and `202 {"queue_id": ...}` only
once the spool's commit (fsync) has succeeded.

The same rules as SMTP AUTH, through the same objects: the key's NAME (server/apikeys.py) is the
authenticated user the relay policy (IRelayPolicy: `[[permit]] users`, senders, recipients,
`messages_per_minute`, the From: header check) and DKIM's signing decision see; the content goes
through DataReader (server/data.py), the one place SMTP DATA is processed — bare LF normalised to CRLF,
bare CR and NUL refused, the line-length bound, max_message_size — with our Received field in front
(`with HTTP`, or `with HTTPS` over TLS) and forged Authentication-Results removed (server/authres.py).

Answers (RFC 9110 status codes; every body JSON, `{"error": ...}`, plus `"smtp"`: the reply SMTP
would have given, where there is one): 202 accepted; 400 malformed (JSON, fields, addresses, bad
content, more recipients than max_recipients); 401 no or bad key (with `WWW-Authenticate: Bearer`,
RFC 6750 3); 403 not permitted; 404 another path; 405 another method (with `Allow: POST`); 413 over
max_message_size; 429 over messages_per_minute; 503 the queue cannot take the message.

Bounded memory (CWE-400): a request whose path, method, key or Content-Length already decides a
refusal is answered as soon as its headers are in, before any body is read, and the connection is
closed (RFC 9110 15.5.14 allows closing rather than reading an unwanted body); a body is never
buffered beyond BODY_OVERHEAD + 2 x max_message_size: a chunked body that grows past it is refused
the moment it does.  The idle timeout is `[limits] idle_timeout`.
"""
from __future__ import annotations

import io
import json
import re
from typing import TYPE_CHECKING, Optional, Union, cast

from twisted.internet import defer
from twisted.internet.interfaces import ISystemHandle, ITCPTransport
from twisted.web import http

from mailrelay import config
from mailrelay.envelope import ClientInfo, Envelope
from mailrelay.interfaces import Reply
from mailrelay.logger import Logger
from mailrelay.logs import log_queued
from mailrelay.server import addresses
from mailrelay.server.apikeys import ApiKeyFile
from mailrelay.server.authres import AuthResultsFilter
from mailrelay.server.data import DataReader, HeaderCollector, pass_content
from mailrelay.server.http_params import OPTIONAL_FIELDS, parse_options
from mailrelay.server.ratelimit import client_key
from mailrelay.server.received import address_literal, received_header
from mailrelay.server.replies import refusal_reason
from mailrelay.server.session import unmapped_ip

PATH = b"/v1/messages"
BODY_OVERHEAD = 64 * 1024     # the JSON around the message: envelope, quoting
FEED_CHUNK = 256 * 1024       # the message goes through DataReader in pieces of this size
FIELDS = frozenset(("from", "to", "message"))
_LINE_DOT = re.compile(rb"(\A|\n)\.")
_ADDRESS_FORBIDDEN = re.compile(r"[\x00-\x20\x7f<>]")

_log = Logger()


def body_limit(limits: config.Limits) -> int:
    """The most body bytes read for one request: a message of max_message_size fits as JSON text even
    when every CRLF is escaped (`\\r\\n`, twice its size); `\\u` escapes of non-ASCII may not (send UTF-8)."""
    return 2 * limits.max_message_size + BODY_OVERHEAD


def status_for(reply: Reply) -> int:
    """The HTTP status for an SMTP refusal."""
    if reply.status == "5.3.4":
        return 413
    if reply.status == "4.7.1" and reply.code == 450:
        return 429
    if reply.status.startswith("5.7."):
        return 403
    if reply.code < 500 and reply.status.startswith("4.3."):
        return 503
    return 400


class Refused(Exception):
    """A request answered with `status` and `body` (JSON)."""

    def __init__(self, status: int, error: str, reply: Optional[Reply] = None):
        super().__init__(error)
        self.status, self.reply = status, reply
        self.body: dict = {"error": error}
        if reply is not None:
            self.body["smtp"] = f"{reply.code} {reply.status} {reply.text}"


def _refusal(reply: Reply, what: str = "") -> Refused:
    return Refused(status_for(reply), f"{what}{reply.text}", reply)


QUEUE_UNAVAILABLE = Reply(451, "4.3.0", "Could not queue the message, try again later")


def data_stream(message: bytes) -> bytes:
    """`message` as a client's DATA would send it: dot-stuffed (RFC 5321 4.5.2), ending in CRLF . CRLF,
    so DataReader sees nothing it would not see from SMTP.  A final bare LF becomes CRLF, as DataReader
    would make it; a final bare CR stays (DataReader refuses it)."""
    if message.endswith(b"\n") and not message.endswith(b"\r\n"):
        message = message[:-1] + b"\r\n"
    elif not message.endswith(b"\n"):
        message += b"\r\n"
    return _LINE_DOT.sub(rb"\1..", message) + b".\r\n"


def parse_body(body: bytes, limits: config.Limits) -> tuple[str, list[str], bytes, dict]:
    """(sender, recipients without duplicates, message octets, envelope params: the optional DSN and
    REQUIRETLS requests, http_params.py) from a request body, or Refused (400)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise Refused(400, "the body is not valid JSON (RFC 8259) in UTF-8") from None
    if not isinstance(data, dict):
        raise Refused(400, 'the body must be a JSON object: {"from": ..., "to": [...], "message": ...}')
    unknown = sorted(set(data) - FIELDS - OPTIONAL_FIELDS)
    if unknown:
        raise Refused(400, f"unknown field {unknown[0]!r}: only from, to, message, dsn and requiretls are read")
    for key in sorted(FIELDS - set(data)):
        raise Refused(400, f"missing field {key!r}")
    sender, recipients, message = data["from"], data["to"], data["message"]
    if not isinstance(sender, str):
        raise Refused(400, '"from" must be a string (an address, or "" for the null sender)')
    if not isinstance(recipients, list) or not recipients or not all(isinstance(r, str) for r in recipients):
        raise Refused(400, '"to" must be a non-empty list of address strings')
    if not isinstance(message, str) or not message:
        raise Refused(400, '"message" must be a non-empty string: the RFC 5322 message')
    sender = _address(sender, "from", "FROM")
    unique: list[str] = []
    for i, recipient in enumerate(recipients):
        recipient = _address(recipient, f"to[{i}]", "TO")
        if recipient not in unique:
            unique.append(recipient)
    if len(unique) > limits.max_recipients:
        raise Refused(400, f"more than {limits.max_recipients} recipients (max_recipients); nothing was accepted",
                      Reply(452, "4.5.3", "Too many recipients"))
    try:
        octets = message.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(400, '"message" holds a lone surrogate, which is no UTF-8 text') from None
    try:
        params = parse_options(data, unique)
    except ValueError as e:
        raise Refused(400, str(e)) from None
    return sender, unique, octets, params


def _address(text: str, field: str, keyword: str) -> str:
    """An envelope address, checked by the SMTP parser exactly as MAIL FROM / RCPT TO would be, with
    SMTPUTF8 given (RFC 6531: a JSON string is Unicode text, so a UTF-8 address is taken as one)."""
    if keyword == "FROM" and text == "":
        return ""
    if _ADDRESS_FORBIDDEN.search(text):
        # Controls, spaces and angle brackets could smuggle parameters or a second path into the
        # command-line parser.
        raise Refused(400, f"{field}: {text[:100]!r} is not an address (no spaces, <>, controls)")
    try:
        line = addresses.wire_text(f"{keyword}:<{text}>")
    except UnicodeEncodeError:
        raise Refused(400, f"{field}: holds a lone surrogate, which is no UTF-8 text") from None
    parsed: Union[addresses.MailFrom, addresses.RcptTo, Reply]
    if keyword == "FROM":
        parsed = addresses.parse_mail(line + " SMTPUTF8")
    else:
        parsed = addresses.parse_rcpt(line, smtputf8=True)
    if isinstance(parsed, Reply):
        raise Refused(400, f"{field}: {parsed.text}", parsed)
    return parsed.sender if isinstance(parsed, addresses.MailFrom) else parsed.recipient


class Submission:
    """One request's message through policy, DataReader and the spool."""

    def __init__(self, site: "ApiFactory", client: ClientInfo, sender: str, recipients: list[str], octets: bytes,
                 params: Optional[dict] = None):
        self.site, self.client = site, client
        self.sender, self.recipients, self.octets = sender, recipients, octets
        self.params = params or {}
        self.identity: Optional[str] = None

    def check(self) -> Optional[defer.Deferred]:
        """The policy's word, as at MAIL FROM (the rate limit is charged here, as there) and RCPT TO.
        Raises Refused, or returns a Deferred failing with it (a shared rate limit is being asked)."""
        policy = self.site.policy
        self.identity = policy.identify(self.client)
        refusal = policy.check_sender(self.client, self.sender)
        if isinstance(refusal, defer.Deferred):
            return refusal.addCallback(self._sender_checked)
        self._sender_checked(refusal)
        return None

    def _sender_checked(self, refusal: Optional[Reply]) -> None:
        policy = self.site.policy
        if refusal is not None:
            raise _refusal(refusal, "from: ")
        for recipient in self.recipients:
            refusal = policy.check_recipient(self.client, self.sender, recipient)
            if refusal is not None:
                raise _refusal(refusal, f"to {recipient}: ")
        if len(self.octets) > self.site.limits.max_message_size:
            raise _refusal(Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"))

    def spool(self) -> defer.Deferred:
        """Write the message to a new spool message and commit it; fires with (queue id, size)."""
        site = self.site
        envelope = Envelope(
            sender=self.sender, recipients=tuple(self.recipients), received_at=site.clock.seconds(),
            client_address=self.client.address, identity=self.identity,
            body="7BIT" if self.octets.isascii() else "8BITMIME", tls=self.client.tls, smtputf8=self._smtputf8(),
            dkim_senders=tuple(site.policy.signing_senders(self.client)),            # IRelayPolicy
            params=self.params,
        )
        try:
            writer = site.queue.new_message(envelope)
        except Exception:
            _log.failure("the queue refused a new message")
            raise _refusal(QUEUE_UNAVAILABLE) from None
        try:
            outcome, headers, removed = self._fill(writer, envelope)
            if outcome is None:
                outcome = site.policy.check_message(self.client, self.sender, headers)
        except Exception:
            _log.failure("writing message content failed")
            writer.abort()
            raise _refusal(QUEUE_UNAVAILABLE) from None
        if outcome is not None:
            writer.abort()
            raise _refusal(outcome)
        if removed:
            _log.info("{queue_id}: removed {count} Authentication-Results field(s) claiming to be ours "
                      "(forged, from {ip})", queue_id=writer.queue_id, count=removed, ip=self.client.address)
        d = defer.maybeDeferred(writer.commit)
        return d.addCallback(lambda queue_id: (queue_id, envelope, writer.size))      # IMessageWriter.size

    def _smtputf8(self) -> bool:
        """RFC 6531/6532: a UTF-8 address, or a header block that is UTF-8 text, makes an SMTPUTF8 message
        (JSON carries Unicode text: non-ASCII in a header field can only be UTF-8 here)."""
        if not all(a.isascii() for a in (self.sender, *self.recipients)):
            return True
        end = self.octets.find(b"\n\n")
        end2 = self.octets.find(b"\r\n\r\n")
        ends = [e for e in (end, end2) if e >= 0]
        return not self.octets[:min(ends) if ends else len(self.octets)].isascii()

    def _fill(self, writer, envelope: Envelope) -> tuple[Optional[Reply], bytes, int]:
        site = self.site
        writer.write(received_header(
            helo=address_literal(self.client.address), address=self.client.address, hostname=site.hostname,
            protocol="HTTPS" if self.client.tls else "HTTP", queue_id=writer.queue_id,
            recipients=envelope.recipients, when=envelope.received_at, tls=envelope.tls,
            user=self.client.user, show_user=site.received_shows_user,
        ))
        content_filter = AuthResultsFilter(writer.write, site.authserv_id) if site.authserv_id else None
        write = writer.write if content_filter is None else content_filter.feed
        headers = HeaderCollector()
        reader = DataReader(lambda chunk: pass_content(chunk, headers, write),
                            site.limits.max_message_size, site.limits.max_line_length)
        stream = memoryview(data_stream(self.octets))
        rest = None
        for start in range(0, len(stream), FEED_CHUNK):
            rest = reader.feed(bytes(stream[start:start + FEED_CHUNK]))
        if rest is None:
            raise RuntimeError("DataReader did not find the end of the message it was given")
        if reader.outcome is None and content_filter is not None:
            content_filter.finish()
        return reader.outcome, headers.headers, content_filter.removed if content_filter is not None else 0


if TYPE_CHECKING:
    from OpenSSL import SSL

    class _ApiChannel(http.HTTPChannel):
        """What ApiFactory.buildProtocol makes of twisted.web's channel (for the type checker only)."""
        site: ApiFactory                # set by ApiFactory.buildProtocol
        transport: ITCPTransport        # TCP, or TLS over TCP (an ssl: endpoint)


class ApiRequest(http.Request):
    """One HTTP request: refused from its headers alone when they decide it, else read (bounded) and
    submitted.  Never a traceback to the client: an unexpected error is a 503 and a log line."""

    channel: _ApiChannel
    content: io.BytesIO            # gotLength replaces twisted.web's file with one of ours

    _answered = False
    _gone = False
    _received = 0

    # -- before the body ---------------------------------------------------------------------------

    def gotLength(self, length: Optional[int]) -> None:
        self.content = io.BytesIO()
        site = self.channel.site
        try:
            self._name = self._early_check(site, length, getattr(self.channel, "_command", None),
                                           getattr(self.channel, "_path", None))
        except Refused as refused:
            self.requestHeaders.removeHeader(b"expect")    # no "100 Continue" for a body we refuse
            self._answer_now(refused)
        except Exception:
            _log.failure("unexpected error checking an HTTP request")
            self._answer_now(Refused(503, "local error in processing, try again later"))

    def _early_check(self, site: "ApiFactory", length: Optional[int], command: Optional[bytes],
                     path: Optional[bytes]) -> str:
        if path is not None and path.split(b"?", 1)[0] != PATH:
            raise Refused(404, "not found: the API is POST /v1/messages")
        if command is not None and command != b"POST":
            raise Refused(405, "method not allowed: the API is POST /v1/messages")
        name = self._authenticated(site)
        if length is not None and length > body_limit(site.limits):
            raise Refused(413, f"the body ({length} octets) is larger than this relay reads "
                               f"({body_limit(site.limits)}); max_message_size is {site.limits.max_message_size}")
        return name

    def _authenticated(self, site: "ApiFactory") -> str:
        header = self.requestHeaders.getRawHeaders(b"authorization") or [b""]
        scheme, _, token = header[0].partition(b" ")
        if len(header) != 1 or scheme.lower() != b"bearer" or not token.strip():
            raise Refused(401, "an API key is required: Authorization: Bearer <key>")
        name = site.keys.identify(token.strip().decode("latin-1"))
        if name is None:
            raise Refused(401, "the API key is not valid")
        return name

    def handleContentChunk(self, data: bytes) -> None:
        if self._answered:
            return                      # refused already: the body is discarded as it arrives
        self._received += len(data)
        limit = body_limit(self.channel.site.limits)
        if self._received > limit:
            self._answer_now(Refused(413, f"the body is larger than this relay reads ({limit} octets)"))
            return
        self.content.write(data)

    def _answer_now(self, refused: Refused) -> None:
        """Answer before the body is read and close the connection: the body is never looked at."""
        self._answered = True
        self._count_refusal(refused)
        peer = getattr(self.channel.transport.getPeer(), "host", "?")
        _log.info("HTTP request from {ip} refused: {status} {error}", ip=unmapped_ip(str(peer)),
                  status=refused.status, error=refused.body["error"])
        body = json.dumps(refused.body).encode("utf-8")
        reason = http.RESPONSES.get(refused.status, b"Error")
        extra = self._extra_headers(refused.status)
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s"
                b"Connection: close\r\n\r\n" % (refused.status, reason, len(body), extra))
        transport = self.channel.transport
        transport.write(head + body)
        transport.loseConnection()

    @staticmethod
    def _extra_headers(status: int) -> bytes:
        if status == 401:
            return b'WWW-Authenticate: Bearer realm="mailrelay"\r\n'     # RFC 6750 3
        if status == 405:
            return b"Allow: POST\r\n"                                    # RFC 9110 15.5.6
        return b""

    # -- the whole request is in -------------------------------------------------------------------

    def process(self) -> None:
        if self._answered:
            return
        self.notifyFinish().addErrback(self._lost)
        site = self.channel.site
        d = defer.maybeDeferred(self._submit, site)
        d.addCallbacks(self._accepted, self._refused, errbackArgs=(site,))
        d.addErrback(self._unexpected)

    def _submit(self, site: "ApiFactory") -> defer.Deferred:
        self._name = self._early_check(site, None, self.method, self.path)   # the file may have changed
        self.content.seek(0)
        sender, recipients, octets, params = parse_body(self.content.read(), site.limits)
        self.content = io.BytesIO()                   # the body is not needed any more
        peer = self.getClientAddress()
        client = ClientInfo(address=unmapped_ip(str(getattr(peer, "host", ""))), port=getattr(peer, "port", 0),
                            listener="http", user=self._name, tls=self._tls())
        self._client = client
        if params.get("REQUIRETLS") and client.tls is None:
            # RFC 8689 2: a message that requires TLS is only taken over TLS (HTTPS here).
            raise Refused(400, '"requiretls" needs HTTPS', Reply(530, "5.7.10", "REQUIRETLS needs TLS"))
        submission = Submission(site, client, sender, recipients, octets, params)
        d = defer.maybeDeferred(submission.check).addCallback(lambda _: submission.spool())
        site.track(d)
        return d

    def _tls(self) -> Optional[str]:
        if not self.isSecure():
            return None
        try:
            # isSecure(): a TLS transport, whose system handle is its OpenSSL connection.
            handle = cast("SSL.Connection", cast(ISystemHandle, self.channel.transport).getHandle())
            return f"{handle.get_protocol_version_name()} {handle.get_cipher_name()}"
        except Exception:
            return "TLS unknown"

    def _accepted(self, result) -> None:
        queue_id, envelope, size = result
        site = self.channel.site
        if not site.queue.logs_queued:          # IIncomingQueue declares it
            log_queued(_log, queue_id, envelope, size)
        if site.metrics is not None:
            site.metrics.accepted("http", size)
        self._respond(202, {"queue_id": queue_id})

    def _refused(self, failure, site: "ApiFactory") -> None:
        failure.trap(Refused)
        refused = failure.value
        self._count_refusal(refused)
        client = getattr(self, "_client", None)
        _log.info("HTTP submission from {ip} as {name} refused: {status} {error}",
                  ip=client.address if client else "?", name=getattr(self, "_name", "?"),
                  status=refused.status, error=refused.body["error"])
        self._respond(refused.status, refused.body)

    def _count_refusal(self, refused: Refused) -> None:
        metrics = self.channel.site.metrics if self.channel is not None else None
        if metrics is not None:
            metrics.refused(refusal_reason(refused.reply) if refused.reply is not None else "http")

    def _unexpected(self, failure) -> None:
        _log.failure("unexpected error in an HTTP submission", failure)
        self._respond(503, {"error": "local error in processing, try again later"})

    def _respond(self, status: int, body: dict) -> None:
        if self._gone or self.finished:
            return                       # the client went away; a committed message stays committed
        data = json.dumps(body).encode("utf-8")
        self.setResponseCode(status)
        self.setHeader(b"content-type", b"application/json")
        self.setHeader(b"content-length", b"%d" % len(data))
        self.setHeader(b"cache-control", b"no-store")
        for line in self._extra_headers(status).split(b"\r\n")[:-1]:
            name, _, value = line.partition(b": ")
            self.setHeader(name, value)
        self.write(data)
        self.finish()

    def _lost(self, failure) -> None:
        self._gone = True


class ApiFactory(http.HTTPFactory):
    """The HTTP listener: twisted.web's HTTP/1.1 channel with ApiRequest, no access log (our own lines)."""

    def __init__(self, *, hostname: str, listener: config.Listener, limits: config.Limits, policy, queue,
                 keys: ApiKeyFile, clock=None, metrics=None, authserv_id: Optional[str] = None,
                 received_shows_user: bool = False, connections=None):
        """`connections`: the relay's server.factory.ConnectionCounter, shared with its SMTP listeners."""
        if clock is None:
            from twisted.internet import reactor as clock
        super().__init__(timeout=limits.idle_timeout, reactor=clock)
        self.hostname, self.listener, self.queue, self.keys = hostname, listener, queue, keys
        self.clock, self.metrics = clock, metrics
        self.limits, self.policy = limits, policy
        self.authserv_id, self.received_shows_user = authserv_id, received_shows_user
        self.connections = connections
        self._pending: set[defer.Deferred] = set()

    def buildProtocol(self, addr):
        key = client_key(unmapped_ip(str(getattr(addr, "host", ""))))
        if self.connections is not None and not self.connections.open(key):
            # max_connections (in all, shared with the SMTP listeners) and max_connections_per_ip: the
            # connection is closed at once, as Twisted does when a factory builds no protocol.
            _log.info("HTTP connection from {ip} refused: connection limit", ip=key)
            if self.metrics is not None:
                self.metrics.refused("connection_limit")
            return None
        channel = super().buildProtocol(addr)
        assert channel is not None      # HTTPFactory always builds one
        channel.requestFactory = ApiRequest
        channel.site = self
        if self.connections is not None:
            lost = channel.connectionLost

            def connection_lost(reason, counter=self.connections):
                counter.close(key)
                return lost(reason)
            channel.connectionLost = connection_lost
        return channel

    def startFactory(self) -> None:
        pass        # no access log file, no once-a-second date timer

    def stopFactory(self) -> None:
        pass

    def log(self, request) -> None:
        pass

    def reconfigure(self, *, limits: config.Limits, policy, authserv_id: Optional[str] = None,
                    received_shows_user: bool = False, **_smtp_only) -> None:
        """A reloaded config: later requests use these (the SMTP-only settings do not apply here)."""
        self.limits, self.policy = limits, policy
        self.authserv_id, self.received_shows_user = authserv_id, received_shows_user
        self.timeOut = limits.idle_timeout

    def track(self, d: defer.Deferred) -> None:
        """A commit in flight: shutdown waits for it, so its client still hears 202."""
        self._pending.add(d)

        def done(result):
            self._pending.discard(d)
            return result
        d.addBoth(done)

    def shut_down(self, grace: float = 30.0) -> defer.Deferred:
        """The listener has stopped accepting: fires once the commits in flight are done."""
        waiters = []
        for d in list(self._pending):
            waiter: defer.Deferred[object] = defer.Deferred()
            d.addBoth(_fire, waiter)
            waiters.append(waiter)
        return defer.DeferredList(waiters)


def _fire(result, waiter: defer.Deferred):
    waiter.callback(None)
    return result
