"""A real LMTP server on loopback or a unix socket for tests (RFC 2033): the sink (tests.support.sink)
speaking LMTP.

Not part of the relay.  It answers LHLO (EHLO and HELO get 500: LMTP has neither), takes MAIL, RCPT, DATA
and, when CHUNKING is among its extensions, BDAT, exactly as the sink does, and after the end of the data
sends one reply per accepted recipient, in RCPT order (RFC 2033 4.2).  Each recipient's reply is scripted
in `replies={address: [first attempt's reply, second's, ...]}` (then "250 2.0.0 <address> delivered");
`drop_after=N` hangs up after N of those replies in a transaction (once: it is then cleared).
`deliveries` lists (recipient, message bytes) for every 2xx, to count duplicates.

    server = LMTPSink(replies={"b@example.net": ["452 4.2.2 mailbox full"]})
    port = server.start(reactor)                   # or server.start_unix(reactor, path)
    self.addCleanup(server.stop)
"""
from __future__ import annotations

from typing import Optional

from twisted.internet import protocol

from tests.support.sink import DEFAULT_EXTENSIONS, Sink, SinkProtocol, Transaction

LMTP_EXTENSIONS = ("PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SIZE 104857600")


class LMTPSink(Sink):
    def __init__(self, *, replies: Optional[dict] = None, drop_after: Optional[int] = None,
                 extensions: tuple = LMTP_EXTENSIONS, **kwargs):
        super().__init__(extensions=extensions, **kwargs)
        self.replies = {k.lower(): list(v) for k, v in (replies or {}).items()}
        self.drop_after = drop_after
        self.deliveries: list[tuple[str, bytes]] = []

    def start_unix(self, reactor, path: str) -> str:
        """Listen on a unix socket at `path`; returns the path."""
        factory = protocol.Factory.forProtocol(self.protocol_class)
        factory.sink = self
        self._port = reactor.listenUNIX(path, factory)
        return path

    def reply_for(self, recipient: str) -> str:
        scripted = self.replies.get(recipient.lower())
        return scripted.pop(0) if scripted else f"250 2.0.0 <{recipient}> delivered"


class LMTPProtocol(SinkProtocol):
    def smtp_LHLO(self, rest: str) -> None:
        super().smtp_EHLO(rest)

    def smtp_EHLO(self, rest: str) -> None:
        self.reply("500 5.5.1 this is LMTP: say LHLO")     # RFC 2033 4.1

    smtp_HELO = smtp_EHLO

    def _end_of_message(self, transaction: Transaction) -> None:
        # RFC 2033 4.2: one reply for each accepted RCPT, in order.
        self.sink.transactions.append(transaction)
        transaction.reply, delivered = "one reply per recipient", False
        for n, recipient in enumerate(transaction.rcpt_tos):
            if self.sink.drop_after is not None and n == self.sink.drop_after:
                self.sink.drop_after = None
                self.transport.loseConnection()      # the replies written so far still go out
                break
            answer = self.sink.reply_for(recipient)
            self.reply(answer)
            if answer.startswith("2"):
                delivered = True
                self.sink.deliveries.append((recipient, transaction.data))
        if delivered:
            self.sink._accepted(transaction)


LMTPSink.protocol_class = LMTPProtocol
__all__ = ["DEFAULT_EXTENSIONS", "LMTP_EXTENSIONS", "LMTPSink"]
