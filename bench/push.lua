-- wrk script: POST a ~100-byte body to the nginx+Lua gateway's contract,
-- POST /push?c=<channel> (pushd's /push and bench/peers/lua-gateway.conf's).
--   wrk -t1 -c8 -d5s --latency -s bench/push.lua 'http://127.0.0.1:PORT/push?c=bench'
-- The same request as bench/post.lua (body, headers). Counts the answers that are
-- not 2xx and the 2xx answers that are not `S|<ms>|<request id>`, and prints them at
-- the end: "push.lua: responses=N non2xx=N bad=N".

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"t":1732521234567890,"pad":"' .. string.rep("x", 69) .. '"}'

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   responses = 0
   non2xx = 0
   bad = 0
end

function response(status, headers, body)
   responses = responses + 1
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   elseif not string.match(body, "^S|%d+|%x+$") then
      bad = bad + 1
   end
end

function done(summary, latency, requests)
   local r, n, b = 0, 0, 0
   for _, t in ipairs(threads) do
      r = r + t:get("responses")
      n = n + t:get("non2xx")
      b = b + t:get("bad")
   end
   io.write(string.format("push.lua: responses=%d non2xx=%d bad=%d body_bytes=%d\n",
                          r, n, b, #wrk.body))
end
