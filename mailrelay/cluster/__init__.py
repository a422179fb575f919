# -*- test-case-name: tests.test_cluster_gcra, tests.test_cluster_link, tests.test_cluster_throttle -*-
"""Shared counters in Redis (`[cluster] redis`): the limits, the suppression list and the throttles every
relay naming the same Redis shares, with each relay's own counters behind them when Redis does not answer.

    url.py     the URL, parsed; its password never shown
    gcra.py    the Lua scripts (GCRA rates, the AUTH sliding log), atomic in Redis
    redis.py   the link: bounded waits, fallback, reconnect with backoff, logged once each way
    shared.py  the shared limiters (IRateCounter, IAttemptWindow, ISuppressionCheck)
    throttle.py  the shared `[[throttle]]` state (IThrottle), on the delivery side
    wiring.py  what the service builds from `[cluster]`
"""
