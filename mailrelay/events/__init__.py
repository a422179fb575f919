# -*- test-case-name: tests.test_webhook -*-
"""Delivery events: one JSON document per recipient outcome, POSTed to each `[[webhook]]` URL.

At the side of the delivery stage.  The scheduler tells an `IDeliveryEvents` (service.DeliveryEvents)
of every outcome it records; the event is appended to a durable outbox in the spool (store.py), made
durable by a group-committed fsync, and only then sent (sender.py) by treq over verified TLS with an
HMAC-SHA256 signature, retried with jittered exponential backoff until the URL answers 2xx — across
restarts, since the outbox is read again at start.  A receiver that is down or slow costs delivery
nothing: the delivery path waits for the local append, never for the HTTP side.

    event.py    the event document (id, kind, queue id, addresses, RFC 3339 time, reply, attempt, hop)
    store.py    the outbox of one URL: append-only segments, acknowledgements, the bound, the backlog
    sender.py   POSTs of one URL: signature, timeout, bounded concurrency, backoff, 4xx handling
    service.py  the IDeliveryEvents service: every URL's outbox and sender, reload, metrics
"""
