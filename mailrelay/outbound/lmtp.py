# -*- test-case-name: tests.test_lmtp, tests.test_chunking -*-
"""The outgoing LMTP client (RFC 2033): SMTP's client with LHLO, and one reply per recipient at the end.

Journey: a `[transports.NAME]` with `protocol = "lmtp"` (a final delivery agent such as Dovecot, over TCP
or a unix socket) is reached through outbound.connect like any smarthost; connect builds this client
instead of the SMTP one.  In and out as outbound.client: `SessionParams` and `Job`s in, one
`results.SessionResult` out, each job reported through `on_settled` once settled.

What differs from SMTP, and nothing else does (PIPELINING, SIZE, 8BITMIME and the 7-bit conversion,
STARTTLS and AUTH over TCP, CHUNKING, connection reuse are all the SMTP client's):
- RFC 2033 4.1: the session opens with LHLO; there is no HELO to fall back to, so a refused LHLO ends it.
- RFC 2033 4.2 and 4.3: after the final dot, or the BDAT chunk marked LAST, the server sends one reply
  for each RCPT it accepted, in the order of the RCPTs, and each reply settles that recipient alone: 2xx delivered, 4xx
  retried later (only that recipient), 5xx bounced (only that recipient).
- A connection lost, or a reply timeout, part-way through those replies settles only the recipients not
  answered yet (temporarily); the ones answered keep their own results, so a retry never delivers a
  recipient twice.  A 421 among them settles its recipient and ends the session (RFC 5321 3.8).
"""
from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Optional

from mailrelay.outbound.chunking import ChunkingClient
from mailrelay.queue.job import Job, OnSettled
from mailrelay.queue.results import from_reply


class LMTPClient(ChunkingClient):
    """One LMTP connection; see the module docstring for what it changes in DeliveryClient."""

    def _begin(self, jobs: list[Job], reused: bool, on_settled: Optional[OnSettled] = None) -> None:
        self._unanswered: Optional[deque[int]] = None     # accepted recipients still owed a reply
        super()._begin(jobs, reused, on_settled)

    def _ehlo(self) -> None:
        self._send(b"LHLO " + self.identity, "LHLO", (250,), self._on_ehlo, self._on_lhlo_refused)

    def _on_lhlo_refused(self, code: int, text: bytes) -> None:
        # RFC 2033 4.1: LMTP has no HELO; a server that refuses LHLO cannot take mail over LMTP.
        self._fail_from_reply(code, text, "LHLO")

    def _on_data_end(self, code: int, text: bytes) -> None:
        """One reply for the next accepted recipient (RFC 2033 4.2, 4.3); the last one ends the transaction."""
        if self._unanswered is None:
            self._unanswered = deque(self._accepted)
        index = self._unanswered.popleft()
        recipients = self.jobs[self._job_index].recipients
        result = from_reply(recipients[index], code, text, self._host)
        if result.delivered:
            # RFC 2033 4.2: this reply is the mailbox's own: delivered, not relayed (RFC 3464 2.3.3).
            result = replace(result, final=True)
        self._ledger.settle(self._job_index, index, result)
        if code == 421:
            self._unanswered = None
            return self._closing(code, text)      # the ones not answered get the session's failure
        if self._unanswered:
            following = recipients[self._unanswered[0]]
            return self._expect(range(0, 1000), self._on_data_end, None, "end of data",
                                f"the reply for <{following}> after the data")
        self._unanswered = None
        self.setTimeout(self.params.timeouts.reply)
        self._in_transaction = False
        self._next_job()
