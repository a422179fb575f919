"""`mailrelay passwd USER --config FILE [--stdin]`."""
from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

import argon2

import mailrelay
from mailrelay.cli import main as cli_main
from mailrelay.cli import passwd as cli_passwd
from mailrelay.server import passwords
from mailrelay.server.passwords import parse_password_file, verify_password

SECRET = "correct horse battery staple"


class PasswdTestCase(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.passwords = self.dir / "passwords"
        self.config = self.dir / "tap.conf"
        self.config.write_text('hostname = "relay.test.example"\n[auth]\npassword_file = "passwords"\n')
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)
        # In-process runs hash with tiny (still argon2id) parameters to stay fast; the subprocess
        # tests below use the real defaults.
        cheap = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
        self.patch(passwords, "hash_password", cheap.hash)

    def run_passwd(self, *argv: str, stdin: str | None = None, typed: tuple[str, ...] = ()) -> int:
        if stdin is not None:
            self.patch(sys, "stdin", io.StringIO(stdin))
        answers = list(typed)
        self.patch(cli_passwd.getpass, "getpass", lambda prompt="": answers.pop(0))
        return cli_main.main(["passwd", *argv])

    def entries(self) -> dict[str, str]:
        return parse_password_file(self.passwords.read_bytes(), str(self.passwords))

    def assertOneLineError(self, mentioning: str):
        err = self.stderr.getvalue()
        self.assertEqual(err.count("\n"), 1, err)
        self.assertTrue(err.startswith("mailrelay passwd: "), err)
        self.assertIn(mentioning, err)
        self.assertNotIn("Traceback", err)

    def assertNoSecretShown(self):
        self.assertNotIn(SECRET, self.stdout.getvalue() + self.stderr.getvalue())


class StdinTests(PasswdTestCase):
    def test_stdin_password_is_hashed_into_the_configured_file_with_mode_0600(self):
        status = self.run_passwd("alice", "--config", str(self.config), "--stdin", stdin=SECRET + "\n")
        self.assertEqual(status, 0, self.stderr.getvalue())
        stored = self.entries()["alice"]
        self.assertTrue(stored.startswith("$argon2id$"))
        self.assertTrue(verify_password(stored, SECRET.encode()))
        self.assertEqual(stat.S_IMODE(os.stat(self.passwords).st_mode), 0o600)
        self.assertIn("alice", self.stdout.getvalue())
        self.assertNoSecretShown()

    def test_other_lines_and_comments_are_kept(self):
        self.passwords.write_text("# relay logins\nbob:$2b$04$" + "a" * 53 + "\n\n# end\n")
        status = self.run_passwd("alice", "--config", str(self.config), "--stdin", stdin=SECRET + "\r\n")
        self.assertEqual(status, 0, self.stderr.getvalue())
        lines = self.passwords.read_text().splitlines()
        self.assertEqual(lines[:4], ["# relay logins", "bob:$2b$04$" + "a" * 53, "", "# end"])
        self.assertTrue(verify_password(self.entries()["alice"], SECRET.encode()), "CR stripped too")

    def test_only_the_first_line_of_stdin_is_the_password_and_spaces_are_kept(self):
        self.run_passwd("alice", "--config", str(self.config), "--stdin", stdin=" pw \nsecond line\n")
        self.assertTrue(verify_password(self.entries()["alice"], b" pw "))

    def test_empty_password_is_refused(self):
        for stdin in ("\n", ""):
            self.stderr.truncate(0), self.stderr.seek(0)
            status = self.run_passwd("alice", "--config", str(self.config), "--stdin", stdin=stdin)
            self.assertEqual(status, 1)
            self.assertOneLineError("empty password")
        self.assertFalse(self.passwords.exists())

    def test_password_with_nul_is_refused(self):
        status = self.run_passwd("alice", "--config", str(self.config), "--stdin", stdin="a\0b\n")
        self.assertEqual(status, 1)
        self.assertOneLineError("NUL")


