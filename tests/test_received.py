"""The Received field we prepend: the authenticated login appears only with [auth] received_shows_user."""
from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailrelay.server.received import protocol_name, received_header
from tests.support.relay import RelayFixture
from tests.support.sink import Sink

FIELDS = dict(helo="client.test", address="192.0.2.7", hostname="relay.test", queue_id="Q1",
              recipients=("b@example.net",), when=1_700_000_000.0, tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
              protocol=protocol_name(esmtp=True, tls=True, authenticated=True))


class ReceivedUserTests(unittest.TestCase):
    def test_the_login_is_left_out_by_default(self):
        for field in (received_header(**FIELDS, user="CORP\\jdoe"),
                      received_header(**FIELDS, user="CORP\\jdoe", show_user=False)):
            self.assertNotIn(b"jdoe", field)
            self.assertNotIn(b"authenticated as", field)
            self.assertIn(b"with ESMTPSA (version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384)\r\n\tid Q1\r\n", field)

    def test_the_login_is_named_when_asked_escaped_inside_its_comment(self):
        field = received_header(**FIELDS, user="CORP\\j(doe)", show_user=True)
        self.assertIn(b"\r\n\t(authenticated as CORP\\\\j\\(doe\\))\r\n\tid Q1\r\n", field)

    def test_no_user_no_comment_either_way(self):
        self.assertEqual(received_header(**FIELDS, show_user=True), received_header(**FIELDS))


class ReceivedUserEndToEnd(unittest.TestCase):
    """A message submitted with AUTH over real sockets, as the next hop receives it."""
    timeout = 60

    @defer.inlineCallbacks
    def deliver(self, auth_extra: str = "") -> defer.Deferred:
        sink = Sink()
        port = sink.start(reactor)
        self.addCleanup(sink.stop)
        relay = RelayFixture(self.mktemp(), users={"jdoe.corp": "a long password"}, extra=(
            f'[transports.sink]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n'))
        text = relay.path.read_text()
        relay.path.write_text(text.replace('[auth]\npassword_file = "passwords"\n',
                                           '[auth]\npassword_file = "passwords"\n' + auth_extra))
        relay.start(reactor)
        self.addCleanup(relay.stop)
        code, _ = yield relay.submit("submission", "app@example.org", ["u@example.net"],
                                     b"From: app@example.org\r\nSubject: hi\r\n\r\nbody\r\n", user="jdoe.corp")
        self.assertEqual(code, 250)
        [arrived] = yield sink.wait_for(1)
        return arrived.data

    @defer.inlineCallbacks
    def test_the_login_never_leaves_by_default(self):
        data = yield self.deliver()
        self.assertNotIn(b"jdoe", data.lower())
        self.assertIn(b"by relay.test (mailrelay) with ESMTPSA (version=TLSv1.3", data)

    @defer.inlineCallbacks
    def test_received_shows_user_names_it(self):
        data = yield self.deliver("received_shows_user = true\n")
        self.assertIn(b"\r\n\t(authenticated as jdoe.corp)\r\n", data)
