-- The shard list the nodes on this Redis use: the first node's, kept while
-- nodes with the same list refresh it (pushd/broker/redis/shard.py, check_map).
-- KEYS[1] <prefix>!shards; ARGV[1] this node's "<index>:<fingerprint>";
-- ARGV[2] seconds it lasts unless refreshed. Answers the list remembered.
local current = redis.call('GET', KEYS[1])
if not current then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
    return ARGV[1]
end
if current == ARGV[1] then
    redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return current
