-- pushd's publish: store a message in its channel's history and send it live,
-- atomically. Backends in any language may run it too (see README, "Redis layout"):
--   KEYS[1]  the history stream, <prefix>{<channel>}:history
--   KEYS[2]  optional: the idempotency key, <prefix>idempotency:<key>
--   ARGV[1]  the pub/sub channel, <prefix><channel>
--   ARGV[2]  the envelope's start: {"type":"message","channel":<channel as JSON>,"id":
--   ARGV[3]  the data, as JSON
--   ARGV[4]  history size (MAXLEN ~), ARGV[5] history TTL (s), ARGV[6] idempotency TTL (s)
-- Returns {0, id}, or {1, id} when the idempotency key had been seen.
if KEYS[2] then
  local seen = redis.call('GET', KEYS[2])
  if seen then return {1, seen} end
end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = ''
if last[1] then prev = last[1][1] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'd', ARGV[3], 'p', prev)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', ARGV[1], ARGV[2] .. '"' .. id .. '","data":' .. ARGV[3] .. '}')
if KEYS[2] then redis.call('SET', KEYS[2], id, 'EX', ARGV[6]) end
return {0, id}
