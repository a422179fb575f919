"""What one SMTP server session costs the relay: CPU per session and per message, memory per idle
connection, and which of Twisted's own methods the session still calls.

Where it sits: outside the message's journey, timing its first stage (mailrelay.server.session) alone,
with the spool and the policy replaced by in-memory stand-ins that do nothing, so only the session's
own work is measured.

- `string`: N sessions over twisted.internet.testing.StringTransport (no sockets, no reactor): connect,
  EHLO, MAIL, RCPT, DATA, a 2 KiB body, QUIT, connection lost.  Then one session with M pipelined
  transactions (MAIL, RCPT, BDAT 2 KiB LAST each).  The best of `--repeat` rounds, in microseconds of
  this process's CPU time (time.process_time: what other processes take of the machine stays out).
- `calls`: the Python and C function calls of one such session, and of one pipelined message:
  a count, not a time, so it is the same on a busy machine.
- `idle`: memory per open idle session (tracemalloc, 1000 sessions after EHLO), in bytes.
- `loopback`: N sessions over real loopback TCP, `--clients` at a time, the clients in this process
  (their cost is in the figure too, the same before and after a change of the session): sessions/s.
- `trace`: the methods defined in Twisted (twisted.mail.smtp, twisted.protocols.basic and .policies,
  twisted.internet.protocol) that run with the session as `self` during 20 `string` sessions and one
  with STARTTLS, an unknown command, an over-long line and the idle timeout: what a Twisted base class
  still does for the session.

    .venv/bin/python benchmarks/session_cost.py                  # all five, a few seconds
    .venv/bin/python benchmarks/session_cost.py --sessions 5000 --repeat 5 string
"""
from __future__ import annotations

import argparse
import collections
import gc
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twisted.internet import defer, protocol  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.interfaces import ISSLTransport, ITLSTransport  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from zope.interface import directlyProvides, implementer, providedBy  # noqa: E402

from mailrelay import config  # noqa: E402
from mailrelay.server.factory import RelayServerFactory  # noqa: E402

BODY = b"Subject: bench\r\n\r\n" + b"A line of a benchmark message, seventy-odd octets long, give or take.\r\n" * 28
ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


class Writer:
    """An IMessageWriter that keeps nothing."""

    def __init__(self, queue_id: str):
        self.queue_id, self.size = queue_id, 0

    def write(self, data: bytes) -> None:
        self.size += len(data)

    def commit(self):
        return defer.succeed(self.queue_id)

    def abort(self) -> None:
        pass


class Queue:
    logs_queued = True       # no "queued" log line: the logging is not the session's cost

    def __init__(self):
        self.count = 0

    def new_message(self, envelope):
        self.count += 1
        return Writer(f"Q{self.count:08d}")


class Policy:
    def identify(self, client):
        return "permit[0]"

    def check_sender(self, client, sender):
        return None

    def check_recipient(self, client, sender, recipient):
        return None

    def check_message(self, client, sender, headers):
        return None

    def signing_senders(self, client):
        return ("*",)


def factory(clock=None) -> RelayServerFactory:
    limits = config.Limits(max_connections=100000, max_connections_per_ip=100000)
    return RelayServerFactory(
        hostname="relay.test", listener=config.Listener("relay", "tcp:0", False), limits=limits,
        portal=None, mechanisms=(), policy=Policy(), queue=Queue(), tls_options=None,
        clock=clock or Clock(),
    )


SESSION = [b"EHLO client.test\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@example.net>\r\n",
           b"DATA\r\n", BODY + b".\r\n", b"QUIT\r\n"]


def one_session(f: RelayServerFactory) -> bytes:
    transport = StringTransport(peerAddress=ADDRESS)
    session = f.buildProtocol(ADDRESS)
    session.makeConnection(transport)
    for line in SESSION:
        session.dataReceived(line)
    session.connectionLost(None)
    return transport.value()


def string_sessions(n: int) -> float:
    """Microseconds per whole session (one message each)."""
    f = factory()
    reply = one_session(f)
    assert reply.count(b"\r\n250 2.0.0 Ok: queued as ") == 1 and reply.endswith(b"221 2.0.0 relay.test Bye\r\n"), reply
    gc.collect()
    start = time.process_time()
    for _ in range(n):
        one_session(f)
    return (time.process_time() - start) / n * 1e6


