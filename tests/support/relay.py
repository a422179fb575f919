"""A whole relay for end-to-end tests: a tap.conf written into a temp dir, `make_service` started on this
reactor (or `twistd` in a subprocess), free loopback ports, a password file, and a real SMTP client
(stdlib smtplib, run in a thread so the relay keeps serving on the reactor)."""
from __future__ import annotations

import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import threads

from mailrelay.config import load
from mailrelay.server.passwords import set_password

PASSWORD = "correct horse battery staple"


def free_port(interface: str = "127.0.0.1") -> int:
    return free_ports(1, interface)[0]


def free_ports(count: int, interface: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports the OS reports free: all held open together while they are picked, so the
    same port cannot come back twice (it did, once, for two listeners of one relay)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((interface, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class RelayFixture:
    """Writes a config with three listeners (relay, submission, submissions) on free loopback ports."""

    def __init__(self, directory: str, extra: str = "", users: dict | None = None, permits: str | None = None,
                 top: str = "", listener_keys: str = ""):
        """`top`: top-level keys (they must come before any table in TOML); `extra`: tables, appended;
        `listener_keys`: lines added to each [[listen]] table."""
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
        return load(self.path)

    # --- in this process, on the test's reactor ------------------------------------------------------
    def start(self, reactor=None):
        from mailrelay.service import make_service

        self.service = make_service(self.config(), reactor=reactor)
        self.service.startService()
        return self.service

    def stop(self):
        if self.service is not None and self.service.running:
            return self.service.stopService()

    # --- as a real twistd process ---------------------------------------------------------------------
    def spawn(self, logfile: str = "-") -> subprocess.Popen:
        """twistd in the foreground; its standard output and error go to twistd.log, and so does its log
        unless `logfile` names a file for twistd to write (and rotate) itself."""
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
                    user: str | None = None, password: str | None = None, source: str | None = None):
        """Send one message; returns (code, text) of the final reply, or raises smtplib errors."""
        port = self.ports[kind]
        source_address = (source, 0) if source else None
        if kind == "submissions":
            smtp = smtplib.SMTP_SSL("127.0.0.1", port, context=self.tls_context(), timeout=30,
                                    source_address=source_address)
        else:
            smtp = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=source_address)
        with smtp:
            smtp.ehlo("client.test")
            if kind != "submissions" and (kind == "submission" or user):
                smtp.starttls(context=self.tls_context())
                smtp.ehlo("client.test")
            if user:
                smtp.login(user, password if password is not None else self.users[user])
            code, text = smtp.mail(sender)
            if code >= 400:
                raise smtplib.SMTPSenderRefused(code, text, sender)
            for recipient in recipients:
                code, text = smtp.rcpt(recipient)
                if code >= 400:
                    raise smtplib.SMTPRecipientsRefused({recipient: (code, text)})
            return smtp.data(message)

    def submit(self, *args, **kwargs):
        return threads.deferToThread(self.submit_sync, *args, **kwargs)
