# -*- test-case-name: tests.test_connection_reuse -*-
"""Connection reuse: which waiting deliveries share one connection.

Place in the journey: inside the scheduler, between "due now" and the next hop.  In: the deliveries
waiting for one limit key (a recipient domain for direct delivery, a transport name for a route) and
the connection slots that key may still use.  Out: the group of deliveries one connection carries — a
single delivery goes to `INextHop.deliver`, a group of several to `IBatchNextHop.deliver_batch`, which
sends them as successive transactions on one session (RFC 5321 §3.3, and §4.1.4: RSET between them when
one was abandoned part-way).

Sizing: the waiting deliveries are spread over the free slots (ceil(waiting / free)), so a domain with
ten slots and twenty messages gets ten connections of two, not one of twenty; a domain with one slot gets
one connection for everything, up to MAX_BATCH.  The bound keeps a single connection from holding many
already-accepted-but-not-yet-recorded messages at once (see docs/crash-safety.md).
"""
from __future__ import annotations

from collections import deque
from typing import Callable, TypeVar

from mailrelay.interfaces import IBatchNextHop

MAX_BATCH = 50           # messages (transactions) per connection at most

J = TypeVar("J")


def can_batch(hop: object) -> bool:
    """Whether `hop` takes several messages on one connection (provides IBatchNextHop)."""
    return IBatchNextHop.providedBy(hop)


def batch_size(waiting: int, free_slots: int, limit: int = MAX_BATCH) -> int:
    """How many of `waiting` deliveries the next connection takes: an even share of the free slots,
    at least one, at most `limit`."""
    if waiting <= 0:
        return 0
    share = -(-waiting // max(1, free_slots))      # ceil
    return max(1, min(limit, share))


def take_batch(waiting: deque[J], size: int, hop_of: Callable[[J], object]) -> list[J]:
    """Pop the first delivery and up to `size - 1` more that go through the very same next hop object
    (after a reload, older deliveries may still name the previous one).  The rest keep their order.
    A hop that cannot batch always gets a group of one."""
    first = waiting.popleft()
    hop = hop_of(first)
    if size <= 1 or not can_batch(hop):
        return [first]
    taken: list[J] = [first]
    kept: deque[J] = deque()
    while waiting and len(taken) < size:
        job = waiting.popleft()
        (taken if hop_of(job) is hop else kept).append(job)
    kept.extend(waiting)
    waiting.clear()
    waiting.extend(kept)
    return taken
