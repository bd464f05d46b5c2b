-- wrk script: POST the ~100-byte JSON body of post.lua, each request to a channel
-- picked at random from N channels PREFIX0 .. PREFIX<N-1> (so, with several Redis
-- shards, every shard gets its share). The URL's path is ignored:
--   wrk -t1 -c8 -d5s --latency -s bench/post_many.lua http://127.0.0.1:PORT/ -- 2000 sh
-- Counts the answers that are not 2xx itself and prints them at the end:
-- "post_many.lua: responses=N non2xx=N".

local body = '{"t":1732521234567890,"pad":"' .. string.rep("x", 69) .. '"}'
local headers = { ["Content-Type"] = "application/json" }
local threads = {}
local counter = 0

function setup(thread)
   counter = counter + 1
   thread:set("id", counter)
   table.insert(threads, thread)
end

function init(args)
   n = tonumber(args[1] or "2000")
   prefix = args[2] or "sh"
   responses = 0
   non2xx = 0
   math.randomseed(os.time() * 1000 + (id or 0))
   -- Requests are built ahead, so picking a channel costs nothing per request.
   paths = {}
   for i = 0, n - 1 do
      paths[i + 1] = "/channels/" .. prefix .. i
   end
end

function request()
   return wrk.format("POST", paths[math.random(n)], headers, body)
end

function response(status, headers, body)
   responses = responses + 1
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
end

function done(summary, latency, requests)
   local r, k = 0, 0
   for _, t in ipairs(threads) do
      r = r + t:get("responses")
      k = k + t:get("non2xx")
   end
   io.write(string.format("post_many.lua: responses=%d non2xx=%d body_bytes=%d\n", r, k, #body))
end
