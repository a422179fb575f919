"""A raw SMTP client for the adversarial tests: exact bytes out, every reply line kept as it came.

Not part of the relay.  smtplib rewrites line ends, stuffs dots and hides malformed replies; the
adversarial tests need the opposite: send any bytes (bare CR/LF, NULs, pipelined garbage), over
plaintext, STARTTLS or implicit TLS, and judge each reply the relay sends.  Blocking sockets: run it in
a thread (deferToThread) when the relay is on the test's reactor.

    client = WireClient("127.0.0.1", port)
    client.reply()                       # the greeting
    client.command("EHLO client.test")
    client.send(b"MAIL FROM:<a@example.org>\\r\\n")
    code = client.reply().code
    self.assertEqual(malformed(client.replies), [])
"""
from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass, field
from typing import Optional

REPLY_LINE = re.compile(rb"^[2-5][0-9][0-9]([ -]|$)")
ENHANCED = re.compile(rb"^([245])\.[0-9]{1,3}\.[0-9]{1,3}( |$)")


@dataclass
class Reply:
    """One SMTP reply: its code (-1 when the first line is malformed) and its lines without CRLF."""
    code: int
    lines: list[bytes] = field(default_factory=list)
    command: bytes = b""          # what it answered (for messages), as far as the client knows

    @property
    def text(self) -> bytes:
        return b"\n".join(line[4:] for line in self.lines)


class WireClient:
    """One connection.  `replies` holds every reply read, in order."""

    def __init__(self, host: str, port: int, *, implicit_tls: Optional[ssl.SSLContext] = None,
                 timeout: float = 15.0):
        self.sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if implicit_tls is not None:
            self.sock = implicit_tls.wrap_socket(self.sock)
        self.buffer = b""
        self.replies: list[Reply] = []
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> Optional[bytes]:
        while b"\r\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                chunk = b""
            if not chunk:
                self.closed = True
                if self.buffer:
                    line, self.buffer = self.buffer, b""
                    return line          # a last line without CRLF: malformed, kept to be judged
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def reply(self, command: bytes = b"") -> Reply:
        """The next whole reply; code 0 when the connection closed before one came."""
        lines: list[bytes] = []
        while True:
            line = self._line()
            if line is None:
                reply = Reply(0 if not lines else -1, lines, command)
                break
            lines.append(line)
            if not REPLY_LINE.match(line):
                reply = Reply(-1, lines, command)
                break
            if line[3:4] != b"-":
                reply = Reply(int(line[:3]), lines, command)
                break
        if reply.lines:
            self.replies.append(reply)
        return reply

    def command(self, line: str | bytes) -> Reply:
        data = line.encode("latin-1") if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply(data[:80])

    def starttls(self, context: ssl.SSLContext) -> Reply:
        reply = self.command("STARTTLS")
        if reply.code == 220:
            self.sock = context.wrap_socket(self.sock)
            self.buffer = b""
        return reply

    def pending(self, wait: float = 0.3) -> bytes:
        """Whatever else the server sends within `wait` seconds (to prove it said nothing more)."""
        self.sock.settimeout(wait)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.closed = True
                    break
                self.buffer += chunk
        except (socket.timeout, ssl.SSLError, ConnectionResetError, BlockingIOError):
            pass
        finally:
            self.sock.settimeout(15.0)
        extra, self.buffer = self.buffer, b""
        return extra

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def malformed(replies: list[Reply], greeting_and_ehlo_exempt: bool = True) -> list[Reply]:
    """The replies that are not clean SMTP: a line that is not `ddd SP/-`, lines of one reply with
    different codes, or a 2xx/4xx/5xx reply without an RFC 3463 enhanced status code of its class
    (RFC 2034 3 exempts the 220 greeting and the EHLO/HELO reply, whose first word is the domain)."""
    bad = []
    for reply in replies:
        if reply.code < 200 or any(not REPLY_LINE.match(line) or line[:3] != reply.lines[0][:3]
                                   for line in reply.lines):
            bad.append(reply)
            continue
        exempt = greeting_and_ehlo_exempt and (
            reply.code == 220 and not reply.command or reply.command[:4].upper() in (b"EHLO", b"HELO"))
        if reply.code in (334, 354) or exempt:
            continue
        match = ENHANCED.match(reply.lines[-1][4:])
        if not match or int(match.group(1)) != reply.code // 100:
            bad.append(reply)
    return bad


def client_context(cafile: str) -> ssl.SSLContext:
    """Trusts exactly the relay's certificate; the name is not checked (we connect to 127.0.0.1)."""
    context = ssl.create_default_context(cafile=cafile)
    context.check_hostname = False
    return context
