# -*- test-case-name: tests.test_webhook -*-
"""The event document POSTed for one recipient outcome.

    {"id": "6f1c...", "event": "delivered", "queue_id": "...", "sender": "a@example.org",
     "recipient": "b@example.net", "time": "2026-12-03T17:50:01.123Z",
     "reply": {"code": 250, "enhanced": "2.0.0", "text": "OK"}, "attempt": 1,
     "next_hop": "mx.example.net", "transport": "direct"}

`id` is random (128 bits) and unique per event: a receiver dedupes on it, since an event may arrive
more than once (at-least-once delivery).  `time` is RFC 3339 (section 5.6) in UTC with milliseconds.
The bytes are built once, stored in the outbox and POSTed as they are, so a resend after a restart is
the same document with the same signature input.
"""
from __future__ import annotations

import json
import secrets
import time as _time

KINDS = ("delivered", "deferred", "bounced", "expired")


def rfc3339(when: float) -> str:
    """UTC time as RFC 3339 `date-time` with milliseconds and a "Z" offset (RFC 3339 section 5.6)."""
    seconds = int(when)
    millis = int(round((when - seconds) * 1000))
    if millis == 1000:
        seconds, millis = seconds + 1, 0
    return _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(seconds)) + f".{millis:03d}Z"


def new_id() -> str:
    """128 random bits as 32 hex digits (cheaper than uuid4, the same randomness)."""
    return secrets.token_hex(16)


def event_body(event_id: str, kind: str, queue_id: str, sender: str, recipient: str, when: float, reply,
               attempt: int, next_hop: str, transport: str) -> bytes:
    """The JSON document (UTF-8, one line: the outbox keeps one event per line)."""
    document = {
        "id": event_id, "event": kind, "queue_id": queue_id, "sender": sender, "recipient": recipient,
        "time": rfc3339(when),
        "reply": {"code": reply.code, "enhanced": reply.status, "text": reply.text},
        "attempt": attempt, "next_hop": next_hop, "transport": transport,
    }
    # ensure_ascii: a stray surrogate in a reply text cannot make the line unencodable; no newline inside.
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode("ascii")
