# -*- test-case-name: tests.test_throttle_cli, tests.test_queue_transfer, tests.test_scheduler -*-
"""The persisted delivery state of one spooled message: where each recipient stands.

The scheduler keeps it beside the message in the spool (ISpool.save_state) and writes it after
every attempt, before acting on the outcome, so a restart resumes exactly where the relay stopped:
no recipient delivered twice because its success was forgotten, no bounce or delay DSN lost or sent
twice.  In: the JSON-able dict from the spool ({} before the first save) and the envelope's
recipients.  Out: a frozen `MessageState`, and back to a dict with `to_dict()`.

Schema (version 1):

    {"version": 1,
     "delay_warned": false,                 # the one RFC 3464 delay DSN has been handed over
     "recipients": {
        "rcpt@example.org": {
            "attempts": 2,                  # attempts made (for a pending recipient: all failed)
            "first_attempt": 1767225600.0,  # unix time, null before the first attempt
            "next_attempt": 1767226200.0,   # unix time the recipient is due again (0: now)
            "last_reply": {"code": 451, "status": "4.4.1", "text": "...", "remote_host": "mx1..."},
            "done": null,                   # null | "delivered" | "bounced" | "expired"
            "dsn": "relayed",               # optional: a delivered recipient's success DSN is due
                                            # ("relayed" | "delivered", RFC 3461 6.2.1 / RFC 3464 2.3.3)
            "reported": false}}}            # a bounced/expired recipient's DSN (or a delivered one's
                                            # success DSN) was handed over
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Optional

from mailrelay.queue.results import RecipientResult

STATE_VERSION = 1

DELIVERED = "delivered"
BOUNCED = "bounced"
EXPIRED = "expired"
_DONE_VALUES = (None, DELIVERED, BOUNCED, EXPIRED)
SUCCESS_ACTIONS = ("relayed", "delivered")      # RFC 3464 2.3.3 actions of a success DSN

# RFC 3463 §3.5: X.4.7 "delivery time expired" — the status a DSN reports for a message that outlived
# [queue] lifetime; the last remote reply goes into the text.
EXPIRED_STATUS = "4.4.7"


class StateError(ValueError):
    """The persisted state cannot be read (corrupt, or written by a newer version of the relay)."""


@dataclass(frozen=True)
class LastReply:
    code: int
    status: str
    text: str
    remote_host: str = ""


@dataclass(frozen=True)
class RecipientState:
    recipient: str
    attempts: int = 0
    first_attempt: Optional[float] = None
    next_attempt: float = 0.0
    last_reply: Optional[LastReply] = None
    done: Optional[str] = None
    reported: bool = False
    dsn: str = ""            # a delivered recipient's success DSN ("relayed" | "delivered"); "" none due

    @property
    def pending(self) -> bool:
        return self.done is None

    @property
    def needs_report(self) -> bool:
        if self.reported:
            return False
        return self.done in (BOUNCED, EXPIRED) or (self.done == DELIVERED and self.dsn in SUCCESS_ACTIONS)

    def recorded(self, result: RecipientResult, now: float, retry_at: float) -> "RecipientState":
        """This recipient after one attempt answered with `result`; `retry_at` applies to a retry."""
        reply = LastReply(result.code, result.status, result.text, result.remote_host)
        changes: dict[str, Any] = dict(attempts=self.attempts + 1, last_reply=reply,
                       first_attempt=now if self.first_attempt is None else self.first_attempt)
        if result.delivered:
            changes["done"] = DELIVERED
        elif result.permanent:
            changes["done"] = BOUNCED
        else:
            # 4xx, and anything outside 2xx/5xx: never give up on a reply we do not understand.
            changes["next_attempt"] = retry_at
        return replace(self, **changes)

    def as_result(self) -> RecipientResult:
        """The result a DSN reports for this recipient (bounced: the refusal; expired: RFC 3463 4.4.7)."""
        last = self.last_reply or LastReply(0, "", "no delivery attempt was made")
        if self.done == EXPIRED:
            text = f"message expired; last reply: {last.code} {last.status} {last.text}".strip()
            return RecipientResult(self.recipient, last.code or 451, EXPIRED_STATUS, text, last.remote_host)
        return RecipientResult(self.recipient, last.code, last.status, last.text, last.remote_host)

    def to_dict(self) -> dict:
        last = self.last_reply
        extra = {"dsn": self.dsn} if self.dsn else {}      # absent unless due: older states stay as they were
        return {
            **extra,
            "attempts": self.attempts,
            "first_attempt": self.first_attempt,
            "next_attempt": self.next_attempt,
            "last_reply": None if last is None else {
                "code": last.code, "status": last.status, "text": last.text, "remote_host": last.remote_host},
            "done": self.done,
            "reported": self.reported,
        }

    @classmethod
    def from_dict(cls, recipient: str, data: dict) -> "RecipientState":
        try:
            last = data.get("last_reply")
            state = cls(
                recipient=recipient,
                attempts=int(data.get("attempts", 0)),
                first_attempt=_optional_float(data.get("first_attempt")),
                next_attempt=float(data.get("next_attempt", 0.0)),
                last_reply=None if last is None else LastReply(
                    int(last["code"]), str(last["status"]), str(last["text"]), str(last.get("remote_host", ""))),
                done=data.get("done"),
                reported=bool(data.get("reported", False)),
                dsn=str(data.get("dsn", "")),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise StateError(f"recipient {recipient!r}: {e}") from None
        if state.done not in _DONE_VALUES:
            raise StateError(f"recipient {recipient!r}: unknown done value {state.done!r}")
        return state


@dataclass(frozen=True)
class MessageState:
    recipients: tuple[RecipientState, ...]
    delay_warned: bool = False

    @classmethod
    def fresh(cls, recipients: Iterable[str]) -> "MessageState":
        return cls(tuple(RecipientState(r) for r in _unique(recipients)))

    @property
    def pending(self) -> tuple[RecipientState, ...]:
        return tuple(r for r in self.recipients if r.pending)

    @property
    def unreported(self) -> tuple[RecipientState, ...]:
        return tuple(r for r in self.recipients if r.needs_report)

    @property
    def finished(self) -> bool:
        """Every recipient has a final answer and every bounce was handed over: the message may go."""
        return not any(r.pending or r.needs_report for r in self.recipients)

    def next_due(self, expires_at: float, report_retry: float) -> float:
        """When to look at the message again: its earliest pending recipient (never past `expires_at`,
        the end of its lifetime), or `report_retry` if a DSN is still to be handed over."""
        candidates = [min(r.next_attempt, expires_at) for r in self.pending]
        if self.unreported or not candidates:
            candidates.append(report_retry)
        return min(candidates)

    def get(self, recipient: str) -> RecipientState:
        for r in self.recipients:
            if r.recipient == recipient:
                return r
        raise KeyError(recipient)

    def with_recipient(self, updated: RecipientState) -> "MessageState":
        return replace(self, recipients=tuple(
            updated if r.recipient == updated.recipient else r for r in self.recipients))

    def to_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "delay_warned": self.delay_warned,
            "recipients": {r.recipient: r.to_dict() for r in self.recipients},
        }

    @classmethod
    def from_dict(cls, data: dict, recipients: Iterable[str]) -> "MessageState":
        """The state for the envelope's `recipients`; those the dict does not mention start fresh."""
        if not data:
            return cls.fresh(recipients)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise StateError(f"unsupported state version {_version_of(data)!r}")
        saved = data.get("recipients", {})
        if not isinstance(saved, dict):
            raise StateError("recipients is not a mapping")
        return cls(
            tuple(RecipientState.from_dict(r, saved[r]) if r in saved else RecipientState(r)
                  for r in _unique(recipients)),
            delay_warned=bool(data.get("delay_warned", False)),
        )


def _unique(recipients: Iterable[str]) -> list[str]:
    # One state (and one delivery) per address, even if the envelope named it twice.
    return list(dict.fromkeys(recipients))


def _optional_float(value) -> Optional[float]:
    return None if value is None else float(value)


def _version_of(data) -> object:
    return data.get("version") if isinstance(data, dict) else type(data).__name__


def due_time(data: dict) -> float:
    """When a message is next due, from its saved state alone (the start-up scan: no message opened):
    its earliest pending recipient's next_attempt (already capped at its lifetime when recorded), or 0
    ("now") when it has never been tried, has a DSN to send, or has nothing pending left to settle."""
    recipients = data.get("recipients") if isinstance(data, dict) else None
    if not recipients:
        return 0.0
    times = []
    for rcpt in recipients.values():
        done = rcpt.get("done")
        if done is None:
            times.append(float(rcpt.get("next_attempt", 0.0)))
        elif done in (BOUNCED, EXPIRED) and not rcpt.get("reported", False):
            return 0.0
    return min(times) if times else 0.0
