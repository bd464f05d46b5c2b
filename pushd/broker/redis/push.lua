-- The nginx+Lua gateway's store and a publish, atomically (as MULTI/EXEC would):
-- `LPUSH <channel> <entry>`, `LPUSH <event list> <channel>`, then publish.lua.
--   KEYS[1] the list (the channel's name), KEYS[2] the event list, KEYS[3] the history stream
--   ARGV[1] the entry, then publish.lua's ARGV
-- scripts.py puts publish.lua before it, as `local function publish(KEYS, ARGV) ... end`.
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], KEYS[1])
return publish({KEYS[3]}, {unpack(ARGV, 2)})
