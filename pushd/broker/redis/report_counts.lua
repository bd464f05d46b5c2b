-- This node's subscriber counts (field: node id, value `<count>:<expiry ms>`).
-- KEYS: subscriber hashes; ARGV: node id, ttl ms, one count per key.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  local n = tonumber(ARGV[i + 2])
  if n > 0 then
    redis.call('HSET', key, ARGV[1], n .. ':' .. expiry)
    redis.call('PEXPIRE', key, ARGV[2])
  else
    redis.call('HDEL', key, ARGV[1])
  end
end
return #KEYS
