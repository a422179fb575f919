# -*- test-case-name: tests.test_mx, tests.test_content_end_to_end, tests.test_dane -*-
"""Spooled messages as the delivery side reads them, and what a next hop received of one.

`message_to(*recipients)` is a `FakeMessage` (queue id Q1, BODY) for a next hop to send; `strip_received`
gives back what the client submitted from what a sink received (the relay's Received header taken off).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from zope.interface import implementer

from mailrelay.envelope import Envelope
from mailrelay.interfaces import ISpooledMessage


BODY = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hello\r\n\r\nHello.\r\n.dot line\r\n"


@implementer(ISpooledMessage)
@dataclass(frozen=True)
class FakeMessage:
    """What the delivery client reads of a spooled message."""
    queue_id: str
    envelope: Envelope
    data: bytes = BODY
    path = None           # not read from a spool file

    @property
    def size(self) -> int:
        return len(self.data)

    def open(self):
        return io.BytesIO(self.data)


def message_to(*recipients: str, sender: str = "a@example.org") -> FakeMessage:
    return FakeMessage("Q1", Envelope(sender=sender, recipients=recipients, received_at=1_700_000_000.0))


def strip_received(data: bytes) -> bytes:
    """The message as the client sent it: without the Received header the relay put on top."""
    assert data.startswith(b"Received: "), data[:200]
    end = 0
    while True:
        end = data.index(b"\r\n", end) + 2
        if data[end:end + 1] not in (b" ", b"\t"):
            return data[end:]
