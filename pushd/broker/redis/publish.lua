-- pushd's publish: store a message in its channel's history and send it live,
-- atomically. Backends in any language may run it too (see README, "Redis layout"):
--   KEYS[1]  the history stream, <prefix>{<channel>}:history
--   KEYS[2]  optional: the idempotency key, <prefix>idempotency:<key>
--   ARGV[1]  the pub/sub channel, <prefix><channel>
--   ARGV[2]  the envelope's start: {"type":"message","channel":<channel as JSON>,"id":
--   ARGV[3]  the data, as JSON
--   ARGV[4]  history size (MAXLEN ~), ARGV[5] history TTL (s), ARGV[6] idempotency TTL (s)
--   ARGV[7]  optional: what the idempotency key is bound to (pushd: sha1 hex of the request)
--   ARGV[8]  optional: how long <prefix>{<channel>}:meta lives (s; default 10 x
--            history TTL, at least a day)
-- Returns {0, id}; {1, id} when the idempotency key had been seen with the same
-- ARGV[7] (nothing published); {2, ''} when it had been seen with another (nothing published).
-- The idempotency record is "<ARGV[7]>|<id>". Each entry links (field p) to the
-- one before it; the first of the channel to ''. <prefix>{<channel>}:meta (in
-- the stream's hash slot) keeps the channel's newest id past the stream's
-- expiry: a new stream's first entry links to it (after a `destroy` it is
-- '?<id>': something is missing). <prefix>!lost is set by pushd when Redis lost
-- its data: then a new channel's first entry links to '?'.
local fp = ARGV[7] or ''
if KEYS[2] then
  local seen = redis.call('GET', KEYS[2])
  if seen then
    local bound, answer = string.match(seen, '^(%x*)|(.*)$')
    if not bound then bound, answer = fp, seen end
    if bound ~= fp then return {2, ''} end
    return {1, answer}
  end
end
local meta = string.sub(KEYS[1], 1, -9) .. ':meta'
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev, at = '', '*'
if last[1] then
  prev = last[1][1]
else
  -- A new stream: link to the channel's newest id (<prefix>{<channel>}:meta)
  -- and stay above it; with none, to nothing, or to '?' (something may be
  -- missing before) when Redis lost its data lately (<prefix>!lost).
  local seen = redis.call('GET', meta)
  if seen then
    prev = seen
    local ms, seq = string.match(seen, '(%d+)-(%d+)$')
    local now = redis.call('TIME')
    if ms and tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) <= tonumber(ms) then
      at = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
    end
  else
    local base = string.match(KEYS[1], '^(.*){[^{}]*}:history$')
    if base and redis.call('EXISTS', base .. '!lost') == 1 then prev = '?' end
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], at, 'd', ARGV[3], 'p', prev)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('SET', meta, id, 'EX', ARGV[8] or math.max(ARGV[5] * 10, 86400))
-- pushd's bus format (README, "Redis layout"): the marker, then the envelope.
redis.call('PUBLISH', ARGV[1], '\0pushd/1\n' .. ARGV[2] .. '"' .. id .. '","data":' .. ARGV[3] .. '}')
if KEYS[2] then redis.call('SET', KEYS[2], fp .. '|' .. id, 'EX', ARGV[6]) end
return {0, id}
