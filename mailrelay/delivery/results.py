"""What a next hop answers for each recipient of one delivery attempt.

In: the reply a remote server (or our own client, for a connection-level failure) gave one recipient.
Out: a `RecipientResult` the scheduler acts on — 2xx delivered, 4xx retried later, 5xx bounced
(RFC 5321 §4.2.1 reply classes; `status` is the RFC 3463 enhanced status code).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecipientResult:
    recipient: str
    code: int              # the SMTP reply code, e.g. 250, 451, 550
    status: str            # the RFC 3463 enhanced status code, e.g. "4.4.1"
    text: str              # the reply text (remote words: log it, never trust it)
    remote_host: str       # the host that answered ("" when no connection was made)

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600
