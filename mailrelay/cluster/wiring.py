# -*- test-case-name: tests.test_queue_front, tests.test_dns_cache, tests.test_operations -*-
"""What the relay builds from `[cluster]`: the link to Redis and the shared limiters around the local ones.

Called by the composition root (mailrelay.wiring) alone: for the receiving process, and for the
delivery side — inline (sharing the receiving side's link) or the delivery process (with a link of its
own) — for the shared `[[throttle]]` state.  The suppression entries the delivery side writes reach Redis through the
receiving process's watcher of the journal.
"""
from __future__ import annotations

from typing import Optional

from mailrelay.cluster.redis import RedisLink
from mailrelay.cluster.shared import (SharedFailureWindow, SharedRateLimiter, SharedSuppression, publish,
                                      share_journal)
from mailrelay.cluster.url import RedisURL


def redis_link(config, reactor, metrics=None) -> Optional[RedisLink]:
    """The link for `[cluster] redis`, not yet started; None when the key is empty (no cluster)."""
    cluster = config.cluster
    if not cluster.redis:
        return None
    return RedisLink(RedisURL.parse(cluster.redis), reactor, timeout=cluster.timeout, prefix=cluster.key_prefix,
                     metrics=metrics, ca_file=cluster.ca_file)


def shared_throttle(link: Optional[RedisLink]):
    """The `[[throttle]]` state the scheduler asks: shared (a SharedThrottle, an IService to start and
    stop with the delivery side, its `on_ready` to be set to the scheduler's wake) when there is a link,
    else None (the scheduler keeps its own LocalThrottle)."""
    if link is None:
        return None
    from mailrelay.cluster.throttle import SharedThrottle

    return SharedThrottle(link)


def shared_limiter(link: Optional[RedisLink], config, reactor):
    """The message budgets the first policy charges: shared when there is a link, else None (the
    policy makes its own)."""
    if link is None:
        return None
    from mailrelay.server.ratelimit import RateLimiter

    return SharedRateLimiter(link, RateLimiter(max(1, config.limits.messages_per_minute), 60.0, reactor))


def shared_window(link: Optional[RedisLink], window):
    """The AUTH-attempt window every listener shares: `window` itself, or it behind Redis."""
    return window if link is None else SharedFailureWindow(link, window)


def shared_suppression(link: Optional[RedisLink], journal):
    """What RCPT asks: the journal itself, or it with the cluster's entries; appended records
    (bounces noted by the delivery side, operators' adds and removals) are put into Redis, and each time
    the link comes up the journal's entries Redis does not know yet."""
    if link is None or journal is None:
        return journal
    journal.on_record = lambda record: publish(link, record, journal.duration)
    link.on_up.append(lambda: share_journal(link, journal))
    return SharedSuppression(link, journal)
