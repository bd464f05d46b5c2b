-- The nginx+Lua gateway's store and a publish, atomically (as MULTI/EXEC would):
-- `LPUSH <channel> <entry>`, `LPUSH <event list> <channel>`, then publish.lua.
--   KEYS[1] the list (the channel's name), KEYS[2] the event list, KEYS[3] the history stream
--   ARGV[1] the entry, then publish.lua's ARGV
-- scripts.py puts publish.lua before it, as `local function publish(KEYS, ARGV) ... end`.
-- Redis does not undo a script's writes when a command fails half-way: every
-- key written is checked first (a key of another type: an error, nothing written).
for _, key in ipairs({{KEYS[1], 'list'}, {KEYS[2], 'list'}, {KEYS[3], 'stream'}}) do
  local kind = redis.call('TYPE', key[1])['ok']
  if kind ~= 'none' and kind ~= key[2] then
    return redis.error_reply('WRONGTYPE pushd: ' .. key[1] .. ' holds a ' .. kind .. ', not a ' .. key[2])
  end
end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], KEYS[1])
return publish({KEYS[3]}, {unpack(ARGV, 2)})
