# -*- test-case-name: tests.test_throttle_cli, tests.test_webhook_scheduler, tests.test_scheduler -*-
"""What the delivery scheduler works with: one message's attempt, one delivery, a broken next hop.

Part of the delivery stage (queue.scheduler).  In: a loaded spool message and its MessageState.
Out: `_Attempt`, the message while the scheduler works on it (deliveries outstanding, the state they
update, control actions asked for meanwhile); `_Job`, one deliver() call for one next hop and the
recipients that go that way (and the throttled destination they are, queue.throttle);
`_LocalFailure`, the stand-in next hop for a router error or unknown transport, which answers every
recipient 451 4.3.5 (RFC 3463) so the failure is retried like a remote 4xx (RFC 5321 §4.2.1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet import defer
from zope.interface import implementer

from mailrelay.queue.results import RecipientResult
from mailrelay.queue.state import MessageState
from mailrelay.interfaces import INextHop


@implementer(INextHop)
@dataclass(frozen=True)
class _LocalFailure:
    """A next hop that cannot be used (router error, unknown transport): every recipient gets this
    temporary reply, so the failure goes through the same record-and-retry path as a remote 4xx."""
    text: str

    def deliver(self, message, recipients):
        # RFC 3463 4.3.5: system incorrectly configured — temporary, the operator can fix it.
        return defer.succeed([RecipientResult(r, 451, "4.3.5", self.text, "") for r in recipients])


class _Attempt:
    """One message being worked on: its deliveries waiting or in flight and the state they update."""

    def __init__(self, message, state: MessageState):
        self.message = message
        self.state = state
        self.outstanding = 0          # deliveries waiting for a slot or in flight
        self.lock = defer.DeferredLock()   # one save_state at a time, always of the newest state
        self.action: Optional[str] = None  # "delete" | "bounce", asked for while deliveries ran
        self.held = False
        self.force_again = False      # a flush came while the attempt ran
        self.save_failed = False

    @property
    def queue_id(self) -> str:
        return self.message.queue_id


@dataclass(frozen=True, eq=False)
class _Job:
    """One deliver() call: one message, one next hop, the recipients that go that way."""
    attempt: _Attempt
    hop: Any                      # INextHop (IBatchNextHop: it may carry several on one connection)
    hop_name: str                 # "direct" or the transport name, for the log
    limit_key: str                # "domain:<d>" (direct) or "transport:<name>"
    recipients: tuple[str, ...]
    destination: Optional[str] = None   # the recipient domain, when a [[throttle]] rule shapes it
    started: float = 0.0          # when its connection slot was taken (set as it starts)

    @property
    def line(self) -> tuple[str, Optional[str]]:
        """The waiting line it joins: one per limit key and throttled destination, so a paused or
        rate-held destination never holds up another on the same transport."""
        return self.limit_key, self.destination
