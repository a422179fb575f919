# -*- test-case-name: tests.test_server_parts, tests.test_server_network, tests.test_server_session -*-
"""The AUTH exchange of a server session (RFC 4954): mechanisms PLAIN and LOGIN, only under TLS.

Its job in the message's journey: before MAIL, turn a client's AUTH command and its 334 responses into
one portal login, so the policy knows who is sending.  In: the AUTH command line and each response
line (base64, "*" to cancel), handed over by the session.  Out: 334 challenges, then 235 2.7.0 with
the session's user set, 535 5.7.8 after a delay (AUTH_FAILURE_DELAY), 454 4.7.0 when the check could
not be made, or 421 4.7.0 and a closed connection when the address has failed too often.

Implements RFC 4954 §4 (AUTH command, "*" cancels, "=" is an empty response, never before TLS —
also RFC 3207 and RFC 8314 — and never during a transaction), RFC 4616 (PLAIN: authzid, authcid,
password) and the LOGIN mechanism's two prompts.  Passwords and AUTH blobs never reach a log line.

Brute force: `auth_failures_per_minute` bounds the checks started per client IP (IPv6 per /64) in a
minute, on all listeners together.  An attempt is counted when its check starts; beyond the limit the
client gets 421 4.7.0 without a check.  A success refunds its attempt; a failure or an undecided check
(454) does not.

`Authenticator` is a collaborator of the protocol (session.py), one per connection.  It reads and
writes the connection's state (state.Connection: TLS, HELO, the user it sets), looks at the
transaction's (state.Transaction: AUTH is refused inside one) and answers through the session's
ISessionChannel (replies.py); the factory gives it the portal, the mechanisms and the attempt window.
"""
from __future__ import annotations

import binascii
from typing import Callable, Optional

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer

from mailrelay.interfaces import Reply
from mailrelay.logger import Logger
from mailrelay.server import replies
from mailrelay.server.realm import IRelayUser
from mailrelay.server.replies import LOCAL_ERROR, SESSION_LOG_NAMESPACE, ISessionChannel
from mailrelay.server.state import Connection, Transaction

MAX_AUTH_LINE = 12288 - 2         # AUTH lines may be longer (RFC 4954 4)
AUTH_FAILURE_DELAY = 1.0          # seconds before each 535: slows down password guessing

log = Logger(namespace=SESSION_LOG_NAMESPACE)


