"""A whole relay for end-to-end tests: a tap.conf written into a temp dir, `make_service` started on this
reactor (or `twistd` in a subprocess), free loopback ports, a password file, and a real SMTP client
(stdlib smtplib, run in a thread so the relay keeps serving on the reactor).

`[delivery] process`: the relay's default is "separate" (a delivery child process). A fixture writes
`process = "inline"` unless told otherwise (`process=SEPARATE`, the test's own tables name a mode, or
MAILRELAY_TEST_PROCESS=separate is set for the whole run):
most tests are about one stage and need no second Python started and stopped per test. The end-to-end
tests that matter most (delivery, DKIM, crash, the delivery process itself) run in the default mode."""
from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from twisted.internet import threads

from mailrelay.config import load
from mailrelay.server.passwords import set_password
from tests.support.ports import free_port, free_ports

__all__ = ["PASSWORD", "RelayFixture", "free_port", "free_ports"]

PASSWORD = "correct horse battery staple"
SEPARATE = None      # RelayFixture(process=SEPARATE): no `process` key, so the default mode (separate) runs
# What a fixture writes when the test does not say: MAILRELAY_TEST_PROCESS=separate runs every such relay
# in the default mode (slower: a delivery child per relay), to look for what differs between the two.
FIXTURE_PROCESS = None if os.environ.get("MAILRELAY_TEST_PROCESS") == "separate" else "inline"


class RelayFixture:
    """Writes a config with three listeners (relay, submission, submissions) on free loopback ports."""

    def __init__(self, directory: str, extra: str = "", users: dict | None = None, permits: str | None = None,
                 top: str = "", process: str | None = FIXTURE_PROCESS, listener_keys: str = ""):
        """`top`: top-level keys (they must come before any table in TOML); `extra`: tables, appended;
        `listener_keys`: lines added to each [[listen]] table.
        `process`: the `[delivery] process` written in before the relay starts, unless the file names one
        by then (tables appended to `path` after construction included); SEPARATE: the default."""
        self.process_mode = process
        self.dir = Path(directory).absolute()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(("relay", "submission", "submissions"), free_ports(3)))
        self.users = users if users is not None else {"app1": PASSWORD}
        if permits is None:
            permits = ('[[permit]]\nnetworks = ["127.0.0.1/32"]\n\n'
                       '[[permit]]\nusers = ["*"]\nsenders = ["example.org", "*.example.org"]\n')
        listeners = "".join(
            f'[[listen]]\nkind = "{kind}"\nendpoint = "tcp:{port}:interface=127.0.0.1"\n{listener_keys}\n'
            for kind, port in self.ports.items()
        )
        self.path = self.dir / "tap.conf"
        self.path.write_text(
            'hostname = "relay.test"\nspool = "spool"\n' + top + '\n' + listeners
            + '[auth]\npassword_file = "passwords"\n\n' + permits + "\n" + extra
        )
        for user, password in self.users.items():
            set_password(self.dir / "passwords", user, password)
        self.service = None
        self.process = None

    def config(self):
        self.settle_process()
        return load(self.path)

    def settle_process(self) -> None:
        """Write `[delivery] process = <process_mode>` into the file unless it names a mode already."""
        if self.process_mode is None:
            return
        text = self.path.read_text()
        try:
            delivery = tomllib.loads(text).get("delivery")
        except tomllib.TOMLDecodeError:
            return                  # a test about a broken file: leave it as it is
        if isinstance(delivery, dict) and "process" in delivery:
            return
        line = f'process = "{self.process_mode}"\n'
        header = re.search(r"^\[delivery\][ \t]*\n", text, re.M)
        if header is not None:
            text = text[:header.end()] + line + text[header.end():]
        else:
            text += "\n[delivery]\n" + line
        self.path.write_text(text)

    # --- in this process, on the test's reactor ------------------------------------------------------
    def start(self, reactor=None):
        from mailrelay.service import make_service

        self.service = make_service(self.config(), reactor=reactor)
        try:
            self.service.startService()
        except BaseException:
            # A listener that could not bind: a delivery child already started gets its stdin closed
            # and exits, so nothing outlives the test.
            try:
                self.service.stopService()
            except Exception:
                pass
            raise
        return self.service

    def stop(self):
        if self.service is not None and self.service.running:
            return self.service.stopService()

    # --- as a real twistd process ---------------------------------------------------------------------
    def spawn(self, logfile: str = "-") -> subprocess.Popen:
        """twistd in the foreground; its standard output and error go to twistd.log, and so does its log
        unless `logfile` names a file for twistd to write (and rotate) itself."""
        self.settle_process()
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        log = open(self.dir / "twistd.log", "ab")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile=", f"--logfile={logfile}",
             "mailrelay", "--config", str(self.path)],
            cwd=self.dir, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.process.returncode}: "
                                   + (self.dir / "twistd.log").read_text()[-2000:])
            try:
                socket.create_connection(("127.0.0.1", self.ports["relay"]), timeout=1).close()
                return self.process
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError("twistd did not start listening within 30 s")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)

    # --- a real SMTP client --------------------------------------------------------------------------
    def ca_file(self) -> str:
        return str(self.dir / "spool" / "tls" / "selfsigned.pem")

    def tls_context(self) -> ssl.SSLContext:
        """Trusts exactly the relay's self-signed certificate (for relay.test; we connect to 127.0.0.1,
        so the chain is checked and the name is not)."""
        context = ssl.create_default_context(cafile=self.ca_file())
        context.check_hostname = False
        return context

    def submit_sync(self, kind: str, sender: str, recipients: list[str], message: bytes,
                    user: str | None = None, password: str | None = None, source: str | None = None,
                    mail_options: tuple = (), rcpt_options: dict | None = None, starttls: bool = False):
        """Send one message; returns (code, text) of the final reply, or raises smtplib errors.
        `mail_options` / `rcpt_options` ({recipient: [...]}) are ESMTP parameters for MAIL / RCPT;
        `starttls` asks for STARTTLS on the relay listener even without a login."""
        port = self.ports[kind]
        source_address = (source, 0) if source else None
        if kind == "submissions":
            smtp = smtplib.SMTP_SSL("127.0.0.1", port, context=self.tls_context(), timeout=30,
                                    source_address=source_address)
        else:
            smtp = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=source_address)
        with smtp:
            smtp.ehlo("client.test")
            if kind != "submissions" and (kind == "submission" or user or starttls):
                smtp.starttls(context=self.tls_context())
                smtp.ehlo("client.test")
            if user:
                smtp.login(user, password if password is not None else self.users[user])
            code, text = smtp.mail(sender, list(mail_options))
            if code >= 400:
                raise smtplib.SMTPSenderRefused(code, text, sender)
            for recipient in recipients:
                code, text = smtp.rcpt(recipient, list((rcpt_options or {}).get(recipient, ())))
                if code >= 400:
                    raise smtplib.SMTPRecipientsRefused({recipient: (code, text)})
            return smtp.data(message)

    def submit(self, *args, **kwargs):
        return threads.deferToThread(self.submit_sync, *args, **kwargs)
