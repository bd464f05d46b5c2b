-- A channel's subscribers on all nodes. KEYS: subscriber hash.
-- Adds up the live fields, drops the expired ones.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local sum = 0
for i = 1, #all, 2 do
  local n, expiry = string.match(all[i + 1], '(%d+):(%d+)')
  if n and tonumber(expiry) >= now then
    sum = sum + tonumber(n)
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return sum
