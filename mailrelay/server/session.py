# -*- test-case-name: tests.test_server_session, tests.test_server_network -*-
"""One client connection: the hardened ESMTP server session.

Its job in the message's journey: the relay's front door.  In: the bytes a client sends, the
listener's settings (through the factory), the relay policy, the portal, the incoming queue.  Out:
SMTP replies, and for each accepted transaction one IMessageWriter filled with a `Received` header and
the un-dot-stuffed content, committed before `250 2.0.0 Ok: queued as <id>` is sent.

Implements RFC 5321 (4.1.1 commands, 4.1.4 order, 4.5.3.1 limits, 4.4 trace), RFC 1870 (SIZE),
RFC 6152 (8BITMIME), RFC 2920 (PIPELINING), RFC 3030 (CHUNKING, bdat.py), RFC 6531 (SMTPUTF8, addresses.py),
RFC 3461 (DSN), RFC 8689 (REQUIRETLS, only under TLS; parameters in params.py),
RFC 2034/3463 (enhanced status codes on every 2xx/4xx/5xx
reply; RFC 2034 3 exempts the 220 greeting and the HELO/EHLO reply, whose first word must be our
domain, and 334/354 are not 2xx/4xx/5xx), RFC 3207 (STARTTLS), RFC 4954 (AUTH PLAIN and LOGIN, only
under TLS), RFC 6409 (submission needs AUTH), RFC 8314 (implicit TLS).

A `twisted.internet.protocol.Protocol` of its own (no twisted.mail.smtp base: nothing of it was left
in use but its constructor; benchmarks/session_cost.py shows which Twisted methods run on a session).
Stock Twisted's holes (STARTTLS injection, DATA smuggling, unbounded lines) are closed here and in
data.py.  Input is read from one buffer by `_process`: as command lines, as DATA content (data.py) or
as a BDAT chunk of a counted length (bdat.py); while an AUTH check or a commit is pending the input
waits unread, so replies never reorder (#8126).

The session is composed, not mixed: this protocol holds the connection, the input path, the timers,
the simple commands, EHLO and STARTTLS, and owns its collaborators — `Authenticator` (auth.py, the AUTH
exchange) and `TransactionHandler` (transaction.py: MAIL, RCPT, DATA and the commit; its BdatReceiver,
bdat.py, reads BDAT chunks).  What the session knows is in plain objects (state.py): `connection`
(state.Connection) and `transaction` (state.Transaction), shared with the collaborators.  They answer
the client through a `SessionChannel`, the protocol's one narrow face towards them
(replies.ISessionChannel), never through its attributes.

Graceful shutdown (driven by the factory): `shut_down()` closes an idle session at once with 421 4.3.2;
a session in a transaction finishes it, then its next command other than QUIT gets 421 4.3.2;
`grace_over()` ends whatever is left.
"""
from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Optional, cast

from twisted.internet import protocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    ISSLTransport,
    ISystemHandle,
    ITLSTransport,
    ITransport,
)
from zope.interface import implementer

from mailrelay.envelope import ClientInfo
from mailrelay.interfaces import Reply
from mailrelay.logger import Logger
from mailrelay.net import close_now, no_delay, write_now
from mailrelay.server import addresses
from mailrelay.server.auth import AUTH_FAILURE_DELAY, MAX_AUTH_LINE, Authenticator
from mailrelay.server.ratelimit import client_key
from mailrelay.server.replies import LOCAL_ERROR, SHUTTING_DOWN, ISessionChannel, refusal_reason
from mailrelay.server.state import Connection, Transaction
from mailrelay.server.transaction import TransactionHandler
from mailrelay.tls import handshake_failure

if TYPE_CHECKING:
    from OpenSSL import SSL

__all__ = [
    "AUTH_FAILURE_DELAY", "COMMANDS", "LOCAL_ERROR", "MAX_AUTH_LINE", "MAX_COMMAND_LINE", "SHUTTING_DOWN",
    "RelaySession", "SessionChannel", "refusal_reason", "unmapped_ip",
]

