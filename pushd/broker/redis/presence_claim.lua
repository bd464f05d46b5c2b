-- Dead nodes to reap (presence.py): nodes whose entry expired, and reapings
-- another node left unfinished (its lease ran out). Each is claimed by one
-- caller only: moved to the reaping set with a lease.
-- KEYS[1] the nodes' sorted set, KEYS[2] the reaping set; ARGV[1] lease ms,
-- ARGV[2] how many to claim at most. Returns the node ids claimed.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
local most = tonumber(ARGV[2])
local claimed = {}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, most)) do
  redis.call('ZREM', KEYS[1], node)
  redis.call('ZADD', KEYS[2], until_ms, node)
  claimed[#claimed + 1] = node
end
local left = most - #claimed
if left > 0 then
  for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now, 'LIMIT', 0, left)) do
    redis.call('ZADD', KEYS[2], until_ms, node)
    claimed[#claimed + 1] = node
  end
end
return claimed
