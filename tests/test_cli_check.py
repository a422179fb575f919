"""`mailrelay check --config F`: a valid file is described and exits 0; any problem is one line on
stderr and exit 2, never a traceback (also run as a real subprocess)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

import mailrelay
from mailrelay.cli import check
from mailrelay.cli.main import main
from tests.support.example_config import SES_SECRET, write_example

PROJECT_ROOT = Path(mailrelay.__file__).resolve().parent.parent
BROKEN_ROUTE = '[transports.smarthost]\nhost = "smtp.example"\n[[route]]\ntransport = "ses"\n'


class CheckCommandTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

    def check(self, path: Path) -> int:
        return main(["check", "--config", str(path)])

    def write(self, text: str) -> Path:
        path = self.dir / "tap.conf"
        path.write_text(text)
        return path

    def assertOneLineError(self, status: int, *fragments: str) -> str:
        self.assertEqual(status, 2)
        self.assertEqual(self.stdout.getvalue(), "")
        lines = self.stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        for fragment in fragments:
            self.assertIn(fragment, lines[0])
        return lines[0]

    def test_valid_example_is_described_and_exits_0(self) -> None:
        path = write_example(self.dir)
        self.assertEqual(self.check(path), 0)
        out = self.stdout.getvalue()
        self.assertEqual(self.stderr.getvalue(), "")
        for expected in ("relay.example.org", "/var/spool/mailrelay", "submission on tcp:587",
                         "50 MiB per message", "PLAIN, LOGIN", "ldaps://dc1.corp.example:636",
                         "clients from 10.0.0.0/8, 2001:db8::/32", "any authenticated user", "any client",
                         "relay2026._domainkey.example.org", "retry after 5m, doubling up to 4h", "bounce after 5d",
                         "TLS opportunistic", "ses: email-smtp.eu-west-1.amazonaws.com:587 starttls",
                         "to gmail.com, *.outlook.com from * via ses", "tcp:9425:interface=127.0.0.1"):
            self.assertIn(expected, out)
        self.assertTrue(out.endswith(f"ok: {path}\n"))

    def test_secrets_are_never_printed(self) -> None:
        self.check(write_example(self.dir))
        out = self.stdout.getvalue()
        self.assertNotIn(SES_SECRET, out)
        self.assertNotIn("service-secret", out)
        self.assertIn(str(self.dir / "ses.secret"), out)

    def test_missing_password_file_is_pointed_out_not_refused(self) -> None:
        self.assertEqual(self.check(self.write('[auth]\npassword_file = "pw"\n')), 0)
        self.assertIn("mailrelay passwd", self.stdout.getvalue())

    def test_defaults_are_described(self) -> None:
        self.assertEqual(self.check(self.write("")), 0)
        out = self.stdout.getvalue()
        self.assertIn("self-signed", out)
        self.assertIn("everything goes direct to MX", out)
        self.assertIn("any authenticated user", out)
        self.assertIn("directory fsync after commits unless on ext4 or XFS (auto)", out)
        self.assertIn("in a separate process, 10 nice steps below", out)      # the default mode

    def test_added_delivery_and_queue_keys_are_described(self) -> None:
        path = self.write('[queue]\ndirectory_fsync = "always"\n\n[delivery]\nprocess = "inline"\n'
                          'process_nice = 5\n\n[metrics]\nendpoint = "tcp:9425:interface=127.0.0.1"\n')
        self.assertEqual(self.check(path), 0)
        out = self.stdout.getvalue()
        self.assertIn("directory fsync after every commit", out)
        self.assertIn("in the main process", out)
        self.assertIn("metrics      tcp:9425:interface=127.0.0.1\n", out)
        path = self.write('[delivery]\nprocess_nice = 5\n\n[metrics]\nendpoint = "tcp:9425:interface=127.0.0.1"\n')
        self.stdout.truncate(0)
        self.stdout.seek(0)
        self.assertEqual(self.check(path), 0)
        out = self.stdout.getvalue()
        self.assertIn("in a separate process, 5 nice steps below", out)
        self.assertIn("metrics      tcp:9425:interface=127.0.0.1 (the delivery process's included)\n", out)

    def test_suppression_is_said_to_be_on_or_off(self) -> None:
        self.assertEqual(self.check(self.write("")), 0)
        self.assertIn("suppression  off\n", self.stdout.getvalue())
        self.stdout.truncate(0)
        self.stdout.seek(0)
        self.assertEqual(self.check(self.write('[suppression]\nenabled = true\nduration = "14d"\n')), 0)
        self.assertIn("suppression  on: a 5.1.x or 5.2.1 failure refuses RCPT to the address for 14d (list in ",
                      self.stdout.getvalue())

    def test_the_cluster_is_described_without_its_password(self) -> None:
        self.assertEqual(self.check(self.write("")), 0)
        self.assertIn("cluster      off: every limit is this relay's own\n", self.stdout.getvalue())
        self.stdout.truncate(0)
        self.stdout.seek(0)
        path = self.write('[cluster]\nredis = "redis://:topsecret@10.0.0.5:6380/2"\ntimeout = "0.05s"\n')
        self.assertEqual(self.check(path), 0)
        out = self.stdout.getvalue()
        self.assertIn("cluster      Redis redis://:***@10.0.0.5:6380/2 shares messages_per_minute", out)
        self.assertIn("waits at most 0.05s", out)
        self.assertNotIn("topsecret", out)

    def test_a_bad_cluster_url_is_one_line_without_its_password(self) -> None:
        self.assertNotEqual(self.check(self.write('[cluster]\nredis = "http://:topsecret@host/0"\n')), 0)
        self.assertIn("cluster.redis", self.stderr.getvalue())
        self.assertNotIn("topsecret", self.stderr.getvalue() + self.stdout.getvalue())

    def test_received_user_and_from_header_holds_are_described(self) -> None:
        self.assertEqual(self.check(self.write("")), 0)
        self.assertIn("Received does not name the user", self.stdout.getvalue())
        path = self.write('[auth]\nreceived_shows_user = true\n\n[[permit]]\nnetworks = ["10.0.0.0/8"]\n'
                          'senders = ["app.example.org"]\n\n[[permit]]\nnetworks = ["192.0.2.0/24"]\n'
                          'senders = ["app.example.org"]\ncheck_from_header = true\n\n'
                          '[[permit]]\nanyone = true\nrecipients = ["example.org"]\n')
        self.stdout.seek(0)
        self.stdout.truncate()
        self.assertEqual(self.check(path), 0)
        out = self.stdout.getvalue()
        self.assertIn("Received names the user", out)
        self.assertIn("clients from 10.0.0.0/8 may send from app.example.org to *; a From: outside the senders "
                      "goes unsigned\n", out)
        self.assertIn("clients from 192.0.2.0/24 may send from app.example.org to *; From: header held to the "
                      "senders\n", out)
        self.assertIn("any client may send from * to example.org\n", out)

    def test_config_error_is_one_line_on_stderr_and_exits_2(self) -> None:
        line = self.assertOneLineError(self.check(self.write(BROKEN_ROUTE)), "route[0].transport")
        self.assertEqual(line, f'{self.dir / "tap.conf"}: route[0].transport: no transport named "ses" '
                               f'(defined: smarthost)')

    def test_directory_as_config_is_one_line(self) -> None:
        self.assertOneLineError(self.check(self.dir), "Is a directory")

    def test_missing_config_is_one_line(self) -> None:
        self.assertOneLineError(self.check(self.dir / "nope.conf"), "No such file")

    def test_toml_syntax_error_is_one_line(self) -> None:
        self.assertOneLineError(self.check(self.write("[limits\n")), "line 1")

    def test_unexpected_loader_failure_is_still_one_line(self) -> None:
        def broken(path):
            raise RuntimeError("bug\nwith two lines")
        self.patch(check, "load", broken)
        self.assertOneLineError(self.check(self.write("")), "RuntimeError: bug with two lines")


class CheckSubprocessTests(unittest.TestCase):
    def test_real_process_exits_2_with_one_line_naming_the_key(self) -> None:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        path = directory / "tap.conf"
        path.write_text(BROKEN_ROUTE)
        env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
        result = subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "check", "--config", str(path)],
                                capture_output=True, text=True, env=env, cwd=directory, timeout=60)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stdout, "")
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn("route[0].transport", lines[0])
