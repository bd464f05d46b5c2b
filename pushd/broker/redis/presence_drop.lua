-- Remove one node's members from some presence hashes (presence.py): a dead
-- node's ("reap"), or this node's own before it writes them again ("own").
-- KEYS[1] the nodes' sorted set, KEYS[2] the reaping set, KEYS[3] that
-- node's set of presence hashes, KEYS[4..] presence hashes.
-- ARGV[1] node id, ARGV[2] "reap" or "own".
-- Returns, per hash, {field, value, field, value...} of what was removed;
-- a reaping that finds the node alive again removes nothing and returns
-- false (the node writes its members again itself).
local node, reap = ARGV[1], ARGV[2] == 'reap'
if reap and redis.call('ZSCORE', KEYS[1], node) then
  redis.call('ZREM', KEYS[2], node)
  return false
end
local head = node .. '.'
local removed = {}
for k = 4, #KEYS do
  local gone = {}
  local fields = {}
  local kind = redis.call('TYPE', KEYS[k]).ok
  local all = {}
  if kind == 'hash' then all = redis.call('HGETALL', KEYS[k]) end
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, #head) == head then
      gone[#gone + 1] = all[i]
      gone[#gone + 1] = all[i + 1]
      fields[#fields + 1] = all[i]
      if #fields == 400 then
        redis.call('HDEL', KEYS[k], unpack(fields))
        fields = {}
      end
    end
  end
  if #fields > 0 then redis.call('HDEL', KEYS[k], unpack(fields)) end
  redis.call('SREM', KEYS[3], KEYS[k])
  removed[#removed + 1] = gone
end
if reap and redis.call('SCARD', KEYS[3]) == 0 then
  redis.call('ZREM', KEYS[2], node)
end
return removed
