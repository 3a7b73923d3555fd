-- Appends events to a stream's log, then trims the log to its bounds.
-- KEYS[1]  the stream's hash
-- KEYS[2]  the stream's event log (a Redis Stream; entry ids are <seq>-0)
-- ARGV[1]  maximum number of entries
-- ARGV[2]  maximum total bytes of the `e` fields
-- ARGV[3]  TTL of the log, milliseconds
-- ARGV[4]  claim token of the caller
-- ARGV[5..] groups of four: sequence number, event id ("" when none), event bytes,
--           "1" for the terminal event else "0"
-- Returns the number of entries added, or -1 when the stream is not held under
-- this claim. Entries whose sequence number is already in the log are skipped,
-- so a retried append adds nothing twice.

if redis.call('HGET', KEYS[1], 'claim') ~= ARGV[4] then
  return -1
end

local last = 0
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if newest[1] then
  last = tonumber(string.match(newest[1][1], '^(%d+)'))
end

local added, added_bytes = 0, 0
for i = 5, #ARGV, 4 do
  local seq = tonumber(ARGV[i])
  if seq > last then
    redis.call('XADD', KEYS[2], seq .. '-0', 'i', ARGV[i + 1], 'e', ARGV[i + 2], 't', ARGV[i + 3])
    added = added + 1
    added_bytes = added_bytes + #ARGV[i + 2]
    last = seq
  end
end

local bytes = redis.call('HINCRBY', KEYS[1], 'log_bytes', added_bytes)
local max_entries, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
while redis.call('XLEN', KEYS[2]) > max_entries or bytes > max_bytes do
  local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
  if not oldest then
    break
  end
  local fields = oldest[2]
  for f = 1, #fields, 2 do
    if fields[f] == 'e' then
      bytes = bytes - #fields[f + 1]
    end
  end
  redis.call('XDEL', KEYS[2], oldest[1])
end
redis.call('HSET', KEYS[1], 'log_bytes', bytes)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return added
