# -*- test-case-name: tests.test_server_network, tests.test_server_session -*-
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

`AuthMixin` is one part of `RelaySession` (session.py); it uses the session's state (`_tls_on`,
`_helo`, `_user`, `_user_folded`, `_mail`, `_auth`, `_mechanism`, `_logout`, `_ip`, `_ip_key`, `_timers`,
`_clock`, `_limits`,
`factory`, `hostname`) and its helpers (`_send`, `_reply`, `_count`, `_set_busy`, `_close`,
`_log`, `_log_unexpected`).
"""
from __future__ import annotations

import binascii
from typing import Optional

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer

from mailrelay.interfaces import Reply
from mailrelay.server.realm import IRelayUser

MAX_AUTH_LINE = 12288 - 2         # AUTH lines may be longer (RFC 4954 4)
AUTH_FAILURE_DELAY = 1.0          # seconds before each 535: slows down password guessing


class AuthMixin:
    """The AUTH command and the exchange that follows it, for RelaySession."""

    def ext_AUTH(self, rest: str) -> None:
        """AUTH mechanism [initial-response]: refused, answered with a 334 prompt, or checked at once."""
        refusal = self._auth_refusal()
        if refusal is not None:
            self._reply(refusal)
            return
        if self.factory.auth_failures.exhausted(self._ip_key):
            self._too_many_failures()
            return
        words = rest.split()
        if not words or len(words) > 2:
            self._send(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = words[0].upper()
        if mechanism not in self.factory.mechanisms:
            self._send(504, "5.5.4", "Unrecognized authentication type")
            return
        self._auth = (mechanism,)
        self._mechanism = mechanism
        if len(words) == 2:
            self._auth_response(words[1])
        else:
            self._write(b"334 " + (b"VXNlcm5hbWU6" if mechanism == "LOGIN" else b"") + b"\r\n")

    def _auth_refusal(self) -> Optional[Reply]:
        if not self._tls_on:
            # RFC 4954 4 / RFC 3207: plaintext passwords are never accepted outside TLS.
            return Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
        if self.factory.portal is None or not self.factory.mechanisms:
            return Reply(502, "5.5.1", "AUTH not available")
        if self._helo is None:
            return Reply(503, "5.5.1", "Send EHLO first")
        if self._user is not None:
            return Reply(503, "5.5.1", "Already authenticated")
        if self._mail is not None:
            return Reply(503, "5.5.1", "AUTH not permitted during a mail transaction")  # RFC 4954 4
        return None

    def _auth_response(self, text: str) -> None:
        """One client response in an AUTH exchange (initial response or a 334 continuation)."""
        if text == "*":
            self._auth = None
            self._send(501, "5.7.0", "Authentication cancelled")     # RFC 4954 4
            return
        decoded = _decode_b64(text)
        if decoded is None:
            self._auth = None
            self._send(501, "5.5.2", "Cannot decode AUTH response")
            return
        mechanism = self._auth[0]
        if mechanism == "LOGIN" and len(self._auth) == 1:
            self._auth = (mechanism, decoded)
            self._write(b"334 UGFzc3dvcmQ6\r\n")
            return
        credentials = _login_credentials(self._auth, decoded)
        self._auth = None
        if credentials is None:
            self._send(501, "5.5.2", "Malformed AUTH response")
            return
        self._check_credentials(*credentials)

    def _check_credentials(self, user: bytes, password: bytes) -> None:
        # Counted when the check starts, not when it fails: otherwise N connections in parallel (or one
        # pipelining) each get a guess checked before any failure is recorded (CWE-307, CWE-362).
        count = self.factory.auth_failures.record(self._ip_key)
        self._set_busy(True)
        if isinstance(count, defer.Deferred):
            # Counted in Redis for every relay (cluster.shared), within its bounded wait.
            count.addCallback(self._attempt_counted, user, password)
            count.addErrback(self._log_unexpected)
            return
        self._attempt_counted(count, user, password)

    def _attempt_counted(self, count: int, user: bytes, password: bytes) -> None:
        if self.factory.auth_failures.over_limit(count):
            self._count("auth", "failure", self._mechanism)
            self._log.info("AUTH from {ip} refused unchecked: {count} attempts in the last minute",
                           ip=self._ip, count=count)
            self._too_many_failures()
            return
        d = defer.maybeDeferred(self.factory.portal.login, UsernamePassword(user, password), None, IRelayUser)
        name = user.decode("utf-8", "replace")
        d.addCallbacks(self._auth_succeeded, self._auth_failed, errbackArgs=(name,))
        d.addErrback(self._log_unexpected)

    def _auth_succeeded(self, result) -> None:
        _, avatar, logout = result
        self._user, self._logout = avatar.name, logout
        self._user_folded = bool(getattr(avatar, "folded", False))
        # A good password refunds its attempt: users behind one NAT address are not locked out by
        # their own logins.  Failures and undecided checks (454) stay counted.
        self.factory.auth_failures.refund(self._ip_key)
        self._count("auth", "success", self._mechanism)
        self._send(235, "2.7.0", "Authentication successful")
        self._set_busy(False)

    def _auth_failed(self, failure, name: str) -> None:
        if not failure.check(UnauthorizedLogin):
            # realm.TemporaryAuthFailure, a directory timeout, a bug: the client may try later.
            self._log.warn("AUTH for {user!r} from {ip} could not be checked: {error}",
                           user=name, ip=self._ip, error=failure.type.__name__)
            self._count("auth", "temporary", self._mechanism)
            self._send(454, "4.7.0", "Temporary authentication failure")
            self._set_busy(False)
            return
        self._count("auth", "failure", self._mechanism)
        count = self.factory.auth_failures.count(self._ip_key)
        self._log.info("AUTH failed for {user!r} from {ip} ({count} attempts in the last minute)", user=name,
                       ip=self._ip, count=count)
        self._timers["auth"] = self._clock.callLater(AUTH_FAILURE_DELAY, self._auth_refused)

    def _auth_refused(self) -> None:
        self._timers.pop("auth", None)
        self._send(535, "5.7.8", "Authentication credentials invalid")
        self._set_busy(False)

    def _too_many_failures(self) -> None:
        self._send(421, "4.7.0", f"{self.hostname} Too many authentication failures, closing connection")
        self._close()


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
