-- A channel's members on every live node (presence.py).
-- KEYS[1] the presence hash, KEYS[2] the nodes' sorted set; ARGV[1] how many
-- stored values to list at most.
-- Returns {members, distinct users, {stored values...}}. A member whose node
-- is not alive (its entry expired: dead, or stopped) is not counted; the
-- node that reaps it removes it.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local all = redis.call('HGETALL', KEYS[1])
local alive, seen, values = {}, {}, {}
local count, users = 0, 0
for i = 1, #all, 2 do
  local node = string.match(all[i], '^([^.]+)%.')
  local live = false
  if node then
    live = alive[node]
    if live == nil then
      local score = redis.call('ZSCORE', KEYS[2], node)
      live = score ~= false and tonumber(score) >= now
      alive[node] = live
    end
  end
  local value = all[i + 1]
  -- A tombstone (`~...`): a member whose leave is not announced yet.
  if live and string.byte(value, 1) ~= 126 then
    count = count + 1
    -- `<n>:<user key><member>`: the user key is the n bytes after the colon.
    local colon = string.find(value, ':', 1, true)
    local n = colon and tonumber(string.sub(value, 1, colon - 1))
    if n and n > 0 then
      local user = string.sub(value, colon + 1, colon + n)
      if not seen[user] then
        seen[user] = true
        users = users + 1
      end
    end
    if #values < limit then values[#values + 1] = value end
  end
end
return {count, users, values}
