-- The history read after an id. KEYS: history stream, its meta key,
-- <prefix>!lost (epoch.lua); ARGV: since, count.
-- Returns {complete, entries, the newest id or ''}. After "0-0" (from the
-- beginning) the first entry must link to nothing, or, with no entry, the
-- channel must have no remembered id either (see pushd.broker).
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last = ''
if newest[1] then last = newest[1][1] end
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
local before = ARGV[1]
if before == '0-0' then before = '' end
local complete = 0
if entries[1] then
  local fields = entries[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'p' and fields[i + 1] == before then complete = 1 end
  end
elseif last ~= '' then
  if last == ARGV[1] then complete = 1 end
elseif before == '' and redis.call('EXISTS', KEYS[2], KEYS[3]) == 0 then
  complete = 1
end
return {complete, entries, last}
