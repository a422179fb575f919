"""DKIM follows the permit decision, through the whole relay over real sockets: our keys sign only mail
whose client may use the From: domain (an authenticated user or a network rule whose `senders` cover it),
never a stranger's through an `anyone` rule or the postmaster exception. Signatures are checked at a real
SMTP peer with dkimpy, keys served by a real DNS server on loopback."""
from __future__ import annotations

import dkim
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from mailrelay.dkim import keys
from mailrelay.dkim.verifier import make_resolver, txt_lookup
from tests.support.dnsserver import DNSServer
from tests.support.relay import RelayFixture
from tests.support.sink import Sink

RSA = keys.generate("rsa", 2048)

# 127.0.0.2: a network rule that may send as anything; 127.0.0.3: one that may send only as
# app.example.org, From: held to it (check_from_header = true); 127.0.0.4: the same, From: not held (the
# default for network rules);
# app1: a user allowed example.org; bob: a user allowed partner.example only, From: not checked;
# everybody else (127.0.0.1): the inbound gateway for example.com, or the postmaster.
PERMITS = """
[[permit]]
networks = ["127.0.0.2/32"]
senders = ["*"]

[[permit]]
networks = ["127.0.0.3/32"]
senders = ["app.example.org"]
check_from_header = true

[[permit]]
networks = ["127.0.0.4/32"]
senders = ["app.example.org"]

[[permit]]
users = ["app1"]
senders = ["example.org"]

[[permit]]
users = ["bob"]
senders = ["partner.example"]
check_from_header = false

[[permit]]
anyone = true
recipients = ["example.com"]
"""


def message(subject: str, sender: str = "ceo@example.org") -> bytes:
    return (f"From: CEO <{sender}>\r\nTo: u@example.com\r\nSubject: {subject}\r\n\r\n"
            "Please wire the money today.\r\n").encode("ascii")


class DKIMFollowsThePermitDecision(unittest.TestCase):
    timeout = 120
    DELIVERY = ""

    def setUp(self):
        self.dns = DNSServer({("rsa._domainkey.example.org", "TXT"): [keys.txt_record(RSA)]})
        self.dns_port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.lookup = txt_lookup(make_resolver([("127.0.0.1", self.dns_port)]))
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        self.relay = RelayFixture(self.mktemp(), users={"app1": "app1 password", "bob": "bob password"},
                                  permits=PERMITS, top='postmaster = "abuse@example.net"\n')
        (self.relay.dir / "rsa.pem").write_bytes(keys.private_pem(RSA))
        self.relay.path.write_text(self.relay.path.read_text() + (
            f'[transports.sink]\nhost = "127.0.0.1"\nport = {self.sink_port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n'
            f'[delivery]\nnameservers = ["127.0.0.1:{self.dns_port}"]\n{self.DELIVERY}\n'
            '[dkim]\nmode = "sign"\n[[dkim.key]]\ndomain = "example.org"\nselector = "rsa"\nkey_file = "rsa.pem"\n'))
        self.relay.start(reactor)
        self.addCleanup(self.relay.stop)

    def verify(self, data: bytes):
        def run():
            try:
                return dkim.DKIM(data).verify(dnsfunc=self.lookup)
            except dkim.ValidationError:
                return False
        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def delivered(self, count: int) -> dict:
        """The next hop's messages by Subject: (signed with our key, verifies)."""
        arrived = yield self.sink.wait_for(count)
        result = {}
        for transaction in arrived:
            subject = transaction.data.split(b"\r\nSubject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            signed = transaction.data.startswith(b"DKIM-Signature: ")
            valid = (yield self.verify(transaction.data)) if signed else None
            result[subject] = (signed, valid)
        return result

    @defer.inlineCallbacks
    def test_only_clients_allowed_the_from_domain_get_our_signature(self):
        submit = self.relay.submit
        sent = [
            (yield submit("relay", "ceo@example.org", ["u@example.com"], message("stranger"))),
            (yield submit("relay", "", ["postmaster"], message("postmaster"))),
            (yield submit("relay", "ceo@example.org", ["u@example.com"], message("network any"),
                          source="127.0.0.2")),
            (yield submit("relay", "app@app.example.org", ["u@example.com"], message("network lax"),
                          source="127.0.0.4")),
            (yield submit("submission", "ceo@example.org", ["u@example.com"], message("user"), user="app1")),
            (yield submit("submission", "news@partner.example", ["u@example.com"], message("user lax"),
                          user="bob")),
        ]
        self.assertEqual([code for code, _ in sent], [250] * len(sent))
        delivered = yield self.delivered(len(sent))
        self.assertEqual(delivered, {
            "stranger": (False, None),       # From: ceo@our-domain through the inbound gateway: not signed
            "postmaster": (False, None),     # anyone may write to the postmaster: never signed
            "network any": (True, True),     # senders = ["*"]
            "network lax": (False, None),    # From: outside its senders (not held to them): relayed unsigned
            "user": (True, True),            # app1 may use example.org
            "user lax": (False, None),       # bob may not, check_from_header = false
        })

    @defer.inlineCallbacks
    def test_a_network_client_whose_from_is_outside_its_senders_is_refused(self):
        reply = yield self.relay.submit("relay", "app@app.example.org", ["u@example.com"], message("refused"),
                                        source="127.0.0.3")
        self.assertEqual(reply, (550, b"5.7.1 From header not allowed for clients of this network"))
        code, _ = yield self.relay.submit("relay", "app@app.example.org", ["u@example.com"],
                                          message("allowed", sender="app@app.example.org"), source="127.0.0.3")
        self.assertEqual(code, 250)
        delivered = yield self.delivered(1)
        self.assertEqual(delivered, {"allowed": (True, True)})    # its own domain: signed (example.org's key)
        self.assertEqual(len(self.sink.messages), 1)


class InTheDeliveryProcess(DKIMFollowsThePermitDecision):
    """The same, the decision handed to a separate delivery process with the envelope."""
    DELIVERY = 'process = "separate"\n'
