-- The admin console's stats of every node (pushd.admin.stats): a hash, field
-- node id -> its snapshot, a JSON object whose first member is `"until":<ms>`.
-- KEYS[1]: the hash; ARGV: node id, ttl ms, this node's snapshot (a JSON
-- object of at least one member), or "" for a node that leaves.
-- Writes this node's snapshot, then answers every live one; those whose
-- `until` passed (a dead node's) are deleted.
-- Answers -1 when the key holds another type (another process wrote there).
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'hash' and kind ~= 'none' then
  return -1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return {}
end
local ttl = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], '{"until":' .. (now + ttl) .. ',' .. string.sub(ARGV[3], 2))
-- Gone when no node writes any more.
redis.call('PEXPIRE', KEYS[1], ttl)
local all = redis.call('HGETALL', KEYS[1])
local live = {}
for i = 1, #all, 2 do
  local expiry = tonumber(string.match(all[i + 1], '^{"until":(%d+)'))
  if expiry == nil or expiry <= now then
    redis.call('HDEL', KEYS[1], all[i])
  else
    live[#live + 1] = all[i + 1]
  end
end
return live
