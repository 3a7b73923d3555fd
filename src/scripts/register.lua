-- Writes the registry entry of a live stream whose hash is missing, as after a
-- Redis restart without persistence. An existing hash is left alone.
-- KEYS[1]  the stream's hash
-- KEYS[2]  the stream's event log (unused; every stream script names both keys)
-- ARGV[1..10] as the open script: now, owner, (unused), claim, instance, type,
--          metadata, TTL in milliseconds, stream id, stale threshold in milliseconds
-- ARGV[11] start time of the stream, milliseconds since the Unix epoch
-- Returns 1 when the entry was written, 0 when a hash already exists.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1],
  'id', ARGV[9],
  'state', 'active',
  'owner', ARGV[2],
  'type', ARGV[6],
  'metadata', ARGV[7],
  'instance', ARGV[5],
  'claim', ARGV[4],
  'started_at', ARGV[11],
  'last_refresh', ARGV[1],
  'stale_ms', ARGV[10])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
return 1
