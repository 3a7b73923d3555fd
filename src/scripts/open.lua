-- Decides what to do with a request for one stream, in one round trip.
-- KEYS[1]  the stream's hash ({prefix}{<id>})
-- KEYS[2]  the stream's event log ({prefix}{<id>}:log)
-- ARGV[1]  now, milliseconds since the Unix epoch
-- ARGV[2]  owner of the request ("" when none)
-- ARGV[3]  Last-Event-ID of the request ("" when none)
-- ARGV[4]  claim token for a new claim
-- ARGV[5]  instance id of the caller
-- ARGV[6]  stream type
-- ARGV[7]  metadata JSON
-- ARGV[8]  TTL of a live stream's hash, milliseconds
-- ARGV[9]  stream id
-- ARGV[10] stale threshold of the claiming layer, milliseconds
-- ARGV[11] "1" when the caller keeps event logs and serves followers, else "0"
-- Returns one of:
--   {"replay", terminal_event_bytes}  a finished stream whose owner matches
--   {"gone"}                          a finished stream whose terminal id equals Last-Event-ID
--   {"not_found"}                     a stream of another owner
--   {"live"}                          a stream held by another request (no event log)
--   {"follow"}                        a live stream, or an ended one asked with Last-Event-ID,
--                                     to be served from its event log
--   {"claimed"}                       the caller has claimed the stream

local fields = redis.call('HMGET', KEYS[1], 'state', 'owner', 'terminal_event', 'terminal_id')
local state, owner, terminal_event, terminal_id = fields[1], fields[2], fields[3], fields[4]

if state then
  if owner and owner ~= '' and owner ~= ARGV[2] then
    return {'not_found'}
  end
  local follow = ARGV[11] == '1'
  if state == 'active' then
    if follow then
      return {'follow'}
    end
    return {'live'}
  end
  if terminal_event then
    if ARGV[3] ~= '' and terminal_id and terminal_id == ARGV[3] then
      return {'gone'}
    end
    -- Without its log (expired or evicted) the follower reports the gap, then the end.
    if follow and ARGV[3] ~= '' then
      return {'follow'}
    end
    return {'replay', terminal_event}
  end
end

redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1],
  'id', ARGV[9],
  'state', 'active',
  'owner', ARGV[2],
  'type', ARGV[6],
  'metadata', ARGV[7],
  'instance', ARGV[5],
  'claim', ARGV[4],
  'started_at', ARGV[1],
  'last_refresh', ARGV[1],
  'stale_ms', ARGV[10])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
return {'claimed'}
