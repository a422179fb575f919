"""The adversarial battery, part 1: nmap's `smtp-open-relay` NSE script against every listener of a real
relay, from a client that no `[[permit]]` rule allows, with a real next hop recording anything that
reaches it.  Nothing may relay and nothing may reach the next hop (RFC 5321 3.6: never an open relay).

nmap runs its script only on ports it believes are SMTP, and speaks implicit TLS first only on ports it
believes are TLS: a private `--datadir` with an `nmap-services` file naming our free ports smtp /
submission / smtps makes it treat them as 25 / 587 / 465 (nmap still finds its scripts in its own
data directory).  The script never says STARTTLS, so the same sixteen MAIL FROM / RCPT TO pairs it
tries are also driven from Python after STARTTLS on the relay and submission listeners and over
implicit TLS on submissions.  A positive control runs nmap against a relay that allowlists 127.0.0.1
and must be reported as relaying, so a broken harness cannot pass by reporting nothing.
"""
from __future__ import annotations

import os
import shutil
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from twisted.internet import defer, reactor, task, threads, utils
from twisted.trial import unittest

from tests.support.relay import RelayFixture
from tests.support.sink import Sink
from tests.support.wire import WireClient, client_context, malformed

NMAP = shutil.which("nmap")
DOMAIN = "nmap.example.net"          # the script's recipient domain: one the relay does not serve
CLOSED = ('[[permit]]\nnetworks = ["192.0.2.0/24"]\n\n'        # 127.0.0.1 matches no rule
          '[[permit]]\nusers = ["*"]\nsenders = ["example.org"]\n')
SERVICES = {"relay": "smtp", "submission": "submission", "submissions": "smtps"}


def relay_pairs(domain: str, server: str, ip: str) -> list[tuple[str, str]]:
    """The MAIL FROM / RCPT TO pairs smtp-open-relay.nse tries (its defaults `antispam` / `relaytest`):
    plain, the server's own name, an address literal, %-hack, quoted, several @, source routes, bang
    paths."""
    frm, to, lit = f"antispam@[{ip}]", "relaytest", f"[{ip}]"
    return [
        ("", f"{to}@{domain}"),
        (f"antispam@{domain}", f"{to}@{domain}"),
        (f"antispam@{server}", f"{to}@{domain}"),
        (frm, f"{to}@{domain}"),
        (frm, f"{to}%{domain}@{lit}"),
        (frm, f"{to}%{domain}@{server}"),
        (frm, f'"{to}@{domain}"'),
        (frm, f'"{to}%{domain}"'),
        (frm, f"{to}@{domain}@{lit}"),
        (frm, f'"{to}@{domain}"@{lit}'),
        (frm, f"{to}@{domain}@{server}"),
        (frm, f"@{lit}:{to}@{domain}"),
        (frm, f"@{server}:{to}@{domain}"),
        (frm, f"{domain}!{to}"),
        (frm, f"{domain}!{to}@{lit}"),
        (frm, f"{domain}!{to}@{server}"),
    ]


