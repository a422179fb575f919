# -*- test-case-name: tests.test_scheduler, tests.test_scheduler_parts, tests.test_structure -*-
"""What to send when: the scheduler and its parts (the queue's state, recovery at start, batching,
concurrency and shaping, outcomes, backoff, the control commands), routes, throttles and the separate
delivery process. What leaves is handed to `mailrelay.outbound` through the INextHop interface."""
