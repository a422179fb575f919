# -*- test-case-name: tests.test_oauth2 -*-
"""OAuth2 bearer tokens for a smarthost transport (`auth = "xoauth2"` / `"oauthbearer"`).

Journey: SmarthostTransport asks its `OAuth2TokenSource` for a token before each connection it makes;
the SASL step (outbound.sasl) puts the token into AUTH.  In: the transport's `[transports.NAME]
oauth2_*` keys (config.OAuth2Config).  Out: a `BearerToken`, or a `TokenUnavailable` whose text says
why without any secret — the transport turns that into a 4xx for every recipient (the mail waits in
the queue; a token endpoint is never a reason to bounce).

Lifecycle: one token per transport, shared by every connection; reused until EXPIRY_MARGIN seconds
before its `expires_in` runs out; dropped when the smarthost refuses it (`rejected`, after a 535), so the
next ask fetches a new one; concurrent asks while a fetch is in flight share that one fetch.  A fetch
is bounded by `timeout` (connect, TLS, request and body together) and by MAX_BODY bytes.

Grants (RFC 6749): client credentials (section 4.4: client_id + client_secret + scope; Microsoft 365)
and refresh token (section 6: client_id, the client secret when there is one, refresh_token; Gmail).
A refresh token the endpoint returns in place of ours (rotation) is written back to its file atomically
(a temporary file beside it, fsync, rename, mode 0600) before it is used.

HTTP goes through treq over verified TLS: `oauth2_ca_file` as the only trust roots, else the
platform's (RFC 6749 section 3.2 asks TLS of the token endpoint; config refuses a non-https URL).

Tokens, client secrets and refresh tokens live in `Secret`s: no log line, repr, metric label or reply
carries them.  Metric: mailrelay_oauth2_token_fetches_total{transport,result}.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from twisted.internet import defer, error
from twisted.python.failure import Failure

from mailrelay.config.model import OAuth2Config
from mailrelay.outbound.secret import Secret, read_secret
from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.delivery.oauth2")

EXPIRY_MARGIN = 60.0        # seconds before expires_in runs out that a token is no longer handed out
DEFAULT_LIFETIME = 3600.0   # expires_in absent (RFC 6749 5.1 makes it only RECOMMENDED)
FETCH_TIMEOUT = 30.0        # seconds for one whole token request
MAX_BODY = 64 * 1024        # a token response is a few KiB; more is not a token endpoint
# RFC 6750 2.1 b64token: nothing else may go into the SASL string (an \x01 or CRLF would forge fields).
_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
_ERROR_CODE = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]{1,64}")   # RFC 6749 5.2 "error" characters
FETCH_RESULTS = ("success", "refused", "server_error", "bad_response", "unreachable", "timeout")

# post(url, form) -> Deferred[(HTTP status, body bytes)]; may fail (no connection, bad TLS, cancelled).
Post = Callable[[str, dict], "defer.Deferred[tuple[int, bytes]]"]


class TokenUnavailable(Exception):
    """No usable token: str() is the reason, fit for a log line and an SMTP reply (it holds no secret);
    `result` is its FETCH_RESULTS label."""

    def __init__(self, reason: str, result: str = "bad_response"):
        super().__init__(reason)
        self.result = result


@dataclass(frozen=True, eq=False)
class BearerToken:
    """An access token and the clock time (seconds) its `expires_in` runs out."""
    value: Secret = field(repr=False)
    expires_at: float


class TokenSource(Protocol):
    """What a transport needs of a token client."""

    def token(self) -> defer.Deferred:
        """Deferred[BearerToken]: the current token, or a new one; fails with TokenUnavailable only."""

    def rejected(self, token: BearerToken) -> None:
        """The smarthost refused `token` (535): do not hand it out again."""


def treq_post(reactor: Any, ca_file: Optional[Path] = None, connect_timeout: float = FETCH_TIMEOUT) -> Post:
    """A Post over treq: verified TLS against `ca_file`'s CAs (else the platform trust), no connection
    kept afterwards, the body cut off past MAX_BODY."""
    import treq
    from treq.client import HTTPClient
    from twisted.internet import ssl
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

    trust = None
    if ca_file is not None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        certs = x509.load_pem_x509_certificates(Path(ca_file).read_bytes())
        trust = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in certs])
    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust),
                  connectTimeout=connect_timeout, pool=HTTPConnectionPool(reactor, persistent=False))
    client = HTTPClient(agent)

    def post(url: str, form: dict) -> defer.Deferred:
        headers: dict[bytes | str, list[bytes | str]] = {"Accept": ["application/json"]}
        d = client.post(url, data=form, headers=headers)

        def read(response: Any) -> defer.Deferred:
            chunks: list[bytes] = []

            def collect(data: bytes) -> None:
                chunks.append(data)
                if sum(map(len, chunks)) > MAX_BODY:
                    raise TokenUnavailable(f"token endpoint response over {MAX_BODY} bytes")

            return treq.collect(response, collect).addCallback(lambda _: (response.code, b"".join(chunks)))

        return d.addCallback(read)

    return post


def blocking_post(ca_file: Optional[Path] = None, timeout: float = FETCH_TIMEOUT) -> Post:
    """A Post for the command line (`mailrelay route-test`, no reactor running): stdlib urllib over
    verified TLS (ca_file's CAs, else the system's), answered before it returns."""
    import ssl as stdlib_ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    context = stdlib_ssl.create_default_context(cafile=str(ca_file) if ca_file else None)

    def post(url: str, form: dict) -> defer.Deferred:
        request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(),
                                         headers={"Accept": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
                return defer.succeed((response.status, response.read(MAX_BODY + 1)))
        except urllib.error.HTTPError as e:
            return defer.succeed((e.code, e.read(MAX_BODY + 1)))
        except TimeoutError:
            return defer.fail(defer.TimeoutError())
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            return defer.fail(error.ConnectError(string=" ".join(str(reason).split())[:160]))

    return post


class OAuth2TokenSource:
    """The token client of one transport (see the module docstring).  The grant's secrets are read from
    their files here, once (a reload builds a new source, reading them again)."""

    def __init__(self, transport: str, oauth2: OAuth2Config, *, clock: Any, post: Post,
                 metrics: Any = None, timeout: float = FETCH_TIMEOUT, margin: float = EXPIRY_MARGIN):
        self.transport, self.oauth2 = transport, oauth2
        self._clock, self._post, self._metrics = clock, post, metrics
        self.timeout, self._margin = timeout, margin      # timeout: seconds for one whole request
        self._client_secret = read_secret(oauth2.client_secret_file) if oauth2.client_secret_file else None
        self._refresh = read_secret(oauth2.refresh_token_file) if oauth2.refresh_token_file else None
        self._on_disk = self._refresh.reveal() if self._refresh is not None else None
        self._current: Optional[BearerToken] = None
        self._waiting: Optional[list[defer.Deferred]] = None     # asks sharing the fetch in flight
        self.fetches = 0

    def __repr__(self) -> str:
        return f"<OAuth2TokenSource {self.transport} {self.oauth2.grant} {self.oauth2.token_url}>"

    # -- TokenSource ------------------------------------------------------------------------------------

    def token(self) -> defer.Deferred:
        current = self._current
        if current is not None and self._clock.seconds() < current.expires_at - self._margin:
            return defer.succeed(current)
        d: defer.Deferred = defer.Deferred()
        if self._waiting is not None:
            self._waiting.append(d)        # one fetch for every connection that asks meanwhile
            return d
        self._waiting = [d]
        self._fetch()
        return d

    def rejected(self, token: BearerToken) -> None:
        if self._current is token:        # a token already replaced by another connection stays replaced
            self._current = None

    # -- one fetch ----------------------------------------------------------------------------------------

    def _refresh_token(self) -> str:
        """Ours, unless the file changed since we last read or wrote it (an operator, or `mailrelay
        route-test` saving a rotated one): then the file's."""
        # Only for the refresh-token grant (_form): _refresh was read from refresh_token_file.
        assert self._refresh is not None and self.oauth2.refresh_token_file is not None
        current: Optional[bytes]
        try:
            current = read_secret(self.oauth2.refresh_token_file).reveal()
        except OSError:
            current = self._on_disk
        if current and current != self._on_disk:
            self._refresh, self._on_disk = Secret(current), current
        return self._refresh.reveal().decode("utf-8", "replace")

    def _form(self) -> dict:
        o = self.oauth2
        form = {"client_id": o.client_id}
        if self._refresh is not None:
            form.update(grant_type="refresh_token", refresh_token=self._refresh_token())
        else:
            form["grant_type"] = "client_credentials"
        if self._client_secret is not None:
            form["client_secret"] = self._client_secret.reveal().decode("utf-8", "replace")
        if o.scope:
            form["scope"] = o.scope
        return form

    def _fetch(self) -> None:
        self.fetches += 1
        started = self._clock.seconds()
        d = defer.maybeDeferred(self._post, self.oauth2.token_url, self._form())
        d.addTimeout(self.timeout, self._clock)
        d.addCallback(lambda answer: self._parse(answer[0], answer[1], started))     # (status, body)
        d.addErrback(self._why)
        d.addBoth(self._settle)

    def _parse(self, status: int, body: bytes, started: float) -> BearerToken:
        data = _json_object(body)
        if status != 200:
            code = data.get("error") if data else None
            detail = f" ({code})" if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else ""
            result = "refused" if 400 <= status < 500 else "server_error"
            raise TokenUnavailable(f"token endpoint answered HTTP {status}{detail}", result)
        if data is None:
            raise TokenUnavailable("token endpoint answered something that is not a JSON object")
        value = data.get("access_token")
        if not isinstance(value, str) or not _B64TOKEN.fullmatch(value.encode("utf-8", "replace")):
            raise TokenUnavailable("token endpoint answered without a usable access_token")
        kind = data.get("token_type", "Bearer")
        if not isinstance(kind, str) or kind.lower() != "bearer":      # RFC 6749 7.1, RFC 6750
            raise TokenUnavailable(f"token endpoint gave a token of type {str(kind)[:20]!r}, not Bearer")
        lifetime = _lifetime(data.get("expires_in", DEFAULT_LIFETIME))
        self._rotate(data.get("refresh_token"))
        return BearerToken(Secret(value.encode("ascii")), started + lifetime)

    def _rotate(self, new: Any) -> None:
        """Keep a refresh token the endpoint sent in place of ours, on disk first (RFC 6749 6, 10.4)."""
        if self._refresh is None or not isinstance(new, str) or not new or new.encode() == self._refresh.reveal():
            return
        path = self.oauth2.refresh_token_file
        assert path is not None       # _refresh was read from it
        try:
            write_atomically(path, new.encode("utf-8") + b"\n")
        except OSError as e:
            # The new token still works for now; the old file may be stale after a restart: say so loudly.
            log.error("oauth2: transport {transport}: cannot save the new refresh token to {path}: {error}",
                      transport=self.transport, path=str(path), error=e.strerror or str(e))
        else:
            self._on_disk = new.encode("utf-8")
            log.info("oauth2: transport {transport}: the token endpoint rotated the refresh token; saved "
                     "to {path}", transport=self.transport, path=str(path))
        self._refresh = Secret(new.encode("utf-8"))

    def _why(self, failure: Failure) -> Failure:
        if failure.check(TokenUnavailable):
            return failure
        reasons = getattr(failure.value, "reasons", None)      # twisted.web's ResponseNeverReceived / Failed
        if reasons and isinstance(reasons[0], Failure):
            failure = reasons[0]
        if failure.check(defer.TimeoutError, defer.CancelledError):   # addTimeout cancelled the request
            reason = TokenUnavailable(f"token endpoint gave no answer within {self.timeout:g}s", "timeout")
        else:
            what = failure.value
            text = " ".join(str(what).split())[:160] or type(what).__name__
            if failure.check(error.ConnectError, error.DNSLookupError):
                text = f"cannot connect: {text}"
            reason = TokenUnavailable(f"token endpoint unreachable: {text}", "unreachable")
        return Failure(reason)

    def _settle(self, outcome: Any) -> None:
        waiting, self._waiting = self._waiting or [], None
        if isinstance(outcome, BearerToken):
            self._current = outcome
            self._count("success")
            log.info("oauth2: transport {transport}: new token, valid for {seconds}s", transport=self.transport,
                     seconds=int(outcome.expires_at - self._clock.seconds()))
            for d in waiting:
                d.callback(outcome)
            return None
        reason = outcome.value if isinstance(outcome.value, TokenUnavailable) else TokenUnavailable(
            f"token client error: {type(outcome.value).__name__}")
        self._count(reason.result)
        log.warn("oauth2: transport {transport}: no token, mail for it waits: {reason}",
                 transport=self.transport, reason=str(reason))
        for d in waiting:
            d.errback(Failure(reason))
        return None

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.oauth2_fetch(self.transport, result)


def _json_object(body: bytes) -> Optional[dict]:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _lifetime(value: Any) -> float:
    """expires_in as seconds (Microsoft once sent it as a string); anything else is a bad response."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise TokenUnavailable("token endpoint gave an expires_in that is not a number of seconds")
    return float(min(value, 366 * 86400))


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: a temporary file beside it (mode 0600), fsync, rename, fsync the
    directory — a crash leaves the old content or the new, never a mix or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
