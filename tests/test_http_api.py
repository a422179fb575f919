"""The HTTP injection API (`POST /v1/messages`) against a real relay on loopback, with a real HTTP client
(stdlib http.client in a thread, raw sockets where the test needs to see what the server does before the
body): 202 and delivery to a real next hop with DKIM signed, every error status, keys never logged."""
from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import signal
import subprocess
import sys
import time
from pathlib import Path

import dkim
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from mailrelay.dkim import keys
from mailrelay.server import apikeys
from mailrelay.server.http import body_limit, data_stream
from mailrelay.cli.check import describe
from mailrelay.config import ConfigError, Limits, load
from tests.support.logcapture import LogLines
from tests.support.relay import RelayFixture, free_port
from tests.support import testca
from tests.support.sink import Sink

ED = keys.generate("ed25519")
MESSAGE = "From: App <app@example.org>\nTo: u@example.com\nSubject: hello\n\nline one\n.leading dot\n"


def post(port: int, body, key: str | None, path: str = "/v1/messages", method: str = "POST",
         headers: dict | None = None, context: ssl.SSLContext | None = None):
    """(status, parsed JSON body, response headers) of one request (over TLS with `context`)."""
    if context is not None:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        if not isinstance(body, (bytes, type(None))):
            body = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None, dict(response.getheaders())
    finally:
        connection.close()


def request(**fields):
    body = {"from": "app@example.org", "to": ["u@example.com"], "message": MESSAGE}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


class HTTPRelay:
    """A relay with an http listener on a free loopback port and a sink as its only next hop."""

    def __init__(self, test: unittest.TestCase, sink_port: int, limits: str = "", dkim: bool = True,
                 tls: bool = False):
        self.port = free_port()
        directory = Path(test.mktemp()).absolute()
        endpoint = f"tcp:{self.port}:interface=127.0.0.1"
        self.context = None
        if tls:
            pair = testca.issue(directory / "pki")
            endpoint = f"ssl:{self.port}:interface=127.0.0.1:privateKey={pair.key}:certKey={pair.cert}"
            self.context = ssl.create_default_context(cafile=str(pair.ca))
        relay = RelayFixture(str(directory), extra=(
            f'[[listen]]\nkind = "http"\nendpoint = "{endpoint}"\n\n'
            '[http]\napi_keys_file = "apikeys"\n\n'
            f'[transports.sink]\nhost = "127.0.0.1"\nport = {sink_port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n'
            + (f"[limits]\n{limits}\n" if limits else "")
            + ('[dkim]\nmode = "sign"\n[[dkim.key]]\ndomain = "example.org"\nselector = "ed"\n'
               'key_file = "ed.pem"\n' if dkim else "")))
        (relay.dir / "ed.pem").write_bytes(keys.private_pem(ED))
        self.relay = relay
        self.key = apikeys.set_key(relay.dir / "apikeys", "app1")

    def post(self, body, key: str | None = "", **kwargs) -> defer.Deferred:
        return threads.deferToThread(post, self.port, body, self.key if key == "" else key,
                                     context=self.context, **kwargs)


def verify(message: bytes) -> bool:
    txt = keys.txt_record(ED)
    txt = txt.encode() if isinstance(txt, str) else txt
    return dkim.verify(message, dnsfunc=lambda name, timeout=5: txt)


class Base(unittest.TestCase):
    timeout = 60
    limits = ""

    def setUp(self):
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        self.api = HTTPRelay(self, self.sink_port, self.limits)
        self.logs = LogLines(self, raw=True)
        self.api.relay.start(reactor)
        self.addCleanup(self.api.relay.stop)


