"""A real SMTP sink on loopback for tests: the far end of every delivery test, scriptable to misbehave.

Not part of the relay.  A small LineReceiver server (raw control matters more than reuse of
twisted.mail here) that records each transaction — MAIL FROM and its parameters, accepted RCPTs, the
DATA bytes exactly as they came over the wire (dot-stuffed, terminator included) and un-stuffed, whether
TLS was on, the AUTH identity, the client certificate's name, each RCPT's parameters — and can be told
to offer DSN (`extensions`) or REQUIRETLS after STARTTLS (`requiretls`), to refuse recipients,
answer DATA with a scripted sequence, offer or withhold STARTTLS, break the TLS handshake, drop the
connection in the middle of DATA, or never answer at all. SMTPUTF8 (RFC 6531) is offered unless
`extensions` leaves it out (WITHOUT_SMTPUTF8); a non-ASCII path without `SMTPUTF8` given on MAIL, or to
a sink not offering it, gets 553 5.6.7 as from a strict server, and `mail_params` records what MAIL
said. For traffic shaping it counts the connections open at once (`max_at_once`), stamps each MAIL FROM
with the time it came (`mail_times`, monotonic), can greet successive connections with scripted replies
(`greetings`, e.g. a 421, then the connection is closed), answer one address with successive replies
(`rcpt_replies` values may be lists, 250 once used up), and hold the replies to end of data until the
test releases them (`hold_data`, `release`). Offered CHUNKING (`extensions` naming it), it
takes BDAT (RFC 3030) too: each chunk's octets read exactly, recorded as they came (`chunks`: the sizes
and whether LAST; `data` and `data_raw` both the octets, nothing added), each non-last chunk answered
from `chunk_replies` (then "250 2.0.0"), the LAST one like the end of DATA.
With `bearer={user: {tokens}}` it also offers AUTH XOAUTH2 and OAUTHBEARER,
checks the client's string byte for byte (RFC 7628 3.1 for OAUTHBEARER, with this sink's host and port)
and records each (`sasl`); a token not in the set gets the mechanism's error challenge and then 535.

    sink = Sink(rcpt_replies={"bad@example.net": "550 5.1.1 no such user"})
    port = sink.start(reactor, tls_options=options)
    self.addCleanup(sink.stop)
    ... deliver to 127.0.0.1:port ...
    yield sink.wait_for(1)
    self.assertEqual(sink.messages[0].data, body)
"""
from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass, field
from typing import Optional

from twisted.internet import defer, protocol
from twisted.protocols import basic

DEFAULT_EXTENSIONS = ("8BITMIME", "SIZE 104857600", "ENHANCEDSTATUSCODES", "SMTPUTF8")
WITHOUT_SMTPUTF8 = tuple(e for e in DEFAULT_EXTENSIONS if e != "SMTPUTF8")


@dataclass
class Transaction:
    """One message the sink saw to its end of data (accepted or not)."""
    helo: str = ""
    mail_from: str = ""
    mail_params: list[str] = field(default_factory=list)
    rcpt_tos: list[str] = field(default_factory=list)
    rcpt_params: dict = field(default_factory=dict)     # accepted recipient -> its RCPT parameters
    data_raw: bytes = b""           # exactly as received after 354, up to and including ".\r\n"
    data: bytes = b""               # un-stuffed, without the terminator line
    tls: bool = False
    auth_identity: Optional[str] = None
    reply: str = ""
    client_cert: Optional[str] = None   # the CN of the certificate the client presented, if any
    mail_time: float = 0.0              # time.monotonic() when MAIL FROM came
    chunks: list[tuple[int, bool]] = field(default_factory=list)    # BDAT: (size, LAST?) in order


@dataclass
class Session:
    """One connection: every command line received, each with whether TLS was on when it arrived, and
    the command lines grouped by the read they arrived in (to see a client's PIPELINING groups), and the
    address the client connected from."""
    commands: list[tuple[bool, bytes]] = field(default_factory=list)
    reads: list[list[bytes]] = field(default_factory=list)
    peer: str = ""


