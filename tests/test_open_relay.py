"""A configuration that would make an open relay never runs: `anyone = true` with recipients "*", and
`networks` covering 0.0.0.0/0 or ::/0 (however written, alone or together) with recipients "*", are
refused with one line naming `permit[N]` — by config.load, by `mailrelay check`, by a real twistd at
start, and by a reload (in process and by SIGHUP to a real twistd), which keeps the running rules."""
from __future__ import annotations

import io
import ipaddress
import os
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

from twisted.internet import defer, reactor, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mailrelay.cli.main import main
from mailrelay.config import ConfigError, Limits, Permit, load
from mailrelay.envelope import ClientInfo
from mailrelay.server.policy import PermitPolicy
from tests.support.polling import eventually
from tests.support.relay import SEPARATE, RelayFixture
from tests.support.sink import Sink

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MESSAGE = b"From: app@example.org\r\nTo: user@example.com\r\nSubject: open\r\n\r\nbody\r\n"
OPEN_GATEWAY = '[[permit]]\nanyone = true\n'
OPEN_GATEWAY_LINE = ('permit[0]: anyone = true with recipients "*" (the default when recipients is left out) '
                     'would make an open relay; list the domains this gateway accepts')

# Every spelling of "all of IPv4" or "all of IPv6" the reader takes, each alone in one rule.
EVERYONE = {
    "0.0.0.0/0": "every IPv4 address (0.0.0.0/0)",
    "1.2.3.4/0": "every IPv4 address (0.0.0.0/0)",            # host bits are allowed, so this is 0/0 too
    "0.0.0.0/0.0.0.0": "every IPv4 address (0.0.0.0/0)",      # netmask notation
    " 0.0.0.0/0 ": "every IPv4 address (0.0.0.0/0)",
    "::ffff:0:0/96": "every IPv4 address (0.0.0.0/0)",        # IPv4-mapped: the policy unmaps it
    "::ffff:0.0.0.0/96": "every IPv4 address (0.0.0.0/0)",
    "::/0": "every IPv6 address (::/0)",
    "::0/0": "every IPv6 address (::/0)",
    "0:0:0:0:0:0:0:0/0": "every IPv6 address (::/0)",
    "2001:db8::1/0": "every IPv6 address (::/0)",
}


