"""A real webhook receiver on loopback for tests: HTTPS (twisted.web, a certificate from a TestCA), every
POST recorded with its headers and body, answers on cue, and a signature check done with the stdlib.

    receiver = WebhookReceiver(ca, secret=b"k3y")
    receiver.start(reactor, port)       # a port from free_port(): the same URL can come back after stop()
    self.addCleanup(receiver.stop)
    receiver.mode = "ok"                # "ok" | "503" | "400" | "429" | "hang"
    yield receiver.wait_for_events(3)   # three distinct event ids answered 2xx

`events` holds the parsed bodies the receiver answered 2xx, in arrival order (duplicates included, as a
real receiver would see them); `ids()` the distinct ids of those.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Optional

from twisted.internet import defer
from twisted.web import resource, server

from tests.support.pki import TestCA


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int          # 0 while hanging


class _Hook(resource.Resource):
    isLeaf = True

    def __init__(self, receiver: "WebhookReceiver"):
        super().__init__()
        self.receiver = receiver

    def render_POST(self, request) -> bytes:
        r = self.receiver
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        post = Post(request.path.decode(), headers, request.content.read(), 0)
        r.posts.append(post)
        from twisted.internet import reactor
        reactor.callLater(0, r._notify)
        if r.mode == "hang":
            r.hung.append(request)
            return server.NOT_DONE_YET
        if r.mode in ("503", "400", "429"):
            post.answered = int(r.mode)
            request.setResponseCode(post.answered)
            request.setHeader(b"content-type", b"application/json")
            return b'{"error": "not now"}'
        post.answered = 204 if r.code_204 else 200
        request.setResponseCode(post.answered)
        r.events.append(json.loads(post.body))
        return b""


class WebhookReceiver:
    def __init__(self, ca: TestCA, secret: Optional[bytes] = None, name: str = "127.0.0.1"):
        self.ca, self.secret, self.name = ca, secret, name
        self.mode = "ok"
        self.code_204 = False
        self.posts: list[Post] = []
        self.events: list[dict] = []
        self.hung: list = []
        self._port = None
        self._waiters: list[tuple[int, defer.Deferred]] = []

    def start(self, reactor, port: int = 0) -> int:
        site = server.Site(_Hook(self))
        site.noisy = False
        self._port = reactor.listenSSL(port, site, self.ca.server_options(self.name), interface="127.0.0.1")
        return self._port.getHost().port

    def url(self, port: int, path: str = "/hook") -> str:
        return f"https://127.0.0.1:{port}{path}"

    def ids(self) -> set[str]:
        return {e["id"] for e in self.events}

    def signature_ok(self, post: Post) -> bool:
        """The X-Mailrelay-Signature header checked independently: HMAC-SHA256 of the raw body."""
        expected = "sha256=" + hmac.new(self.secret, post.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, post.headers.get("x-mailrelay-signature", ""))

    def wait_for_events(self, n: int) -> defer.Deferred:
        """Fires once `n` distinct event ids were answered 2xx."""
        d = defer.Deferred()
        self._waiters.append((n, d))
        self._notify()
        return d

    def wait_for_posts(self, n: int) -> defer.Deferred:
        """Fires once `n` POSTs arrived, whatever they were answered."""
        d = defer.Deferred()
        self._waiters.append((-n, d))
        self._notify()
        return d

    def _notify(self) -> None:
        def ready(n: int) -> bool:
            return len(self.posts) >= -n if n < 0 else len(self.ids()) >= n
        done = [(n, d) for n, d in self._waiters if ready(n)]
        self._waiters = [w for w in self._waiters if w not in done]
        for _, d in done:
            d.callback(None)

    def release(self) -> None:
        hung, self.hung = self.hung, []
        for request in hung:
            if not request.finished and request.channel is not None:
                request.channel.transport.abortConnection()

    def stop(self) -> defer.Deferred:
        self.release()
        port, self._port = self._port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
