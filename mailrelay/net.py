# -*- test-case-name: tests.test_net -*-
"""Socket settings and the write path shared by both ends of our SMTP connections (the server sessions
and the client), and by the pipe to the delivery process."""
from __future__ import annotations

import os
import socket

from twisted.internet import abstract, process, tcp
from twisted.internet.interfaces import ITCPTransport


def no_delay(transport: object) -> None:
    """Turn off Nagle's algorithm: SMTP is a lock-step dialogue of small writes (a command, then the end
    of data), and Nagle holding a small write back until the peer's delayed ACK costs ~40 ms a message.

    Any TCP connection provides Twisted's ITCPTransport, and so does each wrapper around one (TLS, the
    PROXY header reader: ProtocolWrapper provides what the transport it wraps does, and passes calls
    on); a UNIX socket, a pipe or a test transport does not and is left alone."""
    if not ITCPTransport.providedBy(transport):
        return
    try:
        transport.setTcpNoDelay(True)
    except OSError:       # the socket is already closed
        pass


def write_now(transport, data: bytes) -> None:
    """transport.write(data), but handed to the kernel at once when nothing is waiting before it.

    Twisted buffers every write until the next reactor turn: one SMTP reply costs an epoll change to
    watch for writability, a turn of the loop, the send, and an epoll change back (a pipe to a child
    process four changes: its writer also stops and restarts watching for the child closing it).
    Replies, commands and queue ids are small and the kernel's buffer is almost always free, so a plain
    TCP transport or a process pipe with nothing buffered gets a direct send()/write(); whatever the
    kernel does not take (or an error, which Twisted then finds and reports the usual way) goes through
    transport.write() behind it, so order is kept. TLS (STARTTLS sets `TLS` on the same transport), a
    registered producer (it must see the buffer drain), a closing connection and any other transport
    take the ordinary path."""
    send = _direct_send(transport)
    if send is not None:
        try:
            sent = send(data)
        except OSError:      # EAGAIN, or the connection broke: transport.write() sorts it out
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def _direct_send(transport):
    if not (isinstance(transport, abstract.FileDescriptor) and transport.connected
            and not transport.disconnecting and not getattr(transport, "_writeDisconnected", True)
            and transport.producer is None
            and not transport.dataBuffer and not getattr(transport, "_tempDataBuffer", True)):
        return None
    if isinstance(transport, tcp.Connection):
        return None if transport.TLS else transport.socket.send
    if isinstance(transport, process.ProcessWriter):
        fd = transport.fd
        return lambda data: os.write(fd, data)
    return None


def close_now(transport) -> None:
    """transport.loseConnection(), with the FIN sent at once when nothing is waiting to be written.

    loseConnection() only asks the reactor to watch for writability: the socket is shut down on the next
    turn, so a client reading our last reply (the 221 after QUIT, a 421) and then waiting for the close
    waits a turn of the loop and connectionLost's bookkeeping (~60 µs a session here). On a plain TCP
    transport with nothing buffered (the conditions of write_now's direct send), everything written is in
    the kernel already: shutdown(SHUT_WR) queues the FIN behind it, in order, and loseConnection() then
    closes the descriptor on the next turn as usual. Not abortConnection(): its RST can make the client's
    kernel discard a reply not yet read. TLS (its close_notify), a producer, buffered data and any other
    transport take the ordinary path."""
    if _direct_send(transport) is not None and isinstance(transport, tcp.Connection):
        try:
            transport.socket.shutdown(socket.SHUT_WR)
        except OSError:      # the peer is gone already: loseConnection() finds out the usual way
            pass
    transport.loseConnection()