def write(directory: str, text: str) -> Path:
    path = Path(directory).absolute() / "tap.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class Refused(unittest.TestCase):
    def load(self, text: str):
        return load(write(self.mktemp(), text))

    def assertRefused(self, text: str, expected: str) -> str:
        path = write(self.mktemp(), text)
        error = self.assertRaises(ConfigError, load, path)
        line = str(error)
        self.assertNotIn("\n", line)
        self.assertEqual(line, f"{path}: {expected}")
        return line

    # --- anyone

    def test_anyone_with_recipients_left_out(self) -> None:
        self.assertRefused('[[permit]]\nusers = ["*"]\n\n' + OPEN_GATEWAY,
                           OPEN_GATEWAY_LINE.replace("permit[0]", "permit[1]"))

    def test_anyone_with_recipients_star(self) -> None:
        self.assertRefused('[[permit]]\nanyone = true\nrecipients = ["*"]\n',
                           'permit[0]: anyone = true with recipients "*" would make an open relay; '
                           'list the domains this gateway accepts')

    def test_anyone_with_star_among_domains(self) -> None:
        self.assertRefused('[[permit]]\nanyone = true\nrecipients = ["example.org", "*"]\n',
                           'permit[0]: anyone = true with recipients "*" would make an open relay; '
                           'list the domains this gateway accepts')
        self.assertRefused('[[permit]]\nanyone = true\nrecipients = " * "\n',
                           'permit[0]: anyone = true with recipients "*" would make an open relay; '
                           'list the domains this gateway accepts')

    def test_anyone_for_listed_domains_and_subdomains_loads(self) -> None:
        # "*.example.org" is not "*": it names example.org's subdomains only.
        c = self.load('[[permit]]\nanyone = true\nrecipients = ["example.org", "*.example.org"]\n')
        self.assertEqual(c.permits, (Permit(anyone=True, recipients=("example.org", "*.example.org")),))

    # --- networks

    def test_every_spelling_of_all_addresses_is_refused(self) -> None:
        for text, everyone in EVERYONE.items():
            self.assertRefused(f'[[permit]]\nnetworks = ["10.0.0.0/8", "{text}"]\n',
                               f'permit[0].networks[1]: "{text}" with recipients "*" (the default when recipients '
                               f'is left out) would make an open relay: it covers {everyone}; narrow networks or '
                               f'list the recipient domains')

    def test_a_single_string_is_named_without_an_index(self) -> None:
        self.assertRefused('[[permit]]\nnetworks = "::/0"\nrecipients = ["*"]\n',
                           'permit[0].networks: "::/0" with recipients "*" would make an open relay: it covers '
                           'every IPv6 address (::/0); narrow networks or list the recipient domains')

    def test_networks_that_cover_everything_together_are_refused(self) -> None:
        for networks, everyone in (
                ('"0.0.0.0/1", "128.0.0.0/1"', "every IPv4 address (0.0.0.0/0)"),
                ('"::ffff:0.0.0.0/97", "128.0.0.0/1"', "every IPv4 address (0.0.0.0/0)"),
                ('"::/1", "8000::/1"', "every IPv6 address (::/0)")):
            self.assertRefused(f'[[permit]]\nnetworks = [{networks}]\nrecipients = ["*"]\n',
                               f'permit[0].networks: these networks together cover {everyone}; with recipients "*" '
                               'that would make an open relay; narrow networks or list the recipient domains')

    def test_rules_that_cover_everything_together_are_refused(self) -> None:
        # First match wins: a narrower rule in between does not close what the two "*" rules open.
        self.assertRefused('[[permit]]\nnetworks = ["0.0.0.0/1"]\n\n'
                           '[[permit]]\nnetworks = ["10.0.0.0/8"]\nrecipients = ["example.org"]\n\n'
                           '[[permit]]\nnetworks = ["128.0.0.0/1"]\nrecipients = ["*"]\n',
                           'permit[2].networks: the networks of permit[0], permit[2] (each with recipients "*") '
                           'together cover every IPv4 address (0.0.0.0/0); that would make an open relay; '
                           'narrow networks or list the recipient domains')

    def test_an_earlier_narrow_rule_does_not_excuse_a_wide_one(self) -> None:
        self.assertRefused('[[permit]]\nnetworks = ["192.0.2.1"]\nrecipients = ["example.org"]\n\n'
                           '[[permit]]\nnetworks = ["0.0.0.0/0"]\n',
                           'permit[1].networks[0]: "0.0.0.0/0" with recipients "*" (the default when recipients '
                           'is left out) would make an open relay: it covers every IPv4 address (0.0.0.0/0); '
                           'narrow networks or list the recipient domains')

    def test_what_is_not_open_still_loads(self) -> None:
        for permits in (
                '[[permit]]\nnetworks = ["0.0.0.0/0", "::/0"]\nrecipients = ["example.org"]\n',   # inbound only
                '[[permit]]\nnetworks = ["0.0.0.0/1", "::/1"]\n',      # half of each: wide, but not everyone
                '[[permit]]\nnetworks = ["::/8"]\n',                   # no IPv4 client is ever in ::/8
                '[[permit]]\nnetworks = ["0.0.0.0/1"]\nrecipients = ["example.org"]\n'
                '[[permit]]\nnetworks = ["128.0.0.0/1"]\n',           # together, but one of them is narrowed
                '[[permit]]\nusers = ["*"]\nrecipients = ["*"]\n',     # authenticated users only
                '[[permit]]\nnetworks = ["127.0.0.0/8", "::1/128"]\nrecipients = ["*"]\n'):   # tap.conf's
            self.load(permits)
        self.load("")                                                  # the default permits

    def test_a_typo_is_named_before_the_open_relay(self) -> None:
        self.assertRefused(OPEN_GATEWAY + 'recipient = ["example.org"]\n',
                           'permit[0].recipient: unknown key (did you mean "recipients"?)')
        self.assertRefused(OPEN_GATEWAY + '[limits]\nmax_recipients = 0\n',
                           "limits.max_recipients: 0 is out of range: at least 1")


class RefusalMatchesThePolicy(unittest.TestCase):
    """What is refused is what PermitPolicy would really open to every client of a family, and what loads
    is not: the check and the policy's reading of networks cannot drift apart unnoticed."""

    OUTSIDERS = {4: ("192.0.2.9", "::ffff:198.51.100.7", "100.64.0.1", "203.0.113.200"),
                 6: ("2001:db8:ffff::1", "2a00:1450::5", "fe80::1", "ff02::1")}

    def open_families(self, networks: list[str]) -> set[int]:
        """The address families every outsider of which may relay anywhere under `networks`."""
        policy = PermitPolicy((Permit(networks=tuple(ipaddress.ip_network(n.strip(), strict=False)
                                                     for n in networks)),), Limits())
        return {family for family, addresses in self.OUTSIDERS.items()
                if all(policy.check_recipient(ClientInfo(a), "a@example.org", "b@example.net") is None
                       for a in addresses)}

    def test_each_refused_spelling_opens_its_family(self) -> None:
        for text, everyone in EVERYONE.items():
            self.assertEqual(self.open_families([text]), {4 if "IPv4" in everyone else 6}, text)

    def test_what_loads_opens_no_family(self) -> None:
        for networks in (["::/8"], ["::/1"], ["0.0.0.0/1"], ["::fffe:0:0/95"], ["::ffff:0:0/97", "::/1"]):
            load(write(self.mktemp(), "[[permit]]\nnetworks = [" + ", ".join(f'"{n}"' for n in networks) + "]\n"))
            self.assertEqual(self.open_families(networks), set(), networks)


