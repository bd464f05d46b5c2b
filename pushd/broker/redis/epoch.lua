-- Did Redis lose its data (restarted empty, flushed) since this node last saw
-- it? KEYS: <prefix>!epoch (a token no node ever deletes), <prefix>!lost;
-- ARGV: the token this node saw ('' at first), a new token, the meta TTL.
-- When the token is gone or another, <prefix>!lost is set for as long as a
-- channel's newest id would have been remembered: meanwhile the first message
-- of a new stream links to '?' (something may be missing before it), and
-- reading after "0-0" a channel with no history is not complete.
local current = redis.call('GET', KEYS[1])
if not current then
  current = ARGV[2]
  redis.call('SET', KEYS[1], current)
end
if ARGV[1] ~= '' and current ~= ARGV[1] then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
end
return current
