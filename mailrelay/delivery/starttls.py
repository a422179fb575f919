# -*- test-case-name: tests.test_delivery_client, tests.test_tls_policy, tests.test_connection_cache -*-
"""The STARTTLS steps of the outgoing ESMTP client (delivery.client.DeliveryClient): asking for TLS after
EHLO, starting it, and judging the peer when the handshake completes (the TLS policies of direct
delivery: delivery.tlsverify's checks for DANE, MTA-STS and `tls = "verify"`).

RFC 3207 (STARTTLS: 454 lets an opportunistic client go on in plaintext; everything learned before TLS
is forgotten and EHLO is sent again), RFC 7672 2.2 and RFC 8461 4.2 (the peer is judged before the EHLO
reply is read, so before MAIL FROM; a failure under an enforcing policy ends the session with 4.7.5).
Kept apart from the client's transaction logic; it works on the client's own state.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, cast

from twisted.internet.interfaces import ISystemHandle, ITLSTransport

from mailrelay.delivery.results import printable
from mailrelay.delivery.tlsinfo import Negotiated, judged, negotiated
from mailrelay.interfaces import ITLSPeerCheck

if TYPE_CHECKING:
    from mailrelay.delivery.job import SessionParams
    from mailrelay.delivery.tlsverify import Verdict


class StartTLSSteps:
    """Methods of DeliveryClient: `_maybe_starttls` after each EHLO, `handshakeCompleted` (Twisted's
    IHandshakeListener), `tls_verified_by` (ITLSVerification)."""

    # The client state these steps work on; DeliveryClient sets all of it in __init__ / _begin.
    transport: ITLSTransport        # TCP, maybe TLS already (makeConnection sets it before any reply)
    params: SessionParams
    _host: str
    _extensions: dict[bytes, bytes]
    _tls: Optional[Negotiated]
    _tls_active: bool
    _tls_pending: bool
    _tls_failed: bool
    _verdict: Optional[Verdict]
    _starttls_missing: bool
    _failure: Optional[tuple[int, str, str]]

    if TYPE_CHECKING:   # DeliveryClient's (and LineReceiver's) methods the steps call
        def _abort(self, code: int, status: str, text: str) -> None: ...
        def _quit(self) -> None: ...
        def _ehlo(self) -> None: ...
        def _maybe_auth(self) -> None: ...
        def _fail_from_reply(self, code: int, text: bytes, context: str) -> None: ...
        def _send(self, line: bytes, command: str, codes, on_ok: Callable,
                  on_fail: Optional[Callable] = None) -> None: ...
        def clearLineBuffer(self) -> bytes: ...

    @property
    def tls_verified_by(self) -> Optional[str]:
        return self._tls.tls_verified_by if self._tls is not None else None

    def handshakeCompleted(self) -> None:
        self._tls_pending = False
        self._tls = negotiated(self.transport)
        options = self.params.tls_options
        if ITLSPeerCheck.providedBy(options):
            # RFC 7672 2.2 / RFC 8461 4.2: the peer is judged now, before the EHLO reply is read and
            # long before MAIL FROM; a failure under an enforcing policy ends the session here.
            # A TLS transport (TLSMemoryBIOProtocol, or TCP after startTLS) is a system handle: its OpenSSL connection.
            handle = cast(ISystemHandle, self.transport).getHandle()
            self._verdict = options.check(handle)      # never raises
            self._tls = judged(self._tls, self._verdict)
            if not self._verdict.ok and self._verdict.enforce:
                self._abort(421, "4.7.5", options.refusal(self._host, self._verdict))

    def _maybe_starttls(self) -> None:
        wanted = self.params.security in ("opportunistic", "starttls") and self.params.tls_options is not None
        if self._tls_active or not wanted:
            return self._maybe_auth()
        if b"STARTTLS" in self._extensions:
            return self._send(b"STARTTLS", "STARTTLS", (220,), self._on_starttls, self._on_starttls_refused)
        if self.params.security == "starttls":
            self._starttls_missing = True
            status, text = "4.7.4", f"TLS is required, but {self._host} does not offer STARTTLS"
            if ITLSPeerCheck.providedBy(self.params.tls_options):
                status, text = self.params.tls_options.without_starttls(self._host)
            self._failure = (451, status, text)
            return self._quit()
        self._starttls_missing = True
        self._maybe_auth()

    def _on_starttls_refused(self, code: int, text: bytes) -> None:
        if self.params.security == "starttls" or code == 421:
            return self._fail_from_reply(code, text, "STARTTLS")
        self._maybe_auth()      # RFC 3207 4: a 454 lets an opportunistic client go on in plaintext

    def _on_starttls(self, code: int, text: bytes) -> None:
        # CVE-2011-0411 class: plaintext the server pipelined behind its 220 must not be read as if it came
        # through TLS; and RFC 3207 4.2: forget everything learned before TLS, EHLO again.
        self.clearLineBuffer()
        self._extensions = {}
        self._tls_pending = self._tls_active = True
        try:
            self.transport.startTLS(self.params.tls_options)
        except Exception as e:
            self._tls_failed = True
            return self._abort(421, "4.7.5", f"cannot start TLS with {self._host}: {printable(str(e).encode())}")
        self._ehlo()