class Accepted(Base):
    @defer.inlineCallbacks
    def test_202_after_the_commit_and_delivered_signed(self):
        status, body, _ = yield self.api.post(request(to=["u@example.com", "v@example.com", "u@example.com"]))
        self.assertEqual(status, 202, body)
        queue_id = body["queue_id"]
        self.assertTrue(queue_id)
        arrived = (yield self.sink.wait_for(1))[0]
        self.assertEqual(arrived.mail_from, "app@example.org")
        self.assertEqual(sorted(arrived.rcpt_tos), ["u@example.com", "v@example.com"])    # duplicates once
        self.assertTrue(arrived.data.startswith(b"DKIM-Signature: "), arrived.data[:100])
        self.assertTrue((yield threads.deferToThread(verify, arrived.data)))
        # The same content rules as DATA: bare LF became CRLF, the dot line kept, our Received in front.
        self.assertIn(b"\r\nReceived: from [127.0.0.1] ([127.0.0.1])\r\n\tby relay.test (mailrelay) with HTTP\r\n"
                      b"\tid " + queue_id.encode(), arrived.data)
        self.assertTrue(arrived.data.endswith(b"Subject: hello\r\n\r\nline one\r\n.leading dot\r\n"))
        self.assertIn(queue_id, self.logs.text())                                 # logged as SMTP's
        metrics = self.api.relay.service.metrics
        self.assertEqual(metrics.registry.get_sample_value("mailrelay_messages_accepted_total",
                                                           {"listener": "http"}), 1.0)

    @defer.inlineCallbacks
    def test_dsn_requests_reach_a_hop_that_offers_dsn(self):
        self.sink.extensions += ("DSN",)
        status, body, _ = yield self.api.post(request(to=["u@example.com", "v@example.com"], dsn={
            "ret": "hdrs", "envid": "app id 7", "notify": ["SUCCESS", "FAILURE"],
            "orcpt": {"u@example.com": "rfc822;U+1@example.com"}}))
        self.assertEqual(status, 202, body)
        arrived = (yield self.sink.wait_for(1))[0]
        self.assertEqual([p for p in arrived.mail_params if p[:4] in ("RET=", "ENVI")],
                         ["RET=HDRS", "ENVID=app+20id+207"])
        self.assertEqual(arrived.rcpt_params, {
            "u@example.com": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;U+2B1@example.com"],
            "v@example.com": ["NOTIFY=SUCCESS,FAILURE"]})

    @defer.inlineCallbacks
    def test_no_202_before_the_commit_is_durable(self):
        spool, gate = self.api.relay.service.spool, defer.Deferred()
        real = spool.new_message

        def new_message(envelope):
            writer = real(envelope)
            commit = writer.commit
            writer.commit = lambda: gate.addCallback(lambda _: commit())    # the fsync'd commit, held back
            return writer
        spool.new_message = new_message
        answer = self.api.post(request())
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(answer.called)
        gate.callback(None)
        status, body, _ = yield answer
        self.assertEqual(status, 202, body)

    @defer.inlineCallbacks
    def test_any_content_type_is_read_as_json(self):
        # curl -d sends application/x-www-form-urlencoded unless told otherwise: the body is still JSON.
        for kind in ("application/x-www-form-urlencoded", "text/plain"):
            status, body, _ = yield self.api.post(request(), headers={"Content-Type": kind})
            self.assertEqual(status, 202, (kind, body))

    @defer.inlineCallbacks
    def test_key_never_in_the_log(self):
        yield self.api.post(request())
        yield self.api.post(request(), key=self.api.key + "x")       # a near miss
        yield self.api.post(request(), key="wrong-" + self.api.key)
        yield self.sink.wait_for(1)
        self.assertNotIn(self.api.key, self.logs.text())
        self.assertNotIn(self.api.key[:20], self.logs.text())
        stored = (self.api.relay.dir / "apikeys").read_text()
        self.assertNotIn(self.api.key, stored)
        self.assertEqual((self.api.relay.dir / "apikeys").stat().st_mode & 0o777, 0o600)

    @defer.inlineCallbacks
    def test_key_file_reread_when_replaced(self):
        old = self.api.key
        self.api.key = apikeys.set_key(self.api.relay.dir / "apikeys", "app1")
        status, _, _ = yield self.api.post(request(), key=old)
        self.assertEqual(status, 401)
        status, _, _ = yield self.api.post(request())
        self.assertEqual(status, 202)


class ConnectionLimit(Base):
    limits = "max_connections_per_ip = 2"

    @defer.inlineCallbacks
    def test_http_connections_count_with_the_smtp_ones(self):
        def probe():
            held = [socket.create_connection(("127.0.0.1", self.api.relay.ports["relay"]), timeout=10)]
            held[0].recv(100)                                 # the SMTP banner: counted
            held.append(socket.create_connection(("127.0.0.1", self.api.port), timeout=10))
            try:
                third = socket.create_connection(("127.0.0.1", self.api.port), timeout=10)
                with third:
                    try:
                        third.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                        return third.recv(100)
                    except ConnectionResetError:
                        return b""          # closed with our request unread: a reset, just as good
            finally:
                for s in held:
                    s.close()
        self.assertEqual((yield threads.deferToThread(probe)), b"")       # closed at once, unanswered
        for _ in range(100):                    # the relay counts them down once it sees them closed
            try:
                status, _, _ = yield self.api.post(request())
                break
            except (OSError, http.client.HTTPException):
                yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(status, 202)


