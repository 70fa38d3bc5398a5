-- bench/wrk/zipf.lua: wrk requests over a key set with Zipf-distributed popularity.
--
--   wrk ... -s bench/wrk/zipf.lua http://HOST:PORT/ -- KEYS [S] [SEED] [PREFIX]
--
-- Key k (0 <= k < KEYS) is requested with probability (k + 1)^-S / H, H = sum of
-- (j + 1)^-S over all keys: PREFIX0 is the most popular, then PREFIX1, ... (KEYS: 10000,
-- S: 1, SEED: 1, PREFIX: /zipf/ by default). With KEYS = 10000 and S = 1, /zipf/0 gets
-- 10.2 % of the requests, the first 100 keys 53 %, the last 5000 keys 7 %.
--
-- init() computes the cumulative distribution once (KEYS doubles) and formats every request
-- once; per request, a uniform random number in [0, 1) is looked up in the CDF by binary
-- search (14 steps for 10000 keys).
--
-- Randomness: wrk embeds LuaJIT, whose math.random is a Tausworthe generator (period 2^223,
-- good statistical quality, not cryptographic), with its own state per Lua state, hence per
-- wrk thread. Each thread is seeded with SEED and its thread number, so two threads do not
-- draw the same sequence, and two runs with the same SEED and thread count draw the same
-- sequences per thread (which connection sends which request still depends on timing).

local counter = 0

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
end

local requests = {}
local cdf = {}
local n = 0

function init(args)
   n = tonumber(args[1]) or 10000
   local s = tonumber(args[2]) or 1
   local seed = tonumber(args[3]) or 1
   local prefix = args[4] or "/zipf/"
   local sum = 0
   for k = 1, n do
      sum = sum + k ^ -s
      cdf[k] = sum
   end
   for k = 1, n do
      cdf[k] = cdf[k] / sum
   end
   cdf[n] = 1 -- no rounding gap at the top: every u < 1 finds a key
   for k = 1, n do
      requests[k] = wrk.format("GET", prefix .. (k - 1))
   end
   math.randomseed(seed * 1000003 + (id or 0) * 7919 + 1)
   -- The first draws after seeding are the least mixed: skip a few.
   for _ = 1, 16 do
      math.random()
   end
end

function request()
   local u = math.random()
   -- The smallest k with cdf[k] > u.
   local lo, hi = 1, n
   while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if cdf[mid] > u then
         hi = mid
      else
         lo = mid + 1
      end
   end
   return requests[lo]
end
