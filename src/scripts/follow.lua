-- Reads a stream's log for one follower.
-- KEYS[1]  the stream's hash
-- KEYS[2]  the stream's event log
-- ARGV[1]  cursor: the last sequence number delivered (0 before the first)
-- ARGV[2]  an event id to find first ("" when none); entries up to and including
--          its last occurrence are skipped
-- ARGV[3]  maximum number of entries returned
-- Returns {state, terminal_event, found, first_seq, log_seq, seq1, event1, terminal1, seq2, ...}:
--   state           the hash's state, or "" when the hash is gone
--   terminal_event  the recorded terminal event once the stream ended, else ""
--   found           the sequence number of the entry with the id of ARGV[2], 0 when it
--                   is not in the log, -1 when no id was asked
--   first_seq       the oldest sequence number still in the log, 0 when it is empty
--   log_seq         the sequence number of the stream's last event once it ended, else 0
-- When an id was asked and not found, no entries are returned.

local fields = redis.call('HMGET', KEYS[1], 'state', 'terminal_event', 'log_seq')
local state = fields[1] or ''
local terminal_event = ''
local log_seq = 0
if state ~= '' and state ~= 'active' then
  terminal_event = fields[2] or ''
  log_seq = tonumber(fields[3]) or 0
end

local first_seq = 0
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
if oldest then
  first_seq = tonumber(string.match(oldest[1], '^(%d+)'))
end

local start = '-'
if tonumber(ARGV[1]) > 0 then
  start = '(' .. ARGV[1] .. '-0'
end

local found = -1
if ARGV[2] ~= '' then
  found = 0
  local cursor = start
  while true do
    local batch = redis.call('XRANGE', KEYS[2], cursor, '+', 'COUNT', 1000)
    if #batch == 0 then
      break
    end
    for _, entry in ipairs(batch) do
      local entry_fields = entry[2]
      for f = 1, #entry_fields, 2 do
        if entry_fields[f] == 'i' and entry_fields[f + 1] == ARGV[2] then
          found = tonumber(string.match(entry[1], '^(%d+)'))
          start = '(' .. entry[1]
        end
      end
    end
    cursor = '(' .. batch[#batch][1]
  end
  if found == 0 then
    return {state, terminal_event, 0, first_seq, log_seq}
  end
end

local reply = {state, terminal_event, found, first_seq, log_seq}
for _, entry in ipairs(redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', tonumber(ARGV[3]))) do
  local event, terminal = '', '0'
  local entry_fields = entry[2]
  for f = 1, #entry_fields, 2 do
    if entry_fields[f] == 'e' then
      event = entry_fields[f + 1]
    elseif entry_fields[f] == 't' then
      terminal = entry_fields[f + 1]
    end
  end
  reply[#reply + 1] = tonumber(string.match(entry[1], '^(%d+)'))
  reply[#reply + 1] = event
  reply[#reply + 1] = terminal
end
return reply
