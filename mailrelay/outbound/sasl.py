# -*- test-case-name: tests.test_sasl, tests.test_oauth2, tests.test_delivery_client -*-
"""The SASL side of the delivery client's AUTH (RFC 4954): what to send for each mechanism we speak.

Journey: the next hop (smarthost.SmarthostTransport) puts a login into job.SessionParams; once the
session is past EHLO over TLS, client.DeliveryClient asks it to `start` an `Exchange` among the
mechanisms the server offers, sends the exchange's `command`, and answers every 334 with
`respond(challenge)` until a 235 (or a refusal).  In: a user name and a password, or a user name and an
OAuth2 bearer token.  Out: AUTH command lines, and `rejected` telling the transport that the server
refused the credentials with 535 (a token then gets fetched again).

Mechanisms:
- PLAIN (RFC 4616, initial response) and LOGIN (draft-murchison-sasl-login): `PasswordLogin`.
- XOAUTH2 (Google's and Microsoft's definition): base64("user=" U ^A "auth=Bearer " T ^A ^A).  After a
  failure the server sends a 334 with a JSON error; the client answers with an empty line, then 535.
- OAUTHBEARER (RFC 7628 3.1): base64(gs2-header "n,a=U," ^A "host=H" ^A "port=P" ^A "auth=Bearer T"
  ^A ^A).  After a failure, 334 with a JSON error; the client answers with a single ^A (RFC 7628 3.2.3).
Both bearer mechanisms are sent without an initial response ("AUTH XOAUTH2", then the blob after the
server's empty 334): that is the exchange Microsoft documents, and it keeps a 2 KiB token off the
command line, whose limit is 512 octets (RFC 5321 4.5.3.1.4).
"""
from __future__ import annotations

import base64
from typing import Any, Optional

from mailrelay.queue.results import printable

OAUTH_MECHANISMS = {"xoauth2": b"XOAUTH2", "oauthbearer": b"OAUTHBEARER"}


class Exchange:
    """One AUTH exchange on one connection: `command` opens it, `respond` answers each 334 in turn."""

    def __init__(self, mechanism: bytes, command: bytes, responses: list[bytes], secrets: list[bytes],
                 login: Any = None):
        self.mechanism, self.command = mechanism, command
        self._responses = list(responses)
        self._secrets = [s for s in secrets if s]
        self._login = login

    def respond(self, challenge: bytes) -> Optional[bytes]:
        """The line answering a 334 with `challenge` (base64 text), or None: no more are expected."""
        return self._responses.pop(0) if self._responses else None

    def scrub(self, text: bytes) -> bytes:
        """`text` with any of our secrets replaced: a server echoing them must not put them in a log or DSN."""
        for secret in self._secrets:
            text = text.replace(secret, b"[secret]")
        return text

    def refused(self, code: int) -> None:
        if code == 535 and self._login is not None:       # RFC 4954 6: credentials invalid
            self._login.rejected = True


class PasswordLogin:
    """AUTH PLAIN (preferred) or LOGIN with a user name and password."""

    wanted = "PLAIN or LOGIN"

    def __init__(self, username: str, password: bytes):
        self.username, self._password = username, password
        self.rejected = False

    def __repr__(self) -> str:
        return f"<PasswordLogin {self.username}>"

    def start(self, offered: list[bytes]) -> Optional[Exchange]:
        user = self.username.encode("utf-8")
        if b"PLAIN" in offered:
            blob = base64.b64encode(b"\0" + user + b"\0" + self._password)
            return Exchange(b"PLAIN", b"AUTH PLAIN " + blob, [], [blob], self)
        if b"LOGIN" in offered:
            steps = [base64.b64encode(user), base64.b64encode(self._password)]
            return Exchange(b"LOGIN", b"AUTH LOGIN", steps, steps[1:], self)
        return None


def xoauth2_response(username: str, token: bytes) -> bytes:
    """The XOAUTH2 initial client response, before base64."""
    return b"user=" + username.encode("utf-8") + b"\x01auth=Bearer " + token + b"\x01\x01"


