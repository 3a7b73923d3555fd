-- Drops a claim whose response turned out not to be an event stream.
-- KEYS[1]  the stream's hash
-- KEYS[2]  the stream's event log
-- ARGV[1]  claim token of the caller
-- Returns 1 when the hash was deleted, 0 when it belongs to another claim or is not active.

local fields = redis.call('HMGET', KEYS[1], 'state', 'claim')
if fields[1] == 'active' and fields[2] == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