class Reloaded(Base):
    @defer.inlineCallbacks
    def test_reload_applies_new_permit_rules_to_the_api(self):
        status, _, _ = yield self.api.post(request())
        self.assertEqual(status, 202)
        path = self.api.relay.path
        path.write_text(path.read_text().replace('users = ["*"]', 'users = ["someone-else"]'))
        self.assertTrue(self.api.relay.service.reload())
        status, answer, _ = yield self.api.post(request())
        self.assertEqual((status, answer.get("smtp")), (403, "550 5.7.1 Relay access denied"), answer)


class Refusals(Base):
    limits = 'max_message_size = "64KiB"\nmax_recipients = 3\nmessages_per_minute = 5'

    @defer.inlineCallbacks
    def assertRefused(self, status, body, expected: int, word: str, smtp: str | None = None, **kwargs):
        got, answer, headers = yield self.api.post(body, **kwargs)
        self.assertEqual(got, expected, answer)
        self.assertIn(word, answer["error"])
        if smtp is not None:
            self.assertTrue(answer["smtp"].startswith(smtp), answer)
        return headers

    @defer.inlineCallbacks
    def test_400_malformed(self):
        for body, word in [
            (b"{not json", "JSON"),
            (b"[1, 2]", "object"),
            (b"\xff\xfe", "JSON"),
            (request(to=None), "missing field 'to'"),
            (request(message=None), "missing field 'message'"),
            (request(extra=1), "unknown field"),
            (request(to="u@example.com"), '"to" must be'),
            (request(to=[]), '"to" must be'),
            (request(to=[1]), '"to" must be'),
            (request(**{"from": 5}), '"from" must be'),
            (request(message=""), '"message"'),
            (request(to=["no-at-sign"]), "to[0]"),
            (request(to=["a@example.com> NOTIFY=NEVER"]), "to[0]"),
            (request(**{"from": "a b@example.org"}), "from"),
            (request(to=["ü@ex☃mple.com"]), "IDNA2008"),      # UTF-8 is taken (SMTPUTF8), a bad IDN is not
            (request(dsn=["FULL"]), '"dsn" must be'),
            (request(dsn={"ret": "ALL"}), "dsn.ret"),
            (request(dsn={"notify": ["NEVER", "SUCCESS"]}), "dsn.notify"),
            (request(dsn={"notify": ["SUCCESS", "SUCCESS"]}), "dsn.notify"),
            (request(dsn={"notify": "SUCCESS"}), "dsn.notify"),
            (request(dsn={"envid": "x" * 101}), "dsn.envid"),
            (request(dsn={"envid": "line\nbreak"}), "dsn.envid"),
            (request(dsn={"orcpt": {"other@example.com": "rfc822;other@example.com"}}), "not one of the recipients"),
            (request(dsn={"orcpt": {"u@example.com": "no type"}}), "dsn.orcpt"),
            (request(dsn={"later": 1}), "unknown field 'later'"),
            (request(requiretls="yes"), '"requiretls"'),
            (request(requiretls=True), "HTTPS"),         # RFC 8689 2: only over TLS
        ]:
            yield self.assertRefused(None, body, 400, word)

    @defer.inlineCallbacks
    def test_400_content_refused_as_in_data(self):
        yield self.assertRefused(None, request(message="From: app@example.org\r\n\r\nbare\rcr\r\n"), 400,
                                 "bare CR", "550 5.6.11")
        yield self.assertRefused(None, request(message="From: app@example.org\r\n\r\nnul\x00\r\n"), 400,
                                 "NUL", "550 5.6.0")
        yield self.assertRefused(None, request(to=[f"u{i}@example.com" for i in range(4)]), 400,
                                 "recipients", "452 4.5.3")
        self.assertEqual(self.sink.transactions, [])
        self.assertEqual(self.api.relay.service.spool.queue_ids(), [])     # nothing half-spooled

    @defer.inlineCallbacks
    def test_401_missing_or_bad_key(self):
        headers = yield self.assertRefused(None, request(), 401, "API key is required", key=None)
        self.assertEqual(headers.get("WWW-Authenticate"), 'Bearer realm="mailrelay"')
        yield self.assertRefused(None, request(), 401, "not valid", key="x" * 43)
        yield self.assertRefused(None, request(), 401, "required", key=None,
                                 headers={"Authorization": "Basic YTpi"})

    @defer.inlineCallbacks
    def test_403_not_permitted(self):
        yield self.assertRefused(None, request(**{"from": "app@evil.example"}), 403, "Sender address",
                                 "553 5.7.1")
        yield self.assertRefused(None, request(to=["u%evil.example@example.com"]), 403, "Relay access denied",
                                 "550 5.7.1")
        yield self.assertRefused(None, request(message="From: x@evil.example\r\n\r\nbody\r\n"), 403,
                                 "From header", "550 5.7.1")

    @defer.inlineCallbacks
    def test_413_over_max_message_size(self):
        big = "From: app@example.org\r\n\r\n" + ("x" * 70 + "\r\n") * 1000     # 72 KiB > 64 KiB, body < bound
        yield self.assertRefused(None, request(message=big), 413, "size", "552 5.3.4")

    @defer.inlineCallbacks
    def test_413_from_content_length_before_the_body(self):
        limit = body_limit(Limits(max_message_size=64 * 1024))

        def raw():
            with socket.create_connection(("127.0.0.1", self.api.port), timeout=30) as s:
                s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + self.api.key.encode()
                          + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (limit + 1))
                answer = b""
                while chunk := s.recv(65536):      # answered and closed with no body byte sent
                    answer += chunk
                return answer
        answer = yield threads.deferToThread(raw)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:100])
        self.assertIn(b"Connection: close", answer)

    @defer.inlineCallbacks
    def test_413_chunked_body_over_the_bound(self):
        limit = body_limit(Limits(max_message_size=64 * 1024))

        def raw():
            with socket.create_connection(("127.0.0.1", self.api.port), timeout=30) as s:
                s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + self.api.key.encode()
                          + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
                chunk = b"a" * 65536
                try:
                    for _ in range(limit // len(chunk) + 4):
                        s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                except OSError:
                    pass              # the server closed the connection: that is the point
                answer = b""
                try:
                    while data := s.recv(65536):
                        answer += data
                except OSError:
                    pass
                return answer
        answer = yield threads.deferToThread(raw)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:100])

    @defer.inlineCallbacks
    def test_429_over_the_rate(self):
        for _ in range(5):
            status, body, _ = yield self.api.post(request())
            self.assertEqual(status, 202, body)
        yield self.assertRefused(None, request(), 429, "Too many messages", "450 4.7.1")

    @defer.inlineCallbacks
    def test_503_when_the_spool_refuses(self):
        spool = self.api.relay.service.spool

        def refuse(envelope):
            raise OSError(28, "No space left on device")
        spool.new_message = refuse
        yield self.assertRefused(None, request(), 503, "Could not queue", "451 4.3.0")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    @defer.inlineCallbacks
    def test_404_and_405(self):
        yield self.assertRefused(None, request(), 404, "not found", path="/v1/other")
        headers = yield self.assertRefused(None, None, 405, "method not allowed", method="GET")
        self.assertEqual(headers.get("Allow"), "POST")