class Authenticator:
    """The AUTH command and the exchange that follows it, for one session."""

    def __init__(self, factory, connection: Connection, transaction: Transaction, channel: ISessionChannel,
                 clock) -> None:
        self._factory = factory
        self._connection = connection
        self._transaction = transaction
        self._channel = channel
        self._clock = clock
        self._exchange: Optional[tuple] = None   # (mechanism,) or LOGIN's (mechanism, user) while under way
        self._logout: Optional[Callable[[], None]] = None
        self._delay = None                       # the pending 535 (AUTH_FAILURE_DELAY)

    @property
    def in_progress(self) -> bool:
        """An exchange is under way: the next line is a response to a 334, not a command."""
        return self._exchange is not None

    def cancel(self) -> None:
        """Forget an exchange under way (a line too long, an error, STARTTLS, shutdown)."""
        self._exchange = None

    def connection_lost(self) -> None:
        """No 535 is sent any more; the portal's logout runs once."""
        delay, self._delay = self._delay, None
        if delay is not None and delay.active():
            delay.cancel()
        logout, self._logout = self._logout, None
        if logout is not None:
            logout()

    def command(self, rest: str) -> None:
        """AUTH mechanism [initial-response]: refused, answered with a 334 prompt, or checked at once."""
        refusal = self._refusal()
        if refusal is not None:
            self._channel.reply(refusal)
            return
        factory = self._factory
        if factory.auth_failures.exhausted(self._connection.key):
            self._too_many_failures()
            return
        words = rest.split()
        if not words or len(words) > 2:
            self._channel.send(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = words[0].upper()
        if mechanism not in factory.mechanisms:
            self._channel.send(504, "5.5.4", "Unrecognized authentication type")
            return
        self._exchange = (mechanism,)
        self._connection.mechanism = mechanism
        if len(words) == 2:
            self.response(words[1])
        else:
            self._channel.write(b"334 " + (b"VXNlcm5hbWU6" if mechanism == "LOGIN" else b"") + b"\r\n")

    def _refusal(self) -> Optional[Reply]:
        connection = self._connection
        if not connection.tls:
            # RFC 4954 4 / RFC 3207: plaintext passwords are never accepted outside TLS.
            return Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
        if self._factory.portal is None or not self._factory.mechanisms:
            return Reply(502, "5.5.1", "AUTH not available")
        if connection.helo is None:
            return Reply(503, "5.5.1", "Send EHLO first")
        if connection.user is not None:
            return Reply(503, "5.5.1", "Already authenticated")
        if self._transaction.open:
            return Reply(503, "5.5.1", "AUTH not permitted during a mail transaction")  # RFC 4954 4
        return None

    def response(self, text: str) -> None:
        """One client response in an AUTH exchange (initial response or a 334 continuation)."""
        if text == "*":
            self._exchange = None
            self._channel.send(501, "5.7.0", "Authentication cancelled")     # RFC 4954 4
            return
        decoded = _decode_b64(text)
        if decoded is None:
            self._exchange = None
            self._channel.send(501, "5.5.2", "Cannot decode AUTH response")
            return
        exchange = self._exchange
        assert exchange is not None     # a response comes only in an exchange command() began (in_progress)
        mechanism = exchange[0]
        if mechanism == "LOGIN" and len(exchange) == 1:
            self._exchange = (mechanism, decoded)
            self._channel.write(b"334 UGFzc3dvcmQ6\r\n")
            return
        credentials = _login_credentials(exchange, decoded)
        self._exchange = None
        if credentials is None:
            self._channel.send(501, "5.5.2", "Malformed AUTH response")
            return
        self._check_credentials(*credentials)

    def _check_credentials(self, user: bytes, password: bytes) -> None:
        # Counted when the check starts, not when it fails: otherwise N connections in parallel (or one
        # pipelining) each get a guess checked before any failure is recorded (CWE-307, CWE-362).
        count = self._factory.auth_failures.record(self._connection.key)
        self._channel.hold()
        if isinstance(count, defer.Deferred):
            # Counted in Redis for every relay (cluster.shared), within its bounded wait.
            count.addCallback(self._attempt_counted, user, password)
            count.addErrback(self._unexpected)
            return
        self._attempt_counted(count, user, password)

    def _attempt_counted(self, count: int, user: bytes, password: bytes) -> None:
        factory = self._factory
        if factory.auth_failures.over_limit(count):
            replies.count(factory.metrics, "auth", "failure", self._connection.mechanism)
            log.info("AUTH from {ip} refused unchecked: {count} attempts in the last minute",
                     ip=self._connection.address, count=count)
            self._too_many_failures()
            return
        d = defer.maybeDeferred(factory.portal.login, UsernamePassword(user, password), None, IRelayUser)
        name = user.decode("utf-8", "replace")
        d.addCallbacks(self._succeeded, self._failed, errbackArgs=(name,))
        d.addErrback(self._unexpected)

    def _succeeded(self, result) -> None:
        _, avatar, logout = result
        connection = self._connection
        connection.user, self._logout = avatar.name, logout
        connection.user_folded = bool(avatar.folded)            # IRelayUser declares it
        # A good password refunds its attempt: users behind one NAT address are not locked out by
        # their own logins.  Failures and undecided checks (454) stay counted.
        self._factory.auth_failures.refund(connection.key)
        replies.count(self._factory.metrics, "auth", "success", connection.mechanism)
        self._channel.send(235, "2.7.0", "Authentication successful")
        self._channel.release()

    def _failed(self, failure, name: str) -> None:
        connection, metrics = self._connection, self._factory.metrics
        if not failure.check(UnauthorizedLogin):
            # realm.TemporaryAuthFailure, a directory timeout, a bug: the client may try later.
            log.warn("AUTH for {user!r} from {ip} could not be checked: {error}",
                     user=name, ip=connection.address, error=failure.type.__name__)
            replies.count(metrics, "auth", "temporary", connection.mechanism)
            self._channel.send(454, "4.7.0", "Temporary authentication failure")
            self._channel.release()
            return
        replies.count(metrics, "auth", "failure", connection.mechanism)
        count = self._factory.auth_failures.count(connection.key)
        log.info("AUTH failed for {user!r} from {ip} ({count} attempts in the last minute)", user=name,
                 ip=connection.address, count=count)
        self._delay = self._clock.callLater(AUTH_FAILURE_DELAY, self._refused)

    def _refused(self) -> None:
        self._delay = None
        self._channel.send(535, "5.7.8", "Authentication credentials invalid")
        self._channel.release()

    def _too_many_failures(self) -> None:
        self._channel.send(421, "4.7.0",
                           f"{self._factory.hostname} Too many authentication failures, closing connection")
        self._channel.close()

    def _unexpected(self, failure) -> None:
        log.failure("unexpected error in {ip}'s session", failure, ip=self._connection.address)
        self._channel.reply(LOCAL_ERROR)
        self._channel.release()


def _decode_b64(text: str) -> Optional[bytes]:
    """Strict base64 (RFC 4954 4: "=" alone is an empty response); None when malformed."""
    if text == "=":
        return b""
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None


def _login_credentials(state: tuple, decoded: bytes) -> Optional[tuple[bytes, bytes]]:
    """(user, password) from a finished PLAIN or LOGIN exchange, or None when malformed."""
    if state[0] == "LOGIN":
        user, password = state[1], decoded
    else:
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            return None
        authzid, user, password = parts
        if authzid and authzid != user:
            return None             # acting for another identity is not supported
    if not user or not password:
        return None
    try:
        user.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return user, password
