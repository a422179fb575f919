"""OAuth2 smarthost AUTH (XOAUTH2 / OAUTHBEARER) and TLS client certificates.

Unit tests of the token lifecycle on task.Clock with a scripted endpoint; then real peers on loopback:
an HTTPS token endpoint (tests/support/tokenserver.py, certificate from a TestCA made here) and a TLS
next hop (tests/support/sink.py) that checks the SASL string byte for byte and may demand a client
certificate, with SmarthostTransports built from a real config file.
"""
from __future__ import annotations

import base64
import io
import json
import stat
import sys
from pathlib import Path

from twisted.internet import defer, reactor, task, threads
from twisted.logger import globalLogPublisher, formatEvent
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay import config
from mailrelay.cli.main import main
from mailrelay.config import load
from mailrelay.outbound import oauth2, sasl
from mailrelay.queue.job import Timeouts
from mailrelay.outbound.smarthost import SmarthostTransport
from mailrelay.envelope import Envelope
from mailrelay.interfaces import ISpooledMessage
from mailrelay.metrics import Metrics
from tests.support.pki import TestCA
from tests.support.sink import Sink
from tests.support.tokenserver import TokenEndpoint

FAST = Timeouts(connect=5, reply=5, data_end=5)
SECRET = "client-s3cret-value"
USER = "relay@corp.example"


@implementer(ISpooledMessage)
class Message:
    """A spooled message as the delivery client reads it."""
    path = None           # not read from a spool file

    def __init__(self, queue_id: str = "Q1", body: bytes = b"Subject: hi\r\n\r\nhello\r\n"):
        self.queue_id, self._body = queue_id, body
        self.envelope = Envelope(sender="app@example.org", recipients=("a@example.net",), received_at=0.0)
        self.size = len(body)

    def open(self):
        return io.BytesIO(self._body)


def oauth_config(**overrides) -> config.OAuth2Config:
    values = dict(token_url="https://127.0.0.1:1/token", client_id="app-id", client_secret_file=None,
                  refresh_token_file=None, scope="", ca_file=None)
    values.update(overrides)
    return config.OAuth2Config(**values)


