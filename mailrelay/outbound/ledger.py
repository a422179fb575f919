# -*- test-case-name: tests.test_ledger, tests.test_delivery_client, tests.test_lmtp -*-
"""The results of one outgoing session, entered as the server's replies settle them.

Journey: outbound.client.DeliveryClient keeps one `Ledger` per session (a list of jobs run on one
connection).  Every reply that settles a recipient — a refused RCPT, the reply to the final dot, a job
the server cannot take — is entered here; a reply or event that ends the session is its `failure`.
In: the jobs (queue.job.Job), replies, the server's name for results.  Out: a job's results once it
is settled (for on_settled), and the session's results.SessionResult, in which every recipient no reply
settled gets the session's failure as a temporary one.

RFC 5321 3.3 (the reply to the final dot settles every accepted recipient at once), RFC 3461 6.2.1 (a
server that offers DSN got the requests and reports from now on), RFC 3463 (every result has an enhanced
status code; a failure that ends the session is made temporary, X.Y.Z with X = 4).
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Optional

from mailrelay.queue.job import Job, temporary_status, valid_address
from mailrelay.queue.results import RecipientResult, SessionResult, from_reply, parse_reply
from mailrelay.outbound.tlsinfo import stamped

if TYPE_CHECKING:
    from mailrelay.outbound.starttls import StartTLS

NO_REPLY = (451, "4.3.0", "no reply for this recipient")


class Ledger:
    """The results of `jobs` so far: `results[job][recipient]` (None: not settled yet), and `failure`,
    the (code, status, text) the unsettled ones get when the session ends; `failure_said`: it is the
    server's own 4xx reply (queue.throttle counts those)."""

    def __init__(self, jobs: list[Job]):
        self.jobs = list(jobs)
        self.results: list[list[Optional[RecipientResult]]] = [[None] * len(j.recipients) for j in self.jobs]
        self.failure: Optional[tuple[int, str, str]] = None
        self.failure_said = False

    def fail(self, code: int, status: str, text: str) -> None:
        """The session's failure, unless it has one already: the first cause is the one reported."""
        if self.failure is None:
            self.failure = (code, status, text)

    def fail_with_reply(self, code: int, text: bytes, context: str, host: str) -> None:
        """A reply that ends the session (after the command `context`) is every unsettled recipient's."""
        status, clean = parse_reply(code, text)
        self.failure = (code if 400 <= code < 500 else 451, temporary_status(status),
                        f"{host} said {code} {clean} (after {context})")
        self.failure_said = 400 <= code < 500

    def settle(self, job: int, index: int, result: RecipientResult) -> None:
        self.results[job][index] = result

    def settle_reply(self, job: int, index: int, code: int, text: bytes, host: str) -> None:
        """The server's reply (to RCPT TO) is recipient `index`'s result."""
        self.results[job][index] = from_reply(self.jobs[job].recipients[index], code, text, host)

    def settle_rest(self, job: int, host: str, code: int, status: str, text: str, sender_refused: bool = False,
                    remote_reply: bool = False, next_host: bool = False) -> None:
        """Every recipient of `job` not settled yet gets this result."""
        results = self.results[job]
        for i, rcpt in enumerate(self.jobs[job].recipients):
            if results[i] is None:
                results[i] = RecipientResult(rcpt, code, status, text, host, sender_refused=sender_refused,
                                             remote_reply=remote_reply, next_host=next_host)

    def settle_invalid(self, job: int, host: str) -> list[int]:
        """Recipients whose address could inject a command line are refused here, never sent; returns
        the indexes of the others."""
        results, valid = self.results[job], []
        for i, rcpt in enumerate(self.jobs[job].recipients):
            if valid_address(rcpt):
                valid.append(i)
            else:
                results[i] = RecipientResult(rcpt, 553, "5.1.3", "invalid address syntax", host)
        return valid

    def settle_accepted(self, job: int, accepted: list[int], code: int, text: bytes, host: str,
                        dsn: bool) -> None:
        """The reply after the data settles every `accepted` recipient; `dsn`: the server offers DSN."""
        recipients, results = self.jobs[job].recipients, self.results[job]
        for i in accepted:
            result = from_reply(recipients[i], code, text, host)
            # RFC 3461 6.2.1: a server that offers DSN got the requests and reports on its own from now on.
            results[i] = replace(result, dsn_passed=True) if dsn and result.delivered else result

    def job_results(self, job: int, host: str, tls: StartTLS) -> list[RecipientResult]:
        """The final results of a settled job, each stamped with the session's TLS."""
        return stamped((r or RecipientResult(rcpt, *NO_REPLY, host)
                        for rcpt, r in zip(self.jobs[job].recipients, self.results[job])), tls.negotiated)

    def session_result(self, host: str, tls: StartTLS, before_mail: bool, reused: bool) -> SessionResult:
        """Every job's results; a recipient not settled by a reply gets the session's failure."""
        code, status, text = self.failure or NO_REPLY
        jobs = tuple(
            tuple(stamped((r or RecipientResult(rcpt, code, status, text, host, remote_reply=self.failure_said)
                           for rcpt, r in zip(j.recipients, res)), tls.negotiated))
            for j, res in zip(self.jobs, self.results)
        )
        name = tls.negotiated.name if tls.negotiated is not None else None
        return SessionResult(jobs, name, tls.failed, before_mail=before_mail, tls_verdict=tls.verdict,
                             starttls_missing=tls.missing, reused=reused)
