-- Runs busted inside the aiorch runtime, as the main task, so that spec
-- bodies can call yielding functions (aiorch.sleep, aiorch.http.request …).
-- Usage: aiorch run tests/busted.lua [busted options] SPEC…
local args = { ... }
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
