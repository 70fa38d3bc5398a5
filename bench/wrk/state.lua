-- bench/wrk/state.lua: requests to random numbered keys of the state API (or anything shaped alike).
--
--   wrk ... -s bench/wrk/state.lua http://HOST:PORT/ -- METHOD PREFIX N [SUFFIX] [BYTES] [SEED]
--
-- Each request is METHOD PREFIX<k>SUFFIX, k uniform at random in [0, N) per request (LuaJIT's
-- math.random, seeded from SEED and the wrk thread number, so every target of a run gets the
-- same sequence of keys). BYTES > 0 sends a body of that many bytes (printable, the same for
-- every request). Headers given to wrk with -H (Authorization, say) go into every request.
--
-- bench/state.sh's phases:
--   GET  /state/kv/bench/k<k>                     -- GET /state/kv/bench/k 10000 "" 0 1
--   PUT  /state/kv/put/k<k>?ttl=1h, 100 B body    -- PUT /state/kv/put/k 1000000 ?ttl=1h 100 1
--   POST /state/counters/c<k>/incr?by=1           -- POST /state/counters/c 100 /incr?by=1 0 1
--
-- The request is formatted once in init() and split around the key, so a request costs wrk
-- one random number and one string concatenation.

local counter = 0

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
end

local head, tail = "", ""
local n = 1

function init(args)
   local method = assert(args[1], "state.lua: METHOD PREFIX N [SUFFIX] [BYTES] [SEED]")
   local prefix = assert(args[2], "state.lua: PREFIX missing")
   n = assert(tonumber(args[3]), "state.lua: N missing")
   assert(n >= 1, "state.lua: N must be >= 1")
   local suffix = args[4] or ""
   local bytes = tonumber(args[5]) or 0
   local seed = tonumber(args[6]) or 1

   local body = nil
   if bytes > 0 then
      local pattern = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
      body = string.rep(pattern, math.ceil(bytes / #pattern)):sub(1, bytes)
   end
   local marker = "@@KEY@@"
   local req = wrk.format(method, prefix .. marker .. suffix, nil, body)
   local a, b = string.find(req, marker, 1, true)
   head = req:sub(1, a - 1)
   tail = req:sub(b + 1)

   -- `id` comes from setup() (thread:set makes it a global of this thread's Lua state).
   math.randomseed(seed * 7919 + (id or 0))
end

function request()
   return head .. math.random(0, n - 1) .. tail
end
