-- bench/wrk/paths.lua: wrk requests cycling over a fixed object set.
--
--   wrk ... -s bench/wrk/paths.lua http://HOST:PORT/ -- COUNT [PREFIX]
--
-- GET PREFIX0, PREFIX1, ..., PREFIX(COUNT-1), then again from the start (PREFIX: /obj/,
-- COUNT: 100 by default). Each wrk thread starts at a different place in the cycle. The
-- requests are formatted once in init(), so a request costs wrk a table lookup.

local counter = 0

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
end

local requests = {}
local n = 0
local i = 0

function init(args)
   n = tonumber(args[1]) or 100
   local prefix = args[2] or "/obj/"
   for k = 0, n - 1 do
      requests[k + 1] = wrk.format("GET", prefix .. k)
   end
   -- `id` comes from setup() (thread:set makes it a global of this thread's Lua state).
   i = ((id or 0) * 37) % n
end

function request()
   i = i % n + 1
   return requests[i]
end