class Pieces(unittest.TestCase):
    def test_data_stream_is_what_a_client_would_send(self):
        self.assertEqual(data_stream(b"a\n.b\n"), b"a\n..b\r\n.\r\n")
        self.assertEqual(data_stream(b".\r\nx"), b"..\r\nx\r\n.\r\n")
        self.assertEqual(data_stream(b"a\r"), b"a\r\r\n.\r\n")

    def test_identify_needs_the_exact_key(self):
        path = Path(self.mktemp())
        key = apikeys.set_key(path, "svc")
        self.assertTrue(path.read_text().startswith("svc:sha256:"))
        store = apikeys.ApiKeyFile(path)
        self.assertEqual(store.identify(key), "svc")
        self.assertIsNone(store.identify(key[:-1]))
        self.assertIsNone(store.identify(""))
        self.assertIsNone(apikeys.ApiKeyFile(path.with_name("missing")).identify(key))


class Command(unittest.TestCase):
    def test_apikey_prints_the_key_once_on_the_last_line(self):
        relay = HTTPRelay(self, 2525, dkim=False)

        def run(*args):
            return subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "apikey", *args,
                                   "--config", str(relay.relay.path)], capture_output=True, text=True, timeout=60,
                                  env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
        done = run("svc")
        self.assertEqual(done.returncode, 0, done.stderr)
        key = done.stdout.splitlines()[-1]
        self.assertEqual(len(key), 43)
        self.assertEqual(apikeys.ApiKeyFile(relay.relay.dir / "apikeys").identify(key), "svc")
        self.assertEqual(apikeys.ApiKeyFile(relay.relay.dir / "apikeys").identify(relay.key), "app1")   # kept
        again = run("svc")
        self.assertNotEqual(again.stdout.splitlines()[-1], key)
        self.assertIsNone(apikeys.ApiKeyFile(relay.relay.dir / "apikeys").identify(key))   # replaced
        bad = run("a:b")
        self.assertEqual(bad.returncode, 2)
        self.assertEqual(len(bad.stderr.strip().splitlines()), 1)


