-- Marks one live stream as fresh. Sent in a pipeline for every live stream of a process each tick.
-- KEYS[1]  the stream's hash
-- KEYS[2]  the stream's event log
-- ARGV[1]  now, milliseconds since the Unix epoch
-- ARGV[2]  TTL of a live stream's hash, milliseconds
-- ARGV[3]  claim token of the caller
-- Returns 1 when refreshed, 0 when the hash is gone, -1 when the stream is no longer
-- active under this claim (finished, orphaned, or claimed again elsewhere).

local fields = redis.call('HMGET', KEYS[1], 'state', 'claim')
if not fields[1] then
  return 0
end
if fields[1] ~= 'active' or fields[2] ~= ARGV[3] then
  return -1
end
redis.call('HSET', KEYS[1], 'last_refresh', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