class Sink:
    """The scriptable sink.  Attributes may be changed between deliveries (e.g. `data_replies`)."""

    protocol_class: type = None      # SinkProtocol, set below

    def __init__(self, *, hostname: str = "sink.test", offer_starttls: Optional[bool] = None,
                 fail_tls: bool = False, rcpt_replies: Optional[dict] = None, mail_reply: str = "250 2.1.0 OK",
                 data_replies: tuple = (), drop_in_data: Optional[int] = None, silent: bool = False,
                 extensions: tuple = DEFAULT_EXTENSIONS, ehlo_reply: Optional[str] = None,
                 bearer: Optional[dict] = None, greetings: tuple = (), hold_data: bool = False,
                 chunk_replies: tuple = (), requiretls: bool = False):
        self.hostname = hostname
        self.offer_starttls = offer_starttls      # None: offer when started with tls_options
        self.fail_tls = fail_tls                  # answer STARTTLS with 220, then send garbage and hang up
        # address -> a reply, or a list of replies for successive RCPTs (then 250)
        self.rcpt_replies = {k.lower(): (list(v) if isinstance(v, (list, tuple)) else v)
                             for k, v in (rcpt_replies or {}).items()}
        self.greetings = list(greetings)          # greetings of successive connections, then 220
        self.hold_data = hold_data                # keep end-of-data replies until release()
        self.held: list = []                      # (protocol, reply) waiting for release()
        self.open_now = self.max_at_once = 0
        self.mail_times: list[float] = []
        self.mail_reply = mail_reply
        self.data_replies = list(data_replies)    # replies to successive end-of-data, then "250 2.0.0"
        self.drop_in_data = drop_in_data          # hang up after this many DATA lines
        self.chunk_replies = list(chunk_replies)  # replies to successive non-LAST BDAT chunks, then "250 2.0.0"
        self.silent = silent                      # accept connections, never say a word
        self.extensions = tuple(extensions)
        self.ehlo_reply = ehlo_reply              # e.g. "502 5.5.1 no EHLO" to force HELO
        self.requiretls = requiretls              # offer REQUIRETLS (RFC 8689), only once TLS is on
        self.transactions: list[Transaction] = []
        self.messages: list[Transaction] = []     # the accepted ones (2xx after DATA)
        self.sessions: list[Session] = []
        self.auth_attempts: list[tuple[bool, str]] = []   # (tls on?, mechanism) for every AUTH command
        self.bearer = bearer                      # {user: set of tokens} accepted for XOAUTH2 / OAUTHBEARER
        self.stall_after: Optional[int] = None    # once this many messages are accepted, never answer a dot
        self.stalled = 0                          # final dots left unanswered since
        self.sasl: list[tuple[str, bytes, bool]] = []    # (mechanism, decoded client string, accepted?)
        self.after_error: list[bytes] = []        # what the client answered each error challenge with
        self.tls_options = None
        self.implicit_tls = False
        self.auth: dict = {}
        self._port = None
        self._connections: set = set()
        self._waiters: list[tuple[int, defer.Deferred]] = []

    def start(self, reactor, port: int = 0, interface: str = "127.0.0.1", tls_options=None,
              implicit_tls: bool = False, auth: Optional[dict] = None) -> int:
        """Listen; return the port number.  `auth`: {user: password} accepted for AUTH PLAIN / LOGIN."""
        self.tls_options, self.implicit_tls, self.auth = tls_options, implicit_tls, dict(auth or {})
        if self.offer_starttls is None:
            self.offer_starttls = tls_options is not None and not implicit_tls
        factory = protocol.Factory.forProtocol(self.protocol_class)
        factory.sink = self
        if implicit_tls:
            self._port = reactor.listenSSL(port, factory, tls_options, interface=interface)
        else:
            self._port = reactor.listenTCP(port, factory, interface=interface)
        return self._port.getHost().port

    def stop(self) -> defer.Deferred:
        """Stop listening and hang up on every open connection; fires when all of that is done."""
        waits = [defer.maybeDeferred(self._port.stopListening)] if self._port else []
        for connection in list(self._connections):
            waits.append(connection.lost)
            connection.transport.abortConnection()
        self._port = None
        return defer.gatherResults(waits)

    def release(self, hold: bool = False) -> None:
        """Send every held end-of-data reply; `hold`: keep holding the ones to come."""
        self.hold_data = hold
        held, self.held = self.held, []
        for proto, transaction in held:
            if proto.transport is not None and proto in self._connections:
                proto._finish_data(transaction)

    def wait_for(self, n: int) -> defer.Deferred:
        """Fires (with the accepted messages) once `n` messages have been accepted."""
        d = defer.Deferred()
        self._waiters.append((n, d))
        self._notify()
        return d

    def _accepted(self, transaction: Transaction) -> None:
        self.messages.append(transaction)
        self._notify()

    def _notify(self) -> None:
        ready = [(n, d) for n, d in self._waiters if len(self.messages) >= n]
        self._waiters = [w for w in self._waiters if w not in ready]
        for _, d in ready:
            d.callback(list(self.messages))