class OverTLS(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_ssl_endpoint_serves_https(self):
        sink = Sink()
        port = sink.start(reactor)
        self.addCleanup(sink.stop)
        api = HTTPRelay(self, port, tls=True)
        api.relay.start(reactor)
        self.addCleanup(api.relay.stop)
        status, body, _ = yield api.post(request())
        self.assertEqual(status, 202, body)
        arrived = (yield sink.wait_for(1))[0]
        self.assertIn(b"(mailrelay) with HTTPS (version=TLSv1.", arrived.data)
        plain = yield threads.deferToThread(_plain_attempt, api.port)
        self.assertFalse(plain.startswith(b"HTTP/1.1 202"), plain[:80])      # no plaintext on that port
        # Over HTTPS "requiretls" is taken; the sink (plaintext) cannot carry it: a 5.7.10 report.
        status, body, _ = yield api.post(request(requiretls=True))
        self.assertEqual(status, 202, body)
        report = (yield sink.wait_for(2))[1]
        self.assertEqual(report.mail_from, "")
        self.assertIn(b"Status: 5.7.10", report.data)


def _plain_attempt(port: int) -> bytes:
    try:
        status = post(port, request(), "k")
        return repr(status).encode()
    except (OSError, http.client.HTTPException) as e:
        return repr(e).encode()


class ThroughTwistd(unittest.TestCase):
    """The listener as `twistd -n mailrelay` runs it, with the key checked against twistd's whole log."""
    timeout = 90

    @defer.inlineCallbacks
    def test_end_to_end(self):
        sink = Sink()
        port = sink.start(reactor)
        self.addCleanup(sink.stop)
        api = HTTPRelay(self, port)
        yield threads.deferToThread(api.relay.spawn)
        self.addCleanup(api.relay.kill)
        yield threads.deferToThread(_wait_for_port, api.port)
        status, body, _ = yield api.post(request())
        self.assertEqual(status, 202, body)
        status, _, _ = yield api.post(request(), key="not-" + api.key)
        self.assertEqual(status, 401)
        status, answer, _ = yield api.post(request(**{"from": "app@evil.example"}))
        self.assertEqual((status, answer["smtp"][:9]), (403, "553 5.7.1"))
        arrived = (yield sink.wait_for(1))[0]
        self.assertTrue((yield threads.deferToThread(verify, arrived.data)))
        api.relay.kill(signal.SIGTERM)
        log = (api.relay.dir / "twistd.log").read_text()
        self.assertIn(body["queue_id"], log)
        self.assertIn("HTTP submission from 127.0.0.1 as app1 refused: 403", log)
        self.assertNotIn(api.key, log)
        self.assertNotIn(api.key[:16], log)


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Configuration(unittest.TestCase):
    def write(self, text: str) -> Path:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('hostname = "relay.test"\n' + text)
        return path

    def test_http_listener_needs_a_key_file(self):
        with self.assertRaises(ConfigError) as caught:
            load(self.write('[[listen]]\nkind = "http"\n'))
        self.assertEqual(caught.exception.key, "http.api_keys_file")

    def test_require_tls_is_refused_on_http(self):
        with self.assertRaises(ConfigError) as caught:
            load(self.write('[[listen]]\nkind = "http"\nrequire_tls = true\n[http]\napi_keys_file = "k"\n'))
        self.assertEqual(caught.exception.key, "listen[0].require_tls")

    def test_default_endpoint_is_loopback_and_check_describes_it(self):
        config = load(self.write('[[listen]]\nkind = "http"\n[http]\napi_keys_file = "k"\n'))
        self.assertEqual(config.listeners[0].endpoint, "tcp:8025:interface=127.0.0.1")
        lines = dict(describe(config))
        self.assertIn("POST /v1/messages", lines["listen"])
        self.assertIn("API keys in", lines["http"])
