"""The adversarial battery, part 3: a bounded, seeded fuzz of a real relay (twistd in a subprocess) over
real sockets, in each phase of a session: commands, DATA, BDAT (RFC 3030 chunks: framed exactly, with
hostile content, the session must stay in step; or framed falsely — unreadable, huge or short sizes —
the session must end cleanly), AUTH (under STARTTLS and implicit TLS), and a few fixed attacks — thousands
of pipelined RCPTs, garbage pipelined after STARTTLS (CVE-2011-0411 class), huge AUTH blobs, over-long
lines with and without CRLF.

What must hold, checked after every phase: the relay is up and carries a control message
(EHLO / MAIL / RCPT / DATA through to 250); every reply line it sent is well-formed SMTP (three digits,
then space, dash or the end of the line) and every 2xx/4xx/5xx reply has an enhanced status code of its
class (RFC 5321 4.2, RFC 2034); no connection hangs once the client stops; its log has no Python
traceback; its RSS stays under a fixed ceiling and grows by less than a few MiB over the fuzz.

Reproducible: the seed is printed and logged (and in every failure message); set MAILRELAY_FUZZ_SEED to
run the same inputs again.  Each phase draws from its own generator seeded by (seed, phase), so one
phase's inputs do not depend on how far another got.  MAILRELAY_FUZZ_SECONDS (default 32) is the time
box shared by the four random phases; the fixed attacks run once each.
"""
from __future__ import annotations

import base64
import os
import random
import re
import select
import socket
import ssl
import time
from pathlib import Path

from twisted.internet import defer, reactor, threads
from twisted.python import log
from twisted.trial import unittest

from tests.support.relay import PASSWORD, RelayFixture
from tests.support.sink import Sink
from tests.support.wire import REPLY_LINE, WireClient, client_context, malformed