class SinkProtocol(basic.LineReceiver):
    MAX_LENGTH = 1 << 20

    def connectionMade(self) -> None:
        self.sink: Sink = self.factory.sink
        self.lost = defer.Deferred()
        self.sink._connections.add(self)
        self.sink.open_now += 1
        self.sink.max_at_once = max(self.sink.max_at_once, self.sink.open_now)
        self.session = Session(peer=getattr(self.transport.getPeer(), "host", ""))
        self.sink.sessions.append(self.session)
        self.tls = self.sink.implicit_tls
        self._reset_all()
        if self.sink.greetings and not self.sink.silent:
            greeting = self.sink.greetings.pop(0)
            self.reply(greeting)
            if not greeting.startswith("2"):
                self.transport.loseConnection()      # RFC 5321 3.8: a 421 greeting, then close
            return
        if not self.sink.silent:
            self.reply("220 %s ESMTP sink" % self.sink.hostname)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.sink._connections.discard(self)
        self.sink.open_now -= 1
        self.lost.callback(None)

    def reply(self, text: str) -> None:
        self.sendLine(text.encode("utf-8"))

    def _reset_all(self) -> None:
        self.helo, self.identity, self.in_data, self.login = "", None, False, None
        self._chunk_failed = False        # a BDAT chunk was refused: the rest up to LAST are too (RFC 3030 2)
        self.transaction: Optional[Transaction] = None

    def dataReceived(self, data: bytes) -> None:
        self.session.reads.append([])
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            return self._data_line(line)
        self.session.commands.append((self.tls, line))
        self.session.reads[-1].append(line)
        if self.sink.silent:
            return
        if self.login is not None:
            return self._login_step(line)
        verb, _, rest = line.decode("utf-8", "replace").partition(" ")
        handler = getattr(self, "smtp_" + verb.upper(), None)
        if handler is None:
            return self.reply("502 5.5.1 unknown command")
        handler(rest)

    def smtp_EHLO(self, rest: str) -> None:
        if self.sink.ehlo_reply:
            return self.reply(self.sink.ehlo_reply)
        self.helo = rest
        lines = [self.sink.hostname, *self.sink.extensions]
        if self.sink.offer_starttls and not self.tls:
            lines.append("STARTTLS")
        if self.sink.requiretls and self.tls:
            lines.append("REQUIRETLS")
        if self.sink.auth or self.sink.bearer is not None:
            # offered even in plaintext: clients must refuse on their own
            lines.append("AUTH PLAIN LOGIN" + (" XOAUTH2 OAUTHBEARER" if self.sink.bearer is not None else ""))
        for text in lines[:-1]:
            self.reply("250-" + text)
        self.reply("250 " + lines[-1])

    def smtp_HELO(self, rest: str) -> None:
        self.helo = rest
        self.reply("250 " + self.sink.hostname)

    def smtp_STARTTLS(self, rest: str) -> None:
        if not self.sink.offer_starttls or self.tls:
            return self.reply("502 5.5.1 STARTTLS not offered")
        self.reply("220 2.0.0 ready to start TLS")
        if self.sink.fail_tls:
            self.transport.write(b"this is not a TLS server hello\r\n" * 4)
            return self.transport.loseConnection()
        self.clearLineBuffer()
        self.transport.startTLS(self.sink.tls_options)
        self.tls = True
        self._reset_all()

    def smtp_AUTH(self, rest: str) -> None:
        mechanism, _, initial = rest.partition(" ")
        mechanism = mechanism.upper()
        self.sink.auth_attempts.append((self.tls, mechanism))
        if mechanism == "PLAIN" and initial:
            return self._check_plain(initial)
        if mechanism == "PLAIN":
            self.login = ["PLAIN"]
            return self.reply("334 ")
        if mechanism == "LOGIN":
            self.login = ["LOGIN"]
            return self.reply("334 VXNlcm5hbWU6")
        if mechanism in ("XOAUTH2", "OAUTHBEARER") and self.sink.bearer is not None:
            self.login = [mechanism]
            if initial:
                return self._bearer_step(initial.encode("ascii", "replace"))
            return self.reply("334 ")
        self.reply("504 5.5.4 unknown mechanism")

    def _bearer_step(self, line: bytes) -> None:
        mechanism = self.login[0]
        if len(self.login) == 2:                   # the client's answer to our error challenge
            self.login = None
            self.sink.after_error.append(line)
            return self.reply("535 5.7.8 Username and Password not accepted")
        try:
            raw = base64.b64decode(line, validate=True)
        except binascii.Error:
            self.login = None
            return self.reply("501 5.5.2 bad base64")
        user, token = _bearer_fields(mechanism, raw, self.transport.getHost().port)
        accepted = user is not None and token in self.sink.bearer.get(user, ())
        self.sink.sasl.append((mechanism, raw, accepted))
        if accepted:
            self.login, self.identity = None, user
            return self.reply("235 2.7.0 Accepted")
        self.login.append("error")
        problem = b'{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}'
        self.reply("334 " + base64.b64encode(problem).decode())

    def _peer_cn(self) -> Optional[str]:
        try:
            cert = self.transport.getPeerCertificate()
        except Exception:
            return None
        return None if cert is None else cert.get_subject().CN

    def _login_step(self, line: bytes) -> None:
        if self.login[0] in ("XOAUTH2", "OAUTHBEARER"):
            return self._bearer_step(line)
        if self.login[0] == "PLAIN":
            self.login = None
            return self._check_plain(line.decode("ascii", "replace"))
        self.login.append(line)
        if len(self.login) == 2:
            return self.reply("334 UGFzc3dvcmQ6")
        _, user, password = self.login
        self.login = None
        try:
            self._check(base64.b64decode(user).decode(), base64.b64decode(password).decode())
        except (binascii.Error, UnicodeDecodeError):
            self.reply("501 5.5.2 bad base64")

    def _check_plain(self, blob: str) -> None:
        try:
            _, user, password = base64.b64decode(blob).decode().split("\0")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return self.reply("501 5.5.2 bad PLAIN response")
        self._check(user, password)

    def _check(self, user: str, password: str) -> None:
        if self.sink.auth.get(user) == password:
            self.identity = user
            return self.reply("235 2.7.0 authenticated")
        self.reply("535 5.7.8 bad credentials")

    def _utf8_refused(self, path: str, params: list[str]) -> bool:
        """RFC 6531 3.5: a non-ASCII path needs SMTPUTF8 offered and given; 553 5.6.7 otherwise."""
        utf8 = "SMTPUTF8" in self.sink.extensions and any(p.upper() == "SMTPUTF8" for p in params)
        if path.isascii() or utf8:
            return False
        self.reply("553 5.6.7 non-ASCII address without SMTPUTF8")
        return True

    def smtp_MAIL(self, rest: str) -> None:
        path, params = _path_and_params(rest, "FROM:")
        if self._utf8_refused(path, params):
            return
        self.transaction = Transaction(helo=self.helo, mail_from=path, mail_params=params, tls=self.tls,
                                       auth_identity=self.identity,
                                       client_cert=self._peer_cn() if self.tls else None,
                                       mail_time=time.monotonic())
        self.sink.mail_times.append(self.transaction.mail_time)
        self.reply(self.sink.mail_reply)
        if not self.sink.mail_reply.startswith("2"):
            self.transaction = None

    def smtp_RCPT(self, rest: str) -> None:
        if self.transaction is None:
            return self.reply("503 5.5.1 MAIL first")
        path, params = _path_and_params(rest, "TO:")
        if self._utf8_refused(path, self.transaction.mail_params):
            return
        answer = self.sink.rcpt_replies.get(path.lower(), "250 2.1.5 OK")
        if isinstance(answer, list):
            answer = answer.pop(0) if answer else "250 2.1.5 OK"
        if answer.startswith("2"):
            self.transaction.rcpt_tos.append(path)
            self.transaction.rcpt_params[path] = params
        self.reply(answer)
        if answer.startswith("421"):
            self.transport.loseConnection()          # RFC 5321 3.8: 421 closes the channel

    def smtp_DATA(self, rest: str) -> None:
        if self.transaction is None or not self.transaction.rcpt_tos:
            return self.reply("503 5.5.1 no valid recipients")
        self.in_data, self._raw, self._lines = True, [], []
        self.reply("354 go ahead")

    def _data_line(self, line: bytes) -> None:
        self._raw.append(line + b"\r\n")
        if self.sink.drop_in_data is not None and len(self._raw) > self.sink.drop_in_data:
            return self.transport.abortConnection()
        if line != b".":
            self._lines.append(line[1:] if line.startswith(b".") else line)
            return
        transaction, self.transaction, self.in_data = self.transaction, None, False
        if self.sink.stall_after is not None and len(self.sink.messages) >= self.sink.stall_after:
            self.sink.stalled += 1
            return                                # the client waits for a reply that never comes
        transaction.data_raw = b"".join(self._raw)
        transaction.data = b"".join(line + b"\r\n" for line in self._lines)
        self._end_of_message(transaction)

    def _end_of_message(self, transaction: Transaction) -> None:
        """The reply to the end of DATA or to BDAT LAST (an LMTP sink sends one per recipient instead)."""
        transaction.reply = self.sink.data_replies.pop(0) if self.sink.data_replies else "250 2.0.0 queued"
        if self.sink.hold_data:
            self.sink.held.append((self, transaction))
            return
        self._finish_data(transaction)

    def _finish_data(self, transaction: Transaction) -> None:
        self.sink.transactions.append(transaction)
        self.reply(transaction.reply)
        if transaction.reply.startswith("2"):
            self.sink._accepted(transaction)
        elif transaction.reply.startswith("421"):
            self.transport.loseConnection()

    def smtp_BDAT(self, rest: str) -> None:
        # RFC 3030 2: exactly <size> octets follow the command line, whatever they are.
        words = rest.split()
        if not words or not words[0].isdigit() or len(words) > 2 or (len(words) == 2 and words[1].upper() != "LAST"):
            self.reply("501 5.5.4 BDAT size [LAST]")
            return self.transport.loseConnection()
        self._chunk_left, self._chunk_last, self._chunk = int(words[0]), len(words) == 2, []
        self.setRawMode()
        if not self._chunk_left:
            self.rawDataReceived(b"")

    def rawDataReceived(self, data: bytes) -> None:
        take, rest = data[:self._chunk_left], data[self._chunk_left:]
        self._chunk.append(take)
        self._chunk_left -= len(take)
        if self._chunk_left:
            return
        chunk, last = b"".join(self._chunk), self._chunk_last
        transaction = self.transaction
        if transaction is None or not transaction.rcpt_tos or self._chunk_failed:
            self._chunk_failed = not last
            if last:
                self.transaction = None
            self.reply("503 5.5.1 no valid recipients" if transaction is None or not transaction.rcpt_tos
                       else "554 5.5.0 transaction failed")
        else:
            transaction.chunks.append((len(chunk), last))
            transaction.data_raw += chunk
            transaction.data += chunk
            if last:
                self.transaction = None
                self._end_of_message(transaction)
            else:
                replies = self.sink.chunk_replies
                answer = replies.pop(0) if replies else "250 2.0.0 %d octets" % len(chunk)
                if not answer.startswith("2"):
                    self._chunk_failed = True
                self.reply(answer)
        self.setLineMode(rest)

    def smtp_RSET(self, rest: str) -> None:
        self.transaction, self._chunk_failed = None, False
        self.reply("250 2.0.0 OK")

    def smtp_NOOP(self, rest: str) -> None:
        self.reply("250 2.0.0 OK")

    def smtp_QUIT(self, rest: str) -> None:
        self.reply("221 2.0.0 bye")
        self.transport.loseConnection()