class OpenRelay(unittest.TestCase):
    timeout = 120

    def setUp(self):
        if NMAP is None:
            raise unittest.SkipTest("nmap is not installed (Debian package nmap; .ci/run installs it)")
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)

    def start_relay(self, permits: str) -> RelayFixture:
        extra = (f'[transports.sink]\nhost = "127.0.0.1"\nport = {self.sink_port}\nsecurity = "none"\n\n'
                 '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n[queue]\nfirst_retry = "1s"\n')
        relay = RelayFixture(self.mktemp(), extra=extra, permits=permits)
        relay.start(reactor)
        self.addCleanup(relay.stop)
        return relay

    @defer.inlineCallbacks
    def nmap(self, relay: RelayFixture, kinds) -> dict:
        """Runs the script against the listeners `kinds`; returns {kind: the script's output}."""
        datadir = Path(self.mktemp())
        datadir.mkdir()
        (datadir / "nmap-services").write_text(
            "".join(f"{SERVICES[kind]}\t{relay.ports[kind]}/tcp\t0.5\n" for kind in kinds))
        report = datadir / "report.xml"
        args = ["-Pn", "-n", "-sT", "-vv", "--datadir", str(datadir),
                "-p", ",".join(str(relay.ports[kind]) for kind in kinds),
                "--script", "smtp-open-relay",
                "--script-args", f"smtp-open-relay.domain={DOMAIN},smtp-open-relay.ip=127.0.0.1",
                "-oX", str(report), "127.0.0.1"]
        out, err, code = yield utils.getProcessOutputAndValue(NMAP, args, env=dict(os.environ))
        self.assertEqual(code, 0, err.decode(errors="replace"))
        found = {}
        by_port = {str(port): kind for kind, port in relay.ports.items()}
        for port in ElementTree.parse(report).iter("port"):
            for script in port.iter("script"):
                if script.get("id") == "smtp-open-relay":
                    found[by_port[port.get("portid")]] = script.get("output")
        self.assertEqual(sorted(found), sorted(kinds), out.decode(errors="replace"))
        return found

    @defer.inlineCallbacks
    def assert_nothing_reached_the_next_hop(self):
        yield task.deferLater(reactor, 1.5, lambda: None)      # a delivery would start within ~0.1 s
        self.assertEqual(self.sink.sessions, [])
        self.assertEqual(self.sink.transactions, [])

    @defer.inlineCallbacks
    def test_nmap_finds_no_listener_relaying(self):
        relay = self.start_relay(CLOSED)
        found = yield self.nmap(relay, ["relay", "submission", "submissions"])
        # All sixteen tests reached RCPT on port 25 and each was refused (an error would read otherwise).
        self.assertEqual(found["relay"], "Server doesn't seem to be an open relay, all tests failed")
        # 587 and 465 refuse MAIL without AUTH (530): nmap's own verdict for a server that needs a login.
        # On 465 that verdict means nmap spoke TLS: the listener sends no banner before a handshake.
        self.assertEqual(found["submission"], "Server isn't an open relay, authentication needed")
        self.assertEqual(found["submissions"], "Server isn't an open relay, authentication needed")
        yield self.assert_nothing_reached_the_next_hop()

    @defer.inlineCallbacks
    def test_nmap_reports_an_allowlisted_client_as_relaying(self):
        # The positive control: the same harness sees relaying where it exists (127.0.0.1 allowlisted).
        relay = self.start_relay('[[permit]]\nnetworks = ["127.0.0.1/32"]\n')
        found = yield self.nmap(relay, ["relay"])
        self.assertTrue(found["relay"].startswith("Server is an open relay ("), found["relay"])
        yield self.assert_nothing_reached_the_next_hop()          # nmap never sends DATA

    @defer.inlineCallbacks
    def test_the_scripts_relay_tests_over_tls_on_every_listener(self):
        relay = self.start_relay(CLOSED)
        context = client_context(relay.ca_file())
        results = {}
        for kind in ("relay", "submission", "submissions"):
            results[kind] = yield threads.deferToThread(self.try_pairs, relay, kind, context)
        for kind, (accepted, replies, data_reply) in results.items():
            self.assertEqual(accepted, [], kind)
            self.assertEqual(malformed(replies), [], kind)
            self.assertGreaterEqual(data_reply, 500, kind)      # no recipient: nothing to send
        # 25 after STARTTLS: every RCPT is refused for good, 550 5.7.1 where relaying is decided, 501
        # for the routing forms (%, !, several @) refused for every client.
        rcpt = [r for r in results["relay"][1] if r.command.startswith(b"RCPT")]
        self.assertGreaterEqual(len(rcpt), 12)
        self.assertEqual([r for r in rcpt if not 500 <= r.code < 600], [])
        self.assertIn(550, {r.code for r in rcpt})
        # 587 / 465 without AUTH: every MAIL is refused with 530 5.7.0 (RFC 4954 6), so no RCPT is tried.
        for kind in ("submission", "submissions"):
            mail_codes = {r.code for r in results[kind][1] if r.command.startswith(b"MAIL")}
            self.assertEqual(mail_codes, {530}, kind)
        yield self.assert_nothing_reached_the_next_hop()

    def try_pairs(self, relay: RelayFixture, kind: str, context):
        """The script's sixteen pairs on one connection under TLS; returns (RCPTs accepted, every reply,
        the DATA reply)."""
        client = WireClient("127.0.0.1", relay.ports[kind],
                            implicit_tls=context if kind == "submissions" else None)
        try:
            greeting = client.reply()
            server = greeting.lines[0][4:].split(b" ")[0].decode()
            client.command(f"EHLO {DOMAIN}")
            if kind != "submissions":
                self.assertEqual(client.starttls(context).code, 220)
                client.command(f"EHLO {DOMAIN}")
            accepted = []
            for sender, recipient in relay_pairs(DOMAIN, server, "127.0.0.1"):
                client.command("RSET")
                if client.command(f"MAIL FROM:<{sender}>").code // 100 != 2:
                    continue
                reply = client.command(f"RCPT TO:<{recipient}>")
                if reply.code // 100 == 2:
                    accepted.append((sender, recipient))
            data_reply = client.command("DATA").code
            client.command("QUIT")
            return accepted, client.replies, data_reply
        finally:
            client.close()
