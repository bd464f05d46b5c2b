-- wrk script: POST a ~100-byte JSON body to /channels/bench (the URL given to wrk).
--   wrk -t1 -c4 -d10s --latency -s bench/post.lua http://127.0.0.1:PORT/channels/bench
-- Counts the answers that are not 2xx itself (wrk's own line counts only
-- non-2xx-or-3xx) and prints them at the end: "post.lua: responses=N non2xx=N".

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
-- {"t":<us>,"pad":"..."} like the fan-out publisher's body: 100 bytes in all.
wrk.body = '{"t":1732521234567890,"pad":"' .. string.rep("x", 69) .. '"}'

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   responses = 0
   non2xx = 0
end

function response(status, headers, body)
   responses = responses + 1
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
end

function done(summary, latency, requests)
   local r, n = 0, 0
   for _, t in ipairs(threads) do
      r = r + t:get("responses")
      n = n + t:get("non2xx")
   end
   io.write(string.format("post.lua: responses=%d non2xx=%d body_bytes=%d\n", r, n, #wrk.body))
end
