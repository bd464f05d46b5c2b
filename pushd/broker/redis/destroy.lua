-- `destroy`: KEYS: history stream, subscriber hash, meta key; ARGV: meta TTL.
-- The meta key becomes '?<newest id>': the next stream's first entry links to
-- it, so no resume from before and no read from "0-0" says complete, and its
-- ids stay above.
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local newest = redis.call('GET', KEYS[3])
if last[1] then newest = last[1][1] end
redis.call('DEL', KEYS[1], KEYS[2])
if newest then
  redis.call('SET', KEYS[3], '?' .. string.match(newest, '[^?]*$'), 'EX', ARGV[1])
end
return 1