class Scripted:
    """A Post whose answers the test gives: each call waits for `answer(...)` or `fail(...)`."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.pending: list[defer.Deferred] = []

    def __call__(self, url: str, form: dict) -> defer.Deferred:
        self.calls.append((url, form))
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def answer(self, status: int = 200, body=None, **fields) -> None:
        if body is None:
            body = json.dumps({"access_token": "tok-%d" % len(self.calls), "token_type": "Bearer",
                               "expires_in": 3600, **fields}).encode()
        self.pending.pop(0).callback((status, body))


def capture_log(test: unittest.TestCase) -> list[str]:
    """Every log event, formatted, from now to the end of the test."""
    lines: list[str] = []

    def observe(event):
        lines.append(formatEvent(event) + " " + repr(event))
    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


class TokenLifecycleTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        (self.dir / "secret").write_text(SECRET + "\n")
        self.clock, self.post, self.metrics = task.Clock(), Scripted(), Metrics()
        self.source = oauth2.OAuth2TokenSource(
            "m365",
            oauth_config(client_secret_file=self.dir / "secret", scope="https://outlook.office365.com/.default"),
            clock=self.clock, post=self.post, metrics=self.metrics, timeout=30)

    def fetched(self, result: str) -> float:
        return self.metrics.registry.get_sample_value("mailrelay_oauth2_token_fetches_total",
                                                      {"transport": "m365", "result": result}) or 0.0

    def test_client_credentials_form(self):
        self.source.token()
        [(url, form)] = self.post.calls
        self.assertEqual(url, "https://127.0.0.1:1/token")
        self.assertEqual(form, {"grant_type": "client_credentials", "client_id": "app-id", "client_secret": SECRET,
                                "scope": "https://outlook.office365.com/.default"})

    def test_a_token_is_reused_until_the_margin_before_it_expires(self):
        first = self.source.token()
        self.post.answer()
        token = self.successResultOf(first)
        self.assertEqual(token.value.reveal(), b"tok-1")
        self.clock.advance(3600 - oauth2.EXPIRY_MARGIN - 1)
        self.assertIs(self.successResultOf(self.source.token()), token)
        self.assertEqual(len(self.post.calls), 1)
        self.clock.advance(1)
        later = self.source.token()
        self.assertEqual(len(self.post.calls), 2)      # within the margin: a new one
        self.post.answer()
        self.assertEqual(self.successResultOf(later).value.reveal(), b"tok-2")
        self.assertEqual(self.fetched("success"), 2)

    def test_concurrent_asks_share_one_fetch(self):
        asks = [self.source.token() for _ in range(5)]
        self.assertEqual(len(self.post.calls), 1)
        self.post.answer()
        tokens = [self.successResultOf(d) for d in asks]
        self.assertTrue(all(t is tokens[0] for t in tokens))

    def test_concurrent_asks_share_one_failure(self):
        asks = [self.source.token() for _ in range(3)]
        self.post.answer(503, b"busy")
        for d in asks:
            self.assertIn("HTTP 503", str(self.failureResultOf(d, oauth2.TokenUnavailable).value))
        self.assertEqual((len(self.post.calls), self.fetched("server_error")), (1, 1))
        again = self.source.token()                    # a failure is not remembered: the next ask tries again
        self.assertEqual(len(self.post.calls), 2)
        self.post.answer()
        self.successResultOf(again)

    def test_a_rejected_token_is_dropped_once_however_many_connections_report_it(self):
        d = self.source.token()
        self.post.answer()
        old = self.successResultOf(d)
        self.source.rejected(old)
        d = self.source.token()
        self.post.answer()
        new = self.successResultOf(d)
        self.source.rejected(old)                      # a second connection that used the old one
        self.assertIs(self.successResultOf(self.source.token()), new)
        self.assertEqual(len(self.post.calls), 2)

    def test_a_silent_endpoint_times_out(self):
        d = self.source.token()
        self.assertNoResult(d)
        self.clock.advance(30)
        reason = self.failureResultOf(d, oauth2.TokenUnavailable).value
        self.assertEqual(str(reason), "token endpoint gave no answer within 30s")
        self.assertEqual(self.fetched("timeout"), 1)

    def failure_for(self, status: int, body: bytes) -> str:
        d = self.source.token()
        self.post.answer(status, body)
        return str(self.failureResultOf(d, oauth2.TokenUnavailable).value)

    def test_bad_answers_are_refused_with_a_reason(self):
        self.assertEqual(self.failure_for(400, b'{"error": "invalid_client", "error_description": "x"}'),
                         "token endpoint answered HTTP 400 (invalid_client)")
        self.assertEqual(self.failure_for(200, b"<html>"),
                         "token endpoint answered something that is not a JSON object")
        self.assertEqual(self.failure_for(200, b"[1]"),
                         "token endpoint answered something that is not a JSON object")
        self.assertIn("without a usable access_token", self.failure_for(200, b'{"expires_in": 5}'))
        # RFC 6750 b64token only: a token able to break the SASL framing never gets that far
        self.assertIn("without a usable access_token",
                      self.failure_for(200, json.dumps({"access_token": "a\x01auth=x"}).encode()))
        self.assertIn("not Bearer", self.failure_for(200, b'{"access_token": "abc", "token_type": "mac"}'))
        self.assertIn("expires_in", self.failure_for(200, b'{"access_token": "abc", "expires_in": "soon"}'))
        self.assertEqual(self.fetched("bad_response"), 6)
        self.assertEqual(self.fetched("refused"), 1)

    def test_expires_in_as_a_string_or_absent(self):
        d = self.source.token()
        self.post.answer(body=b'{"access_token": "abc", "expires_in": "120"}')
        self.assertEqual(self.successResultOf(d).expires_at, 120)
        self.clock.advance(61)
        d = self.source.token()
        self.post.answer(body=b'{"access_token": "abc"}')
        self.assertEqual(self.successResultOf(d).expires_at, 61 + oauth2.DEFAULT_LIFETIME)

    def test_the_token_appears_in_no_repr(self):
        d = self.source.token()
        self.post.answer()
        token = self.successResultOf(d)
        self.assertNotIn("tok-1", repr(token))
        self.assertNotIn(SECRET, repr(self.source))


class RefreshGrantTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        self.file = self.dir / "refresh"
        self.file.write_text("rt-old\n")
        self.file.chmod(0o644)
        self.clock, self.post = task.Clock(), Scripted()

    def source(self):
        return oauth2.OAuth2TokenSource("gmail", oauth_config(refresh_token_file=self.file), clock=self.clock,
                                        post=self.post)

    def test_a_rotated_refresh_token_is_written_back_with_mode_0600_and_used_next(self):
        source = self.source()
        d = source.token()
        self.assertEqual(self.post.calls[0][1], {"grant_type": "refresh_token", "client_id": "app-id",
                                                 "refresh_token": "rt-old"})
        self.post.answer(refresh_token="rt-new")
        self.successResultOf(d)
        self.assertEqual(self.file.read_text(), "rt-new\n")
        self.assertEqual(stat.S_IMODE(self.file.stat().st_mode), 0o600)
        self.assertEqual([p.name for p in self.dir.iterdir()], ["refresh"])     # no temporary file left
        self.clock.advance(3600)
        source.token()
        self.assertEqual(self.post.calls[1][1]["refresh_token"], "rt-new")
        self.source().token()                          # a restart reads the saved one
        self.assertEqual(self.post.calls[2][1]["refresh_token"], "rt-new")

    def test_a_refresh_token_changed_on_disk_is_picked_up(self):
        source = self.source()
        source.token()
        self.post.answer()
        self.file.write_text("rt-by-operator\n")
        self.clock.advance(3600)
        source.token()
        self.assertEqual(self.post.calls[1][1]["refresh_token"], "rt-by-operator")

    def test_the_client_secret_authenticates_the_refresh_grant_when_given(self):
        (self.dir / "secret").write_text("cs\n")
        source = oauth2.OAuth2TokenSource(
            "gmail", oauth_config(refresh_token_file=self.file, client_secret_file=self.dir / "secret",
                                  scope="https://mail.google.com/"), clock=self.clock, post=self.post)
        source.token()
        self.assertEqual(self.post.calls[0][1], {"grant_type": "refresh_token", "client_id": "app-id",
                                                 "refresh_token": "rt-old", "client_secret": "cs",
                                                 "scope": "https://mail.google.com/"})


class SASLStringTests(unittest.TestCase):
    def test_xoauth2(self):
        token = b"ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
        self.assertEqual(sasl.xoauth2_response("someuser@example.com", token),
                         b"user=someuser@example.com\x01auth=Bearer " + token + b"\x01\x01")

    def test_oauthbearer_rfc7628_example(self):
        # RFC 7628 section 4.1, without the base64
        self.assertEqual(sasl.oauthbearer_response("user@example.com", b"vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==",
                                                   "server.example.com", 143),
                         b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
                         b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01")

    def test_oauthbearer_escapes_the_authzid(self):
        self.assertTrue(sasl.oauthbearer_response("a,b=c", b"t", "h", 1).startswith(b"n,a=a=2Cb=3Dc,\x01"))

    def test_the_exchange_starts_without_an_initial_response_and_ends_a_failure_properly(self):
        login = sasl.BearerLogin("xoauth2", USER, b"tok", "smtp.example", 587)
        self.assertIsNone(login.start([b"PLAIN", b"LOGIN"]))
        exchange = login.start([b"PLAIN", b"XOAUTH2"])
        self.assertEqual(exchange.command, b"AUTH XOAUTH2")
        self.assertEqual(base64.b64decode(exchange.respond(b"")), sasl.xoauth2_response(USER, b"tok"))
        self.assertEqual(exchange.respond(b"eyJzdGF0dXMiOiI0MDEifQ=="), b"")
        self.assertIsNone(exchange.respond(b""))
        exchange.refused(535)
        self.assertTrue(login.rejected)
        self.assertEqual(exchange.scrub(b"echo tok"), b"echo [secret]")
        bearer = sasl.BearerLogin("oauthbearer", USER, b"tok", "smtp.example", 587).start([b"OAUTHBEARER"])
        bearer.respond(b"")
        self.assertEqual(bearer.respond(b"eyJ9"), b"AQ==")        # RFC 7628 3.2.3: a single ^A


class Peers:
    """A test CA, an HTTPS token endpoint and a TLS sink accepting the tokens the endpoint issues, and a
    config file naming both."""

    def __init__(self, test: unittest.TestCase, *, require_client_cert=False, implicit_tls=False, **endpoint):
        self.test = test
        self.dir = Path(test.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        self.ca = TestCA()
        self.ca_file = self.ca.write(self.dir)
        self.accepted: set[str] = set()
        self.reject: set[str] = set()          # tokens the sink refuses although the endpoint issued them

        def issued(token: str) -> None:
            if token not in self.reject:
                self.accepted.add(token)
        self.endpoint = TokenEndpoint(self.ca, client_secret=SECRET, on_issue=issued, **endpoint)
        self.endpoint.start(reactor)
        test.addCleanup(self.endpoint.stop)
        self.sink = Sink(bearer={USER: self.accepted})
        self.implicit_tls = implicit_tls
        self.port = self.sink.start(reactor, tls_options=self.ca.server_options(
            "127.0.0.1", require_client_cert=require_client_cert), implicit_tls=implicit_tls)
        test.addCleanup(self.sink.stop)
        (self.dir / "client.secret").write_text(SECRET + "\n")
        self.client_cert, self.client_key = self.ca.write_pair(self.dir, "relay-client.corp.example", "client",
                                                               client=True)

    def write_config(self, auth: str = "xoauth2", grant: str = "secret", extra: str = "") -> Path:
        grant_keys = ('oauth2_client_secret_file = "client.secret"\n' if grant == "secret" else
                      'oauth2_refresh_token_file = "refresh.token"\noauth2_client_secret_file = "client.secret"\n')
        security = "tls" if self.implicit_tls else "starttls"
        login = (f'username = "{USER}"\nauth = "{auth}"\noauth2_token_url = "{self.endpoint.url}"\n'
                 f'oauth2_client_id = "app-id"\n{grant_keys}oauth2_ca_file = "ca.pem"\n') if auth != "none" else ""
        path = self.dir / "tap.conf"
        path.write_text(f'hostname = "relay.test"\n[transports.hop]\nhost = "127.0.0.1"\nport = {self.port}\n'
                        f'security = "{security}"\nca_file = "ca.pem"\n{login}{extra}')
        return path

    def transport(self, path: Path | None = None, metrics=None, **kw) -> SmarthostTransport:
        c = load(path or self.write_config(**kw))
        hop = SmarthostTransport(c.transports["hop"], "relay.test", timeouts=FAST, metrics=metrics)
        self.test.addCleanup(hop.close_idle)
        return hop


def deliver(hop: SmarthostTransport, queue_id: str = "Q1") -> defer.Deferred:
    return hop.deliver(Message(queue_id), ["a@example.net"])


class RealPeerTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_one_token_serves_two_deliveries_and_the_string_is_exact(self):
        peers = Peers(self)
        hop = peers.transport()
        hop.pool.close()                                  # no connection reuse: each delivery does AUTH again
        for queue_id in ("Q1", "Q2"):
            [result] = yield deliver(hop, queue_id)
            self.assertEqual(result.code, 250, result)
        self.assertEqual(peers.endpoint.count, 1)
        self.assertEqual(len(peers.sink.sessions), 2)
        self.assertEqual([m.auth_identity for m in peers.sink.messages], [USER, USER])
        self.assertEqual(peers.sink.sasl, [("XOAUTH2", sasl.xoauth2_response(USER, b"at-1"), True)] * 2)
        self.assertEqual(peers.endpoint.requests[0]["grant_type"], "client_credentials")

    @defer.inlineCallbacks
    def test_deliveries_that_start_together_share_one_fetch(self):
        peers = Peers(self)
        hop = peers.transport()
        results = yield defer.gatherResults([deliver(hop, f"Q{n}") for n in range(3)])
        self.assertEqual([r.code for [r] in results], [250, 250, 250])
        self.assertEqual(peers.endpoint.count, 1)
        self.assertGreaterEqual(len(peers.sink.sessions), 2)      # several connections, one token

    @defer.inlineCallbacks
    def test_oauthbearer_names_host_and_port(self):
        peers = Peers(self)
        hop = peers.transport(auth="oauthbearer")
        [result] = yield deliver(hop)
        self.assertEqual(result.code, 250, result)
        [(mechanism, raw, ok)] = peers.sink.sasl
        self.assertEqual((mechanism, ok), ("OAUTHBEARER", True))
        self.assertEqual(raw, sasl.oauthbearer_response(USER, b"at-1", "127.0.0.1", peers.port))

    @defer.inlineCallbacks
    def test_an_expired_token_is_replaced(self):
        peers = Peers(self, expires_in=oauth2.EXPIRY_MARGIN)    # stale as soon as it arrives
        hop = peers.transport()
        hop.pool.close()
        for queue_id in ("Q1", "Q2"):
            [result] = yield deliver(hop, queue_id)
            self.assertEqual(result.code, 250, result)
        self.assertEqual(peers.endpoint.count, 2)
        self.assertEqual([raw for _, raw, _ in peers.sink.sasl],
                         [sasl.xoauth2_response(USER, b"at-1"), sasl.xoauth2_response(USER, b"at-2")])

    @defer.inlineCallbacks
    def test_a_535_gets_exactly_one_fresh_token_and_the_mail_goes(self):
        peers = Peers(self)
        peers.reject.add("at-1")                  # revoked at the smarthost although not yet expired
        log = capture_log(self)
        hop = peers.transport()
        [result] = yield deliver(hop)
        self.assertEqual(result.code, 250, result)
        self.assertEqual(peers.endpoint.count, 2)
        self.assertEqual([ok for _, _, ok in peers.sink.sasl], [False, True])
        self.assertEqual(peers.sink.after_error, [b""])       # the XOAUTH2 error challenge answered empty
        self.assertTrue(any("refused the token (535)" in line for line in log))

    @defer.inlineCallbacks
    def test_a_second_535_defers_without_a_third_fetch(self):
        peers = Peers(self)
        peers.reject.update({"at-1", "at-2", "at-3"})
        hop = peers.transport(auth="oauthbearer")
        [result] = yield deliver(hop)
        self.assertEqual((result.code // 100, result.status), (4, "4.7.8"))
        self.assertIn("535", result.text)
        self.assertEqual(peers.endpoint.count, 2)
        self.assertEqual(peers.sink.after_error, [b"AQ==", b"AQ=="])
        self.assertEqual(peers.sink.messages, [])

    @defer.inlineCallbacks
    def test_endpoint_failures_defer_with_454_and_the_next_try_delivers(self):
        peers = Peers(self)
        metrics = Metrics()
        log = capture_log(self)
        hop = peers.transport(metrics=metrics)
        hop.tokens.timeout = 1.0                         # the "hang" case, without waiting 30 s
        expected = {"500": "token endpoint answered HTTP 500",
                    "400": "token endpoint answered HTTP 400 (invalid_client)",
                    "badjson": "token endpoint answered something that is not a JSON object",
                    "hang": "token endpoint gave no answer within 1s"}
        for mode, reason in expected.items():
            peers.endpoint.mode = mode
            [result] = yield deliver(hop)
            self.assertEqual((result.code, result.status, result.text),
                             (454, "4.7.0", f"OAuth2 token unavailable: {reason}"), mode)
            peers.endpoint.release()
        self.assertEqual(peers.sink.sessions, [])          # no connection without a token
        peers.endpoint.mode = "ok"
        [result] = yield deliver(hop)
        self.assertEqual(result.code, 250, result)
        self.assertEqual(peers.endpoint.count, 5)
        def value(result):
            return metrics.registry.get_sample_value(
                "mailrelay_oauth2_token_fetches_total", {"transport": "hop", "result": result})
        self.assertEqual([value(r) for r in ("server_error", "refused", "bad_response", "timeout", "success")],
                         [1, 1, 1, 1, 1])
        for reason in expected.values():
            self.assertTrue(any(f"no token, mail for it waits: {reason}" in line for line in log), reason)
        everything = "\n".join(log) + str(result)
        for secret in (SECRET, "at-1"):
            self.assertNotIn(secret, everything)

    @defer.inlineCallbacks
    def test_an_unreachable_endpoint_defers(self):
        peers = Peers(self)
        path = peers.write_config()
        yield peers.endpoint.stop()
        [result] = yield deliver(peers.transport(path))
        self.assertEqual((result.code, result.status), (454, "4.7.0"))
        self.assertIn("OAuth2 token unavailable: token endpoint unreachable", result.text)

    @defer.inlineCallbacks
    def test_an_endpoint_certificate_from_another_ca_is_not_trusted(self):
        peers = Peers(self)
        TestCA().write(peers.dir)                          # ca.pem now names a CA that signed nothing here
        [result] = yield deliver(peers.transport())
        self.assertEqual((result.code, result.status), (454, "4.7.0"))
        self.assertEqual(peers.endpoint.count, 0)

    @defer.inlineCallbacks
    def test_refresh_token_rotation_survives_a_restart(self):
        peers = Peers(self, refresh_tokens=("rt-0",), rotate=True)
        refresh = peers.dir / "refresh.token"
        refresh.write_text("rt-0\n")
        path = peers.write_config(grant="refresh")
        [result] = yield deliver(peers.transport(path))
        self.assertEqual(result.code, 250, result)
        self.assertEqual(refresh.read_text(), "rt-1\n")
        self.assertEqual(stat.S_IMODE(refresh.stat().st_mode), 0o600)
        self.assertEqual(peers.endpoint.refresh_tokens, {"rt-1"})   # rt-0 is spent
        [result] = yield deliver(peers.transport(path))             # a new transport from the same config
        self.assertEqual(result.code, 250, result)
        self.assertEqual([r["refresh_token"] for r in peers.endpoint.requests], ["rt-0", "rt-1"])
        self.assertEqual(peers.endpoint.requests[1]["client_secret"], SECRET)


class ClientCertificateTests(unittest.TestCase):
    @defer.inlineCallbacks
    def check(self, implicit_tls: bool):
        peers = Peers(self, require_client_cert=True, implicit_tls=implicit_tls)
        cert = 'client_cert = "client.pem"\nclient_key = "client.key"\n'
        [result] = yield deliver(peers.transport(auth="none", extra=cert))
        self.assertEqual(result.code, 250, result)
        self.assertEqual(peers.sink.messages[0].client_cert, "relay-client.corp.example")
        self.assertEqual(peers.sink.messages[0].auth_identity, None)
        [result] = yield deliver(peers.transport(auth="none"))      # no certificate: the hop will not talk
        self.assertEqual(result.code // 100, 4, result)
        self.assertEqual(len(peers.sink.messages), 1)

    def test_presented_on_starttls(self):
        return self.check(implicit_tls=False)

    def test_presented_on_implicit_tls(self):
        return self.check(implicit_tls=True)

    @defer.inlineCallbacks
    def test_together_with_oauth2(self):
        peers = Peers(self, require_client_cert=True)
        [result] = yield deliver(peers.transport(extra='client_cert = "client.pem"\nclient_key = "client.key"\n'))
        self.assertEqual(result.code, 250, result)
        self.assertEqual((peers.sink.messages[0].client_cert, peers.sink.messages[0].auth_identity),
                         ("relay-client.corp.example", USER))


class ConfigTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        for name in ("secret", "refresh"):
            (self.dir / name).write_text("x\n")
        TestCA().write(self.dir)

    def load(self, body: str):
        path = self.dir / "tap.conf"
        path.write_text('hostname = "relay.test"\n[transports.m]\nhost = "smtp.office365.com"\n' + body)
        return load(path)

    def refused(self, body: str) -> config.ConfigError:
        error = self.assertRaises(config.ConfigError, self.load, body)
        self.assertNotIn("\n", str(error))
        return error

    OK = ('username = "u@corp.example"\nauth = "xoauth2"\noauth2_token_url = "https://login.example/t"\n'
          'oauth2_client_id = "id"\n')

    def test_client_credentials(self):
        t = self.load(self.OK + 'oauth2_client_secret_file = "secret"\noauth2_scope = "s"\noauth2_ca_file = "ca.pem"\n'
                      ).transports["m"]
        self.assertEqual((t.auth_kind, t.oauth2.grant, t.oauth2.scope, t.oauth2.ca_file),
                         ("xoauth2", "client_credentials", "s", self.dir / "ca.pem"))

    def test_refresh_token_with_or_without_the_client_secret(self):
        t = self.load(self.OK + 'oauth2_refresh_token_file = "refresh"\n').transports["m"]
        self.assertEqual(t.oauth2.grant, "refresh_token")
        t = self.load(self.OK + 'oauth2_refresh_token_file = "refresh"\noauth2_client_secret_file = "secret"\n'
                      ).transports["m"]
        self.assertEqual((t.oauth2.grant, t.oauth2.client_secret_file), ("refresh_token", self.dir / "secret"))

    def test_an_http_token_url_is_refused_naming_the_key(self):
        error = self.refused(self.OK.replace("https://", "http://") + 'oauth2_client_secret_file = "secret"\n')
        self.assertEqual(error.key, "transports.m.oauth2_token_url")
        self.assertIn("must be an https:// URL", str(error))

    def test_what_is_missing_or_contradictory_is_named(self):
        cases = {
            "transports.m.oauth2_client_secret_file": self.OK,
            "transports.m.username": self.OK.replace('username = "u@corp.example"\n', "")
            + 'oauth2_client_secret_file = "secret"\n',
            "transports.m.oauth2_client_id": self.OK.replace('oauth2_client_id = "id"\n', "")
            + 'oauth2_client_secret_file = "secret"\n',
            "transports.m.oauth2_token_url": self.OK.replace('oauth2_token_url = "https://login.example/t"\n', "")
            + 'oauth2_client_secret_file = "secret"\n',
            "transports.m.password_file": self.OK + 'oauth2_client_secret_file = "secret"\npassword_file = "secret"\n',
            "transports.m.auth": self.OK + 'oauth2_client_secret_file = "secret"\nsecurity = "none"\n',
            "transports.m.oauth2_refresh_token_file": self.OK + 'oauth2_refresh_token_file = "missing"\n',
            "transports.m.oauth2_ca_file":
                self.OK + 'oauth2_client_secret_file = "secret"\noauth2_ca_file = "secret"\n',
            "transports.m.oauth2_scope": 'username = "u"\npassword_file = "secret"\noauth2_scope = "s"\n',
            "transports.m.client_key": 'client_cert = "ca.pem"\n',
        }
        for key, body in cases.items():
            self.assertEqual(self.refused(body).key, key, body)

    def test_a_client_certificate_and_a_key_that_do_not_match_are_refused(self):
        ca = TestCA()
        ca.write_pair(self.dir, "a", "a", client=True)
        ca.write_pair(self.dir, "b", "b", client=True)
        self.load('client_cert = "a.pem"\nclient_key = "a.key"\n')
        error = self.refused('client_cert = "a.pem"\nclient_key = "b.key"\n')
        self.assertEqual(error.key, "transports.m.client_cert")

    def test_password_and_none_keep_working(self):
        c = self.load('username = "u"\npassword_file = "secret"\n')
        self.assertEqual(c.transports["m"].auth_kind, "password")
        self.assertEqual(self.load("").transports["m"].auth_kind, "none")
        self.assertEqual(self.refused('auth = "password"\n').key, "transports.m.username")


class CommandLineTests(unittest.TestCase):
    def run_cli(self, path: Path, *args: str) -> defer.Deferred:
        """main() in a thread (route-test blocks on the token endpoint this reactor serves)."""
        def run():
            out, err = io.StringIO(), io.StringIO()
            saved = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = out, err
            try:
                status = main([*args, "--config", str(path)])
            finally:
                sys.stdout, sys.stderr = saved
            return status, out.getvalue() + err.getvalue()
        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_check_prints_the_auth_kind_and_no_secret(self):
        peers = Peers(self)
        status, out = yield self.run_cli(peers.write_config(auth="oauthbearer"), "check")
        self.assertEqual(status, 0, out)
        self.assertIn(f"auth oauthbearer as {USER}: OAuth2 token from {peers.endpoint.url}", out)
        self.assertIn("client-credentials grant (client secret from", out)
        self.assertNotIn(SECRET, out)
        self.assertEqual(peers.endpoint.count, 0)           # check never asks for a token

    @defer.inlineCallbacks
    def test_route_test_says_whether_a_token_can_be_had_now(self):
        peers = Peers(self)
        path = peers.write_config(extra='[[route]]\nrecipients = ["*"]\ntransport = "hop"\n')
        status, out = yield self.run_cli(path, "route-test", "a@example.net")
        self.assertEqual(status, 0, out)
        self.assertIn(f"auth: xoauth2 (OAuth2 bearer token) as {USER}, client-credentials grant", out)
        self.assertIn("token: available now, valid for 3600s (not shown)", out)
        self.assertEqual(peers.endpoint.count, 1)
        peers.endpoint.mode = "400"
        status, out = yield self.run_cli(path, "route-test", "a@example.net")
        self.assertEqual(status, 2, out)
        self.assertIn("token: unavailable now: token endpoint answered HTTP 400 (invalid_client)", out)
        for secret in (SECRET, "at-1"):
            self.assertNotIn(secret, out)


class TestDoubleTests(unittest.TestCase):
    def test_the_message_double_is_an_ispooledmessage(self):
        """What the hops here are given provides the interface they rely on (no probing)."""
        self.assertTrue(verifyObject(ISpooledMessage, Message()))