Sink.protocol_class = SinkProtocol


def _bearer_fields(mechanism: str, raw: bytes, port: int) -> tuple[Optional[str], Optional[str]]:
    """(user, token) from a well-formed client string, else (None, None): XOAUTH2 exactly
    "user=U^Aauth=Bearer T^A^A"; OAUTHBEARER "n,a=U,^Ahost=H^Aport=P^Aauth=Bearer T^A^A" (RFC 7628 3.1)
    with P this sink's port."""
    if not raw.endswith(b"\x01\x01"):
        return None, None
    parts = raw[:-2].split(b"\x01")
    if mechanism == "XOAUTH2":
        if len(parts) != 2 or not parts[0].startswith(b"user=") or not parts[1].startswith(b"auth=Bearer "):
            return None, None
        return parts[0][5:].decode(), parts[1][12:].decode()
    if len(parts) != 4 or not parts[0].startswith(b"n,a=") or not parts[0].endswith(b","):
        return None, None
    fields = dict(p.split(b"=", 1) for p in parts[1:] if b"=" in p)
    if not fields.get(b"host") or fields.get(b"port") != str(port).encode() or \
            not fields.get(b"auth", b"").startswith(b"Bearer "):
        return None, None
    user = parts[0][4:-1].decode().replace("=2C", ",").replace("=3D", "=")
    return user, fields[b"auth"][7:].decode()


def _path_and_params(rest: str, prefix: str) -> tuple[str, list[str]]:
    """"FROM:<a@b> SIZE=1" -> ("a@b", ["SIZE=1"])."""
    if rest.upper().startswith(prefix):
        rest = rest[len(prefix):]
    path, _, params = rest.strip().partition(">")
    return path.lstrip("<"), params.split()


def mails(session) -> int:
    return sum(1 for _, line in session.commands if line.startswith(b"MAIL FROM"))


def verbs(session) -> list[bytes]:
    return [line.split(b" ")[0].upper() for _, line in session.commands]