class CheckCommand(unittest.TestCase):
    def test_check_exits_2_with_the_one_line(self) -> None:
        path = write(self.mktemp(), OPEN_GATEWAY)
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        self.assertEqual(main(["check", "--config", str(path)]), 2)
        self.assertEqual(stdout.getvalue(), "")
        self.assertEqual(stderr.getvalue(), f"{path}: {OPEN_GATEWAY_LINE}\n")

    def test_check_as_a_real_process(self) -> None:
        path = write(self.mktemp(), '[[permit]]\nnetworks = ["::/0"]\nrecipients = ["*"]\n')
        env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
        result = subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "check", "--config", str(path)],
                                capture_output=True, text=True, env=env, cwd=path.parent, timeout=60)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr, f'{path}: permit[0].networks[0]: "::/0" with recipients "*" would make an '
                                        'open relay: it covers every IPv6 address (::/0); narrow networks or list '
                                        'the recipient domains\n')


class Twistd(unittest.TestCase):
    timeout = 90

    def test_twistd_refuses_to_start_with_the_one_line(self) -> None:
        relay = RelayFixture(self.mktemp(), permits=OPEN_GATEWAY)
        env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
        result = subprocess.run(
            [str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile=", "--logfile=-",
             "mailrelay", "--config", str(relay.path)],
            capture_output=True, text=True, env=env, cwd=relay.dir, timeout=60)
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertEqual(result.stderr, f"mailrelay: {relay.path}: {OPEN_GATEWAY_LINE}\n")
        self.assertEqual(result.stdout, "")
        self.assertFalse((relay.dir / "spool").exists())          # nothing started half-configured

    @defer.inlineCallbacks
    def test_sighup_with_an_open_relay_file_is_refused_and_the_rules_stay(self):
        sink = Sink()
        sink_port = sink.start(reactor)
        self.addCleanup(sink.stop)
        # The default mode: the delivery process must not pick up the refused file either.
        relay = RelayFixture(self.mktemp(), extra=_route_to(sink_port), process=SEPARATE)
        self.addCleanup(relay.kill)
        yield threads.deferToThread(relay.spawn)
        # One message first: the port is bound before the SIGHUP handler is installed (twistd binds in
        # privilegedStartService), so a signal sent the moment the port answers could find none.
        code, _ = yield relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)
        original = relay.path.read_text()
        relay.path.write_text(original + "\n" + OPEN_GATEWAY)      # appended: it becomes permit[2]
        relay.process.send_signal(signal.SIGHUP)
        yield eventually(lambda: "reload refused" in (relay.dir / "twistd.log").read_text(), timeout=15, interval=0.1)
        log = (relay.dir / "twistd.log").read_text()
        refused = [line for line in log.splitlines() if "reload refused" in line]
        self.assertEqual(len(refused), 1, log[-2000:])
        self.assertIn(f"{relay.path}: {OPEN_GATEWAY_LINE.replace('permit[0]', 'permit[2]')}", refused[0])
        self.assertNotIn("applied", log)
        self.assertIsNone(relay.process.poll())                   # still running, on the old rules:
        code, _ = yield relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE)
        self.assertEqual(code, 250)                               # 127.0.0.1 may still relay
        yield sink.wait_for(2)


class Reload(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_in_process_reload_is_refused_with_one_log_line(self):
        relay = RelayFixture(self.mktemp(), permits='[[permit]]\nanyone = true\nrecipients = ["example.org"]\n')
        service = relay.start(reactor)
        self.addCleanup(relay.stop)
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        relay.path.write_text(relay.path.read_text().replace('recipients = ["example.org"]', 'recipients = ["*"]'))
        self.assertFalse(service.reload())
        errors = [e for e in events if "reload refused" in e.get("log_format", "")]
        self.assertEqual(len(errors), 1)
        self.assertIn('permit[0]: anyone = true with recipients "*" would make an open relay', errors[0]["error"])
        # the running rules stay: inbound for example.org only, so an outside domain is still refused
        failure = yield self.assertFailure(
            relay.submit("relay", "app@example.org", ["user@example.com"], MESSAGE), smtplib.SMTPRecipientsRefused)
        (code, _), = failure.recipients.values()
        self.assertEqual(code, 550)


def _route_to(port: int) -> str:
    return (f'[transports.sink]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n\n'
            '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n')
