-- Runs busted inside the aiorch runtime, as the main task, so that spec
-- bodies can call yielding functions (aiorch.sleep, aiorch.http.request …).
-- Usage: aiorch run tests/busted.lua [busted options] SPEC…
local args = { ... }
-- AIORCH_TEST_SLOWDOWN=N (set by .ci/valgrind): the specs' waits last N
-- times longer, and tests tagged #timing, which bound how fast the runtime
-- itself is, are skipped.
local slowdown = tonumber(os.getenv("AIORCH_TEST_SLOWDOWN") or "")
if slowdown and slowdown > 1 then
  io.stderr:write("AIORCH_TEST_SLOWDOWN=", slowdown, ": skipping the tests tagged #timing\n")
  table.insert(args, 1, "--exclude-tags=timing")
end
arg = { [0] = "busted", table.unpack(args) } -- luacheck: ignore 111 (busted reads the global)

local finished = {}
local code = 0
local real_exit = os.exit
os.exit = function(status) -- luacheck: ignore 122 (busted ends with os.exit)
  code = (status == true or status == 0 or status == nil) and 0 or 1
  error(finished)
end

local ok, err = pcall(require("busted.runner"), { standalone = false })
os.exit = real_exit -- luacheck: ignore 122
if not ok and err ~= finished then error(err, 0) end
return code
