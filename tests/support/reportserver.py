"""A real HTTPS receiver of TLS reports on loopback for tests (RFC 8460 5.4): twisted.web with a
certificate from a TestCA, every POST recorded (path, Content-Type, body), failures on cue.

    receiver = ReportReceiver(ca)
    receiver.start(reactor)              # receiver.url: https://127.0.0.1:PORT/tlsrpt
    self.addCleanup(receiver.stop)
    receiver.mode = "500"                # "ok" (201 Created) | "500"
    yield receiver.wait_for(1)
    receiver.posts[0].body               # the gzipped report, as posted
"""
from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer
from twisted.web import resource, server

from tests.support.pki import TestCA


@dataclass
class Post:
    path: str
    content_type: str
    body: bytes
    answered: int


class _Reports(resource.Resource):
    isLeaf = True

    def __init__(self, receiver: "ReportReceiver"):
        super().__init__()
        self.receiver = receiver

    def render_POST(self, request) -> bytes:
        r = self.receiver
        code = 500 if r.mode == "500" else 201
        r.posts.append(Post(request.path.decode(), (request.getHeader(b"content-type") or b"").decode(),
                            request.content.read(), code))
        from twisted.internet import reactor
        reactor.callLater(0, r._notify)
        request.setResponseCode(code)
        return b"broken" if code == 500 else b""


class ReportReceiver:
    def __init__(self, ca: TestCA):
        self.ca = ca
        self.mode = "ok"
        self.posts: list[Post] = []
        self._port = None
        self._waiters: list[tuple[int, defer.Deferred]] = []

    def start(self, reactor, port: int = 0) -> int:
        site = server.Site(_Reports(self))
        site.noisy = False
        self._port = reactor.listenSSL(port, site, self.ca.server_options("127.0.0.1"), interface="127.0.0.1")
        return self._port.getHost().port

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._port.getHost().port}/tlsrpt"

    @property
    def accepted(self) -> list[Post]:
        return [p for p in self.posts if 200 <= p.answered < 300]

    def wait_for(self, n: int) -> defer.Deferred:
        """Fires once `n` reports have been accepted."""
        d = defer.Deferred()
        self._waiters.append((n, d))
        self._notify()
        return d

    def _notify(self) -> None:
        ready = [(n, d) for n, d in self._waiters if len(self.accepted) >= n]
        self._waiters = [w for w in self._waiters if w not in ready]
        for _, d in ready:
            d.callback(list(self.accepted))

    def stop(self) -> defer.Deferred:
        port, self._port = self._port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
