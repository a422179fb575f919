"""The PROXY protocol over real sockets: the relay (make_service, every listener with proxy_protocol) behind
the real HAProxy (Debian's `haproxy`, started here with a private config on loopback), and behind
nothing at all.

The client connects from 127.0.0.5; HAProxy reaches the relay from 127.0.0.1, its own address and the
only trusted proxy.  The one network permit rule is 127.0.0.5/32, so a message relayed without AUTH
proves the rules saw the header's client, and the same client connecting from 127.0.0.1 through the same
HAProxy is refused (550 5.7.1): the proxy's address never counts.  Each delivered message's Received
field (read at the sink, the real next hop) and the relay's log line for the queued message name
127.0.0.5.  Through
HAProxy: v1 (`send-proxy`) and v2 with TLVs (`send-proxy-v2 proxy-v2-options unique-id`) on port 25,
STARTTLS on 587, implicit TLS on 465 (HAProxy in TCP mode, TLS ends at the relay).  Without HAProxy: a
peer outside trusted_proxies, and a trusted peer that sends no header, get no banner and a closed
connection; a header written by hand followed by a TLS handshake works on 465.
"""
from __future__ import annotations

import email
import smtplib
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from mailrelay.server.proxyheader import V2_SIGNATURE
from tests.support.logcapture import LogLines
from tests.support.relay import PASSWORD, RelayFixture, free_ports
from tests.support.sink import Sink

HAPROXY = Path("/usr/sbin/haproxy")
CLIENT = "127.0.0.5"          # the real client; HAProxy itself connects from 127.0.0.1
MESSAGE = b"From: <app@example.org>\r\nTo: <user@example.com>\r\nSubject: through the balancer\r\n\r\nhello\r\n"
LISTENER_KEYS = 'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\n'
PERMITS = ('[[permit]]\nnetworks = ["127.0.0.5/32"]\n\n'
           '[[permit]]\nusers = ["*"]\nsenders = ["example.org"]\n')


class HAProxy:
    """haproxy -db (foreground) with one TCP frontend per entry of `backends` ({name: "port options"})."""

    def __init__(self, directory: Path, backends: dict[str, str]):
        self.ports = dict(zip(backends, free_ports(len(backends))))
        sections = ["global\n    maxconn 200\n",
                    "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n"
                    "    timeout server 60s\n"]
        for name, server in backends.items():
            sections.append(f"frontend fe_{name}\n    bind 127.0.0.1:{self.ports[name]}\n"
                            "    unique-id-format %[uuid()]\n"
                            f"    default_backend be_{name}\n"
                            f"backend be_{name}\n    server relay 127.0.0.1:{server}\n")
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "haproxy.cfg"
        self.config.write_text("\n".join(sections))
        self.log = open(directory / "haproxy.log", "wb")
        self.process = subprocess.Popen([str(HAPROXY), "-db", "-f", str(self.config)], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        self._wait_listening()

    def _wait_listening(self) -> None:
        """Until every frontend port is bound (a bind of our own fails): no test connection is made."""
        deadline = time.monotonic() + 20
        waiting = set(self.ports.values())
        while waiting and time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.process.returncode}: "
                                   + Path(self.log.name).read_text()[-2000:])
            for port in list(waiting):
                probe = socket.socket()
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    waiting.discard(port)
                finally:
                    probe.close()
            time.sleep(0.05)
        if waiting:
            self.stop()
            raise RuntimeError(f"haproxy did not bind {sorted(waiting)} within 20 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def submit(port: int, source: str, *, tls: str = "none", cafile: str | None = None,
           user: str | None = None, rcpt: str = "user@example.com"):
    """One message to 127.0.0.1:`port` from `source`: the final (code, text), or smtplib's exception."""
    context = None
    if tls != "none":
        context = ssl.create_default_context(cafile=cafile)
        context.check_hostname = False
    if tls == "implicit":
        smtp = smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=30, source_address=(source, 0))
    else:
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0))
    with smtp:
        smtp.ehlo("client.test")
        if tls == "starttls":
            smtp.starttls(context=context)
            smtp.ehlo("client.test")
        if user:
            smtp.login(user, PASSWORD)
        smtp.sendmail("app@example.org", [rcpt], MESSAGE)
        return smtp.noop()


class RelayBehind(unittest.TestCase):
    """A relay whose three listeners take the PROXY protocol from 127.0.0.1 only, delivering to a sink."""
    timeout = 120

    def setUp(self):
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        extra = (f'[transports.sink]\nhost = "127.0.0.1"\nport = {self.sink_port}\nsecurity = "none"\n\n'
                 '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n[delivery]\nprocess = "inline"\n')
        self.relay = RelayFixture(self.mktemp(), extra=extra, permits=PERMITS, listener_keys=LISTENER_KEYS)
        self.relay.start(reactor)
        self.addCleanup(self.relay.stop)
        self.log = LogLines(self)

    @defer.inlineCallbacks
    def delivered_from(self, count: int):
        """The Received field of delivered message `count` (1-based)."""
        yield self.sink.wait_for(count)
        message = email.message_from_bytes(self.sink.messages[count - 1].data)
        return " ".join(message.get_all("Received")[0].split())


