-- The nginx+Lua gateway's store and a publish, atomically (as MULTI/EXEC would):
-- `LPUSH <channel> <entry>`, `LPUSH <event list> <channel>`, then publish.lua.
--   KEYS[1] the list (the channel's name), KEYS[2] the event list, KEYS[3] the history stream
--   ARGV[1] the entry, then publish.lua's ARGV
-- scripts.py puts publish.lua before it, as `local function publish(KEYS, ARGV) ... end`.
-- Redis does not undo a script's writes when a command fails half-way: the
-- keys written after the first LPUSH are checked before it (a key of another
-- type: an error, nothing written; the first LPUSH fails alone, as a whole).
local events = redis.call('TYPE', KEYS[2])['ok']
if events ~= 'none' and events ~= 'list' then
  return redis.error_reply('WRONGTYPE pushd: ' .. KEYS[2] .. ' holds a ' .. events .. ', not a list')
end
local history = redis.call('TYPE', KEYS[3])['ok']
if history ~= 'none' and history ~= 'stream' then
  return redis.error_reply('WRONGTYPE pushd: ' .. KEYS[3] .. ' holds a ' .. history .. ', not a stream')
end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], KEYS[1])
return publish({KEYS[3]}, {unpack(ARGV, 2)})
