# -*- test-case-name: tests.test_cluster_gcra -*-
"""The Lua scripts the shared limiters run inside Redis, one atomic call each.

Where it sits: at the side of the journey (mailrelay.cluster).  In: a key and the numbers of one
decision.  Out: the decision, computed by Redis itself, so relays sharing one Redis never race
(EVALSHA runs a script atomically: no other command runs in between).  Every key the scripts write
carries a TTL no longer than the state it holds is worth, so an idle key expires on its own.

GCRA (the generic cell rate algorithm, as KumoMTA's shared throttles use): a rate of `limit` events
per `period` seconds is one event every `interval = period / limit` seconds; the key holds the
"theoretical arrival time" (TAT) of the next event.  An event is allowed when
`TAT + interval - burst * interval <= now`; then TAT moves on by one interval.  With `burst = limit`
it is exactly the token bucket of server/ratelimit.py (a full bucket of `limit`, refilled
continuously); with `burst = 1` it is "one every period/limit seconds, no burst" (the shape of
`[[throttle]] messages_per_minute`).  The key also holds the interval and burst it was written with:
when the rate changes (a reload), what is left is carried over in events, capped at the new burst, as
the local bucket keeps its tokens ("an identity at its limit stays at its limit").

The sliding log (AUTH attempts, server/factory.FailureWindow): a sorted set of attempts scored by
time; an attempt is recorded when its check starts, those older than the window drop out, at most
`limit + 1` are kept, a success refunds (removes) its own attempt.

Connection leases (ACQUIRE / RELEASE) are for limits on things held open, such as connections to one
destination: a sorted set of leases scored by when they lapse, so a relay that dies holding some
frees them within one lease time.  A pause ("slow down" for a while) needs no script: `SET key 1 PX ms`
and `EXISTS key`.  Rates, leases and pauses all go through RedisLink with its bounded wait.

Time is an argument (`now`, seconds): tests pass it in and are deterministic.  An empty `now` makes
the script read the Redis server's own clock (TIME), which is what the relays do, so that relays
whose clocks disagree still share one timeline.
"""
from __future__ import annotations

import hashlib

# The clock: ARGV[1] seconds as text, or "" for the server's TIME (allowed in scripts since Redis 5's
# effects replication, the only mode of Redis 7).
_NOW = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
"""

# KEYS[1] the key; ARGV: now, limit (events per period), period (seconds), burst (events at once),
# quantity (events taken).  Returns {1, 0} when allowed, or {0, ms} with the milliseconds until the
# same request would be allowed.  Nothing is written when refused.
GCRA = _NOW + """
local limit = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local quantity = tonumber(ARGV[5])
local interval = period / limit
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  local old_tat, old_interval, old_burst = string.match(stored, '^(%S+) (%S+) (%S+)$')
  old_tat, old_interval, old_burst = tonumber(old_tat), tonumber(old_interval), tonumber(old_burst)
  if old_tat and old_interval and old_burst and old_interval > 0 and old_tat > now then
    -- what is left, in events, carried over to the rate in force now and capped at its burst
    local left = math.min(burst, old_burst - (old_tat - now) / old_interval)
    tat = now + math.max(0, burst - left) * interval
  end
end
local new_tat = tat + interval * quantity
local allow_at = new_tat - burst * interval
if allow_at > now then
  return {0, math.ceil((allow_at - now) * 1000)}
end
redis.call('SET', KEYS[1], string.format('%.6f %.9g %d', new_tat, interval, burst),
           'PX', math.max(1, math.ceil((new_tat - now) * 1000)))
return {1, 0}
"""

# KEYS[1] the sorted set; ARGV: now, window (seconds), limit (0: none), member (unique per attempt).
# Returns the attempts in the window, this one included.
RECORD = _NOW + """
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(limit + 2))
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
return redis.call('ZCARD', KEYS[1])
"""

# KEYS[1] the sorted set; ARGV: now, window.  Returns the attempts in the window.
COUNT = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
"""

# KEYS[1] the sorted set; ARGV: member.  Removes that attempt, or (trimmed away meanwhile) the latest
# one, as the local window pops its latest.  Returns how many were removed.
REFUND = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  return 1
end
local latest = redis.call('ZPOPMAX', KEYS[1])
if #latest > 0 then
  return 1
end
return 0
"""


# Connection leases (for per-destination `connections` limits): KEYS[1] a sorted set of leases scored by
# their expiry; ARGV: now, limit, lease (seconds), member.  A lease not renewed within `lease` seconds
# (its holder died) drops out by itself.  Returns 1 (taken or renewed) or 0 (at the limit).
ACQUIRE = _NOW + """
local limit = tonumber(ARGV[2])
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[4]) == false and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease * 1000))
return 1
"""

# KEYS[1] the sorted set of leases; ARGV: member.  Returns how many were released (0 or 1).
RELEASE = """
return redis.call('ZREM', KEYS[1], ARGV[1])
"""


def sha1(script: str) -> str:
    """The name EVALSHA knows `script` by."""
    return hashlib.sha1(script.encode("utf-8")).hexdigest()


SCRIPTS = {"gcra": GCRA, "record": RECORD, "count": COUNT, "refund": REFUND, "acquire": ACQUIRE,
           "release": RELEASE}
