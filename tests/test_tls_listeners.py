"""TLS on the three listener kinds, with real sockets and real clients (openssl s_client, Python's ssl,
pyOpenSSL) against a relay running in this process with a certificate from a test CA made here.

- ALPN: clients offering it (openssl -alpn smtp, Python offering smtp or h2/http/1.1) complete the
  handshake and no protocol is selected (RFC 7301 §3.2).
- Policy per kind: submission and submissions take forward-secret AEAD suites only; the relay port also
  CBC and static RSA, never NULL/anonymous/3DES; TLS 1.2 minimum everywhere; sessions resume (TLS 1.2
  session IDs, TLS 1.3 tickets); client-initiated renegotiation is refused, secure renegotiation signalled.
- Every failed handshake is logged once, naming the peer and the reason, and nothing the client sent.
"""
from __future__ import annotations

import socket
import ssl
import subprocess

from OpenSSL import SSL
from twisted.internet import defer, error, reactor, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailrelay import tls
from tests.support.polling import eventually
from tests.support.relay import RelayFixture
from tests.support.testca import issue

KINDS = ("relay", "submission", "submissions")
HANDSHAKE_LINE = "TLS handshake with"
SESSION_NAMESPACE = "mailrelay.server.session.RelaySession"


def _reply(sock) -> bytes:
    """One whole SMTP reply (all its lines), read without reading past it."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and any(len(line) > 3 and line[3:4] == b" " for line in lines[:-1]):
            return data


def _plain_to_starttls(port: int) -> socket.socket:
    """A plaintext connection that has been told 220 to STARTTLS (the handshake is the caller's)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    assert _reply(raw).startswith(b"220 ")
    raw.sendall(b"EHLO client.test\r\n")
    assert b"STARTTLS" in _reply(raw)
    raw.sendall(b"STARTTLS\r\n")
    assert _reply(raw).startswith(b"220 ")
    return raw


def tls_session(kind: str, port: int, context: ssl.SSLContext, session=None) -> dict:
    """Connect, handshake (implicit on submissions, STARTTLS otherwise), exchange one command under TLS,
    QUIT; what was negotiated."""
    raw = (socket.create_connection(("127.0.0.1", port), timeout=15) if kind == "submissions"
           else _plain_to_starttls(port))
    with context.wrap_socket(raw, server_hostname="relay.test", session=session) as s:
        if kind == "submissions":
            assert _reply(s).startswith(b"220 ")
        s.sendall(b"EHLO client.test\r\n")
        ehlo = _reply(s)
        s.sendall(b"QUIT\r\n")
        _reply(s)
        return {"version": s.version(), "cipher": s.cipher()[0], "alpn": s.selected_alpn_protocol(),
                "reused": s.session_reused, "session": s.session, "ehlo": ehlo}


class ListenerBase(unittest.TestCase):
    def setUp(self):
        self.pki = issue(self.mktemp(), key_type="rsa")
        self.relay = RelayFixture(self.mktemp(),
                                  extra=f'[tls]\ncert = "{self.pki.cert}"\nkey = "{self.pki.key}"\n')
        self.relay.start(reactor)
        self.addCleanup(self.relay.stop)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def context(self, maximum=None, ciphers=None, alpn=None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        if maximum is not None:
            context.maximum_version = maximum
        if ciphers is not None:
            context.set_ciphers(ciphers)
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        return context

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def handshake_lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events
                if e.get("log_namespace") == SESSION_NAMESPACE and HANDSHAKE_LINE in (e.get("log_format") or "")]

    @defer.inlineCallbacks
    def wait_for_handshake_lines(self, count: int = 1):
        yield eventually(lambda: len(self.handshake_lines()) >= count, timeout=5, interval=0.05)
        return self.handshake_lines()

    def openssl(self, kind: str, *args: str) -> defer.Deferred:
        """openssl s_client against the `kind` listener, verifying the chain and name; (exit code, output)."""
        command = ["openssl", "s_client", "-connect", f"127.0.0.1:{self.relay.ports[kind]}",
                   "-CAfile", str(self.pki.ca), "-verify_return_error", "-verify_hostname", "relay.test",
                   "-servername", "relay.test", *args]
        if kind != "submissions":
            command += ["-starttls", "smtp"]

        def run():
            done = subprocess.run(command, input=b"QUIT\r\n", capture_output=True, timeout=30)
            return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")
        return threads.deferToThread(run)


class ALPNTests(ListenerBase):
    @defer.inlineCallbacks
    def check_openssl_alpn(self, kind: str):
        code, out = yield self.openssl(kind, "-alpn", "smtp")
        self.assertEqual(code, 0, out)
        self.assertIn("Verify return code: 0 (ok)", out)
        self.assertIn("No ALPN negotiated", out)
        self.assertIn("New, TLSv1.3, Cipher is TLS_", out)
        self.assertNotIn("alert", out)
        # A browser-like offer over TLS 1.2: still no protocol picked, and RFC 5746 signalled.
        code, out = yield self.openssl(kind, "-tls1_2", "-alpn", "h2,http/1.1")
        self.assertEqual(code, 0, out)
        self.assertIn("No ALPN negotiated", out)
        self.assertIn("Secure Renegotiation IS supported", out)
        self.assertIn("Cipher is ECDHE-RSA-", out)
        self.assertEqual(self.handshake_lines(), [])

    def test_openssl_alpn_relay(self):
        return self.check_openssl_alpn("relay")

    def test_openssl_alpn_submission(self):
        return self.check_openssl_alpn("submission")

    def test_openssl_alpn_submissions(self):
        return self.check_openssl_alpn("submissions")

    @defer.inlineCallbacks
    def test_python_clients_offering_alpn_on_every_listener(self):
        for kind in KINDS:
            for offer in (["smtp"], ["h2", "http/1.1"]):
                result = yield threads.deferToThread(
                    tls_session, kind, self.relay.ports[kind], self.context(alpn=offer))
                self.assertIsNone(result["alpn"], (kind, offer))
                self.assertEqual(result["version"], "TLSv1.3")
                self.assertIn(b"250", result["ehlo"])
                if kind != "relay":
                    self.assertIn(b"AUTH PLAIN LOGIN", result["ehlo"])    # the session goes on under TLS
        self.assertEqual(self.handshake_lines(), [])


class PolicyTests(ListenerBase):
    @defer.inlineCallbacks
    def outcome(self, kind: str, context: ssl.SSLContext):
        """The cipher negotiated, or "refused" when the handshake failed."""
        try:
            result = yield threads.deferToThread(tls_session, kind, self.relay.ports[kind], context)
        except (ssl.SSLError, ConnectionError, OSError):
            return "refused"
        return result["cipher"]

    @defer.inlineCallbacks
    def test_submission_ports_take_only_forward_secret_aead_the_relay_port_also_cbc_and_static_rsa(self):
        tls12 = ssl.TLSVersion.TLSv1_2
        for suite, relay_takes in (("ECDHE-RSA-AES128-GCM-SHA256", True), ("ECDHE-RSA-CHACHA20-POLY1305", True),
                                   ("DHE-RSA-AES256-GCM-SHA384", True), ("ECDHE-RSA-AES128-SHA", True),
                                   ("ECDHE-RSA-AES256-SHA384", True), ("DHE-RSA-AES128-SHA256", False),
                                   ("AES128-GCM-SHA256", True), ("AES256-SHA", True)):
            aead_fs = suite.startswith(("ECDHE-", "DHE-")) and ("GCM" in suite or "CHACHA20" in suite)
            for kind in KINDS:
                got = yield self.outcome(kind, self.context(maximum=tls12, ciphers=suite))
                takes = relay_takes if kind == "relay" else aead_fs
                self.assertEqual(got, suite if takes else "refused", (kind, suite))

    @defer.inlineCallbacks
    def test_no_listener_takes_null_anonymous_or_3des_suites(self):
        for suite in ("NULL-SHA256", "ECDHE-RSA-NULL-SHA", "AECDH-AES128-SHA", "ADH-AES128-GCM-SHA256",
                      "DES-CBC3-SHA", "ECDHE-RSA-DES-CBC3-SHA"):
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.set_ciphers(f"{suite}:@SECLEVEL=0")
            except ssl.SSLError:
                continue          # this OpenSSL cannot even offer it
            for kind in KINDS:
                got = yield self.outcome(kind, context)
                self.assertEqual(got, "refused", (kind, suite))

    @defer.inlineCallbacks
    def test_tls_1_1_is_refused_and_logged_on_every_listener(self):
        for kind in KINDS:
            code, out = yield self.openssl(kind, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
            self.assertNotEqual(code, 0, out)
        lines = yield self.wait_for_handshake_lines(3)
        for kind in KINDS:
            self.assertTrue(any(f"on the {kind} listener failed: unsupported protocol" in line and "127.0.0.1" in line
                                for line in lines), (kind, lines))

    @defer.inlineCallbacks
    def test_sessions_resume_on_every_listener_with_tls_1_2_and_1_3(self):
        for kind in KINDS:
            for maximum in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
                context = self.context(maximum=maximum)
                port = self.relay.ports[kind]
                first = yield threads.deferToThread(tls_session, kind, port, context)
                self.assertFalse(first["reused"])
                self.assertIsNotNone(first["session"], (kind, maximum))
                second = yield threads.deferToThread(tls_session, kind, port, context, first["session"])
                self.assertTrue(second["reused"], (kind, maximum))
                self.assertEqual(second["version"], first["version"])

    @defer.inlineCallbacks
    def test_client_initiated_renegotiation_is_refused(self):
        def renegotiate(kind: str) -> str:
            context = SSL.Context(SSL.TLS_CLIENT_METHOD)
            context.set_max_proto_version(SSL.TLS1_2_VERSION)
            port = self.relay.ports[kind]
            raw = socket.create_connection(("127.0.0.1", port), timeout=15) if kind == "submissions" \
                else _plain_to_starttls(port)
            raw.settimeout(None)           # pyOpenSSL wants a blocking socket
            connection = SSL.Connection(context, raw)
            connection.set_connect_state()
            connection.do_handshake()
            if kind == "submissions":
                assert connection.recv(4096).startswith(b"220 ")     # the greeting, before renegotiating
            connection.renegotiate()
            try:
                connection.do_handshake()
                return "renegotiated"
            except SSL.Error as e:
                return str(e)
            finally:
                raw.close()
        for kind in KINDS:
            outcome = yield threads.deferToThread(renegotiate, kind)
            self.assertIn("no renegotiation", outcome, (kind, outcome))


class HandshakeFailureLogTests(ListenerBase):
    @defer.inlineCallbacks
    def test_garbage_after_starttls_is_logged_with_peer_and_reason_and_not_the_bytes(self):
        secret = "AHVzZXIAaHVudGVyMg=="
        for kind in ("relay", "submission"):
            def garbage(kind=kind):
                raw = _plain_to_starttls(self.relay.ports[kind])
                raw.sendall(f"AUTH PLAIN {secret}\r\n".encode() * 4)
                try:
                    while raw.recv(4096):
                        pass
                except OSError:
                    pass
                raw.close()
            yield threads.deferToThread(garbage)
        lines = yield self.wait_for_handshake_lines(2)
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("TLS handshake with 127.0.0.1 on the relay listener failed: ", lines[0])
        self.assertIn("TLS handshake with 127.0.0.1 on the submission listener failed: ", lines[1])
        for line in lines:
            reason = line.rsplit("failed: ", 1)[1]
            self.assertIn(reason, ("wrong version number", "packet length too long", "http request",
                                   "unknown protocol", "record layer failure"))
        self.assertFalse([line for line in self.lines() if secret in line or "AUTH PLAIN" in line])

    @defer.inlineCallbacks
    def test_a_tls_1_0_only_client_on_the_implicit_tls_port_is_logged(self):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1
        with self.assertRaises(ssl.SSLError):
            yield threads.deferToThread(tls_session, "submissions", self.relay.ports["submissions"], context)
        lines = yield self.wait_for_handshake_lines()
        self.assertEqual(lines, ["TLS handshake with 127.0.0.1 on the submissions listener failed: "
                                 "unsupported protocol"])

    @defer.inlineCallbacks
    def test_no_shared_cipher_and_a_client_that_leaves_mid_handshake_are_logged(self):
        cbc_only = self.context(maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-RSA-AES128-SHA")
        with self.assertRaises(ssl.SSLError):
            yield threads.deferToThread(tls_session, "submission", self.relay.ports["submission"], cbc_only)

        def leave():
            _plain_to_starttls(self.relay.ports["relay"]).close()
        yield threads.deferToThread(leave)
        lines = yield self.wait_for_handshake_lines(2)
        self.assertEqual(sorted(lines), [
            "TLS handshake with 127.0.0.1 on the relay listener failed: connection closed by the client",
            "TLS handshake with 127.0.0.1 on the submission listener failed: no shared cipher",
        ])

    @defer.inlineCallbacks
    def test_a_client_rejecting_our_certificate_is_logged_with_its_alert(self):
        stranger = ssl.create_default_context(cafile=str(issue(self.mktemp(), key_type="ec").ca))
        with self.assertRaises(ssl.SSLError):
            yield threads.deferToThread(tls_session, "submissions", self.relay.ports["submissions"], stranger)
        lines = yield self.wait_for_handshake_lines()
        self.assertEqual(len(lines), 1, lines)
        # OpenSSL's client reports a chain it cannot verify with an alert: "unknown ca", or "decrypt error"
        # when an issuer of the same name is found but its signature does not match.
        self.assertRegex(lines[0], r"^TLS handshake with 127\.0\.0\.1 on the submissions listener failed: "
                                   r"tlsv1 alert (unknown ca|bad certificate|decrypt error)$")


class PolicyUnitTests(unittest.SynchronousTestCase):
    """The per-kind contexts themselves, and the reason text, without sockets."""

    def setUp(self):
        pair = issue(self.mktemp(), key_type="rsa")
        self.options = tls.listener_options(pair.cert, pair.key, KINDS)

    def ciphers(self, kind: str) -> list[str]:
        return SSL.Connection(self.options[kind].getContext(), None).get_cipher_list()

    def test_each_kind_gets_its_own_context_and_policy(self):
        self.assertEqual(set(self.options), set(KINDS))
        self.assertIs(self.options["submission"].policy, tls.SUBMISSION_POLICY)
        self.assertIs(self.options["submissions"].policy, tls.SUBMISSION_POLICY)
        self.assertIs(self.options["relay"].policy, tls.RELAY_POLICY)
        self.assertIsNot(self.options["submission"].getContext(), self.options["submissions"].getContext())

    def test_submission_suites_are_forward_secret_aead_or_tls_1_3(self):
        for kind in ("submission", "submissions"):
            for name in self.ciphers(kind):
                self.assertTrue(name.startswith("TLS_") or (
                    name.startswith(("ECDHE-", "DHE-")) and ("-GCM-" in name or "CHACHA20-POLY1305" in name)), name)

    def test_relay_suites_never_include_weak_ones_and_put_aead_first(self):
        names = self.ciphers("relay")
        for name in names:
            for weak in ("NULL", "RC4", "DES", "MD5", "EXP", "ADH", "AECDH", "PSK", "SRP", "anon"):
                self.assertNotIn(weak, name)
        tls12 = [n for n in names if not n.startswith("TLS_")]
        self.assertTrue(tls12[0].startswith("ECDHE-") and "GCM" in tls12[0], tls12)
        self.assertIn("AES128-GCM-SHA256", names)          # static RSA, for old senders

    def test_alpn_is_declined_not_answered_with_an_empty_protocol(self):
        self.assertIs(tls._decline_alpn(None, [b"smtp", b"h2"]), SSL.NO_OVERLAPPING_PROTOCOLS)

    def test_failure_reasons(self):
        try:
            raise SSL.Error([("SSL routines", "", "no shared cipher")])
        except SSL.Error:
            self.assertEqual(tls.handshake_failure(Failure()), "no shared cipher")
        self.assertEqual(tls.handshake_failure(Failure(error.ConnectionDone())), "connection closed by the client")
        self.assertEqual(tls.handshake_failure(Failure(error.ConnectionDone()), closed_by_us=True),
                         "closed by the relay before the handshake finished")

    def test_a_key_that_does_not_match_is_refused_in_one_line(self):
        other = issue(self.mktemp(), key_type="ec")
        mine = issue(self.mktemp(), key_type="rsa")
        with self.assertRaises(ValueError) as caught:
            tls.server_options(mine.cert, other.key)
        self.assertIn("do not match", str(caught.exception))