def oauthbearer_response(username: str, token: bytes, host: str, port: int) -> bytes:
    """The OAUTHBEARER initial client response (RFC 7628 3.1), before base64.  The authzid is the
    user name, with "=" and "," escaped as RFC 5801 4 asks of a gs2 saslname."""
    saslname = username.replace("=", "=3D").replace(",", "=2C").encode("utf-8")
    return (b"n,a=" + saslname + b",\x01host=" + host.encode("ascii", "replace") + b"\x01port=%d" % port
            + b"\x01auth=Bearer " + token + b"\x01\x01")


class BearerLogin:
    """AUTH XOAUTH2 or OAUTHBEARER with an OAuth2 access token (`kind`: "xoauth2" | "oauthbearer").
    `rejected` turns true when the server answers 535: the token is then no good."""

    def __init__(self, kind: str, username: str, token: bytes, host: str, port: int):
        self.kind, self.username = kind, username
        self._token, self._host, self._port = token, host, port
        self.mechanism = OAUTH_MECHANISMS[kind]
        self.wanted = self.mechanism.decode()
        self.rejected = False

    def __repr__(self) -> str:
        return f"<BearerLogin {self.wanted} {self.username}>"

    def start(self, offered: list[bytes]) -> Optional[Exchange]:
        if self.mechanism not in offered:
            return None
        if self.kind == "xoauth2":
            raw = xoauth2_response(self.username, self._token)
            after_error = b""                # Google and Microsoft: an empty response ends a failed exchange
        else:
            raw = oauthbearer_response(self.username, self._token, self._host, self._port)
            after_error = base64.b64encode(b"\x01")     # RFC 7628 3.2.3: a single %x01
        blob = base64.b64encode(raw)
        return Exchange(self.mechanism, b"AUTH " + self.mechanism, [blob, after_error], [blob, self._token], self)


class LoginFailed(Exception):
    """AUTH cannot even start: `failure` is the (code, status, text) every recipient of the session gets."""

    def __init__(self, code: int, status: str, text: str):
        super().__init__(text)
        self.failure = (code, status, text)


class ClientLogin:
    """The AUTH exchange of one outgoing session (RFC 4954), apart from the protocol that sends its lines:
    which mechanism, each response, and what a refusal may show.  `login`: a PasswordLogin or BearerLogin,
    or None when the session logs in to nobody; `host`: the server's name for messages."""

    def __init__(self, login, host: str):
        self.wanted = login is not None
        self._login, self.host = login, host
        self._exchange: Optional[Exchange] = None

    def begin(self, offered: bytes, tls_active: bool) -> bytes:
        """The AUTH command for the server's `AUTH` keyword value; LoginFailed when it must not be sent."""
        if not tls_active:
            # RFC 4954 4 / RFC 8314: a password is never sent in plaintext, whatever the server offers.
            raise LoginFailed(451, "4.7.11", f"not sending credentials to {self.host} without TLS")
        self._exchange = self._login.start(offered.upper().split())
        if self._exchange is None:
            raise LoginFailed(451, "4.7.0", f"{self.host} offers no AUTH mechanism we use "
                              f"(we use {self._login.wanted}; offered: {printable(offered or b'none')})")
        return self._exchange.command

    def respond(self, challenge: bytes) -> bytes:
        """The answer to a 334 challenge; LoginFailed (421) when the mechanism has none."""
        assert self._exchange is not None       # a 334 answers the AUTH command begin() returned
        response = self._exchange.respond(challenge)
        if response is None:
            raise LoginFailed(421, "4.7.0", f"{self.host} sent an AUTH challenge "
                              f"{self._exchange.mechanism.decode()} has no answer for")
        return response

    def succeeded(self) -> None:
        self._exchange = None

    def refused(self, code: int, text: bytes) -> bytes:
        """The server's refusal, told to the mechanism (a token refused is a token renewed), with any
        secret scrubbed from the text that goes on to logs and DSNs."""
        exchange, self._exchange = self._exchange, None
        assert exchange is not None       # the refusal answers the AUTH command begin() returned
        exchange.refused(code)
        return exchange.scrub(text)
