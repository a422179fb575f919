# -*- test-case-name: tests.test_dsn, tests.test_metrics -*-
"""The message a DSN is about: `original()` (from Alice, HEADERS and BODY, received at ARRIVAL, for bob and carol)
and BOUNCED, one permanent and one temporary result for its two recipients.
"""
from __future__ import annotations

from mailrelay.queue.results import RecipientResult
from mailrelay.envelope import Envelope
from tests.support.messages import FakeMessage


HEADERS = (b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: quarterly numbers\r\n"
           b"Message-ID: <m1@example.org>\r\n")
BODY = b"The secret body line.\r\n"
ARRIVAL = 1_700_000_000.0       # Tue, 14 Nov 2023 22:13:20 +0000


def original(sender: str = "alice@example.org", data: bytes = HEADERS + b"\r\n" + BODY, **envelope) -> FakeMessage:
    env = Envelope(sender=sender, recipients=("bob@example.net", "carol@example.net"), received_at=ARRIVAL,
                   **envelope)
    return FakeMessage("ORIG1", env, data)


BOUNCED = [
    RecipientResult("bob@example.net", 550, "5.1.1", "<bob@example.net>: no such user", "mx1.example.net[192.0.2.1]"),
    RecipientResult("carol@example.net", 451, "4.4.7", "delivery time expired; last reply: 451 4.3.0 busy", ""),
]
