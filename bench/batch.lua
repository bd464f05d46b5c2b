-- wrk script: batch publishes. POSTs N NDJSON lines (application/x-ndjson) to the URL
-- given to wrk, each {"channel":"bench","data":{...100 bytes...}}:
--   wrk -t1 -c4 -d5s --latency -s bench/batch.lua http://127.0.0.1:PORT/publish -- N [CHANNEL]
-- (N 100 and channel "bench" by default). The body is built once per wrk thread.
-- Counts the answers that are not 2xx itself (wrk's own line counts only
-- non-2xx-or-3xx), and the 2xx answers that do not hold N results, and prints them
-- at the end: "batch.lua: responses=N non2xx=N wrong_count=N lines=N body_bytes=N".

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   lines = tonumber(args[1]) or 100
   local channel = args[2] or "bench"
   -- {"t":<us>,"pad":"..."}: the fan-out publisher's 100-byte body.
   local data = '{"t":1732521234567890,"pad":"' .. string.rep("x", 69) .. '"}'
   local line = '{"channel":"' .. channel .. '","data":' .. data .. "}\n"
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/x-ndjson"
   wrk.body = string.rep(line, lines)
   body_bytes = #wrk.body
   responses = 0
   non2xx = 0
   wrong_count = 0
end

function response(status, headers, body)
   responses = responses + 1
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   else
      -- {"results":[{"channel":"bench","id":"..."}, ...]}: one id per line.
      local _, ids = string.gsub(body, '"id":', "")
      if ids ~= lines then
         wrong_count = wrong_count + 1
      end
   end
end

function done(summary, latency, requests)
   local r, n, w, l, b = 0, 0, 0, 0, 0
   for _, t in ipairs(threads) do
      r = r + t:get("responses")
      n = n + t:get("non2xx")
      w = w + t:get("wrong_count")
      l = t:get("lines")
      b = t:get("body_bytes")
   end
   io.write(
      string.format(
         "batch.lua: responses=%d non2xx=%d wrong_count=%d lines=%d body_bytes=%d\n",
         r, n, w, l, b
      )
   )
end