SEED = int(os.environ.get("MAILRELAY_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
SECONDS = float(os.environ.get("MAILRELAY_FUZZ_SECONDS") or 32)
RSS_CEILING_MIB = 256          # generous: the relay idles at ~65 MiB; one argon2id check adds 64 MiB
RSS_GROWTH_MIB = 16            # after the whole fuzz, over the warmed-up baseline (seen: ~2 MiB)
HANG_SECONDS = 20              # a connection must be closed this long after the client's last byte
PERMITS = ('[[permit]]\nnetworks = ["127.0.0.0/8"]\n\n'
           '[[permit]]\nusers = ["*"]\nsenders = ["example.org"]\n')

VERBS = [b"HELO", b"EHLO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"HELP", b"VRFY",
         b"EXPN", b"STARTTLS", b"AUTH", b"BDAT", b"ETRN", b"XCLIENT", b"TURN", b"", b"QUIT"]
PIECES = [b"\r", b"\n", b"\x00", b"\r\n", b".", b"\r\n.\r\n", b"\n.\n", b"<", b">", b":", b"@", b'"', b"\\",
          b" ", b"\t", b"\xff", "é".encode(), b"%", b"!", b"=", b"SIZE=", b"BODY=8BITMIME", b"<>",
          b"postmaster", b"user@example.com", b"app@example.org", b"\x1b[0m", b"\x7f"]
LINE_ENDS = [b"\r\n"] * 8 + [b"\n", b"\r", b"", b"\r\r\n", b"\x00\r\n", b"\n\r"]
LENGTHS = [0, 1, 8, 64, 500, 509, 510, 511, 998, 999, 1000, 12286, 12287, 16384, 20000, 70000]
ENDER = b"\r\n.\r\nQUIT\r\n"     # ends DATA if in it, then QUIT: every session must end soon after


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB, from /proc/PID/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def noise(rng: random.Random, length: int, controls: bool = True) -> bytes:
    """`length` octets mixing random bytes, printable text and SMTP's sharp edges; without `controls`
    no octet below 0x20 (nor DEL), so the line gets past the control-character check to a handler."""
    out = bytearray()
    while len(out) < length:
        kind = rng.random()
        if not controls and (kind < 0.3 or kind >= 0.6):
            piece = rng.choice(PIECES) if kind >= 0.6 else rng.randbytes(rng.randint(1, 16))
            out += bytes(c for c in piece if 0x20 <= c != 0x7f)
        elif kind < 0.3:
            out += rng.randbytes(rng.randint(1, 16))
        elif kind < 0.6:
            out += bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789.-+") for _ in range(rng.randint(1, 24)))
        else:
            out += rng.choice(PIECES)
    return bytes(out[:length])


def fuzz_line(rng: random.Random) -> bytes:
    verb = rng.choice(VERBS)
    if rng.random() < 0.5:
        verb = bytes(c ^ 0x20 if rng.random() < 0.5 and 0x41 <= (c | 0x20) - 0x20 <= 0x5A else c for c in verb)
    if rng.random() < 0.1:
        return noise(rng, rng.choice(LENGTHS)) + rng.choice(LINE_ENDS)
    length = rng.choice(LENGTHS[:9]) if rng.random() < 0.85 else rng.choice(LENGTHS)
    if rng.random() < 0.5:      # a well-formed line with a hostile argument: reaches the command's handler
        return verb + rng.choice([b" ", b""]) + noise(rng, length, controls=False) + b"\r\n"
    return verb + rng.choice([b" ", b"", b"  ", b"\t"]) + noise(rng, length) + rng.choice(LINE_ENDS)


class Connection:
    """A fuzzing client: sends, drains replies as they come (so neither side's buffers block), and
    keeps every reply line for judging."""

    def __init__(self, port: int, source: str, tls: ssl.SSLContext | None = None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_SECONDS, source_address=(source, 0))
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock)
        self.raw = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        for start in range(0, len(data), 65536):
            if self.eof:
                return
            try:
                self.sock.sendall(data[start:start + 65536])
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
                self.eof = True
                return
            self.drain(0)

    def drain(self, wait: float) -> None:
        """Read what has arrived (waiting up to `wait` seconds for the first byte)."""
        while not self.eof:
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
            if not pending and not select.select([self.sock], [], [], wait)[0]:
                return
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError, OSError):
                chunk = b""
            if not chunk:
                self.eof = True
                return
            self.raw += chunk
            wait = 0

    def until(self, pattern: bytes, wait: float = 10.0) -> bool:
        """Reads until a reply line matching `pattern` (a regex on a line start) has arrived."""
        deadline = time.monotonic() + wait
        regex = re.compile(b"(^|\r\n)" + pattern)
        while not regex.search(self.raw) and not self.eof and time.monotonic() < deadline:
            self.drain(0.2)
        return bool(regex.search(self.raw))

    def starttls(self, context: ssl.SSLContext) -> bool:
        self.send(b"STARTTLS\r\n")
        if not self.until(rb"220 "):
            return False
        self.raw = b""
        self.sock.settimeout(HANG_SECONDS)
        try:
            self.sock = context.wrap_socket(self.sock)
        except (ssl.SSLError, OSError):
            self.eof = True
            return False
        return True

    def finish(self, half_close: bool = False) -> bool:
        """Sends the ender and reads to EOF; False if the relay kept the connection open.  With
        `half_close` the client then ends its side (a relay inside a chunk of a size never sent waits
        for its octets until the idle timeout: that is in step, not a hang).  When the
        relay's last word is STARTTLS's 220, the bytes after that STARTTLS were discarded (RFC 3207
        4.2) or went into the TLS handshake, where bytes looking like the start of a record (0x16 0x03,
        or an SSLv2 length with the high bit set) make any TLS server wait for the rest until its
        idle timeout: the relay is waiting for a handshake then, not hanging."""
        self.send(ENDER)
        if half_close and not self.eof:
            self.drain(0.5)
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.eof = True
        deadline = time.monotonic() + HANG_SECONDS
        while not self.eof and time.monotonic() < deadline:
            self.drain(0.5)
            if self.raw.endswith(b"220 2.0.0 Ready to start TLS\r\n"):
                self.drain(1.0)
                if self.raw.endswith(b"220 2.0.0 Ready to start TLS\r\n"):
                    break
        self.sock.close()
        return self.eof or self.raw.endswith(b"220 2.0.0 Ready to start TLS\r\n")


