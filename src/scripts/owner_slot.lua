-- Counts the live streams of one owner and adds a stream when the owner is
-- under its limit. Runs on the owner's own key, so on a Redis Cluster it may
-- be on another node than the stream's keys.
-- KEYS[1]  the owner's set of live streams ({prefix}owner:{<owner>}), stream ids
--          scored by their last refresh (ms since the Unix epoch)
-- ARGV[1]  now, milliseconds since the Unix epoch
-- ARGV[2]  stale threshold, milliseconds: members last refreshed at or before
--          now minus this are removed first (their process stopped refreshing)
-- ARGV[3]  maximum number of live streams of the owner
-- ARGV[4]  stream id
-- ARGV[5]  TTL of the set, milliseconds
-- Returns 1 when the stream was added (or was already a member), 0 when the owner
-- already has the maximum number of live streams.

local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
if not redis.call('ZSCORE', KEYS[1], ARGV[4]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
