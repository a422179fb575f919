# -*- test-case-name: tests.test_capabilities, tests.test_delivery_client, tests.test_chunking -*-
"""Next hops that are one known host: named smarthost transports, and the per-host step of MX delivery.

Journey: the scheduler asks the router for a route; a route names a transport (`[transports.NAME]`),
and `SmarthostTransport.deliver` sends the message there.  The MX engine resolves a domain's hosts and
calls `deliver_to_host` for each in turn.
In: a spooled message and its recipients, or a list of job.Job.  Out: RecipientResults (never an
exception).

TLS policies (config.md [delivery] tls, Postfix's smtp_tls_security_level): "none"; "opportunistic"
(STARTTLS when offered, plaintext again if the handshake fails: RFC 3207 section 4 allows it, and a
failed handshake is no reason to keep mail back); "required" (STARTTLS or 4.7.4, any certificate);
"verify" (STARTTLS, certificate chain and host name checked against the platform trust or `ca_file`:
RFC 6125 via service_identity).  `implicit_tls` is RFC 8314 implicit TLS (port 465) from the first byte.
AUTH (RFC 4954) is only ever sent over TLS: PLAIN/LOGIN with a password, or XOAUTH2/OAUTHBEARER
(RFC 7628) with a token from outbound.oauth2 (`auth` in [transports.NAME]; the SASL strings are in
outbound.sasl).  A TLS client certificate (`client_cert`/`client_key`) goes with STARTTLS and implicit
TLS alike.

Connection reuse: each SmarthostTransport keeps an outbound.pool.ConnectionPool, so a batch that follows
within pool.IDLE_TIME goes over the connection the previous one left open, already past EHLO, STARTTLS
and AUTH.  `close_idle()` says QUIT on every idle connection (at shutdown, or when a reload retires it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, endpoints, ssl
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from mailrelay import config
from mailrelay.outbound import sasl
from mailrelay.outbound.connect import deliver_over
from mailrelay.queue.job import Job, OnSettled, SessionParams, Timeouts, report_once
from mailrelay.outbound.oauth2 import BearerToken, OAuth2TokenSource, TokenSource, TokenUnavailable, treq_post
from mailrelay.outbound.pool import ConnectionPool, PoolKey
from mailrelay.queue.results import SessionResult, settle_all
from mailrelay.outbound.unixhop import deliver_to_socket
from mailrelay.outbound.secret import Secret, read_secret  # noqa: F401 (Secret: still importable from here)
from mailrelay.interfaces import IBatchNextHop, INextHop, IPooledNextHop
from mailrelay.logger import Logger

log = Logger(namespace="mailrelay.delivery")

TLS_POLICIES = config.TLS_POLICIES


def client_tls_options(hostname: str, verify: bool, ca_file: Optional[Path] = None,
                       client_cert: Optional[Path] = None, client_key: Optional[Path] = None) -> Any:
    """Client TLS options: with `verify`, chain and host name checked (ca_file's CAs as the only trust
    roots when given, else the platform's); without, any certificate is accepted (encryption only).
    With `client_cert`/`client_key` (PEM; chain certificates after the leaf), that certificate is
    presented when the server asks for one."""
    mine: dict = {}
    if client_cert is not None:
        from mailrelay.tls import client_certificate   # the same loading (and pair check) as our own cert
        mine = client_certificate(client_cert, client_key)
    if not verify:
        return ssl.CertificateOptions(**mine)
    trust = ssl.platformTrust()
    if ca_file is not None:
        certs = x509.load_pem_x509_certificates(Path(ca_file).read_bytes())
        trust = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in certs]
        )
    return ssl.optionsForClientTLS(hostname, trustRoot=trust, extraCertificateOptions=mine)


def _security(tls_policy: str, implicit_tls: bool) -> str:
    if implicit_tls:
        return "tls"
    return {"none": "none", "opportunistic": "opportunistic", "required": "starttls", "verify": "starttls"}[
        tls_policy]


def deliver_to_host(
    host: str,
    port: int,
    jobs: list[Job],
    *,
    helo: str,
    tls_policy: str = "opportunistic",
    implicit_tls: bool = False,
    tls_hostname: Optional[str] = None,
    ca_file: Optional[Path] = None,
    tls_options: Any = None,
    username: Optional[str] = None,
    password: Optional[bytes] = None,
    login: Any = None,
    bind_address: str = "",
    timeouts: Timeouts = Timeouts(),
    reactor: Any = None,
    clock: Any = None,
    pool: Optional[ConnectionPool] = None,
    on_settled: Optional[OnSettled] = None,
    protocol: str = "smtp",
) -> defer.Deferred:
    """Connect to (host, port) and send every job on that one connection.  `on_settled(index, results)`
    hears of each job as soon as it is settled (connect.deliver_over), once even across the retry below.

    `tls_policy` is one of TLS_POLICIES; `tls_hostname` is the name the certificate must carry under
    "verify" (default: `host`; give the MX name when `host` is an address).  `tls_options`, when given,
    replaces the options built from tls_hostname/ca_file (a caller delivering often can build them once).
    `login`: an outbound.sasl login for AUTH (default: PLAIN/LOGIN with username and password, when there
    is a username).  `protocol`: "smtp", or "lmtp" (RFC 2033, outbound.lmtp).
    With `pool`, an idle connection to the same host, port, security, TLS options and user is used when
    there is one, and a connection that ends cleanly is left there instead of closed.
    Returns a Deferred firing with a results.SessionResult; it never fails.  Under "opportunistic", a
    failed handshake is retried once in plaintext on a new connection (the result then says
    tls_failed=True, tls=None)."""
    if tls_policy not in TLS_POLICIES:
        raise ValueError(f"unknown TLS policy {tls_policy!r}")
    if reactor is None:
        from twisted.internet import reactor
    clock = clock if clock is not None else reactor
    on_settled = report_once(on_settled)
    name = tls_hostname or host
    options = tls_options
    if options is None and (tls_policy != "none" or implicit_tls):
        options = client_tls_options(name, tls_policy == "verify", ca_file)
    params = SessionParams(helo=helo, remote_host=host, security=_security(tls_policy, implicit_tls),
                           tls_options=options, username=username, password=password, timeouts=timeouts,
                           login=login, protocol=protocol)

    def attempt(params: SessionParams) -> defer.Deferred:
        endpoint: IStreamClientEndpoint = endpoints.HostnameEndpoint(
            reactor, host, port, timeout=timeouts.connect, bindAddress=(bind_address, 0) if bind_address else None)
        if params.security == "tls":
            endpoint = endpoints.wrapClientTLS(options, endpoint)
        key = PoolKey(host, port, params.security, params.tls_options, username)
        return deliver_over(endpoint, params, jobs, clock, pool=pool, key=key, on_settled=on_settled)

    def maybe_plaintext(result: SessionResult) -> Any:
        if tls_policy == "opportunistic" and result.tls_failed and result.before_mail and not implicit_tls:
            plain = SessionParams(helo=helo, remote_host=host, security="none", username=username,
                                  password=password, timeouts=timeouts, login=login, protocol=protocol,
                                  after_tls_failure=True)
            return attempt(plain).addCallback(
                lambda again: SessionResult(again.jobs, None, True, again.before_mail))
        return result

    return attempt(params).addCallback(maybe_plaintext)


@implementer(INextHop, IBatchNextHop, IPooledNextHop)
class SmarthostTransport:
    """A named `[transports.NAME]`: every message routed to it goes to one host, with its security mode,
    certificate check, client certificate and credentials.  The password is read once here; it appears
    in no repr or log.  With `auth = "xoauth2"` / `"oauthbearer"` each connection first gets a token
    from `tokens` (default: an oauth2.OAuth2TokenSource over treq, shared by all of this transport's
    connections); no token means a 454 4.7.0 for every recipient (the mail waits), and a 535 to a token
    means one fresh token and one more try (see deliver_jobs).
    Idle connections wait in `pool` (default: a new ConnectionPool on `clock`) for the next batch.
    Connections leave from the transport's `source_address`, else from `source_address` given here
    (`[delivery] source_address`: MX and smarthosts alike), else from any address."""

    def __init__(self, transport: config.Transport, hostname: str, clock: Any = None, reactor: Any = None,
                 timeouts: Timeouts = Timeouts(), pool: Optional[ConnectionPool] = None,
                 source_address: str = "", tokens: Optional[TokenSource] = None, metrics: Any = None):
        if reactor is None:
            from twisted.internet import reactor
        self.transport, self.hostname, self.timeouts = transport, hostname, timeouts
        self.bind_address = transport.bind_address(source_address)
        self._reactor, self._clock = reactor, clock if clock is not None else reactor
        self.pool = pool if pool is not None else ConnectionPool(self._clock)
        self._tls_options = None
        if transport.security != "none":       # built once: the CA file is read here, not per message
            self._tls_options = client_tls_options(transport.host, transport.verify, transport.ca_file,
                                                   transport.client_cert, transport.client_key)
        self._password = read_secret(transport.password_file) if transport.password_file else None
        self.tokens = tokens
        if tokens is None and transport.oauth2 is not None and transport.auth_kind in sasl.OAUTH_MECHANISMS:
            self.tokens = OAuth2TokenSource(transport.name, transport.oauth2, clock=self._clock, metrics=metrics,
                                            post=treq_post(reactor, transport.oauth2.ca_file))

    def __repr__(self) -> str:
        t = self.transport
        return (f"<SmarthostTransport {t.name} {t.place} security={t.security} verify={t.verify} "
                f"auth={t.auth_kind}>")

    @property
    def tls_policy(self) -> str:
        if self.transport.security == "none":
            return "none"
        return "verify" if self.transport.verify else "required"

    def deliver(self, message: Any, recipients) -> defer.Deferred:
        """INextHop: Deferred[list[RecipientResult]], one per recipient; it never fails."""
        return self.deliver_jobs([Job(message, tuple(recipients))]).addCallback(lambda r: list(r.jobs[0]))

    def deliver_batch(self, jobs: list[Job], on_settled: Optional[OnSettled] = None) -> defer.Deferred:
        """IBatchNextHop: every job on one connection; Deferred[list[list[RecipientResult]]], one list
        per job in order; it never fails.  `on_settled` hears of each job as soon as it is settled."""
        return self.deliver_jobs(list(jobs), on_settled).addCallback(lambda r: [list(job) for job in r.jobs])

    def deliver_jobs(self, jobs: list[Job], on_settled: Optional[OnSettled] = None) -> defer.Deferred:
        """Several messages on one connection: Deferred[results.SessionResult]; it never fails.
        With OAuth2, a 535 to the token before any mail was tried drops that token, and the jobs get one
        more connection with a freshly fetched one; a second 535 leaves them deferred."""
        on_settled = report_once(on_settled)
        if self.tokens is None:
            login = None
            if self._password is not None and self.transport.auth_kind == "password":
                assert self.transport.username is not None      # config: a password goes with a username
                login = sasl.PasswordLogin(self.transport.username, self._password.reveal())
            return self._send(jobs, on_settled, login)
        return self._with_token(jobs, on_settled, again=True)

    def _send(self, jobs: list[Job], on_settled: Optional[OnSettled], login: Any) -> defer.Deferred:
        t = self.transport
        if t.unix_path is not None:
            return deliver_to_socket(t.unix_path, jobs, helo=self.hostname, remote_host=t.host, protocol=t.protocol,
                                     timeouts=self.timeouts, reactor=self._reactor, clock=self._clock, pool=self.pool,
                                     on_settled=on_settled)
        return deliver_to_host(
            t.host, t.port, jobs, helo=self.hostname, tls_policy=self.tls_policy,
            implicit_tls=t.security == "tls", tls_options=self._tls_options, username=t.username,
            login=login, bind_address=self.bind_address, protocol=t.protocol,
            timeouts=self.timeouts, reactor=self._reactor, clock=self._clock, pool=self.pool, on_settled=on_settled,
        )

    def _with_token(self, jobs: list[Job], on_settled: Optional[OnSettled], again: bool) -> defer.Deferred:
        t, tokens, username = self.transport, self.tokens, self.transport.username
        assert tokens is not None and username is not None     # an OAuth2 transport (deliver_jobs)

        def send(token: BearerToken) -> defer.Deferred:
            login = sasl.BearerLogin(t.auth_kind, username, token.value.reveal(), t.host, t.port)

            def judged(result: SessionResult) -> Any:
                if not login.rejected:
                    return result
                tokens.rejected(token)
                if again and result.before_mail:
                    log.info("oauth2: transport {transport}: {host} refused the token (535); fetching a new one",
                             transport=t.name, host=t.host)
                    return self._with_token(jobs, on_settled, again=False)
                return result
            return self._send(jobs, on_settled, login).addCallback(judged)

        def unavailable(failure: Any) -> SessionResult:
            failure.trap(TokenUnavailable)
            text = f"OAuth2 token unavailable: {failure.value}"
            return SessionResult(tuple(settle_all(j.recipients, 454, "4.7.0", text, t.host) for j in jobs),
                                 before_mail=True)

        return tokens.token().addCallbacks(send, unavailable)

    def close_idle(self) -> defer.Deferred:
        """QUIT every idle connection and keep none from now on; fires once they are all closed."""
        return self.pool.close()
