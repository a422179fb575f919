"""In-memory test doubles for the server's collaborators: an incoming queue and its writers, relay
policies (allow-all, deny-relay), credential checkers, and a StringTransport that can start TLS.

Anyone may reuse them; they satisfy the interfaces in mailrelay.interfaces.
"""
from __future__ import annotations

import itertools
from typing import Optional

from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import directlyProvides, implementer, providedBy

from mailrelay.interfaces import IIncomingQueue, IMessageWriter, IRelayPolicy, Reply
from mailrelay.server.realm import TemporaryAuthFailure, build_portal


@implementer(IMessageWriter)
class FakeWriter:
    """Keeps the message in memory. `queue.commit_mode` decides how commit() ends."""

    def __init__(self, queue: "FakeQueue", envelope, queue_id: str):
        self.queue, self.envelope, self.queue_id = queue, envelope, queue_id
        self.chunks: list[bytes] = []
        self.aborted = self.committed = False
        self.pending: Optional[defer.Deferred] = None

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def size(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    def write(self, data: bytes) -> None:
        assert not (self.aborted or self.committed), "write after abort/commit"
        assert isinstance(data, bytes)
        self.chunks.append(data)

    def commit(self) -> defer.Deferred:
        mode = self.queue.commit_mode
        if mode == "fail":
            return defer.fail(OSError("disk full"))
        if mode == "pending":
            self.pending = defer.Deferred()
            self.pending.addCallback(self._done)
            return self.pending
        return defer.succeed(self._done(self.queue_id))

    def _done(self, queue_id):
        self.committed = True
        self.queue.messages.append(self)
        return queue_id

    def abort(self) -> None:
        self.aborted = True


@implementer(IIncomingQueue)
class FakeQueue:
    """`messages`: committed writers, in order. `writers`: every writer handed out."""

    logs_queued = False     # the session writes the "queued" lines

    def __init__(self, commit_mode: str = "ok"):
        self.commit_mode = commit_mode      # "ok" | "fail" | "pending"
        self.messages: list[FakeWriter] = []
        self.writers: list[FakeWriter] = []
        self._ids = itertools.count(1)

    def new_message(self, envelope) -> FakeWriter:
        writer = FakeWriter(self, envelope, f"Q{next(self._ids):06d}")
        self.writers.append(writer)
        return writer


@implementer(IRelayPolicy)
class AllowAllPolicy:
    """Accepts everything; records what it was asked."""

    def __init__(self):
        self.clients: list = []
        self.headers: list[bytes] = []

    def identify(self, client):
        self.clients.append(client)
        return client.user or "permit[0]"

    def check_sender(self, client, sender):
        return None

    def check_recipient(self, client, sender, recipient):
        return None

    def check_message(self, client, sender, headers):
        self.headers.append(headers)
        return None

    def signing_senders(self, client):
        return ("*",)


@implementer(IRelayPolicy)
class DenyRelayPolicy(AllowAllPolicy):
    """Refuses every recipient outside `local_domains` (550 5.7.1), and senders in `bad_senders`."""

    def __init__(self, local_domains=("example.org",), bad_senders=()):
        super().__init__()
        self.local_domains, self.bad_senders = tuple(local_domains), tuple(bad_senders)

    def check_sender(self, client, sender):
        if sender in self.bad_senders:
            return Reply(550, "5.7.1", "Sender not allowed")
        return None

    def check_recipient(self, client, sender, recipient):
        if recipient.rpartition("@")[2].lower() in self.local_domains:
            return None
        return Reply(550, "5.7.1", "Relay access denied")


@implementer(ICredentialsChecker)
class TemporaryFailureChecker:
    """A directory that cannot be reached: every check fails with TemporaryAuthFailure."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials):
        return defer.fail(TemporaryAuthFailure("directory unreachable"))


@implementer(ICredentialsChecker)
class PendingChecker:
    """Checks nothing until the test fires `pending[-1]` with an avatar id (or an error)."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self):
        self.pending: list[defer.Deferred] = []

    def requestAvatarId(self, credentials):
        d = defer.Deferred()
        self.pending.append(d)
        return d


def memory_portal(**users: str):
    """A portal over the relay realm whose users are `name=password` (bytes on the wire)."""
    checker = InMemoryUsernamePasswordDatabaseDontUse(
        **{name: password.encode("utf-8") for name, password in users.items()}
    )
    return build_portal([checker])


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that accepts startTLS: records the options and from then on provides
    ISSLTransport. `tls_started_at` is the length of the output when TLS began.  As an ITCPTransport
    (which ITLSTransport extends) it keeps the TCP_NODELAY setting it is given in `tcp_no_delay`."""

    tls_options = None
    tls_started_at: Optional[int] = None
    tcp_no_delay = False

    def setTcpNoDelay(self, enabled):
        self.tcp_no_delay = bool(enabled)

    def getTcpNoDelay(self):
        return self.tcp_no_delay

    def startTLS(self, contextFactory, normal=True):
        self.tls_options = contextFactory
        self.tls_started_at = len(self.value())
        directlyProvides(self, providedBy(self), ISSLTransport)


class SilentRedisConnection:
    """Stands in for the RedisProtocol of a cluster.redis.RedisLink: takes every command and never
    answers (a Redis that hangs); `answer(i, value)` fires the i-th command's reply."""

    def __init__(self):
        self.sent: list = []
        self.pending: list = []
        self.transport = self
        self.aborted = False

    def execute_command(self, *command):
        from twisted.internet import defer

        self.sent.append(command)
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def answer(self, index: int, value) -> None:
        self.pending[index].callback(value)

    def abortConnection(self):
        self.aborted = True

    def loseConnection(self):
        self.aborted = True


def silent_redis_link(clock, metrics=None, timeout: float = 0.1):
    """A RedisLink that is up, on `clock`, over a SilentRedisConnection (returned with it); reconnects
    are refused."""
    from twisted.internet import defer

    from mailrelay.cluster.redis import RedisLink
    from mailrelay.cluster.url import RedisURL

    class Refusing:
        attempts = 0

        def connect(self, factory):
            Refusing.attempts += 1
            return defer.fail(ConnectionRefusedError("connection refused"))

    link = RedisLink(RedisURL.parse("redis://:s3cret@127.0.0.1:6390/0"), clock, timeout=timeout, metrics=metrics,
                     endpoint=Refusing())
    link.running = True
    conn = SilentRedisConnection()
    link._conn, link.up, link._announced = conn, True, True
    return link, conn


class StandInClient:
    """What the pool uses of a DeliveryClient."""

    def __init__(self, age: float = 0.0):
        self._age = age
        self.quits = 0

    def age(self) -> float:
        return self._age

    def quit_idle(self):
        self.quits += 1
        return defer.succeed(None)