class BehindHAProxy(RelayBehind):

    def setUp(self):
        if not HAPROXY.exists():
            raise unittest.SkipTest(f"{HAPROXY} is absent: install Debian's haproxy package to run these")
        super().setUp()
        ports = self.relay.ports
        self.haproxy = HAProxy(Path(self.mktemp()), {
            "v1": f"{ports['relay']} send-proxy",
            "v2": f"{ports['relay']} send-proxy-v2 proxy-v2-options unique-id",
            "submission": f"{ports['submission']} send-proxy",
            "submissions": f"{ports['submissions']} send-proxy-v2 proxy-v2-options unique-id",
        })
        self.addCleanup(self.haproxy.stop)

    @defer.inlineCallbacks
    def relay_through(self, frontend: str):
        port = self.haproxy.ports[frontend]
        code, _ = yield threads.deferToThread(submit, port, CLIENT)
        self.assertEqual(code, 250)
        received = yield self.delivered_from(1)
        self.assertTrue(received.startswith("from client.test ([127.0.0.5]) by relay.test"), received)
        self.assertTrue([line for line in self.log.lines if ": client=127.0.0.5, identity=permit[0]" in line],
                        self.log.text()[-2000:])
        # HAProxy's own address, through the same HAProxy: not the permit rule's network.
        failure = yield self.assertFailure(threads.deferToThread(submit, port, "127.0.0.1"),
                                           smtplib.SMTPRecipientsRefused)
        (code, text), = failure.recipients.values()
        self.assertEqual((code, text[:5]), (550, b"5.7.1"))

    def test_v1_client_address_is_the_one_rules_and_received_see(self):
        return self.relay_through("v1")

    def test_v2_with_tlvs_client_address_is_the_one_rules_and_received_see(self):
        return self.relay_through("v2")

    @defer.inlineCallbacks
    def authenticated_over_tls(self, kind: str, tls: str):
        """A login and a message over TLS through haproxy: Received names the real client."""
        code, _ = yield threads.deferToThread(submit, self.haproxy.ports[kind], CLIENT, tls=tls,
                                              cafile=self.relay.ca_file(), user="app1")
        self.assertEqual(code, 250)
        received = yield self.delivered_from(1)
        self.assertTrue(received.startswith("from client.test ([127.0.0.5]) by relay.test"), received)
        self.assertIn("with ESMTPSA", received)
        yield self.relay.stop()
        self.assertNotIn("TLS handshake", self.log.text())      # the session heard the handshake finish

    def test_starttls_and_auth_on_587_behind_haproxy(self):
        return self.authenticated_over_tls("submission", "starttls")

    def test_implicit_tls_on_465_behind_haproxy(self):
        return self.authenticated_over_tls("submissions", "implicit")


def first_bytes(port: int, source: str, send: bytes = b"", wait: float = 3.0) -> bytes:
    """What the relay sends before it closes a connection from `source` (after we send `send`).  The relay
    aborts (a RST): it may even reach us before connect() returns."""
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=wait, source_address=(source, 0)) as s:
            if send:
                s.sendall(send)
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return data
                data += chunk
    except (ConnectionResetError, BrokenPipeError):
        return data


class WithoutAProxy(RelayBehind):

    @defer.inlineCallbacks
    def test_untrusted_peer_gets_no_banner(self):
        started = time.monotonic()
        data = yield threads.deferToThread(first_bytes, self.relay.ports["relay"], CLIENT)
        self.assertEqual(data, b"")
        self.assertLess(time.monotonic() - started, 2.0)          # closed at once, not by a timeout
        self.assertIn(f"PROXY protocol: connection from {CLIENT} on listen[0] closed: not in trusted_proxies",
                      self.log.text())

    @defer.inlineCallbacks
    def test_trusted_peer_without_a_header_gets_no_banner(self):
        data = yield threads.deferToThread(first_bytes, self.relay.ports["submission"], "127.0.0.1",
                                           b"EHLO client.test\r\n")
        self.assertEqual(data, b"")
        self.assertIn("PROXY protocol: connection from 127.0.0.1 on listen[1] closed: bad PROXY header",
                      self.log.text())

    @defer.inlineCallbacks
    def test_header_then_tls_on_465_by_hand(self):
        cafile = self.relay.ca_file()
        port = self.relay.ports["submissions"]

        def converse() -> str:
            header = (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 12) + socket.inet_aton("192.0.2.44")
                      + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 40404, port))
            context = ssl.create_default_context(cafile=cafile)
            context.check_hostname = False
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.sendall(header)
                with context.wrap_socket(raw) as tls:
                    banner = tls.recv(1024)
                    tls.sendall(b"QUIT\r\n")
                    return banner.decode()

        banner = yield threads.deferToThread(converse)
        self.assertTrue(banner.startswith("220 relay.test "), banner)
