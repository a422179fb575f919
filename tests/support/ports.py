# -*- test-case-name: tests.test_net -*-
"""Loopback ports for servers a test starts, unique across every test process of a run.

Asking the kernel for port 0 and closing the socket is racy under `trial --jobs`: another worker's
bind(0), or an outgoing connection, may be given the same ephemeral port before our server binds it
(a relay then died with "Address already in use" after the test had already connected to whatever else
was there).  So ports are handed out below the kernel's ephemeral range (32768 and up on Linux), from
one counter in a file that every test process locks while it takes the next ones, and each is checked
bindable before it is handed out.
"""
from __future__ import annotations

import fcntl
import os
import socket
import tempfile

FIRST, LAST = 20000, 32000          # below /proc/sys/net/ipv4/ip_local_port_range's 32768
_STATE = os.path.join(tempfile.gettempdir(), "mailrelay-test-ports")


def _bindable(port: int, interface: str) -> bool:
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((interface, port))
        except OSError:
            return False
    return True


def free_ports(count: int, interface: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports on `interface` that no other test process of this machine is given."""
    fd = os.open(_STATE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
        port = int(text) if text.isdigit() and FIRST <= int(text) < LAST else FIRST
        ports: list[int] = []
        for _ in range(LAST - FIRST):
            candidate, port = port, port + 1 if port + 1 < LAST else FIRST
            if _bindable(candidate, interface):
                ports.append(candidate)
                if len(ports) == count:
                    break
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, str(port).encode("ascii"))
    finally:
        os.close(fd)          # closing the descriptor releases the lock
    if len(ports) < count:
        raise RuntimeError(f"no {count} free ports on {interface} in {FIRST}..{LAST}")
    return ports


def free_port(interface: str = "127.0.0.1") -> int:
    return free_ports(1, interface)[0]