def pipelined_messages(m: int) -> float:
    """Microseconds per message, M transactions pipelined in one session (BDAT, one chunk each)."""
    f = factory()
    transport = StringTransport(peerAddress=ADDRESS)
    session = f.buildProtocol(ADDRESS)
    session.makeConnection(transport)
    session.dataReceived(b"EHLO client.test\r\n")
    one = (b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nBDAT %d LAST\r\n" % len(BODY)) + BODY
    batch = one * 50
    gc.collect()
    start = time.process_time()
    for _ in range(m // 50):
        session.dataReceived(batch)
    elapsed = time.process_time() - start
    assert transport.value().count(b"250 2.0.0 Ok: queued as ") == m // 50 * 50
    session.connectionLost(None)
    return elapsed / (m // 50 * 50) * 1e6


def idle_memory(n: int = 1000) -> float:
    """Bytes per open session after EHLO (its transport's buffer excluded: cleared)."""
    f = factory()
    keep = []
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(n):
        transport = StringTransport(peerAddress=ADDRESS)
        session = f.buildProtocol(ADDRESS)
        session.makeConnection(transport)
        session.dataReceived(b"EHLO client.test\r\n")
        transport.clear()
        keep.append((session, transport))
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    bare = tracemalloc_transports(n)
    return (after - before) / n - bare


def tracemalloc_transports(n: int) -> float:
    """What the StringTransports alone take (subtracted from the figure above)."""
    keep = []
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(n):
        keep.append(StringTransport(peerAddress=ADDRESS))
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / n


class LoopClient(protocol.Protocol):
    """One pipelined session: EHLO+MAIL+RCPT+DATA, the body once 354 comes, QUIT."""

    def connectionMade(self):
        self.buffer = b""
        self.stage = 0

    def dataReceived(self, data):
        self.buffer += data
        if self.stage == 0 and self.buffer.endswith(b"\r\n") and b"220 " in self.buffer:
            self.stage, self.buffer = 1, b""
            self.transport.write(b"".join(SESSION[:4]))
        elif self.stage == 1 and b"354 " in self.buffer:
            self.stage, self.buffer = 2, b""
            self.transport.write(SESSION[4] + SESSION[5])

    def connectionLost(self, reason):
        self.factory.done(b"250 2.0.0 Ok" in self.buffer)


def loopback(n: int, clients: int) -> tuple[float, float]:
    """(sessions per second, CPU microseconds per session) over loopback TCP."""
    from twisted.internet import reactor

    f = factory(clock=reactor)
    port = reactor.listenTCP(0, f, interface="127.0.0.1")
    result = {}

    def run():
        start, cpu = time.perf_counter(), time.process_time()
        counter = _Counter(n)
        clients_f = _Clients(reactor, port.getHost().port, n, clients, counter)
        counter.finished.addCallback(lambda _: result.update(
            wall=time.perf_counter() - start, cpu=time.process_time() - cpu, ok=clients_f.ok))
        counter.finished.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    port.stopListening()
    assert result["ok"] == n, result
    return n / result["wall"], result["cpu"] / n * 1e6


class _Counter:
    def __init__(self, n: int):
        self.left = n
        self.finished = defer.Deferred()

    def one(self):
        self.left -= 1
        if self.left == 0:
            self.finished.callback(None)


class _Clients(protocol.ClientFactory):
    protocol = LoopClient

    def __init__(self, reactor, port: int, total: int, clients: int, counter: _Counter):
        self.reactor, self.port, self.to_start, self.counter = reactor, port, total, counter
        self.ok = 0
        for _ in range(min(clients, total)):
            self._start()

    def _start(self):
        self.to_start -= 1
        self.reactor.connectTCP("127.0.0.1", self.port, self)

    def done(self, ok: bool):
        self.ok += ok
        self.counter.one()
        if self.to_start > 0:
            self._start()


def calls_per_session() -> tuple[int, int, int, int]:
    """(Python calls, C calls) in one whole session, then per pipelined message: what the session does,
    counted by sys.setprofile, the same on any machine and under any load."""
    counts = collections.Counter()

    def profile(frame, event, arg):
        counts[event] += 1

    f = factory()
    one_session(f)                       # warm: first-time imports and caches stay out of the count
    sys.setprofile(profile)
    try:
        one_session(f)
    finally:
        sys.setprofile(None)
    session = counts["call"], counts["c_call"]
    transport = StringTransport(peerAddress=ADDRESS)
    protocol = f.buildProtocol(ADDRESS)
    protocol.makeConnection(transport)
    protocol.dataReceived(b"EHLO client.test\r\n")
    one = (b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nBDAT %d LAST\r\n" % len(BODY)) + BODY
    protocol.dataReceived(one)
    counts.clear()
    sys.setprofile(profile)
    try:
        protocol.dataReceived(one * 10)
    finally:
        sys.setprofile(None)
    assert transport.value().count(b"250 2.0.0 Ok: queued as ") == 11
    return session + (counts["call"] // 10, counts["c_call"] // 10)


def trace() -> list[tuple[str, int]]:
    """(Twisted function, calls) run with a session as `self` during 20 string sessions."""
    from mailrelay.server.session import RelaySession

    watched = ("twisted/mail/smtp.py", "twisted/protocols/basic.py", "twisted/protocols/policies.py",
               "twisted/internet/protocol.py")
    calls: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if not code.co_filename.endswith(watched):
            return
        if isinstance(frame.f_locals.get("self"), RelaySession):
            calls[f"{Path(code.co_filename).name}:{code.co_qualname}"] += 1

    clock = Clock()
    f = factory(clock)
    f.tls_options = object()          # startTLS is faked by the transport below
    sys.setprofile(profile)
    try:
        for _ in range(20):
            one_session(f)
        # The other paths: STARTTLS, an unknown command, an over-long line, the idle timeout.
        transport = TLSStringTransport(peerAddress=ADDRESS)
        session = f.buildProtocol(ADDRESS)
        session.makeConnection(transport)
        for line in (b"EHLO client.test\r\n", b"STARTTLS\r\n", b"EHLO client.test\r\n", b"FOO\r\n",
                     b"NOOP " + b"x" * 600 + b"\r\n", b"VRFY x\r\n", b"HELP\r\n", b"RSET\r\n"):
            session.dataReceived(line)
        clock.advance(f.limits.idle_timeout + 1)
        session.connectionLost(None)
        assert b"421 4.4.2" in transport.value() and transport.tls_started, transport.value()
    finally:
        sys.setprofile(None)
    return sorted(calls.items())


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    tls_started = False
    tcp_no_delay = False

    def setTcpNoDelay(self, enabled):      # ITCPTransport's, which ITLSTransport extends
        self.tcp_no_delay = bool(enabled)

    def startTLS(self, context_factory, normal=True):
        self.tls_started = True
        directlyProvides(self, providedBy(self), ISSLTransport)


WHAT = ["string", "calls", "idle", "loopback", "trace"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="*", choices=[[], *WHAT], help=", ".join(WHAT) + " (default: all)")
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args(argv)
    args.what = args.what or WHAT
    if "string" in args.what:
        per_session = min(string_sessions(args.sessions) for _ in range(args.repeat))
        per_message = min(pipelined_messages(args.messages) for _ in range(args.repeat))
        print(f"string:   {per_session:7.1f} us per session (EHLO, MAIL, RCPT, DATA 2 KiB, QUIT; "
              f"best of {args.repeat} x {args.sessions})")
        print(f"string:   {per_message:7.1f} us per message (pipelined MAIL, RCPT, BDAT 2 KiB LAST in one "
              f"session; best of {args.repeat} x {args.messages})")
    if "calls" in args.what:
        py, c, py_message, c_message = calls_per_session()
        print(f"calls:    {py:7d} Python calls and {c} C calls per session; {py_message} and {c_message} per "
              f"pipelined message (sys.setprofile)")
    if "idle" in args.what:
        print(f"idle:     {idle_memory():7.0f} bytes per open session after EHLO (tracemalloc, 1000 sessions)")
    if "loopback" in args.what:
        rate, cpu = loopback(args.sessions, args.clients)
        print(f"loopback: {rate:7.0f} sessions/s, {cpu:.0f} us CPU per session, clients included "
              f"({args.sessions} sessions, {args.clients} at a time)")
    if "trace" in args.what:
        found = trace()
        print("trace:    Twisted methods run on the session (20 sessions):" + ("" if found else " none"))
        for name, count in found:
            print(f"          {count:5d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
