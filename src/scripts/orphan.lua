-- Marks one stream orphaned when its last refresh is older than the stale threshold.
-- Atomic per stream, so any number of guardians mark each orphan exactly once.
-- The larger of the guardian's threshold and the one the claiming layer stored
-- applies, so a guardian configured shorter never orphans a stream whose layer
-- refreshes it less often.
-- KEYS[1]  the stream's hash
-- KEYS[2]  the stream's event log
-- ARGV[1]  cutoff: refreshes at or before this time (ms since the Unix epoch) are stale
-- ARGV[2]  synthetic terminal event bytes
-- ARGV[3]  id of the synthetic terminal event
-- ARGV[4]  now, milliseconds since the Unix epoch
-- ARGV[5]  completion TTL, milliseconds
-- Returns 1 when marked, 0 when the stream is active and fresh, -1 when the hash is gone
-- or the stream is not active (its index entry is dangling).

local fields = redis.call('HMGET', KEYS[1], 'state', 'last_refresh', 'stale_ms')
local state, last_refresh, stale_ms = fields[1], tonumber(fields[2]), tonumber(fields[3])
if not state or state ~= 'active' then
  return -1
end
local cutoff = tonumber(ARGV[1])
if stale_ms then
  cutoff = math.min(cutoff, tonumber(ARGV[4]) - stale_ms)
end
if last_refresh and last_refresh > cutoff then
  return 0
end
redis.call('HSET', KEYS[1],
  'state', 'orphaned',
  'terminal_event', ARGV[2],
  'terminal_id', ARGV[3],
  'reason', 'orphaned',
  'truncated', '0',
  'finished_at', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