class Fuzz(unittest.TestCase):
    timeout = int(SECONDS) + 150

    def setUp(self):
        message = f"SMTP fuzz seed {SEED} (set MAILRELAY_FUZZ_SEED={SEED} to repeat), {SECONDS:g} s"
        print("\n" + message)
        log.msg(message)
        self.sink = Sink()
        self.sink_port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        extra = (f'[transports.sink]\nhost = "127.0.0.1"\nport = {self.sink_port}\nsecurity = "none"\n\n'
                 '[[route]]\nrecipients = ["*"]\ntransport = "sink"\n\n[queue]\nfirst_retry = "1s"\n')
        self.relay = RelayFixture(self.mktemp(), extra=extra, permits=PERMITS)
        self.context = None
        self.lines: list[bytes] = []        # every reply line the relay sent a fuzzing client
        self.hangs: list[str] = []
        self.bdat_seen = {"framed": 0, "chunks": 0, "queued": 0, "out_of_step": []}

    def spawn(self) -> None:
        self.relay.spawn()
        self.addCleanup(self.relay.kill)
        self.context = client_context(self.relay.ca_file())

    def why(self, phase: str) -> str:
        return f"phase {phase}, seed {SEED} (MAILRELAY_FUZZ_SEED={SEED})"

    # -- judging ---------------------------------------------------------------------------------

    def control(self) -> list:
        """A clean message from 127.0.0.1 on the relay listener; returns its replies."""
        client = WireClient("127.0.0.1", self.relay.ports["relay"], timeout=HANG_SECONDS)
        try:
            client.reply()
            client.command("EHLO control.test")
            for command, code in (("MAIL FROM:<app@example.org>", 250), ("RCPT TO:<user@example.com>", 250),
                                  ("DATA", 354)):
                reply = client.command(command)
                if reply.code != code:
                    raise AssertionError(f"control message: {command} answered {reply.lines}")
            client.send(b"From: app@example.org\r\nSubject: control\r\n\r\ncontrol\r\n.\r\n")
            reply = client.reply(b"end of data")
            if reply.code != 250:
                raise AssertionError(f"control message: end of data answered {reply.lines}")
            client.command("QUIT")
            return client.replies
        finally:
            client.close()

    def judge(self, phase: str) -> None:
        why = self.why(phase)
        self.assertIsNone(self.relay.process.poll(), f"the relay died: {why}")
        bad = [line for line in self.lines if not REPLY_LINE.match(line)]
        self.assertEqual(bad[:5], [], f"malformed reply lines: {why}")
        unenhanced = [line for line in self.lines if line[:1] in b"245" and line[:3] not in (b"220", b"250")
                      and line[3:4] == b" " and not re.match(rb"^[245]\.[0-9]{1,3}\.[0-9]{1,3}( |$)", line[4:])]
        self.assertEqual(unenhanced[:5], [], f"replies without an enhanced status code: {why}")
        self.assertEqual(self.hangs, [], f"connections left open after the client stopped: {why}")
        self.assertEqual(malformed(self.control()), [], why)
        text = (self.relay.dir / "twistd.log").read_text(errors="replace")
        for marker in ("Traceback", "Unhandled"):
            self.assertNotIn(marker, text, f"{why}: the relay's log:\n{text[-4000:]}")
        rss, hwm = rss_kib(self.relay.process.pid)
        self.assertLess(hwm, RSS_CEILING_MIB * 1024, f"peak RSS {hwm} KiB: {why}")
        log.msg(f"fuzz {phase}: relay RSS {rss} KiB, peak {hwm} KiB")

    def keep(self, connection: Connection, label: str, half_close: bool = False) -> None:
        if not connection.finish(half_close):
            self.hangs.append(f"{label}: the last it said: {connection.raw[-300:]!r}")
        lines = connection.raw.split(b"\r\n")
        if lines and lines[-1] == b"":
            lines.pop()
        self.lines.extend(lines)

    # -- the phases (each runs in a thread, until its deadline) ------------------------------------

    def source(self, rng: random.Random) -> str:
        return f"127.0.{rng.randint(0, 3)}.{rng.randint(2, 254)}"

    def run_phase(self, phase: str, one, seconds: float) -> int:
        rng = random.Random(f"{SEED}:{phase}")
        deadline, count = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            count += 1
            one(rng, f"{phase}#{count}")
        log.msg(f"fuzz {phase}: {count} connections")
        return count

    def open(self, rng: random.Random, kinds=("relay", "relay", "relay", "submission", "submissions")) -> Connection:
        kind = rng.choice(kinds)
        return Connection(self.relay.ports[kind], self.source(rng),
                          tls=self.context if kind == "submissions" else None)

    def command_phase(self, rng: random.Random, label: str) -> None:
        connection = self.open(rng)
        for _ in range(rng.randint(1, 12)):
            connection.send(b"".join(fuzz_line(rng) for _ in range(rng.randint(1, 10))))
        self.keep(connection, label)

    def envelope(self, rng: random.Random, connection: Connection) -> None:
        recipients = b"".join(b"RCPT TO:<user%d@example.com>\r\n" % i for i in range(rng.randint(1, 3)))
        connection.send(b"EHLO fuzz.test\r\nMAIL FROM:<fuzz@example.org>\r\n" + recipients)

    def data_phase(self, rng: random.Random, label: str) -> None:
        connection = self.open(rng, ("relay",))
        self.envelope(rng, connection)
        connection.send(b"DATA\r\n")
        for _ in range(rng.randint(1, 30)):
            kind = rng.random()
            if kind < 0.6:
                chunk = b"".join(noise(rng, rng.choice(LENGTHS[:11])) + rng.choice(LINE_ENDS)
                                 for _ in range(rng.randint(1, 20)))
            elif kind < 0.8:
                chunk = noise(rng, rng.choice(LENGTHS))
            else:
                chunk = rng.choice([b"\r\n.\r\n", b".\r\n", b"\n.\n", b"\r\n\x00.\r\n", b"\r.\r", b".\n",
                                    b"\r\n..\r\n"]) + fuzz_line(rng)
            connection.send(chunk)
        self.keep(connection, label)

    def bdat_phase(self, rng: random.Random, label: str) -> None:
        if rng.random() < 0.6:
            self.bdat_framed(rng, label)
            return
        # Framed falsely: sizes unreadable, absurd or larger than what follows (then the next BDAT
        # lines are chunk octets).  Plaintext only: the client half-closes to end a chunk it never sent.
        connection = self.open(rng, ("relay",))
        self.envelope(rng, connection)
        for _ in range(rng.randint(1, 6)):
            size = rng.choice([0, 1, 7, 100, 4096, 65536, 10 ** 12, 2 ** 64])
            spelled = rng.choice([str(size).encode(), b"-1", b"", b"0x10", b"1e9", noise(rng, 6)])
            last = rng.choice([b"", b" LAST", b" last", b" LAST junk"])
            payload = noise(rng, min(size, rng.choice([0, 10, 1000, 70000])))
            connection.send(b"BDAT " + spelled + last + b"\r\n" + payload)
        self.keep(connection, label, half_close=True)

    def bdat_framed(self, rng: random.Random, label: str) -> None:
        """Chunks exactly as long as declared, holding anything (CRLF.CRLF, NULs, bare CR/LF, commands):
        whatever the answers, the relay must stay in step, so the ender's QUIT is answered 221."""
        connection = self.open(rng, ("relay", "relay", "submissions"))
        self.envelope(rng, connection)
        for _ in range(rng.randint(1, 6)):
            size = rng.choice([0, 1, 7, 100, 4096, 65536])
            if rng.random() < 0.3:
                payload = b"".join(noise(rng, rng.choice(LENGTHS[:11])) + rng.choice(LINE_ENDS)
                                   for _ in range(rng.randint(1, 20)))[:size]
                payload += b"\r\n.\r\n" + fuzz_line(rng)     # a DATA terminator and a command: content
            else:
                payload = noise(rng, size)
            last = rng.choice([b"", b" LAST", b" last", b" LAST junk", b""])
            connection.send(b"BDAT %d" % len(payload) + last + b"\r\n" + payload)
        self.keep(connection, label)
        self.bdat_seen["framed"] += 1
        self.bdat_seen["chunks"] += len(re.findall(rb"(^|\r\n)250 2\.0\.0 Ok: [0-9]+ octets", connection.raw))
        self.bdat_seen["queued"] += len(re.findall(rb"(^|\r\n)250 2\.0\.0 Ok: queued", connection.raw))
        if not re.search(rb"(^|\r\n)221 2\.0\.0 [^\r\n]*\r\n$", connection.raw):
            self.bdat_seen["out_of_step"].append(f"{label}: {connection.raw[-300:]!r}")

    def auth_phase(self, rng: random.Random, label: str) -> None:
        kind = rng.choice(["relay", "submission", "submissions"])
        connection = Connection(self.relay.ports[kind], self.source(rng),
                                tls=self.context if kind == "submissions" else None)
        connection.send(b"EHLO fuzz.test\r\n")
        if kind != "submissions" and not connection.starttls(self.context):
            self.keep(connection, label)
            return
        connection.send(b"EHLO fuzz.test\r\n")
        if rng.random() < 0.15:     # logged in for real first: the rest is fuzzed as an authenticated user
            connection.send(b"AUTH PLAIN " + base64.b64encode(b"\0app1\0" + PASSWORD.encode()) + b"\r\n")
            connection.send(b"".join(fuzz_line(rng) for _ in range(rng.randint(1, 10))))
        for _ in range(rng.randint(1, 5)):
            mechanism = rng.choice([b"PLAIN", b"LOGIN", b"plain", b"CRAM-MD5", b"XOAUTH2", b"", noise(rng, 12)])
            blob_kind = rng.random()
            if blob_kind < 0.3:
                blob = base64.b64encode(noise(rng, rng.choice(LENGTHS[:14]) * 3 // 4))
            elif blob_kind < 0.45:
                user = rng.choice([b"app1", b"APP1", b"app1\x00", noise(rng, rng.choice(LENGTHS[:8]))])
                blob = base64.b64encode(rng.choice([b"", user]) + b"\x00" + user + b"\x00" + noise(rng, 12))
            elif blob_kind < 0.6:
                blob = rng.choice([b"=", b"*", b"", b"====", b"A", b"AAA=\r\nAAA", noise(rng, 40)])
            else:
                blob = noise(rng, rng.choice(LENGTHS))
            first = b"AUTH " + mechanism + (b" " + blob if rng.random() < 0.6 else b"") + b"\r\n"
            more = b"".join(rng.choice([blob, b"*", b"=", noise(rng, 30)]) + b"\r\n" for _ in range(rng.randint(0, 3)))
            connection.send(first + more)
        self.keep(connection, label)

    # -- the fixed attacks -----------------------------------------------------------------------

    def fixed_attacks(self) -> dict:
        seen = {}
        # Thousands of RCPTs, pipelined in one write: 100 accepted (max_recipients), the rest 452 4.5.3,
        # one reply each, in order.
        rcpts = 5000
        connection = Connection(self.relay.ports["relay"], "127.0.0.1")
        connection.send(b"EHLO many.test\r\nMAIL FROM:<app@example.org>\r\n"
                        + b"".join(b"RCPT TO:<u%d@example.com>\r\n" % i for i in range(rcpts))
                        + b"DATA\r\nSubject: many\r\n\r\nmany\r\n.\r\n")
        connection.until(rb"250 2\.0\.0 ", 30)
        self.keep(connection, "thousands of RCPTs")
        rcpt_codes = [line[:9] for line in connection.raw.split(b"\r\n")]
        seen["rcpts"] = (rcpt_codes.count(b"250 2.1.5"), rcpt_codes.count(b"452 4.5.3"), connection.raw)

        # Garbage pipelined after STARTTLS in the same write: discarded, never answered, never run
        # (RFC 3207 4.2, CVE-2011-0411).  Nothing may follow the 220 in plaintext; after the handshake
        # NOOP's reply must come first.  Garbage that arrives in a later read than STARTTLS is taken
        # for the TLS handshake and fails it: then the connection must simply close.
        rng = random.Random(f"{SEED}:starttls")
        garbage = []
        for n in range(12):
            connection = Connection(self.relay.ports["relay"], self.source(rng))
            connection.send(b"EHLO tls.test\r\n")
            connection.until(rb"250 ")
            connection.raw = b""
            injected = (b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.com>\r\n" if n % 2
                        else b"".join(fuzz_line(rng) for _ in range(rng.randint(1, 20))))
            connection.sock.sendall(b"STARTTLS\r\n" + injected)
            if connection.until(rb"220 "):
                after = connection.raw.split(b"220 ", 1)[1].split(b"\r\n", 1)[1]
                connection.raw = b""
                connection.sock.settimeout(HANG_SECONDS)
                try:
                    connection.sock = self.context.wrap_socket(connection.sock)
                except (ssl.SSLError, OSError):
                    # Only acceptable when the garbage was too big for the read STARTTLS came in.
                    garbage.append((n, len(injected), after, None))
                    connection.eof = True
                else:
                    connection.send(b"NOOP\r\n")
                    connection.until(rb"250 ")
                    garbage.append((n, len(injected), after, connection.raw.split(b"\r\n", 1)[0]))
            self.keep(connection, f"garbage after STARTTLS #{n}")
        seen["starttls"] = garbage

        # Huge AUTH blobs and over-long lines.  One that arrives whole gets 500 5.5.2 and the session
        # goes on (RFC 5321 4.5.3.1.4); one bigger than the line bound is cut off with 421 4.5.2 as soon
        # as the bound is passed without a CRLF (the relay cannot know one will come), never buffered.
        for label, data, tls in (
                ("13000-octet AUTH PLAIN line", b"AUTH PLAIN " + b"QUFB" * 3250 + b"\r\nNOOP\r\n", True),
                ("600-octet command line", b"MAIL FROM:<" + b"a" * 600 + b">\r\nNOOP\r\n", False),
                ("1 MiB AUTH PLAIN line", b"AUTH PLAIN " + b"QUFB" * (1 << 18) + b"\r\nNOOP\r\n", True),
                ("1 MiB AUTH LOGIN response", b"AUTH LOGIN\r\n" + b"QUFB" * (1 << 18) + b"\r\nNOOP\r\n", True),
                ("4 MiB AUTH blob without CRLF", b"AUTH PLAIN " + b"QUFB" * (1 << 20), True),
                ("1 MiB command line", b"MAIL FROM:<" + b"a" * (1 << 20) + b">\r\nNOOP\r\n", False),
                ("4 MiB without CRLF", b"x" * (4 << 20), False)):
            connection = Connection(self.relay.ports["submissions" if tls else "relay"], "127.0.9.9",
                                    tls=self.context if tls else None)
            connection.send(b"EHLO big.test\r\n")
            connection.until(rb"250 ")
            connection.send(data)
            connection.until(rb"(250 2\.0\.0|421 )", 15)
            connection.drain(0.5)
            closed = connection.eof              # by the relay, before the ender's QUIT could close it
            self.keep(connection, label)
            seen[label] = (connection.raw, closed) if "MiB" in label else connection.raw
        return seen

    # -- the test ----------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_fuzz_every_phase(self):
        yield threads.deferToThread(self.spawn)
        yield threads.deferToThread(self.control)
        yield self.sink.wait_for(1)
        baseline, _ = rss_kib(self.relay.process.pid)
        phases = [("commands", self.command_phase), ("data", self.data_phase), ("bdat", self.bdat_phase),
                  ("auth", self.auth_phase)]
        for name, one in phases:
            count = yield threads.deferToThread(self.run_phase, name, one, SECONDS / len(phases))
            self.assertGreater(count, 0)
            yield threads.deferToThread(self.judge, name)
        # BDAT was really spoken (chunks taken, messages queued) and every exactly framed session,
        # whatever its chunks held, stayed in step to its QUIT.
        seen = self.bdat_seen
        log.msg(f"fuzz bdat: {seen['framed']} framed sessions, {seen['chunks']} chunks taken, "
                f"{seen['queued']} messages queued")
        self.assertEqual(seen["out_of_step"][:3], [], self.why("bdat"))
        if seen["framed"] >= 10:
            self.assertGreater(seen["chunks"], 0, self.why("bdat"))

        seen = yield threads.deferToThread(self.fixed_attacks)
        yield threads.deferToThread(self.judge, "fixed attacks")
        accepted, refused, raw = seen["rcpts"]
        self.assertEqual((accepted, refused), (100, 4900), raw[-300:])
        self.assertEqual(len(seen["starttls"]), 12)
        for n, size, after, first in seen["starttls"]:
            self.assertEqual(after, b"", "plaintext pipelined after STARTTLS was answered")
            if n % 2 or size < 1000:       # the short injections arrive with STARTTLS: TLS must work
                self.assertEqual(first, b"250 2.0.0 Ok", f"injection #{n} of {size} octets: {self.why('tls')}")
        for label in ("13000-octet AUTH PLAIN line", "600-octet command line"):
            self.assertIn(b"500 5.5.2", seen[label], label)
            self.assertIn(b"250 2.0.0 Ok", seen[label], label)          # NOOP after it: the session went on
        for label in ("1 MiB AUTH PLAIN line", "1 MiB AUTH LOGIN response", "4 MiB AUTH blob without CRLF",
                      "1 MiB command line", "4 MiB without CRLF"):
            raw, closed = seen[label]
            # The 421 itself can be lost: closing with our unread bytes queued makes the kernel send a
            # reset, which may discard it on our side before we read it.  The close cannot be lost.
            self.assertTrue(closed, label)
            self.assertNotIn(b"250 2.0.0 Ok", raw, label)

        rss, hwm = rss_kib(self.relay.process.pid)
        log.msg(f"fuzz: relay RSS {baseline} KiB before, {rss} KiB after, peak {hwm} KiB")
        self.assertLess(rss - baseline, RSS_GROWTH_MIB * 1024,
                        f"RSS grew from {baseline} to {rss} KiB: {self.why('all')}")

    @defer.inlineCallbacks
    def test_parallel_auth_attempts_keep_memory_bounded(self):
        # Each argon2id check takes 64 MiB (RFC 9106 low-memory parameters); twelve strangers trying a
        # password at once must not make the relay hold twelve of them (it held ten: 720 MiB).
        yield threads.deferToThread(self.spawn)
        idle, _ = rss_kib(self.relay.process.pid)

        def attempt(i: int) -> bytes:
            connection = Connection(self.relay.ports["submissions"], f"127.0.6.{i + 1}", tls=self.context)
            connection.send(b"EHLO parallel.test\r\n")
            connection.until(rb"250 ")
            connection.send(b"AUTH PLAIN " + base64.b64encode(b"\0app1\0wrong %d" % i) + b"\r\n")
            connection.until(rb"5[0-9][0-9] ", HANG_SECONDS)
            answer = connection.raw.split(b"\r\n")[-2]
            self.keep(connection, f"parallel AUTH #{i}")
            return answer

        answers = yield defer.gatherResults([threads.deferToThread(attempt, i) for i in range(12)])
        self.assertEqual(set(answers), {b"535 5.7.8 Authentication credentials invalid"})
        _, peak = rss_kib(self.relay.process.pid)
        self.assertLess(peak - idle, 3 * 64 * 1024, f"peak RSS {peak} KiB, idle {idle} KiB")
        yield threads.deferToThread(self.judge, "parallel AUTH")
