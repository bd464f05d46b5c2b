-- This node's presence: its entry in the nodes' sorted set refreshed, and its
-- members of some channels written (presence.py).
-- KEYS[1] the nodes' sorted set, KEYS[2] this node's set of presence hashes,
-- KEYS[3..] presence hashes.
-- ARGV[1] node id, ARGV[2] ttl ms; then per hash: "1" when this node still
-- has members there (else "0"), the number of fields to set (n) and to
-- delete (m), n field/value pairs, m fields.
-- Returns {1 when the node had no entry (taken for dead, or Redis lost its
-- data: the caller writes all of its members again) else 0, the keys left
-- alone because they hold another type (another process wrote there)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local new = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local a = 3
local foreign = {}
local function chunked(command, key, first, count, width)
  -- unpack() takes a bounded number of values: a few hundred fields a call.
  local step = 400 * width
  local i = 0
  while i < count * width do
    local args = {}
    for j = i, math.min(i + step, count * width) - 1 do
      args[#args + 1] = ARGV[first + j]
    end
    redis.call(command, key, unpack(args))
    i = i + step
  end
end
for k = 3, #KEYS do
  local key = KEYS[k]
  local present, n, m = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local kind = redis.call('TYPE', key).ok
  local ours = kind == 'hash' or kind == 'none'
  if not ours then
    foreign[#foreign + 1] = key
    present = '0'
  end
  if ours and n > 0 then chunked('HSET', key, a, n, 2) end
  a = a + 2 * n
  if ours and m > 0 then chunked('HDEL', key, a, m, 1) end
  a = a + m
  if present == '1' then
    redis.call('SADD', KEYS[2], key)
  else
    redis.call('SREM', KEYS[2], key)
  end
end
return {new, foreign}