class TerminalTests(PasswdTestCase):
    def test_password_typed_twice_is_stored(self):
        status = self.run_passwd("alice", "--config", str(self.config), typed=(SECRET, SECRET))
        self.assertEqual(status, 0, self.stderr.getvalue())
        self.assertTrue(verify_password(self.entries()["alice"], SECRET.encode()))

    def test_mismatch_is_an_error_and_writes_nothing(self):
        status = self.run_passwd("alice", "--config", str(self.config), typed=(SECRET, SECRET + "!"))
        self.assertEqual(status, 1)
        self.assertOneLineError("do not match")
        self.assertFalse(self.passwords.exists())
        self.assertNoSecretShown()

    def test_interrupted_prompt_is_an_error(self):
        def interrupted(prompt=""):
            raise KeyboardInterrupt()

        self.patch(sys, "stdin", io.StringIO(""))
        self.patch(cli_passwd.getpass, "getpass", interrupted)
        self.assertEqual(cli_main.main(["passwd", "alice", "--config", str(self.config)]), 1)
        self.assertOneLineError("no password")


class RefusalTests(PasswdTestCase):
    def test_user_names_with_colon_whitespace_or_controls_are_refused(self):
        for user in ("a:b", "a b", "a\tb", "a\nb", "a\x01b", "a\x7fb", ""):
            self.stderr.truncate(0), self.stderr.seek(0)
            status = self.run_passwd(user, "--config", str(self.config), "--stdin", stdin=SECRET + "\n")
            self.assertEqual(status, 2, repr(user))
            self.assertOneLineError("user name")
        self.assertFalse(self.passwords.exists())

    def test_no_password_file_configured_names_the_key_and_exits_2(self):
        self.config.write_text('hostname = "relay.test.example"\n')
        status = self.run_passwd("alice", "--config", str(self.config), "--stdin", stdin=SECRET + "\n")
        self.assertEqual(status, 2)
        self.assertOneLineError("auth.password_file")

    def test_bad_config_is_one_line_and_exit_2(self):
        for text in (None, "this is not toml ["):
            self.stderr.truncate(0), self.stderr.seek(0)
            config = self.dir / "other.conf"
            if text is not None:
                config.write_text(text)
            status = self.run_passwd("alice", "--config", str(config), "--stdin", stdin=SECRET + "\n")
            self.assertEqual(status, 2)
            self.assertOneLineError("other.conf")

    def test_unwritable_destination_is_one_line_and_exit_1(self):
        self.config.write_text('[auth]\npassword_file = "missing/passwords"\n')
        status = self.run_passwd("alice", "--config", str(self.config), "--stdin", stdin=SECRET + "\n")
        self.assertEqual(status, 1)
        self.assertOneLineError("cannot write")
        self.assertNoSecretShown()


class SubprocessTests(PasswdTestCase):
    def run_process(self, *argv: str, stdin: str) -> subprocess.CompletedProcess:
        source_root = str(Path(mailrelay.__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=source_root)
        return subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "passwd", *argv], input=stdin,
                              capture_output=True, text=True, env=env, timeout=60, cwd=str(self.dir))

    def test_command_line_sets_a_password_from_stdin(self):
        done = self.run_process("alice", "--config", "tap.conf", "--stdin", stdin=SECRET + "\n")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stderr, "")
        self.assertNotIn(SECRET, done.stdout)
        stored = self.entries()["alice"]
        self.assertTrue(verify_password(stored, SECRET.encode()))
        self.assertEqual(argon2.extract_parameters(stored).memory_cost, argon2.PasswordHasher().memory_cost)
        self.assertEqual(stat.S_IMODE(os.stat(self.passwords).st_mode), 0o600)

    def test_command_line_error_is_one_line_without_traceback(self):
        done = self.run_process("alice", "--config", "absent.conf", "--stdin", stdin=SECRET + "\n")
        self.assertEqual(done.returncode, 2)
        self.assertEqual(done.stderr.count("\n"), 1, done.stderr)
        self.assertNotIn("Traceback", done.stderr)
