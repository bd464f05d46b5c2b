-- With several shards: an Idempotency-Key is bound to its first request on
-- the key's own shard, so that it means one request whichever channels
-- (shards) the next request names. The channel's shard keeps the answer
-- (publish.lua, publish_many.lua) as with one shard.
-- KEYS[1] <prefix>idempotency-bind:<key>; ARGV[1] the request's fingerprint;
-- ARGV[2] seconds the binding lasts. Answers 1 when the key is this request's.
local current = redis.call('GET', KEYS[1])
if not current then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
    return 1
end
if current == ARGV[1] then
    return 1
end
return 0
