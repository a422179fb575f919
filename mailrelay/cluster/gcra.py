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
frees them within one lease time.  `[[throttle]]` (cluster/throttle.py) has scripts of its own
(THROTTLE_*): one booking per start reads the pause, takes a lease and the next place in the rate at
once.  Rates, leases and pauses all go through RedisLink with its bounded wait.

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


# `[[throttle]]` shared between relays (cluster/throttle.py), three keys per destination: its rate (a
# string, the TAT of the next free start), its connections (a sorted set of leases, as ACQUIRE) and its
# pause (a hash: until, began, row = pauses in a row, reason; kept QUIET seconds past its end, so that
# the next pause doubles).  Times in the replies are milliseconds relative to the script's `now`, so
# that a relay whose clock differs from the server's still reads them right.

# THROTTLE_RESERVE: KEYS rate, connections, pause; ARGV: now, interval (0: no rate), limit (0: no cap),
# lease (seconds), member.  One start's place: a pause in force answers {0, 0, left, ago, row, reason}
# (nothing taken); a full cap {1, 0, 0, ago, row, reason}; else the next free start is booked (the TAT
# moves one interval on: one start per interval in all, no burst) and the lease taken, answering
# {2, wait, 0, ago, row, reason}: the start may go `wait` µs from now (µs: a fast rate's next start is
# often less than a millisecond away).  `left`, `ago`: ms; `ago` since the latest pause began, -1
# when none is remembered.
THROTTLE_RESERVE = _NOW + """
local interval = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local lease = tonumber(ARGV[4])
local p = redis.call('HMGET', KEYS[3], 'until', 'began', 'row', 'reason')
local untl, began, row, reason = tonumber(p[1]) or 0, tonumber(p[2]), tonumber(p[3]) or 0, p[4] or ''
local ago = -1
if began then ago = math.max(0, math.floor((now - began) * 1000)) end
local left = math.ceil((untl - now) * 1000)
if left > 0 then
  return {0, 0, left, ago, row, reason}
end
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZSCORE', KEYS[2], ARGV[5]) == false and redis.call('ZCARD', KEYS[2]) >= limit then
    return {1, 0, 0, ago, row, reason}
  end
end
local wait = 0
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1])) or now
  local start = math.max(tat, now)
  redis.call('SET', KEYS[1], string.format('%.6f', start + interval),
             'PX', math.max(1, math.ceil((start + interval - now) * 1000)))
  wait = math.ceil((start - now) * 1000000)
end
if limit > 0 then
  local ms = math.ceil(lease * 1000 + wait / 1000)
  redis.call('ZADD', KEYS[2], now + ms / 1000, ARGV[5])
  if redis.call('PTTL', KEYS[2]) < ms then
    redis.call('PEXPIRE', KEYS[2], ms)
  end
end
return {2, wait, 0, ago, row, reason}
"""

# THROTTLE_PAUSE: KEYS pause; ARGV: now, started (seconds before now the delivery began), pause (the
# rule's), most (MAX_THROTTLE_PAUSE), reason, row (this relay's own count: used when Redis remembers
# none), quiet (seconds the row is remembered past the pause).  A delivery that began before the pause
# in force began belongs to it: {left, ago, row, 0}.  Else a new pause, doubled per pause in a row:
# {length, 0, row, 1}.
THROTTLE_PAUSE = _NOW + """
local started = now - tonumber(ARGV[2])
local p = redis.call('HMGET', KEYS[1], 'until', 'began', 'row')
local untl, began, row = tonumber(p[1]), tonumber(p[2]), tonumber(p[3])
if began and untl and started <= began then
  return {math.max(0, math.ceil((untl - now) * 1000)), math.floor((now - began) * 1000), row or 0, 0}
end
if row then row = row + 1 else row = math.max(1, tonumber(ARGV[6])) end
local length = math.min(tonumber(ARGV[3]) * 2 ^ math.min(row - 1, 32), tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], 'until', string.format('%.6f', now + length), 'began', string.format('%.6f', now),
           'row', row, 'reason', ARGV[5])
redis.call('PEXPIRE', KEYS[1], math.ceil((length + tonumber(ARGV[7])) * 1000))
return {math.ceil(length * 1000), 0, row, 1}
"""

# THROTTLE_SUCCEED: KEYS pause; ARGV: now, started.  An accepted delivery that began after the latest
# pause began ends the row.  Returns 1 when it did.
THROTTLE_SUCCEED = _NOW + """
local began = tonumber(redis.call('HGET', KEYS[1], 'began'))
if began and now - tonumber(ARGV[2]) > began then
  redis.call('HSET', KEYS[1], 'row', 0)
  return 1
end
return 0
"""

# THROTTLE_RENEW: KEYS connections; ARGV: now, lease, members...  The leases of the connections this
# relay has open, renewed (or put back, after Redis restarted or while it was away).
THROTTLE_RENEW = _NOW + """
local lease = tonumber(ARGV[2])
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
end
if redis.call('PTTL', KEYS[1]) < lease * 1000 then
  redis.call('PEXPIRE', KEYS[1], math.ceil(lease * 1000))
end
return #ARGV - 2
"""


def sha1(script: str) -> str:
    """The name EVALSHA knows `script` by."""
    return hashlib.sha1(script.encode("utf-8")).hexdigest()


SCRIPTS = {"gcra": GCRA, "record": RECORD, "count": COUNT, "refund": REFUND, "acquire": ACQUIRE,
           "release": RELEASE, "throttle_reserve": THROTTLE_RESERVE, "throttle_pause": THROTTLE_PAUSE,
           "throttle_succeed": THROTTLE_SUCCEED, "throttle_renew": THROTTLE_RENEW}
