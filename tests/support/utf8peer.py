"""An independent SMTPUTF8 next hop for tests: aiosmtpd (a different SMTP implementation from ours and
from tests/support/sink.py) with `enable_SMTPUTF8=True`, on a loopback address, recording what it got.

Not part of the relay.  aiosmtpd runs its own asyncio loop in a thread; `start` and `stop` block, so
call them through deferToThread from a trial test.  Each accepted message is kept as a `Received`
(envelope sender and recipients as aiosmtpd decoded them, the MAIL parameters, whether the transaction
was SMTPUTF8, and the content bytes).

    peer = Utf8Peer("127.0.0.2", port)
    yield threads.deferToThread(peer.start)
    self.addCleanup(threads.deferToThread, peer.stop)
    ... deliver ...
    [got] = yield peer.wait_for(1)
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from twisted.internet import defer, reactor, threads


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str] = field(default_factory=list)
    smtp_utf8: bool = False
    content: bytes = b""


class _Handler:
    def __init__(self, peer: "Utf8Peer"):
        self.peer = peer

    async def handle_DATA(self, server, session, envelope) -> str:
        content = envelope.original_content or envelope.content
        self.peer._got(Received(envelope.mail_from, list(envelope.rcpt_tos), list(envelope.mail_options),
                                bool(envelope.smtp_utf8), bytes(content)))
        return "250 2.0.0 OK"


class Utf8Peer:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._controller = Controller(_Handler(self), hostname=host, port=port, enable_SMTPUTF8=True,
                                      decode_data=False, ready_timeout=20)

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    def _got(self, message: Received) -> None:       # on aiosmtpd's thread
        with self._lock:
            self.messages.append(message)

    def wait_for(self, n: int, timeout: float = 60.0) -> defer.Deferred:
        """Fires with the messages once `n` have arrived (polled from a thread: aiosmtpd has its own)."""
        def wait() -> list[Received]:
            deadline = threading.Event()
            for _ in range(int(timeout * 20)):
                with self._lock:
                    if len(self.messages) >= n:
                        return list(self.messages)
                deadline.wait(0.05)
            raise AssertionError(f"{n} message(s) expected at {self.host}:{self.port}, got {len(self.messages)}")
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), wait)
