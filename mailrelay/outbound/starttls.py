# -*- test-case-name: tests.test_starttls, tests.test_delivery_client, tests.test_tls_policy -*-
"""The TLS side of one outgoing SMTP connection, apart from the protocol that sends its lines: whether to
ask for STARTTLS after EHLO, starting TLS on the transport, judging the peer once the handshake completes
(the TLS policies of direct delivery: outbound.tlsverify's checks for DANE, MTA-STS and `tls = "verify"`),
and what the session learned on the way — the negotiated TLS, the policy's verdict, a failed handshake,
a server without STARTTLS — which results.SessionResult carries.

Journey: outbound.client.DeliveryClient owns one `StartTLS` per connection, as it owns a sasl.ClientLogin
for AUTH.  In: the session's security mode and TLS options (job.SessionParams.security / tls_options), the
server's name for messages, its EHLO extensions and the transport.  Out: what the client does next (send
STARTTLS, or go on), or `TLSFailed` carrying the (code, status, text) that ends the session.

RFC 3207 (STARTTLS: a 454 lets an opportunistic client go on in plaintext; everything learned before TLS
is forgotten and EHLO is sent again), RFC 7672 2.2 and RFC 8461 4.2 (the peer is judged before the EHLO
reply is read, so before MAIL FROM; a failure under an enforcing policy ends the session with 4.7.5).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, cast

from twisted.internet.interfaces import ISSLTransport, ISystemHandle, ITLSTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol

from mailrelay.queue.results import printable
from mailrelay.outbound.tlsinfo import Negotiated, judged, negotiated
from mailrelay.interfaces import ITLSPeerCheck

if TYPE_CHECKING:
    from mailrelay.outbound.tlsverify import Verdict


class TLSFailed(Exception):
    """The session cannot go on as its TLS setting asks: `failure` is the (code, status, text) every
    unsettled recipient gets."""

    def __init__(self, code: int, status: str, text: str):
        super().__init__(text)
        self.failure = (code, status, text)


class StartTLS:
    """The TLS state of one connection.  `security`: "none", "opportunistic", "starttls" or "tls";
    `options`: the client TLS options (an ITLSPeerCheck when a policy judges the peer), or None; `host`:
    the server's name for messages (the client sets it again once it knows the peer's address).

    What it found: `active` (the connection is TLS, or STARTTLS was answered 220), `negotiated` (a
    tlsinfo.Negotiated once the handshake is done, else None), `verdict` (the policy's judgement, if
    any), `failed` (the handshake failed or could not start), `missing` (TLS was wanted but the server
    did not offer STARTTLS)."""

    def __init__(self, security: str, options: Any, host: str):
        self.security, self.options, self.host = security, options, host
        self.active = self.failed = self.missing = False
        self._pending = False          # a handshake began and no byte has come through it yet
        self.negotiated: Optional[Negotiated] = None
        self.verdict: Optional[Verdict] = None

    @property
    def tls_verified_by(self) -> Optional[str]:
        """ITLSVerification.tls_verified_by: what authenticated the peer, once the handshake is done."""
        return self.negotiated.tls_verified_by if self.negotiated is not None else None

    @property
    def protection(self) -> Optional[Negotiated]:
        """What protects the session now (offer.refusal's `tls`): the negotiated TLS, None in plaintext."""
        return self.negotiated if self.active else None

    def connected(self, transport: object) -> None:
        """The connection is made: implicit TLS is under way, or it is plain; TLSFailed when implicit TLS
        was asked for and the connection is plain."""
        # Trust the transport, not the setting: credentials must never follow a mis-wired plain socket.
        self.active = ISSLTransport.providedBy(transport) or isinstance(transport, TLSMemoryBIOProtocol)
        self._pending = self.active      # implicit TLS: the handshake is under way
        if self.security == "tls" and not self.active:
            raise TLSFailed(421, "4.7.5", f"implicit TLS to {self.host} requested, but the connection is plain")

    def heard(self) -> None:
        """A reply line arrived: bytes after a handshake began can only have come through TLS."""
        self._pending = False

    def wanted(self, extensions: dict[bytes, bytes]) -> bool:
        """After each EHLO: True to send STARTTLS now; False to go on (TLS already, not asked for, or not
        offered to an opportunistic client); TLSFailed when TLS is required and not offered."""
        if self.active or self.security not in ("opportunistic", "starttls") or self.options is None:
            return False
        if b"STARTTLS" in extensions:
            return True
        self.missing = True
        if self.security == "opportunistic":
            return False
        status, text = "4.7.4", f"TLS is required, but {self.host} does not offer STARTTLS"
        if ITLSPeerCheck.providedBy(self.options):
            status, text = self.options.without_starttls(self.host)
        raise TLSFailed(451, status, text)

    def refusal_ends_session(self, code: int) -> bool:
        """A refused STARTTLS: whether the session ends (TLS required, or 421) rather than going on in
        plaintext (RFC 3207 4: a 454 lets an opportunistic client do that)."""
        return self.security == "starttls" or code == 421

    def start(self, transport: ITLSTransport) -> None:
        """STARTTLS was answered 220: start the handshake; TLSFailed when it cannot even start."""
        self.active = self._pending = True
        try:
            transport.startTLS(self.options)
        except Exception as e:
            self.failed = True
            raise TLSFailed(421, "4.7.5", f"cannot start TLS with {self.host}: {printable(str(e).encode())}") from e

    def handshake_completed(self, transport: ITLSTransport) -> None:
        """The handshake is done: note what it negotiated and judge the peer; TLSFailed when an enforcing
        policy's check fails."""
        self._pending = False
        self.negotiated = negotiated(transport)
        options = self.options
        if ITLSPeerCheck.providedBy(options):
            # RFC 7672 2.2 / RFC 8461 4.2: the peer is judged now, before the EHLO reply is read and
            # long before MAIL FROM; a failure under an enforcing policy ends the session here.
            # A TLS transport (TLSMemoryBIOProtocol, or TCP after startTLS) is a system handle: its OpenSSL connection.
            self.verdict = options.check(cast(ISystemHandle, transport).getHandle())      # never raises
            self.negotiated = judged(self.negotiated, self.verdict)
            if not self.verdict.ok and self.verdict.enforce:
                raise TLSFailed(421, "4.7.5", options.refusal(self.host, self.verdict))

    def lost(self, why: str) -> Optional[tuple[int, str, str]]:
        """The connection was lost (`why`): the failure to report when a handshake was under way, else None."""
        if not self._pending:
            return None
        # The handshake (certificate or host name check included) did not complete: RFC 3207 says
        # nothing was agreed; an opportunistic caller may retry in plaintext, a required one may not.
        self.failed = True
        return 421, "4.7.5", f"TLS handshake with {self.host} failed: {why}"
