"""mailrelay.net over real loopback TCP connections: write_now's direct send never reorders, never
bypasses TLS, never starves a producer, and falls back to Twisted's buffer for whatever is left; no_delay
sets TCP_NODELAY on the socket, through TLS and other wrappers; close_now sends the FIN right behind what
was sent, and closes as usual when anything is still buffered."""
from __future__ import annotations

import socket

from twisted.internet import defer, protocol, reactor, ssl, tcp
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import deferLater
from twisted.protocols import policies
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.proto_helpers import StringTransport
from twisted.trial import unittest

from mailrelay.net import close_now, no_delay, write_now
from mailrelay.tls import generate_self_signed


class _Collect(protocol.Protocol):
    def connectionMade(self):
        self.received = bytearray()
        self.factory.connected.callback(self)

    def dataReceived(self, data):
        self.received += data
        if len(self.received) >= self.factory.expected and not self.factory.done.called:
            self.factory.done.callback(bytes(self.received))


class _Writer(protocol.Protocol):
    def connectionMade(self):
        self.factory.connected.callback(self)


class WriteNowTests(unittest.TestCase):

    @defer.inlineCallbacks
    def connected_pair(self, expected: int):
        server_factory = protocol.Factory.forProtocol(_Collect)
        server_factory.connected, server_factory.done = defer.Deferred(), defer.Deferred()
        server_factory.expected = expected
        port = reactor.listenTCP(0, server_factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client_factory = protocol.ClientFactory.forProtocol(_Writer)
        client_factory.connected = defer.Deferred()
        connector = reactor.connectTCP("127.0.0.1", port.getHost().port, client_factory)
        self.addCleanup(connector.disconnect)
        writer = yield client_factory.connected
        collector = yield server_factory.connected
        self.addCleanup(collector.transport.loseConnection)
        return writer, server_factory.done

    @defer.inlineCallbacks
    def test_an_idle_connection_sends_at_once_without_the_reactor(self):
        writer, done = yield self.connected_pair(len(b"250 ok\r\n"))
        write_now(writer.transport, b"250 ok\r\n")
        # Nothing was left for the reactor to write: the kernel has it already.
        self.assertEqual(writer.transport.dataBuffer, b"")
        self.assertEqual(writer.transport._tempDataBuffer, [])
        self.assertEqual((yield done), b"250 ok\r\n")

    @defer.inlineCallbacks
    def test_data_already_buffered_keeps_its_place_in_front(self):
        writer, done = yield self.connected_pair(len(b"first\r\nsecond\r\n"))
        writer.transport.write(b"first\r\n")         # buffered by Twisted, not sent yet
        write_now(writer.transport, b"second\r\n")    # must queue behind it, not overtake it
        self.assertEqual((yield done), b"first\r\nsecond\r\n")

    @defer.inlineCallbacks
    def test_what_the_kernel_does_not_take_goes_through_the_buffer_in_order(self):
        big = bytes(range(256)) * 40_000               # ~10 MB: far more than a socket send buffer
        writer, done = yield self.connected_pair(len(big) + 4)
        write_now(writer.transport, big)
        self.assertTrue(writer.transport._tempDataBuffer or writer.transport.dataBuffer)
        write_now(writer.transport, b"end\n")
        self.assertEqual((yield done), big + b"end\n")

    @defer.inlineCallbacks
    def test_a_registered_producer_gets_the_ordinary_path(self):
        writer, done = yield self.connected_pair(len(b"chunk"))

        class Pull:
            def resumeProducing(self):
                pass

            def stopProducing(self):
                pass

        writer.transport.registerProducer(Pull(), False)
        write_now(writer.transport, b"chunk")
        self.assertEqual(writer.transport._tempDataBuffer, [b"chunk"])   # the producer will see it drain
        writer.transport.unregisterProducer()
        self.assertEqual((yield done), b"chunk")

    @defer.inlineCallbacks
    def test_a_closing_connection_gets_the_ordinary_path(self):
        writer, _ = yield self.connected_pair(1)
        writer.transport.loseConnection()
        write_now(writer.transport, b"late")
        self.assertEqual(writer.transport._tempDataBuffer, [b"late"])
        yield deferLater(reactor, 0, lambda: None)

    def test_other_transports_are_written_as_usual(self):
        transport = StringTransport()
        write_now(transport, b"220 hi\r\n")
        self.assertEqual(transport.value(), b"220 hi\r\n")


class _Held(protocol.Protocol):
    def connectionMade(self):
        self.factory.accepted.append(self)
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        self.lost.callback(None)


def _read_to_eof(sock: socket.socket) -> bytes:
    """Everything the peer sends up to its FIN, read with a blocking socket (the reactor does not run)."""
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


class CloseNowTests(unittest.TestCase):
    """A raw blocking client socket on one end, a Twisted transport on the other."""

    @defer.inlineCallbacks
    def accepted(self):
        factory = protocol.Factory.forProtocol(_Held)
        factory.accepted = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
        self.addCleanup(client.close)
        while not factory.accepted:
            yield deferLater(reactor, 0.001, lambda: None)
        return factory.accepted[0], client

    @defer.inlineCallbacks
    def test_the_fin_follows_a_direct_write_without_a_reactor_turn(self):
        server, client = yield self.accepted()
        write_now(server.transport, b"221 2.0.0 Bye\r\n")
        close_now(server.transport)
        # The reactor is not running while the test reads: the reply and the FIN are in the kernel already.
        self.assertEqual(_read_to_eof(client), b"221 2.0.0 Bye\r\n")
        self.assertFalse(server.lost.called)          # the descriptor itself is closed on the next turn
        yield server.lost

    @defer.inlineCallbacks
    def test_buffered_data_is_sent_before_the_close(self):
        server, client = yield self.accepted()
        server.transport.write(b"250 2.0.0 Ok\r\n")      # in Twisted's buffer, not the kernel's
        write_now(server.transport, b"221 2.0.0 Bye\r\n")
        close_now(server.transport)                       # so no shutdown now: loseConnection flushes first
        self.assertEqual(server.transport._tempDataBuffer, [b"250 2.0.0 Ok\r\n", b"221 2.0.0 Bye\r\n"])
        yield server.lost
        self.assertEqual(_read_to_eof(client), b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n")

    @defer.inlineCallbacks
    def test_a_peer_already_gone_is_closed_quietly(self):
        server, client = yield self.accepted()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()                  # an RST, which the server's reactor has not seen yet
        self.assertTrue(server.transport.connected)
        close_now(server.transport)     # shutdown() on a reset socket: no exception escapes
        yield server.lost

    def test_other_transports_lose_their_connection_as_usual(self):
        transport = StringTransport()
        close_now(transport)
        self.assertTrue(transport.disconnecting)


class _Echo(protocol.ProcessProtocol):
    def __init__(self):
        self.out, self.ended = bytearray(), defer.Deferred()

    def outReceived(self, data):
        self.out += data

    def processEnded(self, reason):
        self.ended.callback(bytes(self.out))


class PipeTests(unittest.TestCase):

    @defer.inlineCallbacks
    def test_a_child_s_stdin_gets_direct_writes_and_keeps_their_order(self):
        import sys

        echo = _Echo()
        process = reactor.spawnProcess(echo, sys.executable, [
            sys.executable, "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"], env=None)
        stdin = process.pipes[0]
        write_now(stdin, b"one\n")
        self.assertEqual((stdin.dataBuffer, stdin._tempDataBuffer), (b"", []))    # in the pipe already
        stdin.write(b"two\n")                  # buffered by Twisted ...
        write_now(stdin, b"three\n")           # ... so this one queues behind it
        self.assertEqual(stdin._tempDataBuffer, [b"two\n", b"three\n"])
        process.closeStdin()
        self.assertEqual((yield echo.ended), b"one\ntwo\nthree\n")


class _Connected(protocol.Protocol):
    def connectionMade(self):
        self.factory.connected.callback(self)


class NoDelayTests(unittest.TestCase):
    """no_delay finds the TCP socket by ITCPTransport, through the wrappers Twisted and we put around it."""

    @defer.inlineCallbacks
    def connected(self, wrap=lambda factory: factory):
        factory = protocol.Factory.forProtocol(_Connected)
        factory.connected = defer.Deferred()
        port = reactor.listenTCP(0, wrap(factory), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        sock = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(sock.close)
        server = yield factory.connected
        self.addCleanup(server.transport.abortConnection)
        return server.transport

    @staticmethod
    def nodelay(transport) -> int:
        tcp_transport = transport
        while not isinstance(tcp_transport, tcp.Connection):    # down through the wrappers to the socket
            tcp_transport = tcp_transport.transport
        return tcp_transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    @defer.inlineCallbacks
    def test_a_tcp_connection_and_a_wrapped_one_get_tcp_nodelay(self):
        cert_pem, key_pem = generate_self_signed("localhost")
        options = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem).options()
        for wrap in (lambda f: f, policies.WrappingFactory, lambda f: TLSMemoryBIOFactory(options, False, f)):
            transport = yield self.connected(wrap)
            self.assertTrue(ITCPTransport.providedBy(transport), transport)
            self.assertEqual(self.nodelay(transport), 0)
            no_delay(transport)
            self.assertNotEqual(self.nodelay(transport), 0, transport)

    def test_a_transport_without_tcp_is_left_alone(self):
        transport = StringTransport()
        no_delay(transport)
        self.assertFalse(ITCPTransport.providedBy(transport))
        self.assertEqual(transport.value(), b"")
