-- pushd's batch publish: a batch in one script, in order, all or nothing, a
-- run of messages of one channel at a time: one history read, one EXPIRE and
-- one PUBLISH per run (its envelopes one a line, which the hub splits), one
-- XADD per message (linked as publish.lua links them). An envelope has no
-- newline: compact JSON escapes it. Redis does not undo a script's writes when
-- a command fails half-way, so everything that could fail (a key of another
-- type) is read before the first write.
--   ARGV[1..4]  history size, history TTL, idempotency TTL, meta TTL
--   ARGV[5..6]  the batch's idempotency key ('' for none) and fingerprint
--   then per run, five arguments:
--               history stream, pub/sub channel, envelope start, count, the data one a line
-- Returns "0:<id>,<id>,...", or "1:<ids>" when the idempotency key had been seen
-- with this fingerprint, "2:" with another (both: nothing published).
local size, ttl, idem_ttl, meta_ttl, key, fp = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if key ~= '' then
  local seen = redis.call('GET', key)
  if seen then
    local bound, answer = string.match(seen, '^(%x*)|(.*)$')
    if bound ~= fp then return '2:' end
    return '1:' .. answer
  end
end
local newest, at = {}, {}
for r = 7, #ARGV, 5 do
  local stream = ARGV[r]
  if newest[stream] == nil then
    local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
    if last[1] then
      newest[stream] = last[1][1]
    else
      -- A new stream: linked as publish.lua links it, its ids above the meta key's.
      newest[stream] = ''
      local seen = redis.call('GET', string.sub(stream, 1, -9) .. ':meta')
      if seen then
        newest[stream] = seen
        local ms, seq = string.match(seen, '(%d+)-(%d+)$')
        local now = redis.call('TIME')
        if ms and tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) <= tonumber(ms) then
          at[stream] = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
        end
      else
        local base = string.match(stream, '^(.*){[^{}]*}:history$')
        if base and redis.call('EXISTS', base .. '!lost') == 1 then newest[stream] = '?' end
      end
    end
  end
end
local out = {}
for r = 7, #ARGV, 5 do
  local stream, channel, head = ARGV[r], ARGV[r + 1], ARGV[r + 2]
  local prev = newest[stream]
  local live = {}
  for data in string.gmatch(ARGV[r + 4], '[^\n]+') do
    local id = redis.call('XADD', stream, 'MAXLEN', '~', size, at[stream] or '*',
      'd', data, 'p', prev)
    at[stream] = nil
    prev = id
    live[#live + 1] = head .. '"' .. id .. '","data":' .. data .. '}'
    out[#out + 1] = id
  end
  newest[stream] = prev
  redis.call('EXPIRE', stream, ttl)
  redis.call('SET', string.sub(stream, 1, -9) .. ':meta', prev, 'EX', meta_ttl)
  redis.call('PUBLISH', channel, '\0pushd/1\n' .. table.concat(live, '\n'))
end
local answer = table.concat(out, ',')
if key ~= '' then redis.call('SET', key, fp .. '|' .. answer, 'EX', idem_ttl) end
return '0:' .. answer
