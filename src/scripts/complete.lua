-- Records the end of a stream held by the caller, at most once per claim.
-- KEYS[1]  the stream's hash
-- KEYS[2]  the stream's event log
-- ARGV[1]  claim token of the caller
-- ARGV[2]  final state: "completed" or "failed"
-- ARGV[3]  terminal event bytes, as the client received them or as synthesized
-- ARGV[4]  id of the terminal event ("" when it had none)
-- ARGV[5]  reason ("" for a terminal event sent by the service)
-- ARGV[6]  "1" when the terminal event bytes were truncated, else "0"
-- ARGV[7]  now, milliseconds since the Unix epoch
-- ARGV[8]  completion TTL, milliseconds
-- ARGV[9]  sequence number of the stream's last event, 0 without an event log
-- Returns 1 when recorded, 0 when this claim already recorded an end, -1 when the
-- hash belongs to another claim, -2 when the hash is gone.

local fields = redis.call('HMGET', KEYS[1], 'state', 'claim')
local state, claim = fields[1], fields[2]
if not state then
  return -2
end
if claim ~= ARGV[1] then
  return -1
end
if state == 'completed' or state == 'failed' then
  return 0
end
-- An orphaned mark is replaced: the service's real ending is better than the guardian's guess.
redis.call('HSET', KEYS[1],
  'state', ARGV[2],
  'terminal_event', ARGV[3],
  'terminal_id', ARGV[4],
  'reason', ARGV[5],
  'truncated', ARGV[6],
  'finished_at', ARGV[7],
  'log_seq', ARGV[9])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
return 1
