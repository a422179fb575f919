"""A real MTA-STS policy host on loopback for tests (RFC 8461 3.3): HTTPS (twisted.web) with a certificate
from a test CA for `mta-sts.DOMAIN` of every domain it serves, the policy picked by the Host header,
every request recorded, and failures on cue.

    policies = PolicyServer(ca, {"example.net": "version: STSv1\\nmode: enforce\\nmx: mx1.example.net\\n..."})
    port = policies.start(reactor)         # [delivery] mta_sts_port; DNS: mta-sts.example.net A 127.0.0.1
    self.addCleanup(policies.stop)
    policies.mode["example.net"] = "404"   # "ok" | "404" | "500" | "redirect" | "html" | "big" | "hang"

`certificate`: "good" (the CA's, for every mta-sts name), "wrong-name" (for another name) or
"self-signed" (from no CA the relay trusts).
"""
from __future__ import annotations

from typing import Optional

from twisted.internet import defer, ssl
from twisted.web import http, resource, server

from mailrelay import tls
from tests.support.pki import TestCA


class _Policy(resource.Resource):
    isLeaf = True

    def __init__(self, host: "PolicyServer"):
        super().__init__()
        self.host = host

    def render_GET(self, request) -> bytes:
        name = (request.getHeader(b"host") or b"").decode("ascii", "replace").split(":")[0].lower()
        domain = name[len("mta-sts."):] if name.startswith("mta-sts.") else name
        self.host.requests.append((domain, request.path.decode("ascii", "replace")))
        mode = self.host.mode.get(domain, "ok")
        body = self.host.policies.get(domain)
        if request.path != b"/.well-known/mta-sts.txt" or body is None or mode == "404":
            request.setResponseCode(404)
            return b"not found"
        if mode == "hang":
            self.host.hung.append(request)
            return server.NOT_DONE_YET
        if mode == "500":
            request.setResponseCode(500)
            return b"oops"
        if mode == "redirect":
            request.setResponseCode(302)
            request.setHeader(b"location", b"https://elsewhere.example/.well-known/mta-sts.txt")
            return b""
        if mode == "html":
            request.setHeader(b"content-type", b"text/html")
            return body.encode()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if mode == "big":
            return body.encode() + b"# padding\n" * 8000
        return body.encode()


class _Channel(http.HTTPChannel):
    def connectionMade(self):
        super().connectionMade()
        self.closed = defer.Deferred()
        self.site.open.add(self)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.site.open.discard(self)
        self.closed.callback(None)


class _Site(server.Site):
    protocol = _Channel
    noisy = False

    def __init__(self, resource):
        super().__init__(resource)
        self.open: set = set()

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        channel.site = self
        return channel


class PolicyServer:
    def __init__(self, ca: TestCA, policies: Optional[dict] = None, certificate: str = "good"):
        self.ca = ca
        self.policies: dict[str, str] = dict(policies or {})
        self.mode: dict[str, str] = {}
        self.certificate = certificate
        self.requests: list[tuple[str, str]] = []
        self.hung: list = []
        self._port = None

    def _options(self) -> ssl.CertificateOptions:
        names = [f"mta-sts.{d}" for d in self.policies] or ["mta-sts.invalid"]
        if self.certificate == "self-signed":
            cert_pem, key_pem = tls.generate_self_signed(names[0])
            pair = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
            return ssl.CertificateOptions(privateKey=pair.privateKey.original, certificate=pair.original)
        if self.certificate == "wrong-name":
            return self.ca.server_options("www.unrelated.example")
        return self.ca.server_options(names[0], also=tuple(names[1:]))

    def start(self, reactor, port: int = 0, interface: str = "127.0.0.1") -> int:
        self._site = site = _Site(_Policy(self))
        self._port = reactor.listenSSL(port, site, self._options(), interface=interface)
        return self._port.getHost().port

    @property
    def port(self) -> int:
        return self._port.getHost().port

    def fetches(self, domain: str) -> int:
        return sum(1 for d, _ in self.requests if d == domain)

    def stop(self) -> defer.Deferred:
        hung, self.hung = self.hung, []
        for request in hung:
            if not request.finished and request.channel is not None:
                request.channel.transport.abortConnection()
        port, self._port = self._port, None
        if port is None:
            return defer.succeed(None)
        waits = [defer.maybeDeferred(port.stopListening)]
        for channel in list(self._site.open):
            waits.append(channel.closed)
            channel.transport.abortConnection()
        return defer.gatherResults(waits)
