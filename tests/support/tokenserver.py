"""A real OAuth2 token endpoint on loopback for tests: HTTPS (twisted.web, a certificate from a TestCA),
the client-credentials and refresh-token grants (RFC 6749 4.4 and 6), every request recorded and
counted, and failures on cue.

    endpoint = TokenEndpoint(ca, client_id="app", client_secret="s3cret", on_issue=sink_tokens.add)
    endpoint.start(reactor)              # endpoint.url: https://127.0.0.1:PORT/token
    self.addCleanup(endpoint.stop)
    endpoint.mode = "500"                # "ok" | "500" | "400" | "badjson" | "hang"

Each good request issues a new access token "<prefix>at-N" (handed to `on_issue`, e.g. the set a Sink accepts)
valid `expires_in` seconds.  With `rotate`, each refresh-token grant also returns a new refresh token
"<prefix>rt-N" and forgets the one it was given (which then gets 400 invalid_grant).
"""
from __future__ import annotations

import json
from typing import Callable, Optional

from twisted.internet import defer
from twisted.web import resource, server

from tests.support.pki import TestCA


class _Token(resource.Resource):
    isLeaf = True

    def __init__(self, endpoint: "TokenEndpoint"):
        super().__init__()
        self.endpoint = endpoint

    def render_POST(self, request) -> bytes:
        e = self.endpoint
        form = {k.decode(): v[0].decode() for k, v in request.args.items()}
        e.requests.append(form)
        from twisted.internet import reactor
        reactor.callLater(0, e._notify)          # waiters run after this request has its answer
        if e.mode == "hang":
            e.hung.append(request)
            return server.NOT_DONE_YET
        if e.mode == "500":
            request.setResponseCode(500)
            return b"<html>internal error</html>"
        if e.mode == "badjson":
            request.setHeader(b"content-type", b"application/json")
            return b'{"access_token": "at-'
        error = e.refuse(form)
        if error or e.mode == "400":
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"error": error or "invalid_client",
                               "error_description": "AADSTS7000215: Invalid client secret provided."}).encode()
        e.counter += 1
        token = f"{e.prefix}at-{e.counter}"
        e.issued.append(token)
        if e.on_issue is not None:
            e.on_issue(token)
        answer = {"access_token": token, "token_type": "Bearer", "expires_in": e.expires_in}
        if form.get("grant_type") == "refresh_token" and e.rotate:
            e.refresh_tokens.discard(form.get("refresh_token"))
            new = f"{e.prefix}rt-{e.counter}"
            e.refresh_tokens.add(new)
            answer["refresh_token"] = new
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(answer).encode()


class TokenEndpoint:
    def __init__(self, ca: TestCA, *, client_id: str = "app-id", client_secret: Optional[str] = "client-s3cret",
                 refresh_tokens: tuple[str, ...] = (), scope: Optional[str] = None, expires_in=3600,
                 rotate: bool = False, on_issue: Optional[Callable[[str], None]] = None, prefix: str = ""):
        self.ca, self.client_id, self.client_secret, self.scope = ca, client_id, client_secret, scope
        self.refresh_tokens = set(refresh_tokens)
        self.expires_in, self.rotate, self.on_issue = expires_in, rotate, on_issue
        self.prefix = prefix                      # before every token issued (unique strings to grep logs for)
        self.mode = "ok"
        self.requests: list[dict] = []
        self.issued: list[str] = []
        self.hung: list = []
        self.counter = 0
        self._port = None
        self._waiters: list[tuple[int, defer.Deferred]] = []

    @property
    def count(self) -> int:
        return len(self.requests)

    def refuse(self, form: dict) -> Optional[str]:
        """The RFC 6749 5.2 error code for a request this endpoint must refuse, or None."""
        if form.get("client_id") != self.client_id:
            return "invalid_client"
        grant = form.get("grant_type")
        if grant == "client_credentials":
            if form.get("client_secret") != self.client_secret:
                return "invalid_client"
        elif grant == "refresh_token":
            if self.client_secret is not None and form.get("client_secret") != self.client_secret:
                return "invalid_client"
            if form.get("refresh_token") not in self.refresh_tokens:
                return "invalid_grant"
        else:
            return "unsupported_grant_type"
        if self.scope is not None and form.get("scope") != self.scope:
            return "invalid_scope"
        return None

    def start(self, reactor, port: int = 0) -> int:
        site = server.Site(_Token(self))
        site.noisy = False
        self._port = reactor.listenSSL(port, site, self.ca.server_options("127.0.0.1"), interface="127.0.0.1")
        return self._port.getHost().port

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._port.getHost().port}/token"

    def wait_for(self, n: int) -> defer.Deferred:
        """Fires once `n` requests have arrived."""
        d = defer.Deferred()
        self._waiters.append((n, d))
        self._notify()
        return d

    def _notify(self) -> None:
        ready = [(n, d) for n, d in self._waiters if self.count >= n]
        self._waiters = [w for w in self._waiters if w not in ready]
        for _, d in ready:
            d.callback(self.count)

    def release(self) -> None:
        """End every request left hanging (mode "hang") by closing its connection."""
        hung, self.hung = self.hung, []
        for request in hung:
            if not request.finished and request.channel is not None:
                request.channel.transport.abortConnection()

    def stop(self) -> defer.Deferred:
        self.release()
        port, self._port = self._port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