MAX_COMMAND_LINE = 512 - 2        # octets without CRLF (RFC 5321 4.5.3.1.4)
# RFC 5321 4.5.3.1.4 lets extensions lengthen MAIL and RCPT: RFC 3461 2 (ENVID 100 and RET, NOTIFY and
# ORCPT 500), RFC 8689 2 (REQUIRETLS 11), RFC 6531 (SMTPUTF8).
MAX_ENVELOPE_LINE = MAX_COMMAND_LINE + 600
BUSY_INPUT_LIMIT = 64 * 1024      # unread input held while a check or commit is pending; then reading pauses
COMMANDS = frozenset(
    ["HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "HELP", "VRFY", "STARTTLS",
     "AUTH"]
)


def unmapped_ip(host: str) -> str:
    """The peer address as text, with an IPv4-mapped IPv6 address (::ffff:a.b.c.d) unmapped."""
    if ":" not in host:
        return host           # IPv4 as the kernel reports it: already in its one canonical form
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


@implementer(ISessionChannel)
class SessionChannel:
    """The protocol's face towards its collaborators (replies.ISessionChannel): replies, holding input,
    closing, the client's description.  Nothing else of the protocol is reachable through it."""

    # The session's own methods, bound once per connection: a reply costs no extra call.
    __slots__ = ("write", "send", "reply", "hold", "release", "close", "client_info")

    def __init__(self, session: "RelaySession") -> None:
        self.write, self.send, self.reply = session._write, session._send, session._reply
        self.hold, self.release, self.close = session._hold, session._release, session._close
        self.client_info = session.client_info


