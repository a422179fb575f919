# -*- test-case-name: tests.test_spool -*-
"""Queue ids: the name a message carries from its first byte in the spool to its last delivery attempt.

In: the current time.  Out: 16 characters of Crockford base32 ([0-9A-Z] without I, L, O, U), so an id is
safe as a file name, in a log line and on a command line, and ids sort in the order they were made:
11 characters of microseconds since the epoch, then 5 random characters (25 bits) so that two processes
(or two spools restored into one) practically never collide. No RFC governs this; Postfix's long queue
ids follow the same idea (time first, then uniqueness).
"""
from __future__ import annotations

import re
import secrets

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"   # ascending in ASCII, so string order is numeric order
TIME_CHARS = 11                                # 32**11 microseconds: until the year 3085
RANDOM_CHARS = 5
ID_LENGTH = TIME_CHARS + RANDOM_CHARS
_ID_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{%d}\Z" % ID_LENGTH)


def _encode(number: int, width: int) -> str:
    chars = [""] * width
    for i in range(width - 1, -1, -1):
        chars[i] = ALPHABET[number & 31]
        number >>= 5
    return "".join(chars)


def id_time(queue_id: str) -> "float | None":
    """The unix time a well-formed id was made (its first TIME_CHARS characters); None for anything else."""
    if not is_valid_queue_id(queue_id):
        return None
    micros = 0
    for char in queue_id[:TIME_CHARS]:
        micros = micros * 32 + ALPHABET.index(char)
    return micros / 1e6


def is_valid_queue_id(text: object) -> bool:
    """True for a well-formed id. Anything taken from a file name or a command line is checked with this
    before it becomes part of a path (no `..`, no `/`)."""
    return isinstance(text, str) and _ID_RE.match(text) is not None


class QueueIdGenerator:
    """Makes ids that strictly increase within one generator, even if the clock stalls or steps back."""

    def __init__(self, seconds) -> None:
        self._seconds = seconds        # a callable giving unix time, e.g. reactor.seconds
        self._last_micros = -1

    def next_id(self) -> str:
        micros = max(int(self._seconds() * 1_000_000), self._last_micros + 1)
        self._last_micros = micros
        return _encode(micros, TIME_CHARS) + _encode(secrets.randbits(5 * RANDOM_CHARS), RANDOM_CHARS)
