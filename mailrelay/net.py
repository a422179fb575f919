"""Socket settings shared by both ends of our SMTP connections (the server sessions and the client)."""

def no_delay(transport) -> None:
    """Turn off Nagle's algorithm: SMTP is a lock-step dialogue of small writes (a command, then the end
    of data), and Nagle holding a small write back until the peer's delayed ACK costs ~40 ms a message."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is None and hasattr(transport, "transport"):    # TLS wraps the TCP transport
        set_no_delay = getattr(transport.transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:       # not a TCP socket (a test transport, a UNIX socket)
            pass