@implementer(IHandshakeListener)
class RelaySession(protocol.Protocol):
    """An ESMTP server session for one connection, configured by a RelayServerFactory."""

    _log = Logger()
    # Set by makeConnection before any other method runs; TCP, TLS (465, or after STARTTLS), a PROXY
    # listener's wrapper, or a test's StringTransport.  What it may do beyond ITransport is asked where used.
    transport: ITransport

    def __init__(self, factory):
        self.factory = factory
        self.hostname: str = factory.hostname
        self._clock = factory.clock
        self._limits = factory.limits
        self._tls_options = factory.tls_options
        self._can_start_tls = False
        self._inbuf = b""
        self._inpos = 0                   # start of the unread part of _inbuf (avoids re-copying it)
        self._busy = self._processing = self._closing = self._paused = False
        self._draining = False            # shutdown began: finish the transaction in progress, no new one
        self._handshake_done = False      # Twisted's TLS layer calls handshakeCompleted()
        self._timers: dict[str, IDelayedCall] = {}
        self.connection = Connection()
        self.transaction = Transaction()
        channel = SessionChannel(self)
        self.auth = Authenticator(factory, self.connection, self.transaction, channel, self._clock)
        self.transactions = TransactionHandler(factory, self._limits, self.connection, self.transaction,
                                               channel, self._clock)

    # -- state -----------------------------------------------------------------------------------

    def client_info(self) -> ClientInfo:
        """What the policy is told about this client."""
        self.connection.tls_description = self._tls_description()
        return self.connection.client_info()

    def _tls_description(self) -> Optional[str]:
        if not self.connection.tls:
            return None
        try:
            # connection.tls: a TLS transport, whose handle is its OpenSSL connection (ISystemHandle).
            handle = cast("SSL.Connection", cast(ISystemHandle, self.transport).getHandle())
            version, cipher = handle.get_protocol_version_name(), handle.get_cipher_name()
        except Exception:
            return "TLS unknown"
        return f"{version} {cipher}"

    # -- connection --------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        no_delay(self.transport)
        peer = self.transport.getPeer()
        connection = self.connection
        connection.address = unmapped_ip(str(getattr(peer, "host", peer)))
        connection.port = getattr(peer, "port", 0)
        connection.key = client_key(connection.address)
        connection.listener = self.factory.listener.kind
        connection.tls = ISSLTransport.providedBy(self.transport)
        self._can_start_tls = (
            self._tls_options is not None and not connection.tls and ITLSTransport.providedBy(self.transport)
        )
        if self.factory.shutting_down:
            # Accepted in the moment the listener was closing: no session is started any more.
            self._send(SHUTTING_DOWN.code, SHUTTING_DOWN.status, f"{self.hostname} {SHUTTING_DOWN.text}")
            self._close()
            return
        if not self.factory.connections.open(connection.key):
            self._count("refused", "connection_limit")
            self._log.info("connection from {ip} refused: connection limit", ip=connection.address)
            self._send(421, "4.7.0", f"{self.hostname} Too many connections, try again later")
            self._close()
            return
        connection.counted = True
        self._write(f"220 {self.greeting()}\r\n".encode("ascii"))    # the bookkeeping can follow it
        self.factory.session_opened(self)
        self._count("connection", connection.listener)
        self._timers["idle"] = self._clock.callLater(
            self._limits.idle_timeout, self._timed_out, "idle", "Idle timeout"
        )
        self._timers["session"] = self._clock.callLater(
            self._limits.session_timeout, self._timed_out, "session", "Session time limit exceeded"
        )

    def greeting(self) -> str:
        return f"{self.hostname} ESMTP mailrelay"

    def handshakeCompleted(self) -> None:
        self._handshake_done = True

    def connectionLost(self, reason=None) -> None:
        connection = self.connection
        if connection.tls and not self._handshake_done and connection.counted:
            # Postfix logs its SSL_accept errors too: a client that cannot connect is visible.
            self._log.info("TLS handshake with {ip} on the {kind} listener failed: {reason}",
                           ip=connection.address, kind=connection.listener,
                           reason=handshake_failure(reason, self._closing))
        self._closing = True
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()
        if self.transactions.receiving:
            self.transactions.abort_writer()    # lost mid-DATA/BDAT: the partial message is thrown away
        self.auth.connection_lost()
        if connection.counted:
            connection.counted = False
            self.factory.connections.close(connection.key)
            self.factory.session_closed(self)

    # -- graceful shutdown -------------------------------------------------------------------------

    def shut_down(self) -> bool:
        """The relay is stopping: close now if no transaction is under way (True), else let the client
        finish it and close at its next command (False)."""
        if self._closing:
            return True
        self._draining = True
        if self._in_transaction():
            return False
        self._close_for_shutdown()
        return True

    def grace_over(self) -> None:
        """The shutdown grace period ended: close, throwing away an unfinished message.  A commit
        already under way is left to finish (its 250 may still be sent); the factory cuts the
        connection shortly after in any case."""
        if self._closing or (self._busy and self.transactions.writing):
            return
        self._close_for_shutdown()

    def _in_transaction(self) -> bool:
        """MAIL given, DATA being received, or a check/commit pending."""
        return self.transaction.open or self.transactions.reading_data or self._busy

    def _close_for_shutdown(self) -> None:
        self._log.info("closing connection from {ip}: relay shutting down", ip=self.connection.address)
        self._send(SHUTTING_DOWN.code, SHUTTING_DOWN.status, f"{self.hostname} {SHUTTING_DOWN.text}")
        self.auth.cancel()
        self.transactions.abort()       # an unacknowledged partial message: the client still has it
        self._close()

    def _timed_out(self, timer: str, why: str) -> None:
        self._timers.pop(timer, None)
        self._log.info("closing connection from {ip}: {why}", ip=self.connection.address, why=why)
        self._send(421, "4.4.2", f"{self.hostname} {why}, closing connection")
        if self.transactions.receiving:
            self.transactions.abort()
        self._close()

    def _close(self) -> None:
        self._closing = True
        close_now(self.transport)     # the FIN right behind the last reply, not a reactor turn later

    def _write(self, data: bytes) -> None:
        if self._inpos < len(self._inbuf):
            self.transport.write(data)      # more pipelined commands to answer (RFC 2920): one send for all
        else:
            write_now(self.transport, data)

    def _send(self, code: int, status: str, text: str) -> None:
        self._write(f"{code} {status} {text}\r\n".encode("ascii", "replace"))

    def _reply(self, reply: Reply) -> None:
        if reply.code >= 400:
            self.connection.refused += 1
            self._count("refused", refusal_reason(reply))
        self._send(reply.code, reply.status, reply.text)

    def _count(self, event: str, *args) -> None:
        """Tell the metrics (mailrelay.metrics.Metrics), when the relay has them."""
        metrics = self.factory.metrics
        if metrics is not None:
            getattr(metrics, event)(*args)

    def _hold(self) -> None:
        """While a check or a commit is pending, input waits unread, so pipelined replies keep their order
        (RFC 2920). The socket itself is paused only once BUSY_INPUT_LIMIT bytes wait (dataReceived):
        pausing for every commit would cost two epoll changes per message."""
        self._busy = True

    def _release(self) -> None:
        """The pending check or commit is answered: the input that waited is read."""
        self._busy = False
        if self._closing:
            return
        if self._paused:
            self._paused = False
            self._producer().resumeProducing()
        self._process()

    def _producer(self) -> IPushProducer:
        """The transport as the producer of the client's bytes: every connection transport Twisted gives a
        protocol is one (ITransport does not say so)."""
        return cast(IPushProducer, self.transport)

    # -- input -------------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        idle = self._timers.get("idle")
        if idle is not None and idle.active():
            idle.reset(self._limits.idle_timeout)
        self._inbuf = self._inbuf + data if self._inbuf else data
        if self._busy:
            if len(self._inbuf) - self._inpos > BUSY_INPUT_LIMIT and not self._paused:
                self._paused = True         # memory stays bounded while we wait
                self._producer().pauseProducing()
            return
        self._process()

    def _process(self) -> None:
        if self._processing:
            return                    # re-entered from a Deferred that fired synchronously
        self._processing = True
        transactions = self.transactions
        try:
            while self._inpos < len(self._inbuf) and not self._busy and not self._closing:
                if transactions.reading_chunk:
                    if not self._feed_chunk():
                        break
                elif transactions.reading_data:
                    if not self._feed_data():
                        break
                elif not self._next_line():
                    break
        finally:
            if self._inpos:
                self._inbuf, self._inpos = self._inbuf[self._inpos:], 0
            self._processing = False

    def _feed_chunk(self) -> bool:
        """A BDAT chunk's octets, read by count; True once the chunk is complete (and answered)."""
        self._inpos, complete = self.transactions.feed_chunk(self._inbuf, self._inpos)
        if complete:
            self.transactions.chunk_done()
        return complete

    def _feed_data(self) -> bool:
        """DATA's content; True once CRLF.CRLF was read (and answered: the rest is command lines)."""
        data = self._inbuf[self._inpos:] if self._inpos else self._inbuf
        self._inbuf, self._inpos = b"", 0
        rest = self.transactions.feed_data(data)
        if rest is None:
            return False
        self._inbuf = rest              # before the answer: its write sees the pipelined commands
        self.transactions.data_done()
        return True

    def _next_line(self) -> bool:
        end = self._inbuf.find(b"\r\n", self._inpos)
        if end < 0:
            # A command line must end in CRLF within bounds; a client that keeps sending without one is
            # either broken or trying to exhaust our memory (Twisted's buffer grows without bound).
            if len(self._inbuf) - self._inpos > MAX_AUTH_LINE + 2:
                self._send(421, "4.5.2", f"{self.hostname} Line too long, closing connection")
                self._close()
            return False
        line, self._inpos = self._inbuf[self._inpos:end], end + 2
        try:
            self.lineReceived(line)
        except Exception:
            self._log.failure("error handling a command from {ip}", ip=self.connection.address)
            self.auth.cancel()
            self.transactions.abort()
            self._reply(LOCAL_ERROR)
        return True

    def lineReceived(self, line: bytes) -> None:
        """One command line (CRLF removed), or an AUTH response while an exchange is under way."""
        start = line[:5].upper()
        exchange = self.auth.in_progress
        limit = MAX_ENVELOPE_LINE if start in (b"MAIL ", b"RCPT ") else MAX_COMMAND_LINE
        if len(line) > (MAX_AUTH_LINE if exchange or start == b"AUTH " else limit):
            self.auth.cancel()
            self._send(500, "5.5.2", "Line too long")       # RFC 5321 4.5.3.1.4
            return
        text = line.decode("latin-1")
        if exchange:
            self.auth.response(text)
            return
        self._command(text)

    def _command(self, text: str) -> None:
        if addresses.has_control(text):
            # Bare LF, bare CR, NUL...: never let them near an envelope or a header (injection).
            self._send(501, "5.5.4", "Syntax error: control characters are not allowed")
            return
        verb, _, argument = text.partition(" ")
        if self._draining and not self.transaction.open and verb.upper() != "QUIT":
            self._close_for_shutdown()      # the transaction in progress at shutdown is over: no new one
            return
        verb = verb.upper()
        if verb not in COMMANDS:
            self._send(500, "5.5.2", "Command not recognized")
            return
        getattr(self, "do_" + verb)(argument)

    # -- the commands ------------------------------------------------------------------------------

    def do_NOOP(self, rest: str) -> None:
        self._send(250, "2.0.0", "Ok")

    def do_HELP(self, rest: str) -> None:
        self._send(214, "2.0.0", "See RFC 5321; commands: " + " ".join(sorted(COMMANDS)))

    def do_VRFY(self, rest: str) -> None:
        self._send(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def do_QUIT(self, rest: str) -> None:
        self._send(221, "2.0.0", f"{self.hostname} Bye")
        self._close()

    def do_RSET(self, rest: str) -> None:
        self.transactions.abort()
        self._send(250, "2.0.0", "Ok")

    def do_HELO(self, rest: str) -> None:
        self._hello(rest, esmtp=False)

    def do_EHLO(self, rest: str) -> None:
        self._hello(rest, esmtp=True)

    def do_AUTH(self, rest: str) -> None:
        self.auth.command(rest)

    def do_MAIL(self, rest: str) -> None:
        self.transactions.mail(rest)

    def do_RCPT(self, rest: str) -> None:
        self.transactions.rcpt(rest)

    def do_DATA(self, rest: str) -> None:
        self.transactions.data(rest)

    def do_BDAT(self, rest: str) -> None:
        self.transactions.bdat(rest)

    def _hello(self, argument: str, esmtp: bool) -> None:
        name = addresses.check_helo(argument)
        if isinstance(name, Reply):
            self._reply(name)       # no CR/LF/controls may reach Received (header injection)
            return
        self.transactions.abort()   # RFC 5321 4.1.4: EHLO/HELO resets the transaction
        self.connection.helo, self.connection.esmtp = name, esmtp
        first = f"{self.hostname} Hello {name}"
        lines = [first] + (self.extensions() if esmtp else [])
        body = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
        self._write(body.encode("ascii"))

    def extensions(self) -> list[str]:
        """The EHLO keywords for the session's current state."""
        ext = ["PIPELINING", f"SIZE {self._limits.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES",
               "SMTPUTF8", "CHUNKING", "DSN"]   # SMTPUTF8: RFC 6531 3.2, on every listener; DSN: RFC 3461
        tls = self.connection.tls
        if self._can_start_tls and not tls:
            ext.append("STARTTLS")
        if tls:
            ext.append("REQUIRETLS")     # RFC 8689 2: offered only on a TLS session (after STARTTLS, 465)
        if tls and self.factory.portal is not None and self.factory.mechanisms:
            ext.append("AUTH " + " ".join(self.factory.mechanisms))   # RFC 4954: never in plaintext
        return ext

    # -- STARTTLS (RFC 3207) -----------------------------------------------------------------------

    def do_STARTTLS(self, rest: str) -> None:
        if rest.strip():
            self._send(501, "5.5.4", "STARTTLS takes no arguments")
        elif self.connection.tls:
            self._send(503, "5.5.1", "TLS already active")
        elif not self._can_start_tls:
            self._send(454, "4.7.0", "TLS not available")
        else:
            self._send(220, "2.0.0", "Ready to start TLS")
            # RFC 3207 4.2, CVE-2011-0411: whatever the client pipelined after STARTTLS arrived in
            # plaintext and could have been injected by a man in the middle; discard it, and forget
            # everything learned so far (EHLO, MAIL, RCPT, AUTH).
            self._inbuf, self._inpos = b"", 0
            self.transactions.abort()
            self.connection.forget()
            self.auth.cancel()
            # _can_start_tls: connectionMade found the transport an ITLSTransport.
            cast(ITLSTransport, self.transport).startTLS(self._tls_options)
            self.connection.tls = True
