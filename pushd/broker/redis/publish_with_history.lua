-- Publish with history, for backends (README, "Straight from Redis"): stores a
-- message in its channel's history and sends it live to every pushd node, as
-- pushd's own publish does, after checking what it stores. One bad call must
-- not poison the history API, SSE and NDJSON replays for the history's TTL.
--
--   redis-cli --eval publish_with_history.lua 'pushd:{news}:history' , pushd: news '{"n":1}'
--
--   KEYS[1]  the history stream: <prefix>{<channel>}:history
--   ARGV[1]  the prefix (pushd's --redis-prefix, `pushd:` by default)
--   ARGV[2]  the channel (a name of the contract's form)
--   ARGV[3]  the data
--   ARGV[4]  optional: `json` (default): the data must be strict JSON (RFC 8259,
--            UTF-8, no NaN/Infinity, every number fits a double, no lone
--            surrogate escape such as "\ud800"); it is stored
--            without the whitespace between tokens. `text`: any UTF-8 text,
--            stored as a JSON string.
--   ARGV[5]  optional: history size (MAXLEN ~), default 100 (--history-size)
--   ARGV[6]  optional: history TTL in seconds, default 3600 (--history-ttl)
--   ARGV[7]  optional: the largest data in bytes, default 65536 (--max-message-size)
-- Returns the message id; or an error reply `ERR pushd: ...`, and then nothing
-- was stored or sent.
--
-- Redis's cjson.decode is no check: it takes NaN, Infinity, 1e400, 0x10, 01, +1
-- and `1.`, none of them JSON. The data is checked by the scanner below.

local find, sub, byte = string.find, string.sub, string.byte
local MAX_DEPTH = 512
-- int(sys.float_info.max): the largest integer pushd takes (309 digits).
local DBL_MAX_DIGITS = '17976931348623157081452742373170435679807056752584499659891747680315'
  .. '72607800285387605895586327668781715404589535143824642343213268894641827684675467035375'
  .. '16986049910576551282076245490090389328944075868508455133942304583236903222948165808559'
  .. '332123348274797826204144723168738177180919299881250404026184124858368'

local function refuse(why)
  return redis.error_reply('ERR pushd: ' .. why)
end

-- The UTF-8 sequence at s[i] (a byte >= 0x80): the index after it, or nil.
local function utf8_after(s, i)
  local c = byte(s, i)
  local n, lo, hi
  if c >= 0xC2 and c <= 0xDF then n = 1
  elseif c == 0xE0 then n, lo = 2, 0xA0
  elseif c == 0xED then n, hi = 2, 0x9F
  elseif c >= 0xE1 and c <= 0xEF then n = 2
  elseif c == 0xF0 then n, lo = 3, 0x90
  elseif c == 0xF4 then n, hi = 3, 0x8F
  elseif c >= 0xF1 and c <= 0xF3 then n = 3
  else return nil end
  for k = 1, n do
    local b = byte(s, i + k)
    if not b or b < ((k == 1 and lo) or 0x80) or b > ((k == 1 and hi) or 0xBF) then
      return nil
    end
  end
  return i + n + 1
end

local function is_utf8(s)
  local i, n = 1, #s
  while i <= n do
    local _, e = find(s, '^[%z\1-\127]*', i)
    i = e + 1
    if i <= n then
      i = utf8_after(s, i)
      if not i then return false end
    end
  end
  return true
end

local ESCAPES = {['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f',
                 ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t'}

local function quote(s)
  return '"' .. string.gsub(s, '[%z\1-\31"\\]', function(c)
    return ESCAPES[c] or string.format('\\u%04x', byte(c))
  end) .. '"'
end

-- Strict JSON: the value without the whitespace between its tokens (so it
-- holds no newline: pushd's bus and SSE are line-based), or nil and why not.
local function compact_json(s)
  local n, pos, seg, parts = #s, 1, 1, {}
  local stack, depth = {}, 0

  local function skip()
    local p = find(s, '[^ \t\r\n]', pos) or n + 1
    if p > pos then
      parts[#parts + 1] = sub(s, seg, pos - 1)
      seg = p
    end
    pos = p
  end

  local function str()
    pos = pos + 1
    while true do
      local _, e = find(s, '^[^"\\%z\1-\31\128-\255]*', pos)
      pos = e + 1
      local c = byte(s, pos)
      if c == 34 then
        pos = pos + 1
        return nil
      elseif c == 92 then
        local x = sub(s, pos + 1, pos + 1)
        if x == 'u' then
          local u = find(s, '^%x%x%x%x', pos + 2) and tonumber(sub(s, pos + 2, pos + 5), 16)
          if not u then return 'a bad \\u escape' end
          pos = pos + 6
          -- A surrogate escape stands for text only as a high one then a low
          -- one: pushd refuses a lone one as data (no UTF-8 holds it).
          if u >= 0xDC00 and u <= 0xDFFF then return 'a lone surrogate escape' end
          if u >= 0xD800 and u <= 0xDBFF then
            local low = sub(s, pos, pos + 1) == '\\u' and find(s, '^%x%x%x%x', pos + 2)
                        and tonumber(sub(s, pos + 2, pos + 5), 16)
            if not low or low < 0xDC00 or low > 0xDFFF then
              return 'a lone surrogate escape'
            end
            pos = pos + 6
          end
        elseif x ~= '' and find('"\\/bfnrt', x, 1, true) then
          pos = pos + 2
        else
          return 'a bad escape'
        end
      elseif c == nil then
        return 'a string with no end'
      elseif c < 32 then
        return 'a control character in a string'
      else
        pos = utf8_after(s, pos)
        if not pos then return 'text that is not UTF-8' end
      end
    end
  end

  local function key()
    if sub(s, pos, pos) ~= '"' then return 'a key that is not a string' end
    local err = str()
    if err then return err end
    skip()
    if sub(s, pos, pos) ~= ':' then return 'no : after a key' end
    pos = pos + 1
    return nil
  end

  local function num()
    local start = pos
    if sub(s, pos, pos) == '-' then pos = pos + 1 end
    local _, e = find(s, '^0', pos)
    if not e then _, e = find(s, '^[1-9]%d*', pos) end
    if not e then return 'a bad number' end
    local int_start, int_end = pos, e
    pos = e + 1
    if not find(s, '^[%.eE]', pos) then
      -- An integer: pushd keeps it exact, and refuses it past DBL_MAX exactly
      -- (Lua's doubles would round DBL_MAX + 1 down to DBL_MAX).
      local digits = int_end - int_start + 1
      if digits < #DBL_MAX_DIGITS then return nil end
      if digits > #DBL_MAX_DIGITS then return 'a number that does not fit a double' end
      -- As many digits: the first that differs decides (byte by byte, as Lua's
      -- `<` on strings follows the locale's collation).
      for k = 1, digits do
        local a, b = byte(s, int_start + k - 1), byte(DBL_MAX_DIGITS, k)
        if a ~= b then
          if a > b then return 'a number that does not fit a double' end
          return nil
        end
      end
      return nil
    end
    if sub(s, pos, pos) == '.' then
      _, e = find(s, '^%d+', pos + 1)
      if not e then return 'a bad number' end
      pos = e + 1
    end
    if find(s, '^[eE]', pos) then
      _, e = find(s, '^[%+%-]?%d+', pos + 1)
      if not e then return 'a bad number' end
      pos = e + 1
    end
    local v = tonumber(sub(s, start, pos - 1))
    if not v or v ~= v or v == math.huge or v == -math.huge then
      return 'a number that does not fit a double'
    end
    return nil
  end

  local want = true -- a value comes next
  while true do
    skip()
    local c = sub(s, pos, pos)
    local err
    if want then
      if c == '{' or c == '[' then
        depth = depth + 1
        if depth > MAX_DEPTH then return nil, 'nested too deeply' end
        stack[depth] = c
        pos = pos + 1
        skip()
        if sub(s, pos, pos) == ((c == '{' and '}') or ']') then
          pos = pos + 1
          depth = depth - 1
          want = false
        elseif c == '{' then
          err = key()
        end
      elseif c == '"' then
        err = str()
        want = false
      elseif c == '-' or find(c, '^%d') then
        err = num()
        want = false
      elseif sub(s, pos, pos + 3) == 'true' or sub(s, pos, pos + 3) == 'null' then
        pos = pos + 4
        want = false
      elseif sub(s, pos, pos + 4) == 'false' then
        pos = pos + 5
        want = false
      else
        return nil, 'not JSON'
      end
    elseif depth == 0 then
      if pos <= n then return nil, 'more than one JSON value' end
      parts[#parts + 1] = sub(s, seg, n)
      return table.concat(parts)
    elseif c == ',' then
      pos = pos + 1
      if stack[depth] == '{' then
        skip()
        err = key()
      end
      want = true
    elseif c == ((stack[depth] == '{' and '}') or ']') then
      pos = pos + 1
      depth = depth - 1
    else
      return nil, 'not JSON'
    end
    if err then return nil, err end
  end
end

local function is_channel(c)
  local name, users = string.match(c, '^([A-Za-z0-9_.:@=+%-]+)(.*)$')
  if not name or #name > 128 then return false end
  if users == '' then return true end
  if sub(users, 1, 1) ~= '#' then return false end
  for id in string.gmatch(sub(users, 2) .. ',', '([^,]*),') do
    if #id > 64 or not find(id, '^[A-Za-z0-9_.@=+%-]+$') then return false end
  end
  return true
end

local function count(arg, default)
  if arg == nil or arg == '' then return default end
  local v = tonumber(arg)
  if not v or v < 1 or v % 1 ~= 0 then return nil end
  return v
end

local prefix, channel, data, kind = ARGV[1], ARGV[2], ARGV[3], ARGV[4] or 'json'
if not prefix or not channel or not data then
  return refuse('arguments: <prefix> <channel> <data> [json|text] [size] [ttl] [max bytes]')
end
if not is_channel(channel) then return refuse('not a channel name: ' .. channel) end
if KEYS[1] ~= prefix .. '{' .. channel .. '}:history' then
  return refuse('KEYS[1] must be ' .. prefix .. '{' .. channel .. '}:history')
end
local size, ttl, limit = count(ARGV[5], 100), count(ARGV[6], 3600), count(ARGV[7], 65536)
if not size or not ttl or not limit then
  return refuse('history size, TTL and largest size must be whole numbers from 1')
end
if #data > limit then return refuse('data of ' .. #data .. ' bytes, over ' .. limit) end
if kind == 'json' then
  local compact, why = compact_json(data)
  if not compact then return refuse('data is not strict JSON: ' .. why) end
  data = compact
elseif kind == 'text' then
  if not is_utf8(data) then return refuse('text that is not UTF-8') end
  data = quote(data)
else
  return refuse('the kind of data is json or text, not ' .. kind)
end

-- Then pushd's own publish, stores and sends the message as pushd does: the
-- entry linked to the channel's newest id, the bus payload in pushd's format
-- (the marker "\0pushd/1\n", then the envelope). A verbatim copy of
-- pushd/broker/redis/publish.lua; tests/test_bus.py checks that it is one.
-- BEGIN pushd/broker/redis/publish.lua
local function publish(KEYS, ARGV)
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
-- END pushd/broker/redis/publish.lua
end

local head = '{"type":"message","channel":"' .. channel .. '","id":'
return publish({KEYS[1]}, {prefix .. channel, head, data, size, ttl, 300})[2]
