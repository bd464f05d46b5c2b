-- The nginx+Lua gateway's store and a publish, atomically (as MULTI/EXEC would):
-- `LPUSH <channel> <entry>`, `LPUSH <event list> <channel>`, then publish.lua.
--   KEYS[1] the list (the channel's name), KEYS[2] the event list, KEYS[3] the history stream
--   ARGV[1] the entry, then publish.lua's ARGV
-- scripts.py puts publish.lua before it, as `local function publish(KEYS, ARGV) ... end`.
-- Redis does not undo a script's writes when a command fails half-way: a key of
-- another type fails its command (publish.lua fails before its first write),
-- and what this script wrote before is taken back (LPOP of what it pushed),
-- so it answers the error with nothing written.
local function refused(err)
  return redis.error_reply(type(err) == 'table' and err.err or tostring(err))
end
redis.call('LPUSH', KEYS[1], ARGV[1])
local ok, err = pcall(redis.call, 'LPUSH', KEYS[2], KEYS[1])
if not ok then
  redis.call('LPOP', KEYS[1])
  return refused(err)
end
local published
ok, published = pcall(publish, {KEYS[3]}, {unpack(ARGV, 2)})
if not ok then
  redis.call('LPOP', KEYS[2])
  redis.call('LPOP', KEYS[1])
  return refused(published)
end
return published
