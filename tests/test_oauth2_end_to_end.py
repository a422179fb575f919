"""OAuth2 smarthost delivery through the whole relay: a real `twistd`, a real HTTPS token endpoint and a
TLS next hop that demands a client certificate and checks the XOAUTH2 string.

Proved here: a failing token endpoint leaves the message queued with a 454 4.7.0 (never a bounce) and a
log line saying why; once the endpoint recovers the message is delivered; a rotated refresh token is
saved and used by the next relay process; tokens, the client secret and refresh tokens appear in no
log, no `mailrelay queue` output and no metric; the fetches are counted by result.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from tests.support.pki import TestCA
from tests.support.polling import until
from tests.support.relay import RelayFixture, free_port
from tests.support.sink import Sink
from tests.support.tokenserver import TokenEndpoint

SECRET = "Kx9-client-secret-e2e"
PREFIX = "Zq7tok"
USER = "relay@corp.example"


def message(n: int) -> bytes:
    return (f"From: app@example.org\r\nTo: user@example.com\r\nMessage-ID: <oauth-{n}@example.org>\r\n"
            f"Subject: oauth {n}\r\n\r\nbody {n}\r\n").encode()


class OAuth2ThroughTwistd(unittest.TestCase):
    timeout = 180
    process = "inline"          # [delivery] process

    def setUp(self):
        self.ca = TestCA()
        self.accepted: set[str] = set()
        self.endpoint = TokenEndpoint(self.ca, client_secret=SECRET, refresh_tokens=(f"{PREFIX}rt-0",), rotate=True,
                                      on_issue=self.accepted.add, prefix=PREFIX)
        self.endpoint.start(reactor)
        self.addCleanup(self.endpoint.stop)
        self.sink = Sink(bearer={USER: self.accepted})
        sink_port = self.sink.start(reactor, tls_options=self.ca.server_options("127.0.0.1", require_client_cert=True))
        self.addCleanup(self.sink.stop)
        self.metrics_port = free_port()
        self.relay = RelayFixture(self.mktemp(), extra=(
            f'[transports.m365]\nhost = "127.0.0.1"\nport = {sink_port}\nsecurity = "starttls"\n'
            f'ca_file = "ca.pem"\nusername = "{USER}"\nauth = "xoauth2"\n'
            f'oauth2_token_url = "{self.endpoint.url}"\noauth2_client_id = "app-id"\n'
            'oauth2_client_secret_file = "client.secret"\noauth2_refresh_token_file = "refresh.token"\n'
            'oauth2_scope = "https://mail.google.com/"\noauth2_ca_file = "ca.pem"\n'
            'client_cert = "client.pem"\nclient_key = "client.key"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "m365"\n\n'
            '[queue]\nfirst_retry = "1s"\nmax_retry = "2s"\n\n'
            f'[delivery]\nprocess = "{self.process}"\n\n'
            # the token client runs where delivery runs: its counts are on that process's endpoint
            f'[metrics]\n{"delivery_endpoint" if self.process == "separate" else "endpoint"} = '
            f'"tcp:{self.metrics_port}:interface=127.0.0.1"\n'
        ))
        d = self.relay.dir
        self.ca.write(d)
        self.ca.write_pair(d, "relay-client.corp.example", "client", client=True)
        (d / "client.secret").write_text(SECRET + "\n")
        (d / "refresh.token").write_text(f"{PREFIX}rt-0\n")
        self.addCleanup(self.relay.kill)

    def run_cli(self, *args: str) -> defer.Deferred:
        """Deferred[output] of `mailrelay ARGS --config ...` run in a thread (the reactor keeps serving)."""
        return threads.deferToThread(self._cli, *args)

    def _cli(self, *args: str) -> str:
        result = subprocess.run([str(Path(sys.executable).with_name("mailrelay")), *args, "--config",
                                 str(self.relay.path)], capture_output=True, text=True, timeout=60)
        return result.stdout + result.stderr

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()

    @defer.inlineCallbacks
    def test_deferred_while_the_endpoint_fails_then_delivered_and_the_rotation_survives_a_restart(self):
        log = self.relay.dir / "twistd.log"
        self.endpoint.mode = "500"
        yield threads.deferToThread(self.relay.spawn)
        code, _ = yield self.relay.submit("relay", "app@example.org", ["user@example.com"], message(1))
        self.assertEqual(code, 250)
        yield self.endpoint.wait_for(2)                   # the first attempt and one retry, both refused
        yield until(lambda: self.run_cli("queue", "list").addCallback(
            lambda out: "OAuth2 token unavailable" in out), "the token error in the queue listing", interval=0.1)
        listing = yield self.run_cli("queue", "list")
        json_listing = yield self.run_cli("queue", "list", "--json")
        self.assertIn("454 4.7.0 OAuth2 token unavailable", listing)
        self.assertIn("token endpoint answered HTTP 500", json_listing)
        yield until(lambda: "token endpoint answered HTTP 500" in log.read_text(), "the HTTP 500 in the log",
                    interval=0.1)
        self.assertEqual(self.sink.messages, [])
        self.assertEqual(self.sink.sessions, [])          # no connection to the smarthost without a token
        failed = self.endpoint.count

        self.endpoint.mode = "ok"
        [delivered] = yield self.sink.wait_for(1)
        self.assertIn(b"<oauth-1@example.org>", delivered.data)
        self.assertEqual((delivered.auth_identity, delivered.client_cert), (USER, "relay-client.corp.example"))
        rotated = (self.relay.dir / "refresh.token").read_text().strip()
        self.assertEqual(rotated, self.endpoint.issued[0].replace("at-", "rt-"))
        yield until(lambda: self.run_cli("queue", "list").addCallback(lambda out: "queue is empty" in out),
                    "the queue to empty", interval=0.1)
        metrics = yield threads.deferToThread(self.scrape)
        self.assertIn('mailrelay_oauth2_token_fetches_total{result="success",transport="m365"} 1.0', metrics)
        self.assertIn(f'mailrelay_oauth2_token_fetches_total{{result="server_error",transport="m365"}} {failed:.1f}',
                      metrics)

        yield threads.deferToThread(self.relay.kill, signal.SIGTERM)  # a new process, the same config
        yield threads.deferToThread(self.relay.spawn)
        code, _ = yield self.relay.submit("relay", "app@example.org", ["user@example.com"], message(2))
        self.assertEqual(code, 250)
        yield self.sink.wait_for(2)
        self.assertEqual(self.endpoint.requests[-1]["refresh_token"], rotated)   # the saved one, not rt-0
        self.assertEqual(self.endpoint.requests[-1]["client_secret"], SECRET)
        yield threads.deferToThread(self.relay.kill, signal.SIGTERM)

        secrets = [SECRET, *self.endpoint.issued, f"{PREFIX}rt-0", *self.endpoint.refresh_tokens, PREFIX]
        everything = {"twistd.log": log.read_text(), "queue list": listing, "metrics": metrics,
                      "queue json": json_listing}
        for where, text in everything.items():
            for secret in secrets:
                self.assertNotIn(secret, text, f"{secret!r} in {where}")


class OAuth2ThroughTwistdWithASeparateDeliveryProcess(OAuth2ThroughTwistd):
    """The same, with the token client in the delivery process (`[delivery] process = "separate"`)."""
    process = "separate"
