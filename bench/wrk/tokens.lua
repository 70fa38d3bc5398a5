-- bench/wrk/tokens.lua: every request with a bearer token of its own, from a file.
--
--   wrk ... -s bench/wrk/tokens.lua http://HOST:PORT/ -- FILE PATH [THREADS]
--
-- FILE holds one token per line (bench/tokens.py writes them). Each request is GET PATH with
-- `Authorization: Bearer <the next token>`; with THREADS wrk threads (wrk -t, default 1),
-- thread k sends tokens k, k + THREADS, k + 2 * THREADS, ..., so that no two requests of a run
-- carry the same token, until the file runs out: then a thread starts its share again, and
-- tokens repeat. The caller compares wrk's request count with the number of tokens to know.
-- A request costs wrk one string concatenation.

local counter = 0

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
end

local tokens = {}
local n = 0
local i = 0
local step = 1
local head = ""

function init(args)
   local file = assert(args[1], "tokens.lua: FILE PATH [THREADS]")
   local path = args[2] or "/"
   step = tonumber(args[3]) or 1
   for line in io.lines(file) do
      if #line > 0 then
         n = n + 1
         tokens[n] = line
      end
   end
   assert(n > 0, "tokens.lua: no token in " .. file)
   -- The request wrk would send (method, path, Host), without its final empty line.
   head = wrk.format("GET", path):gsub("\r\n$", "") .. "Authorization: Bearer "
   -- `id` comes from setup() (thread:set makes it a global of this thread's Lua state).
   i = (id or 0) - step
end

function request()
   i = i + step
   if i >= n then
      i = (id or 0) % n
   end
   return head .. tokens[i + 1] .. "\r\n\r\n"
end
